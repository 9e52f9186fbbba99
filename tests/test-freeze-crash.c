/* SPDX-License-Identifier: BSD-3-Clause */
/* kill -9 at every step of a snapshot and of a revert (DESIGN.md
 * invariant 3).  Through the I/O seam, every write-side operation after
 * the Nth fails, which is what a killed process leaves: what it wrote
 * before stays (in the page cache), nothing after happens.  For each N the
 * state directory is reopened: it must hold the old chain or the new one,
 * never a mix; a flushed write is never lost; a snapshot reported done is
 * there with everything written before it; every layer passes qemu-img
 * check (leaks allowed); no stray layer file is left. */
#undef NDEBUG
#include <config.h>

#include <dirent.h>
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "cowchain.h"
#include "io.h"
#include "faultio.h"
#include "testutil.h"

#define SIZE (4u << 20)
#define BLK 65536

/* The kill: fsync really syncs, as the real process would have. */
static const struct fio_fault kill_at = { .err = EIO, .real_fsync = true };

static struct cow_disk *
open_state (const char *state, const char *base)
{
  /* Subclusters need clusters of 16K or more: with them on, 32K. */
  struct cow_disk_config cfg = { .state_dir = state, .base = base,
                                 .cluster_size = tu_subclusters_wanted ()
                                 ? 32768 : 4096,
                                 .subclusters = tu_subclusters () };
  struct cow_disk *d = cow_disk_open (&cfg);

  if (d == NULL)
    print_error ("open %s: %s\n", state, cow_last_error ());
  assert_non_null (d);
  return d;
}

static void
fill (char *buf, char c)
{
  memset (buf, c, BLK);
}

static void
expect_block (struct cow_disk *d, uint64_t off, char c, const char *what)
{
  char got[BLK], want[BLK];

  fill (want, c);
  assert_int_equal (cow_disk_pread (d, got, BLK, off), 0);
  if (memcmp (got, want, BLK) != 0) {
    print_error ("%s: block at %llu is not '%c'\n", what,
                 (unsigned long long) off, c);
    fail ();
  }
}

/* Every layer passes qemu-img check; no file but the manifest's. */
static void
check_dir (struct cow_disk *d, const char *state)
{
  struct cow_layer_info *v;
  size_t n, files = 0;
  DIR *dir;
  struct dirent *e;

  assert_int_equal (cow_disk_layers (d, &v, &n), 0);
  for (size_t i = 0; i < n; i++)
    tu_assert_check_no_corruption (v[i].path);
  dir = opendir (state);
  assert_non_null (dir);
  while ((e = readdir (dir)) != NULL)
    if (strncmp (e->d_name, "layer-", 6) == 0)
      files++;
  closedir (dir);
  if (files != n)
    print_error ("%zu layer files in %s, the manifest names %zu\n", files,
                 state, n);
  assert_int_equal (files, n);
  cow_layer_info_free (v, n);
}

static size_t
count_snapshots (struct cow_disk *d, const char *name)
{
  struct cow_layer_info *v;
  size_t n, found = 0;

  assert_int_equal (cow_disk_layers (d, &v, &n), 0);
  for (size_t i = 0; i < n; i++)
    if (v[i].snapshot && strcmp (v[i].snapshot, name) == 0)
      found++;
  cow_layer_info_free (v, n);
  return found;
}

/* Run one scenario with the kill after 0, 1, 2, ... write-side
 * operations, until it completes without reaching the kill: 'before'
 * prepares a fresh disk (real I/O), 'step' is what gets killed (its
 * result, 0 or -1, is passed on), 'after' checks the reopened disk. */
