/* SPDX-License-Identifier: BSD-3-Clause */
/* libFuzzer target: the manifest parser (manifest_load) on untrusted
 * bytes.
 *
 * Each input is the whole content of a state directory's manifest.  It
 * is written to DIR/manifest (DIR a fresh directory under $TMPDIR, or
 * /dev/shm, made once) and loaded.  A manifest that loads must also come back the same
 * from manifest_save: saved, loaded again, equal field by field, and
 * saving that gives the same bytes.  Anything else (a refusal) must leave
 * nothing to free.
 *
 * Build and run: make fuzz; make fuzz-run-manifest FUZZ_SECONDS=300.
 */
#include <config.h>

#include <fcntl.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cowchain.h"
#include "error.h"
#include "io.h"
#include "manifest.h"

int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

static char dir[256], mpath[300];
static struct io_ops ops;

/* Durability is not under test: no fsync. */
static int
no_sync (int fd)
{
  (void) fd;
  return 0;
}

static void
setup (void)
{
  const char *tmp = getenv ("TMPDIR");

  /* Memory, if there is some to write to: the inputs go to a file. */
  if (tmp == NULL && access ("/dev/shm", W_OK) == 0)
    tmp = "/dev/shm";

  snprintf (dir, sizeof dir, "%s/fuzz-manifest.XXXXXX", tmp ? tmp : "/tmp");
  if (mkdtemp (dir) == NULL) {
    perror ("mkdtemp");
    abort ();
  }
  snprintf (mpath, sizeof mpath, "%s/%s", dir, MANIFEST_NAME);
  ops = io_real_ops;
  ops.fsync = no_sync;
  io_set_ops (&ops);
}

static void
put_input (const uint8_t *data, size_t size)
{
  int fd = open (mpath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  size_t done = 0;

  if (fd == -1) {
    perror (mpath);
    abort ();
  }
  while (done < size) {
    ssize_t r = write (fd, data + done, size - done);
    if (r <= 0) {
      perror ("write");
      abort ();
    }
    done += (size_t) r;
  }
  close (fd);
}

static char *
read_all (size_t *n)
{
  FILE *f = fopen (mpath, "re");
  char *buf = NULL;
  size_t cap = 0;

  *n = 0;
  if (f == NULL)
    abort ();
  for (;;) {
    size_t r;
    if (*n == cap) {
      cap = cap ? cap * 2 : 4096;
      buf = realloc (buf, cap);
      if (buf == NULL)
        abort ();
    }
    r = fread (buf + *n, 1, cap - *n, f);
    if (r == 0)
      break;
    *n += r;
  }
  fclose (f);
  return buf;
}

static bool
same_str (const char *a, const char *b)
{
  /* "" is written "-", which reads back as none. */
  if (a == NULL || a[0] == '\0')
    return b == NULL;
  return b != NULL && strcmp (a, b) == 0;
}

static void
check_same (const struct manifest *a, const struct manifest *b)
{
  bool ok = a->no_base == b->no_base && a->n_layers == b->n_layers
    && a->n_rebase == b->n_rebase;

  if (ok && !a->no_base)
    ok = strcmp (a->base, b->base) == 0
      && strcmp (a->base_format, b->base_format) == 0;
  for (size_t i = 0; ok && i < a->n_layers; i++)
    ok = strcmp (a->layers[i].file, b->layers[i].file) == 0
      && a->layers[i].created == b->layers[i].created
      && same_str (a->layers[i].snapshot, b->layers[i].snapshot)
      && same_str (a->layers[i].description, b->layers[i].description);
  for (size_t i = 0; ok && i < a->n_rebase; i++)
    ok = strcmp (a->rebase[i], b->rebase[i]) == 0;
  if (!ok) {
    fprintf (stderr, "a loaded manifest, saved and loaded again, differs\n");
    abort ();
  }
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  struct manifest m, back;
  char *t1, *t2;
  size_t n1, n2;
  int r;

  if (dir[0] == '\0')
    setup ();
  put_input (data, size);
  r = manifest_load (dir, &m);
  if (r != 1) {
    if (r != -1 || m.layers || m.base || m.rebase) {
      fprintf (stderr, "manifest_load returned %d with %s\n", r,
               r == -1 ? "something left to free" : "a manifest present");
      abort ();
    }
    cow_error_clear ();
    return 0;
  }
  if (manifest_save (dir, &m, NULL) == -1) {
    fprintf (stderr, "save of a loaded manifest: %s\n", cow_last_error ());
    abort ();
  }
  t1 = read_all (&n1);
  if (manifest_load (dir, &back) != 1) {
    fprintf (stderr, "a saved manifest does not load: %s\n",
             cow_last_error ());
    abort ();
  }
  check_same (&m, &back);
  if (manifest_save (dir, &back, NULL) == -1)
    abort ();
  t2 = read_all (&n2);
  if (n1 != n2 || memcmp (t1, t2, n1) != 0) {
    fprintf (stderr, "saving a manifest twice gave different bytes\n");
    abort ();
  }
  free (t1);
  free (t2);
  manifest_free (&m);
  manifest_free (&back);
  cow_error_clear ();
  return 0;
}
