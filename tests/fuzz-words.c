/* SPDX-License-Identifier: BSD-3-Clause */
/* libFuzzer target: percent-encoded words (word_encode, word_decode)
 * and the text shown to people (cow_utf8_decode, cow_text_printable) on
 * untrusted bytes.
 *
 * The input, cut at its first NUL, is
 *   - decoded as a word: if that succeeds, the result encodes to a word
 *     that decodes back to it;
 *   - encoded as a string: the word holds no space, control byte or
 *     non-ASCII byte, is never empty, is at most three times as long
 *     (plus one), and decodes back to the input;
 *   - walked as UTF-8 (every step 1 to 4 bytes, never past the end) and
 *     shown with cow_text_printable (printable ASCII or valid UTF-8 without
 *     control characters only).
 *
 * Build and run: make fuzz; make fuzz-run-words FUZZ_SECONDS=300.
 */
#include <config.h>

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "words.h"

int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

static void
die (const char *what, const char *s)
{
  fprintf (stderr, "%s: '%s'\n", what, s);
  abort ();
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  char *s = malloc (size + 1), *d, *w, *p;
  size_t n;

  if (s == NULL)
    return 0;
  memcpy (s, data, size);
  s[size] = '\0';
  n = strlen (s);

  /* As a word. */
  d = strdup (s);
  if (d == NULL)
    abort ();
  if (word_decode (d) == 0) {
    if (strlen (d) > n)
      die ("decoding made a word longer", s);
    w = word_encode (d);
    if (w == NULL)
      abort ();
    if (word_decode (w) != 0 || strcmp (w, d) != 0)
      die ("a decoded word does not round trip", s);
    free (w);
  }
  free (d);

  /* As a string. */
  w = word_encode (s);
  if (w == NULL)
    abort ();
  if (w[0] == '\0' || strlen (w) > 3 * n + 1)
    die ("bad encoded length", s);
  for (const unsigned char *c = (const unsigned char *) w; *c; c++)
    if (*c <= 0x20 || *c >= 0x7f)
      die ("an encoded word holds a byte it must not", s);
  if (word_decode (w) != 0 || strcmp (w, s) != 0)
    die ("an encoded string does not decode back", s);
  free (w);

  /* As text for a terminal. */
  for (size_t i = 0; i < n; ) {
    size_t len = 0;
    long cp = cow_utf8_decode ((const unsigned char *) s + i, &len);
    if (len < 1 || len > 4 || len > n - i || (cp == -1 && len != 1)
        || cp > 0x10ffff)
      die ("cow_utf8_decode stepped wrong", s);
    i += len;
  }
  p = cow_text_printable (s);
  if (p == NULL)
    abort ();
  for (size_t i = 0, m = strlen (p); i < m; ) {
    size_t len;
    long cp = cow_utf8_decode ((const unsigned char *) p + i, &len);
    if (cp == -1 || cow_text_is_control (cp))
      die ("cow_text_printable left a control or invalid byte", s);
    i += len;
  }
  free (p);
  free (s);
  return 0;
}
