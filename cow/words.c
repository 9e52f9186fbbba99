/* Percent-encoded words (see words.h). */
#include <config.h>

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "words.h"

static int
is_plain (unsigned char c, bool first)
{
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
    || (c >= '0' && c <= '9') || (c && strchr ("._/:@+,=", c))
    || (c == '-' && !first);
}

char *
word_encode (const char *s)
{
  size_t n = strlen (s);
  char *out = malloc (n * 3 + 2), *p = out;

  if (out == NULL)
    return NULL;
  if (n == 0) {
    strcpy (out, "-");
    return out;
  }
  for (const unsigned char *c = (const unsigned char *) s; *c; c++) {
    if (is_plain (*c, c == (const unsigned char *) s))
      *p++ = (char) *c;
    else
      p += sprintf (p, "%%%02X", *c);
  }
  *p = '\0';
  return out;
}

static int
hexval (int c)
{
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

int
word_decode (char *s)
{
  char *in = s, *out = s;

  if (strcmp (s, "-") == 0) {
    s[0] = '\0';
    return 0;
  }
  while (*in) {
    if (*in == '%') {
      int h = hexval (in[1]), l = h >= 0 ? hexval (in[2]) : -1;
      if (h < 0 || l < 0 || (h | l) == 0)
        return -1;
      *out++ = (char) (h * 16 + l);
      in += 3;
    }
    else
      *out++ = *in++;
  }
  *out = '\0';
  return 0;
}
