/* SPDX-License-Identifier: BSD-3-Clause */
/* Backing-file names: the name a new layer stores for what lies under
 * it, and the policy that decides which names stored in a qcow2 base
 * chain the engine follows; and opening a disk's base with its own
 * backing chain under the layers a disk already holds
 * (backing_open_chain).  Private to the engine. */
#include <config.h>

#include <errno.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "backing.h"
#include "cleanup.h"
#include "cowchain.h"
#include "disk.h"
#include "error.h"
#include "layer.h"
#include "qcow2.h"

/* The backing name to store in the overlay: relative to the overlay's
 * directory where possible.  NULL with the last error set, naming the
 * path that could not be resolved (the overlay's directory or the
 * base). */
char *
backing_name_for (const char *overlay, const char *base)
{
  /* Paths on the heap: this runs on threads with small stacks. */
  CLEANUP_FREE char *ocopy = strdup (overlay), *odir = NULL, *bpath = NULL;
  char *slash, *out;
  size_t common = 0, ups = 0, olen, i;
  const char *rest;

  if (ocopy == NULL) {
    cow_error_errno ("strdup");
    return NULL;
  }
  slash = strrchr (ocopy, '/');
  if (slash == ocopy)
    ocopy[1] = '\0';
  else if (slash)
    *slash = '\0';
  else
    strcpy (ocopy, ".");
  if ((odir = realpath (ocopy, NULL)) == NULL) {
    cow_error_errno ("%s: the overlay's directory %s", overlay, ocopy);
    return NULL;
  }
  if ((bpath = realpath (base, NULL)) == NULL) {
    cow_error_errno ("%s: cannot resolve the base's path", base);
    return NULL;
  }
  if (strcmp (odir, "/") == 0) {
    out = strdup (bpath + 1);
    if (out == NULL)
      cow_error_errno ("strdup");
    return out;
  }
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
    out = strdup (bpath);            /* only the root in common */
  else {
    rest = bpath + common + 1;
    out = malloc (ups * 3 + strlen (rest) + 1);
  }
  if (out == NULL) {
    cow_error_errno ("malloc");
    return NULL;
  }
  if (common == 0)
    return out;
  out[0] = '\0';
  for (i = 0; i < ups; i++)
    strcat (out, "../");
  strcat (out, rest);
  return out;
}

/* Is the overlay's backing name the base the user configured? */
int
backing_check (struct layer *top, const char *overlay, const char *base,
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
  if (remote_is_uri (base)) {
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
backing_allowed (const char *const *allow, const char *base_dir,
                 const char *real)
{
  size_t n = strlen (base_dir);

  if (strncmp (real, base_dir, n) == 0 && (real[n] == '/' || n == 1))
    return true;
  for (const char *const *a = allow; a && *a; a++) {
    CLEANUP_FREE char *r = realpath (*a, NULL);
    if (r && strcmp (r, real) == 0)
      return true;
  }
  return false;
}

/* The path a backing name stands for (backing.h); the rules every
 * reader of backing names shares: the engine's, and `cowchain info`. */
char *
backing_path (const char *from, const char *name)
{
  const char *slash = strrchr (from, '/');
  char *joined;

  if (strncmp (name, "json:", 5) == 0) {
    cow_error_set (EPERM, "%s: backing file name '%.64s' is a json: "
                   "specification; cowchain never follows those", from, name);
    return NULL;
  }
  if (strstr (name, "://") || remote_is_uri (name)) {
    cow_error_set (EPERM, "%s: backing file name '%s' is a URL; give a "
                   "remote base as base= instead", from, name);
    return NULL;
  }
  /* As qemu-img shows it: from's directory (with its slash) and name;
   * name alone when it is absolute or from has no directory. */
  if (name[0] == '/' || slash == NULL)
    joined = strdup (name);
  else if (asprintf (&joined, "%.*s%s", (int) (slash - from) + 1, from,
                     name) == -1)
    joined = NULL;
  if (joined == NULL)
    cow_error_errno ("backing name");
  return joined;
}

/* Where the backing name of the layer at 'from' leads; NULL if it may not
 * be followed. */
char *
backing_resolve (const char *const *allow, const char *base_dir,
                 const char *from, const char *name)
{
  CLEANUP_FREE char *joined = backing_path (from, name);
  char *real;

  if (joined == NULL)
    return NULL;
  real = realpath (joined, NULL);
  if (real == NULL) {
    cow_error_errno ("%s: backing file '%s' cannot be opened", from, name);
    return NULL;
  }
  if (!backing_allowed (allow, base_dir, real)) {
    cow_error_set (EPERM, "%s: backing file name '%s' leads to '%s', outside "
                   "the base's directory '%s' and not allowed by "
                   "allow-backing=", from, name, real, base_dir);
    free (real);
    return NULL;
  }
  return real;
}

/*----------------------------------------------------------------------
 * Opening a base chain.
 */

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
int
backing_open_chain (struct cow_disk *d, const struct cow_disk_config *cfg,
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
    d->base_format_guessed = fmt;
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
