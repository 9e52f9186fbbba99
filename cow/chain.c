/* The chain of one disk: a read-only base and the active qcow2 layer on
 * top.  Reads go top-down; writes, zeroes and trims reach only the active
 * layer, which copies what it needs from below.  Implements the public
 * cow_disk_* API of include/cowchain.h, including the sync policy for
 * clients that never flush. */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cowchain.h"
#include "error.h"
#include "layer.h"

#define COW_MAX_DEPTH 128

/* One read-only layer under the active one, with the way to what lies
 * under it. */
struct chain_node {
  struct layer *l;
  struct layer_below below;
};

struct cow_disk {
  struct layer *top;
  struct layer_below top_below;
  struct chain_node lower[COW_MAX_DEPTH];   /* [0] = base, then its backing */
  size_t n_lower;
  uint64_t size;

  /* chain_lock: I/O holds it shared, changes of the chain (none yet
   * besides close) hold it exclusive. */
  pthread_rwlock_t chain_lock;

  enum cow_sync_mode sync_mode;
  uint32_t sync_interval_ms;
  unsigned dirty;               /* atomic: written since the last flush */

  /* The interval sync thread; sync_lock protects stop. */
  pthread_t sync_thread;
  bool sync_running;
  pthread_mutex_t sync_lock;
  pthread_cond_t sync_cond;
  bool stop;
};

