/* Words: the percent-encoded fields of the manifest and of the control
 * protocol.  An encoded word is never empty and holds no space, newline
 * or control byte: "" is written "-", a literal "-" is "%2D", and every
 * byte outside letters, digits and . _ / : @ + , = (and '-' after the
 * first byte) is %XX. */
#ifndef COW_WORDS_H
#define COW_WORDS_H

/* A new encoded copy, or NULL (ENOMEM). */
char *word_encode (const char *s);
/* Decode in place; -1 on a bad escape or an escaped NUL. */
int word_decode (char *s);

#endif /* COW_WORDS_H */
