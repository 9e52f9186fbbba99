/* SPDX-License-Identifier: BSD-3-Clause */
/* The metadata cache of the qcow2 layers: cluster-sized tables (L2
 * tables and refcount blocks), one cache per table kind and layer, all
 * drawing their memory from one pool per process whose budget is the
 * server's cache-size (every layer of every disk together).
 *
 * The least recently used table goes first, across the whole pool: a
 * global tick stamps each use, and a table needed when the pool is full
 * takes the place of the oldest clean, unpinned table of any cache, so
 * the tables of an idle or frozen layer leave before the active layer's
 * hot ones.  Another layer's cache is only looked at with its lock taken
 * by trylock (its owner may be waiting for the pool lock), and only its
 * clean tables leave that way: a dirty table may only be written once
 * the data and refcounts it depends on are stable (see qcow2.h), which
 * only its own layer can arrange.  The caller's own cache also gives up
 * a dirty table, written back first (refcount blocks and a sync before
 * an L2 table, through the before_write hook).  A dirty table is never
 * dropped: when it cannot be written back it stays, and the request that
 * needed room is served beyond the budget (up to twice it), so that a
 * guest request does not fail for want of a slot; a lookup never does
 * (it reads a copy of its own then).
 *
 * A cache may also have a limit of its own (qcow2_open's cache_size, for
 * tests that want evictions in a small layer); up to twice that limit
 * while nothing of its own can leave. */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "io.h"
#include "qcow2.h"

struct slot {
  uint64_t offset;        /* host offset of the table; 0 = empty slot */
  void *data;             /* NULL: holds no memory of the pool */
  uint64_t used;          /* pool tick of the last use */
  unsigned pin;
  bool dirty;
  size_t next;            /* next slot + 1 in its offset bucket; 0 = end */
  size_t dnext;           /* next slot + 1 in its data-pointer bucket */
  size_t hpos;            /* its place in held[] while data != NULL */
};

/* A table read by qcow2_cache_lookup when no slot could take it. */
struct loose {
  struct loose *next;
  void *data;
};

/* The slots grow as the cache holds more tables; a hash on the offset
 * keeps a lookup O(1) however large the cache, another on the data
 * pointer finds the slot of a table handed out.  Everything here is
 * guarded by the layer's lock (q->lock); the pool links (prev, next) by
 * the pool lock. */
struct qcow2_cache {
  struct qcow2 *q;
  bool is_l2;
  qcow2_cache_hook before_write;
  size_t limit;           /* own limit in tables; 0 = the pool's only */
  size_t n_slots, cap;    /* slots in use (some may be empty), allocated */
  size_t n_held;          /* slots holding memory (data != NULL) ... */
  size_t *held;           /* ... listed here, so that a search for the
                           * oldest table sees only those */
  size_t held_cap;
  size_t *spare;          /* slots without memory, to use first */
  size_t n_spare;
  struct slot *slots;
  size_t *buckets;        /* by offset: slot + 1; 0 = empty */
  size_t *dbuckets;       /* by data pointer */
  size_t n_buckets;       /* a power of two, >= cap */
  struct loose *loose;    /* lookups' own tables, until put */
  struct qcow2_cache *prev, *next;   /* in the pool */
};

/* The pool: lock orders after every layer lock (chain.h, level 7a): it
 * is taken with a layer's lock held, and while it is held other layers'
 * locks are only tried, never waited for.  No I/O under it. */
static struct {
  pthread_mutex_t lock;
  uint64_t budget;        /* bytes */
  uint64_t used, peak;    /* bytes of tables held by all caches */
  uint64_t tables;        /* how many */
  uint64_t tick;          /* atomic */
  struct qcow2_cache *head;
} pool = {
  .lock = PTHREAD_MUTEX_INITIALIZER,
  .budget = QCOW2_CACHE_DEFAULT_BUDGET,
};

void
qcow2_cache_set_budget (uint64_t bytes)
{
  pthread_mutex_lock (&pool.lock);
  pool.budget = bytes ? bytes : QCOW2_CACHE_DEFAULT_BUDGET;
  pthread_mutex_unlock (&pool.lock);
}

void
qcow2_cache_usage (uint64_t *budget, uint64_t *used, uint64_t *peak,
                   uint64_t *tables)
{
  pthread_mutex_lock (&pool.lock);
  *budget = pool.budget;
  *used = pool.used;
  *peak = pool.peak;
  *tables = pool.tables;
  pthread_mutex_unlock (&pool.lock);
}

