/* SPDX-License-Identifier: BSD-3-Clause */
/* The persistent chain record of a disk; see manifest.h for the format. */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cowchain.h"
#include "error.h"
#include "io.h"
#include "manifest.h"
#include "words.h"

#define MANIFEST_MAX_BYTES (4u << 20)

/* Decode a field into a new string; "-" (empty) is NULL when
 * allow_empty, an error otherwise.  Returns 0 or -1. */
static int
decode (const char *s, char **out, bool allow_empty)
{
  char *r = strdup (s);

  *out = NULL;
  if (r == NULL)
    return -1;
  if (word_decode (r) == -1 || (r[0] == '\0' && !allow_empty)) {
    free (r);
    errno = EINVAL;
    return -1;
  }
  if (r[0] == '\0')
    free (r);
  else
    *out = r;
  return 0;
}

void
manifest_free (struct manifest *m)
{
  for (size_t i = 0; i < m->n_layers; i++) {
    free (m->layers[i].file);
    free (m->layers[i].snapshot);
    free (m->layers[i].description);
  }
  free (m->layers);
  for (size_t i = 0; i < m->n_rebase; i++)
    free (m->rebase[i]);
  free (m->rebase);
  free (m->base);
  free (m->base_format);
  memset (m, 0, sizeof *m);
}

static char *
dup_or_null (const char *s)
{
  return s ? strdup (s) : NULL;
}

int
manifest_push (struct manifest *m, const char *file, int64_t created,
               const char *snapshot, const char *description)
{
  struct manifest_layer *v;

  if (m->n_layers >= MANIFEST_MAX_LAYERS) {
    cow_error_set (EMLINK, "a chain may hold at most %d layers",
                   MANIFEST_MAX_LAYERS);
    return -1;
  }
  v = realloc (m->layers, (m->n_layers + 1) * sizeof *v);
  if (v == NULL) {
    cow_error_errno ("manifest");
    return -1;
  }
  m->layers = v;
  v = &m->layers[m->n_layers];
  v->file = strdup (file);
  v->created = created;
  v->snapshot = dup_or_null (snapshot);
  v->description = dup_or_null (description);
  if (v->file == NULL || (snapshot && v->snapshot == NULL)
      || (description && v->description == NULL)) {
    free (v->file);
    free (v->snapshot);
    free (v->description);
    cow_error_errno ("manifest");
    return -1;
  }
  m->n_layers++;
  return 0;
}

int
manifest_add_rebase (struct manifest *m, const char *file)
{
  char **v;

  if (manifest_has_rebase (m, file))
    return 0;
  if (m->n_rebase >= MANIFEST_MAX_LAYERS) {
    cow_error_set (EMLINK, "too many rebase marks");
    return -1;
  }
  v = realloc (m->rebase, (m->n_rebase + 1) * sizeof *v);
  if (v == NULL) {
    cow_error_errno ("manifest");
    return -1;
  }
  m->rebase = v;
  if ((v[m->n_rebase] = strdup (file)) == NULL) {
    cow_error_errno ("manifest");
    return -1;
  }
  m->n_rebase++;
  return 0;
}

bool
manifest_has_rebase (const struct manifest *m, const char *file)
{
  for (size_t i = 0; i < m->n_rebase; i++)
    if (strcmp (m->rebase[i], file) == 0)
      return true;
  return false;
}

void
manifest_cut (struct manifest *m, size_t from, size_t to)
{
  size_t k = to - from + 1;

  for (size_t i = from; i <= to; i++) {
    free (m->layers[i].file);
    free (m->layers[i].snapshot);
    free (m->layers[i].description);
  }
  memmove (&m->layers[from], &m->layers[to + 1],
           (m->n_layers - to - 1) * sizeof m->layers[0]);
  m->n_layers -= k;
}

int
manifest_copy (struct manifest *dst, const struct manifest *src)
{
  memset (dst, 0, sizeof *dst);
  dst->base = dup_or_null (src->base);
  dst->base_format = dup_or_null (src->base_format);
  dst->no_base = src->no_base;
  if ((src->base && !dst->base) || (src->base_format && !dst->base_format)) {
    manifest_free (dst);
    cow_error_errno ("manifest");
    return -1;
  }
  for (size_t i = 0; i < src->n_layers; i++)
    if (manifest_push (dst, src->layers[i].file, src->layers[i].created,
                       src->layers[i].snapshot,
                       src->layers[i].description) == -1) {
      manifest_free (dst);
      return -1;
    }
  for (size_t i = 0; i < src->n_rebase; i++)
    if (manifest_add_rebase (dst, src->rebase[i]) == -1) {
      manifest_free (dst);
      return -1;
    }
  return 0;
}

