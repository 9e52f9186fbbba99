/* A cache of cluster-sized metadata tables (L2 tables or refcount blocks)
 * of one qcow2 layer.  Bounded: a fixed number of slots, least recently
 * used first out.  A dirty L2 table may only be written once the data and
 * refcounts it depends on are stable (see qcow2.h), so evicting one first
 * writes back the refcount blocks and syncs the file.  A dirty table is
 * never dropped: when it cannot be written back, it stays, and the
 * request that needed its slot is served beside it. */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "io.h"
#include "qcow2.h"

struct slot {
  uint64_t offset;        /* host offset of the table; 0 = empty slot */
  void *data;
  uint64_t used;          /* LRU tick */
  unsigned pin;
  bool dirty;
  size_t next;            /* next slot + 1 in its offset bucket; 0 = end */
  size_t dnext;           /* next slot + 1 in its data-pointer bucket */
};

/* A table read by qcow2_cache_lookup when no slot could take it. */
struct loose {
  struct loose *next;
  void *data;
};

/* n slots are the budget; up to n more are used only while every slot is
 * pinned (a flush pins the dirty tables it is writing) or holds a dirty
 * table that cannot be written back, so that a guest request does not
 * fail for want of a slot; a lookup never does (it reads a copy of its
 * own then).  A hash on the offset keeps a lookup O(1) however large the
 * cache. */
struct qcow2_cache {
  struct qcow2 *q;
  bool is_l2;
  qcow2_cache_hook before_write;
  size_t n, cap;
  struct slot *slots;
  size_t *buckets;        /* by offset: slot + 1; 0 = empty */
  size_t *dbuckets;       /* by data pointer (set once per slot) */
  size_t n_buckets;       /* a power of two */
  uint64_t tick;
  struct loose *loose;    /* lookups' own tables, until put */
};

static size_t
bucket_of (const struct qcow2_cache *c, uint64_t offset)
{
  return (size_t) ((offset >> 9) * 0x9e3779b97f4a7c15ull >> 20)
    & (c->n_buckets - 1);
}

static size_t
dbucket_of (const struct qcow2_cache *c, const void *data)
{
  return (size_t) (((uintptr_t) data >> 9) * 0x9e3779b97f4a7c15ull >> 20)
    & (c->n_buckets - 1);
}

static void
hash_insert (struct qcow2_cache *c, struct slot *s)
{
  size_t b = bucket_of (c, s->offset);

  s->next = c->buckets[b];
  c->buckets[b] = (size_t) (s - c->slots) + 1;
}

static void
hash_remove (struct qcow2_cache *c, struct slot *s)
{
  size_t *p = &c->buckets[bucket_of (c, s->offset)];
  size_t me = (size_t) (s - c->slots) + 1;

  while (*p && *p != me)
    p = &c->slots[*p - 1].next;
  if (*p)
    *p = s->next;
  s->next = 0;
}

struct batch_item {
  struct slot *slot;
  uint64_t offset;
  void *copy;
};

struct qcow2_cache_batch {
  size_t n;
  struct batch_item items[];
};

struct qcow2_cache *
qcow2_cache_create (struct qcow2 *q, size_t n, bool is_l2,
                    qcow2_cache_hook before_write)
{
  struct qcow2_cache *c = calloc (1, sizeof *c);

  if (c == NULL)
    goto oom;
  if (n < 4)
    n = 4;
  c->q = q;
  c->is_l2 = is_l2;
  c->before_write = before_write;
  c->n = n;
  c->cap = 2 * n;
  c->slots = calloc (c->cap, sizeof *c->slots);
  for (c->n_buckets = 16; c->n_buckets < c->cap; c->n_buckets *= 2)
    ;
  c->buckets = calloc (c->n_buckets, sizeof *c->buckets);
  c->dbuckets = calloc (c->n_buckets, sizeof *c->dbuckets);
  if (c->slots == NULL || c->buckets == NULL || c->dbuckets == NULL)
    goto oom;
  return c;

 oom:
  cow_error_errno ("qcow2 cache");
  if (c) {
    free (c->slots);
    free (c->buckets);
    free (c->dbuckets);
    free (c);
  }
  return NULL;
}

void
qcow2_cache_destroy (struct qcow2_cache *c)
{
  if (c == NULL)
    return;
  for (size_t i = 0; i < c->cap; i++)
    free (c->slots[i].data);
  while (c->loose) {
    struct loose *lt = c->loose;
    c->loose = lt->next;
    free (lt->data);
    free (lt);
  }
  free (c->slots);
  free (c->buckets);
  free (c->dbuckets);
  free (c);
}

