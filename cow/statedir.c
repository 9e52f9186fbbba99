/* SPDX-License-Identifier: BSD-3-Clause */
/* A disk's state directory: its layer files (paths, new names, creation,
 * deletion), the files a crash left behind (orphans), the check of every
 * layer's backing name against the manifest, and opening a disk from the
 * directory (statedir_open: lock, manifest, layers, first layer of a new
 * disk).  The chain it opens is linked by the chain module
 * (chain-layers.c); the base under it is opened by backing.c. */
#include <config.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "backing.h"
#include "chain.h"
#include "cleanup.h"
#include "cowchain.h"
#include "error.h"
#include "image.h"
#include "io.h"
#include "layer.h"
#include "manifest.h"

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
    char name[32];
    CLEANUP_FREE char *p = NULL;
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
      if (r == NULL)
        cow_error_errno ("strdup");
      return r;
    }
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
    .extended_l2 = qcow2_want_extended_l2 (d->subclusters, d->compat,
                                           d->cluster_size),
  };
  CLEANUP_FREE char *path = statedir_path (d, file);
  CLEANUP_FREE char *bname = NULL;

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
      if (remote_is_uri (d->man.base))  /* else backing_name_for said why */
        cow_error_errno ("strdup");
      return NULL;
    }
    o.backing_file = bname;
    o.backing_format = d->man.base_format;
  }
  if (qcow2_create (path, &o) == -1)
    return NULL;
  return qcow2_open (path, LAYER_NOFOLLOW, d->cache_size);
}

void
statedir_unlink_layer (struct cow_disk *d, const char *file)
{
  CLEANUP_FREE char *p = statedir_path (d, file);

  if (p)
    io_unlink (p);
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
statedir_check_names (struct cow_disk *d, bool readonly)
{
  size_t n = d->man.n_layers;

  for (size_t i = 0; i < n; i++) {
    struct layer *l = chain_layer (d, i);
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
          if (remote_is_uri (d->man.base))
            cow_error_errno ("strdup");
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
int
statedir_open (struct cow_disk *d, const struct cow_disk_config *cfg)
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
    bool same;
    if (remote_is_uri (cfg->base))
      same = strcmp (cfg->base, d->man.base) == 0;
    else {
      CLEANUP_FREE char *a = realpath (cfg->base, NULL);
      CLEANUP_FREE char *b = realpath (d->man.base, NULL);
      same = a && b && strcmp (a, b) == 0;
    }
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
  if (!d->man.no_base && backing_open_chain (d, &bcfg, &fmt) == -1)
    return -1;
  chain_link (d);
  if (d->n_lower > 0)
    d->size = d->lower[0].l->size;
  d->compat = cfg->compat ? cfg->compat : 3;
  d->cluster_size = cfg->cluster_size ? cfg->cluster_size : 65536;
  d->subclusters = cfg->subclusters;

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
  if (statedir_check_names (d, cfg->readonly) == -1)
    return -1;
  if (!cfg->readonly)
    remove_orphans (d);
  return 0;
}
