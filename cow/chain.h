/* SPDX-License-Identifier: BSD-3-Clause */
/* The chain module (private to the engine): the in-memory chain of a
 * disk (chain-layers.c), the plans that change it (chain-plan.c) and
 * the bounded exclusive holds a change takes (chain-wait.c).  Every
 * engine file that locks a disk includes this header, and follows the
 * one lock-order table below.
 *
 * Lock order (take top to bottom; never take one above a lock held):
 *
 *   1. admin_lock         (mutex)  snapshot, revert, a job's start and
 *                                  last step, changes of d->man, settle.
 *                                  chain_admin_lock & co.
 *   2. job_lock           (mutex)  the job's state and controls; taken
 *                                  after admin_lock or alone, never with
 *                                  chain_lock held.
 *   3. durability_lock    (rwlock) FLUSH, FUA, sync=always shared; a
 *                                  snapshot exclusive until its manifest
 *                                  is saved.
 *   4. chain_lock         (rwlock) guest I/O shared; a chain change
 *                                  exclusive.  3 and 4 exclusive only
 *                                  through chain_wait_exclusive.
 *   5. health_lock        (mutex)  the degraded message; a leaf.
 *   6. sync_lock          (mutex)  the sync thread's stop flag; a leaf,
 *                                  never held while flushing.
 *   4a. map_lock          (mutex)  building the merged map of the
 *                                  frozen layers (chain-map.c), by a
 *                                  reader under chain_lock shared, never
 *                                  with a lock of a frozen layer held;
 *                                  takes 7 inside.
 *   6a. mirror_stripe[]   (mutexes) an active commit's mirrored guest
 *                                  changes against the job's copies
 *                                  (job.c); under chain_lock shared,
 *                                  several in ascending order.
 *   7. the qcow2 layer's own locks (qcow2.c, qcow2-cache.c), taken
 *      inside layer operations under chain_lock shared or exclusive.
 *   7a. the metadata cache pool lock (qcow2-cache.c: the budget shared
 *      by every layer of every disk); taken under a layer's lock, and
 *      while held, other layers' locks are only tried (trylock), never
 *      waited for; no I/O under it.
 *   8. image locks (image.c: OFD locks on files), taken at open and at
 *      a job's reopen_rw / release, under admin_lock or none.
 *   9. events.c's taps_lock, then an event bus's lock: leaves, taken to
 *      emit an event under any lock above; nothing is taken under them.
 *
 * Several disks (snapshot-atomic): each level is taken on every disk
 * before the next level, and over the disks in one canonical order (by
 * d->seq, assigned at open), whatever order the caller gave: two callers
 * naming the same disks in different orders cannot deadlock.  The same
 * disk given twice is refused (EINVAL) before anything is locked
 * (chain_disks_sorted).
 *
 * Debug builds (no NDEBUG) record the thread that holds admin_lock, and
 * the one holding chain_lock exclusive, so that functions documented as
 * "caller holds X" assert it; release builds compile that out. */
#ifndef COW_CHAIN_H
#define COW_CHAIN_H

#include <assert.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "disk.h"

/*----------------------------------------------------------------------
 * admin_lock, with its owner recorded in debug builds.
 */

#ifndef NDEBUG
static inline void
chain_admin_set_owner_ (struct cow_disk *d, bool held)
{
  __atomic_store_n (&d->admin_owner, held ? pthread_self () : (pthread_t) 0,
                    __ATOMIC_RELAXED);
}
#define CHAIN_ASSERT_ADMIN(d)                                           \
  assert (pthread_equal (__atomic_load_n (&(d)->admin_owner,            \
                                          __ATOMIC_RELAXED),            \
                         pthread_self ()))
#define CHAIN_ASSERT_EXCLUSIVE(d)                                       \
  assert (pthread_equal (__atomic_load_n (&(d)->chain_owner,            \
                                          __ATOMIC_RELAXED),            \
                         pthread_self ()))
#else
#define chain_admin_set_owner_(d, held) ((void) 0)
#define CHAIN_ASSERT_ADMIN(d) ((void) 0)
#define CHAIN_ASSERT_EXCLUSIVE(d) ((void) 0)
#endif

static inline void
chain_admin_lock (struct cow_disk *d)
{
  pthread_mutex_lock (&d->admin_lock);
  chain_admin_set_owner_ (d, true);
}

static inline bool
chain_admin_trylock (struct cow_disk *d)
{
  if (pthread_mutex_trylock (&d->admin_lock) != 0)
    return false;
  chain_admin_set_owner_ (d, true);
  return true;
}

static inline void
chain_admin_unlock (struct cow_disk *d)
{
  CHAIN_ASSERT_ADMIN (d);
  chain_admin_set_owner_ (d, false);
  pthread_mutex_unlock (&d->admin_lock);
}

static inline struct cow_disk *
chain_admin_lock_ret_ (struct cow_disk *d)
{
  chain_admin_lock (d);
  return d;
}

static inline void
chain_admin_unlock_ptr_ (struct cow_disk **dp)
{
  chain_admin_unlock (*dp);
}

/* Hold d's admin_lock for the rest of the scope. */
#define ADMIN_LOCK_FOR_SCOPE(d)                                         \
  struct cow_disk *cow_admin_scope_                                     \
    __attribute__ ((cleanup (chain_admin_unlock_ptr_), unused))         \
    = chain_admin_lock_ret_ (d)

/*----------------------------------------------------------------------
 * chain-layers.c: the in-memory chain.  A disk's layers are named by
 * manifest index (0 the bottom layer of the state directory, n-1 the
 * active one); the layers of the base chain under them have no index
 * and are reached by walking down (chain_under) from chain_base.
 */

