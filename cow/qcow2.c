/* SPDX-License-Identifier: BSD-3-Clause */
/* qcow2 layer: header and extensions, open, create, close.  Every field
 * read from the file is checked before it sizes an allocation, indexes a
 * table or positions a read; each refusal names the file and the field. */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>

#include "error.h"
#include "image.h"
#include "io.h"
#include "qcow2.h"

int
qcow2_probe (const char *path)
{
  uint8_t magic[QCOW2_HDR_END (magic)];
  uint64_t size;
  int fd = image_open (path, O_RDONLY, 0);

  if (fd == -1)
    return -1;
  if (io_file_size (fd, &size) == -1
      || io_pread (fd, magic, sizeof magic, 0) == -1) {
    cow_error_errno ("%s: cannot read", path);
    io_close (fd);
    return -1;
  }
  io_close (fd);
  return size >= sizeof magic && be32_get (magic) == QCOW2_MAGIC;
}

/* Header extensions between the header and the end of cluster 0 (h:
 * the header cluster). */
static int
parse_extensions (struct qcow2 *q, const uint8_t *h, uint64_t limit)
{
  uint64_t off = q->header_length;

  while (off + QCOW2_EXT_HEADER_SIZE <= limit) {
    uint32_t type, len;

    qcow2_ext_decode (h + off, &type, &len);
    off += QCOW2_EXT_HEADER_SIZE;
    if (type == QCOW2_EXT_END)
      return 0;
    if (len > limit - off) {
      cow_error_set (EINVAL, "%s: header extension 0x%08x: length %u runs "
                     "past the end of the header cluster", q->layer.path,
                     type, len);
      return -1;
    }
    if (type == QCOW2_EXT_BACKING_FORMAT) {
      if (len == 0 || len > 32) {
        cow_error_set (EINVAL, "%s: backing format extension: bad length %u",
                       q->layer.path, len);
        return -1;
      }
      q->backing_format = strndup ((const char *) h + off, len);
      if (q->backing_format == NULL) {
        cow_error_errno ("strndup");
        return -1;
      }
    }
    off += qcow2_ext_padded (len);
  }
  if (off > limit) {
    cow_error_set (EINVAL, "%s: header extensions run past the end of the "
                   "header cluster", q->layer.path);
    return -1;
  }
  return 0;
}

/* h: the header cluster, at least sizeof (struct qcow2_header_be) bytes
 * (zeroes past the end of the file). */
