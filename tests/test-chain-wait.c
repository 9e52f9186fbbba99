/* SPDX-License-Identifier: BSD-3-Clause */
/* Bounded waits of chain changes (cow/chain-wait.c, DESIGN.md invariant
 * 10), without a network: the I/O seam holds a guest read of the base
 * inside its pread (as a stuck remote base would) until the test lets it
 * go.  With that read holding the chain lock shared:
 *   - a snapshot fails with ETIMEDOUT after the drain bound, naming the
 *     disk, and changes nothing (one layer, one file);
 *   - meanwhile reads and writes of the overlay and FLUSH go on, each
 *     answered well within the bound (the disk is not frozen);
 *   - a snapshot whose read ends within the bound succeeds;
 *   - a revert fails the same way, changing nothing;
 *   - snapshot-atomic of two disks, one of them held, fails on both and
 *     does not freeze the other disk; once released, it succeeds on both;
 *   - a delete whose name drop cannot drain fails to start, and the disk
 *     is degraded until FLUSH writes the name back;
 *   - a job's final switch after its manifest was saved fails the job and
 *     degrades the disk, which the next FLUSH repairs (old chain, same
 *     data, also after a reopen).
 * And the canonical lock order of several disks (cow/chain.h), with no
 * read held:
 *   - two threads snapshot-grouping the same two disks in opposite
 *     orders, many times, do not deadlock;
 *   - the same disk given twice is refused (EINVAL) with nothing changed
 *     and nothing left locked.
 */
#undef NDEBUG
#include <config.h>

#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>

#include "cowchain.h"
#include "error.h"
#include "io.h"
#include "faultio.h"
#include "testutil.h"

#define MIB (1u << 20)
#define SIZE (16 * MIB)
#define HOLD_OFFSET (12 * MIB)  /* a base read here is held */
#define DRAIN_MS 3000u
/* Far below DRAIN_MS: a frozen disk would wait about that long. */
#define MAX_LATENCY 1.5

/* The hold: while armed, a pread covering HOLD_OFFSET waits for
 * release. */
static pthread_mutex_t hold_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t hold_cond = PTHREAD_COND_INITIALIZER;
static bool hold_armed;
static unsigned hold_in;

static struct io_ops ops;

static ssize_t
holding_pread (int fd, void *buf, size_t count, off_t offset)
{
  if (offset <= HOLD_OFFSET && HOLD_OFFSET < offset + (off_t) count) {
    pthread_mutex_lock (&hold_lock);
    if (hold_armed) {
      hold_in++;
      pthread_cond_broadcast (&hold_cond);
      while (hold_armed)
        pthread_cond_wait (&hold_cond, &hold_lock);
      hold_in--;
    }
    pthread_mutex_unlock (&hold_lock);
  }
  return io_real_ops.pread (fd, buf, count, offset);
}

static int
group_setup (void **state)
{
  (void) state;
  ops = *fio_quick_ops ();
  ops.pread = holding_pread;
  io_set_ops (&ops);
  return 0;
}

static int
group_teardown (void **state)
{
  (void) state;
  io_set_ops (NULL);
  return 0;
}

/*----------------------------------------------------------------------
 * A state-directory disk over a raw base of random data, 64K of which
 * (at 0) the overlay holds. */

struct fx {
  char *dir, *base, *st;
  uint8_t *data;
  struct cow_disk *d;
};

static void
fx_init (struct fx *f, const char *tag, uint64_t seed)
{
  struct cow_disk_config cfg = { .base_format = "raw",
                                 .drain_timeout_ms = DRAIN_MS };
  uint8_t w[65536];

  memset (f, 0, sizeof *f);
  f->dir = tu_mkdtemp (tag);
  f->base = tu_path (f->dir, "base.raw");
  f->st = tu_path (f->dir, "st");
  f->data = malloc (SIZE);
  assert_non_null (f->data);
  tu_fill_random (f->data, SIZE, &seed);
  tu_write_file (f->base, f->data, SIZE);
  cfg.base = f->base;
  cfg.state_dir = f->st;
  f->d = cow_disk_open (&cfg);
  if (f->d == NULL)
    print_error ("open %s: %s\n", f->st, cow_last_error ());
  assert_non_null (f->d);
  memset (w, 0x5a, sizeof w);
  assert_int_equal (cow_disk_pwrite (f->d, w, sizeof w, 0, 0), 0);
  memcpy (f->data, w, sizeof w);
  assert_int_equal (cow_disk_flush (f->d), 0);
}

