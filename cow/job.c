/* SPDX-License-Identifier: BSD-3-Clause */
/* Background merges: commit (down), pull (up) and snapshot delete, on a
 * thread of their own while guest I/O goes on.
 *
 * DESIGN.md invariant 4: a job changes the chain only in its last step.
 * Until then it only adds data that reads the same:
 *   - commit writes the disk as seen at 'top' into 'base'.  The layers
 *     above base up to top still hide everything it writes, so the guest's
 *     view never changes; base's own snapshot name is dropped when the job
 *     starts (its state is being overwritten).
 *   - pull fills the clusters of the target that it does not hold yet with
 *     what they read from below (qcow2_layer_populate never overwrites a
 *     guest write).
 * The last step, under admin_lock: flush the target, replace the manifest
 * (the commit point), take the merged layers out of the in-memory chain
 * under the exclusive chain lock, rewrite one backing name in a header
 * (a crash before that is repaired at open, see statedir_check_names), and
 * delete the merged files.  An active commit mirrors the guest's changes
 * into the target once its first pass is done (job_mirror_change), copies
 * what is left, flushes the target while the guest runs, and then does
 * its final copy (what changed since), flush and manifest update under
 * the exclusive chain lock, so that no guest write lands between the
 * copy and the switch and the pause is short.
 *
 * Locks (the table is in chain.h): admin_lock (chain changes, taken
 * first) -> job_lock (the job's state and controls).  The copy holds
 * chain_lock shared for one chunk at a time (on each of the crew's
 * threads) and never waits on job_cond with it held; the mirror's stripe
 * locks come after chain_lock.  The chain itself is read and changed only through the
 * chain module (chain.h): manifest indexes, chain_from / chain_below for
 * the copy, plans for the last step.
 */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cowchain.h"
#include "chain.h"
#include "error.h"
#include "events.h"
#include "image.h"
#include "layer.h"
#include "manifest.h"

#define JOB_CHUNK (1u << 20)
/* The target's dirty pages are sent to the disk every this many bytes
 * copied, so that the flush of the last step finds little left to write
 * and the disk works while the copy goes on. */
#define WRITEBACK_STEP (32u << 20)
/* Active commit: copy under the exclusive lock once this little is left
 * dirty, or after this many passes. */
#define FINAL_DIRTY_BYTES (4u << 20)
#define MAX_DIRTY_PASSES 20

enum base_kind {
  BASE_LAYER,     /* a layer of the state directory */
  BASE_ORIG,      /* the disk's original base */
  BASE_NONE,      /* nothing: pull self-contained */
};

struct cow_job {
  struct cow_disk *d;
  enum cow_job_kind kind;

  /* Under d->job_lock. */
  enum cow_job_state state;
  bool pause_req, cancel_req;
  uint64_t speed;
  uint64_t done, total, rate;
  int64_t started, ended;
  uint64_t start_ns, end_ns;      /* monotonic */
  int err;
  char *msg;
  char *top_name, *base_name;     /* for reports */
  unsigned milestone;             /* the next job-progress event: 25/50/75 */

  /* Fixed at start. */
  bool commit;                    /* commit; else pull (also delete) */
  bool active;                    /* commit of the active layer */
  enum base_kind bk;
  struct layer *target;           /* commit: base; pull: the layer filled */
  struct layer *top;              /* commit: top; pull: the target */
  struct layer *base_layer;       /* BASE_LAYER: that layer */
  bool target_was_frozen;
  const char *stop_at;            /* test hook: COWCHAIN_JOB_STOP_AT */

  /* The copy thread's own. */
  uint64_t work_ns;               /* time the last chunk took */
  uint64_t window_t0, window_done;
  uint64_t rate_t0, rate_done;
  uint64_t unsent;                /* written into target since the last
                                     writeback */
  char *buf;                      /* the job thread's chunk buffer */
  struct crew *crew;              /* helpers of copy_all, or NULL */
};

/*----------------------------------------------------------------------
 * Small helpers.
 */

static int64_t
wall_now (void)
{
  return (int64_t) time (NULL);
}

static void
free_job (struct cow_job *j)
{
  if (j == NULL)
    return;
  free (j->msg);
  free (j->top_name);
  free (j->base_name);
  free (j->buf);
  free (j);
}

#define IDX_BASE (-1L)

/* A layer word: "active", "base", a layer file name or a snapshot name,
 * in that order, so that no snapshot name shadows another meaning (new
 * names cannot look like the others; see cow_snapshot_name_reserved, and
 * an older manifest's snapshot reaches its layer by the file name). */
static int
resolve (struct cow_disk *d, const char *word, long *idx)
{
  size_t n = d->man.n_layers;

  if (strcmp (word, "active") == 0) {
    *idx = (long) n - 1;
    return 0;
  }
  if (strcmp (word, "base") == 0) {
    if (d->man.no_base) {
      cow_error_set (ENOENT, "%s: the disk has no base (it was pulled "
                     "self-contained)", d->state_dir);
      return -1;
    }
    *idx = IDX_BASE;
    return 0;
  }
  *idx = chain_find (d, word, false);
  if (*idx >= 0)
    return 0;
  cow_error_set (ENOENT, "%s: no snapshot or layer named '%s' (see "
                 "cowchain list)", d->state_dir, word);
  return -1;
}

/* The layer file of a snapshot that an older version let take the
 * reserved name 'word', or NULL: for a hint in refusals. */
static const char *
shadowed_file (struct cow_disk *d, const char *word)
{
  for (size_t i = 0; i < d->man.n_layers; i++)
    if (d->man.layers[i].snapshot
        && strcmp (d->man.layers[i].snapshot, word) == 0)
      return d->man.layers[i].file;
  return NULL;
}

static const char *
word_of (struct cow_disk *d, long i)
{
  if (i == IDX_BASE)
    return "base";
  return d->man.layers[i].snapshot ? d->man.layers[i].snapshot
    : d->man.layers[i].file;
}

/* Refuse (EBUSY) if snapshots in manifest [from, to] would be lost. */
static int
check_lost (struct cow_disk *d, long from, long to, bool force,
            const char *verb)
{
  long i = chain_first_snapshot (d, from < 0 ? 0 : from, to);

  if (i >= 0 && !force) {
    cow_error_set (EBUSY, "%s: %s would drop snapshot '%s'; use --force "
                   "to drop it", d->state_dir, verb,
                   d->man.layers[i].snapshot);
    return -1;
  }
  return 0;
}

/* Drop the snapshot names of manifest layers [from, to], durably. */
static int
drop_names (struct cow_disk *d, long from, long to)
{
  struct chain_plan *p;
  int r = -1;

  if (chain_first_snapshot (d, from < 0 ? 0 : from, to) < 0)
    return 0;
  p = chain_plan_new (d);
  if (p == NULL)
    return -1;
  for (long i = from < 0 ? 0 : from; i <= to; i++) {
    free (p->next.layers[i].snapshot);
    free (p->next.layers[i].description);
    p->next.layers[i].snapshot = p->next.layers[i].description = NULL;
  }
  /* Saved, then installed; if guest I/O does not drain for the install,
   * the disk is degraded until the manifest in memory (the names still
   * there) is written back, as after a job's switch (commit_plan). */
  if (chain_plan_build (d, p) == 0 && chain_plan_save (d, p) == 0)
    r = chain_plan_switch (d, p, "dropping snapshot names");
  chain_plan_free (d, p);
  return r;
}

/*----------------------------------------------------------------------
 * Controls: pause, cancel, speed.
 */

