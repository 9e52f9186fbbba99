/* SPDX-License-Identifier: BSD-3-Clause */
/* A read-only base on a remote NBD server, read through libnbd.
 *
 * The base is named by a libnbd URI (nbd://HOST:PORT/EXPORT,
 * nbd+unix:///EXPORT?socket=PATH, nbds:..., see nbd_connect_uri(3)).  It
 * is read as raw: its size is the export's size, reads are NBD reads,
 * map is NBD block status with the "base:allocation" context (an extent
 * with the ZERO flag reads as zero; everything else, including a HOLE
 * without ZERO, is data; a server without base:allocation is all data).
 * Writes, zeroes and trims fail with EROFS; flush does nothing.
 *
 * Connections.  A libnbd handle is thread-safe, but each synchronous call
 * holds the handle for its whole round trip, so one handle would serialise
 * every base read of every nbdkit worker thread.  Asynchronous commands on
 * one handle would avoid that, but then some thread has to drive the
 * handle's state machine (nbd_aio_poll) for the others: a dedicated I/O
 * thread and a hand-off per request, more code and one more context switch
 * per read.  Instead the layer keeps a small pool of synchronous handles:
 * NBD_POOL_MAX connections when the server advertises multi-conn (its
 * promise that several connections to the export are fine; some servers,
 * e.g. qemu-nbd by default, accept only one client), else one.  Each
 * connection is guarded by its own mutex; a request takes a free one,
 * trying them round-robin, or waits for one.  The mutex also protects the
 * handle pointer itself, which a reconnect replaces.
 *
 * Reconnecting.  If a read (or block status) fails because the connection
 * is gone (the handle is no longer ready: the server exited, the network
 * dropped), that connection is closed and reopened once, with a fresh
 * handle to the same URI, and the request is retried once on it.  If the
 * reconnect or the retry fails, the request fails with EIO and a message
 * naming the URI, the offset and libnbd's error; the slot stays
 * disconnected and the next request that lands on it tries again, so the
 * base comes back by itself once the server does.  A reconnect that finds
 * an export of a different size is refused (EIO): the base must not
 * change under the overlay.  An error the server reports on a live
 * connection (it answered EIO, say) is not retried; it fails with EIO at
 * once.
 *
 * Timeout (base-timeout).  Every request gets one deadline when it
 * starts: the wait for a free connection, the command itself, and a
 * reconnect with its retry all fit in it.  Commands are sent with
 * libnbd's asynchronous calls and waited for with nbd_poll up to the
 * deadline (the synchronous calls wait the same way inside libnbd, so
 * this costs nothing on a healthy base).  A command without an answer
 * by then fails with EIO and a message naming the base and the timeout,
 * and its connection is closed at once (nbd_close frees the commands in
 * flight; none of them touches our buffers afterwards), because a late
 * answer could otherwise be taken for the next request's.  It is not
 * retried: the next request that lands on the slot reconnects.  This
 * bounds how long a guest request, and so a hold of the chain lock
 * shared, can sit on a stuck base: chain changes wait for those holds.
 * A timeout of 0 means wait forever (the behaviour before the key).
 *
 * What a failed base read does above this layer: a guest read of an area
 * the overlay does not hold fails with EIO, and so does a guest write that
 * needs copy-on-write from the base (one that covers only part of a
 * cluster the overlay does not hold yet); the overlay's L2 tables are not
 * changed by it.  Whatever the overlay holds keeps being served, and
 * writes of whole clusters still work.
 *
 * A unix socket given as a relative path is made absolute (against the
 * working directory at open) for the connections, because nbdkit changes
 * to / when it forks into the background; the URI as given is what the
 * layer is called and what the overlay records as its backing file.
 */
#include <config.h>

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <libnbd.h>

#include "error.h"
#include "layer.h"

#define NBD_POOL_MAX 4
/* Largest read sent in one NBD command when the server gives no maximum
 * (some servers drop the connection above 32M; libnbd allows 64M). */
