/* SPDX-License-Identifier: BSD-3-Clause */
/* Bounded waits of chain changes (DESIGN.md invariant 10).
 *
 * Guest I/O holds chain_lock (and FLUSH/FUA durability_lock) shared for
 * the whole of a request, and a request on a remote base can sit there
 * for as long as the base does not answer (up to base-timeout).  Both
 * locks prefer writers, so that a snapshot does not starve behind steady
 * I/O; but that also means a writer that simply waits stops every new
 * reader behind it: one stuck base read would freeze the whole disk,
 * overlay reads included, for as long as the snapshot waits.
 *
 * So a chain change never waits in one piece.  It tries to take all its
 * locks within a short window (a few ms: far longer than a healthy drain,
 * which is the time of the requests in flight on local files); if one
 * does not come free in time, it gives back everything it holds, so that
 * the requests queued behind it run, rests for half a window and tries
 * again with a longer window (up to WINDOW_MAX_NS).  The disk then stalls
 * at most one window at a time.  After the drain bound (drain_ns, 10 s
 * by default) the change fails with ETIMEDOUT and nothing changed: the
 * locks are taken before anything is installed, and the callers drop
 * what they prepared (a snapshot's new layer file).
 *
 * Several disks (snapshot-atomic) are taken in one window too, all or
 * none, always in the same order (durability locks of every disk, then
 * chain locks, each over the disks in the canonical order of chain.h,
 * whatever order the caller gave), so a stuck disk never keeps the others
 * frozen longer than a window, and two changes cannot deadlock.  Their
 * admin locks are taken before, in the same canonical order
 * (chain_disks_sorted, chain_admin_lock_all).
 *
 * Rejected: waiting without the writer's preference (a reader-preferring
 * rwlock, or a trylock loop): steady guest I/O would then starve the
 * change forever, which is why the locks prefer writers in the first
 * place.  Not waiting for reads at all (the old layers stay open until
 * the readers leave, as with RCU) would need reference counts on layers
 * on the hot path and a deferred close for revert and jobs; the windows
 * cost the hot path nothing.
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "chain.h"
#include "error.h"

#define WINDOW_MIN_NS (5u * 1000000u)
#define WINDOW_MAX_NS (100u * 1000000u)

static void
mono_ts (struct timespec *ts, uint64_t ns)
{
  ts->tv_sec = (time_t) (ns / 1000000000u);
  ts->tv_nsec = (long) (ns % 1000000000u);
}

static void
rest (uint64_t ns)
{
  struct timespec ts;

  mono_ts (&ts, ns);
  while (nanosleep (&ts, &ts) == -1 && errno == EINTR)
    ;
}

static const char *
disk_name (const struct cow_disk *d)
{
  return d->state_dir ? d->state_dir : d->overlay ? d->overlay : "the disk";
}

/* Debug builds: who holds d's chain_lock exclusive (chain.h). */
static void
set_chain_owner (struct cow_disk *d, bool held)
{
#ifndef NDEBUG
  __atomic_store_n (&d->chain_owner, held ? pthread_self () : (pthread_t) 0,
                    __ATOMIC_RELAXED);
#else
  (void) d;
  (void) held;
#endif
}

static int
by_seq (const void *a, const void *b)
{
  const struct cow_disk *x = *(struct cow_disk *const *) a;
  const struct cow_disk *y = *(struct cow_disk *const *) b;

  return x->seq < y->seq ? -1 : x->seq > y->seq;
}

struct cow_disk **
chain_disks_sorted (struct cow_disk *const *disks, size_t n, const char *what)
{
  struct cow_disk **v = malloc ((n ? n : 1) * sizeof *v);

  if (v == NULL) {
    cow_error_errno ("%s", what);
    return NULL;
  }
  memcpy (v, disks, n * sizeof *v);
  qsort (v, n, sizeof *v, by_seq);
  for (size_t i = 1; i < n; i++)
    if (v[i] == v[i - 1]) {
      cow_error_set (EINVAL, "%s: disk %s given twice", what,
                     disk_name (v[i]));
      free (v);
      return NULL;
    }
  return v;
}

