/* SPDX-License-Identifier: BSD-3-Clause */
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

long
cow_utf8_decode (const unsigned char *s, size_t *len)
{
  unsigned char c = s[0];
  size_t n;
  long cp, min;

  *len = 1;
  if (c < 0x80)
    return c;
  if (c >= 0xc2 && c <= 0xdf) {
    n = 2;
    cp = c & 0x1f;
    min = 0x80;
  }
  else if (c >= 0xe0 && c <= 0xef) {
    n = 3;
    cp = c & 0x0f;
    min = 0x800;
  }
  else if (c >= 0xf0 && c <= 0xf4) {
    n = 4;
    cp = c & 0x07;
    min = 0x10000;
  }
  else
    return -1;                  /* continuation byte, 0xc0/0xc1, 0xf5+ */
  for (size_t i = 1; i < n; i++) {
    if ((s[i] & 0xc0) != 0x80)  /* also stops at the NUL */
      return -1;
    cp = (cp << 6) | (s[i] & 0x3f);
  }
  if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
    return -1;
  *len = n;
  return cp;
}

bool
text_is_bidi (long cp)
{
  return cp == 0x061c || cp == 0x200e || cp == 0x200f
    || (cp >= 0x202a && cp <= 0x202e) || (cp >= 0x2066 && cp <= 0x2069);
}

bool
cow_text_is_control (long cp)
{
  return cp < 0x20 || cp == 0x7f || (cp >= 0x80 && cp <= 0x9f)
    || text_is_bidi (cp);
}

char *
cow_text_printable (const char *s)
{
  const unsigned char *p = (const unsigned char *) s;
  /* Worst case: every byte becomes a 6-byte escape. */
  char *r = malloc (strlen (s) * 6 + 1), *o = r;

  if (r == NULL)
    return NULL;
  while (*p) {
    size_t len;
    long cp = cow_utf8_decode (p, &len);
    if (cp == -1)
      o += sprintf (o, "\\x%02x", *p);
    else if (cp == '\\')
      o += sprintf (o, "\\\\");
    else if (cp == '\t' || cp == '\n' || cp == '\r')
      o += sprintf (o, "\\%c", cp == '\t' ? 't' : cp == '\n' ? 'n' : 'r');
    else if (cow_text_is_control (cp))
      o += sprintf (o, "\\u%04lx", cp);
    else {
      memcpy (o, p, len);
      o += len;
    }
    p += len;
  }
  *o = '\0';
  return r;
}
