/* SPDX-License-Identifier: BSD-3-Clause */
/* Guest I/O on a qcow2 layer: L1/L2 mapping, copy-on-write allocation,
 * zero clusters and flushing.
 *
 * A guest cluster is in one of the states of enum qcow2_ctype.  Reads of
 * NORMAL and SHARED clusters go to the file, ZERO reads as zero,
 * UNALLOCATED asks the layers below, COMPRESSED is inflated.  A write to a
 * NORMAL cluster goes in place, outside the lock.  A write to any other
 * cluster allocates a new one: the request marks the guest clusters in
 * flight (others touching them wait), fills the parts of the first and
 * last cluster it does not cover from what the cluster held before, writes
 * the data, then points the L2 entries at it.  Whole-cluster zero and trim
 * turn clusters into ZERO clusters and release their storage later (see
 * qcow2.h for when a freed cluster may be reused).
 *
 * With extended L2 entries (subclusters, qcow2-format.h) each of the 32
 * subclusters of a cluster is allocated, zero or unallocated on its own,
 * and reads, maps, zero and trim work per subcluster.  A write that is not
 * entirely in allocated subclusters of a cluster with refcount 1 takes
 * one cluster at a time through the in-flight path: a cluster without a
 * host cluster gets a fresh one and only the subclusters the write
 * touches are written, the partly covered ones at the edges filled from
 * what they held (zero or below); a NORMAL cluster gets the same in
 * place; a SHARED or COMPRESSED one is copied to a fresh cluster.  The
 * bitmap changes with the descriptor, in the same L2 entry, after the
 * data write (invariant 2 is unchanged).  The alternative of copying the
 * whole cluster on the first write, as without subclusters, is what
 * subclusters exist to avoid: a 4K write in a fresh layer writes 4K (one
 * or two subclusters) instead of a whole cluster.
 */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "error.h"
#include "io.h"
#include "qcow2.h"

#define MAX_RUN_CLUSTERS 512    /* clusters allocated by one step */

static inline uint64_t
cs (const struct qcow2 *q)
{
  return q->cluster_size;
}

/* Entry i (index within its table) of an L2 table: the descriptor, and
 * with extended L2 entries the subcluster bitmap that follows it. */
static inline uint64_t
l2_desc (const struct qcow2 *q, const uint64_t *l2, uint64_t i)
{
  return be64_get (&l2[i << q->ext_l2]);
}

static inline uint64_t
l2_bitmap (const struct qcow2 *q, const uint64_t *l2, uint64_t i)
{
  return q->ext_l2 ? be64_get (&l2[(i << 1) + 1]) : 0;
}

static inline void
l2_set (const struct qcow2 *q, uint64_t *l2, uint64_t i, uint64_t desc,
        uint64_t bitmap)
{
  be64_put (&l2[i << q->ext_l2], desc);
  if (q->ext_l2)
    be64_put (&l2[(i << 1) + 1], bitmap);
}

static inline uint64_t
l2_index (const struct qcow2 *q, uint64_t gc)
{
  return gc & ((1ull << q->l2_bits) - 1);
}

/* The L2 table of guest cluster gc, pinned; NULL with *absent when there
 * is none, NULL without *absent on error.  change: the caller may change
 * it (else it only reads it, see qcow2_cache_lookup). */
static uint64_t *
get_l2 (struct qcow2 *q, uint64_t gc, bool *absent, bool change)
{
  uint64_t idx = gc >> q->l2_bits;
  uint64_t e, off;

  *absent = false;
  if (idx >= q->l1_size) {
    cow_error_set (EIO, "%s: cluster %" PRIu64 " beyond the L1 table",
                   q->layer.path, gc);
    return NULL;
  }
  e = q->l1[idx];
  off = e & QCOW2_OFFSET_MASK;
  if (off == 0) {
    *absent = true;
    return NULL;
  }
  if ((e & QCOW2_L1_RESERVED) || (off & (cs (q) - 1))) {
    qcow2_mark_corrupt (q, "L1 entry %" PRIu64 " (0x%" PRIx64 ") has reserved "
                        "bits set or is not cluster aligned", idx, e);
    return NULL;
  }
  if (off >= q->file_end) {
    qcow2_mark_corrupt (q, "L1 entry %" PRIu64 " points past the end of "
                        "the file (offset %" PRIu64 ")", idx, off);
    return NULL;
  }
  return change ? qcow2_cache_get (q->l2_cache, off, false)
    : qcow2_cache_lookup (q->l2_cache, off);
}

/* The type of a whole cluster from its L2 entry (bm: its subcluster
 * bitmap, 0 without extended L2 entries), checking the entry.  With
 * extended L2 entries: a cluster with a host cluster is NORMAL or SHARED
 * whatever its bitmap says (its subclusters say more, get_extent); one
 * without is ZERO when all its subclusters read as zero, else
 * UNALLOCATED. */
static int
classify (struct qcow2 *q, uint64_t gc, uint64_t e, uint64_t bm,
          enum qcow2_ctype *type, uint64_t *host)
{
  if (e & QCOW2_OFLAG_COMPRESSED) {
    if (bm != 0) {
      qcow2_mark_corrupt (q, "L2 entry of compressed cluster %" PRIu64
                          " has a subcluster bitmap (0x%016" PRIx64 ")",
                          gc, bm);
      return -1;
    }
    *type = QCOW2_COMPRESSED;
    *host = e;
    return 0;
  }
  if (q->ext_l2) {
    if (e & (QCOW2_L2_RESERVED | QCOW2_OFLAG_ZERO))
      goto bad;
    if (qcow2_sc_alloc (bm) & qcow2_sc_zero (bm)) {
      qcow2_mark_corrupt (q, "L2 entry of cluster %" PRIu64 ": subcluster "
                          "bitmap 0x%016" PRIx64 " has subclusters both "
                          "allocated and zero", gc, bm);
      return -1;
    }
    *host = e & QCOW2_OFFSET_MASK;
    if (*host == 0) {
      if (qcow2_sc_alloc (bm)) {
        qcow2_mark_corrupt (q, "L2 entry of cluster %" PRIu64 ": subcluster"
                            "s allocated (bitmap 0x%016" PRIx64 ") without "
                            "a host cluster", gc, bm);
        return -1;
      }
      *type = qcow2_sc_zero (bm) == QCOW2_SC_ALL ? QCOW2_ZERO
        : QCOW2_UNALLOCATED;
      return 0;
    }
    goto data;
  }
  if (q->version >= 3 && (e & QCOW2_OFLAG_ZERO)) {
    if (e & QCOW2_L2_RESERVED)
      goto bad;
    *type = QCOW2_ZERO;
    *host = e & QCOW2_OFFSET_MASK;
    return 0;
  }
  if (e & (QCOW2_L2_RESERVED | QCOW2_OFLAG_ZERO))
    goto bad;
  *host = e & QCOW2_OFFSET_MASK;
  if (*host == 0) {
    *type = QCOW2_UNALLOCATED;
    return 0;
  }
 data:
  if (*host & (cs (q) - 1))
    goto bad;
  if (*host >= q->file_end) {
    qcow2_mark_corrupt (q, "L2 entry of cluster %" PRIu64 " points past the "
                        "end of the file (offset %" PRIu64 ")", gc, *host);
    return -1;
  }
  *type = (e & QCOW2_OFLAG_COPIED) ? QCOW2_NORMAL : QCOW2_SHARED;
  return 0;

 bad:
  qcow2_mark_corrupt (q, "L2 entry of cluster %" PRIu64 " (0x%" PRIx64
                      ") has reserved bits set or is not cluster aligned",
                      gc, e);
  return -1;
}

int
qcow2_get_cluster (struct qcow2 *q, uint64_t gc, enum qcow2_ctype *type,
                   uint64_t *host)
{
  bool absent;
  uint64_t *l2 = get_l2 (q, gc, &absent, false);
  int r;

  if (l2 == NULL) {
    if (!absent)
      return -1;
    *type = QCOW2_UNALLOCATED;
    *host = 0;
    return 0;
  }
  r = classify (q, gc, l2_desc (q, l2, l2_index (q, gc)),
                l2_bitmap (q, l2, l2_index (q, gc)), type, host);
  qcow2_cache_put (q->l2_cache, l2);
  return r;
}