void
chain_admin_lock_all (struct cow_disk *const *sorted, size_t n)
{
  for (size_t i = 0; i < n; i++)
    chain_admin_lock (sorted[i]);
}

void
chain_admin_unlock_all (struct cow_disk *const *sorted, size_t n)
{
  for (size_t i = n; i-- > 0; )
    chain_admin_unlock (sorted[i]);
}

void
chain_release (struct cow_disk *const *disks, size_t n, unsigned which)
{
  if (which & CHAIN_HOLD_CHAIN)
    for (size_t i = n; i-- > 0; ) {
      set_chain_owner (disks[i], false);
      pthread_rwlock_unlock (&disks[i]->chain_lock);
    }
  if (which & CHAIN_HOLD_DURABILITY)
    for (size_t i = n; i-- > 0; )
      pthread_rwlock_unlock (&disks[i]->durability_lock);
}

/* The k-th lock of one window: durability locks first, then chain. */
static pthread_rwlock_t *
lock_at (struct cow_disk *const *disks, size_t n, unsigned which, size_t k)
{
  if (which & CHAIN_HOLD_DURABILITY) {
    if (k < n)
      return &disks[k]->durability_lock;
    k -= n;
  }
  return &disks[k]->chain_lock;
}

int
chain_wait_exclusive (struct cow_disk *const *disks, size_t n,
                      unsigned which, const char *what, uint64_t *t0)
{
  size_t total = n * (size_t) (((which & CHAIN_HOLD_DURABILITY) != 0)
                               + ((which & CHAIN_HOLD_CHAIN) != 0));
  uint64_t start = chain_now_ns (), bound = UINT64_MAX, window = WINDOW_MIN_NS;
  size_t stuck = 0;

  /* The caller ordered them (chain_disks_sorted), once. */
  for (size_t i = 1; i < n; i++)
    assert (disks[i - 1]->seq < disks[i]->seq);
  for (size_t i = 0; i < n; i++)
    if (disks[i]->drain_ns < bound)
      bound = disks[i]->drain_ns;
  for (;;) {
    uint64_t t = chain_now_ns (), until = t + window, t_chain = t;
    size_t n_dur = (which & CHAIN_HOLD_DURABILITY) ? n : 0;
    struct timespec ts;
    size_t k;
    int e = 0;

    if (until - start > bound)
      until = start + bound > t ? start + bound : t;
    mono_ts (&ts, until);
    for (k = 0; k < total; k++) {
      if (k == n_dur && k > 0)
        t_chain = chain_now_ns ();
      e = pthread_rwlock_clockwrlock (lock_at (disks, n, which, k),
                                      CLOCK_MONOTONIC, &ts);
      if (e)
        break;
    }
    if (k == total) {
      if (t0)
        *t0 = t_chain;
      if (which & CHAIN_HOLD_CHAIN)
        for (size_t i = 0; i < n; i++)
          set_chain_owner (disks[i], true);
      return 0;
    }
    stuck = k % n;
    while (k-- > 0)
      pthread_rwlock_unlock (lock_at (disks, n, which, k));
    if (e != ETIMEDOUT) {
      cow_error_set (e, "%s: %s: cannot take the chain lock",
                     disk_name (disks[stuck]), what);
      return -1;
    }
    t = chain_now_ns ();
    if (t - start >= bound)
      break;
    /* Let the requests queued behind us run. */
    rest (window / 2 < bound - (t - start) ? window / 2 : bound - (t - start));
    if (window < WINDOW_MAX_NS)
      window *= 2;
  }
  cow_error_set (ETIMEDOUT, "%s: %s failed: guest I/O did not drain within "
                 "%.6g s (is a request to the base stuck? see "
                 "base-timeout); nothing was changed", disk_name (disks[stuck]),
                 what, bound / 1e9);
  return -1;
}

bool
chain_admin_lock_bounded (struct cow_disk *d)
{
  struct timespec ts;

  mono_ts (&ts, chain_now_ns () + d->drain_ns);
  if (pthread_mutex_clocklock (&d->admin_lock, CLOCK_MONOTONIC, &ts) != 0)
    return false;
  chain_admin_set_owner_ (d, true);
  return true;
}
