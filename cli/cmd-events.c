/* SPDX-License-Identifier: BSD-3-Clause */
/* `cowchain events`: the events of a running server's disks as they
 * happen (the control protocol's events stream, cowchain-control(5)),
 * one line each, as text or JSON Lines, until the server stops or the
 * user interrupts it. */
#include <config.h>

#include <errno.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "cowchain.h"

const char events_help[] =
  "Usage: cowchain events [OPTION]...\n"
  "Print the events of a running server's disks as they happen, one line\n"
  "each, until the server stops or the command is interrupted: snapshot,\n"
  "snapshot-failed, revert, revert-failed, job-start, job-progress (at 25,\n"
  "50 and 75 %), job-end, degraded, and lost (events this reader was too\n"
  "slow to take, with their count).  Text lines are\n"
  "  TIME DISK EVENT KEY=VALUE...\n"
  "with TIME in ISO 8601 UTC (milliseconds), DISK '-' for the unnamed\n"
  "disk, and a VALUE in double quotes when it holds blanks.  Every event\n"
  "and its fields: cowchain-control(5).\n"
  "\n"
  "Options:\n"
  "  -c, --control=SOCKET  the server's control socket (default:\n"
  "                        $COWCHAIN_CONTROL)\n"
  "  -d, --disk=NAME       only this disk's events\n"
  "      --output=FORMAT   text (default) or json: JSON Lines, one object\n"
  "                        per event: {\"version\": 1, \"time\": ..., \"disk\":\n"
  "                        ..., \"event\": ..., and its fields}; numbers as\n"
  "                        numbers\n"
  "      --timeout=SECONDS  for connecting and the server's first answer\n"
  "                        only (default: $COWCHAIN_TIMEOUT, else 60); the\n"
  "                        stream itself waits for ever\n"
  "  -h, --help            this help\n"
  "\n"
  "Exit status:\n"
  "  0  the server stopped (it ends the stream), or SIGINT/SIGTERM\n"
  "  1  error: bad usage, no server, too many readers, the stream cut\n"
  "     without its end (the server died), output not written\n"
  "\n"
  "Example:\n"
  "  cowchain --control=/run/vm1.ctl events --disk=vda --output=json\n";

/* Fields whose values are numbers (JSON numbers); the rest are
 * strings. */
static const char *const numeric_keys[] = {
  "pause-ns", "duration-ms", "done", "total", "percent", "count", "errno",
  "speed", "dropped",
};

static bool
is_number (const char *v)
{
  const char *p = v;
  bool dot = false;

  if (*p < '0' || *p > '9')
    return false;
  for (; *p; p++) {
    if (*p == '.' && !dot && p[1] >= '0' && p[1] <= '9')
      dot = true;
    else if (*p < '0' || *p > '9')
      return false;
  }
  /* JSON allows no leading zero before other digits. */
  return !(v[0] == '0' && v[1] >= '0' && v[1] <= '9');
}

static bool
numeric_key (const char *key)
{
  for (size_t i = 0; i < sizeof numeric_keys / sizeof numeric_keys[0]; i++)
    if (strcmp (numeric_keys[i], key) == 0)
      return true;
  return false;
}

/* A value as text shows it: as it is when plain, else in double quotes
 * with \" \\ and the terminal's control characters escaped. */
static void
print_value (const char *v)
{
  bool plain = v[0] != '\0';

  for (const unsigned char *c = (const unsigned char *) v; *c && plain; c++)
    plain = *c > 0x20 && *c < 0x7f && *c != '"' && *c != '\\';
  if (plain) {
    fputs (v, stdout);
    return;
  }
  putchar ('"');
  for (const char *c = v; *c; c++)
    if (*c == '"' || *c == '\\')
      printf ("\\%c", *c);
    else {
      char one[2] = { *c, '\0' };
      /* Bytes of a UTF-8 sequence go on as they are. */
      if ((unsigned char) *c >= 0x80)
        putchar (*c);
      else
        fputs (cli_text (one), stdout);
    }
  putchar ('"');
}

struct events_out {
  bool json;
  const char *control;
  int status;                   /* EXIT_ERROR once output failed */
};

static volatile sig_atomic_t stop_requested;

static void
on_signal (int sig)
{
  stop_requested = 1;
}

