/* SPDX-License-Identifier: BSD-3-Clause */
/* The chain commands of `cowchain`: snapshot, list, revert, blklist,
 * status.  Online they talk to a running server through its control
 * socket; offline (--state DIR) they open the disk's state directory
 * themselves (target.c). */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "cowchain.h"

/*----------------------------------------------------------------------
 * snapshot
 */

const char snapshot_help[] =
  "Usage: cowchain snapshot [OPTION]... NAME\n"
  "Freeze the disk's active layer as snapshot NAME and go on writing in a\n"
  "new layer (a live external snapshot, like virsh snapshot-create-as\n"
  "--disk-only).  NAME: 1 to 128 letters, digits and . _ - + : @, not\n"
  "starting with . or -; not active, base or layer-* (any case), which\n"
  "name layers.  TEXT: printable UTF-8, at most 1024 bytes, no control\n"
  "characters (no tab or newline).  The guest's I/O pauses only for the\n"
  "switch (the time is printed).\n"
  HELP_OPTIONS
  TARGET_HELP
  "  -a, --atomic          all disks of the server at one consistent cut\n"
  "  -D, --description=TEXT  a description to keep with the snapshot\n"
  HELP_HELP
  HELP_EXIT_SIMPLE
  "\n"
  "Example:\n"
  "  cowchain --control /run/vm1.ctl snapshot --disk vda before-upgrade \\\n"
  "      --description \"kernel 6.1\"\n"
  "  cowchain --control /run/vm1.ctl snapshot --atomic nightly\n";

int
cmd_snapshot (int argc, char **argv)
{
  static const struct option opts[] = {
    TARGET_OPTIONS,
    { "atomic", no_argument, NULL, 'a' },
    { "description", required_argument, NULL, 'D' },
    { "help", no_argument, NULL, 'h' },
    { NULL, 0, NULL, 0 },
  };
  struct cli_target t = { 0 };
  const char *desc = "", *name;
  bool atomic = false;
  struct cow_control_reply reply;
  int c, r;

  while ((c = cli_next_option ("snapshot", argc, argv, "c:s:d:aD:h", opts)) != -1) {
    if (cli_target_option (&t, c, optarg))
      continue;
    switch (c) {
    case 'a': atomic = true; break;
    case 'D': desc = optarg; break;
    case 'h': fputs (snapshot_help, stdout); return cli_finish_output (EXIT_OK);
    default: return EXIT_ERROR;
    }
  }
  if (optind + 1 != argc)
    return cli_usage_error ("snapshot", optind >= argc ? "missing NAME"
                            : "unexpected argument '%s'", argv[optind + 1]);
  name = argv[optind];
  if (atomic && t.disk)
    return cli_usage_error ("snapshot", "--atomic covers every disk; leave "
                            "out --disk");
  r = cli_target_done ("snapshot", &t);
  if (r != EXIT_OK)
    return r;
  if (t.state) {
    struct cow_disk *d = cli_open_offline (&t, false);
    if (d == NULL)
      return EXIT_ERROR;
    if (cow_disk_snapshot (d, name, desc) == -1) {
      cli_error ("%s", cow_last_error ());
      return cli_close_offline (d, EXIT_ERROR);
    }
    r = cli_close_offline (d, EXIT_OK);
    if (r == EXIT_OK)
      printf ("Snapshot %s created\n", cli_text (name));
    return cli_finish_output (r);
  }
  r = atomic ? cli_ask (&t, &reply, 3, "snapshot-atomic", name, desc)
    : cli_ask (&t, &reply, 4, "snapshot", t.disk, name, desc);
  if (r != EXIT_OK)
    return r;
  printf ("Snapshot %s created", cli_text (name));
  for (size_t i = 0; i < reply.n; i++) {
    const struct cow_control_line *l = &reply.lines[i];
    unsigned long long ns;
    if (l->n >= 2 && strcmp (l->words[0], "pause-ns") == 0
        && sscanf (l->words[1], "%llu", &ns) == 1)
      printf (" (guest I/O paused %.3f ms)", ns / 1e6);
  }
  printf ("\n");
  cow_control_free_reply (&reply);
  return cli_finish_output (EXIT_OK);
}

