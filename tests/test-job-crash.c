/* SPDX-License-Identifier: BSD-3-Clause */
/* kill -9 at every step of a background merge (DESIGN.md invariant 4),
 * and write errors that are not a crash.
 *
 * Kill: as in test-freeze-crash.c, every write-side operation through
 * the I/O seam after the Nth fails, which is what a killed process
 * leaves (fsync counts as a step but does nothing: the page cache
 * survives a kill).  For each N the state directory is reopened: the
 * disk reads as before the job; the chain is the old one (same files)
 * or the new one, never a mix; a job reported complete is there; every
 * layer passes qemu-img check (leaks allowed); no file is left that the
 * chain does not name.  When the old chain is there, the same job is
 * started again and must complete.  Then every snapshot left, read
 * offline by qemu-img, is the disk as it was when it was taken.
 *
 * Errors: writes to the frozen layers (the merge target) fail with
 * ENOSPC or EIO while the job runs: the job ends FAILED with that errno,
 * the guest keeps reading and writing, and once the writes work again
 * the job can be started again and completes. */
#undef NDEBUG
#include <config.h>

#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
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
#include "io.h"
#include "faultio.h"
#include "model.h"
#include "testutil.h"

#define SIZE (3u << 20)
/* Kill at every step when a job has at most this many; otherwise at
 * every step of the last END_WINDOW (the final switch) and at evenly
 * spread steps before it, to keep the run short. */
#define MAX_KILLS 90
#define END_WINDOW 40

/*----------------------------------------------------------------------
 * The kill is faultio's fio_arm_kill (only one thread does I/O while it
 * is armed: the job's). */

static uint32_t cs;             /* cluster size of the current scenario */
static uint64_t cache_bytes;    /* metadata cache of each layer; 0: default */

/*----------------------------------------------------------------------
 * Write errors on chosen files: while armed (fail_writes), writes to the
 * files of fail_dir other than the exceptions fail with it. */

static char fail_dir[PATH_MAX];
static char fail_except[PATH_MAX];      /* the active layer */

static bool
should_fail (unsigned op, const char *p, const char *p2, int fd)
{
  char path[PATH_MAX];
  const char *name;
  size_t dl = strlen (fail_dir);

  if (!tu_fd_path (fd, path, sizeof path))
    return false;
  if (strncmp (path, fail_dir, dl) != 0 || path[dl] != '/')
    return false;
  name = path + dl + 1;
  if (strcmp (path, fail_except) == 0
      || strcmp (name, "manifest") == 0 || strstr (name, "manifest.tmp"))
    return false;
  return true;
}

/* Arm the write errors. */
static void
fail_writes (int err)
{
  fio_arm (&(struct fio_fault) {
      .at = 0, .err = err, .filter = should_fail,
      .ops = FIO_PWRITE | FIO_FTRUNCATE | FIO_FALLOCATE });
}

/*----------------------------------------------------------------------
 * A disk, its model, and its chain. */

struct fx {
  char *dir, *base, *st, *scratch;
  uint8_t *base_data;
  struct tu_model m;            /* and a copy per snapshot s1..sN */
};

static bool
chain_same_files (const struct tu_chain *a, const struct tu_chain *b)
{
  if (a->n != b->n)
    return false;
  for (size_t i = 0; i < a->n; i++)
    if (strcmp (a->file[i], b->file[i]) != 0)
      return false;
  return true;
}

static struct cow_disk *
open_state (const char *st, const char *base)
{
  struct cow_disk_config cfg = { .state_dir = st, .base = base,
                                 .base_format = base ? "raw" : NULL,
                                 .cluster_size = cs,
                                 .subclusters = tu_subclusters (),
                                 .cache_size = cache_bytes };
  struct cow_disk *d = cow_disk_open (&cfg);

  if (d == NULL)
    print_error ("open %s: %s\n", st, cow_last_error ());
  assert_non_null (d);
  assert_int_equal (cow_disk_size (d), SIZE);
  return d;
}

static void
fx_init (struct fx *f, const char *tag, uint64_t seed)
{
  memset (f, 0, sizeof *f);
  f->dir = tu_mkdtemp (tag);
  f->base = tu_path (f->dir, "base.raw");
  f->st = tu_path (f->dir, "st");
  f->scratch = tu_path (f->dir, "scratch.raw");
  f->base_data = malloc (SIZE);
  assert_non_null (f->base_data);
  tu_model_init (&f->m, SIZE, cs, seed);
  tu_fill_random (f->base_data, SIZE, &f->m.seed);
  memset (f->base_data + SIZE / 3, 0, 65536 + 511);
}

