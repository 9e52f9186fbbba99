/* SPDX-License-Identifier: BSD-3-Clause */
/* main() of the command line tool `cowchain`.  Each command is one entry
 * of the table below: a name, a one-line summary, its help text and the
 * function that runs it with its own argv (argv[0] = the command name),
 * so that a new command is one function plus one line there.
 *
 * Conventions of every command: errors go to stderr as "cowchain: ...";
 * output goes to stdout, as text or (--output=json) as JSON; the exit
 * status is one of the EXIT_* of cli.h (2 and 3 are those of qemu-img
 * check), documented in `cowchain --help`.  The helpers named cli_* are
 * shared by the commands' files (cli.h): output.c, target.c; the
 * commands live in cmd-image.c, cmd-chain.c and cmd-job.c. */
#include <config.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

/*----------------------------------------------------------------------
 * Dispatch.
 */

/* The global options a command does not take (struct command): given
 * before such a command, they are refused rather than ignored. */
#define NO_CONTROL 1u           /* --control (reads files only) */
#define NO_STATE 2u             /* --state (needs a running server) */
#define NO_OUTPUT 4u            /* --output=json (prints no data) */
#define NO_TIMEOUT 8u           /* --timeout (talks to no server) */

struct command {
  const char *name;
  const char *summary;
  const char *help;
  int (*run) (int argc, char **argv);
  unsigned no_globals;          /* NO_*; 0: takes all four */
};

/* In the order `cowchain --help` lists them; each command declares its
 * cmd_* function and help text in cli.h. */
static const struct command commands[] = {
  { "info", "show an image's format, sizes and backing chain",
    info_help, cmd_info, NO_STATE },
  { "check", "check a qcow2 image's consistency; repair leaks",
    check_help, cmd_check, NO_CONTROL | NO_STATE | NO_TIMEOUT },
  { "snapshot", "freeze the active layer as a named snapshot, live",
    snapshot_help, cmd_snapshot, NO_OUTPUT },
  { "list", "list a disk's snapshots", list_help, cmd_list, 0 },
  { "revert", "return a disk to a snapshot", revert_help, cmd_revert,
    NO_OUTPUT },
  { "blklist", "each disk of a server and its active layer",
    blklist_help, cmd_blklist, NO_STATE },
  { "status", "each disk of a server: active layer, base, depth",
    status_help, cmd_status, NO_STATE },
  { "commit", "merge layers down into a lower one, in the background",
    commit_help, cmd_commit, NO_OUTPUT },
  { "pull", "copy lower layers up into the active one, in the background",
    pull_help, cmd_pull, NO_OUTPUT },
  { "delete", "delete a snapshot, merging its layer in the background",
    delete_help, cmd_delete, NO_OUTPUT },
  { "jobs", "the background job of each disk and its progress",
    jobs_help, cmd_jobs, 0 },
  { "wait", "wait for background jobs to end", wait_help, cmd_wait,
    NO_OUTPUT },
  { "pause", "pause a disk's background job", pause_help, cmd_pause,
    NO_OUTPUT },
  { "resume", "resume a disk's paused job", resume_help, cmd_resume,
    NO_OUTPUT },
  { "cancel", "cancel a disk's background job", cancel_help, cmd_cancel,
    NO_OUTPUT },
  { "speed", "change the speed limit of a disk's job", speed_help,
    cmd_speed, NO_OUTPUT },
  { "events", "print the events of a server's disks as they happen",
    events_help, cmd_events, NO_STATE },
};

#define N_COMMANDS (sizeof commands / sizeof commands[0])