/*----------------------------------------------------------------------
 * list
 */

struct layer_row {
  char *path, *snapshot, *description;
  int64_t created;
  bool active;
};

static void
free_rows (struct layer_row *v, size_t n)
{
  for (size_t i = 0; i < n; i++) {
    free (v[i].path);
    free (v[i].snapshot);
    free (v[i].description);
  }
  free (v);
}

/* The disk's layers, bottom to top, online or offline. */
static int
get_layers (const struct cli_target *t, struct layer_row **out, size_t *n)
{
  struct layer_row *v = NULL;
  size_t k = 0;

  *out = NULL;
  *n = 0;
  if (t->state) {
    struct cow_disk *d = cli_open_offline (t, true);
    struct cow_layer_info *li;
    size_t m;
    int r;
    if (d == NULL)
      return EXIT_ERROR;
    r = cow_disk_layers (d, &li, &m);
    if (r == -1) {
      cli_error ("%s", cow_last_error ());
      return cli_close_offline (d, EXIT_ERROR);
    }
    v = calloc (m, sizeof *v);
    for (size_t i = 0; v && i < m; i++) {
      v[i].path = li[i].path;
      v[i].snapshot = li[i].snapshot;
      v[i].description = li[i].description;
      v[i].created = li[i].created;
      v[i].active = li[i].active;
      li[i].path = li[i].snapshot = li[i].description = NULL;
    }
    cow_layer_info_free (li, m);
    if (v == NULL) {
      cli_error ("out of memory");
      return cli_close_offline (d, EXIT_ERROR);
    }
    *out = v;
    *n = m;
    return cli_close_offline (d, EXIT_OK);
  }
  else {
    struct cow_control_reply reply;
    if (cli_ask (t, &reply, 2, "list", t->disk) != EXIT_OK)
      return EXIT_ERROR;
    v = calloc (reply.n ? reply.n : 1, sizeof *v);
    for (size_t i = 0; v && i < reply.n; i++) {
      char **w = reply.lines[i].words;
      if (reply.lines[i].n != 6 || strcmp (w[0], "layer") != 0)
        continue;
      v[k].path = strdup (w[1]);
      v[k].created = strtoll (w[2], NULL, 10);
      v[k].snapshot = w[3][0] ? strdup (w[3]) : NULL;
      v[k].description = w[4][0] ? strdup (w[4]) : NULL;
      v[k].active = strcmp (w[5], "active") == 0;
      k++;
    }
    cow_control_free_reply (&reply);
    if (v == NULL) {
      cli_error ("out of memory");
      return EXIT_ERROR;
    }
    *out = v;
    *n = k;
    return EXIT_OK;
  }
}

/* A snapshot's name in the text list: one that an older version let
 * take a reserved word also shows the layer file name that reaches it
 * (commit, delete and revert read the word in its reserved meaning). */
static const char *
list_name (const struct layer_row *r)
{
  static char buf[COW_NAME_MAX + 64];
  const char *file = strrchr (r->path, '/');

  if (!cow_snapshot_name_reserved (r->snapshot))
    return cli_text (r->snapshot);
  snprintf (buf, sizeof buf, "%s (%s)", r->snapshot, file ? file + 1 : r->path);
  return cli_text (buf);
}

static void
format_time (int64_t t, char *buf, size_t len)
{
  time_t tt = (time_t) t;
  struct tm tm;

  gmtime_r (&tt, &tm);
  strftime (buf, len, "%Y-%m-%d %H:%M:%S +0000", &tm);
}

const char list_help[] =
  "Usage: cowchain list [OPTION]...\n"
  "List the disk's snapshots, oldest first (like virsh snapshot-list).\n"
  "JSON: {\"version\": 1, \"snapshots\": [{\"name\", \"creation-time\",\n"
  "\"state\", \"description\", \"file\", \"parent\"}]}, oldest first.\n"
  HELP_OPTIONS
  TARGET_HELP
  "      --tree            show them as a tree, the current state last\n"
  "      --output=FORMAT   text (default) or json\n"
  HELP_HELP
  HELP_EXIT_SIMPLE
  "\n"
  "Example:\n"
  "  cowchain --control /run/vm1.ctl list --disk vda --tree\n"
  "  cowchain list --state /var/lib/cowchain/vm1-vda --output=json\n";