static void
fx_fini (struct fx *f)
{
  tu_rmtree (f->dir);
  free (f->dir);
  free (f->base);
  free (f->st);
  free (f->scratch);
  free (f->base_data);
  tu_model_fini (&f->m);
}

static void
disk_write (struct cow_disk *d, struct fx *f, uint64_t off, uint32_t len)
{
  tu_model_write (&f->m, d, off, len, 0);
}

/* A few hundred KiB: writes, a zeroed cluster over older data, a
 * partial zero, a trimmed cluster. */
static void
workload (struct cow_disk *d, struct fx *f, int writes)
{
  uint64_t off;

  for (int i = 0; i < writes; i++) {
    uint32_t len = (uint32_t) (1 + tu_rand_below (&f->m.seed, 96 * 1024));
    disk_write (d, f, tu_rand_below (&f->m.seed, SIZE - len + 1), len);
  }
  off = tu_rand_below (&f->m.seed, SIZE / cs) * cs;
  tu_model_zero (&f->m, d, off, cs, COW_FLAG_MAY_TRIM);
  off = tu_rand_below (&f->m.seed, SIZE - 5000);
  tu_model_zero (&f->m, d, off, 5000, 0);
  off = tu_rand_below (&f->m.seed, SIZE / cs) * cs;
  tu_model_trim (&f->m, d, off, cs, 0);
}

static void
snapshot (struct cow_disk *d, struct fx *f, int i)
{
  char name[16];

  snprintf (name, sizeof name, "s%d", i);
  tu_model_snapshot (&f->m, d, name, NULL);
}

static struct tu_model_snap *
fx_snap (struct fx *f, const char *name)
{
  return tu_model_snap (&f->m, name);
}

/* A fresh state directory over a fresh base: 'layers' snapshots s1..sN,
 * each with its own writes, and writes in the active layer; flushed. */
static struct cow_disk *
fx_prepare (struct fx *f, int layers, uint64_t seed, int writes)
{
  struct cow_disk *d;

  tu_rmtree (f->st);
  tu_write_file (f->base, f->base_data, SIZE);
  memcpy (f->m.data, f->base_data, SIZE);
  f->m.seed = seed;
  f->m.cs = cs;
  tu_model_forget_all (&f->m);
  d = open_state (f->st, f->base);
  for (int i = 1; i <= layers; i++) {
    workload (d, f, writes);
    snapshot (d, f, i);
  }
  workload (d, f, writes);
  assert_int_equal (cow_disk_flush (d), 0);
  return d;
}

static void
verify (struct cow_disk *d, struct fx *f, const char *what)
{
  tu_model_verify (&f->m, d, what);
}

/* Most files are the same from one kill to the next (the setup is the
 * same each time), so a check that passed on some contents is not run
 * again on the same contents: 'passed' holds hashes of what passed. */
static struct tu_hashset passed;
static unsigned long qemu_runs;         /* qemu-img check and convert */

/* qemu-img check of a layer, leaks allowed.  Returns the hash of the
 * file. */
static uint64_t
check_layer (const char *path)
{
  uint64_t h = tu_hash_file (path, 0xcbf29ce484222325ull);

  if (!tu_hashset_has (&passed, h)) {
    tu_assert_check_no_corruption (path);
    qemu_runs++;
    tu_hashset_add (&passed, h);
  }
  return h;
}

/* Every layer passes qemu-img check (leaks allowed); nothing in the
 * state directory but the lock, the manifest and the chain's files (and
 * the manifest's temporary file, which a kill in manifest_save leaves
 * and the next save overwrites, as after a killed snapshot). */
static void
check_dir (struct cow_disk *d, const char *st, const char *what)
{
  struct tu_chain c;
  DIR *dir;
  struct dirent *e;
  int strays = 0;

  tu_chain_get (d, &c);
  for (size_t i = 0; i < c.n; i++)
    check_layer (c.path[i]);
  dir = opendir (st);
  assert_non_null (dir);
  while ((e = readdir (dir)) != NULL) {
    bool known = strcmp (e->d_name, ".") == 0 || strcmp (e->d_name, "..") == 0
      || strcmp (e->d_name, "lock") == 0
      || strcmp (e->d_name, "manifest") == 0
      || strcmp (e->d_name, ".manifest.tmp") == 0;
    for (size_t i = 0; i < c.n; i++)
      if (strcmp (e->d_name, c.file[i]) == 0)
        known = true;
    if (!known) {
      print_error ("%s: %s/%s is not named by the chain\n", what, st,
                   e->d_name);
      strays++;
    }
  }
  closedir (dir);
  if (strays)
    tu_chain_print (&c, "  chain");
  tu_chain_free (&c);
  assert_int_equal (strays, 0);
}