/* The longest run from guest cluster gc (at most max clusters, within one
 * L2 table) of one type, with contiguous host clusters for NORMAL and
 * SHARED.  Caller holds the lock. */
static int
get_run (struct qcow2 *q, uint64_t gc, uint64_t max, enum qcow2_ctype *type,
         uint64_t *host, uint64_t *n)
{
  uint64_t per = 1ull << q->l2_bits;
  uint64_t i0 = gc & (per - 1);
  bool absent;
  uint64_t *l2;

  if (max > per - i0)
    max = per - i0;
  l2 = get_l2 (q, gc, &absent, false);
  if (l2 == NULL) {
    if (!absent)
      return -1;
    *type = QCOW2_UNALLOCATED;
    *host = 0;
    *n = max;
    return 0;
  }
  if (classify (q, gc, l2_desc (q, l2, i0), l2_bitmap (q, l2, i0), type,
                host) == -1)
    goto err;
  *n = 1;
  if (*type != QCOW2_COMPRESSED) {
    while (*n < max) {
      enum qcow2_ctype t;
      uint64_t h;
      if (classify (q, gc + *n, l2_desc (q, l2, i0 + *n),
                    l2_bitmap (q, l2, i0 + *n), &t, &h) == -1)
        goto err;
      if (t != *type)
        break;
      if ((t == QCOW2_NORMAL || t == QCOW2_SHARED) && h != *host + *n * cs (q))
        break;
      (*n)++;
    }
  }
  qcow2_cache_put (q->l2_cache, l2);
  return 0;

 err:
  qcow2_cache_put (q->l2_cache, l2);
  return -1;
}

/* Does subcluster i hold data (1), read as zero (2) or neither (0)? */
static inline unsigned
sc_kind (uint64_t alloc, uint64_t zero, unsigned i)
{
  return ((alloc >> i) & 1) | (((zero >> i) & 1) << 1);
}

/* What the layer holds from guest byte off on: the longest run (at most
 * max bytes, within one L2 table) that reads from one kind of place: from
 * the file (NORMAL, SHARED: *host is the host offset of off), zeroes,
 * below, or one compressed cluster (*host is its descriptor).  With
 * extended L2 entries the run is made of subclusters.  Caller holds the
 * lock. */
static int
get_extent (struct qcow2 *q, uint64_t off, uint64_t max,
            enum qcow2_ctype *type, uint64_t *host, uint64_t *len)
{
  uint64_t c = cs (q), per = 1ull << q->l2_bits;
  uint64_t in_cl = off & (c - 1);
  uint64_t gc = off >> q->cluster_bits;
  uint64_t table_end, *l2;
  bool absent;

  if (!q->ext_l2) {
    uint64_t want = (in_cl + max + c - 1) >> q->cluster_bits, h, n;

    if (get_run (q, gc, want, type, &h, &n) == -1)
      return -1;
    *len = n * c - in_cl;
    if (*len > max)
      *len = max;
    *host = (*type == QCOW2_NORMAL || *type == QCOW2_SHARED) ? h + in_cl : h;
    return 0;
  }

  table_end = ((gc | (per - 1)) + 1) << q->cluster_bits;
  if (max > table_end - off)
    max = table_end - off;
  l2 = get_l2 (q, gc, &absent, false);
  if (l2 == NULL) {
    if (!absent)
      return -1;
    *type = QCOW2_UNALLOCATED;
    *host = 0;
    *len = max;
    return 0;
  }
  *len = 0;
  while (*len < max) {
    uint64_t pos = off + *len, g = pos >> q->cluster_bits;
    uint64_t i = g & (per - 1), e = l2_desc (q, l2, i);
    uint64_t bm = l2_bitmap (q, l2, i), pin = pos & (c - 1);
    uint64_t h, th = 0, step;
    enum qcow2_ctype ct, t;

    if (classify (q, g, e, bm, &ct, &h) == -1) {
      qcow2_cache_put (q->l2_cache, l2);
      return -1;
    }
    if (ct == QCOW2_COMPRESSED) {
      t = QCOW2_COMPRESSED;
      th = e;
      step = c - pin;
    }
    else {
      uint64_t alloc = qcow2_sc_alloc (bm), zero = qcow2_sc_zero (bm);
      unsigned sc = (unsigned) (pin >> q->sc_bits), k, end;

      k = sc_kind (alloc, zero, sc);
      for (end = sc + 1; end < QCOW2_SUBCLUSTERS
             && sc_kind (alloc, zero, end) == k; end++)
        ;
      t = k == 1 ? ct : k == 2 ? QCOW2_ZERO : QCOW2_UNALLOCATED;
      if (k == 1)
        th = h + pin;
      step = ((uint64_t) end << q->sc_bits) - pin;
    }
    if (*len == 0) {
      *type = t;
      *host = th;
    }
    else if (t != *type || t == QCOW2_COMPRESSED
             || ((t == QCOW2_NORMAL || t == QCOW2_SHARED)
                 && th != *host + *len))
      break;
    *len += step;
  }
  if (*len > max)
    *len = max;
  qcow2_cache_put (q->l2_cache, l2);
  return 0;
}

static void
data_io_begin (struct qcow2 *q)
{
  __atomic_add_fetch (&q->data_io, 1, __ATOMIC_ACQ_REL);
}

static void punch_pending (struct qcow2 *q);

static int
cmp_u64 (const void *a, const void *b)
{
  uint64_t x = *(const uint64_t *) a, y = *(const uint64_t *) b;
  return x < y ? -1 : x > y;
}

static void
data_io_end (struct qcow2 *q)
{
  if (__atomic_sub_fetch (&q->data_io, 1, __ATOMIC_ACQ_REL) == 0
      && __atomic_load_n (&q->free_synced.len, __ATOMIC_RELAXED) > 0) {
    pthread_mutex_lock (&q->lock);
    qcow2_release_synced (q);
    pthread_mutex_unlock (&q->lock);
    punch_pending (q);
  }
}

/* Punch holes for clusters that became free (advisory: errors ignored),
 * then let the allocator reuse them: never the other way round, or a
 * hole could swallow new data. */
static void
punch_pending (struct qcow2 *q)
{
  struct cluster_list l;

  pthread_mutex_lock (&q->lock);
  l = q->punch;
  memset (&q->punch, 0, sizeof q->punch);
  pthread_mutex_unlock (&q->lock);
  if (l.len == 0)
    return;
  /* One hole per run of neighbouring clusters. */
  qsort (l.v, l.len, sizeof l.v[0], cmp_u64);
  for (size_t i = 0, j; i < l.len; i = j) {
    for (j = i + 1; j < l.len && l.v[j] == l.v[j - 1] + 1; j++)
      ;
    io_punch_hole (q->fd, l.v[i] * cs (q), (j - i) * cs (q));
  }
  pthread_mutex_lock (&q->lock);
  q->free_ready_sorted = false;
  for (size_t i = 0; i < l.len; i++)
    qcow2_cluster_list_push (&q->free_ready, l.v[i]);
  pthread_mutex_unlock (&q->lock);
  free (l.v);
}

/* Inflate one compressed cluster into buf (cluster sized). */
static int
read_compressed (struct qcow2 *q, uint64_t gc, uint64_t e, void *buf)
{
  uint64_t off, clen;
  unsigned char *in;
  z_stream z;
  int r;

  qcow2_compressed_range (q->cluster_bits, e, &off, &clen);
  if (clen > 2 * cs (q) || off >= q->file_end || clen > q->file_end - off) {
    qcow2_mark_corrupt (q, "compressed cluster %" PRIu64 " descriptor out of "
                        "bounds (offset %" PRIu64 ", %" PRIu64 " bytes)",
                        gc, off, clen);
    return -1;
  }
  in = malloc (clen);
  if (in == NULL) {
    cow_error_errno ("malloc");
    return -1;
  }
  if (io_pread (q->fd, in, clen, off) == -1) {
    cow_error_errno ("%s: reading compressed cluster %" PRIu64,
                     q->layer.path, gc);
    free (in);
    return -1;
  }
  memset (&z, 0, sizeof z);
  if (inflateInit2 (&z, -12) != Z_OK) {
    free (in);
    cow_error_set (ENOMEM, "inflateInit2 failed");
    return -1;
  }
  z.next_in = in;
  z.avail_in = (uInt) clen;
  z.next_out = buf;
  z.avail_out = (uInt) cs (q);
  r = inflate (&z, Z_FINISH);
  inflateEnd (&z);
  free (in);
  if ((r != Z_STREAM_END && r != Z_BUF_ERROR && r != Z_OK) || z.avail_out != 0) {
    cow_error_set (EIO, "%s: compressed cluster %" PRIu64 " does not inflate "
                   "to a whole cluster", q->layer.path, gc);
    return -1;
  }
  return 0;
}