static void
main_help (FILE *f)
{
  fprintf (f,
           "Usage: cowchain [GLOBAL OPTION]... COMMAND [OPTION]... [ARG]...\n"
           "       cowchain COMMAND --help | cowchain help COMMAND\n"
           "       cowchain --help | --version\n"
           "Work with the qcow2 layers of cowchain disks: snapshots, merges\n"
           "and background jobs of a running server (through its control\n"
           "socket) or of a stopped disk (its state directory), and qcow2\n"
           "images (like qemu-img info and check).\n"
           "\n"
           "Commands:\n");
  for (size_t i = 0; i < N_COMMANDS; i++)
    fprintf (f, "  %-10s %s\n", commands[i].name, commands[i].summary);
  fprintf (f,
           "\n"
           "Global options (before COMMAND, as with virsh -c; the same as\n"
           "given after it, for each command that takes them):\n"
           "  -c, --control=SOCKET  a running server's control socket\n"
           "                        (default: $COWCHAIN_CONTROL)\n"
           "  -s, --state=DIR       a stopped disk's state directory\n"
           "      --output=FORMAT   text (default) or json\n"
           "      --timeout=SECONDS  bound on each request to a server:\n"
           "                        connecting, sending, the whole reply\n"
           "                        (default $COWCHAIN_TIMEOUT, else %d;\n"
           "                        0 = no limit)\n"
           "  -h, --help            show this help\n"
           "  -V, --version         show the version\n"
           "\n"
           "Exit status:\n"
           "  0  success\n"
           "  1  error: bad usage, an image that cannot be read, a check\n"
           "     that could not be completed, a job that failed or was\n"
           "     cancelled (wait, --wait, offline commit/pull/delete)\n"
           "  2  check: the image has errors (data may be corrupted)\n"
           "  3  check: the image leaks clusters, and has no errors\n"
           "Errors are reported on stderr, prefixed with 'cowchain: '.\n"
           "\n"
           "Example:\n"
           "  cowchain --control /run/vm1.ctl snapshot --disk vda before-upgrade\n"
           "  cowchain --control /run/vm1.ctl list --disk vda\n"
           "\n"
           "See cowchain(1) for every command.\n",
           CLI_DEFAULT_TIMEOUT);
}

static const struct command *
find_command (const char *name)
{
  for (size_t i = 0; i < N_COMMANDS; i++)
    if (strcmp (commands[i].name, name) == 0)
      return &commands[i];
  return NULL;
}

/* A global option given before the command: its long name, the NO_*
 * bit of commands that do not take it, and its value. */
struct global {
  const char *name;
  unsigned bit;
  const char *value;
};

/* Parse the global options at the front of argv (up to the command);
 * *used is how many words they took.  EXIT_OK, or EXIT_ERROR after
 * saying what is wrong. */
static int
parse_globals (int argc, char **argv, struct global *g, size_t ng, int *used)
{
  int i = 1;

  while (i < argc && argv[i][0] == '-' && argv[i][1] != '\0') {
    const char *a = argv[i], *v = NULL;
    size_t k, len;

    if (strcmp (a, "--") == 0) {
      i++;
      break;
    }
    if (strcmp (a, "-h") == 0 || strcmp (a, "--help") == 0
        || strcmp (a, "-V") == 0 || strcmp (a, "--version") == 0)
      break;                    /* main's own */
    /* -c S, -s D (the short forms of g[0] and g[1]) and --name[=]V. */
    if (strcmp (a, "-c") == 0)
      k = 0;
    else if (strcmp (a, "-s") == 0)
      k = 1;
    else {
      for (k = 0; k < ng; k++) {
        len = strlen (g[k].name);
        if (strncmp (a, "--", 2) == 0 && strncmp (a + 2, g[k].name, len) == 0
            && (a[2 + len] == '\0' || a[2 + len] == '='))
          break;
      }
      if (k == ng) {
        cli_error ("unrecognized option '%s' before the command; try "
                   "'cowchain --help'", a);
        return EXIT_ERROR;
      }
      if (a[2 + len] == '=')
        v = a + 3 + len;
    }
    if (v == NULL) {
      if (i + 1 >= argc) {
        cli_error ("option '--%s' requires a value", g[k].name);
        return EXIT_ERROR;
      }
      v = argv[++i];
    }
    if (g[k].value) {
      cli_error ("option '--%s' given twice before the command ('%s', then "
                 "'%s')", g[k].name, g[k].value, v);
      return EXIT_ERROR;
    }
    g[k].value = v;
    i++;
  }
  *used = i - 1;
  return EXIT_OK;
}