/* qemu-img convert of a layer (with its backing chain) equals data. */
static void expect_layer_content (struct fx *f, const char *path,
                                  const uint8_t *data, const char *what);

/* Each snapshot of the chain, read offline (qemu-img convert of its
 * layer and the layers and base under it), is the disk at the snapshot;
 * and each layer passes qemu-img check. */
static void
check_snapshots (struct fx *f, const struct tu_chain *c, const char *what)
{
  uint64_t h = tu_hash_file (f->base, 0x84222325cbf29ce4ull);

  for (size_t i = 0; i < c->n; i++) {
    h = (h ^ check_layer (c->path[i])) * 0x100000001b3ull;
    if (c->snapshot[i] == NULL || tu_hashset_has (&passed, h))
      continue;
    expect_layer_content (f, c->path[i], fx_snap (f, c->snapshot[i])->data,
                          what);
    qemu_runs++;
    tu_hashset_add (&passed, h);
  }
}

static void
expect_layer_content (struct fx *f, const char *path, const uint8_t *data,
                      const char *what)
{
  char *out = NULL;
  int st;
  size_t n;
  uint8_t *got;

  unlink (f->scratch);
  st = tu_run (&out, "qemu-img convert -U -f qcow2 -O raw '%s' '%s'", path,
               f->scratch);
  if (st != 0)
    print_error ("qemu-img convert %s: %s\n", path, out);
  free (out);
  assert_int_equal (st, 0);
  got = tu_read_file (f->scratch, &n);
  assert_int_equal (n, SIZE);
  tu_assert_bytes_equal (got, data, SIZE, 0, what);
  free (got);
  unlink (f->scratch);
}

/*----------------------------------------------------------------------
 * Scenarios. */

struct scenario {
  const char *tag;
  uint32_t cs;                  /* cluster size; 0: 64 KiB */
  int layers;                   /* snapshots s1..sN under the active layer */
  const char *top;              /* commit: its top */
  const char *base;             /* commit or pull: its base (NULL: default) */
  const char *del;              /* delete: the name */
  /* A name that goes when the job starts (delete's; a commit's base's):
   * the old chain may lack it. */
  const char *dropped;
  bool base_write;
  int removed[3];               /* indexes the new chain lacks; -1 ends */
  const char *lost[3];          /* names the new chain lacks */
};

static const struct scenario scenarios[] = {
  { .tag = "commit-frozen", .layers = 3, .top = "s3", .base = "s2",
    .dropped = "s2", .removed = { 2, -1 }, .lost = { "s2" } },
  { .tag = "commit-active", .layers = 2, .top = "active", .dropped = "s2",
    .removed = { 2, -1 }, .lost = { "s2" } },
  { .tag = "commit-base", .layers = 1, .top = "s1", .base = "base",
    .base_write = true, .removed = { 0, -1 }, .lost = { "s1" } },
  { .tag = "pull-all", .layers = 2,
    .removed = { 0, 1, -1 }, .lost = { "s1", "s2" } },
  { .tag = "pull-s1", .layers = 3, .base = "s1",
    .removed = { 1, 2, -1 }, .lost = { "s2", "s3" } },
  { .tag = "delete-middle", .layers = 3, .del = "s2", .dropped = "s2",
    .removed = { 1, -1 }, .lost = { "s2" } },
  { .tag = "delete-top", .layers = 3, .del = "s3", .dropped = "s3",
    .removed = { 2, -1 }, .lost = { "s3" } },
  { .tag = "commit-frozen-4k", .cs = 4096, .layers = 3, .top = "s3",
    .base = "s2", .dropped = "s2", .removed = { 2, -1 }, .lost = { "s2" } },
  { .tag = "pull-all-4k", .cs = 4096, .layers = 2,
    .removed = { 0, 1, -1 }, .lost = { "s1", "s2" } },
  { .tag = "delete-middle-4k", .cs = 4096, .layers = 3, .del = "s2",
    .dropped = "s2", .removed = { 1, -1 }, .lost = { "s2" } },
};

/* Start the scenario's job; 'alt' (if not NULL) names by its file the
 * layer whose dropped name the job's arguments use. */