static int
read_below (struct qcow2 *q, const struct layer_below *below, void *buf,
            uint64_t count, uint64_t offset)
{
  if (below == NULL || below->read == NULL) {
    memset (buf, 0, count);
    return 0;
  }
  return below->read (below->opaque, buf, (uint32_t) count, offset);
}

int
qcow2_layer_read (struct layer *l, void *buf, uint32_t count, uint64_t offset,
                  const struct layer_below *below)
{
  struct qcow2 *q = (struct qcow2 *) l;
  char *p = buf;

  while (count > 0) {
    uint64_t gc = offset >> q->cluster_bits;
    uint64_t in_cl = offset & (cs (q) - 1);
    enum qcow2_ctype type;
    uint64_t host = 0, len;
    int r = 0;

    /* A read-only layer's L1 table never changes: a range without an L2
     * table needs no lock (deep chains are mostly such ranges). */
    if ((l->readonly || __atomic_load_n (&q->frozen, __ATOMIC_ACQUIRE))
        && (gc >> q->l2_bits) < q->l1_size
        && (q->l1[gc >> q->l2_bits] & QCOW2_OFFSET_MASK) == 0) {
      uint64_t per = 1ull << q->l2_bits;
      type = QCOW2_UNALLOCATED;
      len = (per - (gc & (per - 1))) * cs (q) - in_cl;
    }
    else {
      pthread_mutex_lock (&q->lock);
      if (get_extent (q, offset, count, &type, &host, &len) == -1) {
        pthread_mutex_unlock (&q->lock);
        return -1;
      }
      if (type == QCOW2_NORMAL || type == QCOW2_SHARED)
        data_io_begin (q);
      pthread_mutex_unlock (&q->lock);
    }

    if (len > count)
      len = count;
    switch (type) {
    case QCOW2_NORMAL:
    case QCOW2_SHARED:
      r = io_pread (q->fd, p, len, host);
      if (r == -1)
        cow_error_errno ("%s: read at offset %" PRIu64, l->path, host);
      data_io_end (q);
      break;
    case QCOW2_ZERO:
      memset (p, 0, len);
      break;
    case QCOW2_UNALLOCATED:
      r = read_below (q, below, p, len, offset);
      break;
    case QCOW2_COMPRESSED: {
      char *tmp = malloc (cs (q));
      if (tmp == NULL) {
        cow_error_errno ("malloc");
        return -1;
      }
      r = read_compressed (q, gc, host, tmp);
      if (r == 0)
        memcpy (p, tmp + in_cl, len);
      free (tmp);
      break;
    }
    }
    if (r == -1)
      return -1;
    p += len;
    offset += len;
    count -= (uint32_t) len;
  }
  return 0;
}

/* Fill a cluster buffer with what guest cluster gc held before. */
static int
fill_old (struct qcow2 *q, enum qcow2_ctype type, uint64_t host, uint64_t gc,
          void *buf, const struct layer_below *below)
{
  switch (type) {
  case QCOW2_UNALLOCATED:
    return read_below (q, below, buf, cs (q), gc * cs (q));
  case QCOW2_ZERO:
    memset (buf, 0, cs (q));
    return 0;
  case QCOW2_COMPRESSED:
    return read_compressed (q, gc, host, buf);
  case QCOW2_NORMAL:
  case QCOW2_SHARED:
    if (io_pread (q->fd, buf, cs (q), host) == -1) {
      cow_error_errno ("%s: copy-on-write read at %" PRIu64, q->layer.path,
                       host);
      return -1;
    }
    return 0;
  }
  abort ();
}

/* Queue the storage of an entry that is being replaced. */
static int
drop_entry (struct qcow2 *q, uint64_t gc, uint64_t e, uint64_t bm)
{
  enum qcow2_ctype type;
  uint64_t host;

  if (classify (q, gc, e, bm, &type, &host) == -1)
    return -1;
  switch (type) {
  case QCOW2_UNALLOCATED:
    return 0;
  case QCOW2_ZERO:
    return host ? qcow2_free_later (q, host) : 0;
  case QCOW2_NORMAL:
  case QCOW2_SHARED:
    return qcow2_free_later (q, host);
  case QCOW2_COMPRESSED: {
    uint64_t off, len;

    qcow2_compressed_range (q->cluster_bits, e, &off, &len);
    for (uint64_t c = off / cs (q); c <= (off + len - 1) / cs (q); c++)
      if (qcow2_free_later (q, c * cs (q)) == -1)
        return -1;
    return 0;
  }
  }
  abort ();
}

static bool
inflight_overlaps (struct qcow2 *q, uint64_t first, uint64_t n)
{
  for (size_t i = 0; i < q->n_inflight; i++) {
    struct qcow2_inflight *f = &q->inflight[i];
    if (first < f->first + f->count && f->first < first + n)
      return true;
  }
  return false;
}

/* Clusters from first (up to n) that are not in flight. */
static uint64_t
inflight_free_prefix (struct qcow2 *q, uint64_t first, uint64_t n)
{
  for (size_t i = 0; i < q->n_inflight; i++) {
    struct qcow2_inflight *f = &q->inflight[i];
    if (f->first + f->count > first && f->first < first + n)
      n = f->first > first ? f->first - first : 0;
  }
  return n;
}

static int
inflight_add (struct qcow2 *q, uint64_t first, uint64_t n)
{
  if (q->n_inflight == q->cap_inflight) {
    size_t cap = q->cap_inflight ? q->cap_inflight * 2 : 16;
    struct qcow2_inflight *v = realloc (q->inflight, cap * sizeof *v);
    if (v == NULL) {
      cow_error_errno ("realloc");
      return -1;
    }
    q->inflight = v;
    q->cap_inflight = cap;
  }
  q->inflight[q->n_inflight].first = first;
  q->inflight[q->n_inflight].count = n;
  q->n_inflight++;
  return 0;
}

static void
inflight_remove (struct qcow2 *q, uint64_t first)
{
  for (size_t i = 0; i < q->n_inflight; i++)
    if (q->inflight[i].first == first) {
      q->inflight[i] = q->inflight[--q->n_inflight];
      break;
    }
  pthread_cond_broadcast (&q->alloc_done);
}

/* Make sure guest cluster gc has an L2 table (caller holds the lock). */
static uint64_t *
get_or_make_l2 (struct qcow2 *q, uint64_t gc)
{
  bool absent;
  uint64_t *l2 = get_l2 (q, gc, &absent, true);
  uint64_t off;

  if (l2 || !absent)
    return l2;
  off = qcow2_alloc_clusters (q, 1);
  if (off == 0)
    return NULL;
  l2 = qcow2_cache_get (q->l2_cache, off, true);
  if (l2 == NULL) {
    qcow2_free_unused (q, off, 1);
    return NULL;
  }
  qcow2_cache_mark_dirty (q->l2_cache, l2);
  q->l1[gc >> q->l2_bits] = off | QCOW2_OFLAG_COPIED;
  q->l1_dirty = true;
  return l2;
}

/* Allocate and write clusters [gc, gc+n) whose old contents are described
 * by types/hosts; data covers bytes [in_cl, in_cl+len) of the run.
 * Called without the lock; the clusters are marked in flight.  The old
 * contents of a partly covered first and last cluster are read before
 * anything is written, so a failed read (of a base that went away, say)
 * leaves no guest data in the file. */