/* Count a table's memory in or out of the pool (pool lock held). */
static void
pool_add (uint64_t bytes)
{
  pool.used += bytes;
  pool.tables++;
  if (pool.used > pool.peak)
    pool.peak = pool.used;
}

static void
pool_sub (uint64_t bytes)
{
  pool.used -= bytes;
  pool.tables--;
}

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

static void
dhash_insert (struct qcow2_cache *c, struct slot *s)
{
  size_t b = dbucket_of (c, s->data);

  s->dnext = c->dbuckets[b];
  c->dbuckets[b] = (size_t) (s - c->slots) + 1;
}

static void
dhash_remove (struct qcow2_cache *c, struct slot *s)
{
  size_t *p = &c->dbuckets[dbucket_of (c, s->data)];
  size_t me = (size_t) (s - c->slots) + 1;

  while (*p && *p != me)
    p = &c->slots[*p - 1].dnext;
  if (*p)
    *p = s->dnext;
  s->dnext = 0;
}

/* Room for one more slot: the array and both hashes grow (by doubling,
 * rehashing).  Slots are named by index wherever they are kept. */
static int
grow (struct qcow2_cache *c)
{
  size_t cap = c->cap ? 2 * c->cap : 16;
  struct slot *ns;
  size_t *nb, *nd, nbk;

  ns = realloc (c->slots, cap * sizeof *ns);
  if (ns == NULL)
    goto oom;
  {
    size_t *sp = realloc (c->spare, cap * sizeof *sp);
    if (sp == NULL) {
      /* The slots grew: keep them (the old size stays in cap). */
      c->slots = ns;
      goto oom;
    }
    c->spare = sp;
  }
  memset (ns + c->cap, 0, (cap - c->cap) * sizeof *ns);
  c->slots = ns;
  c->cap = cap;
  if (cap <= c->n_buckets)
    return 0;
  for (nbk = c->n_buckets ? c->n_buckets : 16; nbk < cap; nbk *= 2)
    ;
  nb = calloc (nbk, sizeof *nb);
  nd = calloc (nbk, sizeof *nd);
  if (nb == NULL || nd == NULL) {
    free (nb);
    free (nd);
    goto oom;
  }
  free (c->buckets);
  free (c->dbuckets);
  c->buckets = nb;
  c->dbuckets = nd;
  c->n_buckets = nbk;
  for (size_t i = 0; i < c->n_slots; i++) {
    struct slot *s = &c->slots[i];
    if (s->offset)
      hash_insert (c, s);
    if (s->data)
      dhash_insert (c, s);
  }
  return 0;

 oom:
  cow_error_errno ("%s: metadata cache", c->q->layer.path);
  return -1;
}

struct batch_item {
  size_t slot;            /* index: the slots may move meanwhile */
  uint64_t offset;
  void *copy;
};

struct qcow2_cache_batch {
  size_t n;
  struct batch_item items[];
};

struct qcow2_cache *
qcow2_cache_create (struct qcow2 *q, size_t limit, bool is_l2,
                    qcow2_cache_hook before_write)
{
  struct qcow2_cache *c = calloc (1, sizeof *c);

  if (c == NULL) {
    cow_error_errno ("qcow2 cache");
    return NULL;
  }
  if (limit && limit < 4)
    limit = 4;
  c->q = q;
  c->is_l2 = is_l2;
  c->before_write = before_write;
  c->limit = limit;
  pthread_mutex_lock (&pool.lock);
  c->next = pool.head;
  if (pool.head)
    pool.head->prev = c;
  pool.head = c;
  pthread_mutex_unlock (&pool.lock);
  return c;
}

void
qcow2_cache_destroy (struct qcow2_cache *c)
{
  if (c == NULL)
    return;
  pthread_mutex_lock (&pool.lock);
  if (c->prev)
    c->prev->next = c->next;
  else
    pool.head = c->next;
  if (c->next)
    c->next->prev = c->prev;
  for (size_t i = 0; i < c->n_slots; i++)
    if (c->slots[i].data) {
      pool_sub (c->q->cluster_size);
      free (c->slots[i].data);
    }
  pthread_mutex_unlock (&pool.lock);
  while (c->loose) {
    struct loose *lt = c->loose;
    c->loose = lt->next;
    free (lt->data);
    free (lt);
  }
  free (c->slots);
  free (c->held);
  free (c->spare);
  free (c->buckets);
  free (c->dbuckets);
  free (c);
}

