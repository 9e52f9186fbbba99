/* SPDX-License-Identifier: BSD-3-Clause */
/* Copy-on-write through the public API: partial clusters, unaligned
 * zeroes and trims, the last byte of the disk, qcow2 and raw bases, a
 * seeded random sequence, and concurrent writers filling the same
 * unallocated clusters.  A model byte array is the oracle, with
 * qemu-img compare and qemu-img check on the files. */
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

#include "cowchain.h"
#include "io.h"
#include "faultio.h"
#include "model.h"
#include "testutil.h"

static char *dir;

/* Copy-on-write is under test here, not durability (test-powerloss.c):
 * fsync is a no-op through the seam, except in the concurrent tests,
 * where slow real flushes widen the windows for races: fio_quick_ops. */

static int
group_setup (void **state)
{
  (void) state;
  dir = tu_mkdtemp ("test-cow");
  io_set_ops (fio_quick_ops ());
  return 0;
}

static int
group_teardown (void **state)
{
  (void) state;
  io_set_ops (NULL);
  tu_rmtree (dir);
  free (dir);
  return 0;
}

/*----------------------------------------------------------------------
 * A disk and its model. */

struct disk {
  char *base, *overlay, *model_path;
  struct cow_disk_config cfg;
  struct cow_disk *d;
  struct tu_model m;
  uint64_t size;
  uint32_t cs;
  int compat;
};

static void
disk_open (struct disk *k)
{
  k->d = cow_disk_open (&k->cfg);
  if (k->d == NULL)
    print_error ("cow_disk_open %s: %s\n", k->overlay, cow_last_error ());
  assert_non_null (k->d);
  assert_int_equal (cow_disk_size (k->d), k->size);
  assert_int_equal (cow_disk_cluster_size (k->d), k->cs);
}

/* A base of size bytes with random contents: raw, or (qcow2_cs != 0)
 * converted to qcow2 with that cluster size by qemu-img. */
static void
disk_init (struct disk *k, const char *name, uint64_t size, uint32_t cs,
           int compat, uint32_t qcow2_cs, uint64_t seed)
{
  char n[256];

  memset (k, 0, sizeof *k);
  k->size = size;
  k->cs = cs;
  k->compat = compat ? compat : 3;
  tu_model_init (&k->m, size, cs, seed);
  /* Version 2 overlays have no zero clusters: trim does nothing there. */
  k->m.trim_zeroes = k->compat == 3;
  snprintf (n, sizeof n, "%s.base", name);
  k->base = tu_path (dir, n);
  snprintf (n, sizeof n, "%s.qcow2", name);
  k->overlay = tu_path (dir, n);
  snprintf (n, sizeof n, "%s.model", name);
  k->model_path = tu_path (dir, n);
  /* Random, with a zero run in the base too. */
  tu_model_fill_base (&k->m);
  if (qcow2_cs) {
    char *out = NULL;
    int st;
    tu_write_file (k->model_path, k->m.data, size);
    st = tu_run (&out, "qemu-img convert -f raw -O qcow2 -o cluster_size=%u "
                 "'%s' '%s'", qcow2_cs, k->model_path, k->base);
    if (st != 0)
      print_error ("qemu-img convert: %s\n", out);
    free (out);
    assert_int_equal (st, 0);
  }
  else
    tu_write_file (k->base, k->m.data, size);
  unlink (k->overlay);
  k->cfg.base = k->base;
  k->cfg.base_format = qcow2_cs ? "qcow2" : "raw";
  k->cfg.overlay = k->overlay;
  k->cfg.cluster_size = cs;
  k->cfg.compat = compat;
  disk_open (k);
}

static void
disk_close (struct disk *k)
{
  int r = cow_disk_close (k->d);

  if (r == -1)
    print_error ("cow_disk_close: %s\n", cow_last_error ());
  assert_int_equal (r, 0);
  k->d = NULL;
}

static void
disk_reopen (struct disk *k)
{
  disk_close (k);
  disk_open (k);
}

