/* SPDX-License-Identifier: BSD-3-Clause */
/* Consistency check of a qcow2 file, in the manner of qemu-img check.
 *
 * The check rebuilds, in memory, how many times each host cluster of the
 * file is referenced, and compares that with the refcounts the file
 * stores.  It runs in three passes:
 *
 *   1. count: the header cluster, the L1 table, every L2 table (one at a
 *      time, each walked once), every cluster an L2 entry uses (a normal
 *      or preallocated zero cluster: one cluster; a compressed one: every
 *      cluster its byte range touches), the refcount table and the
 *      refcount blocks.  Entries with reserved bits, unaligned offsets
 *      or ranges that run past the end of the file are errors.
 *   2. compare, refcount block by refcount block: stored < referenced is
 *      an error (a cluster that is in use could be allocated again);
 *      stored > referenced is a leak (space is wasted, nothing more).
 *      With repair_leaks, and only when nothing but leaks was found, the
 *      leaked refcounts are lowered to the number of references and the
 *      blocks are rewritten in place.
 *   3. the COPIED flag of each L1 and L2 entry must be set exactly when
 *      the stored refcount of its cluster is 1 (after any repair).
 *
 * With extended L2 entries each entry also has a subcluster bitmap; as
 * qemu-img check does, pass 1 counts as corruptions a subcluster both
 * allocated and zero, allocated subclusters without a host cluster, a
 * bitmap on a compressed cluster, and the descriptor's zero flag (which
 * is reserved there).  Bits of subclusters past the end of the disk are
 * not errors: QEMU itself allocates whole subclusters there.
 *
 * The verdict agrees with qemu-img check (see tests/test-check.sh): the
 * same images are clean, leaking or corrupt, with the same counts in the
 * cases the tests build.  Known differences, all on images that are
 * corrupt either way: an L1 entry whose offset is 0 is never walked; an
 * L2 table referenced twice is walked once; the zero flag in a version 2
 * image is an error (the spec keeps that bit 0 there, and our engine
 * refuses such entries); a refcount block that is not cluster aligned
 * makes the refcounts it would hold read as 0 (qemu-img counts each of
 * them as a check error instead).
 *
 * Memory: one 16-bit counter and one bit per host cluster, plus a few
 * cluster-sized buffers.  Every offset and size read from the file is
 * checked before it is used to index, allocate or seek: this runs on
 * hostile files.
 */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cowchain.h"
#include "error.h"
#include "io.h"
#include "layer.h"
#include "qcow2.h"

/* qemu-img check refuses files of more clusters than this, and so do we:
 * it bounds the counter array at 4 GiB. */
#define MAX_HOST_CLUSTERS ((uint64_t) INT32_MAX)

/* Saturation value of an in-memory counter. */
#define COUNT_MAX UINT16_MAX

/* Stored refcount blocks kept for the COPIED pass (random lookups). */
#define RB_CACHE_SLOTS 4

struct rb_slot {
  uint64_t index;            /* refcount table index */
  uint64_t used;             /* LRU tick; 0 = empty */
  uint8_t *data;             /* NULL: the block is absent or unusable */
};

struct checker {
  struct qcow2 *q;           /* opened read-only */
  int wfd;                   /* for a repair; else -1 */
  const char *path;
  struct cow_check_result *res;
  uint64_t cs;               /* cluster size */
  uint64_t file_size;
  uint64_t nb_clusters;      /* host clusters of the file, last may be partial */
  uint64_t refcount_max;     /* largest value a stored refcount can hold */
  uint64_t count_limit;      /* largest value a counter can reach */
  uint16_t *refs;            /* references counted, per host cluster */
  uint64_t *walked;          /* bitmap: L2 table at this cluster walked */
  uint8_t *buf;              /* one cluster: the L2 table or block at hand */
  struct rb_slot rb_cache[RB_CACHE_SLOTS];
  uint64_t rb_tick;
  uint64_t next_contiguous;  /* fragmentation, per L2 table */
};