static void
fx_fini (struct fx *f)
{
  assert_int_equal (cow_disk_close (f->d), 0);
  tu_rmtree (f->dir);
  free (f->dir);
  free (f->base);
  free (f->st);
  free (f->data);
}

static size_t
n_layers (struct fx *f)
{
  struct cow_layer_info *v;
  size_t n;

  assert_int_equal (cow_disk_layers (f->d, &v, &n), 0);
  cow_layer_info_free (v, n);
  return n;
}

static size_t
n_layer_files (struct fx *f)
{
  DIR *dir = opendir (f->st);
  struct dirent *e;
  size_t n = 0;

  assert_non_null (dir);
  while ((e = readdir (dir)) != NULL) {
    size_t len = strlen (e->d_name);
    if (len > 6 && strcmp (e->d_name + len - 6, ".qcow2") == 0)
      n++;
  }
  closedir (dir);
  return n;
}

/*----------------------------------------------------------------------
 * The held read, and a chain change on a thread of its own. */

struct held_read {
  struct fx *f;
  pthread_t t;
  int r;
  uint8_t buf[4096];
};

static void *
held_read_run (void *arg)
{
  struct held_read *h = arg;

  h->r = cow_disk_pread (h->f->d, h->buf, sizeof h->buf, HOLD_OFFSET);
  cow_error_clear ();
  return NULL;
}

/* Arm the hold and start a read of the base that it catches. */
static void
hold_start (struct held_read *h, struct fx *f)
{
  h->f = f;
  pthread_mutex_lock (&hold_lock);
  hold_armed = true;
  pthread_mutex_unlock (&hold_lock);
  assert_int_equal (pthread_create (&h->t, NULL, held_read_run, h), 0);
  pthread_mutex_lock (&hold_lock);
  while (hold_in == 0)
    pthread_cond_wait (&hold_cond, &hold_lock);
  pthread_mutex_unlock (&hold_lock);
}

static void
hold_release (struct held_read *h)
{
  pthread_mutex_lock (&hold_lock);
  hold_armed = false;
  pthread_cond_broadcast (&hold_cond);
  pthread_mutex_unlock (&hold_lock);
  pthread_join (h->t, NULL);
  assert_int_equal (h->r, 0);
  assert_memory_equal (h->buf, h->f->data + HOLD_OFFSET, sizeof h->buf);
}

enum change_kind { SNAPSHOT, REVERT, DELETE };

struct change {
  enum change_kind kind;
  struct cow_disk *disks[2];
  size_t n;
  const char *name;
  pthread_t t;
  bool done;                    /* atomic */
  int r, err;
  char *msg;
  double secs;
};

static void *
change_run (void *arg)
{
  struct change *c = arg;
  double t0 = tu_now_s ();

  c->r = c->kind == SNAPSHOT
    ? cow_disk_snapshot_group (c->disks, c->n, c->name, NULL)
    : c->kind == REVERT ? cow_disk_revert (c->disks[0], c->name, true)
    : cow_disk_delete (c->disks[0], c->name, NULL);
  c->secs = tu_now_s () - t0;
  if (c->r == -1) {
    c->err = cow_last_errno ();
    c->msg = strdup (cow_last_error ());
  }
  cow_error_clear ();
  __atomic_store_n (&c->done, true, __ATOMIC_RELEASE);
  return NULL;
}

static void
change_start (struct change *c)
{
  assert_int_equal (pthread_create (&c->t, NULL, change_run, c), 0);
}

/* Guest I/O on f's overlay (and FLUSH) until c is done: the worst
 * latency of any request, and how many rounds ran. */