static void
disk_verify_range (struct disk *k, uint64_t off, uint64_t len)
{
  tu_model_verify_range (&k->m, k->d, off, len, k->overlay);
}

/* The whole disk, plus some unaligned reads of odd sizes. */
static void
disk_verify (struct disk *k)
{
  uint64_t s = k->m.seed ^ 0x5555;
  uint8_t buf[70000];

  disk_verify_range (k, 0, k->size);
  for (int i = 0; i < 16; i++) {
    uint32_t n = (uint32_t) (1 + tu_rand_below (&s, sizeof buf));
    uint64_t off;
    if (n > k->size)
      n = (uint32_t) k->size;
    off = tu_rand_below (&s, k->size - n + 1);
    assert_int_equal (cow_disk_pread (k->d, buf, n, off), 0);
    tu_assert_bytes_equal (buf, k->m.data + off, n, off, "unaligned read");
  }
}

static void
disk_write_random (struct disk *k, uint32_t count, uint64_t off,
                   unsigned flags)
{
  tu_model_write (&k->m, k->d, off, count, flags);
}

static void
disk_zero (struct disk *k, uint32_t count, uint64_t off, unsigned flags)
{
  tu_model_zero (&k->m, k->d, off, count, flags);
}

/* A fast zero: must either succeed, or fail with ENOTSUP having changed
 * nothing.  Returns whether it zeroed. */
static bool
disk_fast_zero (struct disk *k, uint32_t count, uint64_t off)
{
  int r = cow_disk_zero (k->d, count, off, COW_FLAG_FAST_ZERO);

  if (r == 0) {
    memset (k->m.data + off, 0, count);
    return true;
  }
  if (cow_last_errno () != ENOTSUP)
    print_error ("fast zero %u@%" PRIu64 ": %s\n", count, off,
                 cow_last_error ());
  assert_int_equal (cow_last_errno (), ENOTSUP);
  return false;
}

/* Trim: the whole clusters inside the range read as zero after (a zero
 * cluster hides the base); partial clusters are left alone.  Version 2
 * overlays have no zero clusters: trim does nothing there. */
static void
disk_trim (struct disk *k, uint32_t count, uint64_t off, unsigned flags)
{
  tu_model_trim (&k->m, k->d, off, count, flags);
}

static void
disk_flush (struct disk *k)
{
  int r = cow_disk_flush (k->d);

  if (r == -1)
    print_error ("flush: %s\n", cow_last_error ());
  assert_int_equal (r, 0);
}

static void
disk_qemu_check_compare (struct disk *k)
{
  char *out = NULL;
  int st;

  tu_assert_check_clean (k->overlay);
  tu_write_file (k->model_path, k->m.data, k->size);
  st = tu_run (&out, "qemu-img compare -f raw -F qcow2 '%s' '%s'",
               k->model_path, k->overlay);
  if (st != 0)
    print_error ("qemu-img compare %s: exit %d: %s\n", k->overlay, st, out);
  free (out);
  assert_int_equal (st, 0);
}

static void
disk_fini (struct disk *k)
{
  if (k->d)
    disk_close (k);
  unlink (k->base);
  unlink (k->overlay);
  unlink (k->model_path);
  free (k->base);
  free (k->overlay);
  free (k->model_path);
  tu_model_fini (&k->m);
}

static uint64_t
min64 (uint64_t a, uint64_t b)
{
  return a < b ? a : b;
}

/*----------------------------------------------------------------------
 * Partial clusters. */