static void
note (struct checker *ck, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));

static void
note (struct checker *ck, const char *fmt, ...)
{
  struct cow_check_result *res = ck->res;
  va_list ap;

  if (res->n_messages >= COW_CHECK_MAX_MESSAGES) {
    res->messages_dropped++;
    return;
  }
  va_start (ap, fmt);
  vsnprintf (res->messages[res->n_messages], COW_CHECK_MESSAGE_LEN, fmt, ap);
  va_end (ap);
  res->n_messages++;
}

static void
corruption (struct checker *ck)
{
  ck->res->corruptions++;
}

/*----------------------------------------------------------------------
 * Stored refcounts.
 */

/* Host offset of refcount block idx, or 0 if there is none or it cannot
 * be used (pass 1 reports why).  Reserved bits are an error, but, as
 * qemu-img check does, the block the rest of the entry names is read. */
static uint64_t
rb_offset (const struct checker *ck, uint64_t idx)
{
  uint64_t off;

  if (idx >= ck->q->reftable_entries)
    return 0;
  off = ck->q->reftable[idx] & ~QCOW2_REFT_RESERVED;
  if ((off & (ck->cs - 1)) || off >= ck->file_size)
    return 0;
  return off;
}

/* Read refcount block idx into buf (zeroes when absent), its offset in
 * *offset (0 = absent).  -1 on a read error, with the last error set. */
static int
rb_read (struct checker *ck, uint64_t idx, uint8_t *buf, uint64_t *offset)
{
  uint64_t off = rb_offset (ck, idx);

  *offset = off;
  if (off == 0) {
    memset (buf, 0, ck->cs);
    return 0;
  }
  if (io_pread (ck->q->fd, buf, ck->cs, off) == -1) {
    cow_error_errno ("%s: cannot read refcount block %" PRIu64 " at offset 0x%"
                     PRIx64, ck->path, idx, off);
    return -1;
  }
  return 0;
}

/* The stored refcount of host cluster c, through a small cache. */
static int
stored_refcount (struct checker *ck, uint64_t c, uint64_t *ref)
{
  uint64_t idx = c >> ck->q->rb_bits;
  struct rb_slot *slot = NULL, *victim = &ck->rb_cache[0];
  uint64_t off;

  for (size_t i = 0; i < RB_CACHE_SLOTS; i++) {
    struct rb_slot *s = &ck->rb_cache[i];
    if (s->used && s->index == idx) {
      slot = s;
      break;
    }
    if (s->used < victim->used)
      victim = s;
  }
  if (slot == NULL) {
    slot = victim;
    slot->used = 0;
    if (rb_offset (ck, idx) == 0) {
      free (slot->data);
      slot->data = NULL;
    }
    else {
      if (slot->data == NULL && (slot->data = malloc (ck->cs)) == NULL) {
        ck->res->check_errors++;
        note (ck, "out of memory for a refcount block");
        return -1;
      }
      if (rb_read (ck, idx, slot->data, &off) == -1) {
        ck->res->check_errors++;
        note (ck, "%s", cow_last_error ());
        return -1;
      }
    }
    slot->index = idx;
  }
  slot->used = ++ck->rb_tick;
  *ref = slot->data
    ? qcow2_refcount_entry_get (ck->q->refcount_order, slot->data,
                                c & ((1ull << ck->q->rb_bits) - 1))
    : 0;
  return 0;
}

/*----------------------------------------------------------------------
 * Pass 1: count references.
 */

/* Count one reference to every host cluster that [offset, offset+size)
 * touches.  A range may run into the last, partly written cluster of the
 * file, but not a whole cluster past its end.  Returns 0, or 1 if the
 * range lies past the end of the file (reported, nothing counted). */
