/* SPDX-License-Identifier: BSD-3-Clause */
/* A job's last step rewrites one backing name in a header
 * (qcow2_set_backing): for a commit of the layer under the active one, a
 * pull into the active layer and a delete of the newest snapshot, the
 * header of the active layer, which the guest goes on writing.  A guest
 * write can move that layer's refcount table, which rewrites the header
 * too.  Here a guest thread moves it right inside the rewrite: on cue
 * from the I/O seam, when the rewrite reads the header.  An engine that
 * makes the guest wait for the rewrite is not wrong: the cue is given up
 * after a second.
 *
 * 512-byte clusters: the first refcount table cluster covers 8 MiB of
 * file, so the active layer is filled to a little below that first.
 * Oracles: a model of the disk, read back live and after a reopen, and
 * qemu-img check of every layer (clean: no leaks either).  Run one test:
 * ./test-job-reftable 'test_pull*' */
#undef NDEBUG
#include <config.h>

#include <errno.h>
#include <fcntl.h>
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

#define SIZE (16u << 20)
#define CS 512u
/* The file size the first refcount table cluster covers. */
#define REFTABLE_SPAN (8u << 20)
/* The region the guest thread fills on cue. */
#define CUE_REGION (12u << 20)

/*----------------------------------------------------------------------
 * The seam: fsync is a no-op (durability is tested elsewhere); the
 * first read of a whole header cluster of the active layer file through
 * a descriptor while armed is the cue. */

static struct io_ops cue_ops;
static char active_path[PATH_MAX];
static int armed;               /* atomic */

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static bool cue, grown, stop;
static bool cue_given;          /* the cue came (read by the main thread) */
static bool grown_in_time;      /* the table moved before the cue gave up */

static bool
is_active_file (int fd)
{
  char path[PATH_MAX];

  if (!tu_fd_path (fd, path, sizeof path))
    return false;
  return strcmp (path, active_path) == 0;
}

static ssize_t
cue_pread (int fd, void *buf, size_t count, off_t off)
{
  ssize_t r = io_real_ops.pread (fd, buf, count, off);

  if (off == 0 && count == CS && is_active_file (fd)
      && __atomic_exchange_n (&armed, 0, __ATOMIC_SEQ_CST)) {
    struct timespec ts;

    pthread_mutex_lock (&mu);
    cue = true;
    cue_given = true;
    pthread_cond_broadcast (&cv);
    clock_gettime (CLOCK_REALTIME, &ts);
    ts.tv_sec += 1;
    while (!grown)
      if (pthread_cond_timedwait (&cv, &mu, &ts) != 0)
        break;
    grown_in_time = grown;
    pthread_mutex_unlock (&mu);
  }
  return r;
}

/*----------------------------------------------------------------------
 * The disk and its model. */

struct fx {
  char *dir, *base, *st;
  struct cow_disk *d;
  struct tu_model m;
  uint64_t next_off;            /* the guest thread's next fresh offset */
  char error[512];              /* the guest thread's failure */
};

static struct cow_disk *
open_disk (struct fx *f, const char *base)
{
  struct cow_disk_config cfg = { .state_dir = f->st, .base = base,
                                 .base_format = base ? "raw" : NULL,
                                 .cluster_size = CS };
  struct cow_disk *d = cow_disk_open (&cfg);

  if (d == NULL)
    print_error ("open %s: %s\n", f->st, cow_last_error ());
  assert_non_null (d);
  assert_int_equal (cow_disk_size (d), SIZE);
  return d;
}

/* Returns -1 with the error set, for the guest thread's use. */
static int
guest_write (struct fx *f, uint64_t off, uint32_t len)
{
  uint8_t *buf = malloc (len);
  int r;

  if (buf == NULL)
    return -1;
  tu_fill_random (buf, len, &f->m.seed);
  r = cow_disk_pwrite (f->d, buf, len, off, 0);
  if (r == 0)
    memcpy (f->m.data + off, buf, len);
  free (buf);
  return r;
}

static void
write_ok (struct fx *f, uint64_t off, uint32_t len)
{
  if (guest_write (f, off, len) == -1) {
    print_error ("pwrite %u@%" PRIu64 ": %s\n", len, off, cow_last_error ());
    fail ();
  }
}

static void
verify (struct fx *f, const char *what)
{
  tu_model_verify (&f->m, f->d, what);
}

/* The refcount table offset that the header of a file names. */
static uint64_t
header_reftable (const char *path)
{
  uint8_t h[8];
  uint64_t v = 0;
  int fd = open (path, O_RDONLY);

  if (fd == -1 || pread (fd, h, sizeof h, 48) != (ssize_t) sizeof h) {
    if (fd != -1)
      close (fd);
    return 0;
  }
  close (fd);
  for (int i = 0; i < 8; i++)
    v = v << 8 | h[i];
  return v;
}

/* The guest: on cue, fresh clusters until the active layer's refcount
 * table has moved (its header names another table). */
static void *
guest_thread (void *arg)
{
  struct fx *f = arg;
  uint64_t first = header_reftable (active_path);

  pthread_mutex_lock (&mu);
  while (!cue && !stop)
    pthread_cond_wait (&cv, &mu);
  pthread_mutex_unlock (&mu);
  if (stop)
    return NULL;
  while (header_reftable (active_path) == first) {
    if (f->next_off + 4096 > SIZE) {
      snprintf (f->error, sizeof f->error, "the table did not move");
      break;
    }
    if (guest_write (f, f->next_off, 4096) == -1) {
      snprintf (f->error, sizeof f->error, "pwrite at %" PRIu64 ": %s",
                f->next_off, cow_last_error ());
      break;
    }
    f->next_off += 4096;
  }
  pthread_mutex_lock (&mu);
  grown = true;
  pthread_cond_broadcast (&cv);
  pthread_mutex_unlock (&mu);
  return NULL;
}

