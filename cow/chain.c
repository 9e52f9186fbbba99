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
#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>

#include "cowchain.h"
#include "error.h"
#include "image.h"
#include "io.h"
#include "layer.h"
#include "manifest.h"
#include "disk.h"
#include "backing.h"

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

void
chain_link (struct cow_disk *d)
{
  for (size_t i = 0; i < d->n_lower; i++) {
    d->lower[i].below.read = i + 1 < d->n_lower ? node_read : NULL;
    d->lower[i].below.opaque = i + 1 < d->n_lower ? &d->lower[i + 1] : NULL;
  }
  d->top_below.read = d->n_lower ? node_read : NULL;
  d->top_below.opaque = d->n_lower ? &d->lower[0] : NULL;
}

static void
close_lower (struct cow_disk *d)
{
  for (size_t i = 0; i < d->n_lower; i++)
    d->lower[i].l->ops->close (d->lower[i].l);
  d->n_lower = 0;
  d->n_frozen = 0;
}

static void
free_disk (struct cow_disk *d)
{
  job_disk_destroy (d);
  pthread_rwlock_destroy (&d->chain_lock);
  pthread_rwlock_destroy (&d->durability_lock);
  pthread_mutex_destroy (&d->admin_lock);
  pthread_mutex_destroy (&d->health_lock);
  free (d->degraded_msg);
  pthread_mutex_destroy (&d->sync_lock);
  pthread_cond_destroy (&d->sync_cond);
  manifest_free (&d->man);
  if (d->lock_fd != -1)
    close (d->lock_fd);
  free (d->state_dir);
  free (d->overlay);
  free (d->base_name);
  free (d);
}