int
cmd_list (int argc, char **argv)
{
  static const struct option opts[] = {
    TARGET_OPTIONS,
    { "tree", no_argument, NULL, 't' },
    { "output", required_argument, NULL, 'o' },
    { "help", no_argument, NULL, 'h' },
    { NULL, 0, NULL, 0 },
  };
  struct cli_target t = { 0 };
  struct layer_row *v;
  enum cli_output output = CLI_OUTPUT_HUMAN;
  bool tree = false;
  const char *parent = NULL;
  size_t n, depth = 0;
  int c, r;

  while ((c = cli_next_option ("list", argc, argv, "c:s:d:h", opts)) != -1) {
    if (cli_target_option (&t, c, optarg))
      continue;
    switch (c) {
    case 't': tree = true; break;
    case 'o':
      if ((r = cli_parse_output ("list", optarg, &output)) != EXIT_OK)
        return r;
      break;
    case 'h': fputs (list_help, stdout); return cli_finish_output (EXIT_OK);
    default: return EXIT_ERROR;
    }
  }
  if (optind != argc)
    return cli_usage_error ("list", "unexpected argument '%s'", argv[optind]);
  r = cli_target_done ("list", &t);
  if (r != EXIT_OK)
    return r;
  if (get_layers (&t, &v, &n) != EXIT_OK)
    return EXIT_ERROR;

  if (output == CLI_OUTPUT_JSON) {
    struct cli_json j;
    cli_json_init (&j, stdout, 2);
    cli_json_open (&j, '{');
    cli_json_u64 (&j, "version", 1);
    cli_json_key (&j, "snapshots");
    cli_json_open (&j, '[');
    for (size_t i = 0; i < n; i++) {
      if (!v[i].snapshot)
        continue;
      cli_json_next (&j);
      cli_json_open_inline (&j, '{');
      cli_json_str (&j, "name", v[i].snapshot);
      cli_json_i64 (&j, "creation-time", v[i].created);
      cli_json_str (&j, "state", "disk-snapshot");
      cli_json_str (&j, "description",
                    v[i].description ? v[i].description : "");
      cli_json_str (&j, "file", v[i].path);
      cli_json_str_or_null (&j, "parent", parent);
      cli_json_close (&j, '}');
      parent = v[i].snapshot;
    }
    cli_json_close (&j, ']');
    cli_json_close (&j, '}');
  }
  else if (tree) {
    for (size_t i = 0; i < n; i++) {
      const char *label = v[i].snapshot ? v[i].snapshot
        : v[i].active ? "(current)" : NULL;
      if (label == NULL)
        continue;
      if (depth == 0)
        printf ("%s\n", cli_text (label));
      else {
        printf ("%*s|\n%*s+- %s\n", (int) (depth * 4 - 2), "",
                (int) (depth * 4 - 2), "", cli_text (label));
      }
      depth++;
    }
  }
  else {
    printf (" %-20s %-27s %-15s %s\n", "Name", "Creation Time", "State",
            "Description");
    printf ("-------------------------------------------------------------"
            "-----------------\n");
    for (size_t i = 0; i < n; i++) {
      char when[64];
      if (!v[i].snapshot)
        continue;
      format_time (v[i].created, when, sizeof when);
      printf (" %-20s %-27s %-15s %s\n", list_name (&v[i]), when,
              "disk-snapshot", cli_text (v[i].description));
    }
  }
  free_rows (v, n);
  return cli_finish_output (EXIT_OK);
}

/*----------------------------------------------------------------------
 * revert
 */