static void
partial_cow (uint64_t size, uint32_t cs, int compat, uint32_t base_qcow2_cs)
{
  struct disk k;
  const uint64_t c = cs;

  disk_init (&k, "partial", size, cs, compat, base_qcow2_cs, size ^ cs);
  disk_verify (&k);

  /* One byte at 65535 (the last byte of the first 64 KiB), and at the
   * last byte of the first cluster. */
  disk_write_random (&k, 1, 65535, 0);
  disk_verify (&k);
  disk_write_random (&k, 1, c - 1, 0);
  disk_verify (&k);
  /* 100 KiB spanning three 64 KiB clusters (and as many others as it
   * takes at other cluster sizes). */
  disk_write_random (&k, 100 * 1024, 3 * 65536 - 1000, 0);
  disk_verify (&k);
  /* The last byte of the disk, then the last 1000 bytes. */
  disk_write_random (&k, 1, size - 1, 0);
  disk_verify (&k);
  disk_write_random (&k, 1000, size - 1000, COW_FLAG_FUA);
  disk_verify (&k);
  /* A whole cluster exactly, and one cluster starting mid-cluster. */
  disk_write_random (&k, cs, 5 * c, 0);
  disk_write_random (&k, cs, 7 * c + c / 2, 0);
  disk_verify (&k);

  /* Unaligned zeroes: inside one cluster, across a boundary, partial +
   * whole + partial, with MAY_TRIM, and at the end of the disk. */
  disk_zero (&k, 1000, 70000, 0);
  disk_verify (&k);
  disk_zero (&k, 3000, 2 * 65536 - 1500, 0);
  disk_verify (&k);
  disk_zero (&k, (uint32_t) (3 * c + 1234), 9 * c + 77, COW_FLAG_MAY_TRIM);
  disk_verify (&k);
  disk_zero (&k, cs, 14 * c, 0);
  disk_verify (&k);
  disk_zero (&k, 777, size - 777, COW_FLAG_FUA);
  disk_verify (&k);
  /* Fast zero: unaligned needs data writes, so ENOTSUP and no change;
   * aligned whole clusters work with zero clusters (version 3). */
  assert_false (disk_fast_zero (&k, 1000, 70000 + 3));
  disk_verify (&k);
  if (disk_fast_zero (&k, 2 * cs, 16 * c))
    assert_int_equal (k.compat, 3);
  else
    assert_int_equal (k.compat, 2);
  disk_verify (&k);
  /* Write into what was zeroed. */
  disk_write_random (&k, 10, 14 * c + 5, 0);
  disk_write_random (&k, 10, 9 * c + 80, 0);
  disk_verify (&k);

  /* Trims: inside one cluster (nothing), one whole cluster, partial +
   * whole + partial, of never-written clusters (the base is hidden), of
   * the tail of the disk. */
  disk_trim (&k, 1000, 65536 + 100, 0);
  disk_verify (&k);
  disk_trim (&k, cs, 5 * c, 0);
  disk_verify (&k);
  disk_trim (&k, (uint32_t) (2 * c + 200), 7 * c + 100, 0);
  disk_verify (&k);
  disk_trim (&k, (uint32_t) (2 * c), 20 * c, 0);
  disk_verify (&k);
  disk_trim (&k, (uint32_t) min64 (size, 3 * c + 5), size - min64 (size, 3 * c + 5),
             COW_FLAG_FUA);
  disk_verify (&k);
  /* Write over the trimmed clusters again, partially. */
  disk_write_random (&k, 3, 5 * c + 7, 0);
  disk_write_random (&k, 3, 21 * c - 1, 0);
  disk_verify (&k);

  /* Out of range: refused, nothing changes. */
  assert_int_equal (cow_disk_pwrite (k.d, k.m.data, 2, size - 1, 0), -1);
  assert_int_equal (cow_last_errno (), EINVAL);
  assert_int_equal (cow_disk_zero (k.d, 1, size, 0), -1);
  assert_int_equal (cow_disk_trim (k.d, 1, size, 0), -1);
  assert_int_equal (cow_disk_pread (k.d, k.m.data, 1, size), -1);
  assert_int_equal (cow_disk_pwrite (k.d, k.m.data, 0, size, 0), 0);

  disk_flush (&k);
  disk_verify (&k);
  disk_reopen (&k);
  disk_verify (&k);
  disk_close (&k);
  disk_qemu_check_compare (&k);
  disk_fini (&k);
}

static void
test_partial_64k (void **state)
{
  (void) state;
  partial_cow (4 << 20, 65536, 3, 0);
}

