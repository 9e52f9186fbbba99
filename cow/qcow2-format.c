/* SPDX-License-Identifier: BSD-3-Clause */
/* The qcow2 on-disk header in memory (qcow2-format.h): decoding,
 * encoding and in-place field writes; and the one report of damage found
 * at run time (qcow2_mark_corrupt), which the cluster and refcount code
 * share.  The bottom of the qcow2 files: it calls nothing of them. */
#include <config.h>

#include <endian.h>
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "error.h"
#include "io.h"
#include "qcow2.h"

void
qcow2_header_decode (struct qcow2_header *h, const void *buf, size_t len)
{
  struct qcow2_header_be d;

  memset (&d, 0, sizeof d);
  memcpy (&d, buf, len < sizeof d ? len : sizeof d);
  h->magic = be32toh (d.magic);
  h->version = be32toh (d.version);
  h->backing_file_offset = be64toh (d.backing_file_offset);
  h->backing_file_size = be32toh (d.backing_file_size);
  h->cluster_bits = be32toh (d.cluster_bits);
  h->size = be64toh (d.size);
  h->crypt_method = be32toh (d.crypt_method);
  h->l1_size = be32toh (d.l1_size);
  h->l1_table_offset = be64toh (d.l1_table_offset);
  h->refcount_table_offset = be64toh (d.refcount_table_offset);
  h->refcount_table_clusters = be32toh (d.refcount_table_clusters);
  h->nb_snapshots = be32toh (d.nb_snapshots);
  h->snapshots_offset = be64toh (d.snapshots_offset);
  h->incompatible_features = be64toh (d.incompatible_features);
  h->compatible_features = be64toh (d.compatible_features);
  h->autoclear_features = be64toh (d.autoclear_features);
  h->refcount_order = be32toh (d.refcount_order);
  h->header_length = be32toh (d.header_length);
  h->compression_type = d.compression_type;
}

void
qcow2_header_encode (const struct qcow2_header *h, void *buf, size_t len)
{
  struct qcow2_header_be d;

  if (len > sizeof d)
    len = sizeof d;
  /* Start from what buf holds: the padding and any bytes the caller
   * keeps stay as they are. */
  memset (&d, 0, sizeof d);
  memcpy (&d, buf, len);
  d.magic = htobe32 (h->magic);
  d.version = htobe32 (h->version);
  d.backing_file_offset = htobe64 (h->backing_file_offset);
  d.backing_file_size = htobe32 (h->backing_file_size);
  d.cluster_bits = htobe32 (h->cluster_bits);
  d.size = htobe64 (h->size);
  d.crypt_method = htobe32 (h->crypt_method);
  d.l1_size = htobe32 (h->l1_size);
  d.l1_table_offset = htobe64 (h->l1_table_offset);
  d.refcount_table_offset = htobe64 (h->refcount_table_offset);
  d.refcount_table_clusters = htobe32 (h->refcount_table_clusters);
  d.nb_snapshots = htobe32 (h->nb_snapshots);
  d.snapshots_offset = htobe64 (h->snapshots_offset);
  d.incompatible_features = htobe64 (h->incompatible_features);
  d.compatible_features = htobe64 (h->compatible_features);
  d.autoclear_features = htobe64 (h->autoclear_features);
  d.refcount_order = htobe32 (h->refcount_order);
  d.header_length = htobe32 (h->header_length);
  d.compression_type = h->compression_type;
  memcpy (buf, &d, len);
}

/* Write the header fields of h from byte from to byte to (exclusive) in
 * place, in one write; the others are not touched. */
int
qcow2_header_write_fields (int fd, const struct qcow2_header *h, size_t from,
                           size_t to)
{
  uint8_t buf[sizeof (struct qcow2_header_be)] = { 0 };

  qcow2_header_encode (h, buf, sizeof buf);
  return io_pwrite (fd, buf + from, to - from, from);
}

void
qcow2_mark_corrupt (struct qcow2 *q, const char *fmt, ...)
{
  char msg[512];
  va_list ap;

  va_start (ap, fmt);
  vsnprintf (msg, sizeof msg, fmt, ap);
  va_end (ap);
  q->corrupt = true;
  cow_error_set (EIO, "%s: corrupt qcow2 image: %s; the layer is now "
                 "read-only", q->layer.path, msg);
}
