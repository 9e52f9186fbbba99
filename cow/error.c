/* SPDX-License-Identifier: BSD-3-Clause */
/* Per-thread last error: a message and an errno, set by the engine where a
 * failure is detected and read by the plugin, the tool and the tests. */
#include <config.h>

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cowchain.h"
#include "error.h"

static __thread char last_msg[1024];
static __thread int last_errno;

static void
set_va (int errnum, bool with_strerror, const char *fmt, va_list ap)
{
  char msg[sizeof last_msg];
  int n = vsnprintf (msg, sizeof msg, fmt, ap);

  if (n < 0)
    msg[0] = '\0';
  if (with_strerror) {
    size_t len = strlen (msg);
    snprintf (msg + len, sizeof msg - len, ": %s", strerror (errnum));
  }
  memcpy (last_msg, msg, sizeof msg);
  last_errno = errnum ? errnum : EIO;
}

void
cow_error_set (int errnum, const char *fmt, ...)
{
  va_list ap;

  va_start (ap, fmt);
  set_va (errnum, false, fmt, ap);
  va_end (ap);
  errno = last_errno;
}

void
cow_error_errno (const char *fmt, ...)
{
  int saved = errno;
  va_list ap;

  va_start (ap, fmt);
  set_va (saved, true, fmt, ap);
  va_end (ap);
  errno = last_errno;
}

void
cow_error_clear (void)
{
  last_msg[0] = '\0';
  last_errno = 0;
}

const char *
cow_last_error (void)
{
  return last_msg[0] ? last_msg : "no error";
}

int
cow_last_errno (void)
{
  return last_errno;
}
