/* SPDX-License-Identifier: BSD-3-Clause */
/* Words: the percent-encoded fields of the manifest and of the control
 * protocol.  An encoded word is never empty and holds no space, newline
 * or control byte: "" is written "-", a literal "-" is "%2D", and every
 * byte outside letters, digits and . _ / : @ + , = (and '-' after the
 * first byte) is %XX. */
#ifndef COW_WORDS_H
#define COW_WORDS_H

#include <stdbool.h>
#include <stddef.h>

#include "cowchain.h"

/* A new encoded copy, or NULL (ENOMEM). */
char *word_encode (const char *s);
/* Decode in place; -1 on a bad escape or an escaped NUL. */
int word_decode (char *s);

/* Text shown to people (snapshot names, descriptions, paths):
 * cow_utf8_decode, cow_text_is_control and cow_text_printable are public
 * (cowchain.h). */
/* A bidirectional formatting character, which reorders what a terminal
 * shows after it: ALM (U+061C), LRM, RLM (U+200E, U+200F), the embeddings
 * and overrides (U+202A to U+202E) and isolates (U+2066 to U+2069). */
bool text_is_bidi (long cp);

#endif /* COW_WORDS_H */
