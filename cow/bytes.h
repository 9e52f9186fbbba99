/* SPDX-License-Identifier: BSD-3-Clause */
/* Big-endian loads and stores on byte buffers: the one set the engine
 * uses for every on-disk integer (qcow2 header and extension fields, L1,
 * L2 and refcount table entries, refcount blocks).
 *
 * Any alignment: memcpy of a fixed size compiles to one load or store,
 * and the swap to one instruction, so these stay as fast as a cast on
 * the cluster lookup path.  Correct on big-endian hosts too (be64toh is
 * the identity there). */
#ifndef COW_BYTES_H
#define COW_BYTES_H

#include <endian.h>
#include <stdint.h>
#include <string.h>

static inline uint16_t
be16_get (const void *p)
{
  uint16_t v;

  memcpy (&v, p, sizeof v);
  return be16toh (v);
}

static inline uint32_t
be32_get (const void *p)
{
  uint32_t v;

  memcpy (&v, p, sizeof v);
  return be32toh (v);
}

static inline uint64_t
be64_get (const void *p)
{
  uint64_t v;

  memcpy (&v, p, sizeof v);
  return be64toh (v);
}

static inline void
be16_put (void *p, uint16_t v)
{
  v = htobe16 (v);
  memcpy (p, &v, sizeof v);
}

static inline void
be32_put (void *p, uint32_t v)
{
  v = htobe32 (v);
  memcpy (p, &v, sizeof v);
}

static inline void
be64_put (void *p, uint64_t v)
{
  v = htobe64 (v);
  memcpy (p, &v, sizeof v);
}

#endif /* COW_BYTES_H */
