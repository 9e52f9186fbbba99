/* SPDX-License-Identifier: BSD-3-Clause */
/* A disk: open (overlay or state directory) and close, configuration
 * and size, the interval sync thread, and the guest I/O path (read,
 * write, zero, trim, flush, extents) with its sync policy for clients
 * that never flush.  Implements those cow_disk_* calls of
 * include/cowchain.h.  Snapshots and revert are snapshot.c's, merges
 * job.c's; chain changes go through the chain module (chain.h). */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "backing.h"
#include "chain.h"
#include "cowchain.h"
#include "error.h"
#include "events.h"
#include "layer.h"
#include "manifest.h"

static void
close_lower (struct cow_disk *d)
{
  for (size_t i = 0; i < d->n_lower; i++)
    d->lower[i].l->ops->close (d->lower[i].l);
  d->n_lower = 0;
  d->n_frozen = 0;
}

static void
free_disk (struct cow_disk *d)
{
  job_disk_destroy (d);
  chain_map_free (d);
  pthread_mutex_destroy (&d->map_lock);
  pthread_rwlock_destroy (&d->chain_lock);
  pthread_rwlock_destroy (&d->durability_lock);
  pthread_mutex_destroy (&d->admin_lock);
  pthread_mutex_destroy (&d->health_lock);
  free (d->degraded_msg);
  pthread_mutex_destroy (&d->sync_lock);
  pthread_cond_destroy (&d->sync_cond);
  manifest_free (&d->man);
  if (d->lock_fd != -1)
    close (d->lock_fd);
  free (d->state_dir);
  free (d->overlay);
  free (d->base_name);
  free (d);
}

/* Overlay mode: one layer file named by the user. */
static int
open_overlay (struct cow_disk *d, const struct cow_disk_config *cfg)
{
  const char *fmt = NULL;
  struct stat st;

  if (cfg->base == NULL) {
    cow_error_set (EINVAL, "base must be given");
    return -1;
  }
  if (backing_open_chain (d, cfg, &fmt) == -1)
    return -1;
  chain_link (d);
  if (stat (cfg->overlay, &st) == 0) {
    d->top = qcow2_open (cfg->overlay, cfg->readonly ? LAYER_RDONLY : 0,
                         cfg->cache_size);
    if (d->top == NULL)
      return -1;
    return backing_check (d->top, cfg->overlay, cfg->base, fmt);
  }
  if (errno != ENOENT) {
    cow_error_errno ("%s: cannot stat overlay", cfg->overlay);
    return -1;
  }
  if (cfg->readonly) {
    cow_error_set (ENOENT, "%s: overlay does not exist and the disk is "
                   "read-only", cfg->overlay);
    return -1;
  }
  {
    struct qcow2_create_opts o = {
      .size = chain_base (d)->size,
      .version = cfg->compat ? cfg->compat : 3,
      .cluster_size = cfg->cluster_size ? cfg->cluster_size : 65536,
      .backing_format = fmt,
    };
    o.extended_l2 = qcow2_want_extended_l2 (cfg->subclusters, o.version,
                                            o.cluster_size);
    char *name = remote_is_uri (cfg->base) ? strdup (cfg->base)
      : backing_name_for (cfg->overlay, cfg->base);
    int r;
    if (name == NULL) {
      if (remote_is_uri (cfg->base))    /* else backing_name_for said why */
        cow_error_errno ("strdup");
      return -1;
    }
    o.backing_file = name;
    r = qcow2_create (cfg->overlay, &o);
    free (name);
    if (r == -1)
      return -1;
  }
  d->top = qcow2_open (cfg->overlay, 0, cfg->cache_size);
  return d->top ? 0 : -1;
}

/* The last disk sequence number given out. */
static uint64_t next_seq;