static int
write_new_clusters (struct qcow2 *q, uint64_t gc, uint64_t n, uint64_t host,
                    const enum qcow2_ctype *types, const uint64_t *olds,
                    const char *data, uint64_t in_cl, uint64_t len,
                    const struct layer_below *below)
{
  uint64_t c = cs (q);
  uint64_t end = in_cl + len;            /* within the run */
  uint64_t tail = n * c - end;
  bool head_partial = in_cl || (n == 1 && tail);
  bool tail_partial = n > 1 && tail;
  char *head_buf = NULL, *tail_buf = NULL;
  int r = -1;

  if (head_partial) {
    head_buf = malloc (c);
    if (head_buf == NULL) {
      cow_error_errno ("malloc");
      goto out;
    }
    if (fill_old (q, types[0], olds[0], gc, head_buf, below) == -1)
      goto out;
  }
  if (tail_partial) {
    tail_buf = malloc (c);
    if (tail_buf == NULL) {
      cow_error_errno ("malloc");
      goto out;
    }
    if (fill_old (q, types[n - 1], olds[n - 1], gc + n - 1, tail_buf,
                  below) == -1)
      goto out;
  }
  /* The first cluster, if the request does not cover all of it. */
  if (head_partial) {
    uint64_t upto = end < c ? end : c;
    memcpy (head_buf + in_cl, data, upto - in_cl);
    if (io_pwrite (q->fd, head_buf, c, host) == -1)
      goto io_err;
    if (n == 1) {
      r = 0;
      goto out;
    }
    data += c - in_cl;
    host += c;
    n--;
    end -= c;
    in_cl = 0;
  }
  /* Whole clusters straight from the caller's buffer. */
  if (n > (tail ? 1u : 0u)) {
    uint64_t whole = n - (tail ? 1 : 0);
    if (io_pwrite (q->fd, data, whole * c, host) == -1)
      goto io_err;
    data += whole * c;
    host += whole * c;
    end -= whole * c;
    n -= whole;
  }
  /* The last cluster, partly covered. */
  if (n == 1) {
    memcpy (tail_buf, data, end);
    if (io_pwrite (q->fd, tail_buf, c, host) == -1)
      goto io_err;
  }
  r = 0;
  goto out;

 io_err:
  cow_error_errno ("%s: write at offset %" PRIu64, q->layer.path, host);
 out:
  free (head_buf);
  free (tail_buf);
  return r;
}

/* Write clusters [gc, gc+n) at their new home host (they are in flight;
 * called without the lock), then point their L2 entries there, queueing
 * what the entries held before to be freed. */
static int
fill_and_map (struct qcow2 *q, uint64_t gc, uint64_t n, uint64_t host,
              const enum qcow2_ctype *types, const uint64_t *olds,
              const char *data, uint64_t in_cl, uint64_t len,
              const struct layer_below *below)
{
  uint64_t per = 1ull << q->l2_bits;
  uint64_t *l2 = NULL;

  if (write_new_clusters (q, gc, n, host, types, olds, data, in_cl, len,
                          below) == 0) {
    pthread_mutex_lock (&q->lock);
    l2 = get_or_make_l2 (q, gc);
  }
  else
    pthread_mutex_lock (&q->lock);
  if (l2 == NULL) {
    qcow2_free_unused (q, host, n);
    inflight_remove (q, gc);
    pthread_mutex_unlock (&q->lock);
    return -1;
  }
  for (uint64_t i = 0; i < n; i++) {
    uint64_t k = (gc + i) & (per - 1);
    drop_entry (q, gc + i, l2_desc (q, l2, k), l2_bitmap (q, l2, k));
    l2_set (q, l2, k, (host + i * cs (q)) | QCOW2_OFLAG_COPIED,
            qcow2_sc_bitmap (QCOW2_SC_ALL, 0));
  }
  qcow2_cache_mark_dirty (q->l2_cache, l2);
  qcow2_cache_put (q->l2_cache, l2);
  inflight_remove (q, gc);
  pthread_mutex_unlock (&q->lock);
  return 0;
}

static int
check_writable (struct qcow2 *q)
{
  if (q->layer.readonly) {
    cow_error_set (EROFS, "%s: layer is read-only", q->layer.path);
    return -1;
  }
  if (q->corrupt) {
    cow_error_set (EROFS, "%s: layer is marked corrupt; refusing to write",
                   q->layer.path);
    return -1;
  }
  return 0;
}

/* One step of a write: the run at offset.  Returns bytes done or -1. */
static int64_t
write_step (struct qcow2 *q, const char *data, uint64_t count, uint64_t offset,
            const struct layer_below *below)
{
  uint64_t c = cs (q);
  uint64_t gc = offset >> q->cluster_bits;
  uint64_t in_cl = offset & (c - 1);
  uint64_t want = (in_cl + count + c - 1) >> q->cluster_bits;
  enum qcow2_ctype type, types[MAX_RUN_CLUSTERS];
  uint64_t host, n, len, olds[MAX_RUN_CLUSTERS];
  uint64_t *l2;
  uint64_t per = 1ull << q->l2_bits;

  if (want > MAX_RUN_CLUSTERS)
    want = MAX_RUN_CLUSTERS;

  pthread_mutex_lock (&q->lock);
  for (;;) {
    if (inflight_overlaps (q, gc, 1)) {
      pthread_cond_wait (&q->alloc_done, &q->lock);
      continue;
    }
    if (get_run (q, gc, want, &type, &host, &n) == -1)
      goto err_unlock;
    break;
  }

  if (type == QCOW2_NORMAL) {
    data_io_begin (q);
    pthread_mutex_unlock (&q->lock);
    len = n * c - in_cl;
    if (len > count)
      len = count;
    if (io_pwrite (q->fd, data, len, host + in_cl) == -1) {
      cow_error_errno ("%s: write at offset %" PRIu64, q->layer.path,
                       host + in_cl);
      data_io_end (q);
      return -1;
    }
    data_io_end (q);
    return (int64_t) len;
  }

  /* Clusters that need a new home: as many in a row as are not NORMAL
   * and not in flight, within one L2 table. */
  if (want > per - (gc & (per - 1)))
    want = per - (gc & (per - 1));
  want = inflight_free_prefix (q, gc, want);
  l2 = get_or_make_l2 (q, gc);
  if (l2 == NULL)
    goto err_unlock;
  for (n = 0; n < want; n++) {
    uint64_t e = l2_desc (q, l2, (gc + n) & (per - 1));
    if (classify (q, gc + n, e, 0, &types[n], &olds[n]) == -1) {
      qcow2_cache_put (q->l2_cache, l2);
      goto err_unlock;
    }
    if (types[n] == QCOW2_NORMAL)
      break;
    if (types[n] == QCOW2_COMPRESSED)
      olds[n] = e;
  }
  qcow2_cache_put (q->l2_cache, l2);
  /* Freed clusters first: a shorter run, the rest on the next step.
   * Unless the request ends in a partial cluster of this run: its old
   * contents must be read before any of the request is written (see
   * write_new_clusters), so then the run stays whole. */
  {
    uint64_t got;
    host = qcow2_alloc_run (q, n, &got);
    if (host != 0 && got < n && in_cl + count < n * c) {
      qcow2_free_unused (q, host, got);
      host = qcow2_alloc_clusters (q, n);
    }
    else
      n = got;
  }
  if (host == 0)
    goto err_unlock;
  if (inflight_add (q, gc, n) == -1) {
    qcow2_free_unused (q, host, n);
    goto err_unlock;
  }
  pthread_mutex_unlock (&q->lock);

  len = n * c - in_cl;
  if (len > count)
    len = count;
  if (fill_and_map (q, gc, n, host, types, olds, data, in_cl, len,
                    below) == -1)
    return -1;
  return (int64_t) len;

 err_unlock:
  pthread_mutex_unlock (&q->lock);
  return -1;
}

static int write_zeroes (struct qcow2 *q, uint64_t count, uint64_t offset,
                         const struct layer_below *below);

/*----------------------------------------------------------------------
 * Writes, zero and populate with extended L2 entries (subclusters).
 */

static inline uint64_t
scs (const struct qcow2 *q)
{
  return 1ull << q->sc_bits;
}

/* The old entry of guest cluster gc (0, 0 without an L2 table). */
static int
read_entry (struct qcow2 *q, uint64_t gc, uint64_t *desc, uint64_t *bm)
{
  bool absent;
  uint64_t *l2 = get_l2 (q, gc, &absent, false);

  *desc = *bm = 0;
  if (l2 == NULL)
    return absent ? 0 : -1;
  *desc = l2_desc (q, l2, l2_index (q, gc));
  *bm = l2_bitmap (q, l2, l2_index (q, gc));
  qcow2_cache_put (q->l2_cache, l2);
  return 0;
}