const char revert_help[] =
  "Usage: cowchain revert [OPTION]... NAME\n"
  "Return the disk to snapshot NAME: the layers written since are\n"
  "discarded and a new empty layer is stacked on the snapshot.  NAME is a\n"
  "snapshot name, or the layer file name of a snapshot's layer.  Refused\n"
  "while NBD clients are connected to the disk (what they cached would no\n"
  "longer be on it) and when later snapshots would be deleted, unless\n"
  "--force.\n"
  HELP_OPTIONS
  TARGET_HELP
  "  -f, --force           also then: delete later snapshots, change the\n"
  "                        disk under connected clients\n"
  HELP_HELP
  HELP_EXIT_SIMPLE
  "\n"
  "Example:\n"
  "  cowchain --control /run/vm1.ctl revert --disk vda before-upgrade\n";

int
cmd_revert (int argc, char **argv)
{
  static const struct option opts[] = {
    TARGET_OPTIONS,
    { "force", no_argument, NULL, 'f' },
    { "help", no_argument, NULL, 'h' },
    { NULL, 0, NULL, 0 },
  };
  struct cli_target t = { 0 };
  bool force = false;
  struct cow_control_reply reply;
  int c, r;

  while ((c = cli_next_option ("revert", argc, argv, "c:s:d:fh", opts)) != -1) {
    if (cli_target_option (&t, c, optarg))
      continue;
    switch (c) {
    case 'f': force = true; break;
    case 'h': fputs (revert_help, stdout); return cli_finish_output (EXIT_OK);
    default: return EXIT_ERROR;
    }
  }
  if (optind + 1 != argc)
    return cli_usage_error ("revert", optind >= argc ? "missing NAME"
                            : "unexpected argument '%s'", argv[optind + 1]);
  r = cli_target_done ("revert", &t);
  if (r != EXIT_OK)
    return r;
  if (t.state) {
    struct cow_disk *d = cli_open_offline (&t, false);
    if (d == NULL)
      return EXIT_ERROR;
    if (cow_disk_revert (d, argv[optind], force) == -1) {
      cli_error ("%s", cow_last_error ());
      return cli_close_offline (d, EXIT_ERROR);
    }
    r = cli_close_offline (d, EXIT_OK);
  }
  else {
    r = cli_ask (&t, &reply, 4, "revert", t.disk, argv[optind],
                 force ? "force" : "");
    if (r == EXIT_OK)
      cow_control_free_reply (&reply);
  }
  if (r == EXIT_OK)
    printf ("Reverted to snapshot %s\n", cli_text (argv[optind]));
  return cli_finish_output (r);
}

/*----------------------------------------------------------------------
 * blklist, status
 */

#define SERVER_HELP \
  "  -c, --control=SOCKET  the server's control socket (default:\n" \
  "                        $COWCHAIN_CONTROL)\n" \
  "      --timeout=SECONDS  give up on the server after this long (default:\n" \
  "                        $COWCHAIN_TIMEOUT, else 60; 0 = wait forever)\n" \
  "      --output=FORMAT   text (default) or json\n"

const char blklist_help[] =
  "Usage: cowchain blklist [OPTION]...\n"
  "Each disk (NBD export) of a running server and its active layer file,\n"
  "like virsh domblklist.\n"
  "JSON: {\"version\": 1, \"disks\": [{\"name\", \"source\"}]}; the unnamed\n"
  "disk of a server without disk= is \"\".\n"
  HELP_OPTIONS
  SERVER_HELP
  "      --details         also the type and device columns\n"
  HELP_HELP
  HELP_EXIT_SIMPLE
  "\n"
  "Example:\n"
  "  cowchain --control /run/vm1.ctl blklist --details\n";

const char status_help[] =
  "Usage: cowchain status [OPTION]...\n"
  "Each disk of a running server: chain depth, state, the NBD clients\n"
  "connected, active layer, base.\n"
  "State is ok, or degraded (with the reason on the next line) when a\n"
  "chain change could not be recorded: FLUSH then fails until a retry\n"
  "succeeds.\n"
  "JSON: {\"version\": 1, \"disks\": [{\"name\", \"layers\", \"state\",\n"
  "\"reason\", \"clients\", \"active\", \"base\"}]}.\n"
  HELP_OPTIONS
  SERVER_HELP
  HELP_HELP
  "\n"
  "Exit status:\n"
  "  0  every disk is ok\n"
  "  1  a disk is degraded, or error (bad usage, no server)\n"
  "\n"
  "Example:\n"
  "  cowchain --control /run/vm1.ctl status\n";

