/* SPDX-License-Identifier: BSD-3-Clause */
/* libFuzzer target: the control server's parsing of a request line
 * (control_split on what the server would pass it) on untrusted bytes.
 *
 * The input is what a client sent.  As the server does (serve and
 * read_request in cow/control.c, which are static, so their checks are
 * repeated here): the request is the bytes before the first newline; a
 * request without one, longer than CONTROL_MAX_REQUEST, holding a NUL or
 * a byte outside printable ASCII is refused before any parsing.  What
 * is left is split with control_split into at most CONTROL_MAX_WORDS
 * words.  Then: the count is within bounds; a split that succeeds gives
 * words that encode and join into a line that splits back into the same
 * words; and splitting with a smaller limit refuses exactly when there
 * are more words than it.
 *
 * Build and run: make fuzz; make fuzz-run-protocol FUZZ_SECONDS=300.
 */
#include <config.h>

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "control.h"

int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

static void
die (const char *what)
{
  fprintf (stderr, "%s\n", what);
  abort ();
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  const uint8_t *nl = memchr (data, '\n', size);
  char *line, *again, *copy, *words[CONTROL_MAX_WORDS], *w2[CONTROL_MAX_WORDS];
  size_t len;
  int n, n2;

  if (nl == NULL || (size_t) (nl - data) > CONTROL_MAX_REQUEST)
    return 0;
  len = (size_t) (nl - data);
  for (size_t i = 0; i < len; i++)
    if (data[i] < 0x20 || data[i] >= 0x7f)
      return 0;
  line = malloc (len + 1);
  copy = malloc (len + 1);
  if (line == NULL || copy == NULL)
    abort ();
  memcpy (line, data, len);
  line[len] = '\0';
  memcpy (copy, line, len + 1);

  n = control_split (line, words, CONTROL_MAX_WORDS);
  if (n < -1 || n > CONTROL_MAX_WORDS)
    die ("control_split returned a count out of bounds");
  if (n >= 0) {
    /* Encode and join the words: the same words come back. */
    size_t cap = 1, at = 0;
    for (int i = 0; i < n; i++)
      cap += 3 * strlen (words[i]) + 2;
    again = malloc (cap + 1);
    if (again == NULL)
      abort ();
    for (int i = 0; i < n; i++) {
      char *e = word_encode (words[i]);
      if (e == NULL)
        abort ();
      at += (size_t) sprintf (again + at, "%s%s", i ? " " : "", e);
      free (e);
    }
    again[at] = '\0';
    n2 = control_split (again, w2, CONTROL_MAX_WORDS);
    if (n2 != n)
      die ("the words of a request, encoded again, split differently");
    for (int i = 0; i < n; i++)
      if (strcmp (words[i], w2[i]) != 0)
        die ("a word of a request, encoded again, came back different");
    free (again);
    /* A smaller limit: refused when the words do not fit. */
    if (n > 0) {
      char *w3[CONTROL_MAX_WORDS];
      int n3 = control_split (copy, w3, n - 1);
      if (n3 != -1)
        die ("control_split gave more words than its limit allows");
    }
  }
  free (line);
  free (copy);
  return 0;
}