/* Point guest cluster gc at desc/bm; drop: free what the old entry held
 * (its host cluster moved or went away).  Caller holds the lock.  Fails
 * only when the L2 table cannot be had, and then changes nothing. */
static int
set_entry (struct qcow2 *q, uint64_t gc, uint64_t desc, uint64_t bm,
           bool drop)
{
  uint64_t *l2 = get_or_make_l2 (q, gc);
  uint64_t i = l2_index (q, gc);

  if (l2 == NULL)
    return -1;
  /* A failed drop (no memory for the free list) only leaks the cluster. */
  if (drop)
    drop_entry (q, gc, l2_desc (q, l2, i), l2_bitmap (q, l2, i));
  l2_set (q, l2, i, desc, bm);
  qcow2_cache_mark_dirty (q->l2_cache, l2);
  qcow2_cache_put (q->l2_cache, l2);
  return 0;
}

/* What subcluster sc of guest cluster gc read before, into dst (one
 * subcluster): old is the inflated cluster of a compressed one. */
static int
fill_sc_old (struct qcow2 *q, uint64_t gc, unsigned sc, uint64_t host,
             uint64_t alloc, uint64_t zero, const char *old, char *dst,
             const struct layer_below *below)
{
  uint64_t at = (uint64_t) sc << q->sc_bits;

  if (old) {
    memcpy (dst, old + at, scs (q));
    return 0;
  }
  if ((alloc >> sc) & 1) {
    if (io_pread (q->fd, dst, scs (q), host + at) == -1) {
      cow_error_errno ("%s: copy-on-write read at %" PRIu64, q->layer.path,
                       host + at);
      return -1;
    }
    return 0;
  }
  if ((zero >> sc) & 1) {
    memset (dst, 0, scs (q));
    return 0;
  }
  return read_below (q, below, dst, scs (q), gc * cs (q) + at);
}

/* Write [b, e) of guest cluster gc (in-cluster offsets; data NULL: leave
 * the subclusters in need as they were, see populate) at host cluster
 * 'to'.  need: the subclusters to make allocated there; those not fully
 * covered by [b, e) are filled with what they read before (the old
 * entry: ohost/alloc/zero, old inflated if compressed), except allocated
 * ones written in place (to == ohost), whose other bytes are there
 * already and may be written meanwhile by another request. */
static int
write_subclusters (struct qcow2 *q, uint64_t gc, uint64_t to, uint64_t need,
                   const char *data, uint64_t b, uint64_t e, uint64_t ohost,
                   uint64_t alloc, uint64_t zero, const char *old,
                   const struct layer_below *below)
{
  unsigned first = (unsigned) __builtin_ctzll (need);
  unsigned last = 64 - (unsigned) __builtin_clzll (need);   /* exclusive */
  uint64_t ws = (uint64_t) first << q->sc_bits;
  uint64_t we = (uint64_t) last << q->sc_bits;
  bool in_place = to == ohost;
  char *buf;
  int r = -1;

  if (in_place) {
    /* Allocated edges: only the bytes the request brings. */
    if (data && ((alloc >> first) & 1) && b > ws)
      ws = b;
    if (data && ((alloc >> (last - 1)) & 1) && e < we)
      we = e;
  }
  /* Zeroed: subclusters in the span that stay unallocated are written
   * too (one write), and must not carry our memory into the file. */
  buf = calloc (1, we - ws);
  if (buf == NULL) {
    cow_error_errno ("calloc");
    return -1;
  }
  for (unsigned sc = first; sc < last; sc++) {
    uint64_t sb = (uint64_t) sc << q->sc_bits, se = sb + scs (q);

    if (!((need >> sc) & 1) || (data && b <= sb && se <= e))
      continue;
    if (in_place && ((alloc >> sc) & 1))
      continue;                 /* never past ws/we: see above */
    if (fill_sc_old (q, gc, sc, ohost, alloc, zero, old, buf + (sb - ws),
                     below) == -1)
      goto out;
  }
  if (data) {
    /* The part of [b, e) that the write covers. */
    uint64_t cb = b > ws ? b : ws, ce = e < we ? e : we;
    if (cb < ce)
      memcpy (buf + (cb - ws), data + (cb - b), ce - cb);
  }
  if (in_place && !data) {
    /* populate in place: one write per run of needed subclusters, never
     * over the allocated ones. */
    for (unsigned sc = first; sc < last; ) {
      unsigned end;
      if (!((need >> sc) & 1)) {
        sc++;
        continue;
      }
      for (end = sc + 1; end < last && ((need >> end) & 1); end++)
        ;
      if (io_pwrite (q->fd, buf + (((uint64_t) sc << q->sc_bits) - ws),
                     (uint64_t) (end - sc) << q->sc_bits,
                     to + ((uint64_t) sc << q->sc_bits)) == -1)
        goto io_err;
      sc = end;
    }
    r = 0;
    goto out;
  }
  if (io_pwrite (q->fd, buf, we - ws, to + ws) == -1)
    goto io_err;
  r = 0;
  goto out;

 io_err:
  cow_error_errno ("%s: write at offset %" PRIu64, q->layer.path, to + ws);
 out:
  free (buf);
  return r;
}

/* Write the part of [offset, offset+count) in one guest cluster whose
 * subclusters are not all allocated in place, or whose cluster must be
 * copied.  data NULL: populate, with pdata the buffer for the whole
 * cluster (read from below) and only unallocated, non-zero subclusters
 * filled.  Returns bytes done or -1. */
static int64_t
alloc_step_ext (struct qcow2 *q, const char *data, uint64_t count,
                uint64_t offset, const struct layer_below *below,
                const char *pdata)
{
  uint64_t c = cs (q), gc = offset >> q->cluster_bits;
  uint64_t b = offset & (c - 1);
  uint64_t e = b + count < c ? b + count : c;
  uint64_t desc, bm, ohost, alloc, zero, need, to;
  uint64_t nalloc, nzero;
  enum qcow2_ctype ct;
  bool move, fresh;
  char *old = NULL;
  unsigned s0 = (unsigned) (b >> q->sc_bits);
  unsigned s1 = (unsigned) ((e - 1) >> q->sc_bits) + 1;
  uint64_t touched = qcow2_sc_mask (s0, s1);

  /* Caller holds the lock and made sure gc is not in flight. */
  if (read_entry (q, gc, &desc, &bm) == -1
      || classify (q, gc, desc, bm, &ct, &ohost) == -1)
    return -1;
  alloc = qcow2_sc_alloc (bm);
  zero = qcow2_sc_zero (bm);
  if (ct == QCOW2_COMPRESSED) {
    alloc = QCOW2_SC_ALL;
    zero = 0;
    if (pdata)
      return (int64_t) (e - b);   /* held: populate leaves it */
  }
  if (pdata) {
    touched &= ~(alloc | zero);
    if (touched == 0)
      return (int64_t) (e - b);
  }
  /* A write over both allocated and unallocated subclusters of a cluster
   * of our own moves the cluster too: written in place, its allocated
   * part would be visible at once and the rest only with the L2 entry,
   * and a request inside one cluster is to be all there or not at all
   * after the process is killed (tests/test-restart-matrix.sh). */
  move = ct == QCOW2_SHARED || ct == QCOW2_COMPRESSED
    || (!pdata && ct == QCOW2_NORMAL && (touched & alloc)
        && (touched & ~alloc));
  fresh = ohost == 0 || move;
  need = touched | (move ? alloc : 0);
  nalloc = alloc | touched;
  nzero = zero & ~touched;
  if (fresh) {
    to = qcow2_alloc_clusters (q, 1);
    if (to == 0)
      return -1;
  }
  else
    to = ohost;
  if (inflight_add (q, gc, 1) == -1) {
    if (fresh)
      qcow2_free_unused (q, to, 1);
    return -1;
  }
  /* A cluster of our own being moved: in-place writes into its allocated
   * subclusters that started before it was in flight (none can start
   * now) must land before they are copied. */
  if (ct == QCOW2_NORMAL && move) {
    unsigned *slot = &q->inplace[gc % QCOW2_INPLACE_SLOTS];
    while (__atomic_load_n (slot, __ATOMIC_ACQUIRE) > 0) {
      pthread_mutex_unlock (&q->lock);
      sched_yield ();
      pthread_mutex_lock (&q->lock);
    }
  }
  pthread_mutex_unlock (&q->lock);

  if (ct == QCOW2_COMPRESSED) {
    old = malloc (c);
    if (old == NULL)
      cow_error_errno ("malloc");
    else if (read_compressed (q, gc, desc, old) == -1) {
      free (old);
      old = NULL;
    }
    if (old == NULL)
      goto err;
  }
  if (pdata) {
    /* The subclusters to fill, from the caller's buffer: the others in
     * [first, last) are left out of the write (in place) or hold what
     * they held (moved: filled from the old cluster). */
    char *tmp = malloc (c);
    int r;
    if (tmp == NULL) {
      cow_error_errno ("malloc");
      goto err;
    }
    memset (tmp, 0, c);
    memcpy (tmp + b, pdata, e - b);
    for (unsigned sc = 0; sc < QCOW2_SUBCLUSTERS; sc++)
      if (((need & ~touched) >> sc) & 1)
        if (fill_sc_old (q, gc, sc, ohost, alloc, zero, old,
                         tmp + ((uint64_t) sc << q->sc_bits), below) == -1) {
          free (tmp);
          goto err;
        }
    /* Touched subclusters come whole from tmp (zero past e). */
    if (fresh)
      r = write_subclusters (q, gc, to, need, tmp, 0, c, 0, 0, 0, NULL,
                             below) == -1 ? -1 : 0;
    else
      r = write_subclusters (q, gc, to, touched, NULL, 0, 0, ohost,
                             alloc, zero, tmp, below);
    free (tmp);
    if (r == -1)
      goto err;
  }
  else if (write_subclusters (q, gc, to, need, data, b, e, ohost, alloc,
                              zero, old, below) == -1)
    goto err;
  free (old);
  pthread_mutex_lock (&q->lock);
  if (set_entry (q, gc, to | QCOW2_OFLAG_COPIED,
                 qcow2_sc_bitmap (nalloc, nzero), move) == -1) {
    /* A failed drop only leaks; a failed L2 table read changed nothing. */
    if (fresh)
      qcow2_free_unused (q, to, 1);
    inflight_remove (q, gc);
    return -1;
  }
  inflight_remove (q, gc);
  return (int64_t) (e - b);

 err:
  free (old);
  pthread_mutex_lock (&q->lock);
  if (fresh)
    qcow2_free_unused (q, to, 1);
  inflight_remove (q, gc);
  return -1;
}