static int
start_job (struct cow_disk *d, const struct scenario *sc, const char *alt)
{
  struct cow_job_opts o = { .top = sc->top, .base = sc->base, .force = true,
                            .allow_base_write = sc->base_write };

  if (sc->del)
    return cow_disk_delete (d, alt ? alt : sc->del, &o);
  if (alt)
    o.base = alt;
  if (sc->top)
    return cow_disk_commit (d, &o);
  return cow_disk_pull (d, &o);
}

/* When the chain c lacks the scenario's dropped name and the job's
 * arguments use it: the file name of that layer in the old chain. */
static const char *
alt_name (const struct scenario *sc, const struct tu_chain *c,
          const struct tu_chain *old)
{
  const char *arg = sc->del ? sc->del : sc->base;

  if (sc->dropped == NULL || tu_chain_find (c, sc->dropped) != -1
      || arg == NULL || strcmp (arg, sc->dropped) != 0)
    return NULL;
  return old->file[tu_chain_find (old, sc->dropped)];
}

static bool
is_lost (const struct scenario *sc, const char *name)
{
  for (size_t i = 0; i < 3 && sc->lost[i]; i++)
    if (strcmp (sc->lost[i], name) == 0)
      return true;
  return false;
}

static bool
is_removed (const struct scenario *sc, size_t idx)
{
  for (size_t i = 0; i < 3 && sc->removed[i] >= 0; i++)
    if ((size_t) sc->removed[i] == idx)
      return true;
  return false;
}

static size_t
n_removed (const struct scenario *sc)
{
  size_t n = 0;

  while (n < 3 && sc->removed[n] >= 0)
    n++;
  return n;
}

/* The new chain: the old one less the removed layers, with the names
 * of the old one less the lost ones (a commit's merged layer carries
 * its top's name, so every other name is still there). */
static void
expect_new_chain (struct cow_disk *d, const struct scenario *sc,
                  const struct tu_chain *old, const char *what)
{
  struct tu_chain c;
  size_t k = 0;
  bool ok;

  tu_chain_get (d, &c);
  ok = c.n + n_removed (sc) == old->n;
  for (size_t i = 0; ok && i < old->n; i++) {
    if (is_removed (sc, i))
      continue;
    ok = strcmp (c.file[k++], old->file[i]) == 0;
  }
  for (size_t i = 0; ok && i < old->n; i++)
    if (old->snapshot[i])
      ok = (tu_chain_find (&c, old->snapshot[i]) == -1)
        == is_lost (sc, old->snapshot[i]);
  for (size_t i = 0; ok && i < c.n; i++)
    ok = c.snapshot[i] == NULL || tu_chain_find (old, c.snapshot[i]) != -1;
  if (!ok) {
    print_error ("%s: not the chain the job should leave\n", what);
    tu_chain_print (old, "  old");
    tu_chain_print (&c, "  now");
  }
  tu_chain_free (&c);
  assert_true (ok);
}

/* The old chain: same files, same names (but the dropped name may be
 * gone: it is removed when the job starts). */
static void
expect_old_chain (const struct tu_chain *c, const struct scenario *sc,
                  const struct tu_chain *old, const char *what)
{
  bool ok = chain_same_files (c, old);

  for (size_t i = 0; ok && i < c->n; i++) {
    bool same = (c->snapshot[i] == NULL) == (old->snapshot[i] == NULL)
      && (c->snapshot[i] == NULL
          || strcmp (c->snapshot[i], old->snapshot[i]) == 0);
    if (!same)
      ok = sc->dropped && old->snapshot[i]
        && strcmp (old->snapshot[i], sc->dropped) == 0
        && c->snapshot[i] == NULL;
  }
  if (!ok) {
    print_error ("%s: neither the old chain nor the new one\n", what);
    tu_chain_print (old, "  old");
    tu_chain_print (c, "  now");
  }
  assert_true (ok);
}

static void
wait_ok (struct cow_disk *d, const char *what)
{
  struct cow_job_info i;
  int r = cow_disk_job_wait (d);

  if (r == -1)
    print_error ("%s: %s\n", what, cow_last_error ());
  assert_int_equal (r, 0);
  assert_int_equal (cow_disk_job_info (d, &i), 0);
  assert_int_equal (i.state, COW_JOB_COMPLETED);
  assert_int_equal (i.done, i.total);
  cow_job_info_clear (&i);
}