static double
io_until_done (struct fx *f, struct change *c, unsigned *rounds)
{
  double worst = 0;
  uint8_t buf[65536];

  *rounds = 0;
  while (!__atomic_load_n (&c->done, __ATOMIC_ACQUIRE)) {
    double t = tu_now_s ();
    memset (buf, (int) (*rounds & 255), 4096);
    assert_int_equal (cow_disk_pwrite (f->d, buf, 4096, 8192, 0), 0);
    memcpy (f->data + 8192, buf, 4096);
    assert_int_equal (cow_disk_pread (f->d, buf, sizeof buf, 0), 0);
    assert_memory_equal (buf, f->data, sizeof buf);
    if (*rounds % 8 == 0)
      assert_int_equal (cow_disk_flush (f->d), 0);
    t = tu_now_s () - t;
    if (t > worst)
      worst = t;
    ++*rounds;
    usleep (2000);
  }
  pthread_join (c->t, NULL);
  return worst;
}

static void
expect_drain_failure (struct change *c, const char *disk)
{
  char want[64];

  if (c->r == 0)
    fail_msg ("the change succeeded behind a held read");
  assert_int_equal (c->err, ETIMEDOUT);
  snprintf (want, sizeof want, "did not drain within %g s",
            DRAIN_MS / 1000.0);
  if (strstr (c->msg, want) == NULL || strstr (c->msg, disk) == NULL)
    fail_msg ("message '%s' lacks '%s' or '%s'", c->msg, want, disk);
  if (c->secs < DRAIN_MS / 1000.0 * 0.9 || c->secs > DRAIN_MS / 1000.0 + 2)
    fail_msg ("the change failed after %.2f s, bound %u ms", c->secs,
              DRAIN_MS);
  free (c->msg);
  c->msg = NULL;
}

static void
expect_live (double worst, unsigned rounds)
{
  if (worst > MAX_LATENCY || rounds < 20)
    fail_msg ("guest I/O during the wait: worst %.3f s, %u rounds", worst,
              rounds);
}

/*----------------------------------------------------------------------
 * The tests. */

static void
test_snapshot_bounded (void **state)
{
  struct fx f;
  struct held_read h;
  struct change c = { .kind = SNAPSHOT, .n = 1, .name = "s1" };
  unsigned rounds;
  double worst;

  (void) state;
  fx_init (&f, "chain-wait-snap", 1);
  c.disks[0] = f.d;
  hold_start (&h, &f);
  change_start (&c);
  worst = io_until_done (&f, &c, &rounds);
  hold_release (&h);            /* first: a failure below leaves no thread */
  expect_drain_failure (&c, f.st);
  expect_live (worst, rounds);
  assert_int_equal (n_layers (&f), 1);
  assert_int_equal (n_layer_files (&f), 1);

  /* Nothing held: at once. */
  assert_int_equal (cow_disk_snapshot (f.d, "s1", NULL), 0);
  assert_int_equal (n_layers (&f), 2);
  fx_fini (&f);
}

static void
test_snapshot_waits_for_short_read (void **state)
{
  struct fx f;
  struct held_read h;
  struct change c = { .kind = SNAPSHOT, .n = 1, .name = "s1" };

  (void) state;
  fx_init (&f, "chain-wait-short", 2);
  c.disks[0] = f.d;
  hold_start (&h, &f);
  change_start (&c);
  usleep (300 * 1000);
  hold_release (&h);
  pthread_join (c.t, NULL);
  if (c.r != 0)
    fail_msg ("snapshot: %s", c.msg);
  if (c.secs < 0.25 || c.secs > DRAIN_MS / 1000.0)
    fail_msg ("the snapshot took %.2f s", c.secs);
  assert_int_equal (n_layers (&f), 2);
  assert_int_equal (n_layer_files (&f), 2);
  fx_fini (&f);
}

