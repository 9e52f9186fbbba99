/* SPDX-License-Identifier: BSD-3-Clause */
/* The I/O seam: thin wrappers over the system calls, through a table that
 * tests may replace. */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <libgen.h>
#include <stdio.h>

#include "io.h"

static int
real_open (const char *path, int flags, mode_t mode)
{
  return open (path, flags | O_CLOEXEC, mode);
}

static int
real_rename_noreplace (const char *from, const char *to)
{
  if (renameat2 (AT_FDCWD, from, AT_FDCWD, to, RENAME_NOREPLACE) == 0)
    return 0;
  if (errno != EINVAL && errno != ENOSYS)
    return -1;
  /* A file system without RENAME_NOREPLACE: link() never replaces. */
  if (link (from, to) == -1)
    return -1;
  return unlink (from);
}

static int
real_fsync (int fd)
{
  return fdatasync (fd);
}

const struct io_ops io_real_ops = {
  .open = real_open,
  .close = close,
  .pread = pread,
  .pwrite = pwrite,
  .fsync = real_fsync,
  .ftruncate = ftruncate,
  .fallocate = fallocate,
  .rename = rename,
  .unlink = unlink,
  .rename_noreplace = real_rename_noreplace,
};

static const struct io_ops *ops = &io_real_ops;

void
io_set_ops (const struct io_ops *o)
{
  ops = o ? o : &io_real_ops;
}

int
io_open (const char *path, int flags, mode_t mode)
{
  return ops->open (path, flags, mode);
}

int
io_close (int fd)
{
  return ops->close (fd);
}

int
io_pread (int fd, void *buf, size_t count, uint64_t offset)
{
  char *p = buf;

  if (offset > INT64_MAX || count > INT64_MAX - offset) {
    errno = EINVAL;
    return -1;
  }
  while (count > 0) {
    ssize_t r = ops->pread (fd, p, count, (off_t) offset);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    if (r == 0) {               /* past end of file: reads as zeroes */
      memset (p, 0, count);
      return 0;
    }
    p += r;
    count -= (size_t) r;
    offset += (uint64_t) r;
  }
  return 0;
}

int
io_pwrite (int fd, const void *buf, size_t count, uint64_t offset)
{
  const char *p = buf;

  if (offset > INT64_MAX || count > INT64_MAX - offset) {
    errno = EINVAL;
    return -1;
  }
  while (count > 0) {
    ssize_t r = ops->pwrite (fd, p, count, (off_t) offset);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    if (r == 0) {
      errno = ENOSPC;
      return -1;
    }
    p += r;
    count -= (size_t) r;
    offset += (uint64_t) r;
  }
  return 0;
}

int
io_fsync (int fd)
{
  int r;

  do
    r = ops->fsync (fd);
  while (r == -1 && errno == EINTR);
  return r;
}

int
io_ftruncate (int fd, uint64_t length)
{
  if (length > INT64_MAX) {
    errno = EINVAL;
    return -1;
  }
  return ops->ftruncate (fd, (off_t) length);
}

int
io_punch_hole (int fd, uint64_t offset, uint64_t len)
{
  if (offset > INT64_MAX || len > INT64_MAX - offset) {
    errno = EINVAL;
    return -1;
  }
  return ops->fallocate (fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                         (off_t) offset, (off_t) len);
}

int
io_rename (const char *from, const char *to)
{
  return ops->rename (from, to);
}

int
io_rename_noreplace (const char *from, const char *to)
{
  return ops->rename_noreplace ? ops->rename_noreplace (from, to)
    : real_rename_noreplace (from, to);
}

int
io_reopen_rw (const char *path, int fd)
{
  int rw = ops->open (path, O_RDWR | O_NONBLOCK, 0), saved;
  struct stat a, b;

  if (rw == -1)
    return -1;
  if (fstat (fd, &a) == -1 || fstat (rw, &b) == -1)
    goto err;
  if (a.st_dev != b.st_dev || a.st_ino != b.st_ino) {
    errno = EBUSY;              /* the name leads to another file now */
    goto err;
  }
  {
    int fl = fcntl (rw, F_GETFL);
    if (fl == -1 || fcntl (rw, F_SETFL, fl & ~O_NONBLOCK) == -1)
      goto err;
  }
  if (dup2 (rw, fd) == -1) {
  err:
    saved = errno;
    ops->close (rw);
    errno = saved;
    return -1;
  }
  ops->close (rw);
  return 0;
}

int
io_unlink (const char *path)
{
  return ops->unlink (path);
}

int
io_fsync_dir_of (const char *path)
{
  char *copy = strdup (path);
  int fd, r, saved;

  if (copy == NULL)
    return -1;
  fd = ops->open (dirname (copy), O_RDONLY | O_DIRECTORY, 0);
  free (copy);
  if (fd == -1)
    return -1;
  r = io_fsync (fd);
  saved = errno;
  ops->close (fd);
  errno = saved;
  return r;
}

int
io_file_size (int fd, uint64_t *size)
{
  struct stat st;

  if (fstat (fd, &st) == -1)
    return -1;
  *size = (uint64_t) st.st_size;
  return 0;
}

int
io_writeback (int fd, uint64_t *pos, uint64_t max, bool wait)
{
  unsigned flags = SYNC_FILE_RANGE_WRITE;
  uint64_t size, len;

  if (io_file_size (fd, &size) == -1)
    return -1;
  if (*pos >= size)
    return 0;
  len = size - *pos < max ? size - *pos : max;
  if (wait)
    flags |= SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WAIT_AFTER;
  if (sync_file_range (fd, (off64_t) *pos, (off64_t) len, flags) == -1)
    return -1;
  *pos += len;
  return *pos < size;
}