static void
test_partial_512 (void **state)
{
  (void) state;
  partial_cow ((1 << 20) + 1536, 512, 3, 0);
}

static void
test_partial_4k_odd_size (void **state)
{
  (void) state;
  /* The last cluster is partial. */
  partial_cow ((3 << 20) + 4608, 4096, 3, 0);
}

static void
test_partial_2m (void **state)
{
  (void) state;
  partial_cow ((44 << 20) + 512, 2u << 20, 3, 0);
}

static void
test_partial_compat010 (void **state)
{
  (void) state;
  partial_cow ((4 << 20) - 1536, 65536, 2, 0);
}

/* A qcow2 base with small clusters, whose size is not a multiple of the
 * overlay's clusters: copy-on-write of the last cluster reads the base
 * beyond its end. */
static void
test_partial_qcow2_base (void **state)
{
  (void) state;
  partial_cow ((2 << 20) + 512, 65536, 3, 512);
}

/*----------------------------------------------------------------------
 * A seeded random sequence of writes, zeroes, trims, flushes and
 * reopens. */

static void
random_ops (uint32_t cs, uint64_t size, int compat, uint64_t seed, int n_ops)
{
  struct disk k;
  uint64_t s = seed;

  disk_init (&k, "random", size, cs, compat, 0, seed);
  for (int i = 0; i < n_ops; i++) {
    uint64_t kind = tu_rand_below (&s, 100);
    uint32_t max = tu_rand_below (&s, 4) == 0 ? 4 * cs + 4096 : 3 * cs / 2;
    uint32_t len = (uint32_t) (1 + tu_rand_below (&s, max));
    uint64_t off;
    unsigned flags = tu_rand_below (&s, 10) == 0 ? COW_FLAG_FUA : 0;

    if (len > size)
      len = (uint32_t) size;
    off = tu_rand_below (&s, size - len + 1);
    if (tu_rand_below (&s, 3) == 0)         /* aligned */
      off = off / cs * cs;
    if (off + len > size)
      off = size - len;
    if (kind < 60)
      disk_write_random (&k, len, off, flags);
    else if (kind < 75)
      disk_zero (&k, len, off, flags | (tu_rand_below (&s, 2) ? COW_FLAG_MAY_TRIM : 0));
    else if (kind < 80)
      disk_fast_zero (&k, len, off);
    else if (kind < 92)
      disk_trim (&k, len, off, flags);
    else if (kind < 97)
      disk_flush (&k);
    else {
      disk_verify (&k);
      disk_reopen (&k);
    }
  }
  disk_verify (&k);
  disk_close (&k);
  disk_qemu_check_compare (&k);
  disk_fini (&k);
}

static void
test_random_64k (void **state)
{
  (void) state;
  random_ops (65536, 8 << 20, 3, 101, 400);
}

static void
test_random_4k (void **state)
{
  (void) state;
  random_ops (4096, (2 << 20) + 512, 3, 102, 600);
}

static void
test_random_512 (void **state)
{
  (void) state;
  random_ops (512, 1 << 20, 3, 103, 600);
}

static void
test_random_compat010 (void **state)
{
  (void) state;
  random_ops (4096, 2 << 20, 2, 104, 400);
}

/*----------------------------------------------------------------------
 * Concurrency: several threads write disjoint pieces of the same
 * unallocated clusters at once; none of their data may be lost (a
 * copy-on-write of one must not overwrite another's fresh data, and a
 * cluster must not be allocated twice).  A flusher thread runs all the
 * while. */

struct piece {
  uint64_t off;
  uint32_t len;
  bool zero;
};

struct conc {
  struct disk *k;
  int n_writers;
  pthread_barrier_t start, done;
  const uint8_t *data;          /* what the region must hold after */
  uint64_t region_off;
  struct piece *pieces;
  size_t n_pieces;
  int *owner;                   /* writer index of each piece */
  bool stop;
  unsigned errors;              /* atomic */
  char first_error[512];
  pthread_mutex_t err_lock;
};

