/* SPDX-License-Identifier: BSD-3-Clause */
/* Fault injection through the engine's I/O seam: see faultio.h. */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stddef.h>

#include "faultio.h"
#include "testutil.h"

static struct io_ops quick_ops, fault_ops;
static pthread_once_t init_once = PTHREAD_ONCE_INIT;

/* The fault, field by field: threads read it while another arms it. */
static int f_armed;
static long f_at;
static int f_err;
static bool f_once;
static unsigned f_ops;
static bool f_real_fsync;
static bool (*f_filter) (unsigned, const char *, const char *, int);
static long f_steps;
static long f_failed;

/* Whether this operation may go on; false (errno set) when it is the
 * step that fails. */
static bool
step (unsigned op, const char *path, const char *path2, int fd)
{
  bool (*filter) (unsigned, const char *, const char *, int);
  long i, at;

  if (!__atomic_load_n (&f_armed, __ATOMIC_SEQ_CST))
    return true;
  if ((__atomic_load_n (&f_ops, __ATOMIC_SEQ_CST) & op) == 0)
    return true;
  filter = __atomic_load_n (&f_filter, __ATOMIC_SEQ_CST);
  if (filter && !filter (op, path, path2, fd))
    return true;
  i = __atomic_fetch_add (&f_steps, 1, __ATOMIC_SEQ_CST);
  at = __atomic_load_n (&f_at, __ATOMIC_SEQ_CST);
  if (i < at || (i > at && __atomic_load_n (&f_once, __ATOMIC_SEQ_CST)))
    return true;
  __atomic_add_fetch (&f_failed, 1, __ATOMIC_SEQ_CST);
  errno = __atomic_load_n (&f_err, __ATOMIC_SEQ_CST);
  return false;
}

static int
s_open (const char *path, int flags, mode_t mode)
{
  if ((flags & (O_CREAT | O_TRUNC)) && !step (FIO_OPEN, path, NULL, -1))
    return -1;
  return io_real_ops.open (path, flags, mode);
}

static ssize_t
s_pwrite (int fd, const void *b, size_t n, off_t o)
{
  return step (FIO_PWRITE, NULL, NULL, fd) ? io_real_ops.pwrite (fd, b, n, o)
    : -1;
}

static int
s_fsync (int fd)
{
  if (!step (FIO_FSYNC, NULL, NULL, fd))
    return -1;
  if (__atomic_load_n (&f_armed, __ATOMIC_SEQ_CST)
      && __atomic_load_n (&f_real_fsync, __ATOMIC_SEQ_CST))
    return io_real_ops.fsync (fd);
  return 0;
}

static int
s_ftruncate (int fd, off_t l)
{
  return step (FIO_FTRUNCATE, NULL, NULL, fd) ? io_real_ops.ftruncate (fd, l)
    : -1;
}

static int
s_fallocate (int fd, int m, off_t o, off_t l)
{
  return step (FIO_FALLOCATE, NULL, NULL, fd)
    ? io_real_ops.fallocate (fd, m, o, l) : -1;
}

static int
s_rename (const char *a, const char *b)
{
  return step (FIO_RENAME, a, b, -1) ? io_real_ops.rename (a, b) : -1;
}

static int
s_rename_noreplace (const char *a, const char *b)
{
  return step (FIO_RENAME_NOREPLACE, a, b, -1)
    ? io_real_ops.rename_noreplace (a, b) : -1;
}

static int
s_unlink (const char *p)
{
  return step (FIO_UNLINK, p, NULL, -1) ? io_real_ops.unlink (p) : -1;
}

static void
init (void)
{
  quick_ops = io_real_ops;
  quick_ops.fsync = tu_nosync;
  fault_ops = io_real_ops;
  fault_ops.open = s_open;
  fault_ops.pwrite = s_pwrite;
  fault_ops.fsync = s_fsync;
  fault_ops.ftruncate = s_ftruncate;
  fault_ops.fallocate = s_fallocate;
  fault_ops.rename = s_rename;
  fault_ops.rename_noreplace = s_rename_noreplace;
  fault_ops.unlink = s_unlink;
}

const struct io_ops *
fio_quick_ops (void)
{
  pthread_once (&init_once, init);
  return &quick_ops;
}

const struct io_ops *
fio_ops (void)
{
  pthread_once (&init_once, init);
  return &fault_ops;
}

void
fio_arm (const struct fio_fault *f)
{
  __atomic_store_n (&f_at, f->at, __ATOMIC_SEQ_CST);
  __atomic_store_n (&f_err, f->err ? f->err : EIO, __ATOMIC_SEQ_CST);
  __atomic_store_n (&f_once, f->once, __ATOMIC_SEQ_CST);
  __atomic_store_n (&f_ops, f->ops ? f->ops : (unsigned) FIO_WRITE_SIDE,
                    __ATOMIC_SEQ_CST);
  __atomic_store_n (&f_real_fsync, f->real_fsync, __ATOMIC_SEQ_CST);
  __atomic_store_n (&f_filter, f->filter, __ATOMIC_SEQ_CST);
  __atomic_store_n (&f_steps, 0, __ATOMIC_SEQ_CST);
  __atomic_store_n (&f_failed, 0, __ATOMIC_SEQ_CST);
  __atomic_store_n (&f_armed, 1, __ATOMIC_SEQ_CST);
}

void
fio_arm_count (void)
{
  fio_arm (&(struct fio_fault) { .at = FIO_NEVER });
}

void
fio_arm_kill (long at)
{
  fio_arm (&(struct fio_fault) { .at = at, .err = EIO });
}

void
fio_disarm (void)
{
  __atomic_store_n (&f_armed, 0, __ATOMIC_SEQ_CST);
}

struct fio_fault
fio_current (void)
{
  return (struct fio_fault) {
    .at = __atomic_load_n (&f_at, __ATOMIC_SEQ_CST),
    .err = __atomic_load_n (&f_err, __ATOMIC_SEQ_CST),
    .once = __atomic_load_n (&f_once, __ATOMIC_SEQ_CST),
    .ops = __atomic_load_n (&f_ops, __ATOMIC_SEQ_CST),
    .real_fsync = __atomic_load_n (&f_real_fsync, __ATOMIC_SEQ_CST),
    .filter = __atomic_load_n (&f_filter, __ATOMIC_SEQ_CST),
  };
}

long
fio_steps (void)
{
  return __atomic_load_n (&f_steps, __ATOMIC_SEQ_CST);
}

long
fio_failed (void)
{
  return __atomic_load_n (&f_failed, __ATOMIC_SEQ_CST);
}
