/* SPDX-License-Identifier: BSD-3-Clause */
/* Private to the engine: one disk's state, shared by disk.c (open,
 * close, I/O), statedir.c (the state directory), snapshot.c (snapshots,
 * revert), job.c (background merges) and the chain module (chain.h,
 * which holds the lock-order table). */
#ifndef COW_DISK_H
#define COW_DISK_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "cowchain.h"
#include "layer.h"
#include "manifest.h"

#define COW_MAX_DEPTH 128
_Static_assert (MANIFEST_MAX_LAYERS <= COW_MAX_DEPTH,
                "a manifest's layers fit the layer arrays");

/* One read-only layer under the active one, with the way to what lies
 * under it. */
struct chain_node {
  struct layer *l;
  struct layer_below below;
};

struct cow_disk {
  struct layer *top;
  struct layer_below top_below;
  /* [0 .. n_frozen-1]: frozen layers, newest first; then the base and its
   * own backing chain. */
  struct chain_node lower[COW_MAX_DEPTH];
  size_t n_lower;
  size_t n_frozen;

  /* State-directory disks: the committed manifest (changed under
   * admin_lock and chain_lock), and the lock file held while open. */
  char *state_dir;
  struct manifest man;
  int lock_fd;
  int compat;
  uint32_t cluster_size;
  int subclusters;              /* cow_disk_config.subclusters */
  uint64_t cache_size;
  /* Overlay-mode disks. */
  char *overlay;
  char *base_name;
  /* The base's format as guessed from its first bytes at open ("raw" or
   * "qcow2", static strings), or NULL when it was given or recorded. */
  const char *base_format_guessed;

  /* Locks: the lock-order table is at the top of chain.h.
   * admin_lock serialises snapshot, revert, the start and the final
   * switch of a job, and changes of man. */
  pthread_mutex_t admin_lock;
  /* The canonical lock order of several disks (chain.h): unique, fixed
   * at open. */
  uint64_t seq;
#ifndef NDEBUG
  /* Debug builds: who holds admin_lock, and chain_lock exclusive (0:
   * nobody), for the assertions of chain.h. */
  pthread_t admin_owner;
  pthread_t chain_owner;
#endif
  /* Degraded (chain-plan.c): the manifest file may not be man.  Set
   * under admin_lock, read atomically by FLUSH and FUA, which fail while
   * it is set.  unflushed: a frozen layer whose flush at a snapshot
   * failed (admin_lock).  health_lock protects the message. */
  int man_unsaved;
  struct layer *unflushed;
  pthread_mutex_t health_lock;
  char *degraded_msg;
  int degraded_errno;
  /* durability_lock: FLUSH, FUA and sync=always hold it shared; a snapshot
   * holds it exclusive from its switch until the manifest is on disk, so
   * that no flush is answered for writes the manifest does not yet reach.
   * Taken before chain_lock. */
  pthread_rwlock_t durability_lock;
  uint64_t last_pause_ns;
  uint64_t size;

  /* chain_lock: I/O holds it shared; changes of the chain hold it
   * exclusive, taken with chain_wait_exclusive (never a plain wrlock:
   * a writer waiting on this writer-preferring lock stops new readers). */
  pthread_rwlock_t chain_lock;
  /* Bounds of the waits (fixed after open): a remote base's requests
   * (0 = none), and a chain change's wait for guest I/O to drain. */
  uint32_t base_timeout_ms;
  uint64_t drain_ns;

  enum cow_sync_mode sync_mode;
  uint32_t sync_interval_ms;
  unsigned dirty;               /* atomic: written since the last flush */
  bool sync_failed;             /* atomic: the last interval flush failed */

  /* The interval sync thread; sync_lock protects stop. */
  pthread_t sync_thread;
  bool sync_running;
  pthread_mutex_t sync_lock;
  pthread_cond_t sync_cond;
  bool stop;

  /* Background merges (job.c).  job_lock protects job (the running or
   * last job), the job thread's existence and what the job's controls
   * change; taken after admin_lock, never with chain_lock held. */
  pthread_mutex_t job_lock;
  pthread_cond_t job_cond;
  struct cow_job *job;
  pthread_t job_thread;
  bool job_thread_joinable;
  unsigned max_depth;
  /* Active commit: clusters the guest changed (atomic words), set after
   * each completed write while track_dirty; stable under chain_lock. */
  uint64_t *dirty_map;
  bool track_dirty;
  /* Active commit, once the first pass is done: guest writes and
   * zeroes go to the target too (job_mirror_change), so that what is
   * left to copy can only shrink.  mirroring is atomic, set and cleared
   * by the job thread (cleared with chain_lock exclusive); mirror_target
   * is fixed while it is set.  A stripe lock (cluster number modulo
   * MIRROR_STRIPES) orders a guest change of a cluster in both layers
   * against the job's copy of that cluster (lock order: after chain_lock,
   * before the layers' own locks; several in ascending order). */
  bool mirroring;
  /* The thread closing the files of deleted layers (chain-plan.c
   * close_later); under admin_lock. */
  pthread_t closer;
  bool closer_joinable;
  struct layer *mirror_target;
  pthread_mutex_t mirror_stripe[64];
  /* Atomic: guest I/O happened since the job last looked (job_yield). */
  unsigned guest_io;

  /* The service buses this disk's events go to, with its name on each
   * (a list; NULL: none); events.c's own, under its taps_lock. */
  struct events_tap *events_tap;

  /* The merged map of the frozen layers (chain-map.c): fmap (atomic) the
   * current chain's, or NULL; fmap_old the one chain_link retired;
   * fmap_failed: building it failed for this chain.  map_lock is held
   * by the one thread building it. */
  struct chain_map *fmap;
  struct chain_map *fmap_old;
  bool fmap_failed;
  pthread_mutex_t map_lock;
};

struct cow_job;

/* statedir.c: a disk's state directory. */
/* Open (or create) the disk recorded in cfg->state_dir. */
int statedir_open (struct cow_disk *d, const struct cow_disk_config *cfg);
/* Check (and where the manifest marks them, repair) every layer's
 * backing name against the manifest. */
int statedir_check_names (struct cow_disk *d, bool readonly);
char *statedir_path (const struct cow_disk *d, const char *file);
char *statedir_new_layer_name (struct cow_disk *d, const struct manifest *m);
struct layer *statedir_create_layer (struct cow_disk *d, const char *file,
                                     const char *backing);
void statedir_unlink_layer (struct cow_disk *d, const char *file);

/* job.c */
void job_disk_init (struct cow_disk *d);
/* Cancel and wait for a running job (at close). */
void job_disk_stop (struct cow_disk *d);
void job_disk_destroy (struct cow_disk *d);
/* Is a job running or paused (caller holds admin_lock)?  Names it in the
 * last error with the verb that it blocks. */
bool job_busy (struct cow_disk *d, const char *what);
bool job_active_commit (struct cow_disk *d);
/* After a snapshot or a job: start an automatic merge if the chain is
 * deeper than max_depth (caller holds admin_lock). */
void job_check_depth (struct cow_disk *d);
/* Record a completed guest change for an active commit. */
void job_mark_dirty (struct cow_disk *d, uint64_t offset, uint64_t count);
/* While d->mirroring (caller holds chain_lock shared): a guest write
 * (buf) or zero (buf NULL) into the active layer and the commit's
 * target. */
int job_mirror_change (struct cow_disk *d, const void *buf, uint32_t count,
                       uint64_t offset, bool fast);

#endif /* COW_DISK_H */