struct writer_arg {
  struct conc *c;
  int idx;
};

static void
conc_error (struct conc *c, const char *what, const struct piece *p)
{
  pthread_mutex_lock (&c->err_lock);
  if (c->errors++ == 0)
    snprintf (c->first_error, sizeof c->first_error, "%s %u@%" PRIu64 ": %s",
              what, p ? p->len : 0, p ? p->off : 0, cow_last_error ());
  pthread_mutex_unlock (&c->err_lock);
}

static void *
writer (void *arg)
{
  struct writer_arg *a = arg;
  struct conc *c = a->c;

  for (;;) {
    pthread_barrier_wait (&c->start);
    if (__atomic_load_n (&c->stop, __ATOMIC_ACQUIRE))
      break;
    for (size_t i = 0; i < c->n_pieces; i++) {
      const struct piece *p = &c->pieces[i];
      int r;
      if (c->owner[i] != a->idx)
        continue;
      if (p->zero)
        r = cow_disk_zero (c->k->d, p->len, p->off, 0);
      else
        r = cow_disk_pwrite (c->k->d, c->data + (p->off - c->region_off),
                             p->len, p->off, 0);
      if (r == -1)
        conc_error (c, p->zero ? "zero" : "pwrite", p);
    }
    pthread_barrier_wait (&c->done);
  }
  return NULL;
}

static bool flusher_stop;

static void *
flusher (void *arg)
{
  struct conc *c = arg;

  while (!__atomic_load_n (&flusher_stop, __ATOMIC_ACQUIRE)) {
    if (cow_disk_flush (c->k->d) == -1)
      conc_error (c, "flush", NULL);
    usleep (200);
  }
  return NULL;
}

static void
concurrent (uint32_t cs, uint64_t size, int rounds, int n_writers,
            uint64_t seed)
{
  struct disk k;
  struct conc c;
  pthread_t th[16], fl;
  struct writer_arg args[16];
  uint64_t s = seed;
  uint64_t next_cluster = 0;
  uint8_t *data;
  const uint64_t region_max = 2 * (uint64_t) cs + cs / 2;

  assert_true (n_writers <= 16);
  io_set_ops (NULL);
  disk_init (&k, "conc", size, cs, 3, 0, seed);
  memset (&c, 0, sizeof c);
  c.k = &k;
  c.n_writers = n_writers;
  pthread_mutex_init (&c.err_lock, NULL);
  pthread_barrier_init (&c.start, NULL, (unsigned) n_writers + 1);
  pthread_barrier_init (&c.done, NULL, (unsigned) n_writers + 1);
  data = malloc (region_max);
  c.pieces = malloc (region_max * sizeof *c.pieces);
  c.owner = malloc (region_max * sizeof *c.owner);
  assert_non_null (data);
  assert_non_null (c.pieces);
  assert_non_null (c.owner);
  c.data = data;
  for (int i = 0; i < n_writers; i++) {
    args[i].c = &c;
    args[i].idx = i;
    assert_int_equal (pthread_create (&th[i], NULL, writer, &args[i]), 0);
  }
  flusher_stop = false;
  assert_int_equal (pthread_create (&fl, NULL, flusher, &c), 0);

  for (int r = 0; r < rounds; r++) {
    uint64_t region_len, off, end;

    /* Fresh clusters: an unaligned start in the first one, two or three
     * clusters long. */
    if ((next_cluster + 4) * cs > size)
      break;
    c.region_off = next_cluster * cs + tu_rand_below (&s, cs / 2);
    region_len = 2 * (uint64_t) cs - tu_rand_below (&s, cs / 2);
    next_cluster += 4;
    tu_fill_random (data, region_len, &s);
    /* Cut into pieces of random sizes; each goes to a random writer,
     * one in eight is a zero instead. */
    c.n_pieces = 0;
    for (off = 0; off < region_len; off = end) {
      struct piece *p = &c.pieces[c.n_pieces];
      uint32_t len = (uint32_t) (1 + tu_rand_below (&s, cs / 3 + 1));
      end = min64 (region_len, off + len);
      p->off = c.region_off + off;
      p->len = (uint32_t) (end - off);
      p->zero = tu_rand_below (&s, 8) == 0;
      if (p->zero)
        memset (data + off, 0, p->len);
      c.owner[c.n_pieces] = (int) tu_rand_below (&s, (uint64_t) n_writers);
      c.n_pieces++;
    }
    memcpy (k.m.data + c.region_off, data, region_len);
    pthread_barrier_wait (&c.start);
    pthread_barrier_wait (&c.done);
    if (c.errors)
      break;
    /* The clusters around the region: base data kept, pieces all there. */
    {
      uint64_t from = c.region_off / cs * cs;
      uint64_t to = min64 (size, (c.region_off + region_len + cs - 1) / cs * cs);
      disk_verify_range (&k, from, to - from);
    }
  }

  __atomic_store_n (&c.stop, true, __ATOMIC_RELEASE);
  pthread_barrier_wait (&c.start);
  for (int i = 0; i < n_writers; i++)
    pthread_join (th[i], NULL);
  __atomic_store_n (&flusher_stop, true, __ATOMIC_RELEASE);
  pthread_join (fl, NULL);
  if (c.errors)
    print_error ("%u errors in threads, the first: %s\n", c.errors,
                 c.first_error);
  assert_int_equal (c.errors, 0);

  disk_verify (&k);
  disk_reopen (&k);
  disk_verify (&k);
  disk_close (&k);
  disk_qemu_check_compare (&k);
  pthread_barrier_destroy (&c.start);
  pthread_barrier_destroy (&c.done);
  pthread_mutex_destroy (&c.err_lock);
  free (data);
  free (c.pieces);
  free (c.owner);
  disk_fini (&k);
  io_set_ops (fio_quick_ops ());
}

