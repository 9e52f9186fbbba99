/* SPDX-License-Identifier: BSD-3-Clause */
/* Unit tests of the text rules: UTF-8 decoding, the printable form of
 * text for terminals, which snapshot names and descriptions a new
 * snapshot may take (and which an older manifest may still hold), and
 * the percent-encoded words of the manifest and the control protocol
 * (word_encode, word_decode). */
#undef NDEBUG
#include <config.h>

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "cowchain.h"
#include "manifest.h"
#include "words.h"

static long
decode (const char *s, size_t *len)
{
  return cow_utf8_decode ((const unsigned char *) s, len);
}

static void
test_utf8_decode (void **state)
{
  size_t len;

  assert_int_equal (decode ("A", &len), 'A');
  assert_int_equal (len, 1);
  assert_int_equal (decode ("\xc3\xa9", &len), 0xe9);
  assert_int_equal (len, 2);
  assert_int_equal (decode ("\xe2\x9c\x93", &len), 0x2713);
  assert_int_equal (len, 3);
  assert_int_equal (decode ("\xf4\x8f\xbf\xbf", &len), 0x10ffff);
  assert_int_equal (len, 4);
  assert_int_equal (decode ("\xc2\x85", &len), 0x85);
  /* Invalid: each is one bad byte. */
  static const char *const bad[] = {
    "\x80", "\xbf", "\xc0\xaf", "\xc1\xbf", "\xe0\x80\xaf",
    "\xf0\x80\x80\xaf", "\xed\xa0\x80", "\xf4\x90\x80\x80", "\xf5\x80\x80\x80",
    "\xff", "\xc3", "\xc3(", "\xe2\x9c", "\xf0\x9f\x98",
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    len = 99;
    assert_int_equal (decode (bad[i], &len), -1);
    assert_int_equal (len, 1);
  }
}

static void
expect_printable (const char *in, const char *want)
{
  char *got = cow_text_printable (in);

  assert_non_null (got);
  assert_string_equal (got, want);
  free (got);
}

static void
test_text_printable (void **state)
{
  expect_printable ("plain text", "plain text");
  expect_printable ("Grüße ✓", "Grüße ✓");
  expect_printable ("a\x1b[2Jb", "a\\u001b[2Jb");
  expect_printable ("a\tb\nc\rd", "a\\tb\\nc\\rd");
  expect_printable ("a\x7f" "b", "a\\u007fb");
  expect_printable ("a\xc2\x85" "b", "a\\u0085b");
  expect_printable ("a\x9b" "b\xff", "a\\x9bb\\xff");
  expect_printable ("back\\slash", "back\\\\slash");
  /* Bidirectional overrides would reorder the rest of the line. */
  expect_printable ("a\xe2\x80\xae" "b\xe2\x81\xa9", "a\\u202eb\\u2069");
  expect_printable ("a\xe2\x80\x8d" "b", "a\xe2\x80\x8d" "b");  /* ZWJ: kept */
  /* The worst case: every byte a six-byte escape. */
  expect_printable ("\x01\x02\x03", "\\u0001\\u0002\\u0003");
}

static void
expect_refused (int r, const char *text)
{
  assert_int_equal (r, -1);
  if (strstr (cow_last_error (), text) == NULL)
    fail_msg ("error '%s' does not mention '%s'", cow_last_error (), text);
}

static void
test_names (void **state)
{
  static const char *const reserved[] = {
    "active", "ACTIVE", "base", "Base", "layer-000001.qcow2", "layer-",
    "LAYER-x",
  };
  static const char *const fine[] = {
    "s1", "before-upgrade", "a.b_c-d+e:f@g", "activex", "xbase", "layer",
    "mylayer-1",
  };

  for (size_t i = 0; i < sizeof reserved / sizeof reserved[0]; i++) {
    assert_non_null (cow_snapshot_name_reserved (reserved[i]));
    expect_refused (manifest_check_name (reserved[i]), "is reserved");
  }
  for (size_t i = 0; i < sizeof fine / sizeof fine[0]; i++) {
    assert_null (cow_snapshot_name_reserved (fine[i]));
    assert_int_equal (manifest_check_name (fine[i]), 0);
  }
  expect_refused (manifest_check_name (""), "empty");
  expect_refused (manifest_check_name (".x"), "may not start");
  expect_refused (manifest_check_name ("a b"), "byte 2 is 0x20, a space");
  expect_refused (manifest_check_name ("ab\x1b"), "byte 3 is 0x1b, a control");
  expect_refused (manifest_check_name ("\xc3\xa9"), "byte 1 is 0xc3");
  expect_refused (manifest_check_name ("a/b"), "character '/' (byte 2)");
}

