/* SPDX-License-Identifier: BSD-3-Clause */
/* Helpers shared by the cmocka unit tests (see testutil.h). */
#undef NDEBUG
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>

#include "cowchain.h"
#include "testutil.h"

static void
die (const char *what)
{
  fprintf (stderr, "testutil: %s: %s\n", what, strerror (errno));
  abort ();
}

char *
tu_mkdtemp (const char *tag)
{
  const char *tmp = getenv ("TMPDIR");
  char *dir;

  if (tmp == NULL || *tmp == '\0')
    tmp = "/tmp";
  if (asprintf (&dir, "%s/cowchain-%s-XXXXXX", tmp, tag) == -1)
    die ("asprintf");
  if (mkdtemp (dir) == NULL)
    die ("mkdtemp");
  return dir;
}

static int
rm_one (const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
  (void) st; (void) flag; (void) ftw;
  if (remove (path) == -1)
    fprintf (stderr, "testutil: remove %s: %s\n", path, strerror (errno));
  return 0;
}

void
tu_rmtree (const char *dir)
{
  if (dir == NULL)
    return;
  nftw (dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

char *
tu_path (const char *dir, const char *name)
{
  char *p;

  if (asprintf (&p, "%s/%s", dir, name) == -1)
    die ("asprintf");
  return p;
}

uint64_t
tu_rand (uint64_t *s)
{
  uint64_t x = *s ? *s : 0x9e3779b97f4a7c15ull;

  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  *s = x;
  return x * 0x2545f4914f6cdd1dull;
}

uint64_t
tu_rand_below (uint64_t *s, uint64_t n)
{
  return tu_rand (s) % n;
}

void
tu_fill_random (void *buf, size_t n, uint64_t *s)
{
  uint8_t *p = buf;

  while (n >= 8) {
    uint64_t v = tu_rand (s);
    memcpy (p, &v, 8);
    p += 8;
    n -= 8;
  }
  if (n) {
    uint64_t v = tu_rand (s);
    memcpy (p, &v, n);
  }
}

void
tu_write_file (const char *path, const void *buf, size_t n)
{
  const char *p = buf;
  int fd;

  /* Replace by unlink + create rather than O_TRUNC: ext4 flushes files
   * truncated and rewritten (auto_da_alloc), which is slow. */
  unlink (path);
  fd = open (path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);

  if (fd == -1)
    die (path);
  while (n > 0) {
    ssize_t r = write (fd, p, n);
    if (r <= 0)
      die (path);
    p += r;
    n -= (size_t) r;
  }
  if (close (fd) == -1)
    die (path);
}

void *
tu_read_file (const char *path, size_t *n)
{
  int fd = open (path, O_RDONLY | O_CLOEXEC);
  struct stat st;
  char *buf;
  size_t done = 0;

  if (fd == -1 || fstat (fd, &st) == -1)
    die (path);
  buf = malloc ((size_t) st.st_size + 1);
  if (buf == NULL)
    die ("malloc");
  while (done < (size_t) st.st_size) {
    ssize_t r = read (fd, buf + done, (size_t) st.st_size - done);
    if (r <= 0)
      die (path);
    done += (size_t) r;
  }
  close (fd);
  buf[done] = '\0';
  if (n)
    *n = done;
  return buf;
}

uint64_t
tu_file_size (const char *path)
{
  struct stat st;

  if (stat (path, &st) == -1)
    die (path);
  return (uint64_t) st.st_size;
}

void
tu_copy_file (const char *from, const char *to)
{
  size_t n;
  void *buf = tu_read_file (from, &n);

  tu_write_file (to, buf, n);
  free (buf);
}

void
tu_patch (const char *path, uint64_t offset, const void *buf, size_t n)
{
  int fd = open (path, O_WRONLY | O_CLOEXEC);

  if (fd == -1)
    die (path);
  if (pwrite (fd, buf, n, (off_t) offset) != (ssize_t) n)
    die (path);
  close (fd);
}

void
tu_patch_be32 (const char *path, uint64_t offset, uint32_t v)
{
  uint8_t b[4] = { (uint8_t) (v >> 24), (uint8_t) (v >> 16),
                   (uint8_t) (v >> 8), (uint8_t) v };

  tu_patch (path, offset, b, 4);
}

void
tu_patch_be64 (const char *path, uint64_t offset, uint64_t v)
{
  tu_patch_be32 (path, offset, (uint32_t) (v >> 32));
  tu_patch_be32 (path, offset + 4, (uint32_t) v);
}

int
tu_run (char **out, const char *fmt, ...)
{
  va_list ap;
  char *cmd, *full, *buf = NULL;
  size_t len = 0, cap = 0;
  FILE *fp;
  int st;

  va_start (ap, fmt);
  if (vasprintf (&cmd, fmt, ap) == -1)
    die ("vasprintf");
  va_end (ap);
  if (asprintf (&full, "( %s ) 2>&1", cmd) == -1)
    die ("asprintf");
  fflush (stdout);
  fflush (stderr);
  fp = popen (full, "r");
  if (fp == NULL)
    die ("popen");
  for (;;) {
    size_t r;
    if (cap - len < 4096) {
      cap = cap ? cap * 2 : 8192;
      buf = realloc (buf, cap);
      if (buf == NULL)
        die ("realloc");
    }
    r = fread (buf + len, 1, cap - len - 1, fp);
    if (r == 0)
      break;
    len += r;
  }
  buf[len] = '\0';
  st = pclose (fp);
  free (full);
  free (cmd);
  if (out)
    *out = buf;
  else
    free (buf);
  if (st == -1 || !WIFEXITED (st))
    return -1;
  return WEXITSTATUS (st);
}

int64_t
tu_json_int (const char *json, const char *key)
{
  char pat[128];
  const char *p;

  snprintf (pat, sizeof pat, "\"%s\":", key);
  p = json ? strstr (json, pat) : NULL;
  if (p == NULL)
    return -1;
  return strtoll (p + strlen (pat), NULL, 10);
}

/* qemu-img runs with -U (force share): the test's own process may hold
 * the image open, and so locked in QEMU's convention. */
int
tu_qemu_check (const char *path, struct tu_check *res)
{
  int64_t v;

  memset (res, 0, sizeof *res);
  res->status = tu_run (&res->output, "qemu-img check -U --output=json '%s'",
                        path);
  res->leaks = (v = tu_json_int (res->output, "leaks")) > 0 ? v : 0;
  res->corruptions = (v = tu_json_int (res->output, "corruptions")) > 0 ? v : 0;
  res->check_errors = (v = tu_json_int (res->output, "check-errors")) > 0 ? v : 0;
  if (res->status == 3)
    fprintf (stderr, "qemu-img check %s: %" PRId64 " leaked clusters\n",
             path, res->leaks);
  else if (res->status != 0) {
    char *human = NULL;
    tu_run (&human, "qemu-img check -U '%s'", path);
    fprintf (stderr, "qemu-img check %s: exit %d\n%s\n", path, res->status,
             human ? human : "");
    free (human);
  }
  return res->status;
}

void
tu_assert_check_clean (const char *path)
{
  struct tu_check c;

  tu_qemu_check (path, &c);
  if (c.status == 3)
    fprintf (stderr, "%s\n", c.output);
  free (c.output);
  assert_int_equal (c.status, 0);
}

int64_t
tu_assert_check_no_corruption (const char *path)
{
  struct tu_check c;

  tu_qemu_check (path, &c);
  free (c.output);
  if (c.status != 0 && c.status != 3) {
    print_error ("qemu-img check %s: exit %d (corruptions %" PRId64
                 ", check errors %" PRId64 ")\n", path, c.status,
                 c.corruptions, c.check_errors);
    fail ();
  }
  assert_int_equal (c.corruptions, 0);
  assert_int_equal (c.check_errors, 0);
  return c.leaks;
}

int64_t
tu_qemu_info_int (const char *path, const char *key)
{
  char *out = NULL;
  int64_t v;
  int st = tu_run (&out, "qemu-img info -U --output=json '%s'", path);

  if (st != 0) {
    fprintf (stderr, "qemu-img info %s: exit %d\n%s\n", path, st, out);
    free (out);
    return -1;
  }
  v = tu_json_int (out, key);
  free (out);
  return v;
}

char *
tu_json_str (const char *json, const char *key)
{
  char pat[128];
  const char *p, *q;

  snprintf (pat, sizeof pat, "\"%s\": \"", key);
  p = json ? strstr (json, pat) : NULL;
  if (p == NULL)
    return NULL;
  p += strlen (pat);
  q = strchr (p, '"');
  return q ? strndup (p, (size_t) (q - p)) : NULL;
}

char *
tu_qemu_info_str (const char *path, const char *key)
{
  char *out = NULL, *r = NULL;

  if (tu_run (&out, "qemu-img info -U --output=json '%s'", path) == 0)
    r = tu_json_str (out, key);
  free (out);
  return r;
}

void
tu_assert_bytes_equal (const void *got, const void *want, size_t n,
                       uint64_t base, const char *what)
{
  const uint8_t *g = got, *w = want;
  size_t i, j;

  if (memcmp (g, w, n) == 0)
    return;
  for (i = 0; i < n && g[i] == w[i]; i++)
    ;
  for (j = i; j < n && g[j] != w[j]; j++)
    ;
  print_error ("%s: mismatch at offset %" PRIu64 " (0x%" PRIx64 "): got 0x%02x "
               "want 0x%02x; differing run of %zu bytes\n", what,
               base + i, base + i, g[i], w[i], j - i);
  fail ();
}

void
tu_chain_get (struct cow_disk *d, struct tu_chain *c)
{
  struct cow_layer_info *v;
  size_t n;

  assert_int_equal (cow_disk_layers (d, &v, &n), 0);
  assert_true (n <= TU_CHAIN_MAX);
  memset (c, 0, sizeof *c);
  c->n = n;
  for (size_t i = 0; i < n; i++) {
    const char *slash = strrchr (v[i].path, '/');
    c->file[i] = strdup (slash ? slash + 1 : v[i].path);
    c->path[i] = strdup (v[i].path);
    c->snapshot[i] = v[i].snapshot ? strdup (v[i].snapshot) : NULL;
    assert_non_null (c->file[i]);
    assert_non_null (c->path[i]);
    assert_int_equal (v[i].active, i + 1 == n);
  }
  cow_layer_info_free (v, n);
}

void
tu_chain_free (struct tu_chain *c)
{
  for (size_t i = 0; i < c->n; i++) {
    free (c->file[i]);
    free (c->path[i]);
    free (c->snapshot[i]);
  }
  c->n = 0;
}

void
tu_chain_print (const struct tu_chain *c, const char *what)
{
  print_message ("%s:", what);
  for (size_t i = 0; i < c->n; i++)
    print_message (" %s(%s)", c->file[i],
                   c->snapshot[i] ? c->snapshot[i] : "-");
  print_message ("\n");
}

int
tu_chain_find (const struct tu_chain *c, const char *name)
{
  for (size_t i = 0; i < c->n; i++)
    if (c->snapshot[i] && strcmp (c->snapshot[i], name) == 0)
      return (int) i;
  return -1;
}

uint64_t
tu_hash_file (const char *path, uint64_t h)
{
  static __thread uint8_t buf[1 << 16];
  int fd = open (path, O_RDONLY | O_CLOEXEC);
  uint64_t n = 0, w;
  size_t have = 0;
  ssize_t r;

  if (fd == -1) {
    fprintf (stderr, "tu_hash_file: %s: %m\n", path);
    abort ();
  }
  /* In 8-byte words; a partial word is carried to the next read. */
  while ((r = read (fd, buf + have, sizeof buf - have)) > 0) {
    size_t m = have + (size_t) r, i;
    for (i = 0; i + 8 <= m; i += 8) {
      memcpy (&w, buf + i, 8);
      h = (h ^ w) * 0x100000001b3ull;
      h ^= h >> 29;
    }
    memmove (buf, buf + i, m - i);
    have = m - i;
    n += (uint64_t) r;
  }
  if (r == -1) {
    fprintf (stderr, "tu_hash_file: %s: %m\n", path);
    abort ();
  }
  close (fd);
  for (size_t i = 0; i < have; i++)
    h = (h ^ buf[i]) * 0x100000001b3ull;
  return (h ^ n) * 0x100000001b3ull;
}

bool
tu_hashset_has (const struct tu_hashset *s, uint64_t h)
{
  for (size_t i = 0; i < s->n; i++)
    if (s->v[i] == h)
      return true;
  return false;
}

void
tu_hashset_add (struct tu_hashset *s, uint64_t h)
{
  if (s->n < sizeof s->v / sizeof s->v[0] && !tu_hashset_has (s, h))
    s->v[s->n++] = h;
}

double
tu_now_s (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_MONOTONIC, &ts);
  return (double) ts.tv_sec + (double) ts.tv_nsec / 1e9;
}

int
tu_nosync (int fd)
{
  (void) fd;
  return 0;
}

bool
tu_fd_path (int fd, char *buf, size_t len)
{
  char link[64];
  ssize_t n;

  snprintf (link, sizeof link, "/proc/self/fd/%d", fd);
  n = readlink (link, buf, len - 1);
  if (n <= 0)
    return false;
  buf[n] = '\0';
  return true;
}

int
tu_subclusters (void)
{
  const char *s = getenv ("COWCHAIN_TEST_SUBCLUSTERS");

  if (s == NULL || *s == 0)
    return 0;
  if (strcmp (s, "on") == 0)
    return 0;
  if (strcmp (s, "off") == 0)
    return -1;
  fprintf (stderr, "COWCHAIN_TEST_SUBCLUSTERS=%s: not on or off\n", s);
  abort ();
}

bool
tu_subclusters_wanted (void)
{
  const char *s = getenv ("COWCHAIN_TEST_SUBCLUSTERS");

  return s && strcmp (s, "on") == 0;
}

uint32_t
tu_trim_unit (uint32_t cs, int subclusters)
{
  return subclusters >= 0 && cs >= 16384 ? cs / 32 : cs;
}
