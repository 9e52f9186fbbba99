/* SPDX-License-Identifier: BSD-3-Clause */
/* The merged map of the frozen layers (cow/chain-map.c) and the shared
 * metadata cache budget (cow/qcow2-cache.c).
 *
 * Map: a model-based random test.  Writes, write-zeroes, trims,
 * snapshots, reverts, deletes and pulls (each merge waited for) on a
 * state-directory disk; after every step the map (built incrementally
 * after snapshots) equals a map built from scratch by asking every frozen
 * layer top down, and the disk, read through the map, equals the model.
 *
 * Budget: with a small budget, tables held never exceed it, however many
 * layers are read; and the active layer's hot tables stay while a scan
 * of a frozen layer streams its tables through the cache (global LRU):
 * re-reading the hot ranges then reads nothing from any file. */
#undef NDEBUG
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "chain.h"
#include "cowchain.h"
#include "io.h"
#include "faultio.h"
#include "model.h"
#include "testutil.h"

struct fx {
  char *dir, *base, *st;
  struct cow_disk *d;
  struct tu_model m;
  uint64_t size;
  uint32_t cs;
};

static void
fx_init (struct fx *f, const char *tag, uint64_t size, uint32_t cs,
         uint64_t seed)
{
  struct cow_disk_config cfg = { .cluster_size = cs, .base_format = "raw" };

  memset (f, 0, sizeof *f);
  f->dir = tu_mkdtemp (tag);
  f->base = tu_path (f->dir, "base.raw");
  f->st = tu_path (f->dir, "st");
  f->size = size;
  f->cs = cs;
  tu_model_init (&f->m, size, cs, seed);
  tu_model_fill_base (&f->m);
  tu_write_file (f->base, f->m.data, size);
  cfg.state_dir = f->st;
  cfg.base = f->base;
  f->d = cow_disk_open (&cfg);
  if (f->d == NULL)
    print_error ("open %s: %s\n", f->st, cow_last_error ());
  assert_non_null (f->d);
}

static void
fx_fini (struct fx *f)
{
  if (f->d)
    assert_int_equal (cow_disk_close (f->d), 0);
  tu_rmtree (f->dir);
  free (f->dir);
  free (f->base);
  free (f->st);
  tu_model_fini (&f->m);
}

/* The map equals one built top down from every frozen layer. */
static void
check_map (struct fx *f, const char *what)
{
  int r;

  /* A read builds the map if the chain changed. */
  tu_model_verify_range (&f->m, f->d, 0, f->cs, what);
  pthread_rwlock_rdlock (&f->d->chain_lock);
  r = chain_map_check (f->d);
  if (r == -1)
    print_error ("%s: %s\n", what, cow_last_error ());
  assert_int_equal (r, 0);
  if (f->d->n_frozen > 0)
    assert_true (chain_map_extents (f->d) > 0);
  pthread_rwlock_unlock (&f->d->chain_lock);
}

/* Forget the model's copies of snapshots the chain no longer names. */
static void
sync_snapshots (struct fx *f)
{
  struct tu_chain c;

  tu_chain_get (f->d, &c);
  for (size_t i = 0; i < f->m.n_snaps; )
    if (tu_chain_find (&c, f->m.snaps[i].name) < 0)
      tu_model_forget (&f->m, f->m.snaps[i].name);
    else
      i++;
  tu_chain_free (&c);
}

static void
wait_job (struct fx *f, const char *what)
{
  if (cow_disk_job_wait (f->d) == -1)
    print_error ("%s: %s\n", what, cow_last_error ());
}