static void
deadline_in (struct timespec *ts, uint64_t ns)
{
  uint64_t wake;

  clock_gettime (CLOCK_REALTIME, ts);
  wake = (uint64_t) ts->tv_sec * 1000000000u + (uint64_t) ts->tv_nsec + ns;
  ts->tv_sec = (time_t) (wake / 1000000000u);
  ts->tv_nsec = (long) (wake % 1000000000u);
}

/* Between chunks: honour pause and cancel, and the speed limit.  Returns
 * -1 if cancelled.  Called without chain_lock.
 *
 * A job gives way to the guest: when guest I/O ran during the last chunk,
 * the job rests as long as that chunk took, so that a busy guest keeps at
 * least half of the time (and of the disk) to itself.  An idle guest
 * costs the job nothing. */
static int
job_yield (struct cow_job *j)
{
  struct cow_disk *d = j->d;
  bool guest = __atomic_exchange_n (&d->guest_io, 0, __ATOMIC_ACQ_REL);
  uint64_t rest = guest ? j->work_ns : 0;
  int r = 0;

  if (rest > 100000000u)
    rest = 100000000u;
  pthread_mutex_lock (&d->job_lock);
  if (rest && !j->cancel_req && !j->pause_req) {
    struct timespec ts;
    deadline_in (&ts, rest);
    pthread_cond_timedwait (&d->job_cond, &d->job_lock, &ts);
  }
  for (;;) {
    uint64_t now = chain_now_ns ();
    if (j->cancel_req) {
      r = -1;
      break;
    }
    if (j->pause_req) {
      j->state = COW_JOB_PAUSED;
      pthread_cond_broadcast (&d->job_cond);
      pthread_cond_wait (&d->job_cond, &d->job_lock);
      j->window_t0 = chain_now_ns ();
      j->window_done = j->done;
      continue;
    }
    j->state = COW_JOB_RUNNING;
    if (now - j->rate_t0 >= 1000000000u) {
      j->rate = (j->done - j->rate_done) * 1000000000u / (now - j->rate_t0);
      j->rate_t0 = now;
      j->rate_done = j->done;
    }
    if (j->speed) {
      /* Ahead of the limit: sleep until the window catches up. */
      uint64_t due = j->window_t0
        + (uint64_t) ((double) (j->done - j->window_done) * 1e9
                      / (double) j->speed);
      if (due > now) {
        struct timespec ts;
        deadline_in (&ts, due - now);
        pthread_cond_timedwait (&d->job_cond, &d->job_lock, &ts);
        continue;
      }
    }
    break;
  }
  pthread_mutex_unlock (&d->job_lock);
  return r;
}

/* Test hook: with COWCHAIN_JOB_STOP_AT=stage the job pauses itself there
 * (so that a test can kill the server at that exact stage). */
static void
stop_at (struct cow_job *j, const char *stage)
{
  struct cow_disk *d = j->d;

  if (j->stop_at == NULL || strcmp (j->stop_at, stage) != 0)
    return;
  pthread_mutex_lock (&d->job_lock);
  j->pause_req = true;
  j->state = COW_JOB_PAUSED;
  pthread_cond_broadcast (&d->job_cond);
  while (j->pause_req && !j->cancel_req)
    pthread_cond_wait (&d->job_cond, &d->job_lock);
  j->state = COW_JOB_RUNNING;
  pthread_mutex_unlock (&d->job_lock);
}

/* An event of the job (its start, milestones, end). */
static void
emit_job (struct cow_job *j, const char *kind, enum cow_log_level level,
          struct events_fields *f)
{
  events_emit_job (j->d, kind, level, cow_job_kind_name (j->kind),
                   j->top_name, j->base_name, f);
}

static void
add_done (struct cow_job *j, uint64_t n)
{
  unsigned from, to;
  uint64_t done, total;

  pthread_mutex_lock (&j->d->job_lock);
  j->done += n;
  if (j->done > j->total)
    j->total = j->done;
  done = j->done;
  total = j->total;
  from = to = j->milestone;
  while (to <= 75 && total && done * 100 >= total * to)
    to += 25;
  j->milestone = to;
  pthread_mutex_unlock (&j->d->job_lock);
  /* Every milestone passed, even several in one chunk. */
  for (unsigned m = from; m < to; m += 25) {
    struct events_fields f = { 0 };
    events_add (&f, "percent", "%u", m);
    events_add (&f, "done", "%" PRIu64, done);
    events_add (&f, "total", "%" PRIu64, total);
    emit_job (j, "job-progress", COW_LOG_INFO, &f);
  }
}

/*----------------------------------------------------------------------
 * Copying (caller holds chain_lock shared).
 */

/* The status of [pos, pos+max) through the merged layers: the first
 * layer from the top that holds something there.  For a pull the target
 * itself is not counted; the layers are those under it down to the base
 * (the base chain too when pulling self-contained). */
static int
range_status (struct cow_job *j, uint64_t pos, uint64_t max, uint64_t *len,
              enum layer_status *st)
{
  struct cow_disk *d = j->d;
  const struct layer *stop = j->bk == BASE_LAYER ? j->base_layer
    : j->bk == BASE_ORIG ? chain_base (d) : NULL;
  struct layer *ls[COW_MAX_DEPTH + 1];
  size_t n = chain_from (d, j->commit ? j->top : j->target, ls);

  *len = max;
  *st = LAYER_ABSENT;
  /* The chain top-down from the first merged layer (a pull's starts
   * under its target) to the stop. */
  for (size_t i = j->commit ? 0 : 1; i < n && ls[i] != stop; i++) {
    if (ls[i]->ops->map (ls[i], pos, *len, len, st) == -1)
      return -1;
    if (*len == 0)
      *len = max;
    if (*st != LAYER_ABSENT)
      return 0;
  }
  return 0;
}

static bool
all_zero (const char *p, uint64_t n)
{
  return n == 0 || (p[0] == 0 && memcmp (p, p + 1, n - 1) == 0);
}

/* Commit: write the view at top over [pos, pos+len) into the target,
 * where the merged layers hold something. */
static int
commit_range (struct cow_job *j, char *buf, uint64_t pos, uint64_t len,
              bool count)
{
  struct cow_disk *d = j->d;
  const struct layer_below *tb = chain_below (d, j->target);
  const struct layer_below *topb = chain_below (d, j->top);
  uint64_t end = pos + len;

  while (pos < end) {
    uint64_t n;
    enum layer_status st;

    if (range_status (j, pos, end - pos, &n, &st) == -1)
      return -1;
    if (n > JOB_CHUNK)
      n = JOB_CHUNK;
    if (st == LAYER_DATA) {
      if (j->top->ops->read (j->top, buf, (uint32_t) n, pos, topb) == -1
          || j->target->ops->write (j->target, buf, (uint32_t) n, pos,
                                    tb) == -1)
        return -1;
    }
    else if (st == LAYER_ZERO) {
      if (j->target->ops->zero (j->target, (uint32_t) n, pos, false,
                                tb) == -1)
        return -1;
    }
    if (count && st != LAYER_ABSENT)
      add_done (j, n);
    pos += n;
  }
  return 0;
}

/* Pull: fill what the target does not hold over [pos, pos+len) with
 * what it reads from below, where the merged layers hold something. */