/* The write-side operations the job takes, start to end. */
static long
count_steps (struct fx *f, const struct scenario *sc, uint64_t seed)
{
  struct cow_disk *d = fx_prepare (f, sc->layers, seed, 8);
  long steps;
  int r;

  fio_arm_count ();
  r = start_job (d, sc, NULL);
  if (r == 0)
    r = cow_disk_job_wait (d);
  steps = fio_steps ();
  fio_disarm ();
  if (r == -1)
    print_error ("%s: %s\n", sc->tag, cow_last_error ());
  assert_int_equal (r, 0);
  assert_int_equal (cow_disk_close (d), 0);
  return steps;
}

static long
next_kill (long n, long steps)
{
  long stride, dense = steps - END_WINDOW;

  if (steps <= MAX_KILLS || n + 1 >= dense)
    return n + 1;
  stride = (dense + (MAX_KILLS - END_WINDOW) - 1) / (MAX_KILLS - END_WINDOW);
  return n + stride < dense ? n + stride : dense;
}

static void
kill_job_at_every_step (const struct scenario *sc, uint64_t seed)
{
  struct fx f;
  bool completed = false;
  long n, kills = 0, steps, reruns = 0;
  double t0 = tu_now_s ();

  cs = sc->cs ? sc->cs : 65536;
  fx_init (&f, sc->tag, seed);
  passed.n = 0;
  qemu_runs = 0;
  steps = count_steps (&f, sc, seed);
  for (n = 0; !completed; n = next_kill (n, steps)) {
    struct cow_disk *d;
    struct tu_chain old, now;
    char what[128];
    int r;

    snprintf (what, sizeof what, "%s killed after %ld of %ld steps", sc->tag,
              n, steps);
    d = fx_prepare (&f, sc->layers, seed, 8);
    tu_chain_get (d, &old);
    fio_arm_kill (n);
    r = start_job (d, sc, NULL);
    if (r == 0)
      r = cow_disk_job_wait (d);
    completed = fio_steps () < n;          /* never reached step n */
    cow_disk_close (d);                    /* the process dies here */
    fio_disarm ();
    kills++;
    if (completed && r == -1)
      print_error ("%s: the job failed without a kill: %s\n", what,
                   cow_last_error ());
    assert_true (!completed || r == 0);

    d = open_state (f.st, NULL);
    verify (d, &f, what);
    check_dir (d, f.st, what);
    tu_chain_get (d, &now);
    if (r == 0 || !chain_same_files (&now, &old))
      /* Reported complete, or switched: the new chain, whole. */
      expect_new_chain (d, sc, &old, what);
    else {
      /* The old chain: the job starts again and completes. */
      expect_old_chain (&now, sc, &old, what);
      r = start_job (d, sc, alt_name (sc, &now, &old));
      if (r == -1)
        print_error ("%s: starting again: %s\n", what, cow_last_error ());
      assert_int_equal (r, 0);
      wait_ok (d, what);
      verify (d, &f, what);
      expect_new_chain (d, sc, &old, what);
      reruns++;
    }
    tu_chain_free (&now);
    if (sc->base_write) {
      size_t len;
      uint8_t *raw = tu_read_file (f.base, &len);
      assert_int_equal (len, SIZE);
      tu_assert_bytes_equal (raw, fx_snap (&f, sc->top)->data, SIZE, 0,
                             "the base after a commit into it");
      free (raw);
    }
    tu_chain_get (d, &now);
    assert_int_equal (cow_disk_close (d), 0);
    check_snapshots (&f, &now, what);
    tu_chain_free (&now);
    tu_chain_free (&old);
  }
  print_message ("%s: %ld write steps, %ld kills, the old chain left (and "
                 "the job started again) %ld times, %lu qemu-img runs, "
                 "%.1f s\n", sc->tag, steps, kills, reruns, qemu_runs,
                 tu_now_s () - t0);
  fx_fini (&f);
}

static void
test_commit_frozen_killed (void **state)
{
  (void) state;
  kill_job_at_every_step (&scenarios[0], 1001);
}

static void
test_commit_active_killed (void **state)
{
  (void) state;
  kill_job_at_every_step (&scenarios[1], 1002);
}

static void
test_commit_base_killed (void **state)
{
  (void) state;
  kill_job_at_every_step (&scenarios[2], 1003);
}

static void
test_pull_all_killed (void **state)
{
  (void) state;
  kill_job_at_every_step (&scenarios[3], 1004);
}

static void
test_pull_s1_killed (void **state)
{
  (void) state;
  kill_job_at_every_step (&scenarios[4], 1005);
}

static void
test_delete_middle_killed (void **state)
{
  (void) state;
  kill_job_at_every_step (&scenarios[5], 1006);
}

static void
test_delete_top_killed (void **state)
{
  (void) state;
  kill_job_at_every_step (&scenarios[6], 1007);
}