/* Read from one lower layer: past its end reads as zero. */
static int
node_read (void *opaque, void *buf, uint32_t count, uint64_t offset)
{
  struct chain_node *n = opaque;
  uint64_t size = n->l->size;
  uint32_t part = count;

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

static void
link_chain (struct cow_disk *d)
{
  for (size_t i = 0; i < d->n_lower; i++) {
    d->lower[i].below.read = i + 1 < d->n_lower ? node_read : NULL;
    d->lower[i].below.opaque = i + 1 < d->n_lower ? &d->lower[i + 1] : NULL;
  }
  d->top_below.read = node_read;
  d->top_below.opaque = &d->lower[0];
}

static void
close_lower (struct cow_disk *d)
{
  for (size_t i = 0; i < d->n_lower; i++)
    d->lower[i].l->ops->close (d->lower[i].l);
  d->n_lower = 0;
}

/* The backing name to store in the overlay: relative to the overlay's
 * directory where possible. */
static char *
backing_name_for (const char *overlay, const char *base)
{
  char odir[PATH_MAX], bpath[PATH_MAX];
  char *ocopy = strdup (overlay), *slash, *out;
  size_t common = 0, ups = 0, olen, i;
  const char *rest;

  if (ocopy == NULL)
    return NULL;
  slash = strrchr (ocopy, '/');
  if (slash == ocopy)
    ocopy[1] = '\0';
  else if (slash)
    *slash = '\0';
  else
    strcpy (ocopy, ".");
  if (realpath (ocopy, odir) == NULL || realpath (base, bpath) == NULL) {
    free (ocopy);
    return NULL;
  }
  free (ocopy);
  if (strcmp (odir, "/") == 0)
    return strdup (bpath + 1);
  olen = strlen (odir);
  /* Longest common directory prefix. */
  for (i = 0; i <= olen; i++) {
    if ((odir[i] == '/' || odir[i] == '\0') && bpath[i] == '/'
        && strncmp (odir, bpath, i) == 0)
      common = i;
    if (odir[i] != bpath[i])
      break;
  }
  for (i = common; i < olen; i++)
    if (odir[i] == '/')
      ups++;
  if (common == 0)
    return strdup (bpath);           /* only the root in common */
  rest = bpath + common + 1;
  out = malloc (ups * 3 + strlen (rest) + 1);
  if (out == NULL)
    return NULL;
  out[0] = '\0';
  for (i = 0; i < ups; i++)
    strcat (out, "../");
  strcat (out, rest);
  return out;
}

/* Is the overlay's backing name the base the user configured? */
static int
check_backing (struct layer *top, const char *overlay, const char *base,
               const char *base_format)
{
  const char *name = qcow2_backing_file (top);
  const char *fmt = qcow2_backing_format (top);
  struct stat sb, sn;
  char *resolved = NULL;
  int r = -1;

  if (name == NULL) {
    cow_error_set (EINVAL, "%s: existing overlay has no backing file, but "
                   "base=%s was given", overlay, base);
    return -1;
  }
  if (nbd_is_uri (base)) {
    if (strcmp (name, base) != 0) {
      cow_error_set (EINVAL, "%s: existing overlay's backing file '%s' is not "
                     "the configured base '%s'", overlay, name, base);
      return -1;
    }
    return 0;
  }
  if (name[0] == '/')
    resolved = strdup (name);
  else {
    const char *slash = strrchr (overlay, '/');
    int dl = slash ? (int) (slash - overlay) : 1;
    if (asprintf (&resolved, "%.*s/%s", dl, slash ? overlay : ".", name) == -1)
      resolved = NULL;
  }
  if (resolved == NULL) {
    cow_error_errno ("backing name");
    return -1;
  }
  if (stat (base, &sb) == -1) {
    cow_error_errno ("%s: cannot stat base", base);
    goto out;
  }
  if (stat (resolved, &sn) == -1 || sn.st_dev != sb.st_dev
      || sn.st_ino != sb.st_ino) {
    cow_error_set (EINVAL, "%s: existing overlay's backing file '%s' is not "
                   "the configured base '%s'", overlay, name, base);
    goto out;
  }
  if (fmt && strcmp (fmt, base_format) != 0) {
    cow_error_set (EINVAL, "%s: existing overlay's backing format '%s' is not "
                   "the base's format '%s'", overlay, fmt, base_format);
    goto out;
  }
  r = 0;
 out:
  free (resolved);
  return r;
}

/* Is path (resolved) one the configuration lets a backing name reach?
 * Inside the base's own directory, or listed in allow_backing. */
static bool
backing_allowed (const struct cow_disk_config *cfg, const char *base_dir,
                 const char *real)
{
  size_t n = strlen (base_dir);

  if (strncmp (real, base_dir, n) == 0 && (real[n] == '/' || n == 1))
    return true;
  for (const char *const *a = cfg->allow_backing; a && *a; a++) {
    char r[PATH_MAX];
    if (realpath (*a, r) && strcmp (r, real) == 0)
      return true;
  }
  return false;
}

/* Where the backing name of the layer at 'from' leads; NULL if it may not
 * be followed. */
static char *
resolve_backing (const struct cow_disk_config *cfg, const char *base_dir,
                 const char *from, const char *name)
{
  char *joined = NULL, real[PATH_MAX];

  if (strncmp (name, "json:", 5) == 0) {
    cow_error_set (EPERM, "%s: backing file name '%.64s' is a json: "
                   "specification; cowchain never follows those", from, name);
    return NULL;
  }
  if (strstr (name, "://") || nbd_is_uri (name)) {
    cow_error_set (EPERM, "%s: backing file name '%s' is a URL; give a "
                   "remote base as base= instead", from, name);
    return NULL;
  }
  if (name[0] == '/')
    joined = strdup (name);
  else {
    const char *slash = strrchr (from, '/');
    if (asprintf (&joined, "%.*s/%s", slash ? (int) (slash - from) : 1,
                  slash ? from : ".", name) == -1)
      joined = NULL;
  }
  if (joined == NULL) {
    cow_error_errno ("backing name");
    return NULL;
  }
  if (realpath (joined, real) == NULL) {
    cow_error_errno ("%s: backing file '%s' cannot be opened", from, name);
    free (joined);
    return NULL;
  }
  free (joined);
  if (!backing_allowed (cfg, base_dir, real)) {
    cow_error_set (EPERM, "%s: backing file name '%s' leads to '%s', outside "
                   "the base's directory '%s' and not allowed by "
                   "allow-backing=", from, name, real, base_dir);
    return NULL;
  }
  return strdup (real);
}

static struct layer *
open_one (const char *path, const char *fmt, const struct cow_disk_config *cfg)
{
  if (strcmp (fmt, "raw") == 0)
    return raw_open (path, true);
  if (strcmp (fmt, "qcow2") == 0)
    return qcow2_open (path, true, cfg->cache_size);
  cow_error_set (EINVAL, "%s: format '%s' is not supported (raw or qcow2)",
                 path, fmt);
  return NULL;
}

/* Open the base and, for a qcow2 base, its own backing chain, into
 * d->lower[] from the top down. */
static int
open_lower (struct cow_disk *d, const struct cow_disk_config *cfg,
            const char **base_format)
{
  const char *fmt = cfg->base_format;
  char *path = NULL, *base_dir = NULL, *next_fmt = NULL;
  dev_t devs[COW_MAX_DEPTH];
  ino_t inos[COW_MAX_DEPTH];
  int ret = -1;

  if (nbd_is_uri (cfg->base)) {
    if (fmt && strcmp (fmt, "raw") != 0) {
      cow_error_set (EINVAL, "%s: a remote NBD base is read as raw, not %s",
                     cfg->base, fmt);
      return -1;
    }
    *base_format = "raw";
    d->lower[0].l = nbd_layer_open (cfg->base);
    if (d->lower[0].l == NULL)
      return -1;
    d->n_lower = 1;
    return 0;
  }
  if (fmt == NULL) {
    int is_qcow2 = qcow2_probe (cfg->base);
    if (is_qcow2 == -1)
      return -1;
    fmt = is_qcow2 ? "qcow2" : "raw";
  }
  *base_format = fmt;
  path = realpath (cfg->base, NULL);
  if (path == NULL) {
    cow_error_errno ("%s: cannot open base", cfg->base);
    return -1;
  }
  base_dir = strdup (path);
  if (base_dir == NULL) {
    cow_error_errno ("strdup");
    goto out;
  }
  *strrchr (base_dir, '/') = '\0';
  if (base_dir[0] == '\0')
    strcpy (base_dir, "/");

  for (;;) {
    struct stat st;
    struct layer *l;
    const char *bname;

    if (d->n_lower == COW_MAX_DEPTH) {
      cow_error_set (ELOOP, "%s: backing chain deeper than %d layers",
                     cfg->base, COW_MAX_DEPTH);
      goto out;
    }
    if (stat (path, &st) == -1) {
      cow_error_errno ("%s: cannot open", path);
      goto out;
    }
    for (size_t i = 0; i < d->n_lower; i++)
      if (devs[i] == st.st_dev && inos[i] == st.st_ino) {
        cow_error_set (ELOOP, "%s: backing loop: '%s' is already in the "
                       "chain", cfg->base, path);
        goto out;
      }
    devs[d->n_lower] = st.st_dev;
    inos[d->n_lower] = st.st_ino;
    l = open_one (d->n_lower == 0 ? cfg->base : path, fmt, cfg);
    if (l == NULL)
      goto out;
    d->lower[d->n_lower++].l = l;
    if (strcmp (fmt, "qcow2") != 0 || (bname = qcow2_backing_file (l)) == NULL)
      break;
    /* The backing format comes from the header, never from the bytes. */
    free (next_fmt);
    next_fmt = qcow2_backing_format (l) ? strdup (qcow2_backing_format (l))
      : NULL;
    if (next_fmt == NULL) {
      cow_error_set (EINVAL, "%s: backing file '%s' has no recorded format "
                     "(cowchain does not guess formats); record it with "
                     "qemu-img rebase -u -F FORMAT", path, bname);
      goto out;
    }
    {
      char *next = resolve_backing (cfg, base_dir, path, bname);
      if (next == NULL)
        goto out;
      free (path);
      path = next;
    }
    fmt = next_fmt;
  }
  ret = 0;
 out:
  free (path);
  free (base_dir);
  free (next_fmt);
  return ret;
}

struct cow_disk *
cow_disk_open (const struct cow_disk_config *cfg)
{
  struct cow_disk *d;
  const char *fmt = NULL;
  struct stat st;

  if (cfg->base == NULL || cfg->overlay == NULL) {
    cow_error_set (EINVAL, "both base and overlay must be given");
    return NULL;
  }
  if (cfg->sync_mode == COW_SYNC_INTERVAL && cfg->sync_interval_ms == 0) {
    cow_error_set (EINVAL, "sync interval must be at least 1 ms");
    return NULL;
  }
  d = calloc (1, sizeof *d);
  if (d == NULL) {
    cow_error_errno ("calloc");
    return NULL;
  }
  pthread_rwlock_init (&d->chain_lock, NULL);
  pthread_mutex_init (&d->sync_lock, NULL);
  pthread_cond_init (&d->sync_cond, NULL);
  d->sync_mode = cfg->sync_mode;
  d->sync_interval_ms = cfg->sync_interval_ms;

  if (cfg->compat != 0 && cfg->compat != 2 && cfg->compat != 3) {
    cow_error_set (EINVAL, "compat must be 0.10 or 1.1");
    goto err;
  }
  if (open_lower (d, cfg, &fmt) == -1)
    goto err;
  link_chain (d);

  if (stat (cfg->overlay, &st) == 0) {
    d->top = qcow2_open (cfg->overlay, cfg->readonly, cfg->cache_size);
    if (d->top == NULL)
      goto err;
    if (check_backing (d->top, cfg->overlay, cfg->base, fmt) == -1)
      goto err;
  }
  else if (errno != ENOENT) {
    cow_error_errno ("%s: cannot stat overlay", cfg->overlay);
    goto err;
  }
  else if (cfg->readonly) {
    cow_error_set (ENOENT, "%s: overlay does not exist and the disk is "
                   "read-only", cfg->overlay);
    goto err;
  }
  else {
    struct qcow2_create_opts o = {
      .size = d->lower[0].l->size,
      .version = cfg->compat ? cfg->compat : 3,
      .cluster_size = cfg->cluster_size ? cfg->cluster_size : 65536,
      .backing_format = fmt,
    };
    char *name = nbd_is_uri (cfg->base) ? strdup (cfg->base)
      : backing_name_for (cfg->overlay, cfg->base);
    int r;
    if (name == NULL) {
      cow_error_errno ("%s: cannot resolve the base's path", cfg->base);
      goto err;
    }
    o.backing_file = name;
    r = qcow2_create (cfg->overlay, &o);
    free (name);
    if (r == -1)
      goto err;
    d->top = qcow2_open (cfg->overlay, false, cfg->cache_size);
    if (d->top == NULL)
      goto err;
  }
  d->size = d->top->size;
  return d;

 err:
  if (d->top)
    d->top->ops->close (d->top);
  close_lower (d);
  pthread_rwlock_destroy (&d->chain_lock);
  pthread_mutex_destroy (&d->sync_lock);
  pthread_cond_destroy (&d->sync_cond);
  free (d);
  return NULL;
}

static void *
sync_thread (void *arg)
{
  struct cow_disk *d = arg;

  pthread_mutex_lock (&d->sync_lock);
  while (!d->stop) {
    struct timespec ts;
    clock_gettime (CLOCK_REALTIME, &ts);
    ts.tv_sec += d->sync_interval_ms / 1000;
    ts.tv_nsec += (long) (d->sync_interval_ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
      ts.tv_sec++;
      ts.tv_nsec -= 1000000000L;
    }
    pthread_cond_timedwait (&d->sync_cond, &d->sync_lock, &ts);
    if (d->stop)
      break;
    pthread_mutex_unlock (&d->sync_lock);
    if (__atomic_exchange_n (&d->dirty, 0, __ATOMIC_ACQ_REL)
        && cow_disk_flush (d) == -1)
      __atomic_store_n (&d->dirty, 1, __ATOMIC_RELEASE);
    pthread_mutex_lock (&d->sync_lock);
  }
  pthread_mutex_unlock (&d->sync_lock);
  cow_error_clear ();
  return NULL;
}

int
cow_disk_start_sync (struct cow_disk *d)
{
  int e;

  if (d->sync_mode != COW_SYNC_INTERVAL || d->sync_running)
    return 0;
  e = pthread_create (&d->sync_thread, NULL, sync_thread, d);
  if (e) {
    cow_error_set (e, "cannot start the sync thread");
    return -1;
  }
  d->sync_running = true;
  return 0;
}

int
cow_disk_close (struct cow_disk *d)
{
  int r = 0;

  if (d == NULL)
    return 0;
  if (d->sync_running) {
    pthread_mutex_lock (&d->sync_lock);
    d->stop = true;
    pthread_cond_signal (&d->sync_cond);
    pthread_mutex_unlock (&d->sync_lock);
    pthread_join (d->sync_thread, NULL);
  }
  if (d->top->ops->close (d->top) == -1)
    r = -1;
  close_lower (d);
  pthread_rwlock_destroy (&d->chain_lock);
  pthread_mutex_destroy (&d->sync_lock);
  pthread_cond_destroy (&d->sync_cond);
  free (d);
  return r;
}

uint64_t
cow_disk_size (const struct cow_disk *d)
{
  return d->size;
}

uint32_t
cow_disk_cluster_size (const struct cow_disk *d)
{
  return qcow2_cluster_size (d->top);
}

static int
check_range (struct cow_disk *d, uint32_t count, uint64_t offset)
{
  if (offset > d->size || count > d->size - offset) {
    cow_error_set (EINVAL, "request of %" PRIu32 " bytes at offset %" PRIu64
                   " is beyond the end of the disk (%" PRIu64 " bytes)",
                   count, offset, d->size);
    return -1;
  }
  return 0;
}

int
cow_disk_pread (struct cow_disk *d, void *buf, uint32_t count, uint64_t offset)
{
  const struct layer_below *below = &d->top_below;
  int r;

  if (check_range (d, count, offset) == -1)
    return -1;
  pthread_rwlock_rdlock (&d->chain_lock);
  r = d->top->ops->read (d->top, buf, count, offset, below);
  pthread_rwlock_unlock (&d->chain_lock);
  return r;
}

/* After a change: FUA or sync=always make it durable now. */
static int
after_write (struct cow_disk *d, unsigned flags)
{
  if ((flags & COW_FLAG_FUA) || d->sync_mode == COW_SYNC_ALWAYS)
    return d->top->ops->flush (d->top);
  __atomic_store_n (&d->dirty, 1, __ATOMIC_RELEASE);
  return 0;
}

int
cow_disk_pwrite (struct cow_disk *d, const void *buf, uint32_t count,
                 uint64_t offset, unsigned flags)
{
  const struct layer_below *below = &d->top_below;
  int r;

  if (check_range (d, count, offset) == -1)
    return -1;
  pthread_rwlock_rdlock (&d->chain_lock);
  r = d->top->ops->write (d->top, buf, count, offset, below);
  if (r == 0)
    r = after_write (d, flags);
  pthread_rwlock_unlock (&d->chain_lock);
  return r;
}

int
cow_disk_zero (struct cow_disk *d, uint32_t count, uint64_t offset,
               unsigned flags)
{
  const struct layer_below *below = &d->top_below;
  int r;

  if (check_range (d, count, offset) == -1)
    return -1;
  pthread_rwlock_rdlock (&d->chain_lock);
  r = d->top->ops->zero (d->top, count, offset,
                         (flags & COW_FLAG_FAST_ZERO) != 0, below);
  if (r == 0)
    r = after_write (d, flags);
  pthread_rwlock_unlock (&d->chain_lock);
  return r;
}

int
cow_disk_trim (struct cow_disk *d, uint32_t count, uint64_t offset,
               unsigned flags)
{
  int r;

  if (check_range (d, count, offset) == -1)
    return -1;
  pthread_rwlock_rdlock (&d->chain_lock);
  r = d->top->ops->trim (d->top, count, offset);
  if (r == 0)
    r = after_write (d, flags);
  pthread_rwlock_unlock (&d->chain_lock);
  return r;
}

int
cow_disk_flush (struct cow_disk *d)
{
  int r;

  pthread_rwlock_rdlock (&d->chain_lock);
  r = d->top->ops->flush (d->top);
  pthread_rwlock_unlock (&d->chain_lock);
  return r;
}

static uint32_t
extent_type (enum layer_status st)
{
  return st == LAYER_DATA ? 0 : COW_EXTENT_HOLE | COW_EXTENT_ZERO;
}

int
cow_disk_extents (struct cow_disk *d, uint32_t count, uint64_t offset,
                  cow_extent_fn fn, void *opaque)
{
  uint64_t end = offset + count, run_start = offset, run_len = 0;
  uint32_t run_type = 0;
  int r = 0;

  if (check_range (d, count, offset) == -1)
    return -1;
  pthread_rwlock_rdlock (&d->chain_lock);
  while (offset < end) {
    uint64_t len;
    enum layer_status st;
    uint32_t type;

    if (d->top->ops->map (d->top, offset, end - offset, &len, &st) == -1)
      goto err;
    for (size_t i = 0; st == LAYER_ABSENT && i < d->n_lower; i++) {
      struct layer *l = d->lower[i].l;
      if (l->ops->map (l, offset, len, &len, &st) == -1)
        goto err;
    }
    if (st == LAYER_ABSENT)
      st = LAYER_ZERO;
    if (len == 0)
      len = end - offset;
    type = extent_type (st);
    if (run_len && type != run_type) {
      r = fn (opaque, run_start, run_len, run_type);
      if (r != 0)
        goto out;
      run_len = 0;
    }
    if (run_len == 0) {
      run_start = offset;
      run_type = type;
    }
    run_len += len;
    offset += len;
  }
  if (run_len)
    r = fn (opaque, run_start, run_len, run_type);
 out:
  pthread_rwlock_unlock (&d->chain_lock);
  return r == -1 ? -1 : 0;
 err:
  pthread_rwlock_unlock (&d->chain_lock);
  return -1;
}