struct cow_disk *
cow_disk_open (const struct cow_disk_config *cfg)
{
  struct cow_disk *d;
  pthread_rwlockattr_t attr;
  int r;

  if ((cfg->overlay == NULL) == (cfg->state_dir == NULL)) {
    cow_error_set (EINVAL, "exactly one of overlay and state directory must "
                   "be given");
    return NULL;
  }
  if (cfg->sync_mode == COW_SYNC_INTERVAL && cfg->sync_interval_ms == 0) {
    cow_error_set (EINVAL, "sync interval must be at least 1 ms");
    return NULL;
  }
  if (cfg->compat != 0 && cfg->compat != 2 && cfg->compat != 3) {
    cow_error_set (EINVAL, "compat must be 0.10 or 1.1");
    return NULL;
  }
  if (cfg->subclusters > 0
      && !qcow2_want_extended_l2 (1, cfg->compat ? cfg->compat : 3,
                                  cfg->cluster_size ? cfg->cluster_size
                                  : 65536)) {
    cow_error_set (EINVAL, "subclusters=on needs compat 1.1 and a cluster "
                   "size of at least 16K");
    return NULL;
  }
  d = calloc (1, sizeof *d);
  if (d == NULL) {
    cow_error_errno ("calloc");
    return NULL;
  }
  /* Writers first: a snapshot must not starve behind steady I/O. */
  pthread_rwlockattr_init (&attr);
  pthread_rwlockattr_setkind_np (&attr,
                                 PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
  pthread_rwlock_init (&d->chain_lock, &attr);
  pthread_rwlock_init (&d->durability_lock, &attr);
  pthread_rwlockattr_destroy (&attr);
  pthread_mutex_init (&d->admin_lock, NULL);
  pthread_mutex_init (&d->health_lock, NULL);
  pthread_mutex_init (&d->map_lock, NULL);
  pthread_mutex_init (&d->sync_lock, NULL);
  pthread_cond_init (&d->sync_cond, NULL);
  job_disk_init (d);
  /* The canonical lock order of several disks (chain.h). */
  d->seq = __atomic_add_fetch (&next_seq, 1, __ATOMIC_RELAXED);
  d->lock_fd = -1;
  d->sync_mode = cfg->sync_mode;
  d->sync_interval_ms = cfg->sync_interval_ms;
  d->cache_size = cfg->cache_size;
  d->base_timeout_ms = cfg->base_timeout_ms == COW_TIMEOUT_NONE ? 0
    : cfg->base_timeout_ms ? cfg->base_timeout_ms : COW_DEFAULT_BASE_TIMEOUT_MS;
  d->drain_ns = (uint64_t) (cfg->drain_timeout_ms ? cfg->drain_timeout_ms
                            : COW_DEFAULT_DRAIN_TIMEOUT_MS) * 1000000u;

  r = cfg->state_dir ? statedir_open (d, cfg) : open_overlay (d, cfg);
  if (r == -1)
    goto err;
  if (cfg->overlay) {
    d->overlay = strdup (cfg->overlay);
    d->base_name = strdup (cfg->base);
    if (d->overlay == NULL || d->base_name == NULL) {
      cow_error_errno ("strdup");
      goto err;
    }
  }
  d->size = d->top->size;
  return d;

 err:
  if (d->top)
    d->top->ops->close (d->top);
  close_lower (d);
  free_disk (d);
  return NULL;
}

static void *
sync_thread (void *arg)
{
  struct cow_disk *d = arg;

  pthread_mutex_lock (&d->sync_lock);
  while (!d->stop) {
    struct timespec ts;
    clock_gettime (CLOCK_REALTIME, &ts);
    ts.tv_sec += d->sync_interval_ms / 1000;
    ts.tv_nsec += (long) (d->sync_interval_ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
      ts.tv_sec++;
      ts.tv_nsec -= 1000000000L;
    }
    pthread_cond_timedwait (&d->sync_cond, &d->sync_lock, &ts);
    if (d->stop)
      break;
    pthread_mutex_unlock (&d->sync_lock);
    if (__atomic_exchange_n (&d->dirty, 0, __ATOMIC_ACQ_REL)
        || __atomic_load_n (&d->sync_failed, __ATOMIC_ACQUIRE)) {
      uint64_t t0 = chain_now_ns ();
      bool failed = cow_disk_flush (d) == -1;
      COW_DEBUG (COW_DEBUG_SYNC, "%s: interval flush %s in %.3f ms",
                 d->state_dir ? d->state_dir : d->overlay,
                 failed ? "failed" : "done", EVENTS_MS (t0, chain_now_ns ()));
      if (failed)
        __atomic_store_n (&d->dirty, 1, __ATOMIC_RELEASE);
      __atomic_store_n (&d->sync_failed, failed, __ATOMIC_RELEASE);
    }
    pthread_mutex_lock (&d->sync_lock);
  }
  pthread_mutex_unlock (&d->sync_lock);
  cow_error_clear ();
  return NULL;
}

int
cow_disk_start_sync (struct cow_disk *d)
{
  int e;

  if (d->sync_mode != COW_SYNC_INTERVAL || d->sync_running)
    return 0;
  e = pthread_create (&d->sync_thread, NULL, sync_thread, d);
  if (e) {
    cow_error_set (e, "cannot start the sync thread");
    return -1;
  }
  d->sync_running = true;
  return 0;
}

int
cow_disk_close (struct cow_disk *d)
{
  int r = 0;

  if (d == NULL)
    return 0;
  job_disk_stop (d);
  chain_join_closer (d);
  if (d->sync_running) {
    pthread_mutex_lock (&d->sync_lock);
    d->stop = true;
    pthread_cond_signal (&d->sync_cond);
    pthread_mutex_unlock (&d->sync_lock);
    pthread_join (d->sync_thread, NULL);
  }
  if (d->state_dir && chain_degraded (d)) {
    chain_admin_lock (d);
    if (chain_settle (d, "closing the disk cleanly") == -1)
      r = -1;
    chain_admin_unlock (d);
  }
  if (d->top->ops->close (d->top) == -1)
    r = -1;
  close_lower (d);
  free_disk (d);
  return r;
}

uint64_t
cow_disk_size (const struct cow_disk *d)
{
  return d->size;
}

uint32_t
cow_disk_cluster_size (const struct cow_disk *d)
{
  return qcow2_cluster_size (d->top);
}

const char *
cow_disk_base_format_guessed (const struct cow_disk *d)
{
  return d->base_format_guessed;
}

static int
check_range (struct cow_disk *d, uint32_t count, uint64_t offset)
{
  if (offset > d->size || count > d->size - offset) {
    cow_error_set (EINVAL, "request of %" PRIu32 " bytes at offset %" PRIu64
                   " is beyond the end of the disk (%" PRIu64 " bytes)",
                   count, offset, d->size);
    return -1;
  }
  return 0;
}

/* Guest I/O ran: a background job gives way (job_yield).  A plain load
 * first, so that the line is written only once per job chunk. */
static inline void
note_io (struct cow_disk *d)
{
  if (!__atomic_load_n (&d->guest_io, __ATOMIC_RELAXED))
    __atomic_store_n (&d->guest_io, 1, __ATOMIC_RELAXED);
}

int
cow_disk_pread (struct cow_disk *d, void *buf, uint32_t count, uint64_t offset)
{
  const struct layer_below *below = &d->top_below;
  int r;

  if (check_range (d, count, offset) == -1)
    return -1;
  note_io (d);
  pthread_rwlock_rdlock (&d->chain_lock);
  r = d->top->ops->read (d->top, buf, count, offset, below);
  pthread_rwlock_unlock (&d->chain_lock);
  return r;
}

/* sync=MS promises that a write is durable within MS: while the
 * interval flush fails (or the disk is degraded, which fails it), each
 * write is made durable itself, or fails, so that the loss window never
 * grows without bound. */
static bool
wants_durable (struct cow_disk *d, unsigned flags)
{
  return (flags & COW_FLAG_FUA) || d->sync_mode == COW_SYNC_ALWAYS
    || (d->sync_mode == COW_SYNC_INTERVAL
        && (__atomic_load_n (&d->sync_failed, __ATOMIC_ACQUIRE)
            || chain_degraded (d)));
}

/* Locks for a change: a durable one also holds durability_lock (first),
 * so that its flush cannot be answered in the middle of a snapshot. */
static void
change_begin (struct cow_disk *d, bool durable)
{
  if (durable) {
    /* Degraded: retry the manifest first, unless a chain change holds
     * admin_lock (a write does not wait on that). */
    chain_try_settle (d, false);
    pthread_rwlock_rdlock (&d->durability_lock);
  }
  pthread_rwlock_rdlock (&d->chain_lock);
}

/* Durable only if every write is reachable from the manifest on disk
 * (DESIGN.md invariant 7): checked under durability_lock, which a
 * snapshot holds exclusive until its manifest is saved or the disk is
 * marked degraded. */
static int
make_durable (struct cow_disk *d)
{
  if (d->top->ops->flush (d->top) == -1)
    return -1;
  return chain_check_durable (d);
}

static int
change_end (struct cow_disk *d, bool durable, int r)
{
  if (r == 0 && durable)
    r = make_durable (d);
  else if (r == 0)
    __atomic_store_n (&d->dirty, 1, __ATOMIC_RELEASE);
  pthread_rwlock_unlock (&d->chain_lock);
  if (durable)
    pthread_rwlock_unlock (&d->durability_lock);
  return r;
}

/* An active commit copies again what the guest changed meanwhile. */
static inline void
note_change (struct cow_disk *d, uint32_t count, uint64_t offset)
{
  note_io (d);
  if (__atomic_load_n (&d->track_dirty, __ATOMIC_ACQUIRE))
    job_mark_dirty (d, offset, count);
}

int
cow_disk_pwrite (struct cow_disk *d, const void *buf, uint32_t count,
                 uint64_t offset, unsigned flags)
{
  bool durable;
  int r;

  if (check_range (d, count, offset) == -1)
    return -1;
  durable = wants_durable (d, flags);
  change_begin (d, durable);
  if (__atomic_load_n (&d->mirroring, __ATOMIC_ACQUIRE))
    r = job_mirror_change (d, buf, count, offset, false);
  else {
    r = d->top->ops->write (d->top, buf, count, offset, &d->top_below);
    note_change (d, count, offset);
  }
  return change_end (d, durable, r);
}

int
cow_disk_zero (struct cow_disk *d, uint32_t count, uint64_t offset,
               unsigned flags)
{
  bool durable;
  int r;

  if (check_range (d, count, offset) == -1)
    return -1;
  durable = wants_durable (d, flags);
  change_begin (d, durable);
  if (__atomic_load_n (&d->mirroring, __ATOMIC_ACQUIRE))
    r = job_mirror_change (d, NULL, count, offset,
                           (flags & COW_FLAG_FAST_ZERO) != 0);
  else {
    r = d->top->ops->zero (d->top, count, offset,
                           (flags & COW_FLAG_FAST_ZERO) != 0, &d->top_below);
    note_change (d, count, offset);
  }
  return change_end (d, durable, r);
}

int
cow_disk_trim (struct cow_disk *d, uint32_t count, uint64_t offset,
               unsigned flags)
{
  bool durable;
  int r;

  if (check_range (d, count, offset) == -1)
    return -1;
  durable = wants_durable (d, flags);
  change_begin (d, durable);
  r = d->top->ops->trim (d->top, count, offset);
  note_change (d, count, offset);
  return change_end (d, durable, r);
}

int
cow_disk_flush (struct cow_disk *d)
{
  int r;

  chain_try_settle (d, true);
  pthread_rwlock_rdlock (&d->durability_lock);
  pthread_rwlock_rdlock (&d->chain_lock);
  r = make_durable (d);
  pthread_rwlock_unlock (&d->chain_lock);
  pthread_rwlock_unlock (&d->durability_lock);
  return r;
}

static uint32_t
extent_type (enum layer_status st)
{
  return st == LAYER_DATA ? 0 : COW_EXTENT_HOLE | COW_EXTENT_ZERO;
}

int
cow_disk_extents (struct cow_disk *d, uint32_t count, uint64_t offset,
                  cow_extent_fn fn, void *opaque)
{
  uint64_t end = offset + count, run_start = offset, run_len = 0;
  uint32_t run_type = 0;
  int r = 0;

  if (check_range (d, count, offset) == -1)
    return -1;
  pthread_rwlock_rdlock (&d->chain_lock);
  while (offset < end) {
    uint64_t len;
    enum layer_status st;
    uint32_t type;

    if (d->top->ops->map (d->top, offset, end - offset, &len, &st) == -1)
      goto err;
    for (size_t i = 0; st == LAYER_ABSENT && i < d->n_lower; i++) {
      struct layer *l = d->lower[i].l;
      if (l->ops->map (l, offset, len, &len, &st) == -1)
        goto err;
    }
    if (st == LAYER_ABSENT)
      st = LAYER_ZERO;
    if (len == 0)
      len = end - offset;
    type = extent_type (st);
    if (run_len && type != run_type) {
      r = fn (opaque, run_start, run_len, run_type);
      if (r != 0)
        goto out;
      run_len = 0;
    }
    if (run_len == 0) {
      run_start = offset;
      run_type = type;
    }
    run_len += len;
    offset += len;
  }
  if (run_len)
    r = fn (opaque, run_start, run_len, run_type);
 out:
  pthread_rwlock_unlock (&d->chain_lock);
  return r == -1 ? -1 : 0;
 err:
  pthread_rwlock_unlock (&d->chain_lock);
  return -1;
}

void
cow_cache_set_budget (uint64_t bytes)
{
  qcow2_cache_set_budget (bytes);
}

void
cow_memory_usage (struct cow_memory_usage *u)
{
  qcow2_cache_usage (&u->cache_budget, &u->cache_used, &u->cache_peak,
                     &u->cache_tables);
  u->map_bytes = chain_map_bytes ();
}

const char *
cow_disk_base (const struct cow_disk *d)
{
  if (d->state_dir)
    return d->man.no_base ? "" : d->man.base;
  return d->base_name;
}

uint64_t
cow_disk_last_pause_ns (const struct cow_disk *d)
{
  return d->last_pause_ns;
}
