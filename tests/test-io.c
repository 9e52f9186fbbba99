/* SPDX-License-Identifier: BSD-3-Clause */
/* Unit tests of the I/O seam: full transfers, zero fill past end of
 * file, retried short writes, and errors passed through; and of image
 * locks between descriptors of one process (image.c). */
#undef NDEBUG
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>

#include "error.h"
#include "image.h"
#include "io.h"

static char path[] = "/tmp/cowchain-test-io-XXXXXX";

static ssize_t
short_pwrite (int fd, const void *buf, size_t count, off_t offset)
{
  /* At most 3 bytes at a time. */
  return io_real_ops.pwrite (fd, buf, count > 3 ? 3 : count, offset);
}

static ssize_t
enospc_pwrite (int fd, const void *buf, size_t count, off_t offset)
{
  errno = ENOSPC;
  return -1;
}

static void
test_roundtrip (void **state)
{
  int fd = mkstemp (path);
  char out[10], in[16];

  assert_true (fd >= 0);
  close (fd);
  fd = io_open (path, O_RDWR, 0);
  assert_true (fd >= 0);
  assert_int_equal (io_pwrite (fd, "0123456789", 10, 0), 0);
  assert_int_equal (io_pread (fd, out, 10, 0), 0);
  assert_memory_equal (out, "0123456789", 10);
  /* Past the end of the file reads as zeroes. */
  memset (in, 'x', sizeof in);
  assert_int_equal (io_pread (fd, in, sizeof in, 4), 0);
  assert_memory_equal (in, "456789\0\0\0\0\0\0\0\0\0\0", 16);
  io_close (fd);
  unlink (path);
}

static void
test_short_writes (void **state)
{
  struct io_ops ops = io_real_ops;
  char path2[] = "/tmp/cowchain-test-io-XXXXXX";
  int fd = mkstemp (path2);
  char out[11];

  assert_true (fd >= 0);
  ops.pwrite = short_pwrite;
  io_set_ops (&ops);
  assert_int_equal (io_pwrite (fd, "abcdefghij", 10, 1), 0);
  io_set_ops (NULL);
  assert_int_equal (io_pread (fd, out, 11, 0), 0);
  assert_memory_equal (out, "\0abcdefghij", 11);
  close (fd);
  unlink (path2);
}

static void
test_errors (void **state)
{
  struct io_ops ops = io_real_ops;
  char path2[] = "/tmp/cowchain-test-io-XXXXXX";
  int fd = mkstemp (path2);

  assert_true (fd >= 0);
  ops.pwrite = enospc_pwrite;
  io_set_ops (&ops);
  errno = 0;
  assert_int_equal (io_pwrite (fd, "x", 1, 0), -1);
  assert_int_equal (errno, ENOSPC);
  io_set_ops (NULL);
  /* Offsets beyond what off_t holds are refused. */
  assert_int_equal (io_pwrite (fd, "x", 1, UINT64_MAX - 1), -1);
  assert_int_equal (errno, EINVAL);
  assert_int_equal (io_open ("/nonexistent/dir/file", O_RDONLY, 0), -1);
  assert_int_equal (errno, ENOENT);
  close (fd);
  unlink (path2);
}

/* Two disks of one server may share a base: readers share, even
 * between descriptors of one process; a writer is refused while anyone
 * else reads, and a refused upgrade keeps the lock as it was. */
static void
test_image_locks (void **state)
{
  char p[] = "/tmp/cowchain-test-lock-XXXXXX";
  int fd = mkstemp (p), fd2;
  struct image_lock *a, *b, *c;

  assert_true (fd >= 0);
  a = image_lock_take (p, fd, IMAGE_READER);
  b = image_lock_take (p, fd, IMAGE_READER);
  assert_non_null (a);
  assert_non_null (b);
  errno = 0;
  assert_null (image_lock_take (p, fd, IMAGE_WRITER));
  assert_int_equal (errno, EBUSY);
  assert_int_equal (image_lock_change (a, IMAGE_WRITER), -1);
  assert_int_equal (errno, EBUSY);
  /* a is still a plain reader: a third reader gets in. */
  c = image_lock_take (p, fd, IMAGE_READER);
  assert_non_null (c);
  image_lock_release (c);
  image_lock_release (b);
  assert_int_equal (image_lock_change (a, IMAGE_WRITER), 0);
  assert_null (image_lock_take (p, fd, IMAGE_READER));
  c = image_lock_take (p, fd, IMAGE_FORCE_SHARE);
  assert_non_null (c);           /* qemu-img -U still reads */
  image_lock_release (c);
  image_lock_release (a);
  a = image_lock_take (p, fd, IMAGE_WRITER);
  assert_non_null (a);
  image_lock_release (a);
  close (fd);
  unlink (p);

  /* A FIFO is refused at once, not waited on. */
  assert_int_equal (mkfifo (p, 0600), 0);
  errno = 0;
  assert_int_equal (image_open (p, O_RDONLY, 0), -1);
  assert_int_equal (errno, EINVAL);
  unlink (p);
  /* A symbolic link is refused with IMAGE_NOFOLLOW. */
  strcpy (p + sizeof p - 7, "XXXXXX");
  fd = mkstemp (p);
  assert_true (fd >= 0);
  close (fd);
  {
    char link[sizeof p + 5];
    snprintf (link, sizeof link, "%s.link", p);
    assert_int_equal (symlink (p, link), 0);
    fd2 = image_open (link, O_RDONLY, 0);
    assert_true (fd2 >= 0);
    close (fd2);
    assert_int_equal (image_open (link, O_RDONLY, IMAGE_NOFOLLOW), -1);
    assert_int_equal (errno, ELOOP);
    unlink (link);
  }
  unlink (p);
  cow_error_clear ();
}

int
main (void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test (test_roundtrip),
    cmocka_unit_test (test_short_writes),
    cmocka_unit_test (test_errors),
    cmocka_unit_test (test_image_locks),
  };
  return cmocka_run_group_tests (tests, NULL, NULL);
}
