/* SPDX-License-Identifier: BSD-3-Clause */
/* Images seen from outside a disk (cowchain.h: cow_image_info; the
 * check, cow_image_check, is qcow2-check.c): what `cowchain info` shows of
 * any qcow2 or raw file.  The header fields come from the qcow2 driver's
 * own open layer, so that front ends need none of its private
 * structures. */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cowchain.h"
#include "backing.h"
#include "error.h"
#include "image.h"
#include "io.h"
#include "layer.h"
#include "qcow2.h"

static char *
dup_or_error (const char *s)
{
  char *r = strdup (s);

  if (r == NULL)
    cow_error_set (ENOMEM, "out of memory");
  return r;
}

static int
qcow2_info (const char *path, unsigned flags, struct cow_image_info *ii)
{
  struct layer *l = qcow2_open (path, LAYER_RDONLY
                                | (flags & COW_IMAGE_FORCE_SHARE
                                   ? LAYER_FORCE_SHARE : 0),
                                1u << 20);
  struct qcow2 *q;
  int r = -1;

  if (l == NULL)
    return -1;
  q = (struct qcow2 *) l;
  ii->format = "qcow2";
  ii->virtual_size = l->size;
  ii->cluster_size = q->cluster_size;
  ii->version = q->version;
  ii->refcount_bits = 1u << q->refcount_order;
  ii->lazy_refcounts = q->compat & 1;
  ii->corrupt = q->incompat & QCOW2_INCOMPAT_CORRUPT;
  ii->dirty = q->incompat & QCOW2_INCOMPAT_DIRTY;
  ii->extended_l2 = q->ext_l2;
  if (q->backing_file
      && (ii->backing_file = dup_or_error (q->backing_file)) == NULL)
    goto out;
  if (q->backing_format
      && (ii->backing_format = dup_or_error (q->backing_format)) == NULL)
    goto out;
  if (ii->backing_file) {
    /* json: names and URLs are shown, never opened: no path. */
    ii->full_backing = backing_path (path, ii->backing_file);
    if (ii->full_backing == NULL && cow_last_errno () != EPERM)
      goto out;
  }
  r = 0;
 out:
  l->ops->close (l);
  return r;
}

static int
raw_info (const char *path, struct cow_image_info *ii)
{
  int fd = image_open (path, O_RDONLY, 0);
  off_t end;

  if (fd == -1)
    return -1;
  /* lseek rather than st_size, which is 0 for a block device. */
  end = lseek (fd, 0, SEEK_END);
  if (end == -1) {
    cow_error_set (errno, "%s: cannot find its size: %s", path,
                   strerror (errno));
    io_close (fd);
    return -1;
  }
  io_close (fd);
  ii->format = "raw";
  ii->virtual_size = (uint64_t) end;
  return 0;
}

int
cow_image_info (const char *path, const char *format, const char *referrer,
                unsigned flags, struct cow_image_info *ii)
{
  struct stat st;
  int is_qcow2, r;

  memset (ii, 0, sizeof *ii);
  ii->filename = dup_or_error (path);
  if (ii->filename == NULL)
    return -1;
  if (stat (path, &st) == -1) {
    int e = errno;
    if (referrer)
      cow_error_set (e, "%s: %s (the backing file of %s)", path,
                     strerror (e), referrer);
    else
      cow_error_set (e, "%s: %s", path, strerror (e));
    goto err;
  }
  ii->dev = (uint64_t) st.st_dev;
  ii->ino = (uint64_t) st.st_ino;
  ii->actual_size = (uint64_t) st.st_blocks * 512;
  if (format == NULL) {
    is_qcow2 = qcow2_probe (path);
    if (is_qcow2 == -1)
      goto err;
  }
  else
    is_qcow2 = strcmp (format, "qcow2") == 0;
  r = is_qcow2 ? qcow2_info (path, flags, ii) : raw_info (path, ii);
  if (r == 0)
    return 0;
 err:
  cow_image_info_clear (ii);
  return -1;
}

void
cow_image_info_clear (struct cow_image_info *ii)
{
  free (ii->filename);
  free (ii->backing_file);
  free (ii->backing_format);
  free (ii->full_backing);
  memset (ii, 0, sizeof *ii);
}