static void
test_revert_bounded (void **state)
{
  struct fx f;
  struct held_read h;
  struct change c = { .kind = REVERT, .n = 1, .name = "s1" };
  uint8_t w[65536], buf[65536];
  unsigned rounds;
  double worst;

  (void) state;
  fx_init (&f, "chain-wait-revert", 3);
  c.disks[0] = f.d;
  assert_int_equal (cow_disk_snapshot (f.d, "s1", NULL), 0);
  memset (w, 0xa5, sizeof w);
  assert_int_equal (cow_disk_pwrite (f.d, w, sizeof w, 4 * MIB, 0), 0);
  hold_start (&h, &f);
  change_start (&c);
  worst = io_until_done (&f, &c, &rounds);
  hold_release (&h);
  expect_drain_failure (&c, f.st);
  expect_live (worst, rounds);
  /* Still the chain after s1: the write after it is there. */
  assert_int_equal (n_layers (&f), 2);
  assert_int_equal (n_layer_files (&f), 2);
  assert_int_equal (cow_disk_pread (f.d, buf, sizeof buf, 4 * MIB), 0);
  assert_memory_equal (buf, w, sizeof w);
  fx_fini (&f);
}

static void
test_group_all_or_nothing (void **state)
{
  struct fx a, b;
  struct held_read h;
  struct change c = { .kind = SNAPSHOT, .n = 2, .name = "g1" };
  unsigned rounds;
  double worst;

  (void) state;
  fx_init (&a, "chain-wait-ga", 4);
  fx_init (&b, "chain-wait-gb", 5);
  c.disks[0] = a.d;
  c.disks[1] = b.d;
  hold_start (&h, &b);
  change_start (&c);
  /* The disk that is not held is not frozen by the other one's wait. */
  worst = io_until_done (&a, &c, &rounds);
  hold_release (&h);
  expect_drain_failure (&c, b.st);
  expect_live (worst, rounds);
  assert_int_equal (n_layers (&a), 1);
  assert_int_equal (n_layers (&b), 1);
  assert_int_equal (n_layer_files (&a), 1);
  assert_int_equal (n_layer_files (&b), 1);

  assert_int_equal (cow_disk_snapshot_group (c.disks, 2, "g1", NULL), 0);
  assert_int_equal (n_layers (&a), 2);
  assert_int_equal (n_layers (&b), 2);
  fx_fini (&a);
  fx_fini (&b);
}

/* A delete drops the snapshot's name (saved, then installed) before its
 * job starts: if the install cannot drain, the start fails, the disk is
 * degraded until FLUSH writes the name back, and the name stays. */
static void
test_delete_start_bounded (void **state)
{
  struct fx f;
  struct held_read h;
  struct change c = { .kind = DELETE, .n = 1, .name = "s1" };
  struct cow_layer_info *v;
  char *why = NULL;
  unsigned rounds;
  double worst;
  size_t n;

  (void) state;
  fx_init (&f, "chain-wait-delete", 7);
  c.disks[0] = f.d;
  assert_int_equal (cow_disk_snapshot (f.d, "s1", NULL), 0);
  hold_start (&h, &f);
  change_start (&c);
  /* (Whether the disk is degraded now depends on whether a FLUSH of
   * the loop came after the failure: test_job_switch_bounded checks it.) */
  worst = io_until_done (&f, &c, &rounds);
  hold_release (&h);
  expect_drain_failure (&c, f.st);
  expect_live (worst, rounds);
  assert_int_equal (cow_disk_flush (f.d), 0);
  assert_int_equal (cow_disk_health (f.d, &why), 0);
  assert_int_equal (cow_disk_layers (f.d, &v, &n), 0);
  assert_int_equal (n, 2);
  assert_non_null (v[0].snapshot);
  assert_string_equal (v[0].snapshot, "s1");
  cow_layer_info_free (v, n);
  fx_fini (&f);
}

/* A job's final switch after its manifest was saved: it cannot undo the
 * save, so a switch that does not drain fails the job and leaves the disk
 * degraded, still serving the old chain; the next FLUSH writes the old
 * manifest back, and a reopen finds the same disk. */
