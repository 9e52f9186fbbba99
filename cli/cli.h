/* SPDX-License-Identifier: BSD-3-Clause */
/* The shared pieces of the `cowchain` tool: output.c (messages, text,
 * sizes, --output, options, JSON), target.c (where a disk command finds
 * its disk), and the commands of cmd-image.c, cmd-chain.c and
 * cmd-job.c, which main.c dispatches.  The tool uses the engine only
 * through cowchain.h. */
#ifndef COWCHAIN_CLI_H
#define COWCHAIN_CLI_H

#include <getopt.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "cowchain.h"

#define EXIT_OK 0
#define EXIT_ERROR 1            /* error, bad usage, check not completed */
#define EXIT_CORRUPT 2          /* check: the image has errors */
#define EXIT_LEAKS 3            /* check: leaked clusters, nothing worse */

/*----------------------------------------------------------------------
 * output.c
 */

/* "cowchain: MESSAGE" on stderr, its control characters escaped. */
void cli_error (const char *fmt, ...) __attribute__ ((format (printf, 1, 2)));
/* A usage error of command cmd, with a pointer to its --help;
 * EXIT_ERROR. */
int cli_usage_error (const char *cmd, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));
/* Flush stdout and report a failed write (a full disk, a closed pipe):
 * status, or EXIT_ERROR. */
int cli_finish_output (int status);
/* getopt_long over a command's own argv, with our own error messages.
 * Returns the option, -1 at the end, or '?' after reporting an error. */
int cli_next_option (const char *cmd, int argc, char **argv,
                     const char *shortopts, const struct option *longopts);

/* --output=text|json of every command that has it ("human" is taken as
 * text). */
enum cli_output { CLI_OUTPUT_HUMAN, CLI_OUTPUT_JSON };
int cli_parse_output (const char *cmd, const char *arg, enum cli_output *out);

/* s made safe for a terminal (cow_text_printable: control characters
 * and invalid bytes escaped visibly).  The result lives until 16 more
 * calls; for text output only, never for JSON. */
const char *cli_text (const char *s);
/* A size like qemu-img prints it ("1.5 GiB"). */
void cli_human_size (uint64_t v, char *buf, size_t len);

/* The JSON writer.  Strings are quoted with control characters (C0,
 * DEL, C1) and U+2028/U+2029 escaped as \uNNNN, and a byte that is not
 * valid UTF-8 (a manifest or header written by something else) written
 * as U+FFFD, so the output is always valid JSON in valid UTF-8.
 * A container opened with cli_json_open has one element per line,
 * indented by indent spaces a level (qemu-img's layout: 4); one opened
 * with cli_json_open_inline has its elements on one line, separated by
 * ", ".  The outermost value ends with a newline. */
struct cli_json {
  FILE *f;
  unsigned indent;
  unsigned depth;
  bool need_comma;
  uint32_t inline_levels;       /* bit d: the container at depth d + 1 */
};
void cli_json_init (struct cli_json *j, FILE *f, unsigned indent);
void cli_json_open (struct cli_json *j, char c);         /* '{' or '[' */
void cli_json_open_inline (struct cli_json *j, char c);
void cli_json_close (struct cli_json *j, char c);        /* '}' or ']' */
/* Start the next element of an array (members start with a key). */
void cli_json_next (struct cli_json *j);
/* Start a member: its key; the value follows. */
void cli_json_key (struct cli_json *j, const char *key);
/* A string value. */
void cli_json_string (struct cli_json *j, const char *s);
/* Members. */
void cli_json_str (struct cli_json *j, const char *key, const char *v);
/* v, or null if v is NULL or "". */
void cli_json_str_or_null (struct cli_json *j, const char *key,
                           const char *v);
void cli_json_u64 (struct cli_json *j, const char *key, uint64_t v);
void cli_json_i64 (struct cli_json *j, const char *key, int64_t v);
void cli_json_bool (struct cli_json *j, const char *key, bool v);

/*----------------------------------------------------------------------
 * target.c
 */

struct cow_disk;

/* Where a disk command finds the disk. */
struct cli_target {
  const char *control;        /* online */
  const char *state;          /* offline */
  const char *disk;           /* online: export name; "" = default */
  const char *timeout;        /* online: --timeout as given, or NULL */
};

