/* SPDX-License-Identifier: BSD-3-Clause */
/* The merged map of a disk's frozen layers: for every byte of the disk,
 * the highest frozen layer that holds it (data or zeroes), or none (the
 * base below them answers).  A read that misses the active layer looks
 * up the map once and asks that one layer, instead of asking every
 * frozen layer top down: its cost does not grow with the chain's depth.
 *
 * The map is a sorted array of extents (start, owner), each running to
 * the next one's start: memory grows with how scattered the frozen data
 * is, not with the disk's size.  It is built only from each layer's own
 * map operation (layer->ops->map), so whatever granularity a layer
 * answers in (clusters, subclusters) is kept exactly.
 *
 * Life cycle.  Every change of the chain goes through chain_link, under
 * chain_lock exclusive (or before the disk serves anyone); it retires the
 * map.  The next read that needs one builds it, under chain_lock shared
 * (the chain cannot change meanwhile), by one thread at a time (map_lock:
 * other readers wait for it), and publishes it with an atomic store.  A map is freed only by chain_link (no reader can
 * hold it then) or by the builder, for the retired one, which readers
 * never see.  After a snapshot the retired map is the new one minus the
 * newly frozen layer, so only that layer is mapped and painted on top.
 *
 * Why it stays exact while jobs run: between two chain changes frozen
 * layers only gain data (a job copies into them, a frozen layer is never
 * trimmed), and what a layer gains is what the chain already read there
 * from above (a commit into a lower layer copies what an upper layer
 * holds; a merge into an upper layer fills only where it held nothing).
 * So the owner the map names still holds its range with the same bytes;
 * and were it ever not to, its read falls through to the layers under it
 * as before.
 *
 * COWCHAIN_VERIFY_MAP=1 in the environment (a test hook) reads every
 * range both ways, through the map and top down, and fails the read with
 * EIO if they differ. */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "chain.h"
#include "error.h"
#include "layer.h"

#define OWNER_BELOW (-1)        /* no frozen layer: the base answers */

struct chain_map {
  size_t n, cap;
  uint64_t *start;              /* extent i: [start[i], start[i+1] or size) */
  int16_t *owner;               /* index in d->lower[], or OWNER_BELOW */
  uint64_t size;
  /* The frozen layers it was built for, top first. */
  size_t n_layers;
  struct layer *layers[COW_MAX_DEPTH];
};

/* Bytes held by every map of the process (atomic). */
static uint64_t map_bytes;

static uint64_t
map_mem (const struct chain_map *m)
{
  return sizeof *m + m->cap * (sizeof m->start[0] + sizeof m->owner[0]);
}

static void
map_free (struct chain_map *m)
{
  if (m == NULL)
    return;
  __atomic_sub_fetch (&map_bytes, map_mem (m), __ATOMIC_RELAXED);
  free (m->start);
  free (m->owner);
  free (m);
}

static struct chain_map *
map_new (uint64_t size)
{
  struct chain_map *m = calloc (1, sizeof *m);

  if (m == NULL) {
    cow_error_errno ("merged map");
    return NULL;
  }
  m->size = size;
  __atomic_add_fetch (&map_bytes, map_mem (m), __ATOMIC_RELAXED);
  return m;
}

/* Append an extent starting at start (after the last one), merged with
 * the last one if it has the same owner. */
static int
map_push (struct chain_map *m, uint64_t start, int owner)
{
  if (m->n && m->owner[m->n - 1] == owner)
    return 0;
  if (m->n && m->start[m->n - 1] == start) {
    /* The last extent was empty: it takes the new owner. */
    m->owner[m->n - 1] = (int16_t) owner;
    if (m->n > 1 && m->owner[m->n - 2] == owner)
      m->n--;
    return 0;
  }
  if (m->n == m->cap) {
    size_t cap = m->cap ? 2 * m->cap : 64;
    uint64_t *s = realloc (m->start, cap * sizeof *s);
    int16_t *o;
    if (s == NULL)
      goto oom;
    m->start = s;
    o = realloc (m->owner, cap * sizeof *o);
    if (o == NULL)
      goto oom;
    m->owner = o;
    __atomic_add_fetch (&map_bytes, (cap - m->cap) * (sizeof *s + sizeof *o),
                        __ATOMIC_RELAXED);
    m->cap = cap;
  }
  m->start[m->n] = start;
  m->owner[m->n] = (int16_t) owner;
  m->n++;
  return 0;

 oom:
  cow_error_errno ("merged map");
  return -1;
}

