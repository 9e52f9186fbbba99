/* SPDX-License-Identifier: BSD-3-Clause */
/* Opening image files safely, and locking them the way QEMU does.
 *
 * image_open refuses anything but a regular file or a block device (a
 * FIFO named as a base must not hang the server), and with
 * IMAGE_NOFOLLOW a symbolic link (names inside a state directory).
 *
 * An image lock follows QEMU's convention (block/file-posix.c), so that
 * QEMU, qemu-img, qemu-io and a second cowchain see each other: OFD
 * locks on single bytes, a shared lock at 100 + bit for each permission
 * held and at 200 + bit for each permission not shared with others.
 * Taking a lock means: lock the bytes, then test that nobody else holds
 * the opposite bytes; on a conflict the bytes are given back.
 *
 * OFD locks belong to an open file description, so every lock lives on
 * a descriptor of its own, opened for it and kept until the image is
 * closed: the I/O descriptor may be replaced (io_reopen_rw) or joined by
 * a second one (qcow2_set_backing, check) without losing the lock.  Two
 * readers, even in one process, share; a second writer is refused.
 */
#ifndef COW_IMAGE_H
#define COW_IMAGE_H

#include <stdbool.h>

/* QEMU's permission bits (include/block/block-common.h). */
#define IMAGE_PERM_CONSISTENT_READ 0x01u
#define IMAGE_PERM_WRITE           0x02u
#define IMAGE_PERM_WRITE_UNCHANGED 0x04u
#define IMAGE_PERM_RESIZE          0x08u
#define IMAGE_PERM_COUNT           4

/* The two ways cowchain holds an image.
 * Reader: consistent-read, not sharing write or resize (as QEMU holds a
 *   backing file): others may read, nobody may write.
 * Writer: consistent-read, write and resize, not sharing write or
 *   resize: nobody else may write, readers must use qemu-img -U. */
enum image_access {
  IMAGE_READER,
  IMAGE_WRITER,
  /* Consistent-read, sharing everything (qemu-img -U, "force share"):
   * for looking at an image that a running server holds. */
  IMAGE_FORCE_SHARE,
};

/* image_open flags, besides O_RDONLY or O_RDWR. */
#define IMAGE_NOFOLLOW 0x1u

/* Open path (flags: O_RDONLY or O_RDWR) and check it is a regular file
 * or a block device.  Returns the descriptor, or -1 with the engine's
 * error set (the message names path and what is wrong). */
int image_open (const char *path, int flags, unsigned how);

struct image_lock;

/* Lock the image open on fd (path: its name, for the lock's own
 * descriptor and for messages).  Returns NULL with the error set
 * (EBUSY if another process holds it). */
struct image_lock *image_lock_take (const char *path, int fd,
                                    enum image_access a);
/* Change how the image is held (a base that a commit will write).  On a
 * conflict the lock stays as it was.  -1 with the error set. */
int image_lock_change (struct image_lock *lk, enum image_access a);
/* How a layer opened with LAYER_* flags (layer.h) is held. */
enum image_access layer_lock_access (unsigned layer_flags);
/* Release the lock (NULL: nothing). */
void image_lock_release (struct image_lock *lk);

/* State directories: flock on the directory itself, so that no file
 * needs to exist (and none can be deleted to defeat it).  exclusive for
 * servers and writing tools, shared for read-only tools.  Returns the
 * directory's descriptor (keep it open while the lock is needed) or -1
 * with the error set, naming the holder if /proc/locks tells. */
int image_lock_dir (const char *dir, bool exclusive);

#endif /* COW_IMAGE_H */
