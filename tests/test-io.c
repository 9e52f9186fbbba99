/* Unit tests of the I/O seam: full transfers, zero fill past end of
 * file, retried short writes, and errors passed through. */
#undef NDEBUG
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

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

int
main (void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test (test_roundtrip),
    cmocka_unit_test (test_short_writes),
    cmocka_unit_test (test_errors),
  };
  return cmocka_run_group_tests (tests, NULL, NULL);
}