static void
test_job_switch_bounded (void **state)
{
  struct fx f;
  struct held_read h;
  struct cow_job_opts o = { .force = true };
  struct cow_job_info ji;
  struct cow_disk_config cfg = { .drain_timeout_ms = DRAIN_MS };
  uint8_t w[65536], *all;
  char *why = NULL;
  double t0;

  (void) state;
  fx_init (&f, "chain-wait-job", 6);
  assert_int_equal (cow_disk_snapshot (f.d, "s1", NULL), 0);
  memset (w, 0x3c, sizeof w);
  assert_int_equal (cow_disk_pwrite (f.d, w, sizeof w, 2 * MIB, 0), 0);
  memcpy (f.data + 2 * MIB, w, sizeof w);
  setenv ("COWCHAIN_JOB_STOP_AT", "before-switch", 1);
  assert_int_equal (cow_disk_delete (f.d, "s1", &o), 0);
  for (t0 = tu_now_s (); ; usleep (10000)) {
    assert_int_equal (cow_disk_job_info (f.d, &ji), 0);
    if (ji.state == COW_JOB_PAUSED)
      break;
    if (ji.state != COW_JOB_RUNNING || tu_now_s () - t0 > 30)
      fail_msg ("the job did not stop before its switch (state %d)",
                (int) ji.state);
    cow_job_info_clear (&ji);
  }
  cow_job_info_clear (&ji);
  hold_start (&h, &f);
  t0 = tu_now_s ();
  assert_int_equal (cow_disk_job_resume (f.d), 0);
  assert_int_equal (cow_disk_job_wait (f.d), -1);
  t0 = tu_now_s () - t0;
  unsetenv ("COWCHAIN_JOB_STOP_AT");
  assert_int_equal (cow_last_errno (), ETIMEDOUT);
  if (strstr (cow_last_error (), "did not drain") == NULL)
    fail_msg ("job error: %s", cow_last_error ());
  if (t0 < DRAIN_MS / 1000.0 * 0.9 || t0 > DRAIN_MS / 1000.0 + 2)
    fail_msg ("the job failed after %.2f s", t0);
  assert_int_not_equal (cow_disk_health (f.d, &why), 0);
  free (why);
  hold_release (&h);
  assert_int_equal (cow_disk_flush (f.d), 0);
  assert_int_equal (cow_disk_health (f.d, &why), 0);
  assert_int_equal (n_layers (&f), 2);
  assert_int_equal (n_layer_files (&f), 2);

  all = malloc (SIZE);
  assert_non_null (all);
  assert_int_equal (cow_disk_pread (f.d, all, SIZE, 0), 0);
  assert_memory_equal (all, f.data, SIZE);
  assert_int_equal (cow_disk_close (f.d), 0);
  cfg.state_dir = f.st;
  f.d = cow_disk_open (&cfg);
  if (f.d == NULL)
    fail_msg ("reopen: %s", cow_last_error ());
  assert_int_equal (n_layers (&f), 2);
  assert_int_equal (cow_disk_pread (f.d, all, SIZE, 0), 0);
  assert_memory_equal (all, f.data, SIZE);
  free (all);
  fx_fini (&f);
}

/* Two threads snapshot the same two disks, each in its own order. */
#define GROUP_ROUNDS 20
#define GROUP_TIMEOUT_S 120

struct grouper {
  struct cow_disk *disks[2];
  char tag;
  pthread_t t;
  bool done;                    /* atomic */
  int r;
  char *msg;
};

static void *
grouper_run (void *arg)
{
  struct grouper *g = arg;

  for (int i = 0; i < GROUP_ROUNDS && g->r == 0; i++) {
    char name[16];
    snprintf (name, sizeof name, "%c%d", g->tag, i);
    g->r = cow_disk_snapshot_group (g->disks, 2, name, NULL);
    if (g->r == -1)
      g->msg = strdup (cow_last_error ());
  }
  cow_error_clear ();
  __atomic_store_n (&g->done, true, __ATOMIC_RELEASE);
  return NULL;
}

