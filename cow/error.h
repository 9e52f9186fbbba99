/* SPDX-License-Identifier: BSD-3-Clause */
/* Per-thread last error of the engine (read back with cow_last_error). */
#ifndef COW_ERROR_H
#define COW_ERROR_H

#include <errno.h>

/* Record an error: the message is formatted like printf; errnum is the
 * errno the caller will see (the message does not include it). */
void cow_error_set (int errnum, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));

/* Record an error from the current errno, appending ": strerror". */
void cow_error_errno (const char *fmt, ...)
  __attribute__ ((format (printf, 1, 2)));

/* Free the calling thread's message (for leak-free thread exit). */
void cow_error_clear (void);

#endif /* COW_ERROR_H */
