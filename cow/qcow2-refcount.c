/* SPDX-License-Identifier: BSD-3-Clause */
/* Refcounts of a qcow2 layer: the refcount table (kept whole in memory),
 * refcount blocks (through the cache), cluster allocation and the road a
 * freed cluster travels before it may be reused (see qcow2.h).
 *
 * Allocation takes a freed cluster when one is ready and only one is
 * wanted, else appends at the end of the file.  A missing refcount block
 * is placed at the end of the file, inside the range it covers; a full
 * refcount table is moved to a bigger one at the end of the file. */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "io.h"
#include "qcow2.h"

int
qcow2_cluster_list_push (struct cluster_list *l, uint64_t v)
{
  if (l->len == l->cap) {
    size_t cap = l->cap ? l->cap * 2 : 64;
    uint64_t *nv = realloc (l->v, cap * sizeof *nv);
    if (nv == NULL) {
      cow_error_errno ("cluster list");
      return -1;
    }
    l->v = nv;
    l->cap = cap;
  }
  l->v[l->len++] = v;
  return 0;
}

/* The refcount block holding cluster, or NULL with *missing set.
 * change: the caller may change it (see qcow2_cache_lookup). */
static void *
get_block (struct qcow2 *q, uint64_t cluster, bool *missing, bool change)
{
  uint64_t idx = cluster >> q->rb_bits;
  uint64_t off;

  *missing = false;
  if (idx >= q->reftable_entries || q->reftable[idx] == 0) {
    *missing = true;
    return NULL;
  }
  off = q->reftable[idx] & ~QCOW2_REFT_RESERVED;
  if ((q->reftable[idx] & QCOW2_REFT_RESERVED) || off == 0) {
    qcow2_mark_corrupt (q, "refcount table entry %" PRIu64
                        " is not cluster aligned", idx);
    return NULL;
  }
  return change ? qcow2_cache_get (q->rb_cache, off, false)
    : qcow2_cache_lookup (q->rb_cache, off);
}

int
qcow2_refcount_get (struct qcow2 *q, uint64_t cluster, uint64_t *ref)
{
  bool missing;
  void *rb = get_block (q, cluster, &missing, false);

  if (rb == NULL) {
    if (!missing)
      return -1;
    *ref = 0;
    return 0;
  }
  *ref = qcow2_refcount_entry_get (q->refcount_order, rb, cluster & ((1ull << q->rb_bits) - 1));
  qcow2_cache_put (q->rb_cache, rb);
  return 0;
}

/* Move the refcount table to a bigger one at the end of the file, able to
 * index at least need_idx. */
static int
grow_reftable (struct qcow2 *q, uint64_t need_idx)
{
  uint64_t per_cluster = q->cluster_size / 8;
  uint64_t entries = q->reftable_entries * 2;
  uint64_t old_off = q->reftable_offset, old_clusters = q->reftable_clusters;
  uint64_t *old = q->reftable, *nt;
  uint64_t clusters, start;
  struct qcow2_header hd = { 0 };

  if (entries < need_idx + 2)
    entries = need_idx + 2;
  clusters = (entries + per_cluster - 1) / per_cluster;
  /* Room for the refcount blocks of the new table itself. */
  clusters += 1;
  entries = clusters * per_cluster;
  if (clusters * q->cluster_size > QCOW2_MAX_REFTABLE_BYTES) {
    cow_error_set (EFBIG, "%s: refcount table would exceed %u bytes",
                   q->layer.path, QCOW2_MAX_REFTABLE_BYTES);
    return -1;
  }
  nt = calloc (entries, sizeof *nt);
  if (nt == NULL) {
    cow_error_errno ("refcount table");
    return -1;
  }
  memcpy (nt, old, q->reftable_entries * sizeof *nt);

  start = q->file_end / q->cluster_size;
  q->file_end += clusters * q->cluster_size;
  q->reftable = nt;
  q->reftable_entries = entries;
  for (uint64_t c = start; c < start + clusters; c++)
    if (qcow2_refcount_set (q, c, 1) == -1)
      goto fail;

  /* New blocks, then the table, then the header points at it. */
  if (qcow2_cache_writeback (q->rb_cache) == -1 || io_fsync (q->fd) == -1)
    goto fail_io;
  for (uint64_t i = 0; i < entries; i++)
    be64_put (&nt[i], nt[i]);
  if (io_pwrite (q->fd, nt, entries * 8, start * q->cluster_size) == -1) {
    for (uint64_t i = 0; i < entries; i++)
      nt[i] = be64_get (&nt[i]);
    goto fail_io;
  }
  for (uint64_t i = 0; i < entries; i++)
    nt[i] = be64_get (&nt[i]);
  if (io_fsync (q->fd) == -1)
    goto fail_io;
  hd.refcount_table_offset = start * q->cluster_size;
  hd.refcount_table_clusters = (uint32_t) clusters;
  if (qcow2_header_write_fields (q->fd, &hd,
                                 QCOW2_HDR_OFFSET (refcount_table_offset),
                                 QCOW2_HDR_END (refcount_table_clusters)) == -1
      || io_fsync (q->fd) == -1)
    goto fail_io;

  q->reftable_offset = start * q->cluster_size;
  q->reftable_clusters = (uint32_t) clusters;
  q->reftable_dirty = false;
  free (old);
  /* The old table is referenced by nothing now: free it at once. */
  for (uint64_t c = 0; c < old_clusters; c++)
    if (qcow2_refcount_set (q, old_off / q->cluster_size + c, 0) == -1)
      return -1;
  return 0;

 fail_io:
  cow_error_errno ("%s: growing the refcount table", q->layer.path);
 fail:
  /* The header still names the old table; what we wrote is leaked. */
  q->reftable = old;
  q->reftable_entries = old_clusters * per_cluster;
  free (nt);
  return -1;
}