static int
count_range (struct checker *ck, uint64_t offset, uint64_t size,
             const char *what)
{
  uint64_t first, last;

  if (size == 0)
    return 0;
  if (offset > UINT64_MAX - size
      || (offset + size > ck->file_size
          && offset + size - ck->file_size >= ck->cs)) {
    corruption (ck);
    note (ck, "%s at offset 0x%" PRIx64 " (0x%" PRIx64 " bytes) lies past "
          "the end of the file", what, offset, size);
    return 1;
  }
  first = offset / ck->cs;
  last = (offset + size - 1) / ck->cs;
  for (uint64_t c = first; c <= last && c < ck->nb_clusters; c++) {
    if (ck->refs[c] < ck->count_limit)
      ck->refs[c]++;
    else if (ck->count_limit == ck->refcount_max) {
      corruption (ck);
      note (ck, "cluster %" PRIu64 " has more references than a refcount "
            "of %u bits can count", c, 1u << ck->q->refcount_order);
    }
    /* else: saturated, see compare_block */
  }
  return 0;
}

static bool
walked_test_and_set (struct checker *ck, uint64_t c)
{
  uint64_t bit = 1ull << (c % 64);
  bool was = ck->walked[c / 64] & bit;

  ck->walked[c / 64] |= bit;
  return was;
}

/* Read the L2 table at offset into ck->buf.  -1 on error (counted). */
static int
read_l2 (struct checker *ck, uint64_t l1_index, uint64_t offset)
{
  if (io_pread (ck->q->fd, ck->buf, ck->cs, offset) == -1) {
    ck->res->check_errors++;
    note (ck, "cannot read the L2 table of L1 entry %" PRIu64 " at offset 0x%"
          PRIx64 ": %s", l1_index, offset, strerror (errno));
    return -1;
  }
  return 0;
}

/* Entry j of the L2 table in ck->buf: the descriptor, and the subcluster
 * bitmap with extended L2 entries (0 without). */
static uint64_t
l2_entry (const struct checker *ck, uint64_t j, uint64_t *bm)
{
  if (ck->q->ext_l2) {
    *bm = be64_get (ck->buf + 16 * j + 8);
    return be64_get (ck->buf + 16 * j);
  }
  *bm = 0;
  return be64_get (ck->buf + 8 * j);
}

/* A subcluster bitmap that contradicts its descriptor, as qemu-img check
 * reports it: a corruption (the cluster's data is not trusted). */
static void
check_bitmap (struct checker *ck, uint64_t gc, uint64_t e, uint64_t bm)
{
  const char *why = NULL;

  if (e & QCOW2_OFLAG_COMPRESSED) {
    if (bm)
      why = "a compressed cluster has a subcluster bitmap";
  }
  else if (qcow2_sc_alloc (bm) & qcow2_sc_zero (bm))
    why = "subclusters both allocated and zero";
  else if ((e & QCOW2_OFFSET_MASK) == 0 && qcow2_sc_alloc (bm))
    why = "subclusters allocated in a cluster without a host cluster";
  if (why) {
    corruption (ck);
    note (ck, "L2 entry of guest cluster %" PRIu64 " (0x%016" PRIx64
          ", bitmap 0x%016" PRIx64 "): %s", gc, e, bm, why);
  }
}