static int
parse_header (struct qcow2 *q, const uint8_t *h, uint64_t file_size,
              bool readonly, bool creating)
{
  const char *f = q->layer.path;
  struct qcow2_header hd;
  uint64_t backing_off, l1_needed, per_l2, incompat_known;
  uint32_t backing_len;

  qcow2_header_decode (&hd, h, sizeof (struct qcow2_header_be));
  if (hd.magic != QCOW2_MAGIC) {
    cow_error_set (EINVAL, "%s: not a qcow2 image (bad magic)", f);
    return -1;
  }
  q->version = hd.version;
  if (q->version != 2 && q->version != 3) {
    cow_error_set (ENOTSUP, "%s: qcow2 version %u is not supported (only 2 "
                   "and 3)", f, q->version);
    return -1;
  }
  q->cluster_bits = hd.cluster_bits;
  if (q->cluster_bits < QCOW2_MIN_CLUSTER_BITS
      || q->cluster_bits > QCOW2_MAX_CLUSTER_BITS) {
    cow_error_set (EINVAL, "%s: cluster_bits %u out of range (%d to %d)", f,
                   q->cluster_bits, QCOW2_MIN_CLUSTER_BITS,
                   QCOW2_MAX_CLUSTER_BITS);
    return -1;
  }
  q->cluster_size = 1ull << q->cluster_bits;
  q->layer.size = hd.size;
  if (q->layer.size > (1ull << 56)) {
    cow_error_set (EINVAL, "%s: virtual size %" PRIu64 " too large", f,
                   q->layer.size);
    return -1;
  }
  if (hd.crypt_method != 0) {
    cow_error_set (ENOTSUP, "%s: encrypted images (crypt_method %u) are not "
                   "supported", f, hd.crypt_method);
    return -1;
  }
  if (q->version == 2) {
    q->header_length = QCOW2_V2_HEADER_LENGTH;
    q->refcount_order = 4;
  }
  else {
    q->incompat = hd.incompatible_features;
    q->compat = hd.compatible_features;
    q->autoclear = hd.autoclear_features;
    q->refcount_order = hd.refcount_order;
    q->header_length = hd.header_length;
    if (q->header_length < QCOW2_V3_HEADER_LENGTH
        || q->header_length > q->cluster_size || q->header_length % 8) {
      cow_error_set (EINVAL, "%s: header_length %u invalid", f,
                     q->header_length);
      return -1;
    }
    if (q->refcount_order > 6) {
      cow_error_set (EINVAL, "%s: refcount_order %u above 6", f,
                     q->refcount_order);
      return -1;
    }
    incompat_known = QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT;
    if (q->incompat & QCOW2_INCOMPAT_DATA_FILE) {
      cow_error_set (ENOTSUP, "%s: incompatible feature 'external data "
                     "file' is not supported", f);
      return -1;
    }
    if (q->incompat & QCOW2_INCOMPAT_COMPRESSION) {
      cow_error_set (ENOTSUP, "%s: incompatible feature 'compression type' "
                     "(non-zlib compression) is not supported", f);
      return -1;
    }
    if (q->incompat & QCOW2_INCOMPAT_EXTL2) {
      if (q->cluster_bits < QCOW2_EXTL2_MIN_CLUSTER_BITS) {
        cow_error_set (EINVAL, "%s: extended L2 entries with clusters of %"
                       PRIu64 " bytes (at least %u needed)", f,
                       q->cluster_size, 1u << QCOW2_EXTL2_MIN_CLUSTER_BITS);
        return -1;
      }
      q->ext_l2 = true;
      incompat_known |= QCOW2_INCOMPAT_EXTL2;
    }
    if (q->incompat & ~incompat_known) {
      cow_error_set (ENOTSUP, "%s: unknown incompatible feature bits 0x%"
                     PRIx64, f, q->incompat & ~incompat_known);
      return -1;
    }
    if (!readonly && (q->incompat & QCOW2_INCOMPAT_CORRUPT)) {
      cow_error_set (EROFS, "%s: image is marked corrupt; it can only be "
                     "opened read-only (repair: qemu-img check -r all)", f);
      return -1;
    }
    if (!readonly && (q->incompat & QCOW2_INCOMPAT_DIRTY)) {
      cow_error_set (EROFS, "%s: image has the dirty bit set (lazy refcounts "
                     "not written back); repair with qemu-img check -r all", f);
      return -1;
    }
  }
  q->rb_bits = q->cluster_bits + 3 - q->refcount_order;
  /* An extended L2 entry is 16 bytes: half as many per table. */
  q->l2_bits = q->cluster_bits - (q->ext_l2 ? 4 : 3);
  q->sc_bits = q->ext_l2 ? q->cluster_bits - 5 : q->cluster_bits;

  /* L1 table. */
  q->l1_size = hd.l1_size;
  q->l1_offset = hd.l1_table_offset;
  per_l2 = 1ull << q->l2_bits;
  l1_needed = (q->layer.size + q->cluster_size * per_l2 - 1)
    / (q->cluster_size * per_l2);
  if ((uint64_t) q->l1_size * 8 > QCOW2_MAX_L1_BYTES) {
    cow_error_set (EFBIG, "%s: L1 table of %u entries is too large", f,
                   q->l1_size);
    return -1;
  }
  if (q->l1_size < l1_needed && !creating) {
    cow_error_set (EINVAL, "%s: L1 table of %u entries is too small for the "
                   "virtual size %" PRIu64, f, q->l1_size, q->layer.size);
    return -1;
  }
  if (q->l1_size && ((q->l1_offset & (q->cluster_size - 1))
                     || q->l1_offset > file_size
                     || (uint64_t) q->l1_size * 8 > file_size - q->l1_offset)) {
    cow_error_set (EINVAL, "%s: L1 table offset %" PRIu64 " is misaligned or "
                   "past the end of the file", f, q->l1_offset);
    return -1;
  }

  /* Refcount table. */
  q->reftable_offset = hd.refcount_table_offset;
  q->reftable_clusters = hd.refcount_table_clusters;
  if ((uint64_t) q->reftable_clusters * q->cluster_size
      > QCOW2_MAX_REFTABLE_BYTES) {
    cow_error_set (EFBIG, "%s: refcount table of %u clusters is too large",
                   f, q->reftable_clusters);
    return -1;
  }
  if (q->reftable_clusters == 0) {
    cow_error_set (EINVAL, "%s: refcount table is empty (0 clusters)", f);
    return -1;
  }
  if (q->reftable_offset & (q->cluster_size - 1)) {
    cow_error_set (EINVAL, "%s: refcount table offset %" PRIu64 " is not "
                   "aligned to the cluster size %" PRIu64, f,
                   q->reftable_offset, q->cluster_size);
    return -1;
  }
  if (q->reftable_offset > file_size
      || (uint64_t) q->reftable_clusters * q->cluster_size
         > file_size - q->reftable_offset) {
    cow_error_set (EINVAL, "%s: refcount table (%u cluster%s at offset %"
                   PRIu64 ") runs past the end of the file (%" PRIu64
                   " bytes)", f, q->reftable_clusters,
                   q->reftable_clusters == 1 ? "" : "s", q->reftable_offset,
                   file_size);
    return -1;
  }

  /* Internal snapshots. */
  q->nb_snapshots = hd.nb_snapshots;
  if (q->nb_snapshots > 65536) {
    cow_error_set (EINVAL, "%s: snapshot count %u too large", f,
                   q->nb_snapshots);
    return -1;
  }
  if (!readonly && q->nb_snapshots > 0) {
    cow_error_set (ENOTSUP, "%s: internal snapshots are not supported in a "
                   "writable layer (%u found)", f, q->nb_snapshots);
    return -1;
  }

  /* Backing file name: within the header cluster. */
  backing_off = hd.backing_file_offset;
  backing_len = hd.backing_file_size;
  if (backing_off) {
    if (backing_len > QCOW2_MAX_BACKING_NAME) {
      cow_error_set (EINVAL, "%s: backing file name of %u bytes is too long",
                     f, backing_len);
      return -1;
    }
    if (backing_off > q->cluster_size
        || backing_len > q->cluster_size - backing_off
        || backing_off < q->header_length) {
      cow_error_set (EINVAL, "%s: backing file name offset %" PRIu64
                     " is outside the header cluster", f, backing_off);
      return -1;
    }
    q->backing_file = strndup ((const char *) h + backing_off, backing_len);
    if (q->backing_file == NULL) {
      cow_error_errno ("strndup");
      return -1;
    }
    if (strlen (q->backing_file) != backing_len) {
      cow_error_set (EINVAL, "%s: backing file name contains a NUL byte", f);
      return -1;
    }
  }
  if (parse_extensions (q, h, backing_off ? backing_off : q->cluster_size) == -1)
    return -1;
  return 0;
}