/* Create the refcount block for cluster's range, at the end of the file. */
static int
new_block (struct qcow2 *q, uint64_t cluster)
{
  uint64_t idx = cluster >> q->rb_bits;
  uint64_t at, at_idx;
  void *rb;

  for (;;) {
    if (idx >= q->reftable_entries && grow_reftable (q, idx) == -1)
      return -1;
    /* Growing the table may itself have made this block. */
    if (q->reftable[idx] != 0)
      return 0;
    at = q->file_end / q->cluster_size;
    at_idx = at >> q->rb_bits;
    if (at_idx >= q->reftable_entries) {
      if (grow_reftable (q, at_idx) == -1)
        return -1;
      continue;
    }
    break;
  }
  if (at_idx != idx && q->reftable[at_idx] == 0) {
    /* The end of the file lies in a range without a block too: make
     * that one first, covering itself. */
    if (new_block (q, at) == -1)
      return -1;
    return q->reftable[idx] ? 0 : new_block (q, cluster);
  }
  rb = qcow2_cache_get (q->rb_cache, at * q->cluster_size, true);
  if (rb == NULL)
    return -1;
  q->file_end += q->cluster_size;
  q->reftable[idx] = at * q->cluster_size;
  q->reftable_dirty = true;
  qcow2_cache_mark_dirty (q->rb_cache, rb);
  qcow2_cache_put (q->rb_cache, rb);
  /* The block counts itself, wherever its own count lives. */
  return qcow2_refcount_set (q, at, 1);
}

int
qcow2_refcount_set (struct qcow2 *q, uint64_t cluster, uint64_t ref)
{
  bool missing;
  void *rb;

  if (ref > qcow2_refcount_max (q->refcount_order)) {
    cow_error_set (EOVERFLOW, "%s: refcount of cluster %" PRIu64
                   " overflows", q->layer.path, cluster);
    return -1;
  }
  rb = get_block (q, cluster, &missing, true);
  if (rb == NULL) {
    if (!missing)
      return -1;
    if (ref == 0)
      return 0;
    if (new_block (q, cluster) == -1)
      return -1;
    rb = get_block (q, cluster, &missing, true);
    if (rb == NULL)
      return -1;
  }
  qcow2_refcount_entry_set (q->refcount_order, rb, cluster & ((1ull << q->rb_bits) - 1), ref);
  qcow2_cache_mark_dirty (q->rb_cache, rb);
  qcow2_cache_put (q->rb_cache, rb);
  return 0;
}

static int
cmp_desc (const void *a, const void *b)
{
  uint64_t x = *(const uint64_t *) a, y = *(const uint64_t *) b;
  return x > y ? -1 : x < y;
}

