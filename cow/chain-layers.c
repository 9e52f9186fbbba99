/* SPDX-License-Identifier: BSD-3-Clause */
/* The chain module's lowest part: a disk's in-memory chain of open
 * layers (d->top over d->lower[]: frozen layers newest first, then the
 * base and its own backing chain), how each layer reads what lies under
 * it, and the one numbering the rest of the engine uses for it: the
 * manifest index (chain_layer, chain_index), plus walking down past the
 * state directory's layers into the base chain (chain_base,
 * chain_under).  Only this file and chain-plan.c touch d->lower[]
 * (disk.c's extents path and chain-map.c read it too).  Calls only
 * chain-map.c (the merged map of the frozen layers). */
#include <config.h>

#include <string.h>
#include <time.h>

#include "chain.h"
#include "layer.h"

void
chain_link (struct cow_disk *d)
{
  for (size_t i = 0; i < d->n_lower; i++) {
    d->lower[i].below.read = i + 1 < d->n_lower ? chain_node_read : NULL;
    d->lower[i].below.opaque = i + 1 < d->n_lower ? &d->lower[i + 1] : NULL;
  }
  /* What the active layer does not hold: through the merged map of the
   * frozen layers (chain-map.c), rebuilt for the new chain. */
  chain_map_retire (d);
  if (d->n_frozen > 0) {
    d->top_below.read = chain_map_read;
    d->top_below.opaque = d;
  }
  else {
    d->top_below.read = d->n_lower ? chain_node_read : NULL;
    d->top_below.opaque = d->n_lower ? &d->lower[0] : NULL;
  }
}

struct layer *
chain_layer (const struct cow_disk *d, size_t i)
{
  size_t n = d->man.n_layers;

  return i + 1 == n ? d->top : d->lower[n - 2 - i].l;
}

long
chain_index (const struct cow_disk *d, const struct layer *l)
{
  for (size_t i = 0; i < d->man.n_layers; i++)
    if (chain_layer (d, i) == l)
      return (long) i;
  return -1;
}

long
chain_find (const struct cow_disk *d, const char *word, bool snapshot_only)
{
  const struct manifest *m = &d->man;
  size_t n = snapshot_only && m->n_layers ? m->n_layers - 1 : m->n_layers;

  for (size_t i = 0; i < n; i++)
    if ((!snapshot_only || m->layers[i].snapshot)
        && strcmp (m->layers[i].file, word) == 0)
      return (long) i;
  for (size_t i = 0; i < n; i++)
    if (m->layers[i].snapshot && strcmp (m->layers[i].snapshot, word) == 0)
      return (long) i;
  return -1;
}

long
chain_first_snapshot (const struct cow_disk *d, long from, long to)
{
  for (long i = from; i <= to; i++)
    if (d->man.layers[i].snapshot)
      return i;
  return -1;
}

/* The position of l in d->lower[] (d->n_lower: not there). */
static size_t
lower_pos (const struct cow_disk *d, const struct layer *l)
{
  size_t i;

  for (i = 0; i < d->n_lower; i++)
    if (d->lower[i].l == l)
      break;
  return i;
}

struct layer *
chain_under (const struct cow_disk *d, const struct layer *l)
{
  size_t i;

  if (l == d->top)
    return d->n_lower ? d->lower[0].l : NULL;
  i = lower_pos (d, l);
  return i + 1 < d->n_lower ? d->lower[i + 1].l : NULL;
}

size_t
chain_from (const struct cow_disk *d, const struct layer *l,
            struct layer **out)
{
  size_t n = 0, i = 0;

  if (l == d->top)
    out[n++] = d->top;
  else {
    i = lower_pos (d, l);
    if (i == d->n_lower)
      return 0;
  }
  for (; i < d->n_lower; i++)
    out[n++] = d->lower[i].l;
  return n;
}

const struct layer_below *
chain_below (struct cow_disk *d, const struct layer *l)
{
  size_t i;

  if (l == d->top)
    return &d->top_below;
  i = lower_pos (d, l);
  return i < d->n_lower ? &d->lower[i].below : NULL;
}

struct layer *
chain_base (const struct cow_disk *d)
{
  return d->n_frozen < d->n_lower ? d->lower[d->n_frozen].l : NULL;
}

size_t
chain_base_depth (const struct cow_disk *d)
{
  return d->n_lower - d->n_frozen;
}

uint64_t
chain_now_ns (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_MONOTONIC, &ts);
  return (uint64_t) ts.tv_sec * 1000000000u + (uint64_t) ts.tv_nsec;
}