static int
load_tables (struct qcow2 *q)
{
  uint64_t bytes;

  if (q->l1_size) {
    q->l1 = malloc ((size_t) q->l1_size * 8);
    if (q->l1 == NULL) {
      cow_error_errno ("L1 table");
      return -1;
    }
    if (io_pread (q->fd, q->l1, (size_t) q->l1_size * 8, q->l1_offset) == -1) {
      cow_error_errno ("%s: reading the L1 table", q->layer.path);
      return -1;
    }
    for (uint32_t i = 0; i < q->l1_size; i++)
      q->l1[i] = be64_get (&q->l1[i]);
  }
  bytes = (uint64_t) q->reftable_clusters * q->cluster_size;
  q->reftable_entries = bytes / 8;
  q->reftable = malloc (bytes);
  if (q->reftable == NULL) {
    cow_error_errno ("refcount table");
    return -1;
  }
  if (io_pread (q->fd, q->reftable, bytes, q->reftable_offset) == -1) {
    cow_error_errno ("%s: reading the refcount table", q->layer.path);
    return -1;
  }
  for (uint64_t i = 0; i < q->reftable_entries; i++)
    q->reftable[i] = be64_get (&q->reftable[i]);
  return 0;
}

static void
qcow2_free (struct qcow2 *q)
{
  qcow2_cache_destroy (q->l2_cache);
  qcow2_cache_destroy (q->rb_cache);
  free (q->l1);
  free (q->reftable);
  free (q->inflight);
  free (q->free_unsynced.v);
  free (q->free_flushing.v);
  free (q->free_synced.v);
  free (q->free_ready.v);
  free (q->punch.v);
  free (q->backing_file);
  free (q->backing_format);
  free (q->layer.path);
  image_lock_release (q->layer.lock);
  pthread_mutex_destroy (&q->lock);
  pthread_mutex_destroy (&q->flush_lock);
  pthread_cond_destroy (&q->alloc_done);
  free (q);
}

