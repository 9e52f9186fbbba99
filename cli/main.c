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

struct command {
  const char *name;
  const char *summary;
  const char *help;
  int (*run) (int argc, char **argv);
};

/* In the order `cowchain --help` lists them; each command declares its
 * cmd_* function and help text in cli.h. */
static const struct command commands[] = {
  { "info", "show an image's format, sizes and backing chain",
    info_help, cmd_info },
  { "check", "check a qcow2 image's consistency; repair leaks",
    check_help, cmd_check },
  { "snapshot", "freeze the active layer as a named snapshot, live",
    snapshot_help, cmd_snapshot },
  { "list", "list a disk's snapshots", list_help, cmd_list },
  { "revert", "return a disk to a snapshot", revert_help, cmd_revert },
  { "blklist", "each disk of a server and its active layer",
    blklist_help, cmd_blklist },
  { "status", "each disk of a server: active layer, base, depth",
    status_help, cmd_status },
  { "commit", "merge layers down into a lower one, in the background",
    commit_help, cmd_commit },
  { "pull", "copy lower layers up into the active one, in the background",
    pull_help, cmd_pull },
  { "delete", "delete a snapshot, merging its layer in the background",
    delete_help, cmd_delete },
  { "jobs", "the background job of each disk and its progress",
    jobs_help, cmd_jobs },
  { "wait", "wait for background jobs to end", wait_help, cmd_wait },
  { "pause", "pause a disk's background job", pause_help, cmd_pause },
  { "resume", "resume a disk's paused job", resume_help, cmd_resume },
  { "cancel", "cancel a disk's background job", cancel_help, cmd_cancel },
  { "speed", "change the speed limit of a disk's job", speed_help,
    cmd_speed },
  { "events", "print the events of a server's disks as they happen",
    events_help, cmd_events },
};

#define N_COMMANDS (sizeof commands / sizeof commands[0])

static void
main_help (FILE *f)
{
  fprintf (f,
           "Usage: cowchain [--timeout=SECONDS] COMMAND [OPTION]... [ARG]...\n"
           "       cowchain COMMAND --help\n"
           "       cowchain --help | --version\n"
           "Work with the qcow2 layers of cowchain disks.\n"
           "\n"
           "Commands:\n");
  for (size_t i = 0; i < N_COMMANDS; i++)
    fprintf (f, "  %-10s %s\n", commands[i].name, commands[i].summary);
  fprintf (f,
           "\n"
           "Exit status:\n"
           "  0  success\n"
           "  1  error: bad usage, an image that cannot be read, a check\n"
           "     that could not be completed, a job that failed or was\n"
           "     cancelled (wait, --wait, offline commit/pull/delete)\n"
           "  2  check: the image has errors (data may be corrupted)\n"
           "  3  check: the image leaks clusters, and has no errors\n"
           "\n"
           "Errors are reported on stderr, prefixed with 'cowchain: '.\n"
           "\n"
           "--timeout=SECONDS (before or after COMMAND; default\n"
           "$COWCHAIN_TIMEOUT, else %d; 0 = no limit) bounds each request\n"
           "to a running server: connecting, sending, and the whole reply.\n",
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

int
main (int argc, char **argv)
{
  const struct command *cmd;
  const char *name;

  /* Global options, before the command. */
  while (argc > 1 && strncmp (argv[1], "--timeout", 9) == 0
         && (argv[1][9] == '\0' || argv[1][9] == '=')) {
    const char *v = argv[1][9] == '=' ? argv[1] + 10 : argv[2];
    int shift = argv[1][9] == '=' ? 1 : 2;
    if (v == NULL) {
      cli_error ("option '--timeout' requires an argument");
      return EXIT_ERROR;
    }
    if (cli_timeout_set (NULL, v) != EXIT_OK)
      return EXIT_ERROR;
    argc -= shift;
    argv += shift;
  }
  if (argc < 2) {
    main_help (stderr);
    return EXIT_ERROR;
  }
  name = argv[1];
  if (strcmp (name, "--help") == 0 || strcmp (name, "-h") == 0
      || strcmp (name, "help") == 0) {
    if (argc > 2 && strcmp (name, "help") == 0) {
      cmd = find_command (argv[2]);
      if (cmd == NULL) {
        cli_error ("unknown command '%s'; try 'cowchain --help'", argv[2]);
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
  return cmd->run (argc - 1, argv + 1);
}