#define NBD_DEFAULT_MAX_READ (32u << 20)
#define NBD_LIBNBD_MAX_READ (64u << 20)
/* Largest block status request (the protocol's count is 32 bits). */
#define NBD_MAX_STATUS (1u << 30)

/* One connection of the pool. */
struct remote_conn {
  /* lock protects every field of this connection, the handle included
   * (a reconnect replaces it), and is held for the whole of each request
   * on it. */
  pthread_mutex_t lock;
  struct nbd_handle *h;         /* NULL: disconnected, reconnect on use */
  uint32_t min_block;           /* server's minimum block size (>= 1) */
  uint32_t max_read;            /* largest pread in one command */
  bool have_alloc;              /* base:allocation negotiated */
};

struct remote_layer {
  struct layer layer;
  char *connect_uri;            /* what is passed to nbd_connect_uri */
  uint32_t timeout_ms;          /* per request; 0 = none (fixed) */
  unsigned n_conns;             /* fixed after open */
  unsigned next;                /* atomic: round-robin start */
  struct remote_conn conns[NBD_POOL_MAX];
};

bool
remote_is_uri (const char *name)
{
  return strncmp (name, "nbd:", 4) == 0 || strncmp (name, "nbds:", 5) == 0
    || strncmp (name, "nbd+", 4) == 0 || strncmp (name, "nbds+", 5) == 0;
}

/* libnbd's last error of this thread, never NULL. */
static const char *
nbd_msg (void)
{
  const char *m = nbd_get_error ();

  return m ? m : "unknown libnbd error";
}

/* Deadlines are CLOCK_MONOTONIC nanoseconds; 0 is none. */
static uint64_t
mono_ns (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_MONOTONIC, &ts);
  return (uint64_t) ts.tv_sec * 1000000000u + (uint64_t) ts.tv_nsec;
}

static uint64_t
deadline_of (const struct remote_layer *n)
{
  return n->timeout_ms ? mono_ns () + (uint64_t) n->timeout_ms * 1000000u : 0;
}

/* Wait on h until done() or the deadline: done()'s non-zero answer, 0
 * timed out, -1 libnbd failed (its message left in the thread). */
static int
poll_until (struct nbd_handle *h, uint64_t deadline,
            int (*done) (struct nbd_handle *h, int64_t cookie),
            int64_t cookie)
{
  for (;;) {
    int r = done (h, cookie);
    int ms = -1;

    if (r != 0)
      return r;
    if (deadline) {
      uint64_t now = mono_ns ();
      if (now >= deadline)
        return 0;
      ms = (deadline - now + 999999) / 1000000 > INT_MAX ? INT_MAX
        : (int) ((deadline - now + 999999) / 1000000);
    }
    if (nbd_poll (h, ms) == -1)
      return -1;
  }
}

/* done() of a command: 1 answered, -1 failed (libnbd's error set), 0 not
 * yet. */
static int
command_done (struct nbd_handle *h, int64_t cookie)
{
  return nbd_aio_command_completed (h, cookie);
}

/* done() of the handshake: 1 ready, -2 the connection ended, 0 not yet. */
static int
connect_done (struct nbd_handle *h, int64_t unused)
{
  if (nbd_aio_is_connecting (h) == 1)
    return 0;
  return nbd_aio_is_ready (h) == 1 ? 1 : -2;
}

/* Create a handle, connect it to uri by the deadline and fill in c's
 * limits.  On failure returns NULL with *err set to a malloc'd reason. */