static struct slot *
find (struct qcow2_cache *c, uint64_t offset)
{
  if (c->n_buckets == 0)
    return NULL;
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

/* Give a slot's memory back to the pool (pool lock held; the table is
 * clean and unpinned): the buffer is the caller's, to free or to use
 * again for a table of the same size. */
static void *
release (struct qcow2_cache *c, struct slot *s)
{
  void *data = s->data;
  size_t last;

  if (s->offset)
    hash_remove (c, s);
  s->offset = 0;
  if (data == NULL)
    return NULL;
  dhash_remove (c, s);
  s->data = NULL;
  last = c->held[--c->n_held];
  c->held[s->hpos] = last;
  c->slots[last].hpos = s->hpos;
  c->spare[c->n_spare++] = (size_t) (s - c->slots);
  pool_sub (c->q->cluster_size);
  return data;
}

/* A slot without a table or memory; NULL with the error set if the
 * array cannot grow. */
static struct slot *
empty_slot (struct qcow2_cache *c)
{
  if (c->n_spare)
    return &c->slots[c->spare[--c->n_spare]];
  if (c->n_slots == c->cap && grow (c) == -1)
    return NULL;
  return &c->slots[c->n_slots++];
}

/* The least recently used unpinned table of c (dirty: may it be
 * dirty?), or NULL. */
static struct slot *
lru (struct qcow2_cache *c, bool dirty)
{
  struct slot *best = NULL;

  for (size_t k = 0; k < c->n_held; k++) {
    struct slot *s = &c->slots[c->held[k]];
    if (s->offset == 0 || s->pin || (s->dirty && !dirty))
      continue;
    if (best == NULL || s->used < best->used)
      best = s;
  }
  return best;
}

/* The pool is full: the oldest clean unpinned table of any cache whose
 * lock can be had (c's own layer's lock is held already) leaves.
 * Returns 2 when it was c's own (*own: its slot, memory and all, to
 * reuse), 1 when it was another cache's (its memory went back to the
 * pool; *buf: its buffer if c can use it, else NULL), 0 when no table
 * could leave.  Pool lock held. */
static int
steal_oldest (struct qcow2_cache *c, struct slot **own, void **buf)
{
  struct qcow2_cache *best_c = NULL;
  struct slot *best = NULL;
  pthread_mutex_t *held = NULL;  /* another layer's lock, for best */

  for (struct qcow2_cache *x = pool.head; x; x = x->next) {
    pthread_mutex_t *xl = &x->q->lock;
    bool have = x->q == c->q || xl == held;
    struct slot *s;

    if (!have && pthread_mutex_trylock (xl) != 0)
      continue;
    s = x->n_held ? lru (x, false) : NULL;
    if (s && (best == NULL || s->used < best->used)) {
      best = s;
      best_c = x;
      if (x->q == c->q) {
        if (held)
          pthread_mutex_unlock (held);
        held = NULL;
      }
      else if (xl != held) {
        if (held)
          pthread_mutex_unlock (held);
        held = xl;
      }
    }
    else if (!have)
      pthread_mutex_unlock (xl);
  }
  if (best == NULL)
    return 0;
  if (best_c == c) {
    hash_remove (c, best);
    best->offset = 0;
    *own = best;
    return 2;
  }
  *buf = release (best_c, best);
  if (best_c->q->cluster_size != c->q->cluster_size) {
    free (*buf);
    *buf = NULL;
  }
  if (held)
    pthread_mutex_unlock (held);
  return 1;
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

/* Memory for one more table in an empty slot of c (buf, or new); the
 * caller counted it in the pool already (given back here on failure). */
static struct slot *
with_memory (struct qcow2_cache *c, void *buf)
{
  struct slot *s = empty_slot (c), *slot = s;

  if (s && c->n_held == c->held_cap) {
    size_t cap = c->held_cap ? 2 * c->held_cap : 16;
    size_t *h = realloc (c->held, cap * sizeof *h);
    if (h == NULL) {
      cow_error_errno ("%s: metadata cache", c->q->layer.path);
      s = NULL;
    }
    else {
      c->held = h;
      c->held_cap = cap;
    }
  }
  /* Page aligned for O_DIRECT some day; posix_memalign, unlike
   * aligned_alloc, allows a size below the alignment. */
  if (s && buf == NULL && posix_memalign (&buf, 4096, c->q->cluster_size) != 0) {
    buf = NULL;
    errno = ENOMEM;
    cow_error_errno ("%s: metadata cache", c->q->layer.path);
    s = NULL;
  }
  if (s == NULL) {
    free (buf);
    if (slot)
      c->spare[c->n_spare++] = (size_t) (slot - c->slots);
    pthread_mutex_lock (&pool.lock);
    pool_sub (c->q->cluster_size);
    pthread_mutex_unlock (&pool.lock);
    return NULL;
  }
  s->data = buf;
  dhash_insert (c, s);
  s->hpos = c->n_held;
  c->held[c->n_held++] = (size_t) (s - c->slots);
  return s;
}

/* Make an unpinned table of c leave for another one: written back first
 * if dirty.  Its slot keeps the memory; NULL if the write failed. */
static struct slot *
evict_own (struct qcow2_cache *c, struct slot *s)
{
  if (s->dirty && write_slot (c, s) == -1)
    return NULL;
  hash_remove (c, s);
  s->offset = 0;
  return s;
}

/* A slot with memory and no table, for a table that is not cached (see
 * the top of the file for who gives way); NULL with the error set when
 * there is no room at all.  Caller holds the layer's lock. */
static struct slot *
free_slot (struct qcow2_cache *c)
{
  uint64_t cs = c->q->cluster_size;
  struct slot *s = NULL;
  void *buf = NULL;
  bool over;

  if (c->limit && c->n_held >= c->limit) {
    /* Its own limit: its own oldest table, clean ones first (writing a
     * dirty L2 table costs a sync). */
    s = lru (c, false);
    if (s == NULL)
      s = lru (c, true);
    if (s && evict_own (c, s) != NULL)
      return s;
    if (c->n_held >= 2 * c->limit) {
      if (s)
        return NULL;            /* with the write-back's error */
      goto exhausted;
    }
    pthread_mutex_lock (&pool.lock);
    pool_add (cs);
    pthread_mutex_unlock (&pool.lock);
    return with_memory (c, NULL);
  }

  pthread_mutex_lock (&pool.lock);
  if (pool.used + cs <= pool.budget) {
    pool_add (cs);
    pthread_mutex_unlock (&pool.lock);
    return with_memory (c, NULL);
  }
  switch (steal_oldest (c, &s, &buf)) {
  case 2:
    pthread_mutex_unlock (&pool.lock);
    return s;
  case 1:
    pool_add (cs);
    pthread_mutex_unlock (&pool.lock);
    return with_memory (c, buf);
  }
  pthread_mutex_unlock (&pool.lock);

  /* Nothing clean anywhere: a dirty table of its own, written back. */
  s = lru (c, true);
  if (s && evict_own (c, s) != NULL)
    return s;
  /* Beyond the budget, up to twice it; a cache may always hold four. */
  pthread_mutex_lock (&pool.lock);
  over = pool.used + cs > 2 * pool.budget && c->n_held >= 4;
  if (!over)
    pool_add (cs);
  pthread_mutex_unlock (&pool.lock);
  if (!over)
    return with_memory (c, NULL);
  if (s)
    return NULL;                /* with the write-back's error */

 exhausted:
  cow_error_set (ENOMEM, "%s: metadata cache exhausted", c->q->layer.path);
  return NULL;
}

/* Put the table at offset into slot s (clean, with memory); fresh:
 * zeroed.  On failure the slot's memory goes back to the pool. */
static int
load (struct qcow2_cache *c, struct slot *s, uint64_t offset, bool fresh)
{
  struct qcow2 *q = c->q;

  if (fresh)
    memset (s->data, 0, q->cluster_size);
  else if (read_table (c, s->data, offset) == -1) {
    pthread_mutex_lock (&pool.lock);
    free (release (c, s));
    pthread_mutex_unlock (&pool.lock);
    return -1;
  }
  s->offset = offset;
  s->dirty = false;
  hash_insert (c, s);
  return 0;
}

static void *
pin (struct qcow2_cache *c, struct slot *s)
{
  s->used = __atomic_add_fetch (&pool.tick, 1, __ATOMIC_RELAXED);
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
  for (size_t i = 0; i < c->n_slots; i++) {
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

  for (size_t i = 0; i < c->n_slots; i++)
    if (c->slots[i].offset && c->slots[i].dirty)
      n++;
  b = calloc (1, sizeof *b + n * sizeof b->items[0]);
  if (b == NULL) {
    cow_error_errno ("qcow2 cache batch");
    return NULL;
  }
  for (size_t i = 0; i < c->n_slots && k < n; i++) {
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
    b->items[k].slot = i;
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
    struct slot *s = &c->slots[b->items[i].slot];
    s->pin--;
    if (!ok)
      s->dirty = true;
    free (b->items[i].copy);
  }
  free (b);
}
