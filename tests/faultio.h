/* SPDX-License-Identifier: BSD-3-Clause */
/* Fault injection through the engine's I/O seam (cow/io.h), shared by
 * the C tests: one place that counts write-side steps and fails step N
 * (or N and every later one: a kill, or a disk gone bad) with an errno.
 *
 * A "step" is a write-side operation that the armed fault selects:
 * pwrite, fsync, ftruncate, fallocate, rename, rename_noreplace,
 * unlink, and (if asked) an open that creates or truncates.  Reads and
 * other opens are never steps.  Steps are counted from 0 at arming;
 * the counters are atomic, so job threads may do I/O while armed.
 *
 * A killed process loses nothing the page cache holds, so fsync through
 * these tables does nothing (it is a step all the same) unless the
 * fault asks for real ones. */
#ifndef COW_FAULTIO_H
#define COW_FAULTIO_H

#include <limits.h>
#include <stdbool.h>

#include "io.h"

/* The real calls but for fsync, which does nothing: for tests that
 * check something other than durability, and for the I/O around an
 * armed fault.  Copy it to add hooks of one's own. */
const struct io_ops *fio_quick_ops (void);

/* The table that counts and fails steps (like fio_quick_ops while
 * disarmed).  Install it with io_set_ops. */
const struct io_ops *fio_ops (void);

/* Operations, for fio_fault.ops and the filter. */
enum {
  FIO_PWRITE = 1 << 0,
  FIO_FSYNC = 1 << 1,
  FIO_FTRUNCATE = 1 << 2,
  FIO_FALLOCATE = 1 << 3,
  FIO_RENAME = 1 << 4,
  FIO_RENAME_NOREPLACE = 1 << 5,
  FIO_UNLINK = 1 << 6,
  FIO_OPEN = 1 << 7,            /* with O_CREAT or O_TRUNC only */
  /* Every write-side operation but open. */
  FIO_WRITE_SIDE = (1 << 7) - 1,
  FIO_ALL = (1 << 8) - 1,
};

/* A step that never comes: arm with it to count steps only. */
#define FIO_NEVER (LONG_MAX / 2)

struct fio_fault {
  long at;                      /* the first step that fails */
  int err;                      /* its errno; 0: EIO */
  bool once;                    /* step 'at' alone fails (a transient
                                 * fault); else it and every later one */
  unsigned ops;                 /* which operations are steps; 0:
                                 * FIO_WRITE_SIDE */
  bool real_fsync;              /* fsync really syncs */
  /* Which operations are steps, beyond ops (NULL: all of them): op is
   * one FIO_* bit; path is the file named (open, unlink, rename's
   * source) or NULL, path2 rename's target or NULL, fd the descriptor
   * or -1. */
  bool (*filter) (unsigned op, const char *path, const char *path2, int fd);
};

/* Arm (or re-arm) the fault and zero the counters. */
void fio_arm (const struct fio_fault *f);
/* Shorthands: count steps only; steps 'at' and after fail with EIO (a
 * kill: nothing after it reaches the disk). */
void fio_arm_count (void);
void fio_arm_kill (long at);
void fio_disarm (void);
/* The fault last armed. */
struct fio_fault fio_current (void);

/* Steps taken since arming (failed ones included), and those failed. */
long fio_steps (void);
long fio_failed (void);

#endif /* COW_FAULTIO_H */