static void
count_l2_entry (struct checker *ck, uint64_t gc, uint64_t e, uint64_t bm)
{
  struct qcow2 *q = ck->q;
  struct cow_check_result *res = ck->res;
  uint64_t off, size;
  char what[64];

  if (q->ext_l2)
    check_bitmap (ck, gc, e, bm);
  if (e & QCOW2_OFLAG_COMPRESSED) {
    if (e & QCOW2_OFLAG_COPIED) {
      corruption (ck);
      note (ck, "L2 entry of guest cluster %" PRIu64 " (0x%016" PRIx64 "): "
            "a compressed cluster must not have the COPIED flag", gc, e);
      e &= ~QCOW2_OFLAG_COPIED;
    }
    qcow2_compressed_range (q->cluster_bits, e, &off, &size);
    res->allocated_clusters++;
    res->compressed_clusters++;
    res->fragmented_clusters++;
    snprintf (what, sizeof what, "compressed guest cluster %" PRIu64, gc);
    count_range (ck, off, size, what);
    return;
  }

  if ((e & QCOW2_L2_RESERVED)
      || ((q->version < 3 || q->ext_l2) && (e & QCOW2_OFLAG_ZERO))) {
    corruption (ck);
    note (ck, "L2 entry of guest cluster %" PRIu64 " (0x%016" PRIx64 ") has "
          "reserved bits set", gc, e);
  }
  off = e & QCOW2_OFFSET_MASK;
  if (off == 0)
    return;                     /* unallocated, or zero without storage */
  if (off & (ck->cs - 1)) {
    corruption (ck);
    note (ck, "L2 entry of guest cluster %" PRIu64 " (0x%016" PRIx64 "): "
          "offset 0x%" PRIx64 " is not cluster aligned", gc, e, off);
  }
  res->allocated_clusters++;
  if (ck->next_contiguous && off != ck->next_contiguous)
    res->fragmented_clusters++;
  ck->next_contiguous = off + ck->cs;
  snprintf (what, sizeof what, "guest cluster %" PRIu64, gc);
  count_range (ck, off, ck->cs, what);
}

static void
count_l1 (struct checker *ck)
{
  struct qcow2 *q = ck->q;
  uint64_t per_l2 = 1ull << q->l2_bits;

  count_range (ck, q->l1_offset, (uint64_t) q->l1_size * 8, "the L1 table");
  for (uint64_t i = 0; i < q->l1_size; i++) {
    uint64_t e = q->l1[i];
    uint64_t off = e & QCOW2_OFFSET_MASK;
    char what[64];

    if (e & QCOW2_L1_RESERVED) {
      corruption (ck);
      note (ck, "L1 entry %" PRIu64 " (0x%016" PRIx64 ") has reserved bits "
            "set", i, e);
    }
    if (off == 0)
      continue;
    snprintf (what, sizeof what, "the L2 table of L1 entry %" PRIu64, i);
    if (count_range (ck, off, ck->cs, what) == 1)
      continue;                 /* past the end: it would read as zeroes */
    if (off & (ck->cs - 1)) {
      /* Walked all the same, from that offset, as qemu-img does. */
      corruption (ck);
      note (ck, "L1 entry %" PRIu64 " (0x%016" PRIx64 "): L2 table offset 0x%"
            PRIx64 " is not cluster aligned", i, e, off);
    }
    /* A table referenced twice is counted twice (a mismatch the compare
     * pass reports) but walked once, so that a hostile L1 table cannot
     * make us read one cluster millions of times. */
    if (walked_test_and_set (ck, off / ck->cs))
      continue;
    if (read_l2 (ck, i, off) == -1)
      continue;
    ck->next_contiguous = 0;
    for (uint64_t j = 0; j < per_l2; j++) {
      uint64_t bm, l2e = l2_entry (ck, j, &bm);
      count_l2_entry (ck, i * per_l2 + j, l2e, bm);
    }
  }
}

static void
count_refcount_blocks (struct checker *ck)
{
  struct qcow2 *q = ck->q;

  count_range (ck, q->reftable_offset,
               (uint64_t) q->reftable_clusters * ck->cs,
               "the refcount table");
  for (uint64_t i = 0; i < q->reftable_entries; i++) {
    uint64_t e = q->reftable[i];
    uint64_t off = e & ~QCOW2_REFT_RESERVED;

    if (e & QCOW2_REFT_RESERVED) {
      corruption (ck);
      note (ck, "refcount table entry %" PRIu64 " (0x%016" PRIx64 ") has "
            "reserved bits set", i, e);
      continue;
    }
    if (off == 0)
      continue;
    if (off & (ck->cs - 1)) {
      corruption (ck);
      note (ck, "refcount table entry %" PRIu64 ": block offset 0x%" PRIx64
            " is not cluster aligned", i, off);
      continue;
    }
    if (off >= ck->file_size) {
      corruption (ck);
      note (ck, "refcount table entry %" PRIu64 ": block offset 0x%" PRIx64
            " lies past the end of the file", i, off);
      continue;
    }
    count_range (ck, off, ck->cs, "a refcount block");
    /* Everything else is counted by now: a block must be used by
     * nothing but the refcount table, once. */
    if (ck->refs[off / ck->cs] != 1) {
      corruption (ck);
      note (ck, "refcount block %" PRIu64 " at offset 0x%" PRIx64 " is "
            "referenced %u times", i, off, ck->refs[off / ck->cs]);
    }
  }
}