/*----------------------------------------------------------------------
 * Write errors that are not a crash. */

/* Guest writes and checked reads while the job runs (or, if it has
 * already ended, a few of them anyway). */
static void
guest_io_during (struct cow_disk *d, struct fx *f, const char *what)
{
  double t0 = tu_now_s ();
  int rounds = 0, r;

  for (;;) {
    struct cow_job_info i;
    bool active;
    uint32_t len = (uint32_t) (1 + tu_rand_below (&f->m.seed, 64 * 1024));
    uint64_t off = tu_rand_below (&f->m.seed, SIZE - len + 1);
    uint8_t buf[4096];

    disk_write (d, f, off, len);
    off = tu_rand_below (&f->m.seed, SIZE - sizeof buf + 1);
    r = cow_disk_pread (d, buf, sizeof buf, off);
    if (r == -1)
      print_error ("%s: pread %zu@%" PRIu64 ": %s\n", what, sizeof buf, off,
                   cow_last_error ());
    assert_int_equal (r, 0);
    tu_assert_bytes_equal (buf, f->m.data + off, sizeof buf, off, what);
    rounds++;
    r = cow_disk_job_info (d, &i);
    if (r == -1)
      print_error ("%s: job info: %s\n", what, cow_last_error ());
    assert_int_equal (r, 0);
    active = i.state == COW_JOB_RUNNING || i.state == COW_JOB_PAUSED;
    cow_job_info_clear (&i);
    if (!active && rounds >= 8)
      break;
    if (tu_now_s () - t0 > 30) {
      print_error ("%s: the job still runs after 30 s\n", what);
      fail ();
    }
  }
}

static void
job_fails_on_write_errors (const struct scenario *sc, int err,
                           uint64_t seed)
{
  struct fx f;
  struct cow_disk *d;
  struct tu_chain old, now;
  struct cow_job_info i;
  int r;
  char *real;

  cs = sc->cs ? sc->cs : 65536;
  fx_init (&f, sc->tag, seed);
  d = fx_prepare (&f, sc->layers, seed, 8);
  tu_chain_get (d, &old);
  real = realpath (f.st, NULL);
  assert_non_null (real);
  snprintf (fail_dir, sizeof fail_dir, "%s", real);
  free (real);
  real = realpath (old.path[old.n - 1], NULL);
  assert_non_null (real);
  snprintf (fail_except, sizeof fail_except, "%s", real);
  free (real);
  fail_writes (err);

  r = start_job (d, sc, NULL);
  if (r == -1)
    print_error ("%s: start: %s\n", sc->tag, cow_last_error ());
  assert_int_equal (r, 0);
  guest_io_during (d, &f, sc->tag);
  r = cow_disk_job_wait (d);
  if (r == 0)
    print_error ("%s: the job completed with every write to %s failing "
                 "(%ld failed)\n", sc->tag, fail_dir, fio_failed ());
  assert_int_equal (r, -1);
  if (cow_last_errno () != err)
    print_error ("%s: job_wait: errno %d (%s), want %d\n", sc->tag,
                 cow_last_errno (), cow_last_error (), err);
  assert_int_equal (cow_last_errno (), err);
  assert_int_equal (cow_disk_job_info (d, &i), 0);
  assert_int_equal (i.state, COW_JOB_FAILED);
  assert_int_equal (i.error, err);
  assert_non_null (i.message);
  assert_true (i.message[0] != '\0');
  assert_true (i.ended > 0);
  print_message ("%s: failed as expected: %s\n", sc->tag, i.message);
  cow_job_info_clear (&i);
  assert_true (fio_failed () > 0);

  /* Still failing: the guest goes on; the chain is as it was. */
  guest_io_during (d, &f, sc->tag);
  assert_int_equal (cow_disk_flush (d), 0);
  verify (d, &f, "after the failed job");
  tu_chain_get (d, &now);
  expect_old_chain (&now, sc, &old, "after the failed job");
  tu_chain_free (&now);

  /* Writes work again: the job starts again and completes. */
  fio_disarm ();
  check_dir (d, f.st, "after the failed job");
  tu_chain_get (d, &now);
  r = start_job (d, sc, alt_name (sc, &now, &old));
  tu_chain_free (&now);
  if (r == -1)
    print_error ("%s: starting again: %s\n", sc->tag, cow_last_error ());
  assert_int_equal (r, 0);
  guest_io_during (d, &f, sc->tag);
  wait_ok (d, "the job started again");
  verify (d, &f, "after the job started again");
  expect_new_chain (d, sc, &old, "after the job started again");
  check_dir (d, f.st, "after the job started again");
  tu_chain_get (d, &now);
  assert_int_equal (cow_disk_close (d), 0);
  passed.n = 0;
  check_snapshots (&f, &now, sc->tag);
  tu_chain_free (&now);
  tu_chain_free (&old);
  fx_fini (&f);
}