static struct slot *
find (struct qcow2_cache *c, uint64_t offset)
{
  for (size_t i = c->buckets[bucket_of (c, offset)]; i; i = c->slots[i - 1].next)
    if (c->slots[i - 1].offset == offset)
      return &c->slots[i - 1];
  return NULL;
}

/* The slot of a table that a caller holds (pinned, hence present). */
static struct slot *
find_data (struct qcow2_cache *c, const void *table)
{
  for (size_t i = c->dbuckets[dbucket_of (c, table)]; i; i = c->slots[i - 1].dnext)
    if (c->slots[i - 1].data == table)
      return &c->slots[i - 1];
  abort ();                     /* a table not from this cache */
}

static int
write_slot (struct qcow2_cache *c, struct slot *s)
{
  struct qcow2 *q = c->q;

  /* Data and refcounts first (qcow2.h). */
  if (c->before_write && c->before_write (q) == -1)
    return -1;
  if (io_pwrite (q->fd, s->data, q->cluster_size, s->offset) == -1) {
    cow_error_errno ("%s: writing %s at offset %" PRIu64, q->layer.path,
                     c->is_l2 ? "L2 table" : "refcount block", s->offset);
    return -1;
  }
  s->dirty = false;
  return 0;
}

/* Choose a victim: the least recently used unpinned slot, clean ones
 * preferred (writing a dirty L2 table costs a sync). */
static struct slot *
victim (struct qcow2_cache *c)
{
  struct slot *best = NULL, *best_clean = NULL;

  for (size_t i = 0; i < c->cap; i++) {
    struct slot *s = &c->slots[i];
    if (s->pin)
      continue;
    if (s->offset == 0) {
      if (i < c->n)
        return s;
      continue;               /* overflow: only when nothing else is free */
    }
    if (best == NULL || s->used < best->used)
      best = s;
    if (!s->dirty && (best_clean == NULL || s->used < best_clean->used))
      best_clean = s;
  }
  if (best_clean || best)
    return best_clean ? best_clean : best;
  for (size_t i = c->n; i < c->cap; i++)
    if (c->slots[i].offset == 0 && c->slots[i].pin == 0)
      return &c->slots[i];
  return NULL;
}

/* An empty slot beyond the budget, for when the victim cannot be
 * written back; NULL if there is none. */
static struct slot *
spare (struct qcow2_cache *c)
{
  for (size_t i = c->n; i < c->cap; i++)
    if (c->slots[i].offset == 0 && c->slots[i].pin == 0)
      return &c->slots[i];
  return NULL;
}

/* A slot for a table that is not cached: the victim, written back
 * first if dirty.  A dirty table that cannot be written back stays where
 * it is (it is never dropped), and a spare slot beyond the budget is
 * taken instead: whoever asks did not depend on that write, which failed
 * for another request (a merge writing to this layer on a failing disk,
 * say).  NULL with the error set when there is no room at all. */
static struct slot *
free_slot (struct qcow2_cache *c)
{
  struct slot *s = victim (c);

  if (s == NULL) {
    cow_error_set (ENOMEM, "%s: metadata cache exhausted", c->q->layer.path);
    return NULL;
  }
  if (s->dirty && write_slot (c, s) == -1)
    return spare (c);
  return s;
}

/* Read the table at offset from the file into buf. */
static int
read_table (struct qcow2_cache *c, void *buf, uint64_t offset)
{
  struct qcow2 *q = c->q;

  if (io_pread (q->fd, buf, q->cluster_size, offset) == -1) {
    cow_error_errno ("%s: reading %s at offset %" PRIu64, q->layer.path,
                     c->is_l2 ? "L2 table" : "refcount block", offset);
    return -1;
  }
  return 0;
}

/* Put the table at offset into slot s (clean); fresh: zeroed. */
static int
load (struct qcow2_cache *c, struct slot *s, uint64_t offset, bool fresh)
{
  struct qcow2 *q = c->q;

  if (s->offset)
    hash_remove (c, s);
  s->offset = 0;
  if (s->data == NULL) {
    /* Page aligned for O_DIRECT some day; posix_memalign, unlike
     * aligned_alloc, allows a size below the alignment. */
    if (posix_memalign (&s->data, 4096, q->cluster_size) != 0) {
      s->data = NULL;
      errno = ENOMEM;
      cow_error_errno ("%s: metadata cache", q->layer.path);
      return -1;
    }
    {
      size_t b = dbucket_of (c, s->data);
      s->dnext = c->dbuckets[b];
      c->dbuckets[b] = (size_t) (s - c->slots) + 1;
    }
  }
  if (fresh)
    memset (s->data, 0, q->cluster_size);
  else if (read_table (c, s->data, offset) == -1)
    return -1;
  s->offset = offset;
  s->dirty = false;
  hash_insert (c, s);
  return 0;
}