/*----------------------------------------------------------------------
 * Pass 2: compare, and repair leaks.
 */

/* Compare the clusters that refcount block idx covers (held in block,
 * zeroes if absent).  With fix, lower leaked refcounts in block and set
 * *changed. */
static void
compare_block (struct checker *ck, uint64_t idx, uint8_t *block, bool fix,
               uint64_t *highest, bool *changed)
{
  unsigned order = ck->q->refcount_order;
  uint64_t per = 1ull << ck->q->rb_bits;
  uint64_t first = idx * per;
  uint64_t end = ck->nb_clusters - first < per ? ck->nb_clusters : first + per;

  for (uint64_t c = first; c < end; c++) {
    uint64_t stored = qcow2_refcount_entry_get (order, block, c - first);
    uint64_t ref = ck->refs[c];

    if (stored > 0 || ref > 0)
      *highest = c;
    if (ref == COUNT_MAX && ck->count_limit < ck->refcount_max
        && stored >= ref) {
      /* As many references as the counter holds, or more: cannot tell. */
      if (!fix) {
        ck->res->check_errors++;
        note (ck, "cluster %" PRIu64 ": refcount %" PRIu64 ", more than %u "
              "references: cannot verify", c, stored, COUNT_MAX);
      }
      continue;
    }
    if (stored == ref)
      continue;
    if (stored < ref) {
      if (!fix) {
        corruption (ck);
        note (ck, "cluster %" PRIu64 ": refcount %" PRIu64 " but %" PRIu64
              " references (refcount too small)", c, stored, ref);
      }
      continue;
    }
    if (fix) {
      qcow2_refcount_entry_set (order, block, c - first, ref);
      ck->res->leaks--;
      ck->res->leaks_fixed++;
      *changed = true;
      note (ck, "repaired cluster %" PRIu64 ": refcount %" PRIu64
            " lowered to %" PRIu64, c, stored, ref);
    }
    else {
      ck->res->leaks++;
      note (ck, "cluster %" PRIu64 ": refcount %" PRIu64 " but %" PRIu64
            " references (leaked)", c, stored, ref);
    }
  }
}

/* One run over the refcount blocks that cover the file.  Only a repair
 * run (fix) fails, with the last error set: a block it cannot read or
 * write stops it. */
static int
compare_refcounts (struct checker *ck, bool fix)
{
  uint64_t per = 1ull << ck->q->rb_bits;
  uint64_t n_blocks = (ck->nb_clusters + per - 1) / per;
  uint64_t highest = 0;
  bool wrote = false;

  for (uint64_t idx = 0; idx < n_blocks; idx++) {
    uint64_t off;
    bool changed = false;

    if (rb_read (ck, idx, ck->buf, &off) == -1) {
      if (fix)
        return -1;
      ck->res->check_errors++;
      note (ck, "%s", cow_last_error ());
      continue;
    }
    compare_block (ck, idx, ck->buf, fix, &highest, &changed);
    if (changed) {
      if (io_pwrite (ck->wfd, ck->buf, ck->cs, off) == -1) {
        cow_error_errno ("%s: writing refcount block %" PRIu64 " at offset 0x%"
                         PRIx64, ck->path, idx, off);
        return -1;
      }
      wrote = true;
    }
  }
  if (wrote && io_fsync (ck->wfd) == -1) {
    cow_error_errno ("%s: fsync", ck->path);
    return -1;
  }
  if (!fix)
    ck->res->image_end_offset = (highest + 1) * ck->cs;
  return 0;
}

