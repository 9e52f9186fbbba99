/* SPDX-License-Identifier: BSD-3-Clause */
/* Unit tests of the manifest parser (cow/manifest.c), which reads a file
 * anyone with write access to a state directory may have written: every
 * class of malformed line is refused with an error naming it, the limits
 * hold at their edges, and whatever manifest_save writes (hostile base
 * paths, file names, snapshot names and descriptions included) loads
 * back the same. */
#undef NDEBUG
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>

#include "cowchain.h"
#include "manifest.h"
#include "testutil.h"

static char *dir;               /* the state directory of every test */
static char *mpath;             /* dir/manifest */

static int
group_setup (void **state)
{
  dir = tu_mkdtemp ("test-manifest");
  mpath = tu_path (dir, MANIFEST_NAME);
  return 0;
}

static int
group_teardown (void **state)
{
  tu_rmtree (dir);
  free (dir);
  free (mpath);
  return 0;
}

static void
put (const char *text)
{
  unlink (mpath);
  tu_write_file (mpath, text, strlen (text));
}

/* Load text as the manifest: 1 with m filled, or -1. */
static int
load_text (const char *text, struct manifest *m)
{
  put (text);
  return manifest_load (dir, m);
}

#define HEAD "cowchain-manifest 1\nbase /b raw\n"
#define TOP "layer top 2 - -\n"

/* text is refused, and the error says why. */
static void
expect_refused_at (const char *text, int err, const char *why,
                   const char *what)
{
  struct manifest m;
  int r = load_text (text, &m);

  if (r != -1)
    fail_msg ("%s: loaded (%d), but it should be refused with '%s'", what, r,
              why);
  if (strstr (cow_last_error (), why) == NULL)
    fail_msg ("%s: the error '%s' does not say '%s'", what,
              cow_last_error (), why);
  if (err && cow_last_errno () != err)
    fail_msg ("%s: errno %d, not %d ('%s')", what, cow_last_errno (), err,
              cow_last_error ());
  /* The error names the file. */
  tu_assert_contains (cow_last_error (), mpath);
}