static void *
pin (struct qcow2_cache *c, struct slot *s)
{
  s->used = ++c->tick;
  s->pin++;
  return s->data;
}

void *
qcow2_cache_get (struct qcow2_cache *c, uint64_t offset, bool fresh)
{
  struct slot *s = find (c, offset);

  if (s == NULL) {
    s = free_slot (c);
    if (s == NULL || load (c, s, offset, fresh) == -1)
      return NULL;
  }
  return pin (c, s);
}

void *
qcow2_cache_lookup (struct qcow2_cache *c, uint64_t offset)
{
  struct qcow2 *q = c->q;
  struct slot *s = find (c, offset);
  struct loose *lt;

  if (s)
    return pin (c, s);
  s = free_slot (c);
  if (s)
    return load (c, s, offset, false) == 0 ? pin (c, s) : NULL;
  /* No room: a copy of the caller's own, read from the file, where the
   * table is current (a table leaves the cache only once written back). */
  lt = calloc (1, sizeof *lt);
  if (lt == NULL || (lt->data = malloc (q->cluster_size)) == NULL) {
    cow_error_errno ("%s: metadata table", q->layer.path);
    free (lt);
    return NULL;
  }
  if (read_table (c, lt->data, offset) == -1) {
    free (lt->data);
    free (lt);
    return NULL;
  }
  lt->next = c->loose;
  c->loose = lt;
  return lt->data;
}

void
qcow2_cache_put (struct qcow2_cache *c, void *table)
{
  for (struct loose **p = &c->loose; *p; p = &(*p)->next)
    if ((*p)->data == table) {
      struct loose *lt = *p;
      *p = lt->next;
      free (lt->data);
      free (lt);
      return;
    }
  find_data (c, table)->pin--;
}

void
qcow2_cache_mark_dirty (struct qcow2_cache *c, void *table)
{
  find_data (c, table)->dirty = true;
}

int
qcow2_cache_writeback (struct qcow2_cache *c)
{
  for (size_t i = 0; i < c->cap; i++) {
    struct slot *s = &c->slots[i];
    if (s->offset && s->dirty && write_slot (c, s) == -1)
      return -1;
  }
  return 0;
}

struct qcow2_cache_batch *
qcow2_cache_collect (struct qcow2_cache *c)
{
  size_t n = 0, k = 0;
  struct qcow2_cache_batch *b;

  for (size_t i = 0; i < c->cap; i++)
    if (c->slots[i].offset && c->slots[i].dirty)
      n++;
  b = calloc (1, sizeof *b + n * sizeof b->items[0]);
  if (b == NULL) {
    cow_error_errno ("qcow2 cache batch");
    return NULL;
  }
  for (size_t i = 0; i < c->cap && k < n; i++) {
    struct slot *s = &c->slots[i];
    if (!s->offset || !s->dirty)
      continue;
    b->items[k].copy = malloc (c->q->cluster_size);
    if (b->items[k].copy == NULL) {
      cow_error_errno ("qcow2 cache batch");
      b->n = k;
      qcow2_cache_batch_done (c, b, false);
      return NULL;
    }
    memcpy (b->items[k].copy, s->data, c->q->cluster_size);
    b->items[k].slot = s;
    b->items[k].offset = s->offset;
    s->dirty = false;
    s->pin++;                   /* not evicted (and re-read) meanwhile */
    k++;
  }
  b->n = k;
  return b;
}

bool
qcow2_cache_batch_empty (const struct qcow2_cache_batch *b)
{
  return b->n == 0;
}

int
qcow2_cache_batch_write (struct qcow2 *q, struct qcow2_cache_batch *b)
{
  for (size_t i = 0; i < b->n; i++)
    if (io_pwrite (q->fd, b->items[i].copy, q->cluster_size,
                   b->items[i].offset) == -1) {
      cow_error_errno ("%s: writing metadata at offset %" PRIu64,
                       q->layer.path, b->items[i].offset);
      return -1;
    }
  return 0;
}

void
qcow2_cache_batch_done (struct qcow2_cache *c, struct qcow2_cache_batch *b,
                        bool ok)
{
  for (size_t i = 0; i < b->n; i++) {
    b->items[i].slot->pin--;
    if (!ok)
      b->items[i].slot->dirty = true;
    free (b->items[i].copy);
  }
  free (b);
}