/* The value of --timeout, a long option only. */
#define CLI_OPT_TIMEOUT 0x100
/* Seconds each request to the server may take unless --timeout or
 * $COWCHAIN_TIMEOUT say otherwise. */
#define CLI_DEFAULT_TIMEOUT 60

#define TARGET_OPTIONS \
  { "control", required_argument, NULL, 'c' }, \
  { "state", required_argument, NULL, 's' }, \
  { "disk", required_argument, NULL, 'd' }, \
  { "timeout", required_argument, NULL, CLI_OPT_TIMEOUT }

/* Help texts share one layout: Usage, a description, "Options:",
 * "Exit status:", "Example:" (tests/test-cli-help.sh checks it). */
#define HELP_OPTIONS "\nOptions:\n"
#define HELP_HELP "  -h, --help            show this help\n"
#define HELP_EXIT_SIMPLE \
  "\n" \
  "Exit status:\n" \
  "  0  success\n" \
  "  1  error: bad usage, or the server or the disk refused (the message\n" \
  "     on stderr says why)\n"

#define TARGET_HELP \
  "  -c, --control=SOCKET  a running server's control socket (default:\n" \
  "                        $COWCHAIN_CONTROL)\n" \
  "  -s, --state=DIR       a stopped disk's state directory (offline)\n" \
  "  -d, --disk=NAME       which disk of the server (default: the default\n" \
  "                        export)\n" \
  "      --timeout=SECONDS  give up on the server after this long (default:\n" \
  "                        $COWCHAIN_TIMEOUT, else 60; 0 = wait forever)\n"

/* The time limit of each request to a server, in ms (0 = none); set by
 * cli_timeout_set, else at the first request. */
extern int cli_timeout_ms;
/* Set it from arg (--timeout of cmd; NULL cmd: given before the
 * command), or if arg is NULL and it is not set yet, from
 * $COWCHAIN_TIMEOUT or the default.  A usage error if the value is not
 * a whole number of seconds. */
int cli_timeout_set (const char *cmd, const char *arg);

/* 1 if c was one of TARGET_OPTIONS (recorded in t), else 0. */
int cli_target_option (struct cli_target *t, int c, const char *arg);
/* After the options: check them, take $COWCHAIN_CONTROL if neither
 * --control nor --state was given, default the disk to "". */
int cli_target_done (const char *cmd, struct cli_target *t);
/* Offline: open the disk of t->state, reporting any error. */
/* readonly: for commands that only read (shared lock, creates nothing). */
struct cow_disk *cli_open_offline (const struct cli_target *t, bool readonly);
/* Close it; status, or EXIT_ERROR if closing failed. */
int cli_close_offline (struct cow_disk *d, int status);
/* Online: one request of argc words (at most CLI_MAX_WORDS) to the
 * server, the payload in *reply (free with cow_control_free_reply);
 * errors reported. */
#define CLI_MAX_WORDS 16
int cli_ask (const struct cli_target *t, struct cow_control_reply *reply,
             int argc, ...);

/*----------------------------------------------------------------------
 * The commands: cmd-image.c, cmd-chain.c, cmd-job.c.
 */

extern const char info_help[], check_help[];
int cmd_info (int argc, char **argv);
int cmd_check (int argc, char **argv);

/* The active layer of a disk of a running server (cmd-chain.c, for info
 * --disk). */
char *cli_active_layer (const char *control, const char *disk);

extern const char snapshot_help[], list_help[], revert_help[],
  blklist_help[], status_help[];
int cmd_snapshot (int argc, char **argv);
int cmd_list (int argc, char **argv);
int cmd_revert (int argc, char **argv);
int cmd_blklist (int argc, char **argv);
int cmd_status (int argc, char **argv);

extern const char commit_help[], pull_help[], delete_help[], jobs_help[],
  wait_help[], pause_help[], resume_help[], cancel_help[], speed_help[];
int cmd_commit (int argc, char **argv);
int cmd_pull (int argc, char **argv);
int cmd_delete (int argc, char **argv);
int cmd_jobs (int argc, char **argv);
int cmd_wait (int argc, char **argv);
int cmd_pause (int argc, char **argv);
int cmd_resume (int argc, char **argv);
int cmd_cancel (int argc, char **argv);
int cmd_speed (int argc, char **argv);

/* cmd-events.c */
extern const char events_help[];
int cmd_events (int argc, char **argv);

#endif /* COWCHAIN_CLI_H */