/* Link each layer to the one under it (after the layer arrays changed). */
void chain_link (struct cow_disk *d);
/* The open layer of manifest index i, and back (-1: not a layer of the
 * state directory). */
struct layer *chain_layer (const struct cow_disk *d, size_t i);
long chain_index (const struct cow_disk *d, const struct layer *l);
/* The manifest index of 'word': a layer file name first, then a
 * snapshot name (snapshot_only: only frozen layers that carry a
 * snapshot); -1 if none. */
long chain_find (const struct cow_disk *d, const char *word,
                 bool snapshot_only);
/* The first manifest index in [from, to] whose layer carries a snapshot
 * name, or -1. */
long chain_first_snapshot (const struct cow_disk *d, long from, long to);
/* The layer right under l (NULL: l is the bottom, or not in the chain). */
struct layer *chain_under (const struct cow_disk *d, const struct layer *l);
/* The layers from l (included) down to the bottom of the chain, into
 * out (room for COW_MAX_DEPTH + 1); how many (0: l is not in the chain). */
size_t chain_from (const struct cow_disk *d, const struct layer *l,
                   struct layer **out);
/* The way to read what lies under l (NULL: l is not in the chain). */
const struct layer_below *chain_below (struct cow_disk *d,
                                       const struct layer *l);
/* The top of the base chain (under the state directory's layers), or
 * NULL for a disk without a base. */
struct layer *chain_base (const struct cow_disk *d);
/* Layers of the base chain (not named by the manifest). */
size_t chain_base_depth (const struct cow_disk *d);
uint64_t chain_now_ns (void);

/*----------------------------------------------------------------------
 * chain-map.c: the merged map of the frozen layers (which one holds each
 * range), so that a read missing the active layer costs the same at any
 * depth.  Retired by chain_link, rebuilt by the next read.
 */
/* A struct layer_below read through one chain_node (opaque). */
int chain_node_read (void *opaque, void *buf, uint32_t count, uint64_t offset);
/* The active layer's below read (opaque: the disk): through the map.
 * Caller holds chain_lock shared or exclusive. */
int chain_map_read (void *opaque, void *buf, uint32_t count, uint64_t offset);
/* The chain changed (chain_lock exclusive, or not serving yet). */
void chain_map_retire (struct cow_disk *d);
void chain_map_free (struct cow_disk *d);
/* Bytes held by the maps of all disks. */
uint64_t chain_map_bytes (void);
/* Test hook: 0 if the disk's map (built now if need be) equals a map
 * built top down from every frozen layer; -1 with EIO naming the first
 * extent that differs (EAGAIN: it could not be built).  Caller holds
 * chain_lock shared. */
int chain_map_check (struct cow_disk *d);
size_t chain_map_extents (struct cow_disk *d);

/*----------------------------------------------------------------------
 * chain-plan.c: the one place that changes the chain (see there).
 * Caller holds admin_lock for all of these.
 */
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
/* After a save: switch to the plan's chain under chain_lock exclusive
 * (a bounded wait).  If guest I/O does not drain, the disk is degraded
 * ('what': the reason) until d->man (the old chain) is saved back. */
int chain_plan_switch (struct cow_disk *d, struct chain_plan *p,
                       const char *what);
/* After install: save d->man; on failure the disk is degraded ('what'
 * names the change for the status message). */
int chain_commit_installed (struct cow_disk *d, const char *what);
/* Installed: fix stale backing names, close and delete what left the
 * chain.  Not installed: drop the added layer.  Frees the plan. */
void chain_plan_free (struct cow_disk *d, struct chain_plan *p);
/* Wait for the thread that closes the files a chain change deleted
 * (chain_plan_free starts it; the next change or the disk's close joins
 * it).  Under admin_lock, or once no chain change can run. */
void chain_join_closer (struct cow_disk *d);

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

/*----------------------------------------------------------------------
 * chain-wait.c: exclusive holds for a chain change, taken in short
 * windows so that guest I/O runs between them, for at most the disk's
 * drain_ns (the smallest of the disks').  which: CHAIN_HOLD_DURABILITY
 * and/or CHAIN_HOLD_CHAIN, taken in that order, on every disk; several
 * disks come in the canonical order (from chain_disks_sorted, which
 * also refused a disk given twice).  Returns 0 with all held (*t0, if
 * given: when the last window began to take the chain locks, so that
 * from *t0 to their release is guest I/O's pause), or -1 with none held
 * and ETIMEDOUT set, naming 'what' and the disk that did not drain.  chain_release drops what chain_wait_exclusive took.
 * chain_admin_lock_bounded takes admin_lock within the drain bound
 * (false: it did not come free).
 */
#define CHAIN_HOLD_DURABILITY 1u
#define CHAIN_HOLD_CHAIN 2u
int chain_wait_exclusive (struct cow_disk *const *disks, size_t n,
                          unsigned which, const char *what, uint64_t *t0);
void chain_release (struct cow_disk *const *disks, size_t n, unsigned which);
bool chain_admin_lock_bounded (struct cow_disk *d);
/* The disks in the canonical lock order (malloc'd), or NULL with the
 * error: EINVAL "what: disk X given twice", or ENOMEM. */
struct cow_disk **chain_disks_sorted (struct cow_disk *const *disks, size_t n,
                                      const char *what);
/* admin_lock of every disk of a sorted array, and back. */
void chain_admin_lock_all (struct cow_disk *const *sorted, size_t n);
void chain_admin_unlock_all (struct cow_disk *const *sorted, size_t n);

#endif /* COW_CHAIN_H */