uint64_t
qcow2_alloc_clusters (struct qcow2 *q, uint64_t n)
{
  uint64_t start;

  if (n == 1 && q->free_ready.len > 0) {
    uint64_t c;
    if (!q->free_ready_sorted) {
      qsort (q->free_ready.v, q->free_ready.len, sizeof (uint64_t), cmp_desc);
      q->free_ready_sorted = true;
    }
    c = q->free_ready.v[--q->free_ready.len];
    if (qcow2_refcount_set (q, c, 1) == -1) {
      q->free_ready.len++;
      return 0;
    }
    return c * q->cluster_size;
  }
  /* Make sure every cluster of the run has a refcount block first, so
   * that no block lands in the middle of the run. */
  for (;;) {
    bool again = false;
    start = q->file_end / q->cluster_size;
    for (uint64_t i = (start >> q->rb_bits); i <= ((start + n - 1) >> q->rb_bits); i++) {
      if (i >= q->reftable_entries || q->reftable[i] == 0) {
        if (new_block (q, i << q->rb_bits > start ? i << q->rb_bits : start) == -1)
          return 0;
        again = true;
        break;
      }
    }
    if (!again)
      break;
  }
  for (uint64_t i = 0; i < n; i++)
    if (qcow2_refcount_set (q, start + i, 1) == -1)
      return 0;           /* leaked, never referenced */
  q->file_end += n * q->cluster_size;
  return start * q->cluster_size;
}

uint64_t
qcow2_alloc_run (struct qcow2 *q, uint64_t n, uint64_t *got)
{
  struct cluster_list *f = &q->free_ready;
  uint64_t c, k = 1;

  if (f->len == 0) {
    *got = n;
    return qcow2_alloc_clusters (q, n);
  }
  /* Kept in descending order, so that the lowest cluster is at the end
   * and its free neighbours come right before it. */
  if (!q->free_ready_sorted) {
    qsort (f->v, f->len, sizeof f->v[0], cmp_desc);
    q->free_ready_sorted = true;
  }
  c = f->v[f->len - 1];
  while (k < n && k < f->len && f->v[f->len - 1 - k] == c + k)
    k++;
  for (uint64_t i = 0; i < k; i++)
    if (qcow2_refcount_set (q, c + i, 1) == -1) {
      while (i-- > 0)
        qcow2_refcount_set (q, c + i, 0);
      return 0;
    }
  f->len -= k;
  *got = k;
  return c * q->cluster_size;
}

void
qcow2_free_unused (struct qcow2 *q, uint64_t host, uint64_t n)
{
  for (uint64_t i = 0; i < n; i++) {
    uint64_t c = host / q->cluster_size + i;
    if (qcow2_refcount_set (q, c, 0) == 0) {
      q->free_ready_sorted = false;
      qcow2_cluster_list_push (&q->free_ready, c);
    }
  }
}

int
qcow2_free_later (struct qcow2 *q, uint64_t host)
{
  return qcow2_cluster_list_push (&q->free_unsynced, host / q->cluster_size);
}

int
qcow2_release_synced (struct qcow2 *q)
{
  int ret = 0;

  if (__atomic_load_n (&q->data_io, __ATOMIC_ACQUIRE) != 0)
    return 0;
  for (size_t i = 0; i < q->free_synced.len; i++) {
    uint64_t c = q->free_synced.v[i], ref;
    if (qcow2_refcount_get (q, c, &ref) == -1) {
      ret = -1;
      continue;
    }
    if (ref == 0)
      continue;
    if (qcow2_refcount_set (q, c, ref - 1) == -1) {
      ret = -1;
      continue;
    }
    /* Reusable only once its hole is punched (punch_pending). */
    if (ref == 1)
      qcow2_cluster_list_push (&q->punch, c);
  }
  q->free_synced.len = 0;
  return ret;
}

int
qcow2_reftable_writeback (struct qcow2 *q)
{
  size_t bytes = (size_t) q->reftable_clusters * q->cluster_size;
  uint64_t *t;
  int r = -1;

  if (!q->reftable_dirty)
    return 0;
  if (qcow2_cache_writeback (q->rb_cache) == -1)
    return -1;
  t = calloc (1, bytes);
  if (t == NULL) {
    cow_error_errno ("refcount table");
    return -1;
  }
  for (uint64_t i = 0; i < q->reftable_entries; i++)
    be64_put (&t[i], q->reftable[i]);
  if (io_fsync (q->fd) == -1
      || io_pwrite (q->fd, t, bytes, q->reftable_offset) == -1)
    cow_error_errno ("%s: writing the refcount table", q->layer.path);
  else {
    q->reftable_dirty = false;
    r = 0;
  }
  free (t);
  return r;
}

int
qcow2_refcounts_sync (struct qcow2 *q)
{
  if (qcow2_cache_writeback (q->rb_cache) == -1
      || qcow2_reftable_writeback (q) == -1)
    return -1;
  if (io_fsync (q->fd) == -1) {
    cow_error_errno ("%s: fsync", q->layer.path);
    return -1;
  }
  return 0;
}