#define expect_refused(text, why) \
  expect_refused_at ((text), EINVAL, (why), #text)

static void
expect_loads (const char *text, struct manifest *m)
{
  int r = load_text (text, m);

  if (r != 1)
    fail_msg ("refused: %s\n%s", cow_last_error (), text);
}

static void
test_valid (void **state)
{
  struct manifest m;

  expect_loads ("cowchain-manifest 1\n"
                "base /images/b%20c.raw raw\n"
                "layer layer-000001.qcow2 1700000000 s1 first%20one\n"
                "\n"
                "   \n"
                "layer layer-000002.qcow2 1700000001 - -\n"
                "rebase layer-000002.qcow2\n", &m);
  assert_string_equal (m.base, "/images/b c.raw");
  assert_string_equal (m.base_format, "raw");
  assert_false (m.no_base);
  assert_int_equal (m.n_layers, 2);
  assert_string_equal (m.layers[0].file, "layer-000001.qcow2");
  assert_int_equal (m.layers[0].created, 1700000000);
  assert_string_equal (m.layers[0].snapshot, "s1");
  assert_string_equal (m.layers[0].description, "first one");
  assert_null (m.layers[1].snapshot);
  assert_null (m.layers[1].description);
  assert_int_equal (m.n_rebase, 1);
  assert_true (manifest_has_rebase (&m, "layer-000002.qcow2"));
  assert_false (manifest_has_rebase (&m, "layer-000001.qcow2"));
  manifest_free (&m);

  expect_loads ("cowchain-manifest 1\nnobase\nlayer a 0 - -\n", &m);
  assert_true (m.no_base);
  assert_null (m.base);
  assert_int_equal (m.n_layers, 1);
  manifest_free (&m);

  /* No manifest: 0, nothing to free. */
  assert_int_equal (unlink (mpath), 0);
  assert_int_equal (manifest_load (dir, &m), 0);
}

/* The file as a whole. */
static void
test_bad_file (void **state)
{
  static const char nul[] = HEAD "layer a\0 1 - -\n";
  struct manifest m;

  expect_refused ("", "not a cowchain manifest");
  expect_refused ("\n", "not a cowchain manifest");
  expect_refused ("cowchain-manifest 2\nbase /b raw\n" TOP,
                  "not a cowchain manifest");
  expect_refused ("cowchain-manifest 1 \nbase /b raw\n" TOP,
                  "not a cowchain manifest");
  expect_refused ("base /b raw\n" TOP, "not a cowchain manifest");
  expect_refused ("cowchain-manifest 1\n", "no base or no layers");
  expect_refused ("cowchain-manifest 1\nbase /b raw\n", "no base or no layers");
  expect_refused ("cowchain-manifest 1\n" TOP, "no base or no layers");

  unlink (mpath);
  tu_write_file (mpath, nul, sizeof nul - 1);
  assert_int_equal (manifest_load (dir, &m), -1);
  tu_assert_contains (cow_last_error (), "contains a NUL byte");

  /* Never through a symbolic link, never a directory or a FIFO. */
  unlink (mpath);
  {
    char *target = tu_path (dir, "elsewhere");
    tu_write_file (target, HEAD TOP, strlen (HEAD TOP));
    assert_int_equal (symlink ("elsewhere", mpath), 0);
    assert_int_equal (manifest_load (dir, &m), -1);
    assert_int_equal (cow_last_errno (), ELOOP);
    tu_assert_contains (cow_last_error (), "symbolic link");
    unlink (mpath);
    unlink (target);
    free (target);
  }
  assert_int_equal (mkfifo (mpath, 0600), 0);
  assert_int_equal (manifest_load (dir, &m), -1);
  tu_assert_contains (cow_last_error (), "not a regular file");
  unlink (mpath);
  assert_int_equal (mkdir (mpath, 0700), 0);
  assert_int_equal (manifest_load (dir, &m), -1);
  assert_int_equal (rmdir (mpath), 0);
}

/* Each kind of line, wrong. */
static void
test_bad_lines (void **state)
{
  /* Records. */
  expect_refused (HEAD "bogus x\n" TOP, "unknown record 'bogus'");
  expect_refused (HEAD "Layer top 2 - -\n", "unknown record 'Layer'");
  expect_refused (HEAD "layer a 1 - - x y\n", "too many fields");
  expect_refused (HEAD "layer a 1 - - x y z w\n", "too many fields");
  expect_refused (HEAD TOP "x", "line 4 is malformed");
  /* base and nobase. */
  expect_refused (HEAD "base /c raw\n" TOP, "a second base or nobase");
  expect_refused (HEAD "nobase\n" TOP, "a second base or nobase");
  expect_refused ("cowchain-manifest 1\nnobase\nnobase\n" TOP,
                  "a second base or nobase");
  expect_refused ("cowchain-manifest 1\nbase /b\n" TOP,
                  "'base' takes 2 fields, not 1");
  expect_refused ("cowchain-manifest 1\nbase /b raw x\n" TOP,
                  "'base' takes 2 fields, not 3");
  expect_refused ("cowchain-manifest 1\nnobase x\n" TOP,
                  "'nobase' takes 0 fields, not 1");
  expect_refused ("cowchain-manifest 1\nbase - raw\n" TOP,
                  "base '-' is empty or not valid");
  expect_refused ("cowchain-manifest 1\nbase /b%zz raw\n" TOP,
                  "base '/b%zz' is empty or not valid");
  expect_refused ("cowchain-manifest 1\nbase /b%00 raw\n" TOP,
                  "base '/b%00' is empty or not valid");
  expect_refused ("cowchain-manifest 1\nbase /b -\n" TOP,
                  "base format '-' is empty or not valid");
  expect_refused ("cowchain-manifest 1\nbase /b r%\n" TOP,
                  "base format 'r%' is empty or not valid");
  /* layer. */
  expect_refused (HEAD "layer a 1 -\n", "'layer' takes 4 fields, not 3");
  expect_refused (HEAD "layer\n", "'layer' takes 4 fields, not 0");
  expect_refused (HEAD "layer a x - -\n" TOP, "creation time 'x' is not");
  expect_refused (HEAD "layer a -1 - -\n" TOP, "creation time '-1' is not");
  expect_refused (HEAD "layer a 1x - -\n" TOP, "creation time '1x' is not");
  expect_refused (HEAD "layer a 0x10 - -\n" TOP, "creation time '0x10'");
  expect_refused (HEAD "layer a 99999999999999999999 - -\n" TOP,
                  "creation time '99999999999999999999' is not");
  expect_refused (HEAD "layer - 1 - -\n" TOP, "layer file '-' is empty");
  expect_refused (HEAD "layer a%4 1 - -\n" TOP, "layer file 'a%4' is empty");
  expect_refused (HEAD "layer a/b 1 - -\n" TOP,
                  "layer file 'a/b' is not a plain file name");
  expect_refused (HEAD "layer a%2Fb 1 - -\n" TOP,
                  "layer file 'a/b' is not a plain file name");
  expect_refused (HEAD "layer .hidden 1 - -\n" TOP,
                  "layer file '.hidden' is not a plain");
  expect_refused (HEAD "layer .. 1 - -\n" TOP, "layer file '..' is not");
  expect_refused (HEAD "layer a 1 s%G1 -\n" TOP,
                  "snapshot name 's%G1' is not valid percent-encoding");
  expect_refused (HEAD "layer a 1 - d%\n" TOP,
                  "description 'd%' is not valid percent-encoding");
  expect_refused (HEAD "layer a 1 a%20b -\n" TOP, "byte 2 is 0x20, a space");
  expect_refused (HEAD "layer a 1 %2Ds -\n" TOP, "may not start with '-'");
  expect_refused (HEAD "layer a 1 .s -\n" TOP, "may not start with '.'");
  expect_refused (HEAD "layer a 1 a/b -\n" TOP, "character '/'");
  expect_refused (HEAD "layer a 1 %C3%A9 -\n" TOP, "non-ASCII byte");
  expect_refused (HEAD "layer a 1 - a%0Ab\n" TOP, "control byte 0x0a");
  expect_refused (HEAD "layer a 1 - a%1Bb\n" TOP, "control byte 0x1b");
  expect_refused (HEAD "layer a 1 - a%00b\n" TOP, "not valid percent-enc");
  /* rebase. */
  expect_refused (HEAD TOP "rebase\n", "'rebase' takes 1 field, not 0");
  expect_refused (HEAD TOP "rebase a b\n", "'rebase' takes 1 field, not 2");
  expect_refused (HEAD TOP "rebase -\n", "layer file '-' is empty");
  expect_refused (HEAD TOP "rebase nothere\n", "'rebase nothere' names no");
  /* The chain. */
  expect_refused (HEAD "layer top 1 s1 -\n", "carries the snapshot name");
  expect_refused (HEAD "layer a 1 - -\nlayer a 2 - -\n",
                  "layer file 'a' appears twice");
  expect_refused (HEAD "layer a 1 s - \nlayer b 2 s -\n" TOP,
                  "snapshot name 's' appears twice");
  /* The line number is the one an editor shows, empty lines counted. */
  expect_refused (HEAD "layer a 1 - - x y\n", "line 3 is malformed");
  expect_refused (HEAD "\n\nlayer a 1 - - x y\n", "line 5 is malformed");
  expect_refused ("\n" HEAD "layer a 1 - - x y\n", "line 4 is malformed");
}

/* Limits, each at its edge and one past it. */
static void
test_limits (void **state)
{
  struct manifest m;
  char *text, *p, name[COW_NAME_MAX + 2];
  size_t cap = 1 << 20;
  int i;

  text = malloc (cap);
  assert_non_null (text);

  /* Layers. */
  for (int n = MANIFEST_MAX_LAYERS; n <= MANIFEST_MAX_LAYERS + 1; n++) {
    p = text + sprintf (text, HEAD);
    for (i = 0; i < n; i++)
      p += sprintf (p, "layer l%d %d - -\n", i, i);
    if (n == MANIFEST_MAX_LAYERS) {
      expect_loads (text, &m);
      assert_int_equal (m.n_layers, MANIFEST_MAX_LAYERS);
      manifest_free (&m);
    }
    else
      expect_refused_at (text, EMLINK, "more than 128 layers", "layers");
  }

  /* Snapshot names. */
  memset (name, 'n', sizeof name);
  name[COW_NAME_MAX] = '\0';
  sprintf (text, HEAD "layer a 1 %s -\n" TOP, name);
  expect_loads (text, &m);
  assert_int_equal (strlen (m.layers[0].snapshot), COW_NAME_MAX);
  manifest_free (&m);
  name[COW_NAME_MAX] = 'n';
  name[COW_NAME_MAX + 1] = '\0';
  sprintf (text, HEAD "layer a 1 %s -\n" TOP, name);
  expect_refused (text, "snapshot name is 129 bytes long (at most 128)");

  /* Descriptions (each byte escaped: three bytes of the line). */
  p = text + sprintf (text, HEAD "layer a 1 - ");
  for (i = 0; i < COW_DESC_MAX; i++)
    p += sprintf (p, "%%20");
  sprintf (p, "\n" TOP);
  expect_loads (text, &m);
  assert_int_equal (strlen (m.layers[0].description), COW_DESC_MAX);
  manifest_free (&m);
  p = text + sprintf (text, HEAD "layer a 1 - ");
  for (i = 0; i < COW_DESC_MAX + 1; i++)
    p += sprintf (p, "%%20");
  sprintf (p, "\n" TOP);
  expect_refused (text, "description is 1025 bytes long (at most 1024)");

  /* Creation times: the largest int64 is fine. */
  expect_loads (HEAD "layer a 9223372036854775807 - -\n" TOP, &m);
  assert_int_equal (m.layers[0].created, INT64_MAX);
  manifest_free (&m);
  expect_refused (HEAD "layer a 9223372036854775808 - -\n" TOP,
                  "creation time");
  free (text);

  /* The size of the file: 4 MiB (blank lines pad it) and one byte more. */
  {
    size_t max = 4u << 20, head = strlen (HEAD TOP);
    char *big = malloc (max + 2);
    assert_non_null (big);
    memcpy (big, HEAD TOP, head);
    memset (big + head, '\n', max + 1 - head);
    big[max + 1] = '\0';
    unlink (mpath);
    tu_write_file (mpath, big, max);
    assert_int_equal (manifest_load (dir, &m), 1);
    manifest_free (&m);
    unlink (mpath);
    tu_write_file (mpath, big, max + 1);
    assert_int_equal (manifest_load (dir, &m), -1);
    assert_int_equal (cow_last_errno (), EFBIG);
    tu_assert_contains (cow_last_error (), "too large for a manifest");
    free (big);
  }
}

static void
assert_same (const struct manifest *a, const struct manifest *b)
{
  assert_int_equal (a->no_base, b->no_base);
  if (a->no_base) {
    assert_null (b->base);
  }
  else {
    assert_string_equal (a->base, b->base);
    assert_string_equal (a->base_format, b->base_format);
  }
  assert_int_equal (a->n_layers, b->n_layers);
  for (size_t i = 0; i < a->n_layers; i++) {
    const struct manifest_layer *x = &a->layers[i], *y = &b->layers[i];
    assert_string_equal (x->file, y->file);
    assert_int_equal (x->created, y->created);
    /* "" is written "-", which reads back as none. */
    if (x->snapshot && x->snapshot[0])
      assert_string_equal (x->snapshot, y->snapshot);
    else
      assert_null (y->snapshot);
    if (x->description && x->description[0])
      assert_string_equal (x->description, y->description);
    else
      assert_null (y->description);
  }
  assert_int_equal (a->n_rebase, b->n_rebase);
  for (size_t i = 0; i < a->n_rebase; i++)
    assert_string_equal (a->rebase[i], b->rebase[i]);
}

/* Save m, load it back: the same manifest, and saving that gives the
 * same bytes. */
static void
round_trip (const struct manifest *m)
{
  struct manifest back;
  size_t n1, n2;
  char *t1, *t2;

  unlink (mpath);
  if (manifest_save (dir, m, NULL) == -1)
    fail_msg ("save: %s", cow_last_error ());
  t1 = tu_read_file (mpath, &n1);
  if (manifest_load (dir, &back) != 1)
    fail_msg ("load: %s", cow_last_error ());
  assert_same (m, &back);
  assert_int_equal (manifest_save (dir, &back, NULL), 0);
  t2 = tu_read_file (mpath, &n2);
  assert_int_equal (n1, n2);
  assert_memory_equal (t1, t2, n1);
  /* One record a line, nothing but printable ASCII. */
  for (size_t i = 0; i < n1; i++)
    if (t1[i] != '\n' && (t1[i] < 0x20 || t1[i] >= 0x7f))
      fail_msg ("byte %zu of the manifest is 0x%02x", i,
                (unsigned char) t1[i]);
  manifest_free (&back);
  free (t1);
  free (t2);
}

/* Hostile strings, within what a loaded manifest may hold. */
static void
test_round_trip_hostile (void **state)
{
  static const char *const descs[] = {
    "-", "--", "%", "%2D", "%00", " ", "a b", "layer x 1 - -", "\t",
    "\xff\xfe", "Grüße ✓", "\xe2\x80\xae" "rtl", "\x7f", "\xc2\x85",
    "nobase", "cowchain-manifest 1",
  };
  static const char *const files[] = {
    "layer-000001.qcow2", "a b", "%", "-x", "x-", "\xff", "a\tb",
    "a\nb", "x..", "rebase", "x%2Fy",
  };
  static const char *const snaps[] = {
    "s", "a.b", "a-b", "a+b", "a:b", "a@b", "A_Z", "active", "base",
    "layer-1", "0",
  };
  struct manifest m;
  char all[256], *desc;

  /* Every byte a description may hold (all but C0 other than tab). */
  desc = all;
  *desc++ = '\t';
  for (int c = 0x20; c < 256; c++)
    *desc++ = (char) c;
  *desc = '\0';

  memset (&m, 0, sizeof m);
  m.base = strdup ("/a dir/with\nnewline %20 and - spaces\t\x01\xff");
  m.base_format = strdup ("q cow%2");
  assert_non_null (m.base);
  assert_non_null (m.base_format);
  for (size_t i = 0; i < sizeof files / sizeof files[0]; i++)
    assert_int_equal (manifest_push (&m, files[i], (int64_t) i * 1000003,
                                     snaps[i],
                                     descs[i % (sizeof descs
                                                / sizeof descs[0])]), 0);
  assert_int_equal (manifest_push (&m, "all", 1, "every-byte", all), 0);
  assert_int_equal (manifest_push (&m, "top", INT64_MAX, NULL, NULL), 0);
  assert_int_equal (manifest_add_rebase (&m, "a\nb"), 0);
  assert_int_equal (manifest_add_rebase (&m, "top"), 0);
  round_trip (&m);
  manifest_free (&m);

  memset (&m, 0, sizeof m);
  m.no_base = true;
  assert_int_equal (manifest_push (&m, "only", 0, NULL, ""), 0);
  round_trip (&m);
  manifest_free (&m);
}

/* Random manifests: random bytes in every string the format allows. */
static void
test_round_trip_random (void **state)
{
  static const char name_chars[] =
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-+:@";
  uint64_t seed = 20261207;

  for (int round = 0; round < 200; round++) {
    struct manifest m;
    size_t n = 1 + tu_rand_below (&seed, 20);
    char s[COW_DESC_MAX + 1], f[64];

    memset (&m, 0, sizeof m);
    m.no_base = tu_rand_below (&seed, 4) == 0;
    if (!m.no_base) {
      size_t len = 1 + tu_rand_below (&seed, 200);
      for (size_t j = 0; j < len; j++)
        s[j] = (char) (1 + tu_rand_below (&seed, 255));
      s[len] = '\0';
      m.base = strdup (s);
      m.base_format = strdup (tu_rand_below (&seed, 2) ? "raw" : "qcow2");
    }
    for (size_t i = 0; i < n; i++) {
      char name[COW_NAME_MAX + 1];
      size_t nl = tu_rand_below (&seed, COW_NAME_MAX + 1);
      size_t dl = tu_rand_below (&seed, 4) ? tu_rand_below (&seed, 40)
        : tu_rand_below (&seed, COW_DESC_MAX + 1);
      bool last = i == n - 1;

      /* A plain file name: no '/', not starting with '.', unique. */
      snprintf (f, sizeof f, "l%zu%c%c", i,
                (char) (0x80 + tu_rand_below (&seed, 128)),
                (char) (1 + tu_rand_below (&seed, 0x2e)));
      for (size_t j = 0; j < nl; j++)
        name[j] = name_chars[tu_rand_below (&seed, sizeof name_chars - 1)];
      name[nl] = '\0';
      if (nl && (name[0] == '.' || name[0] == '-'))
        name[0] = 'x';
      if (nl)                   /* unique */
        name[0] = name_chars[i % 52];
      for (size_t j = 0; j < dl; j++) {
        unsigned c = 0x1f + (unsigned) tu_rand_below (&seed, 0xe1);
        s[j] = (char) (c == 0x1f ? '\t' : c);
      }
      s[dl] = '\0';
      assert_int_equal (manifest_push (&m, f,
                                       (int64_t) (tu_rand (&seed) >> 1),
                                       nl && !last ? name : NULL,
                                       dl ? s : NULL), 0);
      if (tu_rand_below (&seed, 5) == 0)
        assert_int_equal (manifest_add_rebase (&m, f), 0);
    }
    round_trip (&m);
    manifest_free (&m);
  }
}

int
main (int argc, char **argv)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test (test_valid),
    cmocka_unit_test (test_bad_file),
    cmocka_unit_test (test_bad_lines),
    cmocka_unit_test (test_limits),
    cmocka_unit_test (test_round_trip_hostile),
    cmocka_unit_test (test_round_trip_random),
  };

  if (argc > 1)
    cmocka_set_test_filter (argv[1]);
  return cmocka_run_group_tests (tests, group_setup, group_teardown);
}