/* One disk of a status or blklist reply. */
struct disk_row {
  const char *name, *active, *base, *layers, *state, *reason, *clients;
};

static void
print_disks_json (const struct disk_row *v, size_t n, bool status,
                  char **memory)
{
  struct cli_json j;

  cli_json_init (&j, stdout, 2);
  cli_json_open (&j, '{');
  cli_json_u64 (&j, "version", 1);
  cli_json_key (&j, "disks");
  cli_json_open (&j, '[');
  for (size_t i = 0; i < n; i++) {
    cli_json_next (&j);
    cli_json_open_inline (&j, '{');
    cli_json_str (&j, "name", v[i].name);
    if (status) {
      cli_json_u64 (&j, "layers", strtoull (v[i].layers, NULL, 10));
      cli_json_str (&j, "state", v[i].state);
      cli_json_str_or_null (&j, "reason", v[i].reason);
      if (strcmp (v[i].clients, "-") == 0)
        cli_json_str_or_null (&j, "clients", NULL);
      else
        cli_json_u64 (&j, "clients", strtoull (v[i].clients, NULL, 10));
      cli_json_str (&j, "active", v[i].active);
      cli_json_str_or_null (&j, "base", v[i].base);
    }
    else
      cli_json_str (&j, "source", v[i].active);
    cli_json_close (&j, '}');
  }
  cli_json_close (&j, ']');
  if (memory) {
    /* "memory BUDGET USED PEAK MAPBYTES" */
    cli_json_key (&j, "memory");
    cli_json_open_inline (&j, '{');
    cli_json_u64 (&j, "cache-budget", strtoull (memory[1], NULL, 10));
    cli_json_u64 (&j, "cache-used", strtoull (memory[2], NULL, 10));
    cli_json_u64 (&j, "cache-peak", strtoull (memory[3], NULL, 10));
    cli_json_u64 (&j, "map-bytes", strtoull (memory[4], NULL, 10));
    cli_json_close (&j, '}');
  }
  cli_json_close (&j, '}');
}