static void
random_steps (uint64_t seed, uint32_t cs, int steps)
{
  struct fx f;
  uint64_t rs = seed * 7919 + 1;
  const uint64_t size = 4u << 20;
  unsigned next_snap = 0;
  char what[128];

  fx_init (&f, "map", size, cs, seed);
  for (int step = 0; step < steps; step++) {
    uint64_t op = tu_rand_below (&rs, 100);
    uint64_t off = tu_rand_below (&rs, size);
    uint32_t len = (uint32_t) (1 + tu_rand_below (&rs, 4 * cs));
    struct cow_job_opts o = { .force = true };
    const char *name;

    if (len > size - off)
      len = (uint32_t) (size - off);
    if (op < 35) {
      snprintf (what, sizeof what, "seed %" PRIu64 " step %d: write %" PRIu64
                "+%" PRIu32, seed, step, off, len);
      tu_model_write (&f.m, f.d, off, len, 0);
    }
    else if (op < 45) {
      snprintf (what, sizeof what, "seed %" PRIu64 " step %d: zero", seed,
                step);
      tu_model_zero (&f.m, f.d, off, len, 0);
    }
    else if (op < 52) {
      snprintf (what, sizeof what, "seed %" PRIu64 " step %d: trim", seed,
                step);
      tu_model_trim (&f.m, f.d, off, len, 0);
    }
    else if (op < 75 && f.m.n_snaps < 10) {
      char nm[32];
      snprintf (nm, sizeof nm, "s%u", next_snap++);
      snprintf (what, sizeof what, "seed %" PRIu64 " step %d: snapshot %s",
                seed, step, nm);
      tu_model_snapshot (&f.m, f.d, nm, NULL);
    }
    else if (f.m.n_snaps == 0)
      continue;
    else if (op < 83) {
      struct tu_model_snap *s =
        &f.m.snaps[tu_rand_below (&rs, f.m.n_snaps)];
      snprintf (what, sizeof what, "seed %" PRIu64 " step %d: revert %s",
                seed, step, s->name);
      if (cow_disk_revert (f.d, s->name, true) == -1)
        print_error ("%s: %s\n", what, cow_last_error ());
      memcpy (f.m.data, s->data, size);
      sync_snapshots (&f);
    }
    else if (op < 93) {
      name = f.m.snaps[tu_rand_below (&rs, f.m.n_snaps)].name;
      snprintf (what, sizeof what, "seed %" PRIu64 " step %d: delete %s",
                seed, step, name);
      if (cow_disk_delete (f.d, name, &o) == -1)
        print_error ("%s: %s\n", what, cow_last_error ());
      else
        wait_job (&f, what);
      sync_snapshots (&f);
    }
    else {
      /* Pull onto a snapshot, or onto nothing. */
      if (tu_rand_below (&rs, 3) > 0)
        o.base = f.m.snaps[tu_rand_below (&rs, f.m.n_snaps)].name;
      snprintf (what, sizeof what, "seed %" PRIu64 " step %d: pull onto %s",
                seed, step, o.base ? o.base : "nothing");
      if (cow_disk_pull (f.d, &o) == -1)
        print_error ("%s: %s\n", what, cow_last_error ());
      else
        wait_job (&f, what);
      sync_snapshots (&f);
    }
    check_map (&f, what);
    if (step % 8 == 7)
      tu_model_verify (&f.m, f.d, what);
  }
  tu_model_verify (&f.m, f.d, "the end");
  fx_fini (&f);
}

static void
test_map_model_64k (void **state)
{
  (void) state;
  random_steps (1, 65536, 120);
}

static void
test_map_model_4k (void **state)
{
  (void) state;
  random_steps (2, 4096, 120);
  random_steps (3, 4096, 120);
}

static void
test_map_model_512 (void **state)
{
  (void) state;
  random_steps (4, 512, 80);
}

/* A chain deeper than the map's incremental path: sixty snapshots, each
 * over a few writes; then the whole disk. */
static void
test_map_deep (void **state)
{
  struct fx f;
  uint64_t rs = 99;
  const uint64_t size = 8u << 20;
  struct cow_memory_usage u;

  (void) state;
  fx_init (&f, "mapdeep", size, 4096, 5);
  for (int i = 0; i < 60; i++) {
    char nm[16];
    for (int k = 0; k < 4; k++)
      tu_model_write (&f.m, f.d, tu_rand_below (&rs, size - 8192),
                      (uint32_t) (1 + tu_rand_below (&rs, 8192)), 0);
    snprintf (nm, sizeof nm, "d%d", i);
    tu_model_snapshot (&f.m, f.d, nm, NULL);
    tu_model_forget_all (&f.m);
    check_map (&f, nm);
  }
  tu_model_verify (&f.m, f.d, "depth 61");
  cow_memory_usage (&u);
  assert_true (u.map_bytes > 0);
  fx_fini (&f);
}