enum kind { COMMIT, PULL, DELETE };

static void
run (enum kind kind, const char *tag, uint64_t seed)
{
  struct fx f;
  struct tu_chain c;
  struct cow_job_opts o = { .force = true };
  pthread_t t;
  uint64_t off;
  char *real;
  int r;

  memset (&f, 0, sizeof f);
  tu_model_init (&f.m, SIZE, CS, seed);
  f.dir = tu_mkdtemp (tag);
  f.base = tu_path (f.dir, "base.raw");
  f.st = tu_path (f.dir, "st");
  tu_fill_random (f.m.data, SIZE, &f.m.seed);
  tu_write_file (f.base, f.m.data, SIZE);
  io_set_ops (fio_quick_ops ());
  f.d = open_disk (&f, f.base);

  /* s1 and s2 with a little each; the active layer filled to a little
   * below the end of the first refcount table's span. */
  write_ok (&f, 0, 65536);
  assert_int_equal (cow_disk_snapshot (f.d, "s1", NULL), 0);
  write_ok (&f, 32768, 65536);
  assert_int_equal (cow_disk_snapshot (f.d, "s2", NULL), 0);
  tu_chain_get (f.d, &c);
  real = realpath (c.path[c.n - 1], NULL);
  assert_non_null (real);
  snprintf (active_path, sizeof active_path, "%s", real);
  free (real);
  tu_chain_free (&c);
  for (off = 1u << 20; tu_file_size (active_path) < REFTABLE_SPAN - 512 * 1024;
       off += 65536) {
    assert_true (off + 65536 <= CUE_REGION);
    write_ok (&f, off, 65536);
  }
  assert_int_equal (cow_disk_flush (f.d), 0);
  assert_int_equal (header_reftable (active_path), CS);

  f.next_off = CUE_REGION;
  cue = grown = stop = cue_given = grown_in_time = false;
  assert_int_equal (pthread_create (&t, NULL, guest_thread, &f), 0);
  __atomic_store_n (&armed, 1, __ATOMIC_SEQ_CST);
  io_set_ops (&cue_ops);
  if (kind == COMMIT) {
    o.top = "s2";
    o.base = "s1";
    r = cow_disk_commit (f.d, &o);
  }
  else if (kind == PULL) {
    o.base = "s1";
    r = cow_disk_pull (f.d, &o);
  }
  else
    r = cow_disk_delete (f.d, "s2", &o);
  if (r == 0)
    r = cow_disk_job_wait (f.d);
  if (r == -1)
    print_error ("%s: %s\n", tag, cow_last_error ());
  assert_int_equal (r, 0);
  pthread_mutex_lock (&mu);
  stop = true;
  pthread_cond_broadcast (&cv);
  pthread_mutex_unlock (&mu);
  pthread_join (t, NULL);
  io_set_ops (fio_quick_ops ());
  __atomic_store_n (&armed, 0, __ATOMIC_SEQ_CST);
  if (f.error[0])
    print_error ("%s: the guest thread: %s\n", tag, f.error);
  assert_int_equal (f.error[0], '\0');
  /* The job rewrote the active layer's header. */
  assert_true (cue_given);
  print_message ("%s: the refcount table moved %s the header rewrite\n",
                 tag, grown_in_time ? "inside" : "right after");

  verify (&f, tag);
  assert_int_equal (cow_disk_flush (f.d), 0);
  tu_chain_get (f.d, &c);
  assert_int_equal (c.n, 2);
  assert_int_equal (cow_disk_close (f.d), 0);
  /* The table moved: the header names the new one, not the first (which
   * was freed when it moved). */
  if (header_reftable (active_path) == CS)
    print_error ("%s: the header of %s names the first refcount table "
                 "again\n", tag, active_path);
  for (size_t i = 0; i < c.n; i++)
    tu_assert_check_clean (c.path[i]);
  assert_true (header_reftable (active_path) != CS);
  tu_chain_free (&c);
  f.d = open_disk (&f, NULL);
  verify (&f, tag);
  assert_int_equal (cow_disk_close (f.d), 0);

  tu_rmtree (f.dir);
  free (f.dir);
  free (f.base);
  free (f.st);
  tu_model_fini (&f.m);
}

static void
test_commit_under_active (void **state)
{
  (void) state;
  run (COMMIT, "reftable-commit", 1);
}

static void
test_pull_into_active (void **state)
{
  (void) state;
  run (PULL, "reftable-pull", 2);
}

static void
test_delete_newest_snapshot (void **state)
{
  (void) state;
  run (DELETE, "reftable-delete", 3);
}

int
main (int argc, char **argv)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test (test_commit_under_active),
    cmocka_unit_test (test_pull_into_active),
    cmocka_unit_test (test_delete_newest_snapshot),
  };

  cue_ops = *fio_quick_ops ();
  cue_ops.pread = cue_pread;
  if (argc > 1)
    cmocka_set_test_filter (argv[1]);
  return cmocka_run_group_tests (tests, NULL, NULL);
}