/* A guest read on a merge target whose writes fail, with a metadata
 * cache so small that the read must evict a table, and every table the
 * cache holds dirty: the failed job left them so (zero clusters need no
 * data write).  The read did not depend on those tables: it must not
 * fail for them.  512-byte clusters (an L2 table maps 32 KiB) and four
 * L2 slots (and four spare ones); s2 holds data in regions 0 to 31 of
 * 32 KiB, s3 zeroes a cluster in regions 0 to 7 and writes in region 40,
 * so that the commit of s3 into s2 dirties eight tables of s2 and then
 * fails. */
static void
test_commit_eio_small_cache (void **state)
{
  const struct scenario *sc = &scenarios[0];
  const uint64_t region = 32768;
  struct fx f;
  struct cow_disk *d;
  struct tu_chain old, now;
  char *real;
  int r;

  (void) state;
  cs = 512;
  cache_bytes = 4 * 512;
  fx_init (&f, "commit-eio-cache", 2005);
  tu_write_file (f.base, f.base_data, SIZE);
  memcpy (f.m.data, f.base_data, SIZE);
  d = open_state (f.st, f.base);
  disk_write (d, &f, 65536 * 20, 65536);
  snapshot (d, &f, 1);
  for (uint64_t i = 0; i < 32; i++)
    disk_write (d, &f, i * region + 8192, 4096);
  snapshot (d, &f, 2);
  for (uint64_t i = 0; i < 8; i++) {
    assert_int_equal (cow_disk_zero (d, 512, i * region + 8192,
                                     COW_FLAG_MAY_TRIM), 0);
    memset (f.m.data + i * region + 8192, 0, 512);
  }
  disk_write (d, &f, 40 * region, 4096);
  snapshot (d, &f, 3);
  assert_int_equal (cow_disk_flush (d), 0);
  tu_chain_get (d, &old);
  real = realpath (f.st, NULL);
  assert_non_null (real);
  snprintf (fail_dir, sizeof fail_dir, "%s", real);
  free (real);
  real = realpath (old.path[old.n - 1], NULL);
  assert_non_null (real);
  snprintf (fail_except, sizeof fail_except, "%s", real);
  free (real);

  fail_writes (EIO);
  r = start_job (d, sc, NULL);
  assert_int_equal (r, 0);
  assert_int_equal (cow_disk_job_wait (d), -1);
  assert_int_equal (cow_last_errno (), EIO);
  /* Regions 8 to 31 read through s2, each through a table not cached. */
  for (int pass = 0; pass < 2; pass++)
    for (uint64_t i = 8; i < 32; i++) {
      uint8_t buf[4096];
      uint64_t off = i * region + 8192;
      r = cow_disk_pread (d, buf, sizeof buf, off);
      if (r == -1)
        print_error ("pread at %" PRIu64 " after the failed job: %s\n", off,
                     cow_last_error ());
      assert_int_equal (r, 0);
      tu_assert_bytes_equal (buf, f.m.data + off, sizeof buf, off,
                             "after the failed job");
    }
  verify (d, &f, "after the failed job");

  /* Writes work again: the job starts again and completes. */
  fio_disarm ();
  tu_chain_get (d, &now);
  r = start_job (d, sc, alt_name (sc, &now, &old));
  tu_chain_free (&now);
  assert_int_equal (r, 0);
  wait_ok (d, "the job started again");
  verify (d, &f, "after the job started again");
  expect_new_chain (d, sc, &old, "after the job started again");
  check_dir (d, f.st, "after the job started again");
  assert_int_equal (cow_disk_close (d), 0);
  cache_bytes = 0;
  tu_chain_free (&old);
  fx_fini (&f);
}

/* The job's state read while jobs fail, from another thread: the job's
 * end (its message set) may fall between any two instructions of
 * cow_disk_job_info, which must not fail for it (nor read a job that a
 * new one replaced). */
static struct cow_disk *poll_disk;
static int poll_stop;                   /* atomic */
static unsigned long poll_calls, poll_errors;
static char poll_error[512];