static struct nbd_handle *
conn_connect (const char *uri, struct remote_conn *c, uint64_t deadline,
              char **err)
{
  struct nbd_handle *h = nbd_create ();
  int64_t v;
  int r;

  *err = NULL;
  if (h == NULL)
    goto fail;
  if (nbd_add_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION) == -1
      || nbd_aio_connect_uri (h, uri) == -1)
    goto fail;
  r = poll_until (h, deadline, connect_done, 0);
  if (r == 0 || r == -2) {
    nbd_close (h);
    *err = strdup (r == 0 ? "the handshake did not finish within the base "
                   "timeout" : "the server ended the connection during the "
                   "handshake");
    return NULL;
  }
  if (r == -1)
    goto fail;
  v = nbd_get_block_size (h, LIBNBD_SIZE_MINIMUM);
  c->min_block = v > 0 && v <= 65536 ? (uint32_t) v : 1;
  v = nbd_get_block_size (h, LIBNBD_SIZE_MAXIMUM);
  c->max_read = v > 0 && v < NBD_LIBNBD_MAX_READ ? (uint32_t) v
    : v >= NBD_LIBNBD_MAX_READ ? NBD_LIBNBD_MAX_READ : NBD_DEFAULT_MAX_READ;
  /* A multiple of the minimum block size, and at least one block. */
  c->max_read &= ~(c->min_block - 1);
  if (c->max_read < c->min_block)
    c->max_read = c->min_block;
  c->have_alloc = nbd_can_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1;
  return h;

 fail:
  *err = strdup (nbd_msg ());
  if (h)
    nbd_close (h);
  return NULL;
}

/* Is the connection still usable (so an error came from the server)? */
static bool
conn_alive (struct remote_conn *c)
{
  return c->h && nbd_aio_is_ready (c->h) == 1;
}

/* Close c's connection, with any command still in flight on it (libnbd
 * retires those without touching their buffers again). */
static void
conn_drop (struct remote_conn *c)
{
  if (c->h) {
    nbd_close (c->h);        /* no NBD_CMD_DISC: the connection is broken */
    c->h = NULL;
  }
}

/* Replace a broken connection (caller holds c->lock).  On failure
 * returns -1 with *why set to a malloc'd reason (or NULL). */
static int
conn_reconnect (struct remote_layer *n, struct remote_conn *c, uint64_t deadline,
                char **why)
{
  int64_t size;

  *why = NULL;
  conn_drop (c);
  c->h = conn_connect (n->connect_uri, c, deadline, why);
  if (c->h == NULL)
    return -1;
  size = nbd_get_size (c->h);
  if (size < 0 || (uint64_t) size != n->layer.size) {
    if (asprintf (why, "the export's size is now %" PRId64 " instead of %"
                  PRIu64 "; refusing a base that changed", size,
                  n->layer.size) == -1)
      *why = NULL;
    conn_drop (c);
    return -1;
  }
  return 0;
}

/* Take a connection: the first free one from the round-robin position,
 * else wait for that one until the deadline (NULL when it passed). */
static struct remote_conn *
conn_get (struct remote_layer *n, uint64_t deadline)
{
  unsigned start = __atomic_fetch_add (&n->next, 1, __ATOMIC_RELAXED);
  struct remote_conn *c;
  struct timespec ts;

  for (unsigned i = 0; i < n->n_conns; i++) {
    c = &n->conns[(start + i) % n->n_conns];
    if (pthread_mutex_trylock (&c->lock) == 0)
      return c;
  }
  c = &n->conns[start % n->n_conns];
  if (deadline == 0) {
    pthread_mutex_lock (&c->lock);
    return c;
  }
  ts.tv_sec = (time_t) (deadline / 1000000000u);
  ts.tv_nsec = (long) (deadline % 1000000000u);
  if (pthread_mutex_clocklock (&c->lock, CLOCK_MONOTONIC, &ts) != 0)
    return NULL;
  return c;
}

static void
conn_put (struct remote_conn *c)
{
  pthread_mutex_unlock (&c->lock);
}

/* An operation on one connection (caller holds c->lock), answered by
 * the deadline: 0 on success, -1 when libnbd failed (its message left in
 * the thread), -2 on a local failure (recorded with cow_error_set), -3
 * when the deadline passed (the connection is then dropped).  A
 * disconnected slot (h NULL) fails with -1. */