static int
pull_range (struct cow_job *j, char *buf, uint64_t pos, uint64_t len)
{
  struct cow_disk *d = j->d;
  struct layer *x = j->target;
  const struct layer_below *xb = chain_below (d, x);
  uint64_t c = qcow2_cluster_size (x), end = pos + len;
  bool v3 = qcow2_version (x) >= 3;

  while (pos < end) {
    uint64_t n, m, a, b;
    enum layer_status st;

    if (x->ops->map (x, pos, end - pos, &n, &st) == -1)
      return -1;
    if (st != LAYER_ABSENT) {
      pos += n;
      continue;
    }
    if (range_status (j, pos, n, &m, &st) == -1)
      return -1;
    if (m > JOB_CHUNK)
      m = JOB_CHUNK;
    /* Whole target clusters (rounding only ever copies what the target
     * would read there anyway). */
    a = pos & ~(c - 1);
    b = (pos + m + c - 1) & ~(c - 1);
    if (b > d->size)
      b = d->size;
    if (st == LAYER_ZERO && j->bk == BASE_NONE)
      ;                         /* reads zero without a backing anyway */
    else if (st == LAYER_ZERO && v3 && a == pos
             && (b == pos + m || pos + m == d->size)) {
      if (qcow2_layer_populate (x, NULL, (uint32_t) (b - a), a) == -1)
        return -1;
    }
    else if (st != LAYER_ABSENT && xb->read) {
      if (xb->read (xb->opaque, buf, (uint32_t) (b - a), a) == -1)
        return -1;
      if (!(j->bk == BASE_NONE && all_zero (buf, b - a))
          && qcow2_layer_populate (x, buf, (uint32_t) (b - a), a) == -1)
        return -1;
    }
    if (st != LAYER_ABSENT)
      add_done (j, m);
    pos += m;
  }
  return 0;
}

/* Bytes the merged layers hold (the job's total). */
static int
measure (struct cow_job *j, uint64_t *total)
{
  struct cow_disk *d = j->d;
  uint64_t pos = 0;

  *total = 0;
  while (pos < d->size) {
    uint64_t n;
    enum layer_status st;
    int r;

    pthread_rwlock_rdlock (&d->chain_lock);
    r = range_status (j, pos, d->size - pos, &n, &st);
    pthread_rwlock_unlock (&d->chain_lock);
    if (r == -1)
      return -1;
    if (st != LAYER_ABSENT)
      *total += n;
    pos += n;
  }
  return 0;
}

/* After n bytes were copied into the target: start writing its dirty
 * pages back once WRITEBACK_STEP of them piled up (without chain_lock:
 * the kernel may make this wait for a congested device).  A failure
 * only loses the head start: the flush of the last step reports it. */
static void
send_written (struct cow_job *j, uint64_t n)
{
  uint64_t pos = 0;

  j->unsent += n;
  if (j->unsent < WRITEBACK_STEP || j->target->ops->writeback == NULL)
    return;
  j->unsent = 0;
  if (j->target->ops->writeback (j->target, &pos, UINT64_MAX, false) == -1)
    cow_error_clear ();
}

/* One chunk of a pass, under chain_lock shared. */
static int
copy_chunk (struct cow_job *j, char *buf, uint64_t pos, uint64_t len)
{
  struct cow_disk *d = j->d;
  int r;

  pthread_rwlock_rdlock (&d->chain_lock);
  r = j->commit ? commit_range (j, buf, pos, len, true)
    : pull_range (j, buf, pos, len);
  pthread_rwlock_unlock (&d->chain_lock);
  return r;
}

/* Several requests in flight.  copy_all goes over the disk in rounds of
 * up to JOB_CREW chunks: between rounds the job thread alone checks the
 * controls (job_yield), exactly as it did between chunks; then it hands
 * one chunk to each helper thread, copies one itself and waits for all.
 * So pause, cancel and the speed limit act between rounds, and a paused
 * job copies nothing.  The first failure of a round fails the job; the
 * other chunks of that round are written all the same, which only adds
 * data that reads the same (invariant 4).  With a page-cached source the
 * copy costs two memory copies per byte and the helpers spread them
 * over the CPUs; with a cold source they keep reads in flight.
 * A speed limit under CREW_MIN_SPEED copies one chunk per round: it
 * needs no parallel copies, and its pace stays as fine as one chunk.
 * Rejected: helpers that each honour the controls (a pause would then be
 * reported while others still copy). */
#define JOB_CREW 3
#define CREW_MIN_SPEED (64u << 20)

struct crew_slot {
  struct crew *c;
  uint64_t pos, len;              /* len 0: nothing this round */
  int r, err;
  char msg[256];
  char *buf;
};

struct crew {
  struct cow_job *j;
  pthread_mutex_t lock;           /* protects round, busy, quit */
  pthread_cond_t go, done;
  uint64_t round;                 /* bumped to start a round */
  unsigned busy;                  /* helpers still copying this round */
  bool quit;
  size_t n;                       /* helpers running */
  pthread_t threads[JOB_CREW - 1];
  struct crew_slot slot[JOB_CREW - 1];
};

static void *
crew_thread (void *arg)
{
  struct crew_slot *me = arg;
  struct crew *c = me->c;
  uint64_t seen = 0;

  pthread_mutex_lock (&c->lock);
  for (;;) {
    while (!c->quit && c->round == seen)
      pthread_cond_wait (&c->go, &c->lock);
    if (c->quit)
      break;
    seen = c->round;
    pthread_mutex_unlock (&c->lock);
    me->r = me->len ? copy_chunk (c->j, me->buf, me->pos, me->len) : 0;
    if (me->r == -1) {
      me->err = cow_last_errno () ? cow_last_errno () : EIO;
      snprintf (me->msg, sizeof me->msg, "%s", cow_last_error ());
      cow_error_clear ();
    }
    pthread_mutex_lock (&c->lock);
    if (--c->busy == 0)
      pthread_cond_signal (&c->done);
  }
  pthread_mutex_unlock (&c->lock);
  return NULL;
}

static void
crew_stop (struct cow_job *j)
{
  struct crew *c = j->crew;

  if (c == NULL)
    return;
  pthread_mutex_lock (&c->lock);
  c->quit = true;
  pthread_cond_broadcast (&c->go);
  pthread_mutex_unlock (&c->lock);
  for (size_t i = 0; i < c->n; i++)
    pthread_join (c->threads[i], NULL);
  for (size_t i = 0; i < JOB_CREW - 1; i++)
    free (c->slot[i].buf);
  pthread_mutex_destroy (&c->lock);
  pthread_cond_destroy (&c->go);
  pthread_cond_destroy (&c->done);
  free (c);
  j->crew = NULL;
}

/* Start the helpers; with fewer (or none) if memory or threads run
 * short: the job then copies with what it has. */
static void
crew_start (struct cow_job *j)
{
  struct crew *c = calloc (1, sizeof *c);

  if (c == NULL)
    return;
  c->j = j;
  pthread_mutex_init (&c->lock, NULL);
  pthread_cond_init (&c->go, NULL);
  pthread_cond_init (&c->done, NULL);
  j->crew = c;
  for (size_t i = 0; i < JOB_CREW - 1; i++) {
    c->slot[i].c = c;
    c->slot[i].buf = malloc (JOB_CHUNK + (4u << 20));
    if (c->slot[i].buf == NULL
        || pthread_create (&c->threads[i], NULL, crew_thread,
                           &c->slot[i]) != 0)
      break;
    c->n++;
  }
}

