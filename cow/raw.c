/* SPDX-License-Identifier: BSD-3-Clause */
/* A raw image file as a layer: every byte is present.  Used for bases,
 * which are opened read-only.  Holes of a sparse file are reported as
 * zero so that copies stay sparse. */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "error.h"
#include "image.h"
#include "io.h"
#include "layer.h"

struct raw {
  struct layer layer;
  int fd;
};

static int
raw_read (struct layer *l, void *buf, uint32_t count, uint64_t offset,
          const struct layer_below *below)
{
  struct raw *r = (struct raw *) l;
  uint32_t n = count;

  if (offset >= l->size) {
    memset (buf, 0, count);
    return 0;
  }
  if (offset + count > l->size) {
    n = (uint32_t) (l->size - offset);
    memset ((char *) buf + n, 0, count - n);
  }
  if (io_pread (r->fd, buf, n, offset) == -1) {
    cow_error_errno ("%s: read at offset %" PRIu64, l->path, offset);
    return -1;
  }
  return 0;
}

static int
raw_write (struct layer *l, const void *buf, uint32_t count, uint64_t offset,
           const struct layer_below *below)
{
  struct raw *r = (struct raw *) l;

  if (l->readonly) {
    cow_error_set (EROFS, "%s: layer is read-only", l->path);
    return -1;
  }
  if (io_pwrite (r->fd, buf, count, offset) == -1) {
    cow_error_errno ("%s: write at offset %" PRIu64, l->path, offset);
    return -1;
  }
  return 0;
}

static int
raw_zero (struct layer *l, uint32_t count, uint64_t offset, bool fast,
          const struct layer_below *below)
{
  void *z;
  int r;

  if (fast) {
    cow_error_set (ENOTSUP, "%s: fast zero not supported", l->path);
    return -1;
  }
  z = calloc (1, count);
  if (z == NULL) {
    cow_error_errno ("calloc");
    return -1;
  }
  r = raw_write (l, z, count, offset, below);
  free (z);
  return r;
}

static int
raw_trim (struct layer *l, uint32_t count, uint64_t offset)
{
  return 0;
}

static int
raw_flush (struct layer *l)
{
  struct raw *r = (struct raw *) l;

  if (l->readonly)
    return 0;
  if (io_fsync (r->fd) == -1) {
    cow_error_errno ("%s: fsync", l->path);
    return -1;
  }
  return 0;
}

static int
raw_map (struct layer *l, uint64_t offset, uint64_t count, uint64_t *len,
         enum layer_status *status)
{
  struct raw *r = (struct raw *) l;
  off_t data, hole;

  if (offset >= l->size) {
    *len = count;
    *status = LAYER_ZERO;
    return 0;
  }
  if (count > l->size - offset)
    count = l->size - offset;
  data = lseek (r->fd, (off_t) offset, SEEK_DATA);
  if (data == -1 && errno == ENXIO) {        /* a hole up to the end */
    *len = count;
    *status = LAYER_ZERO;
    return 0;
  }
  if (data == -1) {                          /* no SEEK_DATA: all data */
    *len = count;
    *status = LAYER_DATA;
    return 0;
  }
  if ((uint64_t) data > offset) {
    *len = (uint64_t) data - offset;
    if (*len > count)
      *len = count;
    *status = LAYER_ZERO;
    return 0;
  }
  hole = lseek (r->fd, (off_t) offset, SEEK_HOLE);
  if (hole == -1 || (uint64_t) hole <= offset)
    hole = (off_t) (offset + count);
  *len = (uint64_t) hole - offset;
  if (*len > count)
    *len = count;
  *status = LAYER_DATA;
  return 0;
}

static int
raw_close (struct layer *l)
{
  struct raw *r = (struct raw *) l;
  int ret = raw_flush (l);

  io_close (r->fd);
  image_lock_release (l->lock);
  free (l->path);
  free (r);
  return ret;
}

/* A base that a commit writes into (allow-base-write). */
static int
raw_reopen_rw (struct layer *l)
{
  struct raw *r = (struct raw *) l;

  /* Writer first (also when the descriptor is writable already: a
   * finished commit gave the permission back). */
  if (!l->readonly)
    return l->lock ? image_lock_change (l->lock, IMAGE_WRITER) : 0;
  /* Writer first (another disk may share this base): a conflict leaves
   * the base as it was. */
  if (image_lock_change (l->lock, IMAGE_WRITER) == -1)
    return -1;
  if (io_reopen_rw (l->path, r->fd) == -1) {
    cow_error_errno ("%s: cannot open for writing", l->path);
    return -1;
  }
  l->readonly = false;
  return 0;
}

static int
raw_writeback (struct layer *l, uint64_t *pos, uint64_t max, bool wait)
{
  return io_writeback (((struct raw *) l)->fd, pos, max, wait);
}

static const struct layer_ops raw_ops = {
  .kind = "raw",
  .read = raw_read,
  .write = raw_write,
  .zero = raw_zero,
  .trim = raw_trim,
  .flush = raw_flush,
  .map = raw_map,
  .close = raw_close,
  .reopen_rw = raw_reopen_rw,
  .writeback = raw_writeback,
};

struct layer *
raw_open (const char *path, unsigned flags)
{
  struct raw *r = calloc (1, sizeof *r);
  const bool readonly = flags & LAYER_RDONLY;
  uint64_t size;

  if (r == NULL) {
    cow_error_errno ("calloc");
    return NULL;
  }
  r->fd = image_open (path, readonly ? O_RDONLY : O_RDWR,
                      (flags & LAYER_NOFOLLOW) ? IMAGE_NOFOLLOW : 0);
  if (r->fd == -1) {
    free (r);
    return NULL;
  }
  r->layer.lock = image_lock_take (path, r->fd,
                                   layer_lock_access (flags));
  if (r->layer.lock == NULL)
    goto err;
  if (io_file_size (r->fd, &size) == -1) {
    cow_error_errno ("%s: stat", path);
    goto err;
  }
  r->layer.path = strdup (path);
  if (r->layer.path == NULL) {
    cow_error_errno ("strdup");
    goto err;
  }
  r->layer.ops = &raw_ops;
  r->layer.size = size;
  r->layer.readonly = readonly;
  return &r->layer;

 err:
  io_close (r->fd);
  image_lock_release (r->layer.lock);
  free (r->layer.path);
  free (r);
  return NULL;
}