static int
qcow2_layer_close (struct layer *l)
{
  struct qcow2 *q = (struct qcow2 *) l;
  int r = 0;

  if (!l->readonly) {
    /* The second flush writes the refcounts that the first one freed. */
    r = qcow2_layer_flush (l);
    if (r == 0)
      r = qcow2_layer_flush (l);
  }
  io_close (q->fd);
  qcow2_free (q);
  return r;
}

static int qcow2_layer_reopen_rw (struct layer *l);

static int
qcow2_layer_writeback (struct layer *l, uint64_t *pos, uint64_t max,
                       bool wait)
{
  return io_writeback (((struct qcow2 *) l)->fd, pos, max, wait);
}

static const struct layer_ops qcow2_ops = {
  .kind = "qcow2",
  .read = qcow2_layer_read,
  .write = qcow2_layer_write,
  .zero = qcow2_layer_zero,
  .trim = qcow2_layer_trim,
  .flush = qcow2_layer_flush,
  .map = qcow2_layer_map,
  .close = qcow2_layer_close,
  .reopen_rw = qcow2_layer_reopen_rw,
  .writeback = qcow2_layer_writeback,
};

static struct qcow2 *
open_common (const char *path, unsigned flags, uint64_t cache_size,
             bool creating)
{
  const bool readonly = flags & LAYER_RDONLY;
  struct qcow2 *q = calloc (1, sizeof *q);
  uint8_t *h = NULL;
  uint64_t file_size, n_l2;

  if (q == NULL) {
    cow_error_errno ("calloc");
    return NULL;
  }
  pthread_mutex_init (&q->lock, NULL);
  pthread_mutex_init (&q->flush_lock, NULL);
  pthread_cond_init (&q->alloc_done, NULL);
  q->layer.ops = &qcow2_ops;
  q->layer.readonly = readonly;
  q->layer.path = strdup (path);
  q->fd = -1;
  if (q->layer.path == NULL) {
    cow_error_errno ("strdup");
    goto err;
  }
  q->fd = image_open (path, readonly ? O_RDONLY : O_RDWR,
                      (flags & LAYER_NOFOLLOW) ? IMAGE_NOFOLLOW : 0);
  if (q->fd == -1)
    goto err;
  /* Locked before the header is read: no other writer from here on. */
  q->layer.lock = image_lock_take (path, q->fd,
                                   layer_lock_access (flags));
  if (q->layer.lock == NULL)
    goto err;
  if (io_file_size (q->fd, &file_size) == -1) {
    cow_error_errno ("%s: stat", path);
    goto err;
  }
  if (file_size < QCOW2_V2_HEADER_LENGTH) {
    cow_error_set (EINVAL, "%s: file of %" PRIu64 " bytes is too small for "
                   "a qcow2 header", path, file_size);
    goto err;
  }
  /* The header cluster: its size comes from cluster_bits, which is
   * checked here only to size the buffer (parse_header names a bad one);
   * an out-of-range value reads just the fixed header. */
  {
    uint8_t fixed[sizeof (struct qcow2_header_be)] = { 0 };
    struct qcow2_header hd;
    uint32_t cbits;
    size_t len;

    if (io_pread (q->fd, fixed, sizeof fixed, 0) == -1) {
      cow_error_errno ("%s: reading the header", path);
      goto err;
    }
    qcow2_header_decode (&hd, fixed, sizeof fixed);
    cbits = hd.cluster_bits;
    len = cbits >= QCOW2_MIN_CLUSTER_BITS && cbits <= QCOW2_MAX_CLUSTER_BITS
      ? (size_t) 1 << cbits : sizeof fixed;
    h = calloc (1, len);
    if (h == NULL) {
      cow_error_errno ("calloc");
      goto err;
    }
    if (io_pread (q->fd, h, file_size < len ? file_size : len, 0) == -1) {
      cow_error_errno ("%s: reading the header", path);
      goto err;
    }
  }
  /* When creating, create() fills in the L1 table after opening. */
  if (parse_header (q, h, file_size, readonly, creating) == -1)
    goto err;
  if (load_tables (q) == -1)
    goto err;
  q->file_end = (file_size + q->cluster_size - 1) & ~(q->cluster_size - 1);

  /* cache_size 0: the process's shared budget alone (qcow2-cache.c). */
  n_l2 = cache_size / q->cluster_size;
  if (cache_size && n_l2 == 0)
    n_l2 = 1;                   /* a limit of the least (see create) */
  q->l2_cache = qcow2_cache_create (q, n_l2, true, qcow2_refcounts_sync);
  q->rb_cache = qcow2_cache_create (q, n_l2 / 4 ? n_l2 / 4 : n_l2, false,
                                    NULL);
  if (q->l2_cache == NULL || q->rb_cache == NULL)
    goto err;
  free (h);
  return q;

 err:
  free (h);
  if (q->fd != -1)
    io_close (q->fd);
  qcow2_free (q);
  return NULL;
}