static int
disks_command (const char *cmd, int argc, char **argv, const char *help)
{
  static const struct option opts[] = {
    { "control", required_argument, NULL, 'c' },
    { "timeout", required_argument, NULL, CLI_OPT_TIMEOUT },
    { "details", no_argument, NULL, 'D' },
    { "output", required_argument, NULL, 'o' },
    { "help", no_argument, NULL, 'h' },
    { NULL, 0, NULL, 0 },
  };
  struct cli_target t = { 0 };
  bool details = false, status = strcmp (cmd, "status") == 0;
  bool degraded = false;
  enum cli_output output = CLI_OUTPUT_HUMAN;
  struct cow_control_reply reply;
  struct disk_row *rows;
  const char *clients = "-";
  char **memory = NULL;         /* status: the "memory" line's words */
  size_t n = 0;
  int c, r;

  while ((c = cli_next_option (cmd, argc, argv, "c:h", opts)) != -1) {
    switch (c) {
    case 'c': t.control = optarg; break;
    case CLI_OPT_TIMEOUT: t.timeout = optarg; break;
    case 'D':
      if (status)
        return cli_usage_error (cmd, "unrecognized option '--details'");
      details = true;
      break;
    case 'o':
      if ((r = cli_parse_output (cmd, optarg, &output)) != EXIT_OK)
        return r;
      break;
    case 'h': fputs (help, stdout); return cli_finish_output (EXIT_OK);
    default: return EXIT_ERROR;
    }
  }
  if (optind != argc)
    return cli_usage_error (cmd, "unexpected argument '%s'", argv[optind]);
  if (details && output == CLI_OUTPUT_JSON)
    return cli_usage_error (cmd, "--details is for text output (the JSON "
                            "has every field)");
  if ((r = cli_target_done (cmd, &t)) != EXIT_OK)
    return r;
  r = cli_ask (&t, &reply, 1, status ? "status" : "blklist");
  if (r != EXIT_OK)
    return r;
  rows = calloc (reply.n ? reply.n : 1, sizeof *rows);
  if (rows == NULL) {
    cow_control_free_reply (&reply);
    cli_error ("out of memory");
    return EXIT_ERROR;
  }
  for (size_t i = 0; i < reply.n; i++) {
    char **w = reply.lines[i].words;
    /* Lines of more than 7 words are not ours to read. */
    int k = reply.lines[i].n > 7 ? -1 : reply.lines[i].n;
    /* "clients NAME N" comes before its disk's line (an older server
     * sends none: "-"). */
    if (k == 3 && strcmp (w[0], "clients") == 0) {
      clients = w[2];
      continue;
    }
    if (status && k == 5 && strcmp (w[0], "memory") == 0) {
      memory = w;
      continue;
    }
    if (k < 3 || strcmp (w[0], "disk") != 0 || (status && k != 7))
      continue;
    rows[n].name = w[1];
    rows[n].active = w[2];
    rows[n].clients = clients;
    if (status) {
      rows[n].base = w[3];
      rows[n].layers = w[4];
      rows[n].state = w[5];
      rows[n].reason = w[6];
      degraded = degraded || strcmp (w[5], "ok") != 0;
    }
    clients = "-";
    n++;
  }

  if (output == CLI_OUTPUT_JSON)
    print_disks_json (rows, n, status, memory);
  else {
    if (status)
      printf (" %-10s %-6s %-8s %-7s %-45s %s\n", "Disk", "Layers", "State",
              "Clients", "Active layer", "Base");
    else if (details)
      printf (" %-8s %-8s %-10s %s\n", "Type", "Device", "Target", "Source");
    else
      printf (" %-10s %s\n", "Target", "Source");
    /* As wide as the header (the paths after it vary). */
    printf ("%s\n", status ? "-------------------------------------------"
            "-------------------------------------------"
            : "------------------------------------------------------------");
    for (size_t i = 0; i < n; i++) {
      const struct disk_row *d = &rows[i];
      const char *name = d->name[0] ? cli_text (d->name) : "(default)";
      if (status) {
        printf (" %-10s %-6s %-8s %-7s %-45s %s\n", name,
                cli_text (d->layers), cli_text (d->state),
                cli_text (d->clients), cli_text (d->active),
                d->base[0] ? cli_text (d->base) : "(none: self-contained)");
        if (strcmp (d->state, "ok") != 0)
          printf ("   %s: %s\n", name, cli_text (d->reason));
      }
      else if (details)
        printf (" %-8s %-8s %-10s %s\n", "file", "disk", name,
                cli_text (d->active));
      else
        printf (" %-10s %s\n", name, cli_text (d->active));
    }
    if (memory)
      printf ("metadata cache: %s of %s bytes (peak %s); merged maps: %s "
              "bytes\n", cli_text (memory[2]), cli_text (memory[1]),
              cli_text (memory[3]), cli_text (memory[4]));
  }
  free (rows);
  cow_control_free_reply (&reply);
  /* Like a failed check: scripts see a degraded disk in the status. */
  return cli_finish_output (degraded ? EXIT_ERROR : EXIT_OK);
}

int
cmd_blklist (int argc, char **argv)
{
  return disks_command ("blklist", argc, argv, blklist_help);
}

int
cmd_status (int argc, char **argv)
{
  return disks_command ("status", argc, argv, status_help);
}

char *
cli_active_layer (const char *control, const char *disk)
{
  struct cli_target t = { .control = control, .disk = disk ? disk : "" };
  struct layer_row *v;
  size_t n;
  char *p = NULL;

  if (get_layers (&t, &v, &n) != EXIT_OK)
    return NULL;
  for (size_t i = 0; i < n; i++)
    if (v[i].active)
      p = strdup (v[i].path);
  free_rows (v, n);
  if (p == NULL)
    cli_error ("the server reported no active layer");
  return p;
}