/* One pass over the whole disk, a round of chunks at a time. */
static int
copy_all (struct cow_job *j)
{
  struct cow_disk *d = j->d;
  struct crew *c = j->crew;
  bool half = false;
  uint64_t pos = 0;

  while (pos < d->size) {
    uint64_t mine = pos, len, t0, speed;
    size_t helpers = c ? c->n : 0;
    int r;

    if (job_yield (j) == -1)
      return -2;
    pthread_mutex_lock (&d->job_lock);
    speed = j->speed;
    pthread_mutex_unlock (&d->job_lock);
    if (speed && speed < CREW_MIN_SPEED)
      helpers = 0;
    t0 = chain_now_ns ();
    len = d->size - pos < JOB_CHUNK ? d->size - pos : JOB_CHUNK;
    pos += len;
    if (helpers) {
      pthread_mutex_lock (&c->lock);
      for (size_t i = 0; i < helpers; i++) {
        struct crew_slot *s = &c->slot[i];
        s->pos = pos;
        s->len = d->size - pos < JOB_CHUNK ? d->size - pos : JOB_CHUNK;
        s->r = 0;
        pos += s->len;
      }
      c->busy = (unsigned) helpers;
      c->round++;
      pthread_cond_broadcast (&c->go);
      pthread_mutex_unlock (&c->lock);
    }
    r = copy_chunk (j, j->buf, mine, len);
    if (helpers) {
      pthread_mutex_lock (&c->lock);
      while (c->busy > 0)
        pthread_cond_wait (&c->done, &c->lock);
      pthread_mutex_unlock (&c->lock);
      for (size_t i = 0; i < helpers && r == 0; i++)
        if (c->slot[i].r == -1) {
          cow_error_set (c->slot[i].err, "%s", c->slot[i].msg);
          r = -1;
        }
    }
    j->work_ns = chain_now_ns () - t0;
    if (r == -1)
      return -1;
    send_written (j, pos - mine);
    if (!half && j->done * 2 >= j->total && j->total > 0) {
      half = true;
      stop_at (j, "mid-copy");
    }
  }
  return 0;
}

/*----------------------------------------------------------------------
 * Active commit: the clusters the guest changes meanwhile.
 */

void
job_mark_dirty (struct cow_disk *d, uint64_t offset, uint64_t count)
{
  uint64_t c = d->cluster_size;
  uint64_t first = offset / c, last = count ? (offset + count - 1) / c : first;

  for (uint64_t i = first; i <= last; i++)
    __atomic_or_fetch (&d->dirty_map[i / 64], 1ull << (i % 64), __ATOMIC_RELEASE);
}

static size_t
dirty_words (struct cow_disk *d)
{
  uint64_t clusters = (d->size + d->cluster_size - 1) / d->cluster_size;
  return (size_t) ((clusters + 63) / 64);
}

static uint64_t
dirty_bytes (struct cow_disk *d)
{
  uint64_t n = 0;

  for (size_t i = 0; i < dirty_words (d); i++)
    n += (uint64_t) __builtin_popcountll (__atomic_load_n (&d->dirty_map[i],
                                                           __ATOMIC_ACQUIRE));
  return n * d->cluster_size;
}

/* The stripe locks of the clusters of [offset, offset+count), taken
 * (or dropped) in ascending order. */
#define MIRROR_STRIPES 64
_Static_assert (MIRROR_STRIPES
                == sizeof ((struct cow_disk *) 0)->mirror_stripe
                / sizeof ((struct cow_disk *) 0)->mirror_stripe[0],
                "one stripe lock per bit of a word");

static uint64_t
stripes_of (struct cow_disk *d, uint64_t offset, uint64_t count)
{
  uint64_t c = d->cluster_size;
  uint64_t first = offset / c, last = count ? (offset + count - 1) / c : first;
  uint64_t mask = 0;

  if (last - first >= MIRROR_STRIPES - 1)
    return UINT64_MAX;
  for (uint64_t i = first; i <= last; i++)
    mask |= 1ull << (i % MIRROR_STRIPES);
  return mask;
}

static void
stripes_lock (struct cow_disk *d, uint64_t mask)
{
  for (unsigned i = 0; i < MIRROR_STRIPES; i++)
    if (mask & (1ull << i))
      pthread_mutex_lock (&d->mirror_stripe[i]);
}

static void
stripes_unlock (struct cow_disk *d, uint64_t mask)
{
  for (unsigned i = MIRROR_STRIPES; i-- > 0; )
    if (mask & (1ull << i))
      pthread_mutex_unlock (&d->mirror_stripe[i]);
}

/* Write-blocking mirror (the last phase of an active commit): the guest's
 * change goes into the active layer and then into the target, both under
 * the stripe locks of its clusters, so that the job's copy of a cluster
 * (copy_dirty, under the same lock) never lands between them and two
 * overlapping guest changes reach both layers in the same order.  The
 * change is not marked dirty: the target already has it.  If the target
 * refuses it, it is marked dirty instead, so the job copies it again
 * (and fails there if the target keeps failing); the guest's answer is
 * the active layer's. */
int
job_mirror_change (struct cow_disk *d, const void *buf, uint32_t count,
                   uint64_t offset, bool fast)
{
  struct layer *t = d->mirror_target;
  uint64_t mask = stripes_of (d, offset, count);
  int r;

  stripes_lock (d, mask);
  if (buf)
    r = d->top->ops->write (d->top, buf, count, offset, &d->top_below);
  else
    r = d->top->ops->zero (d->top, count, offset, fast, &d->top_below);
  if (r == 0) {
    const struct layer_below *tb = chain_below (d, t);
    int m = buf ? t->ops->write (t, buf, count, offset, tb)
      : t->ops->zero (t, count, offset, false, tb);
    if (m == -1) {
      cow_error_clear ();
      job_mark_dirty (d, offset, count);
    }
  }
  stripes_unlock (d, mask);
  __atomic_store_n (&d->guest_io, 1, __ATOMIC_RELAXED);
  return r;
}

/* Copy the clusters marked dirty (clearing the marks first).  locked:
 * the caller holds chain_lock exclusive; else it is taken per word.
 * While mirroring, each cluster's copy holds its stripe lock. */
static int
copy_dirty (struct cow_job *j, bool locked)
{
  struct cow_disk *d = j->d;
  uint64_t c = d->cluster_size;
  bool stripes = !locked
    && __atomic_load_n (&d->mirroring, __ATOMIC_ACQUIRE);

  for (size_t w = 0; w < dirty_words (d); w++) {
    uint64_t bits = __atomic_exchange_n (&d->dirty_map[w], 0, __ATOMIC_ACQ_REL);
    uint64_t t0 = 0;
    int r = 0;

    if (bits == 0)
      continue;
    if (!locked) {
      if (job_yield (j) == -1) {
        __atomic_or_fetch (&d->dirty_map[w], bits, __ATOMIC_RELEASE);
        return -2;
      }
      t0 = chain_now_ns ();
      pthread_rwlock_rdlock (&d->chain_lock);
    }
    for (unsigned b = 0; b < 64 && r == 0; b++)
      if (bits & (1ull << b)) {
        uint64_t pos = ((uint64_t) w * 64 + b) * c;
        uint64_t len = pos + c > d->size ? d->size - pos : c;
        uint64_t mask = stripes ? stripes_of (d, pos, len) : 0;
        stripes_lock (d, mask);
        r = commit_range (j, j->buf, pos, len, false);
        stripes_unlock (d, mask);
      }
    if (!locked) {
      pthread_rwlock_unlock (&d->chain_lock);
      j->work_ns = chain_now_ns () - t0;
    }
    if (r == -1)
      return -1;
  }
  return 0;
}

/* Writers test track_dirty (and mirroring) and then mark the map (or
 * write the target), under chain_lock shared: once the exclusive lock
 * was held after the stores, none can still be doing so, and the map
 * can go.  If guest I/O does not drain in
 * time, the map stays (a later active commit clears and reuses it, the
 * disk's close frees it): a late mark only costs an extra copy. */
static bool
stop_tracking (struct cow_disk *d)
{
  __atomic_store_n (&d->track_dirty, false, __ATOMIC_RELEASE);
  __atomic_store_n (&d->mirroring, false, __ATOMIC_RELEASE);
  if (chain_wait_exclusive (&d, 1, CHAIN_HOLD_CHAIN, "ending an active commit",
                            NULL) == -1) {
    cow_error_clear ();
    return false;
  }
  chain_release (&d, 1, CHAIN_HOLD_CHAIN);
  free (d->dirty_map);
  d->dirty_map = NULL;
  return true;
}