static void
test_descriptions (void **state)
{
  assert_int_equal (manifest_check_description (""), 0);
  assert_int_equal (manifest_check_description ("kernel 6.1, Grüße ✓"), 0);
  expect_refused (manifest_check_description ("ab\xc2\x85"),
                  "byte 3 is U+0085, a C1 control character");
  expect_refused (manifest_check_description ("a\x9b"),
                  "byte 2 (0x9b) is not valid UTF-8");
  expect_refused (manifest_check_description ("\xff"),
                  "byte 1 (0xff) is not valid UTF-8");
  expect_refused (manifest_check_description ("a\n"), "U+000A, a newline");
  expect_refused (manifest_check_description ("a\t"), "U+0009, a tab");
  expect_refused (manifest_check_description ("\x1b"), "U+001B, an escape");
  expect_refused (manifest_check_description ("\x7f"), "U+007F, a delete");
  expect_refused (manifest_check_description ("\x01"),
                  "U+0001, a control character");
}

/* An older manifest: names and descriptions that new snapshots may not
 * take still load. */
static void
test_old_manifest_loads (void **state)
{
  char dir[] = "/tmp/cowchain-test-text-XXXXXX", path[64];
  struct manifest m;
  FILE *f;

  assert_non_null (mkdtemp (dir));
  snprintf (path, sizeof path, "%s/manifest", dir);
  f = fopen (path, "w");
  assert_non_null (f);
  fputs ("cowchain-manifest 1\n"
         "base /b raw\n"
         "layer layer-000001.qcow2 1 active a%9B%7F%FF%C2%85%09z\n"
         "layer layer-000002.qcow2 2 layer-000009.qcow2 -\n"
         "layer layer-000003.qcow2 3 - -\n", f);
  assert_int_equal (fclose (f), 0);
  assert_int_equal (manifest_load (dir, &m), 1);
  assert_int_equal (m.n_layers, 3);
  assert_string_equal (m.layers[0].snapshot, "active");
  assert_string_equal (m.layers[0].description, "a\x9b\x7f\xff\xc2\x85\tz");
  assert_string_equal (m.layers[1].snapshot, "layer-000009.qcow2");
  manifest_free (&m);

  /* A C0 byte other than tab was never allowed. */
  f = fopen (path, "w");
  assert_non_null (f);
  fputs ("cowchain-manifest 1\n"
         "base /b raw\n"
         "layer layer-000001.qcow2 1 s1 a%1Bz\n"
         "layer layer-000002.qcow2 2 - -\n", f);
  assert_int_equal (fclose (f), 0);
  expect_refused (manifest_load (dir, &m), "control byte 0x1b");
  assert_int_equal (unlink (path), 0);
  assert_int_equal (rmdir (dir), 0);
}

/*----------------------------------------------------------------------
 * Percent-encoded words. */

/* An encoded word may go into a line of space-separated words. */
static void
assert_word_shape (const char *w, const char *what)
{
  if (w[0] == '\0')
    fail_msg ("%s: encoded as the empty word", what);
  for (const unsigned char *c = (const unsigned char *) w; *c; c++)
    if (*c <= 0x20 || *c >= 0x7f)
      fail_msg ("%s: encoded as '%s', which holds byte 0x%02x", what, w, *c);
}

static void
expect_round_trip (const char *s, const char *what)
{
  char *w = word_encode (s);

  assert_non_null (w);
  assert_word_shape (w, what);
  assert_true (strlen (w) <= 3 * strlen (s) + 1);
  assert_int_equal (word_decode (w), 0);
  if (strcmp (w, s) != 0)
    fail_msg ("%s: decoded back differently", what);
  free (w);
}