typedef int (*conn_op) (struct remote_layer *n, struct remote_conn *c, void *arg,
                        uint64_t deadline);

/* Wait for the command cookie (-1: sending it failed) on c. */
static int
conn_wait (struct remote_conn *c, int64_t cookie, uint64_t deadline)
{
  int r;

  if (cookie == -1)
    return -1;
  r = poll_until (c->h, deadline, command_done, cookie);
  if (r == 0) {
    conn_drop (c);
    return -3;
  }
  return r == 1 ? 0 : -1;
}

struct read_args {
  char *buf;
  uint64_t count, offset;
};

/* Read [offset, offset+count) of the export, which lies within it, on c:
 * split at max_read, with the ends widened to the minimum block size
 * through a bounce buffer when the server asks for alignment. */
static int
conn_pread (struct remote_layer *n, struct remote_conn *c, void *arg,
            uint64_t deadline)
{
  struct read_args *ra = arg;
  char *buf = ra->buf;
  uint64_t count = ra->count, offset = ra->offset;
  uint64_t mb = c->min_block;

  if (c->h == NULL)
    return -1;
  while (count > 0) {
    uint64_t astart = offset & ~(mb - 1);
    uint64_t alen = (offset - astart + count + mb - 1) & ~(mb - 1);
    uint64_t len;

    if (alen > c->max_read)
      alen = c->max_read;
    if (astart + alen > n->layer.size)      /* size not a block multiple */
      alen = n->layer.size - astart;
    len = astart + alen - offset;
    if (len > count)
      len = count;
    if (astart == offset && alen == len) {
      int r = conn_wait (c, nbd_aio_pread (c->h, buf, len, offset,
                                           NBD_NULL_COMPLETION, 0), deadline);
      if (r != 0)
        return r;
    }
    else {
      char *bounce = malloc (alen);
      int r;

      if (bounce == NULL) {
        cow_error_errno ("%s: bounce buffer", n->layer.path);
        return -2;
      }
      /* On a timeout the connection is gone before bounce is freed. */
      r = conn_wait (c, nbd_aio_pread (c->h, bounce, alen, astart,
                                       NBD_NULL_COMPLETION, 0), deadline);
      if (r == 0)
        memcpy (buf, bounce + (offset - astart), len);
      free (bounce);
      if (r != 0)
        return r;
    }
    buf += len;
    offset += len;
    count -= len;
  }
  return 0;
}

/* Run op on a connection of the pool, reconnecting once if the
 * connection turns out to be broken (see the top of this file).  what
 * describes the request for messages. */
static int
run_op (struct remote_layer *n, conn_op op, void *arg, const char *what)
{
  uint64_t deadline = deadline_of (n);
  struct remote_conn *c = conn_get (n, deadline);
  char *first = NULL, *why = NULL;
  int r;

  if (c == NULL) {
    cow_error_set (EIO, "%s: %s failed: no connection to the base came free "
                   "within the base timeout of %.6g s (the requests on them "
                   "are stuck)", n->layer.path, what, n->timeout_ms / 1000.0);
    return -1;
  }
  r = op (n, c, arg, deadline);
  if (r == 0 || r == -2)
    goto out;
  if (r == -3)
    goto timed_out;
  /* A server that is shutting down answers ESHUTDOWN on a connection
   * that stays open (nbdkit does until its clients leave): that
   * connection is as good as broken, and a new one reaches the server
   * that took its place. */
  if (conn_alive (c) && nbd_get_errno () != ESHUTDOWN) {
    /* The server answered with an error: a new connection would not
     * change its mind. */
    cow_error_set (EIO, "%s: %s failed: %s", n->layer.path, what, nbd_msg ());
    goto out;
  }
  first = strdup (c->h ? nbd_msg () : "not connected");
  if (conn_reconnect (n, c, deadline, &why) == -1) {
    cow_error_set (EIO, "%s: %s failed (%s), and reconnecting failed: %s",
                   n->layer.path, what, first ? first : "?",
                   why ? why : "out of memory");
    r = -1;
    goto out;
  }
  r = op (n, c, arg, deadline);
  if (r == -1) {
    cow_error_set (EIO, "%s: %s failed (%s), and failed again after "
                   "reconnecting: %s", n->layer.path, what,
                   first ? first : "?", nbd_msg ());
    if (!conn_alive (c) || nbd_get_errno () == ESHUTDOWN)
      conn_drop (c);
  }
  if (r != -3)
    goto out;
 timed_out:
  cow_error_set (EIO, "%s: %s got no answer within the base timeout of "
                 "%.6g s (base-timeout=); the connection was dropped and the "
                 "next request reconnects", n->layer.path, what,
                 n->timeout_ms / 1000.0);
 out:
  conn_put (c);
  free (first);
  free (why);
  return r == 0 ? 0 : -1;
}