/* The characters of a snapshot name (the rule since names exist; a
 * loaded manifest is held to it, and to nothing newer). */
static int
check_name_chars (const char *name)
{
  size_t n = strlen (name);

  if (n == 0) {
    cow_error_set (EINVAL, "snapshot name is empty");
    return -1;
  }
  if (n > COW_NAME_MAX) {
    cow_error_set (EINVAL, "snapshot name is %zu bytes long (at most %d)",
                   n, COW_NAME_MAX);
    return -1;
  }
  if (name[0] == '.' || name[0] == '-') {
    cow_error_set (EINVAL, "snapshot name '%s' may not start with '%c'",
                   name, name[0]);
    return -1;
  }
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char) name[i];
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
        || (c >= '0' && c <= '9') || strchr ("._-+:@", c))
      continue;
    /* Only the accepted part is echoed: the rest may be anything. */
    if (c > 0x20 && c < 0x7f)
      cow_error_set (EINVAL, "snapshot name '%.*s%c...': character '%c' "
                     "(byte %zu) is not allowed (letters, digits and "
                     ". _ - + : @ only)", (int) i, name, c, c, i + 1);
    else
      cow_error_set (EINVAL, "snapshot name '%.*s...': byte %zu is 0x%02x, "
                     "a %s (letters, digits and . _ - + : @ only)",
                     (int) i, name, i + 1, c,
                     c == ' ' ? "space" : c < 0x80 ? "control character"
                     : "non-ASCII byte");
    return -1;
  }
  return 0;
}

const char *
cow_snapshot_name_reserved (const char *name)
{
  if (strcasecmp (name, "active") == 0)
    return "it names the active layer";
  if (strcasecmp (name, "base") == 0)
    return "it names the disk's base";
  if (strncasecmp (name, "layer-", 6) == 0)
    return "names starting with 'layer-' are layer file names";
  return NULL;
}

int
manifest_check_name (const char *name)
{
  const char *why;

  if (check_name_chars (name) == -1)
    return -1;
  why = cow_snapshot_name_reserved (name);
  if (why) {
    cow_error_set (EINVAL, "snapshot name '%s' is reserved: %s, and "
                   "commands that take a layer (commit --top/--base, delete) "
                   "would read it that way; choose another name", name, why);
    return -1;
  }
  return 0;
}

/* The bytes a description may hold (the rule before descriptions had
 * to be printable UTF-8; a loaded manifest is held to it, so that
 * manifests written by older versions still open).  The control bytes
 * refused here would break a manifest line or the control protocol. */
static int
check_description_bytes (const char *desc)
{
  size_t n = strlen (desc);

  if (n > COW_DESC_MAX) {
    cow_error_set (EINVAL, "description is %zu bytes long (at most %d)", n,
                   COW_DESC_MAX);
    return -1;
  }
  for (const unsigned char *c = (const unsigned char *) desc; *c; c++)
    if (*c < 0x20 && *c != '\t') {
      cow_error_set (EINVAL, "description contains the control byte 0x%02x",
                     *c);
      return -1;
    }
  return 0;
}

int
manifest_check_description (const char *desc)
{
  const unsigned char *s = (const unsigned char *) desc;
  size_t n = strlen (desc);

  if (n > COW_DESC_MAX) {
    cow_error_set (EINVAL, "description is %zu bytes long (at most %d)", n,
                   COW_DESC_MAX);
    return -1;
  }
  for (size_t i = 0; i < n; ) {
    size_t len;
    long cp = cow_utf8_decode (s + i, &len);
    if (cp == -1) {
      cow_error_set (EINVAL, "description: byte %zu (0x%02x) is not valid "
                     "UTF-8; a description is printable UTF-8 text",
                     i + 1, s[i]);
      return -1;
    }
    if (cow_text_is_control (cp)) {
      cow_error_set (EINVAL, "description: byte %zu is U+%04lX, %s; a "
                     "description is printable UTF-8 text on one line, "
                     "without control characters", i + 1, cp,
                     cp == '\n' ? "a newline" : cp == '\t' ? "a tab"
                     : cp == 0x1b ? "an escape (ESC)"
                     : cp == 0x7f ? "a delete (DEL)"
                     : text_is_bidi (cp)
                     ? "a bidirectional formatting character"
                     : cp >= 0x80 ? "a C1 control character"
                     : "a control character");
      return -1;
    }
    i += len;
  }
  return 0;
}