static int64_t
write_step_ext (struct qcow2 *q, const char *data, uint64_t count,
                uint64_t offset, const struct layer_below *below)
{
  enum qcow2_ctype type;
  uint64_t host, len;
  int64_t r;

  pthread_mutex_lock (&q->lock);
  while (inflight_overlaps (q, offset >> q->cluster_bits, 1))
    pthread_cond_wait (&q->alloc_done, &q->lock);
  if (get_extent (q, offset, count, &type, &host, &len) == -1) {
    pthread_mutex_unlock (&q->lock);
    return -1;
  }
  if (type == QCOW2_NORMAL
      && len >= (count < cs (q) - (offset & (cs (q) - 1))
                 ? count : cs (q) - (offset & (cs (q) - 1)))) {
    /* Allocated subclusters of a cluster of our own: in place, in this
     * cluster only (the one checked not to be in flight: a cluster being
     * moved, see alloc_step_ext, is never written in place), and only
     * when the request's part in this cluster is all allocated. */
    uint64_t in_cl = offset & (cs (q) - 1);
    unsigned *slot = &q->inplace[(offset >> q->cluster_bits)
                                 % QCOW2_INPLACE_SLOTS];

    data_io_begin (q);
    __atomic_add_fetch (slot, 1, __ATOMIC_ACQ_REL);
    pthread_mutex_unlock (&q->lock);
    if (len > count)
      len = count;
    if (len > cs (q) - in_cl)
      len = cs (q) - in_cl;
    r = io_pwrite (q->fd, data, len, host);
    if (r == -1)
      cow_error_errno ("%s: write at offset %" PRIu64, q->layer.path, host);
    __atomic_sub_fetch (slot, 1, __ATOMIC_ACQ_REL);
    data_io_end (q);
    return r == -1 ? -1 : (int64_t) len;
  }
  r = alloc_step_ext (q, data, count, offset, below, NULL);
  pthread_mutex_unlock (&q->lock);
  return r;
}

enum zero_mode { ZERO_WRITE, ZERO_FAST, ZERO_TRIM };

/* Make subclusters [from, to) (byte offsets, subcluster aligned) read as
 * zero.  A host cluster left with no allocated subcluster is released.
 * A compressed cluster only partly zeroed is rewritten (ZERO_WRITE),
 * refused with ENOTSUP (ZERO_FAST) or left alone (ZERO_TRIM). */
static int
zero_subclusters (struct qcow2 *q, uint64_t from, uint64_t to,
                  enum zero_mode mode, const struct layer_below *below)
{
  static const char zero_buf[65536];
  uint64_t c = cs (q);

  while (from < to) {
    uint64_t gc = from >> q->cluster_bits;
    uint64_t cend = (gc + 1) << q->cluster_bits;
    uint64_t e = to < cend ? to : cend;
    unsigned s0 = (unsigned) ((from & (c - 1)) >> q->sc_bits);
    unsigned s1 = s0 + (unsigned) ((e - from) >> q->sc_bits);
    uint64_t mask = qcow2_sc_mask (s0, s1), desc, bm, host, alloc, zero;
    enum qcow2_ctype ct;
    int r;

    pthread_mutex_lock (&q->lock);
    while (inflight_overlaps (q, gc, 1))
      pthread_cond_wait (&q->alloc_done, &q->lock);
    if (read_entry (q, gc, &desc, &bm) == -1
        || classify (q, gc, desc, bm, &ct, &host) == -1)
      goto err_unlock;
    if (ct == QCOW2_COMPRESSED && mask != QCOW2_SC_ALL) {
      pthread_mutex_unlock (&q->lock);
      if (mode == ZERO_TRIM) {
        from = e;
        continue;
      }
      if (mode == ZERO_FAST) {
        cow_error_set (ENOTSUP, "%s: zeroing part of a compressed cluster "
                       "needs data writes", q->layer.path);
        return -1;
      }
      for (uint64_t p = from; p < e; ) {
        uint64_t n = e - p < sizeof zero_buf ? e - p : sizeof zero_buf;
        if (qcow2_layer_write (&q->layer, zero_buf, (uint32_t) n, p,
                               below) == -1)
          return -1;
        p += n;
      }
      from = e;
      continue;
    }
    alloc = ct == QCOW2_COMPRESSED ? 0 : qcow2_sc_alloc (bm) & ~mask;
    zero = (ct == QCOW2_COMPRESSED ? 0 : qcow2_sc_zero (bm)) | mask;
    if (host == 0 && desc == 0 && bm == qcow2_sc_bitmap (alloc, zero)) {
      pthread_mutex_unlock (&q->lock);
      from = e;
      continue;                 /* reads zero already */
    }
    if (alloc == 0 || ct == QCOW2_COMPRESSED)
      r = set_entry (q, gc, 0, qcow2_sc_bitmap (0, zero), true);
    else
      r = set_entry (q, gc, desc, qcow2_sc_bitmap (alloc, zero), false);
    if (r == -1)
      goto err_unlock;
    pthread_mutex_unlock (&q->lock);
    from = e;
  }
  return 0;

 err_unlock:
  pthread_mutex_unlock (&q->lock);
  return -1;
}

/* qcow2_layer_zero with subclusters: whole subclusters get the zero bit,
 * partial ones at the edges are written. */
static int
zero_ext (struct qcow2 *q, uint64_t count, uint64_t offset, bool fast,
          const struct layer_below *below)
{
  uint64_t end = offset + count;
  uint64_t first = (offset + scs (q) - 1) & ~(scs (q) - 1);
  uint64_t last = end & ~(scs (q) - 1);

  if (first >= last || (fast && (first != offset || last != end))) {
    if (fast) {
      cow_error_set (ENOTSUP, "%s: zeroing a partial subcluster needs "
                     "data writes", q->layer.path);
      return -1;
    }
    if (first >= last)
      return write_zeroes (q, count, offset, below);
  }
  if (first > offset && write_zeroes (q, first - offset, offset, below) == -1)
    return -1;
  if (zero_subclusters (q, first, last, fast ? ZERO_FAST : ZERO_WRITE,
                        below) == -1)
    return -1;
  if (end > last && write_zeroes (q, end - last, last, below) == -1)
    return -1;
  return 0;
}

