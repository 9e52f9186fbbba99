/* SPDX-License-Identifier: BSD-3-Clause */
/* Private to the qcow2 layer: the open-image state and the prototypes
 * shared by qcow2*.c (the on-disk format is in qcow2-format.h).
 *
 * Write ordering (DESIGN.md invariant 2).  L2 tables, refcount blocks and
 * the L1 table are cached in memory and written back in this order:
 *   guest data and refcount blocks  -> fdatasync ->
 *   refcount table (if it changed)  -> fdatasync ->
 *   L2 tables                       -> fdatasync ->
 *   L1 table (if it changed)        -> fdatasync.
 * An L2 entry is set in memory only after the data write it points at has
 * completed and after the refcount of its cluster was raised, so any L2
 * table that is written back covers data and refcounts that are already
 * stable.  A crash can leak clusters; it never leaves an entry pointing at
 * unwritten data or at a cluster whose refcount is zero.
 *
 * Freed clusters (trim, zero, rewrite of a shared cluster) keep their
 * refcount until the L2 change that dropped them is stable and no data I/O
 * that looked them up earlier is still running; only then do they become
 * free for reuse, so a late write can never land in a reused cluster.
 */
#ifndef COW_QCOW2_H
#define COW_QCOW2_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "layer.h"
#include "qcow2-format.h"

/* Refcount width of the images qcow2_create makes: 16 bits, as QEMU. */
#define QCOW2_CREATE_REFCOUNT_ORDER 4

/* What one guest cluster is in one qcow2 layer. */
enum qcow2_ctype {
  QCOW2_UNALLOCATED,       /* look below */
  QCOW2_ZERO,              /* reads zero (may keep a host cluster) */
  QCOW2_NORMAL,            /* data at host, refcount 1: write in place */
  QCOW2_SHARED,            /* data at host, shared: copy before writing */
  QCOW2_COMPRESSED,        /* compressed data: copy before writing */
};

struct qcow2_cache;

/* A range of guest clusters being allocated by one request. */
struct qcow2_inflight {
  uint64_t first, count;   /* guest cluster numbers */
};

struct cluster_list {
  uint64_t *v;
  size_t len, cap;
};

struct qcow2 {
  struct layer layer;
  int fd;

  /* Header fields, fixed after open. */
  uint32_t version;
  uint32_t cluster_bits;
  uint64_t cluster_size;
  uint32_t l2_bits;             /* log2 of entries per L2 table */
  bool ext_l2;                  /* extended L2 entries (subclusters) */
  uint32_t sc_bits;             /* log2 of the subcluster size (the
                                   cluster size without ext_l2) */
  uint32_t refcount_order;
  uint32_t rb_bits;             /* log2 of refcounts per refcount block */
  uint64_t incompat, compat, autoclear;
  uint32_t header_length;
  uint32_t nb_snapshots;
  char *backing_file;
  char *backing_format;

  /* Serialises flushes with each other (never held by I/O). */
  pthread_mutex_t flush_lock;

  /* lock protects everything below: the L1 and refcount tables, both
   * caches, file_end, the in-flight allocations and the free lists.  It
   * is never held across guest data I/O. */
  pthread_mutex_t lock;
  pthread_cond_t alloc_done;    /* an in-flight allocation finished */

  uint32_t l1_size;
  uint64_t l1_offset;
  uint64_t *l1;                 /* host order */
  bool l1_dirty;

  uint64_t reftable_offset;
  uint32_t reftable_clusters;
  uint64_t reftable_entries;
  uint64_t *reftable;           /* host order */
  bool reftable_dirty;

  struct qcow2_cache *l2_cache;
  struct qcow2_cache *rb_cache;

  uint64_t file_end;            /* first never-allocated byte, aligned */

  struct qcow2_inflight *inflight;
  size_t n_inflight, cap_inflight;

  /* Clusters (host numbers) on their way to being free, see above. */
  struct cluster_list free_unsynced;   /* L2 change not yet stable */
  struct cluster_list free_flushing;   /* being made stable by a flush */
  struct cluster_list free_synced;     /* waiting for I/O to drain */
  struct cluster_list free_ready;      /* free: may be reused */
  bool free_ready_sorted;              /* descending (see alloc_run) */
  struct cluster_list punch;           /* to punch holes for, unlocked */

  /* Data reads and writes running outside the lock on mapped clusters.
   * Atomic; raised under lock. */
  unsigned data_io;
  /* In-place writes running outside the lock, counted by guest cluster
   * number modulo QCOW2_INPLACE_SLOTS (atomic; raised under lock): a
   * cluster with subclusters that is moved to a new host cluster waits
   * for those on its slot before copying. */
#define QCOW2_INPLACE_SLOTS 64
  unsigned inplace[QCOW2_INPLACE_SLOTS];

  bool corrupt;                 /* a broken invariant was found */
  bool frozen;                  /* atomic: no more writes will come (its
                                   L1 table is fixed) */
};