/* Refuse line lineno of path, saying what is wrong with it. */
static int __attribute__ ((format (printf, 3, 4)))
bad_line (const char *path, int lineno, const char *fmt, ...)
{
  char *why = NULL;
  va_list ap;

  va_start (ap, fmt);
  if (vasprintf (&why, fmt, ap) == -1)
    why = NULL;
  va_end (ap);
  cow_error_set (EINVAL, "%s: line %d is malformed: %s", path, lineno,
                 why ? why : "(out of memory)");
  free (why);
  return -1;
}

/* Decode field 'what' of a line, or refuse the line. */
static int
decode_field (const char *s, char **out, bool allow_empty, const char *path,
              int lineno, const char *what)
{
  if (decode (s, out, allow_empty) == 0)
    return 0;
  if (errno == ENOMEM) {
    cow_error_errno ("%s: line %d", path, lineno);
    return -1;
  }
  return bad_line (path, lineno, "%s '%.64s' is %s", what, s,
                   allow_empty ? "not valid percent-encoding"
                   : "empty or not valid percent-encoding");
}

static int
parse_layer (struct manifest *m, char **f, const char *path, int lineno)
{
  char *file = NULL, *snap = NULL, *desc = NULL, *end;
  long long created;
  int r = -1;

  errno = 0;
  created = strtoll (f[2], &end, 10);
  if (errno || *end || created < 0 || f[2][0] == '\0')
    return bad_line (path, lineno, "creation time '%.32s' is not a number "
                     "of seconds since the epoch", f[2]);
  if (decode_field (f[1], &file, false, path, lineno, "layer file") == -1
      || decode_field (f[3], &snap, true, path, lineno,
                       "snapshot name") == -1
      || decode_field (f[4], &desc, true, path, lineno, "description") == -1)
    goto out;
  if (m->n_layers >= MANIFEST_MAX_LAYERS) {
    cow_error_set (EMLINK, "%s: line %d: more than %d layers (the most a "
                   "chain may hold)", path, lineno, MANIFEST_MAX_LAYERS);
    goto out;
  }
  /* A layer file is a plain name inside the state directory. */
  if (strchr (file, '/') || file[0] == '.') {
    bad_line (path, lineno, "layer file '%.64s' is not a plain file name "
              "inside the state directory", file);
    goto out;
  }
  if ((snap && check_name_chars (snap) == -1)
      || (desc && check_description_bytes (desc) == -1)) {
    char *why = strdup (cow_last_error ());
    bad_line (path, lineno, "%s", why ? why : "bad name or description");
    free (why);
    goto out;
  }
  r = manifest_push (m, file, created, snap, desc);
 out:
  free (file);
  free (snap);
  free (desc);
  return r;
}

static int
parse_line (struct manifest *m, char *line, const char *path, int lineno)
{
  char *f[6];
  int n = 0;

  char *save;

  for (char *tok = strtok_r (line, " ", &save); tok;
       tok = strtok_r (NULL, " ", &save)) {
    if (n == 6)
      return bad_line (path, lineno, "too many fields");
    f[n++] = tok;
  }
  if (n == 0)
    return 0;
  if (strcmp (f[0], "nobase") == 0 || strcmp (f[0], "base") == 0) {
    bool nobase = f[0][0] == 'n';
    if (m->base != NULL || m->no_base)
      return bad_line (path, lineno, "a second base or nobase record");
    if (n != (nobase ? 1 : 3))
      return bad_line (path, lineno, "'%s' takes %d fields, not %d", f[0],
                       nobase ? 0 : 2, n - 1);
    if (nobase) {
      m->no_base = true;
      return 0;
    }
    if (decode_field (f[1], &m->base, false, path, lineno, "base") == -1
        || decode_field (f[2], &m->base_format, false, path, lineno,
                         "base format") == -1)
      return -1;
    return 0;
  }
  if (strcmp (f[0], "rebase") == 0) {
    char *file;
    int r;
    if (n != 2)
      return bad_line (path, lineno, "'rebase' takes 1 field, not %d", n - 1);
    if (decode_field (f[1], &file, false, path, lineno, "layer file") == -1)
      return -1;
    r = manifest_add_rebase (m, file);
    free (file);
    return r;
  }
  if (strcmp (f[0], "layer") == 0) {
    if (n != 5)
      return bad_line (path, lineno, "'layer' takes 4 fields, not %d", n - 1);
    return parse_layer (m, f, path, lineno);
  }
  return bad_line (path, lineno, "unknown record '%.32s' (base, nobase, "
                   "layer or rebase)", f[0]);
}