struct layer *
qcow2_open (const char *path, unsigned flags, uint64_t cache_size)
{
  struct qcow2 *q = open_common (path, flags, cache_size, false);

  return q ? &q->layer : NULL;
}

const char *
qcow2_backing_file (struct layer *l)
{
  return ((struct qcow2 *) l)->backing_file;
}

const char *
qcow2_backing_format (struct layer *l)
{
  return ((struct qcow2 *) l)->backing_format;
}

void
qcow2_mark_frozen (struct layer *l)
{
  __atomic_store_n (&((struct qcow2 *) l)->frozen, true, __ATOMIC_RELEASE);
}

bool
layer_is_qcow2 (const struct layer *l)
{
  return l->ops == &qcow2_ops;
}

/* Take writes again (a frozen layer that a merge writes into). */
static int
qcow2_layer_reopen_rw (struct layer *l)
{
  struct qcow2 *q = (struct qcow2 *) l;

  if (!l->readonly) {
    /* A base that a finished commit gave the write permission back. */
    if (l->lock && image_lock_change (l->lock, IMAGE_WRITER) == -1)
      return -1;
    __atomic_store_n (&q->frozen, false, __ATOMIC_RELEASE);
    return 0;
  }
  if (q->incompat & (QCOW2_INCOMPAT_CORRUPT | QCOW2_INCOMPAT_DIRTY)) {
    cow_error_set (EROFS, "%s: image is marked corrupt or dirty; run "
                   "cowchain check -r first", l->path);
    return -1;
  }
  if (q->nb_snapshots > 0) {
    cow_error_set (ENOTSUP, "%s: image has internal snapshots; cowchain "
                   "does not write such images", l->path);
    return -1;
  }
  /* Writer first: a conflict leaves the layer as it was. */
  if (image_lock_change (l->lock, IMAGE_WRITER) == -1)
    return -1;
  if (io_reopen_rw (l->path, q->fd) == -1) {
    cow_error_errno ("%s: cannot open for writing", l->path);
    return -1;
  }
  l->readonly = false;
  __atomic_store_n (&q->frozen, false, __ATOMIC_RELEASE);
  return 0;
}

/* Rewrite the backing file name (NULL: none) and its format in the
 * header cluster, keeping any other header extensions; synced.  Through a
 * descriptor of its own, so that it works on a read-only layer too.
 *
 * The guest may be writing the layer meanwhile, and a write can move the
 * refcount table, which rewrites the header's refcount table fields
 * (grow_reftable, under the lock): a header written from an older read
 * would name the old table, freed by then.  So the header is read,
 * changed and written under the lock, with those fields taken from
 * memory; and the rewrite waits for a running flush (flush_lock, taken
 * first as the flush takes it), so that it and its sync never land in
 * the middle of a flush's ordered writes. */