/*----------------------------------------------------------------------
 * Pass 3: the COPIED flags.
 */

static void
check_copied (struct checker *ck, uint64_t e, uint64_t off, const char *what,
              uint64_t n)
{
  uint64_t ref;

  if (stored_refcount (ck, off / ck->cs, &ref) == -1)
    return;
  if ((ref == 1) != ((e & QCOW2_OFLAG_COPIED) != 0)) {
    corruption (ck);
    note (ck, "%s %" PRIu64 " (0x%016" PRIx64 "): the COPIED flag is %s but "
          "the refcount is %" PRIu64, what, n, e,
          (e & QCOW2_OFLAG_COPIED) ? "set" : "clear", ref);
  }
}

static void
check_copied_flags (struct checker *ck)
{
  struct qcow2 *q = ck->q;
  uint64_t per_l2 = 1ull << q->l2_bits;

  memset (ck->walked, 0, (ck->nb_clusters + 63) / 64 * 8);
  for (uint64_t i = 0; i < q->l1_size; i++) {
    uint64_t e = q->l1[i];
    uint64_t off = e & QCOW2_OFFSET_MASK;

    if (off == 0)
      continue;
    check_copied (ck, e, off, "L1 entry", i);
    if (off >= ck->file_size)
      continue;
    if (walked_test_and_set (ck, off / ck->cs))
      continue;
    if (read_l2 (ck, i, off) == -1)
      continue;
    for (uint64_t j = 0; j < per_l2; j++) {
      uint64_t bm, l2e = l2_entry (ck, j, &bm);
      uint64_t data = l2e & QCOW2_OFFSET_MASK;
      if ((l2e & QCOW2_OFLAG_COMPRESSED) || data == 0)
        continue;
      check_copied (ck, l2e, data, "L2 entry of guest cluster",
                    i * per_l2 + j);
    }
  }
}

/*----------------------------------------------------------------------
 * The check.
 */

static void
checker_free (struct checker *ck)
{
  for (size_t i = 0; i < RB_CACHE_SLOTS; i++)
    free (ck->rb_cache[i].data);
  free (ck->refs);
  free (ck->walked);
  free (ck->buf);
  if (ck->wfd != -1)
    io_close (ck->wfd);
  if (ck->q)
    ck->q->layer.ops->close (&ck->q->layer);
}

/* A failure that stops the check: the last error is set. */
static int
give_up (struct checker *ck)
{
  ck->res->check_errors++;
  note (ck, "%s", cow_last_error ());
  checker_free (ck);
  return -1;
}

/* The image is parsed (and its header validated) by the qcow2 layer,
 * opened read-only: the check never runs the layer's write path.  A
 * repair writes refcount blocks through a second descriptor. */
static int
open_image (struct checker *ck, bool repair)
{
  struct layer *l;
  struct stat st1, st2;
  int r = qcow2_probe (ck->path);

  if (r == -1)
    return -1;
  if (r == 0) {
    cow_error_set (EINVAL, "%s: not a qcow2 image (only qcow2 images can be "
                   "checked)", ck->path);
    return -1;
  }
  /* A repair holds the image as a writer from the start (QEMU's locks):
   * it refuses a layer that a server or QEMU is using. */
  l = qcow2_open (ck->path, LAYER_RDONLY | (repair ? LAYER_HOLD_WRITE : 0),
                  1u << 20);
  if (l == NULL)
    return -1;
  ck->q = (struct qcow2 *) l;
  if (!repair)
    return 0;

  if (ck->q->incompat & (QCOW2_INCOMPAT_CORRUPT | QCOW2_INCOMPAT_DIRTY)) {
    cow_error_set (EROFS, "%s: the image is marked %s; cowchain check does "
                   "not repair it (use qemu-img check -r all)", ck->path,
                   (ck->q->incompat & QCOW2_INCOMPAT_CORRUPT)
                   ? "corrupt" : "dirty");
    return -1;
  }
  ck->wfd = io_open (ck->path, O_RDWR, 0);
  if (ck->wfd == -1) {
    cow_error_errno ("%s: cannot open for writing", ck->path);
    return -1;
  }
  if (fstat (ck->q->fd, &st1) == -1 || fstat (ck->wfd, &st2) == -1) {
    cow_error_errno ("%s: stat", ck->path);
    return -1;
  }
  if (st1.st_dev != st2.st_dev || st1.st_ino != st2.st_ino) {
    cow_error_set (EBUSY, "%s: the file was replaced while being opened",
                   ck->path);
    return -1;
  }
  return 0;
}

