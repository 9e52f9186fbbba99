/* Words: the percent-encoded fields of the manifest and of the control
 * protocol.  An encoded word is never empty and holds no space, newline
 * or control byte: "" is written "-", a literal "-" is "%2D", and every
 * byte outside letters, digits and . _ / : @ + , = (and '-' after the
 * first byte) is %XX. */
#ifndef COW_WORDS_H
#define COW_WORDS_H

#include <stdbool.h>
#include <stddef.h>

/* A new encoded copy, or NULL (ENOMEM). */
char *word_encode (const char *s);
/* Decode in place; -1 on a bad escape or an escaped NUL. */
int word_decode (char *s);

/* Text shown to people (snapshot names, descriptions, paths).
 *
 * utf8_decode: the code point of the UTF-8 sequence at s, its length in
 * *len; -1 (and *len 1) if s does not start a valid sequence (a stray
 * continuation byte, an overlong form, a surrogate, beyond U+10FFFF, a
 * truncated sequence).  s must not be at its terminating NUL. */
long utf8_decode (const unsigned char *s, size_t *len);
/* A bidirectional formatting character, which reorders what a terminal
 * shows after it: ALM (U+061C), LRM, RLM (U+200E, U+200F), the embeddings
 * and overrides (U+202A to U+202E) and isolates (U+2066 to U+2069). */
bool text_is_bidi (long cp);
/* A character a terminal acts on instead of showing it: C0 (U+0000 to
 * U+001F), DEL (U+007F), C1 (U+0080 to U+009F), or a bidirectional
 * formatting character. */
bool text_is_control (long cp);
/* A copy of s that shows every control character as \uNNNN (\t, \n,
 * \r for those three), every invalid byte as \xNN, and '\' as "\\";
 * valid printable UTF-8 is kept as it is.  NULL on ENOMEM. */
char *text_printable (const char *s);

#endif /* COW_WORDS_H */