/*----------------------------------------------------------------------
 * The last step (caller holds admin_lock).
 */

/* Save the plan's manifest (the commit point of a job) and install it;
 * on failure nothing changed in memory.  If guest I/O does not drain for
 * the install, the job fails and the disk is degraded: the old chain is
 * still whole on disk (nothing was deleted or rewritten yet), and the
 * next FLUSH or chain change writes its manifest back. */
static int
commit_plan (struct cow_job *j, struct chain_plan *p)
{
  struct cow_disk *d = j->d;

  if (chain_plan_save (d, p) == -1)
    return -1;
  stop_at (j, "after-manifest");
  return chain_plan_switch (d, p, "the job's final switch");
}

/* Commit of a frozen top: base holds the view at top; the layers above
 * base up to top leave (and base takes top's name); the layer above top
 * then backs onto base (chain_plan_free fixes its header). */
static int
switch_commit (struct cow_job *j, struct chain_plan *p)
{
  struct cow_disk *d = j->d;
  long t = chain_index (d, j->top);
  long b = j->bk == BASE_LAYER ? chain_index (d, j->base_layer) : IDX_BASE;

  if (j->target->ops->flush (j->target) == -1)
    return -1;
  if (b >= 0) {
    struct manifest_layer *nb = &p->next.layers[b], *nt = &p->next.layers[t];
    free (nb->snapshot);
    free (nb->description);
    nb->snapshot = nt->snapshot;
    nb->description = nt->description;
    nb->created = nt->created;
    nt->snapshot = nt->description = NULL;
  }
  manifest_cut (&p->next, (size_t) (b + 1), (size_t) t);
  if (chain_plan_build (d, p) == -1)
    return -1;
  return commit_plan (j, p);
}

/* Active commit: the final copy, flush and manifest under the exclusive
 * chain lock; base becomes the active layer (or, committing into the
 * original base, a new empty layer on it does).  run_copy flushed the
 * target just before, and the guest's writes since went to both layers:
 * the copy finds little or nothing (trims, writes that began before the
 * mirror), the flush only the mirrored writes of the last moments. */
static int
switch_active_commit (struct cow_job *j, struct chain_plan *p)
{
  struct cow_disk *d = j->d;
  long n = (long) d->man.n_layers;
  long b = j->bk == BASE_LAYER ? chain_index (d, j->base_layer) : IDX_BASE;
  uint64_t t0;
  int r;

  manifest_cut (&p->next, (size_t) (b + 1), (size_t) (n - 1));
  if ((b == IDX_BASE && chain_plan_add_layer (d, p, NULL) == -1)
      || chain_plan_build (d, p) == -1)
    return -1;
  if (chain_wait_exclusive (&d, 1, CHAIN_HOLD_CHAIN,
                            "the active commit's final switch", &t0) == -1)
    return -1;
  r = copy_dirty (j, true);
  if (r == 0)
    r = j->target->ops->flush (j->target);
  if (r == 0)
    r = chain_plan_save (d, p);
  if (r == 0) {
    __atomic_store_n (&d->track_dirty, false, __ATOMIC_RELEASE);
    __atomic_store_n (&d->mirroring, false, __ATOMIC_RELEASE);
    chain_plan_install (d, p);
    d->last_pause_ns = chain_now_ns () - t0;
  }
  chain_release (&d, 1, CHAIN_HOLD_CHAIN);
  if (r == 0) {
    free (d->dirty_map);
    d->dirty_map = NULL;
  }
  return r;
}

/* Pull into target: the layers between it and its new backing leave
 * (and with no base, the base chain too). */
static int
switch_pull (struct cow_job *j, struct chain_plan *p)
{
  struct cow_disk *d = j->d;
  long x = chain_index (d, j->target);
  long b = j->bk == BASE_LAYER ? chain_index (d, j->base_layer) : IDX_BASE;

  if (j->target->ops->flush (j->target) == -1)
    return -1;
  if (x - 1 > b)
    manifest_cut (&p->next, (size_t) (b + 1), (size_t) (x - 1));
  if (j->bk == BASE_NONE) {
    free (p->next.base);
    free (p->next.base_format);
    p->next.base = p->next.base_format = NULL;
    p->next.no_base = true;
  }
  if (chain_plan_build (d, p) == -1)
    return -1;
  return commit_plan (j, p);
}

/* The last step (caller holds admin_lock).  A disk left degraded by
 * something else is settled first: the job's switch must not stack a new
 * chain on a manifest that is not on disk. */
static int
switch_chain (struct cow_job *j)
{
  struct cow_disk *d = j->d;
  struct chain_plan *p;
  int r;

  CHAIN_ASSERT_ADMIN (d);
  if (chain_settle (d, "the job's final switch") == -1)
    return -1;
  p = chain_plan_new (d);
  if (p == NULL)
    return -1;
  r = j->commit ? (j->active ? switch_active_commit (j, p)
                   : switch_commit (j, p))
    : switch_pull (j, p);
  chain_plan_free (d, p);
  return r;
}

/*----------------------------------------------------------------------
 * The job thread.
 */

static int
run_copy (struct cow_job *j)
{
  struct cow_disk *d = j->d;
  int r;

  /* A chunk, rounded out to target clusters of up to 2 MiB. */
  j->buf = malloc (JOB_CHUNK + (4u << 20));
  if (j->buf == NULL) {
    cow_error_errno ("malloc");
    return -1;
  }
  pthread_mutex_lock (&d->job_lock);
  j->window_t0 = j->rate_t0 = chain_now_ns ();
  pthread_mutex_unlock (&d->job_lock);
  stop_at (j, "before-copy");
  crew_start (j);
  r = copy_all (j);
  crew_stop (j);
  if (r != 0 || !j->active)
    return r;
  /* Active commit.  From now on the guest's writes and zeroes reach the
   * target too (job_mirror_change), so the set left to copy (what the
   * guest changed during the first pass, and trims) only shrinks,
   * whatever the guest's write rate: go over it until little is left. */
  d->mirror_target = j->target;
  __atomic_store_n (&d->mirroring, true, __ATOMIC_RELEASE);
  for (int pass = 0; pass < MAX_DIRTY_PASSES; pass++) {
    if (dirty_bytes (d) <= FINAL_DIRTY_BYTES)
      break;
    r = copy_dirty (j, false);
    if (r != 0)
      return r;
  }
  /* The pre-flush: the rest, then the target to stable storage while
   * the guest runs, so that the final switch, which holds guest I/O,
   * copies and flushes only what changed since (invariant 10: the
   * pause is milliseconds, not the flush of the whole merge). */
  if ((r = copy_dirty (j, false)) != 0)
    return r;
  if (j->target->ops->flush (j->target) == -1)
    return -1;
  return copy_dirty (j, false);
}

static void finish_locked (struct cow_job *j, int r);
static bool next_auto_job (struct cow_disk *d);

static void *
job_thread (void *arg)
{
  struct cow_disk *d = arg;

  for (;;) {
    struct cow_job *j = d->job;
    int r = run_copy (j);

    if (r == 0)
      stop_at (j, "before-switch");
    chain_admin_lock (d);
    if (r == 0) {
      uint64_t t0 = chain_now_ns ();
      COW_DEBUG (COW_DEBUG_JOB, "%s: %s copied %" PRIu64 " bytes; final "
                 "switch", d->state_dir, cow_job_kind_name (j->kind), j->done);
      r = switch_chain (j);
      COW_DEBUG (COW_DEBUG_JOB, "%s: final switch %s in %.3f ms (pause %.3f "
                 "ms)", d->state_dir, r == 0 ? "done" : "failed",
                 EVENTS_MS (t0, chain_now_ns ()),
                 j->active ? EVENTS_MS (0, d->last_pause_ns) : 0.0);
    }
    finish_locked (j, r);
    if (r != 0 || !next_auto_job (d)) {
      chain_admin_unlock (d);
      return NULL;
    }
    chain_admin_unlock (d);
  }
}