static struct layer *
open_one (const char *path, const char *fmt, const struct cow_disk_config *cfg)
{
  if (strcmp (fmt, "raw") == 0)
    return raw_open (path, LAYER_RDONLY);
  if (strcmp (fmt, "qcow2") == 0)
    return qcow2_open (path, LAYER_RDONLY, cfg->cache_size);
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
  const size_t first = d->n_lower;
  int ret = -1;

  if (remote_is_uri (cfg->base)) {
    if (fmt && strcmp (fmt, "raw") != 0) {
      cow_error_set (EINVAL, "%s: a remote NBD base is read as raw, not %s",
                     cfg->base, fmt);
      return -1;
    }
    *base_format = "raw";
    if (d->n_lower == COW_MAX_DEPTH) {
      cow_error_set (ELOOP, "%s: the chain is deeper than %d layers",
                     cfg->base, COW_MAX_DEPTH);
      return -1;
    }
    /* Under the frozen layers of a state directory, if any. */
    d->lower[d->n_lower].l = remote_layer_open (cfg->base, d->base_timeout_ms);
    if (d->lower[d->n_lower].l == NULL)
      return -1;
    d->n_lower++;
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
    /* Layers from 'first' on are this base chain's (frozen layers of a
     * state directory may come before). */
    for (size_t i = first; i < d->n_lower; i++)
      if (devs[i - first] == st.st_dev && inos[i - first] == st.st_ino) {
        cow_error_set (ELOOP, "%s: backing loop: '%s' is already in the "
                       "chain", cfg->base, path);
        goto out;
      }
    devs[d->n_lower - first] = st.st_dev;
    inos[d->n_lower - first] = st.st_ino;
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
      char *next = backing_resolve (cfg->allow_backing, base_dir, path, bname);
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

/* Overlay mode: one layer file named by the user. */
static int
open_overlay (struct cow_disk *d, const struct cow_disk_config *cfg)
{
  const char *fmt = NULL;
  struct stat st;

  if (cfg->base == NULL) {
    cow_error_set (EINVAL, "base must be given");
    return -1;
  }
  if (open_lower (d, cfg, &fmt) == -1)
    return -1;
  chain_link (d);
  if (stat (cfg->overlay, &st) == 0) {
    d->top = qcow2_open (cfg->overlay, cfg->readonly ? LAYER_RDONLY : 0,
                         cfg->cache_size);
    if (d->top == NULL)
      return -1;
    return backing_check (d->top, cfg->overlay, cfg->base, fmt);
  }
  if (errno != ENOENT) {
    cow_error_errno ("%s: cannot stat overlay", cfg->overlay);
    return -1;
  }
  if (cfg->readonly) {
    cow_error_set (ENOENT, "%s: overlay does not exist and the disk is "
                   "read-only", cfg->overlay);
    return -1;
  }
  {
    struct qcow2_create_opts o = {
      .size = d->lower[0].l->size,
      .version = cfg->compat ? cfg->compat : 3,
      .cluster_size = cfg->cluster_size ? cfg->cluster_size : 65536,
      .backing_format = fmt,
    };
    char *name = remote_is_uri (cfg->base) ? strdup (cfg->base)
      : backing_name_for (cfg->overlay, cfg->base);
    int r;
    if (name == NULL) {
      cow_error_errno ("%s: cannot resolve the base's path", cfg->base);
      return -1;
    }
    o.backing_file = name;
    r = qcow2_create (cfg->overlay, &o);
    free (name);
    if (r == -1)
      return -1;
  }
  d->top = qcow2_open (cfg->overlay, 0, cfg->cache_size);
  return d->top ? 0 : -1;
}

char *
statedir_path (const struct cow_disk *d, const char *file)
{
  char *p;

  if (asprintf (&p, "%s/%s", d->state_dir, file) == -1) {
    cow_error_errno ("asprintf");
    return NULL;
  }
  return p;
}

/* A layer file name used neither in the manifest nor in the directory. */
char *
statedir_new_layer_name (struct cow_disk *d, const struct manifest *m)
{
  for (unsigned i = 1; i < 1000000; i++) {
    char name[32], *p;
    struct stat st;
    bool used = false;
    snprintf (name, sizeof name, "layer-%06u.qcow2", i);
    for (size_t j = 0; j < m->n_layers; j++)
      if (strcmp (m->layers[j].file, name) == 0)
        used = true;
    if (used)
      continue;
    p = statedir_path (d, name);
    if (p == NULL)
      return NULL;
    /* lstat: a dangling symbolic link takes its name too. */
    if (lstat (p, &st) == -1 && errno == ENOENT) {
      char *r = strdup (name);
      free (p);
      if (r == NULL)
        cow_error_errno ("strdup");
      return r;
    }
    free (p);
  }
  cow_error_set (ENOSPC, "%s: no free layer file name", d->state_dir);
  return NULL;
}

/* Create a new empty layer in the state directory over 'backing' (a layer
 * file name there, or NULL for the base) and open it. */
struct layer *
statedir_create_layer (struct cow_disk *d, const char *file, const char *backing)
{
  struct qcow2_create_opts o = {
    .size = d->size,
    .version = d->compat,
    .cluster_size = d->cluster_size,
  };
  char *path = statedir_path (d, file), *bname = NULL;
  struct layer *l = NULL;

  if (path == NULL)
    return NULL;
  if (backing) {
    o.backing_file = backing;
    o.backing_format = "qcow2";
  }
  else if (d->man.no_base)
    ;                           /* self-contained */
  else {
    bname = remote_is_uri (d->man.base) ? strdup (d->man.base)
      : backing_name_for (path, d->man.base);
    if (bname == NULL) {
      cow_error_errno ("%s: cannot resolve the base's path", d->man.base);
      goto out;
    }
    o.backing_file = bname;
    o.backing_format = d->man.base_format;
  }
  if (qcow2_create (path, &o) == 0)
    l = qcow2_open (path, LAYER_NOFOLLOW, d->cache_size);
 out:
  free (bname);
  free (path);
  return l;
}

void
statedir_unlink_layer (struct cow_disk *d, const char *file)
{
  char *p = statedir_path (d, file);

  if (p) {
    io_unlink (p);
    free (p);
  }
}

/* The name of a layer file in the state directory, if any (malloc'd). */
static char *
find_layer_file (struct cow_disk *d)
{
  DIR *dir = opendir (d->state_dir);
  struct dirent *e;
  char *r = NULL;

  if (dir == NULL)
    return NULL;
  while (r == NULL && (e = readdir (dir)) != NULL)
    if (strncmp (e->d_name, "layer-", 6) == 0)
      r = strdup (e->d_name);
  closedir (dir);
  return r;
}

/* Remove layer files a crash left behind (not named by the manifest). */
static void
remove_orphans (struct cow_disk *d)
{
  DIR *dir = opendir (d->state_dir);
  struct dirent *e;

  if (dir == NULL)
    return;
  while ((e = readdir (dir)) != NULL) {
    bool known = false;
    struct stat st;
    if (strncmp (e->d_name, "layer-", 6) != 0)
      continue;
    /* Only files this engine made: a symbolic link or a device planted
     * under a layer's name stays (and is never opened). */
    if (fstatat (dirfd (dir), e->d_name, &st, AT_SYMLINK_NOFOLLOW) == -1
        || !S_ISREG (st.st_mode))
      continue;
    for (size_t i = 0; i < d->man.n_layers; i++)
      if (strcmp (d->man.layers[i].file, e->d_name) == 0)
        known = true;
    if (!known)
      statedir_unlink_layer (d, e->d_name);
  }
  closedir (dir);
}


/* Is name a layer file of this state directory that the manifest does
 * not list (one that a merge took out of the chain)? */
static bool
is_merged_layer (const struct cow_disk *d, const char *name)
{
  if (name == NULL || strncmp (name, "layer-", 6) != 0 || strchr (name, '/'))
    return false;
  for (size_t i = 0; i < d->man.n_layers; i++)
    if (strcmp (d->man.layers[i].file, name) == 0)
      return false;
  return true;
}

/* Check every layer's backing name against the manifest.
 *
 * A merge records the new chain in the manifest first and rewrites the
 * backing name of the layer above the merged ones after; a crash between
 * the two leaves that layer naming a layer file that the manifest no
 * longer lists (or, pulled self-contained, still naming the base).  Its
 * contents already read the same over the new backing, so the name is
 * repaired here, but only for a layer the manifest marks "rebase" (the
 * merge's own record that it is about to rewrite it): a manifest that
 * lost a line by other means must not have the layer it forgot cut out
 * of the chain and deleted.  Any other mismatch is refused. */
int
chain_check_names (struct cow_disk *d, bool readonly)
{
  size_t n = d->man.n_layers;

  for (size_t i = 0; i < n; i++) {
    struct layer *l = i + 1 == n ? d->top : d->lower[n - 2 - i].l;
    const char *bn = qcow2_backing_file (l);
    const char *bf = qcow2_backing_format (l);
    char *p = statedir_path (d, d->man.layers[i].file), *want = NULL;
    const char *wfmt = NULL;
    bool ok, repair;
    bool marked = manifest_has_rebase (&d->man, d->man.layers[i].file);
    int r = -1;

    if (p == NULL)
      return -1;
    if (i == 0 && d->man.no_base) {
      ok = bn == NULL;
      repair = marked;
      if (!ok && !repair)
        cow_error_set (EINVAL, "%s: backing file '%s', but the manifest "
                       "records a self-contained disk (nobase)", p, bn);
    }
    else if (i == 0) {
      repair = is_merged_layer (d, bn);
      if (repair && !marked) {
        cow_error_set (EINVAL, "%s: backing file '%s' is a layer file that "
                       "the manifest does not list", p, bn);
        goto next;
      }
      ok = repair ? false
        : backing_check (l, p, d->man.base, d->man.base_format) == 0;
      if (repair) {
        want = remote_is_uri (d->man.base) ? strdup (d->man.base)
          : backing_name_for (p, d->man.base);
        wfmt = d->man.base_format;
        if (want == NULL) {
          cow_error_errno ("%s: cannot resolve the base's path", d->man.base);
          goto next;
        }
      }
    }
    else {
      ok = bn && strcmp (bn, d->man.layers[i - 1].file) == 0
        && (bf == NULL || strcmp (bf, "qcow2") == 0);
      repair = marked && is_merged_layer (d, bn);
      want = strdup (d->man.layers[i - 1].file);
      wfmt = "qcow2";
      if (want == NULL) {
        cow_error_errno ("strdup");
        goto next;
      }
      if (!ok && !repair)
        cow_error_set (EINVAL, "%s: backing file '%s' is not '%s' as the "
                       "manifest records", p, bn ? bn : "(none)", want);
    }
    if (ok)
      r = 0;
    else if (repair)
      /* Read-only: the manifest's chain is what is opened anyway. */
      r = readonly ? 0 : qcow2_set_backing (l, want, wfmt);
  next:
    free (want);
    free (p);
    if (r == -1)
      return -1;
  }
  return 0;
}

/* State mode: the chain recorded in state_dir/manifest. */
static int
open_state (struct cow_disk *d, const struct cow_disk_config *cfg)
{
  struct cow_disk_config bcfg = *cfg;
  const char *fmt = NULL;
  int r;

  /* Read-only creates nothing, not even the directory. */
  if (!cfg->readonly && mkdir (cfg->state_dir, 0700) == -1
      && errno != EEXIST) {
    cow_error_errno ("%s: cannot create state directory", cfg->state_dir);
    return -1;
  }
  d->state_dir = realpath (cfg->state_dir, NULL);
  if (d->state_dir == NULL) {
    cow_error_errno ("%s: state directory", cfg->state_dir);
    return -1;
  }
  /* The directory itself is locked: no file to create, none whose
   * deletion would let a second process in.  Readers share. */
  d->lock_fd = image_lock_dir (d->state_dir, !cfg->readonly);
  if (d->lock_fd == -1)
    return -1;
  r = manifest_load (d->state_dir, &d->man);
  if (r == -1)
    return -1;
  if (r == 0 && cfg->readonly) {
    cow_error_set (ENOENT, "%s: holds no disk (no manifest); a read-only "
                   "open creates nothing", d->state_dir);
    return -1;
  }
  /* A disk pulled self-contained no longer needs the base it was
   * configured with. */
  if (r == 1 && cfg->base && !d->man.no_base) {
    char a[PATH_MAX], b[PATH_MAX];
    bool same = remote_is_uri (cfg->base)
      ? strcmp (cfg->base, d->man.base) == 0
      : (realpath (cfg->base, a) && realpath (d->man.base, b)
         && strcmp (a, b) == 0);
    if (!same) {
      cow_error_set (EINVAL, "%s: the disk's base is '%s', not '%s'",
                     d->state_dir, d->man.base, cfg->base);
      return -1;
    }
  }
  if (r == 1 && cfg->base_format && !d->man.no_base
      && strcmp (cfg->base_format, d->man.base_format) != 0) {
    cow_error_set (EINVAL, "%s: the base's format is recorded as %s, not %s",
                   d->state_dir, d->man.base_format, cfg->base_format);
    return -1;
  }
  if (r == 0) {
    char *layer = find_layer_file (d);
    if (layer) {
      /* Never build a fresh chain over files that hold a disk: they
       * would all go as orphans. */
      cow_error_set (EINVAL, "%s: holds layer file '%s' but no manifest; "
                     "refusing to start a new chain over it (restore the "
                     "manifest, or move the layer files away)",
                     d->state_dir, layer);
      free (layer);
      return -1;
    }
    if (cfg->base == NULL) {
      cow_error_set (EINVAL, "%s: no manifest yet, so base= is required",
                     d->state_dir);
      return -1;
    }
    d->man.base = remote_is_uri (cfg->base) ? strdup (cfg->base)
      : realpath (cfg->base, NULL);
    if (d->man.base == NULL) {
      cow_error_errno ("%s: cannot open base", cfg->base);
      return -1;
    }
    bcfg.base_format = cfg->base_format;
  }
  else
    bcfg.base_format = d->man.base_format;
  bcfg.base = d->man.base;

  if (r == 1) {
    /* Frozen layers, newest first, then the base chain. */
    for (size_t i = d->man.n_layers - 1; i-- > 0; ) {
      char *p = statedir_path (d, d->man.layers[i].file);
      struct layer *l;
      if (p == NULL)
        return -1;
      /* Held as a writer unless read-only: jobs write frozen layers
       * and rewrite their headers. */
      l = qcow2_open (p, LAYER_RDONLY | LAYER_NOFOLLOW
                      | (cfg->readonly ? 0 : LAYER_HOLD_WRITE),
                      cfg->cache_size);
      free (p);
      if (l == NULL)
        return -1;
      d->lower[d->n_lower++].l = l;
      d->n_frozen++;
    }
  }
  if (!d->man.no_base && open_lower (d, &bcfg, &fmt) == -1)
    return -1;
  chain_link (d);
  if (d->n_lower > 0)
    d->size = d->lower[0].l->size;
  d->compat = cfg->compat ? cfg->compat : 3;
  d->cluster_size = cfg->cluster_size ? cfg->cluster_size : 65536;

  if (r == 0) {
    char *name;
    bool uncertain = false;
    d->man.base_format = strdup (fmt);
    if (d->man.base_format == NULL) {
      cow_error_errno ("strdup");
      return -1;
    }
    name = statedir_new_layer_name (d, &d->man);
    if (name == NULL)
      return -1;
    d->top = statedir_create_layer (d, name, NULL);
    r = (d->top == NULL
         || manifest_push (&d->man, name, (int64_t) time (NULL), NULL,
                           NULL) == -1
         || manifest_save (d->state_dir, &d->man, &uncertain) == -1) ? -1 : 0;
    if (r == -1 && !uncertain) {
      /* Else the next open would find a layer file with no manifest. */
      if (d->top) {
        d->top->ops->close (d->top);
        d->top = NULL;
      }
      statedir_unlink_layer (d, name);
    }
    free (name);
    if (r == -1)
      return -1;
  }
  else {
    const struct manifest_layer *top = &d->man.layers[d->man.n_layers - 1];
    char *p = statedir_path (d, top->file);
    if (p == NULL)
      return -1;
    d->top = qcow2_open (p, LAYER_NOFOLLOW
                         | (cfg->readonly ? LAYER_RDONLY : 0),
                         cfg->cache_size);
    free (p);
    if (d->top == NULL)
      return -1;
    d->size = d->top->size;
    d->cluster_size = qcow2_cluster_size (d->top);
    d->compat = qcow2_version (d->top);
  }
  if (chain_check_names (d, cfg->readonly) == -1)
    return -1;
  if (!cfg->readonly)
    remove_orphans (d);
  return 0;
}

struct cow_disk *
cow_disk_open (const struct cow_disk_config *cfg)
{
  struct cow_disk *d;
  pthread_rwlockattr_t attr;
  int r;

  if ((cfg->overlay == NULL) == (cfg->state_dir == NULL)) {
    cow_error_set (EINVAL, "exactly one of overlay and state directory must "
                   "be given");
    return NULL;
  }
  if (cfg->sync_mode == COW_SYNC_INTERVAL && cfg->sync_interval_ms == 0) {
    cow_error_set (EINVAL, "sync interval must be at least 1 ms");
    return NULL;
  }
  if (cfg->compat != 0 && cfg->compat != 2 && cfg->compat != 3) {
    cow_error_set (EINVAL, "compat must be 0.10 or 1.1");
    return NULL;
  }
  d = calloc (1, sizeof *d);
  if (d == NULL) {
    cow_error_errno ("calloc");
    return NULL;
  }
  /* Writers first: a snapshot must not starve behind steady I/O. */
  pthread_rwlockattr_init (&attr);
  pthread_rwlockattr_setkind_np (&attr,
                                 PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
  pthread_rwlock_init (&d->chain_lock, &attr);
  pthread_rwlock_init (&d->durability_lock, &attr);
  pthread_rwlockattr_destroy (&attr);
  pthread_mutex_init (&d->admin_lock, NULL);
  pthread_mutex_init (&d->health_lock, NULL);
  pthread_mutex_init (&d->sync_lock, NULL);
  pthread_cond_init (&d->sync_cond, NULL);
  job_disk_init (d);
  d->lock_fd = -1;
  d->sync_mode = cfg->sync_mode;
  d->sync_interval_ms = cfg->sync_interval_ms;
  d->cache_size = cfg->cache_size;
  d->base_timeout_ms = cfg->base_timeout_ms == COW_TIMEOUT_NONE ? 0
    : cfg->base_timeout_ms ? cfg->base_timeout_ms : COW_DEFAULT_BASE_TIMEOUT_MS;
  d->drain_ns = (uint64_t) (cfg->drain_timeout_ms ? cfg->drain_timeout_ms
                            : COW_DEFAULT_DRAIN_TIMEOUT_MS) * 1000000u;

  r = cfg->state_dir ? open_state (d, cfg) : open_overlay (d, cfg);
  if (r == -1)
    goto err;
  if (cfg->overlay) {
    d->overlay = strdup (cfg->overlay);
    d->base_name = strdup (cfg->base);
    if (d->overlay == NULL || d->base_name == NULL) {
      cow_error_errno ("strdup");
      goto err;
    }
  }
  d->size = d->top->size;
  return d;

 err:
  if (d->top)
    d->top->ops->close (d->top);
  close_lower (d);
  free_disk (d);
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
        || __atomic_load_n (&d->sync_failed, __ATOMIC_ACQUIRE)) {
      bool failed = cow_disk_flush (d) == -1;
      if (failed)
        __atomic_store_n (&d->dirty, 1, __ATOMIC_RELEASE);
      __atomic_store_n (&d->sync_failed, failed, __ATOMIC_RELEASE);
    }
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
  job_disk_stop (d);
  if (d->sync_running) {
    pthread_mutex_lock (&d->sync_lock);
    d->stop = true;
    pthread_cond_signal (&d->sync_cond);
    pthread_mutex_unlock (&d->sync_lock);
    pthread_join (d->sync_thread, NULL);
  }
  if (d->state_dir && chain_degraded (d)) {
    pthread_mutex_lock (&d->admin_lock);
    if (chain_settle (d, "closing the disk cleanly") == -1)
      r = -1;
    pthread_mutex_unlock (&d->admin_lock);
  }
  if (d->top->ops->close (d->top) == -1)
    r = -1;
  close_lower (d);
  free_disk (d);
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

/* Guest I/O ran: a background job gives way (job_yield).  A plain load
 * first, so that the line is written only once per job chunk. */
static inline void
note_io (struct cow_disk *d)
{
  if (!__atomic_load_n (&d->guest_io, __ATOMIC_RELAXED))
    __atomic_store_n (&d->guest_io, 1, __ATOMIC_RELAXED);
}

int
cow_disk_pread (struct cow_disk *d, void *buf, uint32_t count, uint64_t offset)
{
  const struct layer_below *below = &d->top_below;
  int r;

  if (check_range (d, count, offset) == -1)
    return -1;
  note_io (d);
  pthread_rwlock_rdlock (&d->chain_lock);
  r = d->top->ops->read (d->top, buf, count, offset, below);
  pthread_rwlock_unlock (&d->chain_lock);
  return r;
}

/* sync=MS promises that a write is durable within MS: while the
 * interval flush fails (or the disk is degraded, which fails it), each
 * write is made durable itself, or fails, so that the loss window never
 * grows without bound. */
static bool
wants_durable (struct cow_disk *d, unsigned flags)
{
  return (flags & COW_FLAG_FUA) || d->sync_mode == COW_SYNC_ALWAYS
    || (d->sync_mode == COW_SYNC_INTERVAL
        && (__atomic_load_n (&d->sync_failed, __ATOMIC_ACQUIRE)
            || chain_degraded (d)));
}

/* Locks for a change: a durable one also holds durability_lock (first),
 * so that its flush cannot be answered in the middle of a snapshot. */
static void
change_begin (struct cow_disk *d, bool durable)
{
  if (durable) {
    /* Degraded: retry the manifest first, unless a chain change holds
     * admin_lock (a write does not wait on that). */
    chain_try_settle (d, false);
    pthread_rwlock_rdlock (&d->durability_lock);
  }
  pthread_rwlock_rdlock (&d->chain_lock);
}

/* Durable only if every write is reachable from the manifest on disk
 * (DESIGN.md invariant 7): checked under durability_lock, which a
 * snapshot holds exclusive until its manifest is saved or the disk is
 * marked degraded. */
static int
make_durable (struct cow_disk *d)
{
  if (d->top->ops->flush (d->top) == -1)
    return -1;
  return chain_check_durable (d);
}

static int
change_end (struct cow_disk *d, bool durable, int r)
{
  if (r == 0 && durable)
    r = make_durable (d);
  else if (r == 0)
    __atomic_store_n (&d->dirty, 1, __ATOMIC_RELEASE);
  pthread_rwlock_unlock (&d->chain_lock);
  if (durable)
    pthread_rwlock_unlock (&d->durability_lock);
  return r;
}

/* An active commit copies again what the guest changed meanwhile. */
static inline void
note_change (struct cow_disk *d, uint32_t count, uint64_t offset)
{
  note_io (d);
  if (__atomic_load_n (&d->track_dirty, __ATOMIC_ACQUIRE))
    job_mark_dirty (d, offset, count);
}

int
cow_disk_pwrite (struct cow_disk *d, const void *buf, uint32_t count,
                 uint64_t offset, unsigned flags)
{
  bool durable;
  int r;

  if (check_range (d, count, offset) == -1)
    return -1;
  durable = wants_durable (d, flags);
  change_begin (d, durable);
  r = d->top->ops->write (d->top, buf, count, offset, &d->top_below);
  note_change (d, count, offset);
  return change_end (d, durable, r);
}

int
cow_disk_zero (struct cow_disk *d, uint32_t count, uint64_t offset,
               unsigned flags)
{
  bool durable;
  int r;

  if (check_range (d, count, offset) == -1)
    return -1;
  durable = wants_durable (d, flags);
  change_begin (d, durable);
  r = d->top->ops->zero (d->top, count, offset,
                         (flags & COW_FLAG_FAST_ZERO) != 0, &d->top_below);
  note_change (d, count, offset);
  return change_end (d, durable, r);
}

int
cow_disk_trim (struct cow_disk *d, uint32_t count, uint64_t offset,
               unsigned flags)
{
  bool durable;
  int r;

  if (check_range (d, count, offset) == -1)
    return -1;
  durable = wants_durable (d, flags);
  change_begin (d, durable);
  r = d->top->ops->trim (d->top, count, offset);
  note_change (d, count, offset);
  return change_end (d, durable, r);
}

int
cow_disk_flush (struct cow_disk *d)
{
  int r;

  chain_try_settle (d, true);
  pthread_rwlock_rdlock (&d->durability_lock);
  pthread_rwlock_rdlock (&d->chain_lock);
  r = make_durable (d);
  pthread_rwlock_unlock (&d->chain_lock);
  pthread_rwlock_unlock (&d->durability_lock);
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

/*----------------------------------------------------------------------
 * Snapshots.
 *
 * A freeze (DESIGN.md invariant 3): the new layer is created and synced
 * before guest I/O pauses; the pause itself is the pointer switch under
 * the exclusive chain lock; then the old layer is flushed and the manifest
 * replaced while FLUSH and FUA wait on durability_lock.  A crash before the
 * manifest is replaced leaves the old chain (the new file is an orphan,
 * removed at the next open, and none of its writes was reported durable);
 * after it, the new chain, whose frozen layer was flushed first.
 */

uint64_t
chain_now_ns (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_MONOTONIC, &ts);
  return (uint64_t) ts.tv_sec * 1000000000u + (uint64_t) ts.tv_nsec;
}

static int
check_snapshot_args (struct cow_disk *d, const char *name, const char *desc)
{
  if (d->state_dir == NULL) {
    cow_error_set (ENOTSUP, "%s: snapshots need a state directory (state=), "
                   "not a plain overlay", d->overlay);
    return -1;
  }
  if (manifest_check_name (name) == -1)
    return -1;
  if (desc && manifest_check_description (desc) == -1)
    return -1;
  /* Layer files are named layer-*, which no new name can take; a
   * manifest from elsewhere may name them otherwise. */
  for (size_t i = 0; i < d->man.n_layers; i++)
    if (strcmp (d->man.layers[i].file, name) == 0) {
      cow_error_set (EINVAL, "%s: snapshot name '%s' is reserved: it is the "
                     "name of a layer file of this disk", d->state_dir, name);
      return -1;
    }
  for (size_t i = 0; i < d->man.n_layers; i++)
    if (d->man.layers[i].snapshot
        && strcmp (d->man.layers[i].snapshot, name) == 0) {
      cow_error_set (EEXIST, "%s: a snapshot named '%s' already exists",
                     d->state_dir, name);
      return -1;
    }
  /* The snapshot adds one layer file and one layer under the top. */
  if (d->man.n_layers >= MANIFEST_MAX_LAYERS || d->n_lower >= COW_MAX_DEPTH) {
    cow_error_set (EMLINK, "%s: the chain already holds %zu layer files "
                   "(and %zu layers of the base); a chain holds at most %d "
                   "of each: merge some first", d->state_dir,
                   d->man.n_layers, d->n_lower - d->n_frozen, COW_MAX_DEPTH);
    return -1;
  }
  return 0;
}

/* The new layer and the manifest of a freeze, made before I/O pauses. */
static struct chain_plan *
prepare_freeze (struct cow_disk *d, const char *name, const char *desc)
{
  struct chain_plan *p;
  struct manifest_layer *top;
  const char *under;

  if (check_snapshot_args (d, name, desc) == -1)
    return NULL;
  if (chain_settle (d, "snapshot") == -1)
    return NULL;
  p = chain_plan_new (d);
  if (p == NULL)
    return NULL;
  top = &p->next.layers[p->next.n_layers - 1];
  top->snapshot = strdup (name);
  top->description = desc && *desc ? strdup (desc) : NULL;
  top->created = (int64_t) time (NULL);
  if (top->snapshot == NULL || (desc && *desc && top->description == NULL)) {
    cow_error_errno ("strdup");
    goto err;
  }
  under = top->file;
  if (chain_plan_add_layer (d, p, under) == -1
      || chain_plan_build (d, p) == -1)
    goto err;
  return p;

 err:
  chain_plan_free (d, p);
  return NULL;
}

/* After the switch: flush the frozen layer, then record the new chain.
 * A failure cannot undo the switch (guest writes already went to the new
 * layer): the disk is degraded until chain_settle succeeds, and no FLUSH
 * or FUA is answered with success meanwhile (DESIGN.md invariant 7). */
static int
commit_freeze (struct cow_disk *d, const char *name)
{
  struct layer *old = d->lower[0].l;
  int e;

  if (old->ops->flush (old) == 0) {
    qcow2_mark_frozen (old);
    if (chain_commit_installed (d, "saving the manifest of a snapshot") == 0)
      return 0;
  }
  else {
    d->unflushed = old;
    chain_set_degraded (d, "flushing the frozen layer of a snapshot");
  }
  e = cow_last_errno ();
  pthread_mutex_lock (&d->health_lock);
  cow_error_set (e ? e : EIO, "%s: snapshot '%s' is taken but not yet "
                 "durable (%s); the disk is degraded: FLUSH fails until a "
                 "retry (at every FLUSH and chain change) succeeds",
                 d->state_dir, name,
                 d->degraded_msg ? d->degraded_msg : "unknown");
  pthread_mutex_unlock (&d->health_lock);
  return -1;
}

int
cow_disk_snapshot_group (struct cow_disk *const *disks, size_t n,
                         const char *name, const char *description)
{
  struct chain_plan **p;
  uint64_t t0, pause;
  size_t ready = 0;
  int ret = 0;

  if (n == 0) {
    cow_error_set (EINVAL, "no disks to snapshot");
    return -1;
  }
  p = calloc (n, sizeof *p);
  if (p == NULL) {
    cow_error_errno ("calloc");
    return -1;
  }
  for (size_t i = 0; i < n; i++)
    pthread_mutex_lock (&disks[i]->admin_lock);
  for (size_t i = 0; i < n; i++)
    if (job_active_commit (disks[i])) {
      ret = -1;
      goto out;
    }
  /* New layers first, with no I/O paused. */
  for (; ready < n; ready++)
    if ((p[ready] = prepare_freeze (disks[ready], name, description)) == NULL)
      break;
  if (ready < n) {
    for (size_t i = 0; i < ready; i++)
      chain_plan_free (disks[i], p[i]);
    ret = -1;
    goto out;
  }
  /* The cut: every disk drained (in bounded windows, all or none), then
   * all switched. */
  if (chain_wait_exclusive (disks, n, CHAIN_HOLD_DURABILITY | CHAIN_HOLD_CHAIN,
                            n > 1 ? "snapshot-atomic" : "snapshot", &t0)
      == -1) {
    for (size_t i = 0; i < n; i++)
      chain_plan_free (disks[i], p[i]);
    ret = -1;
    goto out;
  }
  for (size_t i = 0; i < n; i++)
    chain_plan_install (disks[i], p[i]);
  chain_release (disks, n, CHAIN_HOLD_CHAIN);
  pause = chain_now_ns () - t0;
  for (size_t i = 0; i < n; i++) {
    disks[i]->last_pause_ns = pause;
    if (commit_freeze (disks[i], name) == -1)
      ret = -1;
  }
  for (size_t i = 0; i < n; i++)
    pthread_rwlock_unlock (&disks[i]->durability_lock);
  for (size_t i = 0; i < n; i++) {
    chain_plan_free (disks[i], p[i]);
    if (!chain_degraded (disks[i]))
      job_check_depth (disks[i]);
  }
 out:
  for (size_t i = n; i-- > 0; )
    pthread_mutex_unlock (&disks[i]->admin_lock);
  free (p);
  return ret;
}

int
cow_disk_snapshot (struct cow_disk *d, const char *name,
                   const char *description)
{
  return cow_disk_snapshot_group (&d, 1, name, description);
}

int
cow_disk_revert (struct cow_disk *d, const char *name, bool force)
{
  struct chain_plan *p = NULL;
  size_t k, n;
  int ret = -1;

  if (d->state_dir == NULL) {
    cow_error_set (ENOTSUP, "%s: snapshots need a state directory (state=)",
                   d->overlay);
    return -1;
  }
  pthread_mutex_lock (&d->admin_lock);
  if (job_busy (d, "revert") || chain_settle (d, "revert") == -1)
    goto out;
  n = d->man.n_layers;
  /* A snapshot by its layer file name first (as commit and delete read
   * a layer word), then by its name. */
  for (k = 0; k + 1 < n; k++)
    if (d->man.layers[k].snapshot
        && strcmp (d->man.layers[k].file, name) == 0)
      break;
  if (k + 1 >= n)
    for (k = 0; k + 1 < n; k++)
      if (d->man.layers[k].snapshot
          && strcmp (d->man.layers[k].snapshot, name) == 0)
        break;
  if (k + 1 >= n) {
    cow_error_set (ENOENT, "%s: no snapshot named '%s'", d->state_dir, name);
    goto out;
  }
  if (!force)
    for (size_t i = k + 1; i < n; i++)
      if (d->man.layers[i].snapshot) {
        cow_error_set (EBUSY, "%s: reverting to '%s' would delete the later "
                       "snapshot '%s'; use --force", d->state_dir, name,
                       d->man.layers[i].snapshot);
        goto out;
      }
  p = chain_plan_new (d);
  if (p == NULL)
    goto out;
  manifest_cut (&p->next, k + 1, n - 1);
  if (chain_plan_add_layer (d, p, d->man.layers[k].file) == -1
      || chain_plan_build (d, p) == -1)
    goto out;
  /* The manifest first: a failed save leaves the old chain served. */
  if (chain_wait_exclusive (&d, 1, CHAIN_HOLD_DURABILITY | CHAIN_HOLD_CHAIN,
                            "revert", NULL) == -1)
    goto out;
  if (chain_plan_save (d, p) == 0) {
    chain_plan_install (d, p);
    ret = 0;
  }
  chain_release (&d, 1, CHAIN_HOLD_DURABILITY | CHAIN_HOLD_CHAIN);
 out:
  chain_plan_free (d, p);
  pthread_mutex_unlock (&d->admin_lock);
  return ret;
}

int
cow_disk_layers (struct cow_disk *d, struct cow_layer_info **out, size_t *n)
{
  struct cow_layer_info *v;
  size_t count;

  pthread_mutex_lock (&d->admin_lock);
  count = d->state_dir ? d->man.n_layers : 1;
  v = calloc (count, sizeof *v);
  if (v == NULL)
    goto oom;
  if (d->state_dir == NULL) {
    v[0].path = strdup (d->overlay);
    v[0].active = true;
    if (v[0].path == NULL)
      goto oom;
  }
  else
    for (size_t i = 0; i < count; i++) {
      const struct manifest_layer *l = &d->man.layers[i];
      v[i].path = statedir_path (d, l->file);
      v[i].created = l->created;
      v[i].snapshot = l->snapshot ? strdup (l->snapshot) : NULL;
      v[i].description = l->description ? strdup (l->description) : NULL;
      v[i].active = i + 1 == count;
      if (v[i].path == NULL || (l->snapshot && !v[i].snapshot)
          || (l->description && !v[i].description))
        goto oom;
    }
  pthread_mutex_unlock (&d->admin_lock);
  *out = v;
  *n = count;
  return 0;

 oom:
  pthread_mutex_unlock (&d->admin_lock);
  cow_error_errno ("cow_disk_layers");
  if (v)
    cow_layer_info_free (v, count);
  return -1;
}

void
cow_layer_info_free (struct cow_layer_info *v, size_t n)
{
  for (size_t i = 0; i < n; i++) {
    free (v[i].path);
    free (v[i].snapshot);
    free (v[i].description);
  }
  free (v);
}

const char *
cow_disk_base (const struct cow_disk *d)
{
  if (d->state_dir)
    return d->man.no_base ? "" : d->man.base;
  return d->base_name;
}

uint64_t
cow_disk_last_pause_ns (const struct cow_disk *d)
{
  return d->last_pause_ns;
}