int
manifest_load (const char *dir, struct manifest *m)
{
  char *path = NULL, *buf = NULL, *line, *save;
  uint64_t size;
  int fd, lineno = 0, ret = -1;

  memset (m, 0, sizeof *m);
  if (asprintf (&path, "%s/%s", dir, MANIFEST_NAME) == -1) {
    cow_error_errno ("asprintf");
    return -1;
  }
  /* Never through a symbolic link, never waiting on a FIFO. */
  fd = io_open (path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK, 0);
  if (fd == -1) {
    if (errno == ENOENT) {
      free (path);
      return 0;
    }
    if (errno == ELOOP)
      cow_error_set (ELOOP, "%s: is a symbolic link; cowchain does not open "
                     "a state directory's files through one", path);
    else
      cow_error_errno ("%s: cannot open", path);
    free (path);
    return -1;
  }
  {
    struct stat st;
    if (fstat (fd, &st) == -1) {
      cow_error_errno ("%s: stat", path);
      goto out;
    }
    if (!S_ISREG (st.st_mode)) {
      cow_error_set (EINVAL, "%s: is not a regular file", path);
      goto out;
    }
  }
  if (io_file_size (fd, &size) == -1) {
    cow_error_errno ("%s: stat", path);
    goto out;
  }
  if (size > MANIFEST_MAX_BYTES) {
    cow_error_set (EFBIG, "%s: %" PRIu64 " bytes is too large for a "
                   "manifest", path, size);
    goto out;
  }
  buf = malloc (size + 1);
  if (buf == NULL || io_pread (fd, buf, size, 0) == -1) {
    cow_error_errno ("%s: read", path);
    goto out;
  }
  buf[size] = '\0';
  if (memchr (buf, '\0', size)) {
    cow_error_set (EINVAL, "%s: contains a NUL byte", path);
    goto out;
  }
  /* Lines split by hand (not strtok, which skips empty lines), so that
   * an error names the line a text editor shows. */
  save = buf;
  lineno = 0;
  do {
    line = strsep (&save, "\n");
    lineno++;
  } while (line != NULL && line[0] == '\0' && save != NULL);
  if (line == NULL || strcmp (line, "cowchain-manifest 1") != 0) {
    cow_error_set (EINVAL, "%s: not a cowchain manifest (version 1)", path);
    goto out;
  }
  while ((line = strsep (&save, "\n")) != NULL) {
    lineno++;
    if (parse_line (m, line, path, lineno) == -1)
      goto out;
  }
  if ((m->base == NULL && !m->no_base) || m->n_layers == 0) {
    cow_error_set (EINVAL, "%s: no base or no layers recorded", path);
    goto out;
  }
  for (size_t i = 0; i < m->n_rebase; i++) {
    size_t j;
    for (j = 0; j < m->n_layers; j++)
      if (strcmp (m->layers[j].file, m->rebase[i]) == 0)
        break;
    if (j == m->n_layers) {
      cow_error_set (EINVAL, "%s: 'rebase %s' names no layer of the chain",
                     path, m->rebase[i]);
      goto out;
    }
  }
  if (m->layers[m->n_layers - 1].snapshot) {
    cow_error_set (EINVAL, "%s: the last layer '%s' is the active one but "
                   "carries the snapshot name '%s'", path,
                   m->layers[m->n_layers - 1].file,
                   m->layers[m->n_layers - 1].snapshot);
    goto out;
  }
  for (size_t i = 0; i < m->n_layers; i++)
    for (size_t j = i + 1; j < m->n_layers; j++)
      if (strcmp (m->layers[i].file, m->layers[j].file) == 0
          || (m->layers[i].snapshot && m->layers[j].snapshot
              && strcmp (m->layers[i].snapshot, m->layers[j].snapshot) == 0)) {
        cow_error_set (EINVAL, "%s: %s '%s' appears twice", path,
                       strcmp (m->layers[i].file, m->layers[j].file) == 0
                       ? "layer file" : "snapshot name",
                       strcmp (m->layers[i].file, m->layers[j].file) == 0
                       ? m->layers[i].file : m->layers[i].snapshot);
        goto out;
      }
  ret = 1;
 out:
  if (ret == -1)
    manifest_free (m);
  io_close (fd);
  free (buf);
  free (path);
  return ret;
}

