/* SPDX-License-Identifier: BSD-3-Clause */
/* The qcow2 on-disk format, as docs/interop/qcow2.txt of QEMU describes
 * it: the header, header extensions, L1/L2/refcount table entries and
 * refcount blocks.  Nothing here knows about an open image (qcow2.h); the
 * byte-order helpers are in bytes.h.
 *
 * Every header field has a name: read a header with qcow2_header_decode,
 * build one with qcow2_header_encode, and write single fields in place at
 * QCOW2_HDR_OFFSET (field).  No header field is read or written at a
 * numeric offset anywhere in the engine. */
#ifndef COW_QCOW2_FORMAT_H
#define COW_QCOW2_FORMAT_H

#include <stddef.h>
#include <stdint.h>

#include "bytes.h"

#define QCOW2_MAGIC 0x514649fbu           /* "QFI\xfb" */
#define QCOW2_MIN_CLUSTER_BITS 9
#define QCOW2_MAX_CLUSTER_BITS 21
#define QCOW2_MAX_L1_BYTES (32u << 20)    /* as QEMU: bounds the L1 table */
#define QCOW2_MAX_REFTABLE_BYTES (8u << 20)
#define QCOW2_MAX_BACKING_NAME 1023
#define QCOW2_V2_HEADER_LENGTH 72
#define QCOW2_V3_HEADER_LENGTH 104
#define QCOW2_HEADER_LENGTH_WRITTEN 112   /* with the compression type */

#define QCOW2_EXT_END 0x00000000u
#define QCOW2_EXT_BACKING_FORMAT 0xe2792acau
#define QCOW2_EXT_FEATURE_TABLE 0x6803f857u

#define QCOW2_INCOMPAT_DIRTY (1ull << 0)
#define QCOW2_INCOMPAT_CORRUPT (1ull << 1)
#define QCOW2_INCOMPAT_DATA_FILE (1ull << 2)
#define QCOW2_INCOMPAT_COMPRESSION (1ull << 3)
#define QCOW2_INCOMPAT_EXTL2 (1ull << 4)

#define QCOW2_AUTOCLEAR_BITMAPS (1ull << 0)

/* L1 and L2 entries. */
#define QCOW2_OFLAG_COPIED (1ull << 63)
#define QCOW2_OFLAG_COMPRESSED (1ull << 62)
#define QCOW2_OFLAG_ZERO (1ull << 0)
#define QCOW2_OFFSET_MASK 0x00fffffffffffe00ull
#define QCOW2_L1_RESERVED 0x7f000000000001ffull
#define QCOW2_L2_RESERVED 0x3f000000000001feull
#define QCOW2_REFT_RESERVED 0x00000000000001ffull

/* Extended L2 entries (incompatible feature bit 4): each L2 entry is the
 * descriptor above followed by a 64-bit subcluster bitmap; each standard
 * cluster is cut into 32 subclusters.  Bits 0-31 of the bitmap: the
 * subcluster is allocated (reads from the host cluster); bits 32-63: it
 * reads as zero.  Neither: it reads from below.  Both: invalid.  The
 * descriptor's zero flag (bit 0) is reserved, and a compressed cluster's
 * bitmap is all zero.  QEMU creates such images only with clusters of at
 * least 16K (subclusters of at least 512 bytes). */
#define QCOW2_SUBCLUSTERS 32u
#define QCOW2_EXTL2_MIN_CLUSTER_BITS 14
#define QCOW2_SC_ALL 0xffffffffull
static inline uint64_t qcow2_sc_alloc (uint64_t bitmap)
{
  return bitmap & QCOW2_SC_ALL;
}
static inline uint64_t qcow2_sc_zero (uint64_t bitmap)
{
  return bitmap >> QCOW2_SUBCLUSTERS;
}
static inline uint64_t qcow2_sc_bitmap (uint64_t alloc, uint64_t zero)
{
  return (alloc & QCOW2_SC_ALL) | ((zero & QCOW2_SC_ALL) << QCOW2_SUBCLUSTERS);
}
/* Subclusters [first, end) as a mask (end <= 32). */
static inline uint64_t qcow2_sc_mask (unsigned first, unsigned end)
{
  return ((end >= 64 ? ~0ull : (1ull << end) - 1)) & ~((1ull << first) - 1);
}

/* Compressed cluster descriptors count 512-byte sectors. */
#define QCOW2_COMPRESSED_SECTOR 512u

/*----------------------------------------------------------------------
 * The header.
 */

/* On disk, big-endian.  Version 2 headers end at incompatible_features
 * (QCOW2_V2_HEADER_LENGTH); version 3 headers are header_length bytes
 * long, at least up to compression_type (exclusive). */
