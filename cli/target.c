/* SPDX-License-Identifier: BSD-3-Clause */
/* How every disk command of `cowchain` finds its disk (cli.h): online,
 * a running server reached through its control socket (--control PATH
 * or COWCHAIN_CONTROL) with a time limit on each request (--timeout,
 * COWCHAIN_TIMEOUT); offline (--state DIR), the disk's state directory
 * opened in this process, which the directory's lock refuses while a
 * server holds it. */
#include <config.h>

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli.h"
#include "cowchain.h"

int
cli_target_option (struct cli_target *t, int c, const char *arg)
{
  switch (c) {
  case 'c': t->control = arg; return 1;
  case 's': t->state = arg; return 1;
  case 'd': t->disk = arg; return 1;
  case CLI_OPT_TIMEOUT: t->timeout = arg; return 1;
  }
  return 0;
}

int cli_timeout_ms = -1;

/* A bad timeout value, reported for cmd (NULL: before the command). */
static int
bad_timeout (const char *cmd, const char *what, const char *arg)
{
  char msg[256];

  if (arg[0] == '\0')
    snprintf (msg, sizeof msg, "%s: the number of seconds is missing "
              "(0 = no limit)", what);
  else
    snprintf (msg, sizeof msg, "%s: '%.32s' is not a whole number of "
              "seconds up to 1000000 (0 = no limit)", what, arg);
  if (cmd)
    return cli_usage_error (cmd, "%s", msg);
  cli_error ("%s; try 'cowchain --help'", msg);
  return EXIT_ERROR;
}

int
cli_timeout_set (const char *cmd, const char *arg)
{
  const char *what = "--timeout";
  unsigned long v = 0;

  if (arg == NULL && cli_timeout_ms >= 0)
    return EXIT_OK;
  if (arg == NULL) {
    /* Unset or empty: the default. */
    arg = getenv ("COWCHAIN_TIMEOUT");
    what = "COWCHAIN_TIMEOUT";
    if (arg == NULL || arg[0] == '\0') {
      cli_timeout_ms = CLI_DEFAULT_TIMEOUT * 1000;
      return EXIT_OK;
    }
  }
  if (arg[0] == '\0')
    return bad_timeout (cmd, what, arg);
  for (const char *c = arg; *c; c++) {
    if (*c < '0' || *c > '9' || v > 1000000)
      return bad_timeout (cmd, what, arg);
    v = v * 10 + (unsigned long) (*c - '0');
  }
  if (v > 1000000)
    return bad_timeout (cmd, what, arg);
  cli_timeout_ms = (int) v * 1000;
  return EXIT_OK;
}

/* The commands that have no offline form: a missing --control must not
 * suggest --state to them. */
static bool
online_only (const char *cmd)
{
  static const char *const online[] = {
    "jobs", "wait", "pause", "resume", "cancel", "speed", "events",
    "blklist", "status",
  };

  for (size_t i = 0; i < sizeof online / sizeof online[0]; i++)
    if (strcmp (cmd, online[i]) == 0)
      return true;
  return false;
}

int
cli_target_done (const char *cmd, struct cli_target *t)
{
  /* A bad value is reported whatever else is missing. */
  if (t->timeout && cli_timeout_set (cmd, t->timeout) != EXIT_OK)
    return EXIT_ERROR;
  if (t->control && t->state)
    return cli_usage_error (cmd, "give --control or --state, not both");
  if (!t->control && !t->state)
    t->control = getenv ("COWCHAIN_CONTROL");
  if (!t->control && !t->state && online_only (cmd))
    return cli_usage_error (cmd, "give --control=SOCKET (or set "
                            "COWCHAIN_CONTROL): %s works on a running "
                            "server", cmd);
  if (!t->control && !t->state)
    return cli_usage_error (cmd, "give --control=SOCKET (or set "
                            "COWCHAIN_CONTROL) for a running server, or "
                            "--state=DIR for a stopped disk");
  if (t->state && t->disk)
    return cli_usage_error (cmd, "--disk names a disk of a running server; "
                            "offline, --state names the disk");
  if (!t->disk)
    t->disk = "";
  if (t->control)
    return cli_timeout_set (cmd, t->timeout);
  return EXIT_OK;
}

struct cow_disk *
cli_open_offline (const struct cli_target *t, bool readonly)
{
  struct cow_disk_config cfg = { .state_dir = t->state, .readonly = readonly };
  struct cow_disk *d;

  if (access (t->state, F_OK) == -1) {
    cli_error ("%s: %s", t->state, strerror (errno));
    return NULL;
  }
  d = cow_disk_open (&cfg);
  if (d == NULL)
    cli_error ("%s", cow_last_error ());
  return d;
}

int
cli_close_offline (struct cow_disk *d, int status)
{
  if (cow_disk_close (d) == -1 && status == EXIT_OK) {
    cli_error ("%s", cow_last_error ());
    return EXIT_ERROR;
  }
  return status;
}

int
cli_ask (const struct cli_target *t, struct cow_control_reply *reply,
         int argc, ...)
{
  const char *argv[CLI_MAX_WORDS];
  va_list ap;

  va_start (ap, argc);
  for (int i = 0; i < argc; i++)
    argv[i] = va_arg (ap, const char *);
  va_end (ap);
  if (cli_timeout_set (NULL, NULL) != EXIT_OK)
    return EXIT_ERROR;
  if (cow_control_request (t->control, argv, argc, cli_timeout_ms,
                           reply) == -1) {
    struct stat st;
    /* connect() says "Connection refused" of a file that is no socket. */
    if (cow_last_errno () == ECONNREFUSED && stat (t->control, &st) == 0
        && !S_ISSOCK (st.st_mode))
      cli_error ("%s is not a socket but %s: give the server's control "
                 "socket (its control= key)", t->control,
                 S_ISDIR (st.st_mode) ? "a directory"
                 : S_ISREG (st.st_mode) ? "a regular file" : "another kind "
                 "of file");
    else
      cli_error ("%s", cow_last_error ());
    return EXIT_ERROR;
  }
  return EXIT_OK;
}