int
manifest_save (const char *dir, const struct manifest *m, bool *uncertain)
{
  char *path = NULL, *tmp = NULL, *text = NULL;
  size_t len = 0;
  FILE *f = NULL;
  int fd = -1, ret = -1;
  bool encoded = true;

  if (uncertain)
    *uncertain = false;
  if (asprintf (&path, "%s/%s", dir, MANIFEST_NAME) == -1
      || asprintf (&tmp, "%s/.%s.tmp", dir, MANIFEST_NAME) == -1) {
    cow_error_errno ("asprintf");
    goto out;
  }
  f = open_memstream (&text, &len);
  if (f == NULL) {
    cow_error_errno ("open_memstream");
    goto out;
  }
  fprintf (f, "cowchain-manifest 1\n");
  if (m->no_base)
    fprintf (f, "nobase\n");
  else {
    char *b = word_encode (m->base), *fm = word_encode (m->base_format);
    if (b && fm)
      fprintf (f, "base %s %s\n", b, fm);
    else
      encoded = false;
    free (b);
    free (fm);
  }
  for (size_t i = 0; i < m->n_layers; i++) {
    const struct manifest_layer *l = &m->layers[i];
    char *fl = word_encode (l->file);
    char *s = word_encode (l->snapshot ? l->snapshot : "");
    char *d = word_encode (l->description ? l->description : "");
    if (fl && s && d)
      fprintf (f, "layer %s %" PRId64 " %s %s\n", fl, l->created, s, d);
    else
      encoded = false;
    free (fl);
    free (s);
    free (d);
  }
  for (size_t i = 0; i < m->n_rebase; i++) {
    char *fl = word_encode (m->rebase[i]);
    if (fl)
      fprintf (f, "rebase %s\n", fl);
    else
      encoded = false;
    free (fl);
  }
  if (fclose (f) == EOF) {
    f = NULL;
    cow_error_errno ("manifest");
    goto out;
  }
  f = NULL;
  if (!encoded) {
    /* Never a manifest with a line left out. */
    cow_error_set (ENOMEM, "%s: out of memory encoding the manifest", dir);
    goto out;
  }
  /* A fresh file, never whatever sits at that name: a symlink planted
   * there must not redirect the write, nor a FIFO block it. */
  if (io_unlink (tmp) == -1 && errno != ENOENT) {
    cow_error_errno ("%s: cannot remove the old temporary file", tmp);
    goto out;
  }
  fd = io_open (tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                0644);
  if (fd == -1) {
    cow_error_errno ("%s: cannot create", tmp);
    goto out;
  }
  if (io_pwrite (fd, text, len, 0) == -1 || io_fsync (fd) == -1) {
    cow_error_errno ("%s: write", tmp);
    goto out;
  }
  io_close (fd);
  fd = -1;
  if (io_rename (tmp, path) == -1) {
    cow_error_errno ("%s: rename", path);
    goto out;
  }
  if (io_fsync_dir_of (path) == -1) {
    cow_error_errno ("%s: fsync of directory", dir);
    if (uncertain)
      *uncertain = true;
    goto out;
  }
  ret = 0;
 out:
  if (fd != -1) {
    io_close (fd);
    io_unlink (tmp);
  }
  if (f)
    fclose (f);
  free (text);
  free (path);
  free (tmp);
  return ret;
}