/* qcow2-format.c: the header in memory and on disk, damage reports */
/* Write the fields of h in [from, to) (QCOW2_HDR_OFFSET, QCOW2_HDR_END)
 * at their place in the file, in one write; -1 with errno set. */
int qcow2_header_write_fields (int fd, const struct qcow2_header *h,
                               size_t from, size_t to);
void qcow2_mark_corrupt (struct qcow2 *q, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));

/* qcow2-cache.c: a cache of cluster-sized metadata tables (L2 tables and
 * refcount blocks), kept in on-disk (big-endian) byte order. */
/* before_write (may be NULL) runs, and must succeed, before each table is
 * written: the L2 cache's writes refcounts first (qcow2.h, write order),
 * without the cache calling into the refcount code. */
typedef int (*qcow2_cache_hook) (struct qcow2 *q);
/* limit: the most tables this cache holds (0: only the pool's budget
 * bounds it; see qcow2-cache.c). */
struct qcow2_cache *qcow2_cache_create (struct qcow2 *q, size_t limit,
                                        bool is_l2,
                                        qcow2_cache_hook before_write);
/* The pool every cache draws from (qcow2_cache_set_budget, layer.h). */
#define QCOW2_CACHE_DEFAULT_BUDGET (64ull << 20)
void qcow2_cache_destroy (struct qcow2_cache *c);
/* Get the table at host offset; fresh: do not read, start zeroed.  The
 * table is pinned until qcow2_cache_put.  Caller holds q->lock. */
void *qcow2_cache_get (struct qcow2_cache *c, uint64_t offset, bool fresh);
/* The same, to read the table only (never marked dirty): when no slot can
 * take it, the caller gets a copy of its own until qcow2_cache_put, so a
 * lookup fails only if the file cannot be read. */
void *qcow2_cache_lookup (struct qcow2_cache *c, uint64_t offset);
void qcow2_cache_put (struct qcow2_cache *c, void *table);
void qcow2_cache_mark_dirty (struct qcow2_cache *c, void *table);
/* Copy every dirty table out (pinning it) for writing without the lock. */
struct qcow2_cache_batch;
struct qcow2_cache_batch *qcow2_cache_collect (struct qcow2_cache *c);
int qcow2_cache_batch_write (struct qcow2 *q, struct qcow2_cache_batch *b);
/* Unpin (and on failure mark dirty again); frees b.  Caller holds lock. */
void qcow2_cache_batch_done (struct qcow2_cache *c, struct qcow2_cache_batch *b,
                             bool ok);
bool qcow2_cache_batch_empty (const struct qcow2_cache_batch *b);
/* Write back every dirty table now (under the lock). */
int qcow2_cache_writeback (struct qcow2_cache *c);

/* qcow2-refcount.c */
int qcow2_refcount_get (struct qcow2 *q, uint64_t cluster, uint64_t *ref);
int qcow2_refcount_set (struct qcow2 *q, uint64_t cluster, uint64_t ref);
/* Allocate n contiguous host clusters (refcount 1); returns host offset or
 * 0 with the last error set. */
uint64_t qcow2_alloc_clusters (struct qcow2 *q, uint64_t n);
/* A run of at most n contiguous host clusters, freed ones first (*got
 * says how many); returns host offset or 0. */
uint64_t qcow2_alloc_run (struct qcow2 *q, uint64_t n, uint64_t *got);
/* Return clusters never made visible (their refcount goes back to 0). */
void qcow2_free_unused (struct qcow2 *q, uint64_t host, uint64_t n);
/* Queue a cluster dropped by an L2 change (see the top of this file). */
int qcow2_free_later (struct qcow2 *q, uint64_t host);
/* Called with the lock when data_io drops to 0, and after flushes. */
int qcow2_release_synced (struct qcow2 *q);
int qcow2_cluster_list_push (struct cluster_list *l, uint64_t v);
/* Write the refcount table now if it changed (blocks synced first). */
int qcow2_reftable_writeback (struct qcow2 *q);
/* Every dirty refcount block, then the refcount table, then an fsync: what
 * must be on disk before an L2 table that depends on them. */
int qcow2_refcounts_sync (struct qcow2 *q);

/* qcow2-cluster.c */
int qcow2_layer_read (struct layer *l, void *buf, uint32_t count,
                      uint64_t offset, const struct layer_below *below);
int qcow2_layer_write (struct layer *l, const void *buf, uint32_t count,
                       uint64_t offset, const struct layer_below *below);
int qcow2_layer_zero (struct layer *l, uint32_t count, uint64_t offset,
                      bool fast, const struct layer_below *below);
int qcow2_layer_trim (struct layer *l, uint32_t count, uint64_t offset);
int qcow2_layer_map (struct layer *l, uint64_t offset, uint64_t count,
                     uint64_t *len, enum layer_status *status);
int qcow2_layer_flush (struct layer *l);
/* Classify one guest cluster (caller holds lock). */
int qcow2_get_cluster (struct qcow2 *q, uint64_t gcluster,
                       enum qcow2_ctype *type, uint64_t *host);

#endif /* COW_QCOW2_H */