static void
test_word_every_byte (void **state)
{
  char s[4], all[256], what[64];

  /* Every byte alone, first and later in a word. */
  for (int c = 1; c < 256; c++) {
    snprintf (what, sizeof what, "byte 0x%02x", c);
    s[0] = (char) c, s[1] = '\0';
    expect_round_trip (s, what);
    s[0] = 'a', s[1] = (char) c, s[2] = (char) c, s[3] = '\0';
    expect_round_trip (s, what);
  }
  /* All of them in one word, both orders. */
  for (int c = 1; c < 256; c++)
    all[c - 1] = (char) c;
  all[255] = '\0';
  expect_round_trip (all, "bytes 0x01 to 0xff");
  for (int c = 1; c < 256; c++)
    all[c - 1] = (char) (256 - c);
  expect_round_trip (all, "bytes 0xff to 0x01");
  expect_round_trip ("", "the empty word");
  expect_round_trip ("-", "a dash");
  expect_round_trip ("--", "two dashes");
  expect_round_trip ("%2D", "an escape, literally");
  expect_round_trip ("%", "a percent sign");
}

static void
expect_encoded (const char *s, const char *want)
{
  char *w = word_encode (s);

  assert_non_null (w);
  assert_string_equal (w, want);
  free (w);
}

static void
expect_decoded (const char *w, const char *want)
{
  char *s = strdup (w);

  assert_non_null (s);
  assert_int_equal (word_decode (s), 0);
  assert_string_equal (s, want);
  free (s);
}

static void
expect_bad_word (const char *w)
{
  char *s = strdup (w);

  assert_non_null (s);
  if (word_decode (s) != -1)
    fail_msg ("'%s' decoded (to '%s'), but it is not a valid word", w, s);
  free (s);
}

static void
test_word_forms (void **state)
{
  /* The plain bytes stay, the rest is %XX in upper case. */
  expect_encoded ("", "-");
  expect_encoded ("-", "%2D");
  expect_encoded ("-a-", "%2Da-");
  expect_encoded ("a-b", "a-b");
  expect_encoded ("Az09._/:@+,=", "Az09._/:@+,=");
  expect_encoded ("a b\n%", "a%20b%0A%25");
  expect_encoded ("\xff\x7f\x01", "%FF%7F%01");
  expect_encoded ("Grüße", "Gr%C3%BC%C3%9Fe");
  /* Lower case hex decodes too; "-" alone is the empty word. */
  expect_decoded ("-", "");
  expect_decoded ("%2d%2D", "--");
  expect_decoded ("a%20b", "a b");
  expect_decoded ("%ff%Fe", "\xff\xfe");
  expect_decoded ("--", "--");
  expect_decoded ("plain", "plain");
}

static void
test_word_bad_escapes (void **state)
{
  static const char *const bad[] = {
    "%", "a%", "%4", "a%4", "%G0", "%0G", "%g1", "%-1", "%+1", "% 1",
    "%00", "a%00b", "%%", "%%41", "%\xff" "0", "%0\xff", "ok%2", "%2D%",
  };

  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
    expect_bad_word (bad[i]);
}

/* Long words: every byte of a 64 KiB string escaped, and a long run of
 * plain bytes. */
static void
test_word_lengths (void **state)
{
  size_t n = 65536;
  char *s = malloc (n + 1), *w;

  assert_non_null (s);
  memset (s, ' ', n);
  s[n] = '\0';
  w = word_encode (s);
  assert_non_null (w);
  assert_int_equal (strlen (w), 3 * n);
  assert_int_equal (word_decode (w), 0);
  assert_int_equal (strlen (w), n);
  assert_memory_equal (w, s, n);
  free (w);
  memset (s, 'x', n);
  w = word_encode (s);
  assert_non_null (w);
  assert_int_equal (strlen (w), n);
  assert_int_equal (word_decode (w), 0);
  assert_string_equal (w, s);
  free (w);
  free (s);
}

int
main (void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test (test_utf8_decode),
    cmocka_unit_test (test_text_printable),
    cmocka_unit_test (test_names),
    cmocka_unit_test (test_descriptions),
    cmocka_unit_test (test_old_manifest_loads),
    cmocka_unit_test (test_word_every_byte),
    cmocka_unit_test (test_word_forms),
    cmocka_unit_test (test_word_bad_escapes),
    cmocka_unit_test (test_word_lengths),
  };
  return cmocka_run_group_tests (tests, NULL, NULL);
}