static int
nbd_layer_read (struct layer *l, void *buf, uint32_t count, uint64_t offset,
                const struct layer_below *below)
{
  struct remote_layer *n = (struct remote_layer *) l;
  struct read_args ra = { .buf = buf, .count = count, .offset = offset };
  char what[80];

  if (offset >= l->size) {
    memset (buf, 0, count);
    return 0;
  }
  if (offset + count > l->size) {
    ra.count = l->size - offset;
    memset ((char *) buf + ra.count, 0, count - ra.count);
  }
  if (ra.count == 0)
    return 0;
  snprintf (what, sizeof what, "read of %" PRIu64 " bytes at offset %" PRIu64,
            ra.count, offset);
  return run_op (n, conn_pread, &ra, what);
}

static int
nbd_layer_write (struct layer *l, const void *buf, uint32_t count,
                 uint64_t offset, const struct layer_below *below)
{
  cow_error_set (EROFS, "%s: a remote NBD base is read-only", l->path);
  return -1;
}

static int
nbd_layer_zero (struct layer *l, uint32_t count, uint64_t offset, bool fast,
                const struct layer_below *below)
{
  cow_error_set (EROFS, "%s: a remote NBD base is read-only", l->path);
  return -1;
}

static int
nbd_layer_trim (struct layer *l, uint32_t count, uint64_t offset)
{
  cow_error_set (EROFS, "%s: a remote NBD base is read-only", l->path);
  return -1;
}

static int
nbd_layer_flush (struct layer *l)
{
  return 0;
}

/* Block status: the first extent, and those after it of the same kind. */
struct map_acc {
  uint64_t want_from, want_to;  /* the range asked for */
  uint64_t len;                 /* run found so far, from want_from */
  enum layer_status status;
  bool started, done;
};

