/* Private to the engine: one disk's state, shared by chain.c (I/O,
 * snapshots, revert) and job.c (background merges). */
#ifndef COW_DISK_H
#define COW_DISK_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "cowchain.h"
#include "layer.h"
#include "manifest.h"

#define COW_MAX_DEPTH 128

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
  uint64_t cache_size;
  /* Overlay-mode disks. */
  char *overlay;
  char *base_name;

  /* admin_lock serialises snapshot, revert, the start and the final
   * switch of a job, and changes of man. */
  pthread_mutex_t admin_lock;
  /* durability_lock: FLUSH, FUA and sync=always hold it shared; a snapshot
   * holds it exclusive from its switch until the manifest is on disk, so
   * that no flush is answered for writes the manifest does not yet reach.
   * Taken before chain_lock. */
  pthread_rwlock_t durability_lock;
  uint64_t last_pause_ns;
  uint64_t size;

  /* chain_lock: I/O holds it shared, changes of the chain (none yet
   * besides close) hold it exclusive. */
  pthread_rwlock_t chain_lock;

  enum cow_sync_mode sync_mode;
  uint32_t sync_interval_ms;
  unsigned dirty;               /* atomic: written since the last flush */

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
  /* Atomic: guest I/O happened since the job last looked (job_yield). */
  unsigned guest_io;
};

struct cow_job;

/* chain.c helpers. */
void link_chain (struct cow_disk *d);
char *backing_name_for (const char *overlay, const char *base);
char *state_path (const struct cow_disk *d, const char *file);
char *new_layer_name (struct cow_disk *d, const struct manifest *m);
struct layer *create_layer (struct cow_disk *d, const char *file,
                            const char *backing);
void unlink_layer (struct cow_disk *d, const char *file);
uint64_t now_ns (void);

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

#endif /* COW_DISK_H */