/* The extent holding offset (m->n > 0, offset < m->size). */
static size_t
map_find (const struct chain_map *m, uint64_t offset)
{
  size_t lo = 0, hi = m->n;

  while (hi - lo > 1) {
    size_t mid = lo + (hi - lo) / 2;
    if (m->start[mid] <= offset)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

static uint64_t
map_end (const struct chain_map *m, size_t i)
{
  return i + 1 < m->n ? m->start[i + 1] : m->size;
}

/* Copy the extents of old over [from, to) into m, their owners moved by
 * shift. */
static int
map_copy_range (struct chain_map *m, const struct chain_map *old,
                uint64_t from, uint64_t to, int shift)
{
  size_t i;

  if (from >= to)
    return 0;
  i = map_find (old, from);
  if (map_push (m, from, old->owner[i] == OWNER_BELOW ? OWNER_BELOW
                : old->owner[i] + shift) == -1)
    return -1;
  for (i++; i < old->n && old->start[i] < to; i++)
    if (map_push (m, old->start[i], old->owner[i] == OWNER_BELOW
                  ? OWNER_BELOW : old->owner[i] + shift) == -1)
      return -1;
  return 0;
}

/* A new map: what layer l holds painted with owner over old (whose
 * owners move by shift). */
static struct chain_map *
map_paint (const struct chain_map *old, struct layer *l, int owner, int shift)
{
  struct chain_map *m = map_new (old->size);
  uint64_t off = 0, pos = 0;

  if (m == NULL)
    return NULL;
  while (off < old->size) {
    uint64_t len;
    enum layer_status st;

    if (l->ops->map (l, off, old->size - off, &len, &st) == -1)
      goto err;
    if (len == 0 || len > old->size - off) {
      cow_error_set (EIO, "%s: map of offset %" PRIu64 " answered %" PRIu64
                     " bytes", l->path, off, len);
      goto err;
    }
    if (st != LAYER_ABSENT) {
      if (map_copy_range (m, old, pos, off, shift) == -1
          || map_push (m, off, owner) == -1)
        goto err;
      pos = off + len;
    }
    off += len;
  }
  if (map_copy_range (m, old, pos, old->size, shift) == -1)
    goto err;
  return m;

 err:
  map_free (m);
  return NULL;
}

/* The map of d's frozen layers: from old (built for all but the newest
 * frozen layer) when it fits, else from nothing.  Caller holds
 * chain_lock (shared is enough). */
static struct chain_map *
map_build (struct cow_disk *d, const struct chain_map *old)
{
  struct chain_map *m, *next;
  size_t nf = d->n_frozen;
  bool on_old = old && old->size == d->size && old->n_layers + 1 == nf;

  for (size_t i = 0; on_old && i < old->n_layers; i++)
    on_old = old->layers[i] == d->lower[i + 1].l;
  if (on_old)
    m = map_paint (old, d->lower[0].l, 0, 1);
  else {
    struct chain_map *empty = map_new (d->size);
    if (empty == NULL || map_push (empty, 0, OWNER_BELOW) == -1) {
      map_free (empty);
      return NULL;
    }
    m = empty;
    /* Bottom up: each layer painted over those under it. */
    for (size_t i = nf; m && i-- > 0; ) {
      next = map_paint (m, d->lower[i].l, (int) i, 0);
      map_free (m);
      m = next;
    }
  }
  if (m == NULL)
    return NULL;
  m->n_layers = nf;
  for (size_t i = 0; i < nf; i++)
    m->layers[i] = d->lower[i].l;
  return m;
}

static bool
verify_wanted (void)
{
  static int wanted = -1;
  int w = __atomic_load_n (&wanted, __ATOMIC_RELAXED);

  if (w == -1) {
    const char *e = getenv ("COWCHAIN_VERIFY_MAP");
    w = e && strcmp (e, "1") == 0;
    __atomic_store_n (&wanted, w, __ATOMIC_RELAXED);
  }
  return w;
}

/* The map of the current chain, built now (or by another reader, whom
 * this one waits for: reading top down meanwhile would only slow the
 * build, thrashing the same cache); NULL: read top down. */
static struct chain_map *
map_get (struct cow_disk *d)
{
  struct chain_map *m = __atomic_load_n (&d->fmap, __ATOMIC_ACQUIRE);

  if (m || __atomic_load_n (&d->fmap_failed, __ATOMIC_RELAXED))
    return m;
  pthread_mutex_lock (&d->map_lock);
  m = __atomic_load_n (&d->fmap, __ATOMIC_ACQUIRE);
  if (m == NULL && !d->fmap_failed) {
    m = map_build (d, d->fmap_old);
    if (m) {
      __atomic_store_n (&d->fmap, m, __ATOMIC_RELEASE);
      map_free (d->fmap_old);
      d->fmap_old = NULL;
    }
    else {
      /* Top down until the chain changes (the read itself may still
       * succeed; a retry at every read would cost more than it saves). */
      __atomic_store_n (&d->fmap_failed, true, __ATOMIC_RELAXED);
      cow_error_clear ();
    }
  }
  pthread_mutex_unlock (&d->map_lock);
  return m;
}

int
chain_node_read (void *opaque, void *buf, uint32_t count, uint64_t offset)
{
  struct chain_node *n = opaque;
  uint64_t size = n->l->size;
  uint32_t part = count;

  /* Past a layer's end reads as zero. */
  if (offset >= size) {
    memset (buf, 0, count);
    return 0;
  }
  if (count > size - offset) {
    part = (uint32_t) (size - offset);
    memset ((char *) buf + part, 0, count - part);
  }
  return n->l->ops->read (n->l, buf, part, offset, &n->below);
}

/* Read through one frozen layer (its size cut as node_read does), or
 * the base (OWNER_BELOW), or zeroes when there is no base. */
static int
owner_read (struct cow_disk *d, int owner, void *buf, uint32_t count,
            uint64_t offset)
{
  size_t i = owner == OWNER_BELOW ? d->n_frozen : (size_t) owner;

  if (i >= d->n_lower) {
    memset (buf, 0, count);
    return 0;
  }
  return chain_node_read (&d->lower[i], buf, count, offset);
}

static int
map_read (struct cow_disk *d, struct chain_map *m, char *buf, uint32_t count,
          uint64_t offset)
{
  size_t i = map_find (m, offset);

  while (count > 0) {
    uint64_t end = map_end (m, i);
    uint32_t len = end - offset < count ? (uint32_t) (end - offset) : count;

    if (owner_read (d, m->owner[i], buf, len, offset) == -1)
      return -1;
    buf += len;
    offset += len;
    count -= len;
    i++;
  }
  return 0;
}

int
chain_map_read (void *opaque, void *buf, uint32_t count, uint64_t offset)
{
  struct cow_disk *d = opaque;
  struct chain_map *m = map_get (d);
  char *check;
  int r;

  if (m == NULL || offset >= m->size || count > m->size - offset)
    return chain_node_read (&d->lower[0], buf, count, offset);
  if (!verify_wanted ())
    return map_read (d, m, buf, count, offset);

  check = malloc (count ? count : 1);
  if (check == NULL) {
    cow_error_errno ("merged map check");
    return -1;
  }
  r = map_read (d, m, buf, count, offset);
  if (r == 0)
    r = chain_node_read (&d->lower[0], check, count, offset);
  if (r == 0 && memcmp (buf, check, count) != 0) {
    cow_error_set (EIO, "merged map: the read of %" PRIu32 " bytes at offset "
                   "%" PRIu64 " differs from the top-down read", count,
                   offset);
    r = -1;
  }
  free (check);
  return r;
}

void
chain_map_retire (struct cow_disk *d)
{
  struct chain_map *m = __atomic_load_n (&d->fmap, __ATOMIC_RELAXED);

  if (m) {
    map_free (d->fmap_old);
    d->fmap_old = m;
    __atomic_store_n (&d->fmap, NULL, __ATOMIC_RELEASE);
  }
  d->fmap_failed = false;
}

void
chain_map_free (struct cow_disk *d)
{
  map_free (d->fmap);
  map_free (d->fmap_old);
  d->fmap = NULL;
  d->fmap_old = NULL;
}

uint64_t
chain_map_bytes (void)
{
  return __atomic_load_n (&map_bytes, __ATOMIC_RELAXED);
}

int
chain_map_check (struct cow_disk *d)
{
  struct chain_map *m = map_get (d), *fresh;
  int r = 0;

  if (d->n_frozen == 0)
    return 0;
  if (m == NULL) {
    cow_error_set (EAGAIN, "merged map: could not be built");
    return -1;
  }
  fresh = map_build (d, NULL);
  if (fresh == NULL)
    return -1;
  if (fresh->n != m->n
      || (m->n
          && (memcmp (fresh->start, m->start, m->n * sizeof m->start[0]) != 0
              || memcmp (fresh->owner, m->owner,
                         m->n * sizeof m->owner[0]) != 0))) {
    size_t i;
    for (i = 0; i < m->n && i < fresh->n; i++)
      if (fresh->start[i] != m->start[i] || fresh->owner[i] != m->owner[i])
        break;
    cow_error_set (EIO, "merged map: extent %zu differs from a top-down "
                   "lookup (%zu extents, %zu expected)", i, m->n, fresh->n);
    r = -1;
  }
  map_free (fresh);
  return r;
}

size_t
chain_map_extents (struct cow_disk *d)
{
  struct chain_map *m = __atomic_load_n (&d->fmap, __ATOMIC_ACQUIRE);

  return m ? m->n : 0;
}