static void
test_concurrent_64k (void **state)
{
  (void) state;
  concurrent (65536, 32 << 20, 128, 4, 201);
}

static void
test_concurrent_4k (void **state)
{
  (void) state;
  concurrent (4096, 8 << 20, 500, 4, 202);
}

static void
test_concurrent_512 (void **state)
{
  (void) state;
  concurrent (512, 2 << 20, 500, 6, 203);
}

/* Chaos: threads run random overlapping writes, zeroes, trims, reads
 * and flushes on a small disk with a tiny metadata cache.  The result is
 * not defined byte by byte, but the engine must not fail, what it reads
 * must survive a close and reopen unchanged, and the file must pass
 * qemu-img check with no leak and no error. */

struct chaos {
  struct disk *k;
  uint64_t seed;
  int ops;
  unsigned errors;
  char first_error[512];
  pthread_mutex_t *err_lock;
};

static void *
chaos_thread (void *arg)
{
  struct chaos *c = arg;
  uint64_t s = c->seed;
  uint32_t cs = c->k->cs;
  uint64_t size = c->k->size;
  uint8_t *buf = malloc (4 * (size_t) cs + 8192);

  for (int i = 0; i < c->ops && buf; i++) {
    uint64_t kind = tu_rand_below (&s, 100);
    uint32_t len = (uint32_t) (1 + tu_rand_below (&s, 3 * cs + 4096));
    uint64_t off;
    int r;
    const char *what;

    if (len > size)
      len = (uint32_t) size;
    off = tu_rand_below (&s, size - len + 1);
    if (tu_rand_below (&s, 3) == 0)
      off = off / cs * cs;
    if (off + len > size)
      off = size - len;
    if (kind < 45) {
      what = "pwrite";
      tu_fill_random (buf, len, &s);
      r = cow_disk_pwrite (c->k->d, buf, len, off,
                           tu_rand_below (&s, 20) ? 0 : COW_FLAG_FUA);
    }
    else if (kind < 60) {
      what = "zero";
      r = cow_disk_zero (c->k->d, len, off,
                         tu_rand_below (&s, 2) ? COW_FLAG_MAY_TRIM : 0);
    }
    else if (kind < 72) {
      what = "trim";
      r = cow_disk_trim (c->k->d, len, off, 0);
    }
    else if (kind < 80) {
      what = "flush";
      r = cow_disk_flush (c->k->d);
    }
    else {
      what = "pread";
      r = cow_disk_pread (c->k->d, buf, len, off);
    }
    if (r == -1) {
      pthread_mutex_lock (c->err_lock);
      if (c->errors++ == 0)
        snprintf (c->first_error, sizeof c->first_error, "%s %u@%" PRIu64
                  ": %s", what, len, off, cow_last_error ());
      pthread_mutex_unlock (c->err_lock);
    }
  }
  free (buf);
  return NULL;
}