/* qcow2_layer_populate with subclusters: per cluster, the subclusters
 * that neither hold data nor read as zero. */
static int
populate_ext (struct qcow2 *q, const char *data, uint64_t count,
              uint64_t offset)
{
  uint64_t c = cs (q);

  while (count > 0) {
    uint64_t gc = offset >> q->cluster_bits;
    uint64_t len = count < c ? count : c;
    int64_t r = (int64_t) len;

    pthread_mutex_lock (&q->lock);
    while (inflight_overlaps (q, gc, 1))
      pthread_cond_wait (&q->alloc_done, &q->lock);
    if (data)
      r = alloc_step_ext (q, NULL, len, offset, NULL, data);
    else {
      uint64_t desc, bm, host, absent;
      unsigned s1 = (unsigned) ((len + scs (q) - 1) >> q->sc_bits);
      enum qcow2_ctype ct;

      if (read_entry (q, gc, &desc, &bm) == -1
          || classify (q, gc, desc, bm, &ct, &host) == -1)
        r = -1;
      else if (ct != QCOW2_COMPRESSED) {
        absent = qcow2_sc_mask (0, s1) & ~qcow2_sc_alloc (bm)
          & ~qcow2_sc_zero (bm);
        if (absent && set_entry (q, gc, desc,
                                 bm | qcow2_sc_bitmap (0, absent),
                                 false) == -1)
          r = -1;
      }
    }
    pthread_mutex_unlock (&q->lock);
    if (r == -1)
      return -1;
    if (data)
      data += len;
    offset += len;
    count -= len;
  }
  return 0;
}

int
qcow2_layer_write (struct layer *l, const void *buf, uint32_t count,
                   uint64_t offset, const struct layer_below *below)
{
  struct qcow2 *q = (struct qcow2 *) l;
  const char *p = buf;

  if (check_writable (q) == -1)
    return -1;
  /* Subclusters are written a cluster at a time, each step reading what
   * it needs from below first.  So that a request whose later step could
   * not read below (a base gone away) leaves nothing written, the partly
   * covered subclusters at both ends are read once before the first step
   * of a request over several clusters. */
  if (q->ext_l2 && (offset & (cs (q) - 1)) + count > cs (q)) {
    uint64_t sc = 1ull << q->sc_bits, end = offset + count;
    char *tmp = malloc (sc);
    int r = 0;

    if (tmp == NULL) {
      cow_error_errno ("malloc");
      return -1;
    }
    if (offset & (sc - 1))
      r = qcow2_layer_read (l, tmp, (uint32_t) sc, offset & ~(sc - 1), below);
    if (r == 0 && (end & (sc - 1))) {
      uint64_t t = end & ~(sc - 1);
      r = qcow2_layer_read (l, tmp, (uint32_t) (l->size - t < sc
                                                ? l->size - t : sc),
                            t, below);
    }
    free (tmp);
    if (r == -1)
      return -1;
  }
  while (count > 0) {
    int64_t done = q->ext_l2 ? write_step_ext (q, p, count, offset, below)
      : write_step (q, p, count, offset, below);
    if (done == -1)
      return -1;
    p += done;
    offset += (uint64_t) done;
    count -= (uint32_t) done;
  }
  return 0;
}

/* Fill the guest clusters of [offset, offset+count) that this layer does
 * not hold yet: with data from buf, or with zero clusters when buf is
 * NULL.  Clusters it holds (written by the guest meanwhile) are left
 * alone; a cluster being allocated by a guest write is waited for, then
 * left alone too, so a pull never overwrites newer guest data.  offset is
 * cluster aligned; count is whole clusters or reaches the virtual end. */
int
qcow2_layer_populate (struct layer *l, const void *buf, uint32_t count,
                      uint64_t offset)
{
  struct qcow2 *q = (struct qcow2 *) l;
  static const enum qcow2_ctype unalloc[MAX_RUN_CLUSTERS];
  static const uint64_t no_host[MAX_RUN_CLUSTERS];
  uint64_t c = cs (q), per = 1ull << q->l2_bits;
  const char *data = buf;

  if (check_writable (q) == -1)
    return -1;
  if ((offset & (c - 1)) != 0 || (buf == NULL && q->version < 3)) {
    cow_error_set (EINVAL, "%s: populate of %" PRIu32 " bytes at %" PRIu64
                   ": not cluster aligned, or zero clusters in compat 0.10",
                   l->path, count, offset);
    return -1;
  }
  if (q->ext_l2)
    return populate_ext (q, data, count, offset);
  while (count > 0) {
    uint64_t gc = offset >> q->cluster_bits;
    uint64_t want = (count + c - 1) >> q->cluster_bits;
    enum qcow2_ctype type;
    uint64_t host, n, len;
    uint64_t *l2;

    if (want > MAX_RUN_CLUSTERS)
      want = MAX_RUN_CLUSTERS;
    pthread_mutex_lock (&q->lock);
    while (inflight_overlaps (q, gc, 1))
      pthread_cond_wait (&q->alloc_done, &q->lock);
    if (get_run (q, gc, want, &type, &host, &n) == -1)
      goto err_unlock;
    len = n * c < count ? n * c : count;
    if (type != QCOW2_UNALLOCATED) {
      pthread_mutex_unlock (&q->lock);
      goto next;
    }
    n = inflight_free_prefix (q, gc, n);
    len = n * c < count ? n * c : count;
    if (buf == NULL) {
      l2 = get_or_make_l2 (q, gc);
      if (l2 == NULL)
        goto err_unlock;
      for (uint64_t i = 0; i < n; i++)
        be64_put (&l2[(gc + i) & (per - 1)], QCOW2_OFLAG_ZERO);
      qcow2_cache_mark_dirty (q->l2_cache, l2);
      qcow2_cache_put (q->l2_cache, l2);
      pthread_mutex_unlock (&q->lock);
      goto next;
    }
    host = qcow2_alloc_run (q, n, &n);
    if (host == 0)
      goto err_unlock;
    len = n * c < count ? n * c : count;
    if (inflight_add (q, gc, n) == -1) {
      qcow2_free_unused (q, host, n);
      goto err_unlock;
    }
    pthread_mutex_unlock (&q->lock);
    /* A last cluster past the virtual end is padded with zeroes. */
    if (fill_and_map (q, gc, n, host, unalloc, no_host, data, 0, len,
                      NULL) == -1)
      return -1;
  next:
    if (data)
      data += len;
    offset += len;
    count -= (uint32_t) len;
  }
  return 0;

 err_unlock:
  pthread_mutex_unlock (&q->lock);
  return -1;
}

static int
write_zeroes (struct qcow2 *q, uint64_t count, uint64_t offset,
              const struct layer_below *below)
{
  static const char zero_buf[65536];

  while (count > 0) {
    uint32_t n = count > sizeof zero_buf ? sizeof zero_buf : (uint32_t) count;
    if (qcow2_layer_write (&q->layer, zero_buf, n, offset, below) == -1)
      return -1;
    count -= n;
    offset += n;
  }
  return 0;
}

/* Turn whole guest clusters [gc, gc+n) into zero clusters. */
static int
zero_clusters (struct qcow2 *q, uint64_t gc, uint64_t n)
{
  uint64_t per = 1ull << q->l2_bits;

  while (n > 0) {
    uint64_t step = per - (gc & (per - 1));
    uint64_t *l2;

    if (step > n)
      step = n;
    pthread_mutex_lock (&q->lock);
    while (inflight_overlaps (q, gc, step))
      pthread_cond_wait (&q->alloc_done, &q->lock);
    l2 = get_or_make_l2 (q, gc);
    if (l2 == NULL) {
      pthread_mutex_unlock (&q->lock);
      return -1;
    }
    for (uint64_t i = 0; i < step; i++) {
      uint64_t *slot = &l2[(gc + i) & (per - 1)];
      uint64_t e = be64_get (slot);
      if (e == QCOW2_OFLAG_ZERO)
        continue;
      if (drop_entry (q, gc + i, e, 0) == -1) {
        qcow2_cache_mark_dirty (q->l2_cache, l2);
        qcow2_cache_put (q->l2_cache, l2);
        pthread_mutex_unlock (&q->lock);
        return -1;
      }
      be64_put (slot, QCOW2_OFLAG_ZERO);
    }
    qcow2_cache_mark_dirty (q->l2_cache, l2);
    qcow2_cache_put (q->l2_cache, l2);
    pthread_mutex_unlock (&q->lock);
    gc += step;
    n -= step;
  }
  return 0;
}