static int
print_event (void *opaque, const struct cow_control_line *line)
{
  struct events_out *o = opaque;
  char **w;

  if (stop_requested)
    return 1;
  if (line == NULL)
    return 0;
  w = line->words;
  if (line->n < 3) {
    cli_error ("%s: malformed event line from the server", o->control);
    return 1;
  }
  if (o->json) {
    struct cli_json j;
    cli_json_init (&j, stdout, 0);
    cli_json_open_inline (&j, '{');
    cli_json_u64 (&j, "version", 1);
    cli_json_str (&j, "time", w[0]);
    cli_json_str (&j, "disk", w[1]);
    cli_json_str (&j, "event", w[2]);
    for (int i = 3; i < line->n; i++) {
      char *eq = strchr (w[i], '=');
      if (eq == NULL)
        continue;
      *eq = '\0';
      if (numeric_key (w[i]) && is_number (eq + 1)) {
        cli_json_key (&j, w[i]);
        fputs (eq + 1, stdout);
      }
      else
        cli_json_str (&j, w[i], eq + 1);
      *eq = '=';
    }
    cli_json_close (&j, '}');
  }
  else {
    printf ("%s %s %s", cli_text (w[0]), w[1][0] ? cli_text (w[1]) : "-",
            cli_text (w[2]));
    for (int i = 3; i < line->n; i++) {
      char *eq = strchr (w[i], '=');
      if (eq == NULL)
        continue;
      *eq = '\0';
      printf (" %s=", cli_text (w[i]));
      print_value (eq + 1);
      *eq = '=';
    }
    putchar ('\n');
  }
  /* Each line as it comes: a reader may be a pipe. */
  if (fflush (stdout) == EOF || ferror (stdout)) {
    cli_error ("writing the events: %s", strerror (errno));
    o->status = EXIT_ERROR;
    return 1;
  }
  return 0;
}

int
cmd_events (int argc, char **argv)
{
  static const struct option opts[] = {
    TARGET_OPTIONS,
    { "output", required_argument, NULL, 'o' },
    { "help", no_argument, NULL, 'h' },
    { NULL, 0, NULL, 0 },
  };
  struct cli_target t = { 0 };
  struct events_out o = { .status = EXIT_OK };
  struct sigaction sa = { .sa_handler = on_signal }, old_int, old_term;
  const char *req[2] = { "events", NULL };
  bool one_disk;
  int c, r;

  while ((c = cli_next_option ("events", argc, argv, "c:s:d:h", opts)) != -1) {
    if (cli_target_option (&t, c, optarg))
      continue;
    switch (c) {
    case 'o': {
      enum cli_output out;
      if (cli_parse_output ("events", optarg, &out) != EXIT_OK)
        return EXIT_ERROR;
      o.json = out == CLI_OUTPUT_JSON;
      break;
    }
    case 'h': fputs (events_help, stdout); return cli_finish_output (EXIT_OK);
    default: return EXIT_ERROR;
    }
  }
  if (optind != argc)
    return cli_usage_error ("events", "unexpected argument '%s'",
                            argv[optind]);
  if (t.state)
    return cli_usage_error ("events", "events come from a running server: "
                            "give --control=SOCKET (or set "
                            "COWCHAIN_CONTROL), not --state");
  one_disk = t.disk != NULL;
  r = cli_target_done ("events", &t);
  if (r != EXIT_OK)
    return r;
  o.control = t.control;
  req[1] = t.disk;
  /* Interrupted: end quietly, exit 0 (no SA_RESTART: the wait returns). */
  sigemptyset (&sa.sa_mask);
  sigaction (SIGINT, &sa, &old_int);
  sigaction (SIGTERM, &sa, &old_term);
  /* A second's idle tick also catches a signal that came just before
   * the stream's wait began. */
  r = cow_control_stream (t.control, req, one_disk ? 2 : 1, cli_timeout_ms,
                          1000, print_event, &o);
  sigaction (SIGINT, &old_int, NULL);
  sigaction (SIGTERM, &old_term, NULL);
  if (r == -1) {
    cli_error ("%s", cow_last_error ());
    return cli_finish_output (EXIT_ERROR);
  }
  return cli_finish_output (o.status);
}