static void
kill_at_every_step (const char *tag, void (*before) (struct cow_disk *),
                    int (*step) (struct cow_disk *),
                    void (*after) (struct cow_disk *, int))
{
  char *dir = tu_mkdtemp (tag), *base = tu_path (dir, "base.raw");
  char *st = tu_path (dir, "st"), *zero = calloc (1, SIZE);
  bool completed = false;
  long n;

  tu_write_file (base, zero, SIZE);
  free (zero);
  for (n = 0; !completed; n++) {
    struct cow_disk *d;
    struct fio_fault k = kill_at;
    int r;

    tu_run (NULL, "rm -rf '%s'", st);
    d = open_state (st, base);
    before (d);
    k.at = n;
    fio_arm (&k);
    io_set_ops (fio_ops ());
    r = step (d);
    completed = fio_steps () < n;          /* never reached step n */
    cow_disk_close (d);                    /* the process dies here */
    io_set_ops (NULL);
    fio_disarm ();

    d = open_state (st, NULL);
    after (d, r);
    check_dir (d, st);
    assert_int_equal (cow_disk_close (d), 0);
  }
  print_message ("%s: killed at each of %ld steps\n", tag, n - 1);
  tu_rmtree (dir);
  free (dir);
  free (base);
  free (st);
}

static void
write_block (struct cow_disk *d, uint64_t off, char c, unsigned flags)
{
  char buf[BLK];

  fill (buf, c);
  assert_int_equal (cow_disk_pwrite (d, buf, BLK, off, flags), 0);
}

/* Snapshot: 'A' flushed, 'B' written, then the snapshot and a FUA 'C'. */
static void
snap_before (struct cow_disk *d)
{
  write_block (d, 0, 'A', 0);
  assert_int_equal (cow_disk_flush (d), 0);
  write_block (d, BLK, 'B', 0);
}

static int
snap_step (struct cow_disk *d)
{
  char buf[BLK];

  if (cow_disk_snapshot (d, "s1", "before the kill") == -1)
    return -1;
  fill (buf, 'C');
  return cow_disk_pwrite (d, buf, BLK, 2 * BLK, COW_FLAG_FUA) == -1 ? 1 : 0;
}

static void
snap_after (struct cow_disk *d, int r)
{
  expect_block (d, 0, 'A', "flushed write");
  if (r != -1) {
    assert_int_equal (count_snapshots (d, "s1"), 1);
    expect_block (d, BLK, 'B', "write before an acknowledged snapshot");
  }
  if (r == 0)
    expect_block (d, 2 * BLK, 'C', "FUA write after the snapshot");
  assert_true (count_snapshots (d, "s1") <= 1);
}

static void
test_snapshot_killed (void **state)
{
  (void) state;
  kill_at_every_step ("freeze", snap_before, snap_step, snap_after);
}

/* Revert: s1 holds 'A', s2 and the active layer 'D' (flushed). */
static void
revert_before (struct cow_disk *d)
{
  write_block (d, 0, 'A', 0);
  assert_int_equal (cow_disk_snapshot (d, "s1", NULL), 0);
  write_block (d, 0, 'D', COW_FLAG_FUA);
  assert_int_equal (cow_disk_snapshot (d, "s2", NULL), 0);
}

static int
revert_step (struct cow_disk *d)
{
  return cow_disk_revert (d, "s1", true);
}

static void
revert_after (struct cow_disk *d, int r)
{
  /* Done: the new chain.  Killed: the old chain (s2 kept, 'D') or the
   * new one (s2 gone, 'A'), never a mix. */
  if (r == 0 || count_snapshots (d, "s2") == 0) {
    expect_block (d, 0, 'A', "reverted disk");
    assert_int_equal (count_snapshots (d, "s2"), 0);
  }
  else
    expect_block (d, 0, 'D', "old chain after a killed revert");
  assert_int_equal (count_snapshots (d, "s1"), 1);
}

static void
test_revert_killed (void **state)
{
  (void) state;
  kill_at_every_step ("revert", revert_before, revert_step, revert_after);
}

int
main (void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test (test_snapshot_killed),
    cmocka_unit_test (test_revert_killed),
  };

  return cmocka_run_group_tests (tests, NULL, NULL);
}