int
qcow2_layer_zero (struct layer *l, uint32_t count, uint64_t offset, bool fast,
                  const struct layer_below *below)
{
  struct qcow2 *q = (struct qcow2 *) l;
  uint64_t c = cs (q);
  uint64_t end = offset + count;
  uint64_t first = (offset + c - 1) & ~(c - 1);   /* first whole cluster */
  uint64_t last = end & ~(c - 1);                  /* end of whole ones */

  if (check_writable (q) == -1)
    return -1;
  if (q->ext_l2)
    return zero_ext (q, count, offset, fast, below);
  if (q->version < 3 || first >= last) {
    if (fast) {
      cow_error_set (ENOTSUP, "%s: zeroing this range needs data writes",
                     l->path);
      return -1;
    }
    return write_zeroes (q, count, offset, below);
  }
  if (fast && (first != offset || last != end)) {
    cow_error_set (ENOTSUP, "%s: zeroing a partial cluster needs data "
                   "writes", l->path);
    return -1;
  }
  if (first > offset && write_zeroes (q, first - offset, offset, below) == -1)
    return -1;
  if (zero_clusters (q, first >> q->cluster_bits,
                     (last - first) >> q->cluster_bits) == -1)
    return -1;
  if (end > last && write_zeroes (q, end - last, last, below) == -1)
    return -1;
  return 0;
}

int
qcow2_layer_trim (struct layer *l, uint32_t count, uint64_t offset)
{
  struct qcow2 *q = (struct qcow2 *) l;
  uint64_t c = cs (q);
  uint64_t first = (offset + c - 1) & ~(c - 1);
  uint64_t last = (offset + count) & ~(c - 1);

  if (check_writable (q) == -1)
    return -1;
  if (q->ext_l2) {
    uint64_t sc = 1ull << q->sc_bits;
    first = (offset + sc - 1) & ~(sc - 1);
    last = (offset + count) & ~(sc - 1);
    return first < last ? zero_subclusters (q, first, last, ZERO_TRIM, NULL)
      : 0;
  }
  /* Without zero clusters (compat 0.10) a trim could only expose the
   * layers below, so it is ignored there. */
  if (q->version < 3 || first >= last)
    return 0;
  return zero_clusters (q, first >> q->cluster_bits,
                        (last - first) >> q->cluster_bits);
}

int
qcow2_layer_map (struct layer *l, uint64_t offset, uint64_t count,
                 uint64_t *len, enum layer_status *status)
{
  struct qcow2 *q = (struct qcow2 *) l;
  uint64_t done = 0;
  enum layer_status first = LAYER_ABSENT;

  if (offset >= l->size) {
    *len = count;
    *status = LAYER_ZERO;
    return 0;
  }
  if (count > l->size - offset)
    count = l->size - offset;
  pthread_mutex_lock (&q->lock);
  while (done < count) {
    uint64_t off = offset + done;
    enum qcow2_ctype type;
    enum layer_status st;
    uint64_t host, run;

    if (get_extent (q, off, count - done, &type, &host, &run) == -1) {
      pthread_mutex_unlock (&q->lock);
      return -1;
    }
    st = type == QCOW2_UNALLOCATED ? LAYER_ABSENT
      : type == QCOW2_ZERO ? LAYER_ZERO : LAYER_DATA;
    if (done == 0)
      first = st;
    else if (st != first)
      break;
    done += run < count - done ? run : count - done;
  }
  pthread_mutex_unlock (&q->lock);
  *len = done;
  *status = first;
  return 0;
}

int
qcow2_layer_flush (struct layer *l)
{
  struct qcow2 *q = (struct qcow2 *) l;
  struct qcow2_cache_batch *rb = NULL, *l2 = NULL;
  uint64_t *l1 = NULL;
  size_t n_flushing;
  bool ok = false, reft_dirty;
  int r;

  if (l->readonly)
    return 0;
  pthread_mutex_lock (&q->flush_lock);

  /* Take everything dirty at one instant: the L2 entries among it only
   * point at data written and refcounts raised before this instant. */
  pthread_mutex_lock (&q->lock);
  /* The buffer for the L1 copy first: a dirty L1 table that could not be
   * copied would be left unwritten by a flush that writes all the rest,
   * so then the flush fails before it takes anything. */
  if (q->l1_dirty) {
    l1 = malloc ((size_t) q->l1_size * 8);
    if (l1 == NULL) {
      cow_error_errno ("%s: copy of the L1 table", l->path);
      pthread_mutex_unlock (&q->lock);
      pthread_mutex_unlock (&q->flush_lock);
      return -1;
    }
  }
  rb = qcow2_cache_collect (q->rb_cache);
  l2 = rb ? qcow2_cache_collect (q->l2_cache) : NULL;
  if (l2 && l1) {
    for (uint32_t i = 0; i < q->l1_size; i++)
      be64_put (&l1[i], q->l1[i]);
    q->l1_dirty = false;
  }
  for (size_t i = 0; i < q->free_unsynced.len; i++)
    qcow2_cluster_list_push (&q->free_flushing, q->free_unsynced.v[i]);
  q->free_unsynced.len = 0;
  n_flushing = q->free_flushing.len;
  pthread_mutex_unlock (&q->lock);

  if (rb == NULL || l2 == NULL)
    goto done;
  if (qcow2_cache_batch_write (q, rb) == -1)
    goto done;
  if (io_fsync (q->fd) == -1)
    goto sync_err;
  /* The refcount table is written only under the lock, always in its
   * newest state: eviction of a dirty L2 table writes it too, and an
   * older copy written here could land after a newer one. */
  pthread_mutex_lock (&q->lock);
  reft_dirty = q->reftable_dirty;
  r = qcow2_reftable_writeback (q);
  pthread_mutex_unlock (&q->lock);
  if (r == -1)
    goto done;
  if (reft_dirty && io_fsync (q->fd) == -1)
    goto sync_err;
  if (!qcow2_cache_batch_empty (l2) || l1) {
    if (qcow2_cache_batch_write (q, l2) == -1)
      goto done;
    if (l1) {
      if (io_fsync (q->fd) == -1)
        goto sync_err;
      if (io_pwrite (q->fd, l1, (size_t) q->l1_size * 8, q->l1_offset) == -1) {
        cow_error_errno ("%s: writing the L1 table", l->path);
        goto done;
      }
    }
    if (io_fsync (q->fd) == -1)
      goto sync_err;
  }
  ok = true;
  goto done;

 sync_err:
  cow_error_errno ("%s: fsync", l->path);
 done:
  pthread_mutex_lock (&q->lock);
  if (rb)
    qcow2_cache_batch_done (q->rb_cache, rb, ok);
  if (l2)
    qcow2_cache_batch_done (q->l2_cache, l2, ok);
  /* Clusters dropped by L2 changes become free only when the flush
   * made every such change stable; after a failure they wait in
   * free_flushing for the next flush (which takes them all). */
  if (!ok && l1)
    q->l1_dirty = true;
  if (ok) {
    for (size_t i = 0; i < n_flushing; i++)
      qcow2_cluster_list_push (&q->free_synced, q->free_flushing.v[i]);
    if (n_flushing > 0)
      memmove (q->free_flushing.v, q->free_flushing.v + n_flushing,
               (q->free_flushing.len - n_flushing) * sizeof (uint64_t));
    q->free_flushing.len -= n_flushing;
    qcow2_release_synced (q);
  }
  pthread_mutex_unlock (&q->lock);
  free (l1);
  if (ok)
    punch_pending (q);
  pthread_mutex_unlock (&q->flush_lock);
  return ok ? 0 : -1;
}