/*----------------------------------------------------------------------
 * The shared budget. */

static unsigned long preads;     /* atomic */

static ssize_t
counting_pread (int fd, void *buf, size_t n, off_t off)
{
  __atomic_add_fetch (&preads, 1, __ATOMIC_RELAXED);
  return io_real_ops.pread (fd, buf, n, off);
}

static void
test_budget_global_lru (void **state)
{
  struct fx f;
  const uint32_t cs = 4096;
  const uint64_t region = 512 * cs;     /* what one L2 table maps */
  const uint64_t n_regions = 32;
  const uint64_t budget = 16 * cs;      /* sixteen tables */
  struct io_ops ops = *fio_quick_ops ();
  struct cow_memory_usage u;
  uint8_t buf[4096];
  unsigned long before;

  (void) state;
  ops.pread = counting_pread;
  io_set_ops (&ops);
  cow_cache_set_budget (budget);
  fx_init (&f, "budget", n_regions * region, cs, 6);
  /* Data in every region, frozen under a snapshot; four hot regions of
   * zero clusters in the active layer. */
  for (uint64_t i = 0; i < n_regions; i++)
    tu_model_write (&f.m, f.d, i * region + 8192, 4096, 0);
  tu_model_snapshot (&f.m, f.d, "frozen", NULL);
  for (uint64_t i = 0; i < 4; i++)
    tu_model_zero (&f.m, f.d, i * region, 65536, 0);
  assert_int_equal (cow_disk_flush (f.d), 0);

  for (int round = 0; round < 6; round++) {
    /* The hot ranges, then eight frozen regions not read last round. */
    for (uint64_t i = 0; i < 4; i++) {
      assert_int_equal (cow_disk_pread (f.d, buf, sizeof buf, i * region), 0);
      assert_memory_equal (buf, f.m.data + i * region, sizeof buf);
    }
    for (uint64_t k = 0; k < 8; k++) {
      uint64_t i = 4 + (round * 8 + k) % (n_regions - 4);
      uint64_t off = i * region + 8192;
      assert_int_equal (cow_disk_pread (f.d, buf, sizeof buf, off), 0);
      assert_memory_equal (buf, f.m.data + off, sizeof buf);
    }
    cow_memory_usage (&u);
    assert_true (u.cache_used <= budget);
  }
  /* The hot tables stayed: their ranges read without any file read. */
  before = __atomic_load_n (&preads, __ATOMIC_RELAXED);
  for (uint64_t i = 0; i < 4; i++)
    assert_int_equal (cow_disk_pread (f.d, buf, sizeof buf, i * region), 0);
  assert_int_equal (__atomic_load_n (&preads, __ATOMIC_RELAXED), before);

  /* The whole disk through a cache of sixteen tables. */
  tu_model_verify (&f.m, f.d, "budget");
  cow_memory_usage (&u);
  assert_int_equal (u.cache_budget, budget);
  assert_true (u.cache_used <= budget);
  assert_true (u.cache_tables <= budget / cs);
  fx_fini (&f);
  cow_memory_usage (&u);
  assert_int_equal (u.cache_used, 0);
  cow_cache_set_budget (0);
  io_set_ops (fio_quick_ops ());
}

int
main (void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test (test_map_model_64k),
    cmocka_unit_test (test_map_model_4k),
    cmocka_unit_test (test_map_model_512),
    cmocka_unit_test (test_map_deep),
    cmocka_unit_test (test_budget_global_lru),
  };

  io_set_ops (fio_quick_ops ());
  return cmocka_run_group_tests (tests, NULL, NULL);
}
