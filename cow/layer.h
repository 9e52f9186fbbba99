/* SPDX-License-Identifier: BSD-3-Clause */
/* The layer interface: one table of operations per kind of layer (raw
 * file, qcow2 file), one constructor per kind.  A layer only knows its own
 * contents; where it holds nothing, it asks the source "below" that the
 * chain hands it (the layers under it). */
#ifndef COW_LAYER_H
#define COW_LAYER_H

#include <stdbool.h>
#include <stdint.h>

struct layer;
struct image_lock;

/* What one layer holds for a range. */
enum layer_status {
  LAYER_ABSENT = 0,   /* nothing here: look below */
  LAYER_DATA,         /* data stored in this layer */
  LAYER_ZERO,         /* reads as zero, whatever is below */
};

/* How a layer reads what lies under it (for reads that fall through and
 * for copy-on-write of partial clusters).  read == NULL: zeroes. */
struct layer_below {
  int (*read) (void *opaque, void *buf, uint32_t count, uint64_t offset);
  void *opaque;
};

struct layer_ops {
  const char *kind;
  int (*read) (struct layer *l, void *buf, uint32_t count, uint64_t offset,
               const struct layer_below *below);
  int (*write) (struct layer *l, const void *buf, uint32_t count,
                uint64_t offset, const struct layer_below *below);
  /* Make [offset, offset+count) read as zero.  fast: fail with ENOTSUP
   * rather than write data. */
  int (*zero) (struct layer *l, uint32_t count, uint64_t offset, bool fast,
               const struct layer_below *below);
  /* Release whole clusters in the range (they read as zero after). */
  int (*trim) (struct layer *l, uint32_t count, uint64_t offset);
  int (*flush) (struct layer *l);
  /* Status of the longest run starting at offset (at most count bytes). */
  int (*map) (struct layer *l, uint64_t offset, uint64_t count,
              uint64_t *len, enum layer_status *status);
  /* Flush (if writable) and free.  Returns -1 if the flush failed. */
  int (*close) (struct layer *l);
  /* Accept writes from now on (a merge's target); NULL: cannot. */
  int (*reopen_rw) (struct layer *l);
  /* Start writing the file's dirty pages in [*pos, *pos+max) (file
   * bytes) to the disk, advancing *pos; wait: until they are written.
   * Paces a flush to come, makes nothing durable (io_writeback).  1:
   * the file goes on, 0: its end, -1: error.  NULL: nothing to pace. */
  int (*writeback) (struct layer *l, uint64_t *pos, uint64_t max, bool wait);
};

struct layer {
  const struct layer_ops *ops;
  char *path;          /* as given by the user */
  uint64_t size;       /* virtual size */
  bool readonly;
  struct image_lock *lock;  /* QEMU-style image lock (image.h); NULL: none */
};

/* How raw_open and qcow2_open open a file. */
#define LAYER_RDONLY     0x1u  /* read-only (locked as a reader) */
#define LAYER_NOFOLLOW   0x2u  /* a state directory's file: never through a
                                * symbolic link */
#define LAYER_HOLD_WRITE 0x4u  /* read-only for now but locked as a writer
                                * (a frozen layer that jobs will write) */
#define LAYER_FORCE_SHARE 0x8u /* read-only, sharing everything (qemu-img
                                * -U): a look at a live server's layer */

/* raw.c */
struct layer *raw_open (const char *path, unsigned flags);

/* qcow2.c */
struct qcow2_create_opts {
  uint64_t size;
  uint32_t cluster_size;
  const char *backing_file;     /* as stored in the header */
  const char *backing_format;   /* header extension; NULL = none */
  int version;                  /* 3 (compat 1.1, default) or 2 (0.10) */
  bool extended_l2;             /* subclusters (version 3, clusters of at
                                   least 16K only) */
};
int qcow2_create (const char *path, const struct qcow2_create_opts *opts);
struct layer *qcow2_open (const char *path, unsigned flags,
                          uint64_t cache_size);
/* The backing file name and format stored in an open qcow2 layer (NULL if
 * none); owned by the layer. */
const char *qcow2_backing_file (struct layer *l);
const char *qcow2_backing_format (struct layer *l);
uint32_t qcow2_cluster_size (struct layer *l);
int qcow2_version (struct layer *l);
/* Does the layer use extended L2 entries (32 subclusters a cluster)? */
bool qcow2_extended_l2 (struct layer *l);
/* Should a new layer use them?  setting: the subclusters key (1 on, -1
 * off, 0 default: on where QEMU allows them, compat 1.1 and clusters of
 * at least 16K). */
bool qcow2_want_extended_l2 (int setting, int version, uint32_t cluster_size);
/* The layer will get no more writes (it was frozen under a snapshot):
 * reads may skip locking where its L1 table says a range is empty. */
void qcow2_mark_frozen (struct layer *l);
/* Rewrite the backing file name (NULL: none) and format in the header,
 * synced.  The caller makes sure the new backing reads the same. */
int qcow2_set_backing (struct layer *l, const char *name, const char *format);
/* Fill the clusters of the range that the layer does not hold yet, with
 * buf or (buf NULL, compat 1.1 only) with zero clusters; never overwrites
 * what the guest wrote.  offset cluster aligned. */
int qcow2_layer_populate (struct layer *l, const void *buf, uint32_t count,
                          uint64_t offset);
/* qcow2-cache.c: the metadata cache budget of the process, shared by
 * every qcow2 layer (bytes; 0: the default), and what it holds. */
void qcow2_cache_set_budget (uint64_t bytes);
void qcow2_cache_usage (uint64_t *budget, uint64_t *used, uint64_t *peak,
                        uint64_t *tables);
/* Is this layer a qcow2 one? */
bool layer_is_qcow2 (const struct layer *l);
/* Recognise a qcow2 file by its magic: 1 yes, 0 no, -1 error. */
int qcow2_probe (const char *path);

/* remote.c: a read-only base on a remote NBD server (libnbd URI).  Each
 * request (and the connection at open) fails with EIO after timeout_ms
 * without an answer; 0 waits forever. */
struct layer *remote_layer_open (const char *uri, uint32_t timeout_ms);
/* Is this base name a libnbd URI (nbd:, nbds:, nbd+unix:, ...)? */
bool remote_is_uri (const char *name);

#endif /* COW_LAYER_H */