int
qcow2_set_backing (struct layer *l, const char *name, const char *format)
{
  struct qcow2 *q = (struct qcow2 *) l;
  uint64_t c = q->cluster_size, hl = q->header_length, off, in;
  size_t blen = name ? strlen (name) : 0, flen = format ? strlen (format) : 0;
  uint8_t *old = NULL, *h = NULL;
  struct qcow2_header oldh, hd;
  char *nb = NULL, *nf = NULL;
  int fd = -1, r = -1;
  bool locked = false;

  if ((name && (nb = strdup (name)) == NULL)
      || (format && (nf = strdup (format)) == NULL)
      || (old = malloc (c)) == NULL || (h = calloc (1, c)) == NULL) {
    cow_error_errno ("set backing");
    goto out;
  }
  fd = io_open (l->path, O_RDWR | O_NONBLOCK, 0);
  if (fd == -1) {
    cow_error_errno ("%s: cannot open for writing", l->path);
    goto out;
  }
  {
    /* The name must still lead to this layer's file. */
    struct stat a, b;
    if (fstat (q->fd, &a) == -1 || fstat (fd, &b) == -1) {
      cow_error_errno ("%s: stat", l->path);
      goto out;
    }
    if (a.st_dev != b.st_dev || a.st_ino != b.st_ino) {
      cow_error_set (EBUSY, "%s: the name leads to another file now; the "
                     "backing name is not rewritten", l->path);
      goto out;
    }
  }
  pthread_mutex_lock (&q->flush_lock);
  pthread_mutex_lock (&q->lock);
  locked = true;
  if (io_pread (fd, old, c, 0) == -1) {
    cow_error_errno ("%s: reading the header", l->path);
    goto out;
  }
  /* The header fields as they were (any bytes of a longer header that
   * we have no name for included)... */
  memcpy (h, old, hl);
  qcow2_header_decode (&oldh, old, hl);
  hd = oldh;
  /* ...but the refcount table as it is now; nothing else in the header
   * changes while the layer is open. */
  hd.refcount_table_offset = q->reftable_offset;
  hd.refcount_table_clusters = q->reftable_clusters;
  off = hl;
  /* Other extensions as they were; parse_header checked their bounds. */
  for (in = hl; in + QCOW2_EXT_HEADER_SIZE <= c; ) {
    uint32_t type, len;
    uint64_t step;

    qcow2_ext_decode (old + in, &type, &len);
    step = QCOW2_EXT_HEADER_SIZE + qcow2_ext_padded (len);
    if (type == QCOW2_EXT_END || step > c - in)
      break;
    if (type != QCOW2_EXT_BACKING_FORMAT) {
      if (off + step > c)
        goto too_big;
      memcpy (h + off, old + in, step);
      off += step;
    }
    in += step;
  }
  if (flen) {
    if (off + QCOW2_EXT_HEADER_SIZE + qcow2_ext_padded (flen) > c)
      goto too_big;
    qcow2_ext_encode (h + off, QCOW2_EXT_BACKING_FORMAT, (uint32_t) flen);
    memcpy (h + off + QCOW2_EXT_HEADER_SIZE, format, flen);
    off += QCOW2_EXT_HEADER_SIZE + qcow2_ext_padded (flen);
  }
  off += QCOW2_EXT_HEADER_SIZE;     /* end of extensions (zeroes) */
  if (blen > QCOW2_MAX_BACKING_NAME || off + blen > c)
    goto too_big;
  hd.backing_file_offset = blen ? off : 0;
  hd.backing_file_size = (uint32_t) blen;
  qcow2_header_encode (&hd, h, hl);
  memcpy (h + off, name ? name : "", blen);
  off += blen;
  /* One write of the changed part of the header cluster. */
  {
    uint64_t old_end = q->backing_file
      ? oldh.backing_file_offset + oldh.backing_file_size
      : in + QCOW2_EXT_HEADER_SIZE;
    uint64_t end = off > old_end ? off : old_end;
    if (end > c)
      end = c;
    if (io_pwrite (fd, h, end, 0) == -1 || io_fsync (fd) == -1) {
      cow_error_errno ("%s: rewriting the header", l->path);
      goto out;
    }
  }
  free (q->backing_file);
  free (q->backing_format);
  q->backing_file = nb;
  q->backing_format = nf;
  nb = nf = NULL;
  r = 0;
  goto out;

 too_big:
  cow_error_set (ENAMETOOLONG, "%s: backing file name '%s' does not fit in "
                 "the header cluster", l->path, name ? name : "");
 out:
  if (locked) {
    pthread_mutex_unlock (&q->lock);
    pthread_mutex_unlock (&q->flush_lock);
  }
  if (fd != -1)
    io_close (fd);
  free (old);
  free (h);
  free (nb);
  free (nf);
  return r;
}

bool
qcow2_extended_l2 (struct layer *l)
{
  return ((struct qcow2 *) l)->ext_l2;
}