static void *
job_info_poller (void *arg)
{
  (void) arg;
  while (!__atomic_load_n (&poll_stop, __ATOMIC_ACQUIRE)) {
    struct cow_job_info i;
    if (cow_disk_job_info (poll_disk, &i) == -1) {
      if (poll_errors++ == 0)
        snprintf (poll_error, sizeof poll_error, "%s", cow_last_error ());
    }
    else
      cow_job_info_clear (&i);
    poll_calls++;
  }
  return NULL;
}

static void
test_job_info_while_jobs_fail (void **state)
{
  const struct scenario *sc = &scenarios[0];
  struct fx f;
  struct tu_chain old, now;
  const char *alt = NULL;
  pthread_t t;
  char *real;
  int jobs = 0;
  double t0;

  (void) state;
  cs = 65536;
  fx_init (&f, "job-info", 2004);
  poll_disk = fx_prepare (&f, sc->layers, 2004, 8);
  tu_chain_get (poll_disk, &old);
  real = realpath (f.st, NULL);
  assert_non_null (real);
  snprintf (fail_dir, sizeof fail_dir, "%s", real);
  free (real);
  real = realpath (old.path[old.n - 1], NULL);
  assert_non_null (real);
  snprintf (fail_except, sizeof fail_except, "%s", real);
  free (real);
  fail_writes (EIO);
  __atomic_store_n (&poll_stop, 0, __ATOMIC_SEQ_CST);
  poll_calls = poll_errors = 0;
  assert_int_equal (pthread_create (&t, NULL, job_info_poller, NULL), 0);
  for (t0 = tu_now_s (); jobs < 400 && tu_now_s () - t0 < 20; jobs++) {
    int r = start_job (poll_disk, sc, alt);
    if (r == -1)
      print_error ("start %d: %s\n", jobs, cow_last_error ());
    assert_int_equal (r, 0);
    assert_int_equal (cow_disk_job_wait (poll_disk), -1);
    if (alt == NULL) {
      tu_chain_get (poll_disk, &now);
      alt = alt_name (sc, &now, &old);
      tu_chain_free (&now);
    }
  }
  __atomic_store_n (&poll_stop, 1, __ATOMIC_SEQ_CST);
  pthread_join (t, NULL);
  fio_disarm ();
  print_message ("%d failed jobs, %lu job info calls, %lu failed\n", jobs,
                 poll_calls, poll_errors);
  if (poll_errors)
    print_error ("cow_disk_job_info failed: %s\n", poll_error);
  assert_int_equal (poll_errors, 0);
  assert_int_equal (cow_disk_close (poll_disk), 0);
  tu_chain_free (&old);
  fx_fini (&f);
}

static void
test_commit_frozen_4k_killed (void **state)
{
  (void) state;
  kill_job_at_every_step (&scenarios[7], 1008);
}

static void
test_pull_all_4k_killed (void **state)
{
  (void) state;
  kill_job_at_every_step (&scenarios[8], 1009);
}

static void
test_delete_middle_4k_killed (void **state)
{
  (void) state;
  kill_job_at_every_step (&scenarios[9], 1010);
}

static void
test_commit_enospc (void **state)
{
  (void) state;
  job_fails_on_write_errors (&scenarios[0], ENOSPC, 2001);
}

static void
test_commit_eio (void **state)
{
  (void) state;
  job_fails_on_write_errors (&scenarios[0], EIO, 2002);
}

static void
test_delete_enospc (void **state)
{
  (void) state;
  job_fails_on_write_errors (&scenarios[5], ENOSPC, 2003);
}

int
main (int argc, char **argv)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test (test_commit_frozen_killed),
    cmocka_unit_test (test_commit_active_killed),
    cmocka_unit_test (test_commit_base_killed),
    cmocka_unit_test (test_pull_all_killed),
    cmocka_unit_test (test_pull_s1_killed),
    cmocka_unit_test (test_delete_middle_killed),
    cmocka_unit_test (test_delete_top_killed),
    cmocka_unit_test (test_commit_frozen_4k_killed),
    cmocka_unit_test (test_pull_all_4k_killed),
    cmocka_unit_test (test_delete_middle_4k_killed),
    cmocka_unit_test (test_commit_enospc),
    cmocka_unit_test (test_commit_eio),
    cmocka_unit_test (test_delete_enospc),
    cmocka_unit_test (test_commit_eio_small_cache),
    cmocka_unit_test (test_job_info_while_jobs_fail),
  };

  /* Disarmed, the table is real I/O but for fsync. */
  io_set_ops (fio_ops ());
  if (argc > 1)
    cmocka_set_test_filter (argv[1]);
  return cmocka_run_group_tests (tests, NULL, NULL);
}
