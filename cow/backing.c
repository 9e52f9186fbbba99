/* Backing-file names: the name a new layer stores for what lies under
 * it, and the policy that decides which names stored in a qcow2 base
 * chain the engine follows.  Private to the engine. */
#include <config.h>

#include <errno.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "backing.h"
#include "error.h"
#include "layer.h"
#include "qcow2.h"

/* The backing name to store in the overlay: relative to the overlay's
 * directory where possible. */
char *
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
    char r[PATH_MAX];
    if (realpath (*a, r) && strcmp (r, real) == 0)
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
  char *joined = backing_path (from, name), real[PATH_MAX];

  if (joined == NULL)
    return NULL;
  if (realpath (joined, real) == NULL) {
    cow_error_errno ("%s: backing file '%s' cannot be opened", from, name);
    free (joined);
    return NULL;
  }
  free (joined);
  if (!backing_allowed (allow, base_dir, real)) {
    cow_error_set (EPERM, "%s: backing file name '%s' leads to '%s', outside "
                   "the base's directory '%s' and not allowed by "
                   "allow-backing=", from, name, real, base_dir);
    return NULL;
  }
  return strdup (real);
}