static void
chaos (uint32_t cs, uint64_t size, uint64_t cache, int n_threads, int ops,
       uint64_t seed)
{
  struct disk k;
  pthread_t th[16];
  struct chaos c[16];
  pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
  unsigned errors = 0;
  uint8_t *before, *after;

  io_set_ops (NULL);
  disk_init (&k, "chaos", size, cs, 3, 0, seed);
  k.cfg.cache_size = cache;
  disk_reopen (&k);
  for (int i = 0; i < n_threads; i++) {
    c[i].k = &k;
    c[i].seed = seed * 31 + (uint64_t) i;
    c[i].ops = ops;
    c[i].errors = 0;
    c[i].err_lock = &lock;
    assert_int_equal (pthread_create (&th[i], NULL, chaos_thread, &c[i]), 0);
  }
  for (int i = 0; i < n_threads; i++) {
    pthread_join (th[i], NULL);
    if (c[i].errors)
      print_error ("thread %d: %u errors, the first: %s\n", i, c[i].errors,
                   c[i].first_error);
    errors += c[i].errors;
  }
  assert_int_equal (errors, 0);
  before = malloc (size);
  after = malloc (size);
  assert_non_null (before);
  assert_non_null (after);
  assert_int_equal (cow_disk_pread (k.d, before, (uint32_t) size, 0), 0);
  disk_reopen (&k);
  assert_int_equal (cow_disk_pread (k.d, after, (uint32_t) size, 0), 0);
  tu_assert_bytes_equal (after, before, size, 0, "chaos: after reopen");
  disk_close (&k);
  memcpy (k.m.data, before, size);
  disk_qemu_check_compare (&k);
  free (before);
  free (after);
  disk_fini (&k);
  io_set_ops (fio_quick_ops ());
}

static void
test_chaos_4k (void **state)
{
  (void) state;
  chaos (4096, 4 << 20, 0, 6, 400, 301);
}

static void
test_chaos_512 (void **state)
{
  (void) state;
  /* (A cache too small to hold what a flush pins makes requests fail
   * with ENOMEM: see test_flush_pins_whole_cache in test-qcow2.c.) */
  chaos (512, 2 << 20, 0, 6, 400, 302);
}

static void
test_chaos_64k (void **state)
{
  (void) state;
  chaos (65536, 8 << 20, 0, 4, 300, 303);
}

int
main (int argc, char **argv)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test (test_partial_64k),
    cmocka_unit_test (test_partial_512),
    cmocka_unit_test (test_partial_4k_odd_size),
    cmocka_unit_test (test_partial_2m),
    cmocka_unit_test (test_partial_compat010),
    cmocka_unit_test (test_partial_qcow2_base),
    cmocka_unit_test (test_random_64k),
    cmocka_unit_test (test_random_4k),
    cmocka_unit_test (test_random_512),
    cmocka_unit_test (test_random_compat010),
    cmocka_unit_test (test_concurrent_64k),
    cmocka_unit_test (test_concurrent_4k),
    cmocka_unit_test (test_concurrent_512),
    cmocka_unit_test (test_chaos_4k),
    cmocka_unit_test (test_chaos_512),
    cmocka_unit_test (test_chaos_64k),
  };

  if (argc > 1)
    cmocka_set_test_filter (argv[1]);
  return cmocka_run_group_tests (tests, group_setup, group_teardown);
}