/* Why a global option does not apply to cmd. */
static int
refuse_global (const struct command *cmd, const struct global *g)
{
  const char *why =
    g->bit == NO_CONTROL ? "it reads image files, not a server"
    : g->bit == NO_STATE ? "it has no offline form on a state directory"
    : g->bit == NO_OUTPUT ? "it prints no data to format"
    : "it talks to no server";

  cli_error ("%s: the global option --%s=%s does not apply: %s; try "
             "'cowchain %s --help'", cmd->name, g->name, g->value, why,
             cmd->name);
  return EXIT_ERROR;
}

int
main (int argc, char **argv)
{
  struct global globals[] = {
    { "control", NO_CONTROL, NULL },
    { "state", NO_STATE, NULL },
    { "output", NO_OUTPUT, NULL },
    { "timeout", NO_TIMEOUT, NULL },
  };
  const size_t ng = sizeof globals / sizeof globals[0];
  const struct command *cmd;
  const char *name;
  char **args, *owned[4] = { NULL };
  int used, nargs, r;

  if (parse_globals (argc, argv, globals, ng, &used) != EXIT_OK)
    return EXIT_ERROR;
  if (used + 1 >= argc) {
    if (used > 0) {
      cli_error ("missing COMMAND after the global options; try "
                 "'cowchain --help'");
      return EXIT_ERROR;
    }
    main_help (stderr);
    return EXIT_ERROR;
  }
  name = argv[used + 1];
  if (strcmp (name, "--help") == 0 || strcmp (name, "-h") == 0
      || strcmp (name, "help") == 0) {
    if (used + 2 < argc && strcmp (name, "help") == 0) {
      if (used + 3 < argc) {
        cli_error ("help: unexpected argument '%s'; try 'cowchain help "
                   "COMMAND'", argv[used + 3]);
        return EXIT_ERROR;
      }
      cmd = find_command (argv[used + 2]);
      if (cmd == NULL) {
        cli_error ("unknown command '%s'; try 'cowchain --help'",
                   argv[used + 2]);
        return EXIT_ERROR;
      }
      fputs (cmd->help, stdout);
    }
    else
      main_help (stdout);
    return cli_finish_output (EXIT_OK);
  }
  if (strcmp (name, "--version") == 0 || strcmp (name, "-V") == 0) {
    printf ("cowchain %s\n", PACKAGE_VERSION);
    return cli_finish_output (EXIT_OK);
  }
  if (name[0] == '-') {
    cli_error ("unrecognized option '%s'; try 'cowchain --help'", name);
    return EXIT_ERROR;
  }
  cmd = find_command (name);
  if (cmd == NULL) {
    cli_error ("unknown command '%s'; try 'cowchain --help'", name);
    return EXIT_ERROR;
  }

  /* The command sees the global options as if given right after its
   * name, so each has one meaning wherever it is written, and one given
   * twice (before and after) is refused by the command's parser. */
  args = calloc ((size_t) argc + ng + 1, sizeof *args);
  if (args == NULL) {
    cli_error ("out of memory");
    return EXIT_ERROR;
  }
  nargs = 0;
  args[nargs++] = argv[used + 1];
  for (size_t k = 0; k < ng; k++) {
    char *opt;
    if (globals[k].value == NULL)
      continue;
    if (cmd->no_globals & globals[k].bit) {
      /* --output=text is what every command prints anyway. */
      if (globals[k].bit == NO_OUTPUT
          && (strcmp (globals[k].value, "text") == 0
              || strcmp (globals[k].value, "human") == 0))
        continue;
      for (size_t i = 0; i < ng; i++)
        free (owned[i]);
      free (args);
      return refuse_global (cmd, &globals[k]);
    }
    if (asprintf (&opt, "--%s=%s", globals[k].name, globals[k].value) == -1) {
      cli_error ("out of memory");
      for (size_t i = 0; i < ng; i++)
        free (owned[i]);
      free (args);
      return EXIT_ERROR;
    }
    owned[k] = opt;
    args[nargs++] = opt;
  }
  for (int i = used + 2; i < argc; i++)
    args[nargs++] = argv[i];
  args[nargs] = NULL;
  r = cmd->run (nargs, args);
  for (size_t i = 0; i < ng; i++)
    free (owned[i]);
  free (args);
  return r;
}