/* The job's end: state, message, and the target back to frozen. */
static void
finish_locked (struct cow_job *j, int r)
{
  struct cow_disk *d = j->d;
  char *msg = NULL;
  int err = 0;
  bool drained = true;

  if (r == -1) {
    err = cow_last_errno () ? cow_last_errno () : EIO;
    msg = strdup (cow_last_error ());
  }
  if (j->active && d->dirty_map)
    drained = stop_tracking (d);
  /* Under the chain, the target takes no more writes: unless a guest
   * write that saw the mirror on may still be on its way to it (guest
   * I/O did not drain), and then it stays unfrozen (its reads lock). */
  if (layer_is_qcow2 (j->target) && j->target != d->top && drained)
    qcow2_mark_frozen (j->target);
  /* A base that a commit wrote into is shared again (other disks may
   * open it): nothing writes it until another commit, whose reopen_rw
   * takes the write permission back first. */
  if (j->commit && j->bk == BASE_ORIG && j->target->lock
      && image_lock_change (j->target->lock, IMAGE_READER) == -1)
    cow_error_clear ();
  pthread_mutex_lock (&d->job_lock);
  j->state = r == 0 ? COW_JOB_COMPLETED
    : r == -2 ? COW_JOB_CANCELLED : COW_JOB_FAILED;
  j->err = r == 0 ? 0 : r == -2 ? ECANCELED : err;
  j->msg = r == -2 ? strdup ("the job was cancelled") : msg;
  if (r == -2)
    free (msg);
  j->ended = wall_now ();
  j->end_ns = chain_now_ns ();
  if (r == 0)
    j->done = j->total;
  free (j->buf);
  j->buf = NULL;
  pthread_cond_broadcast (&d->job_cond);
  pthread_mutex_unlock (&d->job_lock);
  /* After the state: whoever reads the job as running gets this later. */
  {
    struct events_fields f = { 0 };
    events_add (&f, "result", "%s", r == 0 ? "ok"
                : r == -2 ? "cancelled" : "failed");
    events_add (&f, "done", "%" PRIu64, j->done);
    events_add (&f, "total", "%" PRIu64, j->total);
    events_add (&f, "duration-ms", "%.3f",
                EVENTS_MS (j->start_ns, j->end_ns));
    if (r != 0) {
      events_add (&f, "errno", "%d", j->err);
      events_add (&f, "error", "%s", j->msg ? j->msg : "unknown");
    }
    emit_job (j, "job-end", r == -1 ? COW_LOG_ERROR : COW_LOG_INFO, &f);
  }
}

/*----------------------------------------------------------------------
 * Starting jobs (caller holds admin_lock).
 */

bool
job_busy (struct cow_disk *d, const char *what)
{
  bool busy;

  CHAIN_ASSERT_ADMIN (d);
  pthread_mutex_lock (&d->job_lock);
  busy = d->job && (d->job->state == COW_JOB_RUNNING
                    || d->job->state == COW_JOB_PAUSED);
  if (busy)
    cow_error_set (EBUSY, "%s: a %s job (top %s, base %s) is running on this "
                   "disk; wait for it or cancel it before %s", d->state_dir,
                   cow_job_kind_name (d->job->kind), d->job->top_name,
                   d->job->base_name, what);
  pthread_mutex_unlock (&d->job_lock);
  return busy;
}

bool
job_active_commit (struct cow_disk *d)
{
  bool busy;

  pthread_mutex_lock (&d->job_lock);
  busy = d->job && d->job->active && (d->job->state == COW_JOB_RUNNING
                                      || d->job->state == COW_JOB_PAUSED);
  if (busy)
    cow_error_set (EBUSY, "%s: an active commit is running on this disk; "
                   "wait for it or cancel it before taking a snapshot",
                   d->state_dir);
  pthread_mutex_unlock (&d->job_lock);
  return busy;
}

static struct cow_job *
new_job (struct cow_disk *d, enum cow_job_kind kind, const char *top,
         const char *base, uint64_t speed)
{
  struct cow_job *j = calloc (1, sizeof *j);

  if (j == NULL || (j->top_name = strdup (top)) == NULL
      || (j->base_name = strdup (base)) == NULL) {
    cow_error_errno ("calloc");
    free_job (j);
    return NULL;
  }
  j->d = d;
  j->kind = kind;
  j->state = COW_JOB_RUNNING;
  j->speed = speed;
  j->started = wall_now ();
  j->start_ns = chain_now_ns ();
  j->stop_at = getenv ("COWCHAIN_JOB_STOP_AT");
  return j;
}

/* Make the target writable; under the exclusive chain lock so that no
 * read runs its lock-free frozen path meanwhile. */
static int
open_target (struct cow_disk *d, struct cow_job *j)
{
  int r;

  if (j->target->ops->reopen_rw == NULL) {
    cow_error_set (ENOTSUP, "%s: a %s base cannot be written", j->target->path,
                   j->target->ops->kind);
    return -1;
  }
  j->target_was_frozen = j->target != d->top;
  if (chain_wait_exclusive (&d, 1, CHAIN_HOLD_CHAIN, "starting the job",
                            NULL) == -1)
    return -1;
  r = j->target->ops->reopen_rw (j->target);
  chain_release (&d, 1, CHAIN_HOLD_CHAIN);
  return r;
}

/* Install j as the disk's job and run it (on a new thread unless called
 * from the job thread itself). */
static int
launch (struct cow_disk *d, struct cow_job *j, bool from_thread)
{
  int e;

  if (j->active) {
    /* One left by stop_tracking may still see a late mark: harmless. */
    if (d->dirty_map)
      for (size_t i = 0; i < dirty_words (d); i++)
        __atomic_store_n (&d->dirty_map[i], 0, __ATOMIC_RELEASE);
    else
      d->dirty_map = calloc (dirty_words (d), sizeof (uint64_t));
    if (d->dirty_map == NULL) {
      cow_error_errno ("dirty bitmap");
      free_job (j);
      return -1;
    }
    __atomic_store_n (&d->track_dirty, true, __ATOMIC_RELEASE);
  }
  COW_DEBUG (COW_DEBUG_JOB, "%s: %s %s -> %s: measuring", d->state_dir,
             cow_job_kind_name (j->kind), j->top_name, j->base_name);
  if (measure (j, &j->total) == -1) {
    if (j->active)
      stop_tracking (d);
    free_job (j);
    return -1;
  }
  if (!from_thread && d->job_thread_joinable) {
    /* The last job's thread has ended its work and released admin_lock
     * for good (it ends while holding it, see job_thread). */
    pthread_join (d->job_thread, NULL);
    d->job_thread_joinable = false;
  }
  pthread_mutex_lock (&d->job_lock);
  free_job (d->job);
  d->job = j;
  pthread_mutex_unlock (&d->job_lock);
  j->milestone = 25;
  {
    struct events_fields f = { 0 };
    events_add (&f, "total", "%" PRIu64, j->total);
    events_add (&f, "speed", "%" PRIu64, j->speed);
    emit_job (j, "job-start", COW_LOG_INFO, &f);
  }
  if (from_thread)
    return 0;
  e = pthread_create (&d->job_thread, NULL, job_thread, d);
  if (e) {
    if (j->active)
      stop_tracking (d);
    pthread_mutex_lock (&d->job_lock);
    j->state = COW_JOB_FAILED;
    j->err = e;
    j->msg = strdup ("cannot start the job thread");
    pthread_mutex_unlock (&d->job_lock);
    {
      struct events_fields f = { 0 };
      events_add (&f, "result", "failed");
      events_add (&f, "done", "0");
      events_add (&f, "total", "%" PRIu64, j->total);
      events_add (&f, "duration-ms", "0");
      events_add (&f, "errno", "%d", e);
      events_add (&f, "error", "cannot start the job thread");
      emit_job (j, "job-end", COW_LOG_ERROR, &f);
    }
    cow_error_set (e, "cannot start the job thread");
    return -1;
  }
  d->job_thread_joinable = true;
  return 0;
}