bool
qcow2_want_extended_l2 (int setting, int version, uint32_t cluster_size)
{
  if (setting < 0 || version == 2)
    return false;
  return cluster_size >= (1u << QCOW2_EXTL2_MIN_CLUSTER_BITS);
}

int
qcow2_version (struct layer *l)
{
  return (int) ((struct qcow2 *) l)->version;
}

uint32_t
qcow2_cluster_size (struct layer *l)
{
  return (uint32_t) ((struct qcow2 *) l)->cluster_size;
}

/* Build cluster 0 (h, zeroed): header, extensions, backing name.  The
 * refcount table is cluster 1 and its one refcount block cluster 2
 * (qcow2_create); the L1 table comes later. */
static int
build_header (uint8_t *h, const struct qcow2_create_opts *o, uint32_t cbits,
              const char *path)
{
  uint64_t c = 1ull << cbits;
  bool v2 = o->version == 2;
  uint64_t hlen = v2 ? QCOW2_V2_HEADER_LENGTH : QCOW2_HEADER_LENGTH_WRITTEN;
  uint64_t off = hlen;
  size_t blen = o->backing_file ? strlen (o->backing_file) : 0;
  size_t flen = o->backing_format ? strlen (o->backing_format) : 0;
  struct qcow2_header hd = {
    .magic = QCOW2_MAGIC,
    .version = v2 ? 2 : 3,
    .cluster_bits = cbits,
    .size = o->size,
    .refcount_table_offset = c,
    .refcount_table_clusters = 1,
    /* Version 3 only: a version 2 header ends before these. */
    .refcount_order = v2 ? 0 : QCOW2_CREATE_REFCOUNT_ORDER,
    .header_length = v2 ? 0 : QCOW2_HEADER_LENGTH_WRITTEN,
    .incompatible_features = o->extended_l2 ? QCOW2_INCOMPAT_EXTL2 : 0,
  };

  if (flen) {
    if (off + QCOW2_EXT_HEADER_SIZE + qcow2_ext_padded (flen)
        + QCOW2_EXT_HEADER_SIZE > c) {
      cow_error_set (EINVAL, "%s: backing format does not fit", path);
      return -1;
    }
    qcow2_ext_encode (h + off, QCOW2_EXT_BACKING_FORMAT, (uint32_t) flen);
    memcpy (h + off + QCOW2_EXT_HEADER_SIZE, o->backing_format, flen);
    off += QCOW2_EXT_HEADER_SIZE + qcow2_ext_padded (flen);
  }
  off += QCOW2_EXT_HEADER_SIZE;     /* end of extensions */
  if (blen) {
    if (blen > QCOW2_MAX_BACKING_NAME || off + blen > c) {
      cow_error_set (ENAMETOOLONG, "%s: backing file name '%s' does not fit "
                     "in the header cluster", path, o->backing_file);
      return -1;
    }
    hd.backing_file_offset = off;
    hd.backing_file_size = (uint32_t) blen;
    memcpy (h + off, o->backing_file, blen);
  }
  qcow2_header_encode (&hd, h, hlen);
  return 0;
}