static int
map_extent (void *opaque, const char *metacontext, uint64_t offset,
            uint32_t *entries, size_t nr_entries, int *error)
{
  struct map_acc *a = opaque;
  uint64_t pos = offset;        /* where the server's extents start */

  if (strcmp (metacontext, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0
      || a->started)            /* a buggy server answering twice */
    return 0;
  a->started = true;
  for (size_t i = 0; i + 1 < nr_entries && !a->done; i += 2) {
    uint64_t e_start = pos, e_end = pos + entries[i];
    enum layer_status st = (entries[i + 1] & LIBNBD_STATE_ZERO)
      ? LAYER_ZERO : LAYER_DATA;

    pos = e_end;
    if (entries[i] == 0 || e_end <= a->want_from)
      continue;
    if (e_start < a->want_from)
      e_start = a->want_from;
    if (e_end > a->want_to)
      e_end = a->want_to;
    if (a->len == 0)
      a->status = st;
    else if (st != a->status) {
      a->done = true;
      break;
    }
    a->len += e_end - e_start;
    if (e_end >= a->want_to)
      a->done = true;
  }
  return 0;
}

struct map_args {
  uint64_t offset, count;
  struct map_acc acc;
};

static int
conn_map (struct remote_layer *n, struct remote_conn *c, void *arg,
          uint64_t deadline)
{
  struct map_args *ma = arg;
  struct map_acc *a = &ma->acc;
  uint64_t mb = c->min_block;
  uint64_t astart = ma->offset & ~(mb - 1);
  uint64_t alen = (ma->offset - astart + ma->count + mb - 1) & ~(mb - 1);
  nbd_extent_callback cb = { .callback = map_extent, .user_data = a };

  if (c->h == NULL)
    return -1;
  if (astart + alen > n->layer.size)
    alen = n->layer.size - astart;
  memset (a, 0, sizeof *a);
  a->want_from = ma->offset;
  a->want_to = ma->offset + ma->count;
  a->status = LAYER_DATA;
  if (!c->have_alloc) {
    a->len = ma->count;
    return 0;
  }
  /* a lives in the caller's frame, which outlasts the handle's use of
   * it: on a timeout the connection is closed before conn_wait returns. */
  return conn_wait (c, nbd_aio_block_status (c->h, alen, astart, cb,
                                             NBD_NULL_COMPLETION, 0),
                    deadline);
}

static int
nbd_layer_map (struct layer *l, uint64_t offset, uint64_t count,
               uint64_t *len, enum layer_status *status)
{
  struct remote_layer *n = (struct remote_layer *) l;
  struct map_args ma;
  char what[80];

  if (offset >= l->size) {
    *len = count;
    *status = LAYER_ZERO;
    return 0;
  }
  if (count > l->size - offset)
    count = l->size - offset;
  if (count > NBD_MAX_STATUS)
    count = NBD_MAX_STATUS;
  ma.offset = offset;
  ma.count = count;
  snprintf (what, sizeof what, "block status of %" PRIu64 " bytes at offset %"
            PRIu64, count, offset);
  if (run_op (n, conn_map, &ma, what) == -1)
    return -1;
  if (ma.acc.len == 0) {
    /* Nothing usable came back: data is always a safe answer. */
    *len = count;
    *status = LAYER_DATA;
  }
  else {
    *len = ma.acc.len;
    *status = ma.acc.status;
  }
  return 0;
}

static void
remote_layer_free (struct remote_layer *n)
{
  for (unsigned i = 0; i < NBD_POOL_MAX; i++)
    pthread_mutex_destroy (&n->conns[i].lock);
  free (n->connect_uri);
  free (n->layer.path);
  free (n);
}

static int
nbd_layer_close (struct layer *l)
{
  struct remote_layer *n = (struct remote_layer *) l;

  for (unsigned i = 0; i < n->n_conns; i++) {
    struct remote_conn *c = &n->conns[i];
    pthread_mutex_lock (&c->lock);
    if (c->h) {
      /* A polite NBD_CMD_DISC, without waiting for a server that may
       * not answer (nbd_shutdown would). */
      if (nbd_aio_is_ready (c->h) == 1)
        nbd_aio_disconnect (c->h, 0);
      nbd_close (c->h);
      c->h = NULL;
    }
    pthread_mutex_unlock (&c->lock);
  }
  remote_layer_free (n);
  return 0;
}

static const struct layer_ops remote_ops = {
  .kind = "nbd",
  .read = nbd_layer_read,
  .write = nbd_layer_write,
  .zero = nbd_layer_zero,
  .trim = nbd_layer_trim,
  .flush = nbd_layer_flush,
  .map = nbd_layer_map,
  .close = nbd_layer_close,
};

/* The URI for connecting: uri itself, or, for a unix socket given by a
 * relative path, the same URI with the socket made absolute against the
 * current directory (percent-encoded).  NULL on allocation failure. */
static char *
absolute_socket_uri (const char *uri)
{
  static const char hex[] = "0123456789ABCDEF";
  const char *q, *p, *val;
  char cwd[PATH_MAX], *out, *o;

  if (strncmp (uri, "nbd+unix:", 9) != 0 && strncmp (uri, "nbds+unix:", 10) != 0)
    return strdup (uri);
  q = strchr (uri, '?');
  if (q == NULL)
    return strdup (uri);
  val = NULL;
  for (p = q + 1; *p && *p != '#'; ) {
    if (strncmp (p, "socket=", 7) == 0) {
      val = p + 7;
      break;
    }
    p += strcspn (p, "&;#");
    if (*p == '&' || *p == ';')
      p++;
  }
  if (val == NULL || *val == '/' || strncasecmp (val, "%2f", 3) == 0
      || *val == '&' || *val == ';' || *val == '#' || *val == '\0')
    return strdup (uri);
  if (getcwd (cwd, sizeof cwd) == NULL)
    return strdup (uri);      /* leave it relative: nothing better to do */
  out = malloc (strlen (uri) + 3 * strlen (cwd) + 2);
  if (out == NULL)
    return NULL;
  memcpy (out, uri, (size_t) (val - uri));
  o = out + (val - uri);
  for (const char *s = cwd; *s; s++) {
    unsigned char ch = (unsigned char) *s;
    if (isalnum (ch) || strchr ("-._~/", ch))
      *o++ = (char) ch;
    else {
      *o++ = '%';
      *o++ = hex[ch >> 4];
      *o++ = hex[ch & 15];
    }
  }
  if (o[-1] != '/')
    *o++ = '/';
  strcpy (o, val);
  return out;
}

struct layer *
remote_layer_open (const char *uri, uint32_t timeout_ms)
{
  struct remote_layer *n;
  struct remote_conn *c;
  char *err = NULL;
  uint64_t deadline;
  int64_t size;
  int mc;

  n = calloc (1, sizeof *n);
  if (n == NULL) {
    cow_error_errno ("calloc");
    return NULL;
  }
  for (unsigned i = 0; i < NBD_POOL_MAX; i++)
    pthread_mutex_init (&n->conns[i].lock, NULL);
  n->layer.ops = &remote_ops;
  n->layer.readonly = true;
  n->timeout_ms = timeout_ms;
  n->layer.path = strdup (uri);
  n->connect_uri = absolute_socket_uri (uri);
  if (n->layer.path == NULL || n->connect_uri == NULL) {
    cow_error_errno ("strdup");
    goto err;
  }

  c = &n->conns[0];
  deadline = deadline_of (n);
  c->h = conn_connect (n->connect_uri, c, deadline, &err);
  if (c->h == NULL) {
    cow_error_set (EIO, "%s: cannot connect to the NBD server: %s", uri,
                   err ? err : "out of memory");
    free (err);
    goto err;
  }
  n->n_conns = 1;
  size = nbd_get_size (c->h);
  if (size < 0) {
    cow_error_set (EIO, "%s: cannot get the export's size: %s", uri,
                   nbd_msg ());
    goto err;
  }
  n->layer.size = (uint64_t) size;

  /* More connections only when the server says they are fine.  One that
   * cannot be made now is not an error: fewer connections just serve. */
  mc = nbd_can_multi_conn (c->h);
  if (mc == 1) {
    for (unsigned i = 1; i < NBD_POOL_MAX; i++) {
      struct remote_conn *ci = &n->conns[n->n_conns];
      ci->h = conn_connect (n->connect_uri, ci, deadline, &err);
      free (err);
      if (ci->h == NULL)
        break;
      size = nbd_get_size (ci->h);
      if (size < 0 || (uint64_t) size != n->layer.size) {
        nbd_close (ci->h);
        ci->h = NULL;
        break;
      }
      n->n_conns++;
    }
  }
  return &n->layer;

 err:
  for (unsigned i = 0; i < n->n_conns; i++)
    if (n->conns[i].h)
      nbd_close (n->conns[i].h);
  remote_layer_free (n);
  return NULL;
}