static void
test_group_opposite_orders (void **state)
{
  struct fx a, b;
  struct grouper g[2] = {
    { .tag = 'x' }, { .tag = 'y' },
  };
  double t0;

  (void) state;
  fx_init (&a, "chain-wait-oa", 8);
  fx_init (&b, "chain-wait-ob", 9);
  g[0].disks[0] = g[1].disks[1] = a.d;
  g[0].disks[1] = g[1].disks[0] = b.d;
  for (int i = 0; i < 2; i++)
    assert_int_equal (pthread_create (&g[i].t, NULL, grouper_run, &g[i]), 0);
  for (t0 = tu_now_s ();
       !__atomic_load_n (&g[0].done, __ATOMIC_ACQUIRE)
         || !__atomic_load_n (&g[1].done, __ATOMIC_ACQUIRE);
       usleep (10000))
    if (tu_now_s () - t0 > GROUP_TIMEOUT_S) {
      /* Deadlocked threads cannot be joined: stop here. */
      print_error ("snapshot-atomic in opposite orders: no progress after "
                   "%d s (deadlock)\n", GROUP_TIMEOUT_S);
      abort ();
    }
  for (int i = 0; i < 2; i++) {
    pthread_join (g[i].t, NULL);
    if (g[i].r != 0)
      fail_msg ("snapshot-atomic (%c): %s", g[i].tag, g[i].msg);
  }
  assert_int_equal (n_layers (&a), 1 + 2 * GROUP_ROUNDS);
  assert_int_equal (n_layers (&b), 1 + 2 * GROUP_ROUNDS);
  assert_int_equal (n_layer_files (&a), 1 + 2 * GROUP_ROUNDS);
  assert_int_equal (n_layer_files (&b), 1 + 2 * GROUP_ROUNDS);
  fx_fini (&a);
  fx_fini (&b);
}

/* The same disk twice: refused before anything is locked or created. */
static void
test_group_same_disk_twice (void **state)
{
  struct fx a, b;
  struct cow_disk *twice[2], *three[3];

  (void) state;
  fx_init (&a, "chain-wait-twice-a", 10);
  fx_init (&b, "chain-wait-twice-b", 11);
  twice[0] = twice[1] = a.d;
  three[0] = a.d;
  three[1] = b.d;
  three[2] = a.d;
  assert_int_equal (cow_disk_snapshot_group (twice, 2, "t1", NULL), -1);
  assert_int_equal (cow_last_errno (), EINVAL);
  if (strstr (cow_last_error (), "given twice") == NULL
      || strstr (cow_last_error (), a.st) == NULL)
    fail_msg ("message '%s' lacks 'given twice' or '%s'", cow_last_error (),
              a.st);
  assert_int_equal (cow_disk_snapshot_group (three, 3, "t1", NULL), -1);
  assert_int_equal (cow_last_errno (), EINVAL);
  assert_non_null (strstr (cow_last_error (), "given twice"));
  cow_error_clear ();
  assert_int_equal (n_layers (&a), 1);
  assert_int_equal (n_layers (&b), 1);
  assert_int_equal (n_layer_files (&a), 1);
  assert_int_equal (n_layer_files (&b), 1);

  /* Nothing was left locked: the same snapshot of each disk once goes
   * through at once. */
  assert_int_equal (cow_disk_snapshot_group (three, 2, "t1", NULL), 0);
  assert_int_equal (n_layers (&a), 2);
  assert_int_equal (n_layers (&b), 2);
  fx_fini (&a);
  fx_fini (&b);
}

int
main (void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test (test_snapshot_bounded),
    cmocka_unit_test (test_snapshot_waits_for_short_read),
    cmocka_unit_test (test_revert_bounded),
    cmocka_unit_test (test_group_all_or_nothing),
    cmocka_unit_test (test_delete_start_bounded),
    cmocka_unit_test (test_job_switch_bounded),
    cmocka_unit_test (test_group_opposite_orders),
    cmocka_unit_test (test_group_same_disk_twice),
  };

  return cmocka_run_group_tests (tests, group_setup, group_teardown);
}