struct qcow2_header_be {
  uint32_t magic;
  uint32_t version;
  uint64_t backing_file_offset;
  uint32_t backing_file_size;
  uint32_t cluster_bits;
  uint64_t size;
  uint32_t crypt_method;
  uint32_t l1_size;
  uint64_t l1_table_offset;
  uint64_t refcount_table_offset;
  uint32_t refcount_table_clusters;
  uint32_t nb_snapshots;
  uint64_t snapshots_offset;
  /* Version 3. */
  uint64_t incompatible_features;
  uint64_t compatible_features;
  uint64_t autoclear_features;
  uint32_t refcount_order;
  uint32_t header_length;
  /* Optional (header_length > 104). */
  uint8_t compression_type;
  uint8_t padding[7];
} __attribute__ ((packed));

#define QCOW2_HDR_OFFSET(field) offsetof (struct qcow2_header_be, field)
/* The first byte after field. */
#define QCOW2_HDR_END(field) \
  (QCOW2_HDR_OFFSET (field) + sizeof ((struct qcow2_header_be *) 0)->field)

_Static_assert (sizeof (struct qcow2_header_be) == QCOW2_HEADER_LENGTH_WRITTEN,
                "qcow2 header size");
_Static_assert (QCOW2_HDR_OFFSET (magic) == 0, "magic");
_Static_assert (QCOW2_HDR_OFFSET (version) == 4, "version");
_Static_assert (QCOW2_HDR_OFFSET (backing_file_offset) == 8,
                "backing_file_offset");
_Static_assert (QCOW2_HDR_OFFSET (backing_file_size) == 16,
                "backing_file_size");
_Static_assert (QCOW2_HDR_OFFSET (cluster_bits) == 20, "cluster_bits");
_Static_assert (QCOW2_HDR_OFFSET (size) == 24, "size");
_Static_assert (QCOW2_HDR_OFFSET (crypt_method) == 32, "crypt_method");
_Static_assert (QCOW2_HDR_OFFSET (l1_size) == 36, "l1_size");
_Static_assert (QCOW2_HDR_OFFSET (l1_table_offset) == 40, "l1_table_offset");
_Static_assert (QCOW2_HDR_OFFSET (refcount_table_offset) == 48,
                "refcount_table_offset");
_Static_assert (QCOW2_HDR_OFFSET (refcount_table_clusters) == 56,
                "refcount_table_clusters");
_Static_assert (QCOW2_HDR_OFFSET (nb_snapshots) == 60, "nb_snapshots");
_Static_assert (QCOW2_HDR_OFFSET (snapshots_offset) == 64, "snapshots_offset");
_Static_assert (QCOW2_HDR_OFFSET (incompatible_features) == 72,
                "incompatible_features");
_Static_assert (QCOW2_HDR_OFFSET (compatible_features) == 80,
                "compatible_features");
_Static_assert (QCOW2_HDR_OFFSET (autoclear_features) == 88,
                "autoclear_features");
_Static_assert (QCOW2_HDR_OFFSET (refcount_order) == 96, "refcount_order");
_Static_assert (QCOW2_HDR_OFFSET (header_length) == 100, "header_length");
_Static_assert (QCOW2_HDR_OFFSET (compression_type) == 104,
                "compression_type");
_Static_assert (QCOW2_HDR_OFFSET (incompatible_features)
                == QCOW2_V2_HEADER_LENGTH, "version 2 header length");
_Static_assert (QCOW2_HDR_OFFSET (compression_type)
                == QCOW2_V3_HEADER_LENGTH, "version 3 header length");

/* The same fields in host order, as they are on disk (no defaults
 * applied: a version 2 header decodes with the version 3 fields as
 * whatever bytes follow it). */
struct qcow2_header {
  uint32_t magic;
  uint32_t version;
  uint64_t backing_file_offset;
  uint32_t backing_file_size;
  uint32_t cluster_bits;
  uint64_t size;
  uint32_t crypt_method;
  uint32_t l1_size;
  uint64_t l1_table_offset;
  uint64_t refcount_table_offset;
  uint32_t refcount_table_clusters;
  uint32_t nb_snapshots;
  uint64_t snapshots_offset;
  uint64_t incompatible_features;
  uint64_t compatible_features;
  uint64_t autoclear_features;
  uint32_t refcount_order;
  uint32_t header_length;
  uint8_t compression_type;
};

/* Decode the first len bytes of buf (the header cluster, or part of it);
 * fields at or past len read as 0. */
void qcow2_header_decode (struct qcow2_header *h, const void *buf, size_t len);
/* Encode h into the first len bytes of buf (at most
 * sizeof (struct qcow2_header_be)); bytes of buf past len, and the
 * padding after compression_type, are left as they are. */