int
cow_image_check (const char *path, bool repair_leaks,
                 struct cow_check_result *res)
{
  struct checker ck = { .path = path, .res = res, .wfd = -1 };
  struct qcow2 *q;

  memset (res, 0, sizeof *res);
  if (open_image (&ck, repair_leaks) == -1)
    return give_up (&ck);
  q = ck.q;
  ck.cs = q->cluster_size;
  res->cluster_size = ck.cs;
  res->total_clusters = (q->layer.size + ck.cs - 1) / ck.cs;

  if (q->nb_snapshots > 0) {
    cow_error_set (ENOTSUP, "%s: the image has %u internal snapshot(s); "
                   "cowchain check does not handle internal snapshots "
                   "(use qemu-img check)", path, q->nb_snapshots);
    return give_up (&ck);
  }
  if (q->autoclear & QCOW2_AUTOCLEAR_BITMAPS) {
    cow_error_set (ENOTSUP, "%s: the image has persistent dirty bitmaps; "
                   "cowchain check does not handle them (use qemu-img "
                   "check)", path);
    return give_up (&ck);
  }
  if (io_file_size (q->fd, &ck.file_size) == -1) {
    cow_error_errno ("%s: stat", path);
    return give_up (&ck);
  }
  ck.nb_clusters = (ck.file_size + ck.cs - 1) / ck.cs;
  if (ck.nb_clusters > MAX_HOST_CLUSTERS) {
    cow_error_set (EFBIG, "%s: the file holds %" PRIu64 " clusters, more "
                   "than the %" PRIu64 " the check can count", path,
                   ck.nb_clusters, MAX_HOST_CLUSTERS);
    return give_up (&ck);
  }
  ck.refcount_max = qcow2_refcount_max (q->refcount_order);
  ck.count_limit = ck.refcount_max < COUNT_MAX ? ck.refcount_max : COUNT_MAX;
  ck.refs = calloc (ck.nb_clusters ? ck.nb_clusters : 1, sizeof *ck.refs);
  ck.walked = calloc ((ck.nb_clusters + 63) / 64 + 1, sizeof *ck.walked);
  ck.buf = malloc (ck.cs);
  if (ck.refs == NULL || ck.walked == NULL || ck.buf == NULL) {
    cow_error_set (ENOMEM, "%s: out of memory for the reference counts of "
                   "%" PRIu64 " clusters", path, ck.nb_clusters);
    return give_up (&ck);
  }

  /* Pass 1, in the order qemu-img check counts. */
  count_range (&ck, 0, ck.cs, "the header");
  count_l1 (&ck);
  count_refcount_blocks (&ck);

  /* Pass 2. */
  compare_refcounts (&ck, false);
  if (repair_leaks && res->leaks > 0) {
    if (res->corruptions > 0 || res->check_errors > 0)
      res->repair_refused = true;
    else if (compare_refcounts (&ck, true) == -1)
      return give_up (&ck);
  }

  /* Pass 3. */
  check_copied_flags (&ck);

  checker_free (&ck);
  return 0;
}