int
qcow2_create (const char *path, const struct qcow2_create_opts *o)
{
  uint32_t cbits = 0;
  uint64_t c, per_l2, l1_entries, l1_off;
  uint8_t *buf = NULL;
  char *tmp = NULL;
  int fd = -1;
  struct qcow2 *q = NULL;

  if (o->version != 0 && o->version != 2 && o->version != 3) {
    cow_error_set (EINVAL, "%s: qcow2 version %d cannot be created", path,
                   o->version);
    return -1;
  }
  if (o->cluster_size < 512 || o->cluster_size > (2u << 20)
      || (o->cluster_size & (o->cluster_size - 1))) {
    cow_error_set (EINVAL, "%s: cluster size %u is not a power of two from "
                   "512 to 2M", path, o->cluster_size);
    return -1;
  }
  while ((1u << cbits) < o->cluster_size)
    cbits++;
  if (o->extended_l2 && (o->version == 2
                         || cbits < QCOW2_EXTL2_MIN_CLUSTER_BITS)) {
    cow_error_set (EINVAL, "%s: subclusters (extended L2 entries) need "
                   "compat 1.1 and clusters of at least %u bytes (cluster "
                   "size %u)", path, 1u << QCOW2_EXTL2_MIN_CLUSTER_BITS,
                   o->cluster_size);
    return -1;
  }
  c = o->cluster_size;
  per_l2 = c / (o->extended_l2 ? 16 : 8);
  l1_entries = (o->size + c * per_l2 - 1) / (c * per_l2);
  if (l1_entries * 8 > QCOW2_MAX_L1_BYTES) {
    cow_error_set (EFBIG, "%s: virtual size %" PRIu64 " needs too large an "
                   "L1 table with %" PRIu64 "-byte clusters", path, o->size, c);
    return -1;
  }
  if (asprintf (&tmp, "%s.creating.XXXXXX", path) == -1) {
    cow_error_errno ("asprintf");
    return -1;
  }
  fd = mkstemp (tmp);
  if (fd == -1) {
    cow_error_errno ("%s: cannot create", path);
    free (tmp);
    return -1;
  }
  fchmod (fd, 0644);
  close (fd);
  fd = io_open (tmp, O_RDWR | O_NOFOLLOW, 0);
  if (fd == -1) {
    cow_error_errno ("%s: cannot open", tmp);
    goto err;
  }
  buf = calloc (3, c);
  if (buf == NULL) {
    cow_error_errno ("calloc");
    goto err;
  }
  if (build_header (buf, o, cbits, path) == -1)
    goto err;
  /* Cluster 1: refcount table -> cluster 2: refcount block, counting
   * clusters 0, 1 and 2. */
  be64_put (buf + c, 2 * c);
  for (uint64_t i = 0; i < 3; i++)
    qcow2_refcount_entry_set (QCOW2_CREATE_REFCOUNT_ORDER, buf + 2 * c, i, 1);
  if (io_pwrite (fd, buf, 3 * c, 0) == -1) {
    cow_error_errno ("%s: writing the new image", path);
    goto err;
  }
  io_close (fd);
  fd = -1;

  /* Allocate the L1 table through the allocator, so that any cluster
   * size and virtual size get the refcount blocks they need. */
  q = open_common (tmp, LAYER_NOFOLLOW, 1u << 20, true);
  if (q == NULL)
    goto err;
  if (l1_entries) {
    uint64_t l1_clusters = (l1_entries * 8 + c - 1) / c;
    uint8_t *zero;
    l1_off = qcow2_alloc_clusters (q, l1_clusters);
    if (l1_off == 0)
      goto err;
    zero = calloc (l1_clusters, c);
    if (zero == NULL) {
      cow_error_errno ("calloc");
      goto err;
    }
    if (io_pwrite (q->fd, zero, l1_clusters * c, l1_off) == -1) {
      cow_error_errno ("%s: writing the L1 table", path);
      free (zero);
      goto err;
    }
    free (zero);
    if (qcow2_cache_writeback (q->rb_cache) == -1
        || qcow2_reftable_writeback (q) == -1)
      goto err;
    struct qcow2_header hd = {
      .l1_size = (uint32_t) l1_entries,
      .l1_table_offset = l1_off,
    };
    if (qcow2_header_write_fields (q->fd, &hd, QCOW2_HDR_OFFSET (l1_size),
                                   QCOW2_HDR_END (l1_table_offset)) == -1) {
      cow_error_errno ("%s: writing the header", path);
      goto err;
    }
  }
  if (io_fsync (q->fd) == -1) {
    cow_error_errno ("%s: fsync", path);
    goto err;
  }
  io_close (q->fd);
  q->fd = -1;
  qcow2_free (q);
  q = NULL;
  /* Never over a file already there: in a state directory that could be
   * a file or a symbolic link planted to make us destroy something. */
  if (io_rename_noreplace (tmp, path) == -1) {
    if (errno == EEXIST)
      cow_error_set (EEXIST, "%s: already exists; refusing to replace it "
                     "with a new image", path);
    else
      cow_error_errno ("%s: cannot rename the new image into place", path);
    goto err;
  }
  if (io_fsync_dir_of (path) == -1) {
    cow_error_errno ("%s: fsync of the directory", path);
    free (buf);
    free (tmp);
    return -1;
  }
  free (buf);
  free (tmp);
  return 0;

 err:
  if (q) {
    if (q->fd != -1)
      io_close (q->fd);
    qcow2_free (q);
  }
  if (fd != -1)
    io_close (fd);
  io_unlink (tmp);
  free (buf);
  free (tmp);
  return -1;
}
