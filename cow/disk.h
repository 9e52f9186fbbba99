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
  uint64_t cache_size;
  /* Overlay-mode disks. */
  char *overlay;
  char *base_name;

  /* admin_lock serialises snapshot, revert, the start and the final
   * switch of a job, and changes of man. */
  pthread_mutex_t admin_lock;
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
  /* Atomic: guest I/O happened since the job last looked (job_yield). */
  unsigned guest_io;
};

struct cow_job;

/* chain-plan.c: the one place that changes the chain (see there).
 * Caller holds admin_lock for all of these. */
struct chain_plan {
  struct manifest next;         /* the chain wanted (after install: the old) */
  struct layer *added;          /* a new layer file next names, or NULL */
  char *added_file;
  bool keep_added_file;         /* a save failed uncertainly: next may be
                                   on disk, so the file may not go */
  bool installed;
  /* Built by chain_plan_build. */
  struct layer *top;
  struct chain_node lower[COW_MAX_DEPTH];
  size_t n_lower, n_frozen;
  struct layer *gone[COW_MAX_DEPTH + 1];  /* to close after install */
  size_t n_gone;
  char *gone_files[MANIFEST_MAX_LAYERS];  /* to delete after install */
  size_t n_gone_files;
};
/* The open layer of manifest index i, and back (-1: not a layer of the
 * state directory). */
struct layer *chain_layer (const struct cow_disk *d, size_t i);
long chain_index (const struct cow_disk *d, const struct layer *l);
/* A plan whose next is a copy of the current manifest. */
struct chain_plan *chain_plan_new (struct cow_disk *d);
/* Create a new empty layer over 'backing' (a layer file, NULL: the base)
 * and push it on top of next. */
int chain_plan_add_layer (struct cow_disk *d, struct chain_plan *p,
                          const char *backing);
/* Resolve next into layer arrays; refuses unknown or vanished files. */
int chain_plan_build (struct cow_disk *d, struct chain_plan *p);
/* Save next as the manifest (before install).  A failure that may have
 * replaced the file anyway leaves the disk degraded. */
int chain_plan_save (struct cow_disk *d, struct chain_plan *p);
/* Switch to the plan's chain and manifest (caller also holds chain_lock
 * exclusive). */
void chain_plan_install (struct cow_disk *d, struct chain_plan *p);
/* After install: save d->man; on failure the disk is degraded ('what'
 * names the change for the status message). */
int chain_commit_installed (struct cow_disk *d, const char *what);
/* Installed: fix stale backing names, close and delete what left the
 * chain.  Not installed: drop the added layer.  Frees the plan. */
void chain_plan_free (struct cow_disk *d, struct chain_plan *p);

/* Degraded state.  chain_settle retries the save (admin_lock held) and
 * refuses 'what' with the reason if it still fails; chain_try_settle
 * takes admin_lock itself (waiting, or only if free); chain_check_durable
 * fails (EIO) while degraded; chain_refuse_degraded sets the error. */
bool chain_degraded (struct cow_disk *d);
/* Mark the disk degraded; the reason is 'what' and the last error. */
void chain_set_degraded (struct cow_disk *d, const char *what);
int chain_settle (struct cow_disk *d, const char *what);
void chain_try_settle (struct cow_disk *d, bool wait);
int chain_check_durable (struct cow_disk *d);
int chain_refuse_degraded (struct cow_disk *d, int err, const char *what);

/* chain-wait.c: exclusive holds for a chain change, taken in short
 * windows so that guest I/O runs between them, for at most the disk's
 * drain_ns (the smallest of the disks').  which: CHAIN_HOLD_DURABILITY
 * and/or CHAIN_HOLD_CHAIN, taken in that order, on every disk.  Returns
 * 0 with all held (*t0, if given: when the last window began to take
 * the chain locks, so that from *t0 to their release is guest I/O's
 * pause), or -1 with none held and ETIMEDOUT set, naming 'what' and the
 * disk that did not drain.  chain_release drops what chain_wait_exclusive took.
 * chain_admin_lock_bounded takes admin_lock within the drain bound
 * (false: it did not come free). */
#define CHAIN_HOLD_DURABILITY 1u
#define CHAIN_HOLD_CHAIN 2u
int chain_wait_exclusive (struct cow_disk *const *disks, size_t n,
                          unsigned which, const char *what, uint64_t *t0);
void chain_release (struct cow_disk *const *disks, size_t n, unsigned which);
bool chain_admin_lock_bounded (struct cow_disk *d);

/* chain.c helpers. */
int chain_check_names (struct cow_disk *d, bool readonly);
void chain_link (struct cow_disk *d);
char *statedir_path (const struct cow_disk *d, const char *file);
char *statedir_new_layer_name (struct cow_disk *d, const struct manifest *m);
struct layer *statedir_create_layer (struct cow_disk *d, const char *file,
                            const char *backing);
void statedir_unlink_layer (struct cow_disk *d, const char *file);
uint64_t chain_now_ns (void);

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
