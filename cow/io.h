/* SPDX-License-Identifier: BSD-3-Clause */
/* The one I/O seam of the engine.  Every pread, pwrite, fsync, ftruncate,
 * fallocate and rename of the engine goes through these functions, so that
 * tests can inject errors (EIO, ENOSPC, short writes) and simulate power
 * loss by replacing the operations table.
 *
 * io_pread and io_pwrite transfer the whole count or fail: a short write
 * is retried, and a write that cannot progress fails with ENOSPC.  A read
 * past end of file fills the rest with zeroes (a qcow2 file may end
 * before a cluster that was allocated but not yet written).
 */
#ifndef COW_IO_H
#define COW_IO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct io_ops {
  int (*open) (const char *path, int flags, mode_t mode);
  int (*close) (int fd);
  ssize_t (*pread) (int fd, void *buf, size_t count, off_t offset);
  ssize_t (*pwrite) (int fd, const void *buf, size_t count, off_t offset);
  int (*fsync) (int fd);
  int (*ftruncate) (int fd, off_t length);
  int (*fallocate) (int fd, int mode, off_t offset, off_t len);
  int (*rename) (const char *from, const char *to);
  int (*unlink) (const char *path);
  /* rename that fails with EEXIST rather than replace 'to'; NULL in a
   * test's table: the real one. */
  int (*rename_noreplace) (const char *from, const char *to);
};

/* The real system calls. */
extern const struct io_ops io_real_ops;

/* Replace the table (tests only); NULL restores the real one.  Not
 * thread-safe: call it while no disk is open. */
void io_set_ops (const struct io_ops *ops);

int io_open (const char *path, int flags, mode_t mode);
int io_close (int fd);
int io_pread (int fd, void *buf, size_t count, uint64_t offset);
int io_pwrite (int fd, const void *buf, size_t count, uint64_t offset);
int io_fsync (int fd);
int io_ftruncate (int fd, uint64_t length);
int io_punch_hole (int fd, uint64_t offset, uint64_t len);
int io_rename (const char *from, const char *to);
/* rename, but never over an existing name (file, symbolic link, any):
 * fails with EEXIST. */
int io_rename_noreplace (const char *from, const char *to);
int io_unlink (const char *path);
/* Make fd (open read-only on path) read-write, atomically: the file is
 * opened again for writing and the new descriptor takes fd's number, so
 * I/O running on fd meanwhile goes on unharmed.  Fails (EBUSY) if path
 * no longer names the file that fd has open. */
int io_reopen_rw (const char *path, int fd);
/* fsync the directory that holds path. */
int io_fsync_dir_of (const char *path);
int io_file_size (int fd, uint64_t *size);
/* Start writing fd's dirty pages in [*pos, *pos+max) to the disk and
 * advance *pos (to at most the file's end); wait: return once they are
 * written.  A pace for the flush to come (merges, the frozen layer of a
 * snapshot), not a promise: it makes nothing durable (no metadata, no
 * disk cache), so it is not an operation of the seam's table and a
 * power-loss test still treats the pages as unsynced.  Returns 1 while
 * the file goes on past *pos, 0 at its end, -1 with errno. */
int io_writeback (int fd, uint64_t *pos, uint64_t max, bool wait);

#endif /* COW_IO_H */