static int
check_state_disk (struct cow_disk *d)
{
  if (d->state_dir == NULL) {
    cow_error_set (ENOTSUP, "merges need a state directory (state=), not a "
                   "plain overlay");
    return -1;
  }
  if (d->top->readonly) {
    cow_error_set (EROFS, "%s: the disk is open read-only", d->state_dir);
    return -1;
  }
  return 0;
}

static int
start_commit (struct cow_disk *d, const struct cow_job_opts *o)
{
  long n = (long) d->man.n_layers, t, b;
  struct cow_job *j;

  if (o->top == NULL) {
    cow_error_set (EINVAL, "commit needs --top");
    return -1;
  }
  if (resolve (d, o->top, &t) == -1)
    return -1;
  if (t == IDX_BASE) {
    cow_error_set (EINVAL, "%s: the base cannot be the top of a commit",
                   d->state_dir);
    return -1;
  }
  if (o->base) {
    if (resolve (d, o->base, &b) == -1)
      return -1;
  }
  else
    b = t - 1;
  if (b == IDX_BASE && d->man.no_base) {
    cow_error_set (EINVAL, "%s: '%s' is the bottom layer and the disk has "
                   "no base: nothing to commit into", d->state_dir, o->top);
    return -1;
  }
  if (b >= t) {
    cow_error_set (EINVAL, "%s: base '%s' is not below top '%s'",
                   d->state_dir, word_of (d, b), word_of (d, t));
    return -1;
  }
  if (b == IDX_BASE && !o->allow_base_write) {
    cow_error_set (EPERM, "%s: committing into the original base '%s' "
                   "changes it for every disk that uses it; add "
                   "--allow-base-write", d->state_dir, d->man.base);
    return -1;
  }
  /* The original base carries no name: committing into it loses top's
   * name too. */
  if (check_lost (d, b, b == IDX_BASE ? t : t - 1, o->force,
                  "this commit") == -1)
    return -1;
  j = new_job (d, COW_JOB_COMMIT, d->man.layers[t].file,
               b == IDX_BASE ? "base" : d->man.layers[b].file, o->speed);
  if (j == NULL)
    return -1;
  j->commit = true;
  j->active = t == n - 1;
  j->top = chain_layer (d, (size_t) t);
  j->bk = b == IDX_BASE ? BASE_ORIG : BASE_LAYER;
  j->base_layer = b == IDX_BASE ? NULL : chain_layer (d, (size_t) b);
  j->target = b == IDX_BASE ? chain_base (d) : j->base_layer;
  /* From the first write into base on, the states seen at base and at
   * the layers between it and top change: their names go now. */
  if (open_target (d, j) == -1 || drop_names (d, b, t - 1) == -1) {
    if (j->target_was_frozen && layer_is_qcow2 (j->target))
      qcow2_mark_frozen (j->target);
    free_job (j);
    return -1;
  }
  return launch (d, j, false);
}

/* A pull into manifest layer x over b (IDX_BASE with bk). */
static struct cow_job *
make_pull (struct cow_disk *d, enum cow_job_kind kind, long x, long b,
           enum base_kind bk, uint64_t speed)
{
  struct cow_job *j = new_job (d, kind, d->man.layers[x].file,
                               bk == BASE_LAYER ? d->man.layers[b].file
                               : bk == BASE_ORIG ? "base" : "none", speed);

  if (j == NULL)
    return NULL;
  j->bk = bk;
  j->target = j->top = chain_layer (d, (size_t) x);
  j->base_layer = bk == BASE_LAYER ? chain_layer (d, (size_t) b) : NULL;
  if (open_target (d, j) == -1) {
    free_job (j);
    return NULL;
  }
  return j;
}

static int
start_pull (struct cow_disk *d, const struct cow_job_opts *o)
{
  long n = (long) d->man.n_layers, b;
  enum base_kind bk;
  struct cow_job *j;

  if (o->base) {
    if (resolve (d, o->base, &b) == -1)
      return -1;
    bk = b == IDX_BASE ? BASE_ORIG : BASE_LAYER;
    if (b == n - 1) {
      cow_error_set (EINVAL, "%s: '%s' is the active layer; pull needs a "
                     "base below it", d->state_dir, o->base);
      return -1;
    }
  }
  else {
    b = IDX_BASE;
    bk = BASE_NONE;
  }
  if ((b == n - 2 || (b == IDX_BASE && n == 1))
      && !(bk == BASE_NONE && !d->man.no_base)) {
    cow_error_set (EINVAL, "%s: nothing to pull: the active layer already "
                   "backs onto %s", d->state_dir,
                   bk == BASE_NONE ? "nothing" : word_of (d, b));
    return -1;
  }
  if (check_lost (d, b + 1, n - 2, o->force, "this pull") == -1)
    return -1;
  j = make_pull (d, COW_JOB_PULL, n - 1, b, bk, o->speed);
  return j ? launch (d, j, false) : -1;
}

/* The merge that removes frozen manifest layer l: pulled into the layer
 * above it. */
static struct cow_job *
make_delete (struct cow_disk *d, long l, uint64_t speed)
{
  enum base_kind bk = l > 0 ? BASE_LAYER
    : d->man.no_base ? BASE_NONE : BASE_ORIG;

  return make_pull (d, COW_JOB_DELETE, l + 1, l - 1, bk, speed);
}

static int
start_delete (struct cow_disk *d, const char *name,
              const struct cow_job_opts *o)
{
  long n = (long) d->man.n_layers, l;
  struct cow_job *j;

  if (resolve (d, name, &l) == -1)
    return -1;
  if (l == IDX_BASE || l == n - 1) {
    const char *file = shadowed_file (d, name);
    cow_error_set (EINVAL, "%s: '%s' is not a snapshot (the %s cannot be "
                   "deleted)%s%s", d->state_dir, name,
                   l == IDX_BASE ? "base" : "active layer",
                   file ? "; the snapshot that an older version let take "
                   "this reserved name is reached by its layer file name, "
                   : "", file ? file : "");
    return -1;
  }
  if (drop_names (d, l, l) == -1)
    return -1;
  j = make_delete (d, l, o ? o->speed : 0);
  if (j == NULL)
    return -1;
  free (j->top_name);
  j->top_name = strdup (name);
  if (j->top_name == NULL) {
    cow_error_errno ("strdup");
    free_job (j);
    return -1;
  }
  return launch (d, j, false);
}

/* The oldest frozen layer without a name, if the chain is too deep. */
static long
auto_candidate (struct cow_disk *d)
{
  if (d->max_depth == 0 || d->state_dir == NULL
      || d->man.n_layers <= d->max_depth)
    return -1;
  for (size_t i = 0; i + 1 < d->man.n_layers; i++)
    if (d->man.layers[i].snapshot == NULL)
      return (long) i;
  return -1;
}

static bool
next_auto_job (struct cow_disk *d)
{
  long l = auto_candidate (d);
  struct cow_job *j;

  if (l < 0)
    return false;
  j = make_delete (d, l, 0);
  return j && launch (d, j, true) == 0;
}