void qcow2_header_encode (const struct qcow2_header *h, void *buf, size_t len);

/*----------------------------------------------------------------------
 * Header extensions: from header_length to the end of cluster 0 (or to
 * the backing file name), each a type, a length and length bytes of data
 * padded to 8 bytes; type QCOW2_EXT_END ends the list.
 */

struct qcow2_ext_be {
  uint32_t type;
  uint32_t length;
} __attribute__ ((packed));

#define QCOW2_EXT_HEADER_SIZE sizeof (struct qcow2_ext_be)
#define QCOW2_EXT_ALIGN 8

_Static_assert (sizeof (struct qcow2_ext_be) == 8, "extension header size");
_Static_assert (offsetof (struct qcow2_ext_be, type) == 0, "extension type");
_Static_assert (offsetof (struct qcow2_ext_be, length) == 4,
                "extension length");

static inline void
qcow2_ext_decode (const void *p, uint32_t *type, uint32_t *length)
{
  const uint8_t *b = p;

  *type = be32_get (b + offsetof (struct qcow2_ext_be, type));
  *length = be32_get (b + offsetof (struct qcow2_ext_be, length));
}

static inline void
qcow2_ext_encode (void *p, uint32_t type, uint32_t length)
{
  uint8_t *b = p;

  be32_put (b + offsetof (struct qcow2_ext_be, type), type);
  be32_put (b + offsetof (struct qcow2_ext_be, length), length);
}

/* Bytes the data of an extension of length bytes takes, padding included. */
static inline uint64_t
qcow2_ext_padded (uint64_t length)
{
  return (length + QCOW2_EXT_ALIGN - 1) & ~(uint64_t) (QCOW2_EXT_ALIGN - 1);
}

/*----------------------------------------------------------------------
 * L2 entries of compressed clusters.
 */

/* The byte range a compressed cluster descriptor names: bits 0 to x-1
 * hold the host offset and bits x to 61 the number of 512-byte sectors
 * after the first, where x = 62 - (cluster_bits - 8).  The range ends at
 * the end of the last sector. */
static inline void
qcow2_compressed_range (uint32_t cluster_bits, uint64_t e, uint64_t *offset,
                        uint64_t *size)
{
  unsigned x = 62 - (cluster_bits - 8);
  uint64_t sectors = ((e >> x) & ((1ull << (cluster_bits - 8)) - 1)) + 1;

  *offset = e & ((1ull << x) - 1);
  *size = sectors * QCOW2_COMPRESSED_SECTOR
    - (*offset & (QCOW2_COMPRESSED_SECTOR - 1));
}

/*----------------------------------------------------------------------
 * Refcount blocks: entries of 1 << order bits (order 0 to 6).  Entries
 * narrower than a byte fill each byte from its least significant bit, as
 * QEMU does; wider ones are big-endian.
 */

/* The largest refcount an entry of 1 << order bits holds. */
static inline uint64_t
qcow2_refcount_max (unsigned order)
{
  return order == 6 ? UINT64_MAX : (1ull << (1u << order)) - 1;
}

static inline uint64_t
qcow2_refcount_entry_get (unsigned order, const void *block, uint64_t i)
{
  const uint8_t *p = block;

  switch (order) {
  case 0: case 1: case 2: {
    unsigned bits = 1u << order;
    uint64_t bit = i * bits;
    return (p[bit / 8] >> (bit % 8)) & ((1u << bits) - 1);
  }
  case 3: return p[i];
  case 4: return be16_get (p + 2 * i);
  case 5: return be32_get (p + 4 * i);
  default: return be64_get (p + 8 * i);
  }
}

/* v must fit (at most qcow2_refcount_max (order)); higher bits are
 * dropped. */
static inline void
qcow2_refcount_entry_set (unsigned order, void *block, uint64_t i, uint64_t v)
{
  uint8_t *p = block;

  switch (order) {
  case 0: case 1: case 2: {
    unsigned bits = 1u << order;
    uint64_t bit = i * bits;
    uint8_t mask = (uint8_t) (((1u << bits) - 1) << (bit % 8));
    p[bit / 8] = (uint8_t) ((p[bit / 8] & ~mask) | ((v << (bit % 8)) & mask));
    break;
  }
  case 3: p[i] = (uint8_t) v; break;
  case 4: be16_put (p + 2 * i, (uint16_t) v); break;
  case 5: be32_put (p + 4 * i, (uint32_t) v); break;
  default: be64_put (p + 8 * i, v);
  }
}

#endif /* COW_QCOW2_FORMAT_H */