void
job_check_depth (struct cow_disk *d)
{
  long l;
  struct cow_job *j;

  CHAIN_ASSERT_ADMIN (d);
  if (job_busy (d, "another merge"))
    return;
  l = auto_candidate (d);
  if (l < 0)
    return;
  j = make_delete (d, l, 0);
  if (j)
    launch (d, j, false);
}

/*----------------------------------------------------------------------
 * Public API.
 */

typedef int (*start_fn) (struct cow_disk *d, const struct cow_job_opts *o);

static int
start_locked (struct cow_disk *d, start_fn fn, const struct cow_job_opts *o,
              const char *verb)
{
  if (check_state_disk (d) == -1)
    return -1;
  ADMIN_LOCK_FOR_SCOPE (d);
  if (job_busy (d, verb) || chain_settle (d, verb) == -1)
    return -1;
  return fn (d, o);
}

int
cow_disk_commit (struct cow_disk *d, const struct cow_job_opts *o)
{
  return start_locked (d, start_commit, o, "starting a commit");
}

int
cow_disk_pull (struct cow_disk *d, const struct cow_job_opts *o)
{
  return start_locked (d, start_pull, o, "starting a pull");
}

int
cow_disk_delete (struct cow_disk *d, const char *name,
                 const struct cow_job_opts *o)
{
  if (check_state_disk (d) == -1)
    return -1;
  ADMIN_LOCK_FOR_SCOPE (d);
  if (job_busy (d, "deleting a snapshot")
      || chain_settle (d, "deleting a snapshot") == -1)
    return -1;
  return start_delete (d, name, o);
}

int
cow_disk_job_info (struct cow_disk *d, struct cow_job_info *out)
{
  struct cow_job *j;
  bool want_msg = false;

  memset (out, 0, sizeof *out);
  pthread_mutex_lock (&d->job_lock);
  j = d->job;
  if (j) {
    out->kind = j->kind;
    out->state = j->state;
    out->top = strdup (j->top_name);
    out->base = strdup (j->base_name);
    out->done = j->done;
    out->total = j->total;
    out->speed = j->speed;
    /* The last second's rate while running (since the start during the
     * first second); the average once ended. */
    if (j->state == COW_JOB_PAUSED)
      out->rate = 0;
    else {
      uint64_t end = j->end_ns ? j->end_ns : chain_now_ns ();
      uint64_t el = end - j->start_ns;
      out->rate = j->rate && !j->end_ns ? j->rate
        : el ? (uint64_t) ((double) j->done * 1e9 / (double) el) : 0;
    }
    out->started = j->started;
    out->ended = j->ended;
    out->error = j->err;
    out->message = j->msg ? strdup (j->msg) : NULL;
    want_msg = j->msg != NULL;
  }
  pthread_mutex_unlock (&d->job_lock);
  /* j itself only under the lock: the job thread sets its message, and
   * a new job frees it. */
  if (j && (out->top == NULL || out->base == NULL
            || (want_msg && out->message == NULL))) {
    cow_job_info_clear (out);
    cow_error_errno ("job info");
    return -1;
  }
  return 0;
}

void
cow_job_info_clear (struct cow_job_info *i)
{
  free (i->top);
  free (i->base);
  free (i->message);
  memset (i, 0, sizeof *i);
}

const char *
cow_job_kind_name (enum cow_job_kind k)
{
  switch (k) {
  case COW_JOB_COMMIT: return "commit";
  case COW_JOB_PULL: return "pull";
  case COW_JOB_DELETE: return "delete";
  }
  return "none";
}

const char *
cow_job_state_name (enum cow_job_state s)
{
  switch (s) {
  case COW_JOB_NONE: return "none";
  case COW_JOB_RUNNING: return "running";
  case COW_JOB_PAUSED: return "paused";
  case COW_JOB_COMPLETED: return "completed";
  case COW_JOB_FAILED: return "failed";
  case COW_JOB_CANCELLED: return "cancelled";
  }
  return "none";
}

enum job_control { CTL_PAUSE, CTL_RESUME, CTL_CANCEL, CTL_SPEED };

/* Apply a control to the running job. */
static int
control (struct cow_disk *d, enum job_control what, uint64_t speed)
{
  struct cow_job *j;
  int r = 0;

  pthread_mutex_lock (&d->job_lock);
  j = d->job;
  if (j == NULL || (j->state != COW_JOB_RUNNING
                    && j->state != COW_JOB_PAUSED)) {
    cow_error_set (ENOENT, "%s: no job is running on this disk",
                   d->state_dir ? d->state_dir : d->top->path);
    r = -1;
  }
  else {
    switch (what) {
    case CTL_PAUSE: j->pause_req = true; break;
    case CTL_RESUME: j->pause_req = false; break;
    case CTL_CANCEL: j->cancel_req = true; break;
    case CTL_SPEED:
      j->speed = speed;
      j->window_t0 = chain_now_ns ();
      j->window_done = j->done;
      break;
    }
    pthread_cond_broadcast (&d->job_cond);
    /* A pause is reported once the copy has stopped between chunks. */
    while (what == CTL_PAUSE && j->state == COW_JOB_RUNNING && j->pause_req)
      pthread_cond_wait (&d->job_cond, &d->job_lock);
  }
  pthread_mutex_unlock (&d->job_lock);
  return r;
}

int cow_disk_job_pause (struct cow_disk *d) { return control (d, CTL_PAUSE, 0); }
int cow_disk_job_resume (struct cow_disk *d) { return control (d, CTL_RESUME, 0); }
int cow_disk_job_cancel (struct cow_disk *d) { return control (d, CTL_CANCEL, 0); }

int
cow_disk_job_set_speed (struct cow_disk *d, uint64_t speed)
{
  return control (d, CTL_SPEED, speed);
}

int
cow_disk_job_wait (struct cow_disk *d)
{
  struct cow_job *j;
  int r = 0;

  pthread_mutex_lock (&d->job_lock);
  for (;;) {
    j = d->job;
    if (j == NULL || (j->state != COW_JOB_RUNNING
                      && j->state != COW_JOB_PAUSED))
      break;
    pthread_cond_wait (&d->job_cond, &d->job_lock);
  }
  if (j && j->state != COW_JOB_COMPLETED) {
    cow_error_set (j->err ? j->err : EIO, "%s job failed: %s",
                   cow_job_kind_name (j->kind), j->msg ? j->msg : "unknown");
    r = -1;
  }
  pthread_mutex_unlock (&d->job_lock);
  return r;
}

void
cow_disk_set_max_depth (struct cow_disk *d, unsigned n)
{
  ADMIN_LOCK_FOR_SCOPE (d);
  d->max_depth = n;
  job_check_depth (d);
}

void
job_disk_init (struct cow_disk *d)
{
  pthread_mutex_init (&d->job_lock, NULL);
  pthread_cond_init (&d->job_cond, NULL);
  for (size_t i = 0; i < MIRROR_STRIPES; i++)
    pthread_mutex_init (&d->mirror_stripe[i], NULL);
}

void
job_disk_stop (struct cow_disk *d)
{
  pthread_mutex_lock (&d->job_lock);
  if (d->job)
    d->job->cancel_req = true;
  pthread_cond_broadcast (&d->job_cond);
  pthread_mutex_unlock (&d->job_lock);
  if (d->job_thread_joinable) {
    pthread_join (d->job_thread, NULL);
    d->job_thread_joinable = false;
  }
}

void
job_disk_destroy (struct cow_disk *d)
{
  free_job (d->job);
  d->job = NULL;
  free (d->dirty_map);
  for (size_t i = 0; i < MIRROR_STRIPES; i++)
    pthread_mutex_destroy (&d->mirror_stripe[i]);
  pthread_mutex_destroy (&d->job_lock);
  pthread_cond_destroy (&d->job_cond);
}
