/* The chain commands of `cowchain`: snapshot, list, revert, blklist,
 * status, and how every disk command finds its disk (cli_target_*).
 * Online they talk to a running server through its control socket
 * (--control PATH or COWCHAIN_CONTROL); offline (--state DIR) they open
 * the disk's state directory themselves, which the directory's lock
 * refuses while a server holds it. */
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
#include "control.h"
#include "cowchain.h"
#include "manifest.h"

/*----------------------------------------------------------------------
 * Finding the disk (cli.h).
 */

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

int
cli_target_done (const char *cmd, struct cli_target *t)
{
  if (t->control && t->state)
    return cli_usage_error (cmd, "give --control or --state, not both");
  if (!t->control && !t->state)
    t->control = getenv ("COWCHAIN_CONTROL");
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
cli_ask (const struct cli_target *t, char ***out, int argc, ...)
{
  const char *argv[CONTROL_MAX_WORDS];
  va_list ap;

  va_start (ap, argc);
  for (int i = 0; i < argc; i++)
    argv[i] = va_arg (ap, const char *);
  va_end (ap);
  if (cli_timeout_set (NULL, NULL) != EXIT_OK)
    return EXIT_ERROR;
  if (control_request (t->control, argv, argc, cli_timeout_ms, out) == -1) {
    cli_error ("%s", cow_last_error ());
    return EXIT_ERROR;
  }
  return EXIT_OK;
}

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
  "characters (no tab or newline).\n"
  "\n"
  TARGET_HELP
  "  -a, --atomic          all disks of the server at one consistent cut\n"
  "  -D, --description=TEXT  a description to keep with the snapshot\n";

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
  char **lines = NULL;
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
  r = atomic ? cli_ask (&t, &lines, 3, "snapshot-atomic", name, desc)
    : cli_ask (&t, &lines, 4, "snapshot", t.disk, name, desc);
  if (r != EXIT_OK)
    return r;
  printf ("Snapshot %s created", cli_text (name));
  for (char **l = lines; *l; l++) {
    unsigned long long ns;
    if (sscanf (*l, "pause-ns %llu", &ns) == 1)
      printf (" (guest I/O paused %.3f ms)", ns / 1e6);
  }
  printf ("\n");
  control_free_lines (lines);
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
    char **lines;
    if (cli_ask (t, &lines, 2, "list", t->disk) != EXIT_OK)
      return EXIT_ERROR;
    for (char **l = lines; *l; l++)
      k++;
    v = calloc (k ? k : 1, sizeof *v);
    k = 0;
    for (char **l = lines; v && *l; l++) {
      char *w[6];
      if (control_split (*l, w, 6) != 6 || strcmp (w[0], "layer") != 0)
        continue;
      v[k].path = strdup (w[1]);
      v[k].created = strtoll (w[2], NULL, 10);
      v[k].snapshot = w[3][0] ? strdup (w[3]) : NULL;
      v[k].description = w[4][0] ? strdup (w[4]) : NULL;
      v[k].active = strcmp (w[5], "active") == 0;
      k++;
    }
    control_free_lines (lines);
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

  if (!manifest_name_reserved (r->snapshot))
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
  "\n"
  TARGET_HELP
  "      --tree            show them as a tree, the current state last\n"
  "      --output=FORMAT   human (default) or json\n";

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
  bool tree = false, json = false;
  const char *parent = NULL;
  size_t n, depth = 0;
  int c, r;

  while ((c = cli_next_option ("list", argc, argv, "c:s:d:h", opts)) != -1) {
    if (cli_target_option (&t, c, optarg))
      continue;
    switch (c) {
    case 't': tree = true; break;
    case 'o':
      if (strcmp (optarg, "json") == 0)
        json = true;
      else if (strcmp (optarg, "human") != 0)
        return cli_usage_error ("list", "--output must be 'human' or "
                                "'json', not '%s'", optarg);
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

  if (json) {
    bool first = true;
    printf ("[");
    for (size_t i = 0; i < n; i++) {
      if (!v[i].snapshot)
        continue;
      printf ("%s\n  {\"name\": ", first ? "" : ",");
      cli_json_string (stdout, v[i].snapshot);
      printf (", \"creation-time\": %" PRId64 ", \"state\": \"disk-snapshot\""
              ", \"description\": ", v[i].created);
      cli_json_string (stdout, v[i].description ? v[i].description : "");
      printf (", \"file\": ");
      cli_json_string (stdout, v[i].path);
      printf (", \"parent\": ");
      if (parent)
        cli_json_string (stdout, parent);
      else
        printf ("null");
      printf ("}");
      parent = v[i].snapshot;
      first = false;
    }
    printf ("%s]\n", first ? "" : "\n");
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
  "\n"
  TARGET_HELP
  "  -f, --force           also then: delete later snapshots, change the\n"
  "                        disk under connected clients\n";

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
  char **lines;
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
    r = cli_ask (&t, &lines, 4, "revert", t.disk, argv[optind],
                 force ? "force" : "");
    if (r == EXIT_OK)
      control_free_lines (lines);
  }
  if (r == EXIT_OK)
    printf ("Reverted to snapshot %s\n", cli_text (argv[optind]));
  return cli_finish_output (r);
}

/*----------------------------------------------------------------------
 * blklist, status
 */

const char blklist_help[] =
  "Usage: cowchain blklist [OPTION]...\n"
  "Each disk (NBD export) of a running server and its active layer file,\n"
  "like virsh domblklist.\n"
  "\n"
  "  -c, --control=SOCKET  the server's control socket (default:\n"
  "                        $COWCHAIN_CONTROL)\n"
  "      --timeout=SECONDS  give up on the server after this long (default:\n"
  "                        $COWCHAIN_TIMEOUT, else 60; 0 = wait forever)\n"
  "      --details         also the type and device columns\n";

const char status_help[] =
  "Usage: cowchain status [OPTION]...\n"
  "Each disk of a running server: chain depth, state, the NBD clients\n"
  "connected, active layer, base.\n"
  "State is ok, or degraded (with the reason on the next line) when a\n"
  "chain change could not be recorded: FLUSH then fails until a retry\n"
  "succeeds.  Exits 1 if any disk is degraded.\n"
  "\n"
  "  -c, --control=SOCKET  the server's control socket (default:\n"
  "                        $COWCHAIN_CONTROL)\n"
  "      --timeout=SECONDS  give up on the server after this long (default:\n"
  "                        $COWCHAIN_TIMEOUT, else 60; 0 = wait forever)\n";

static int
disks_command (const char *cmd, int argc, char **argv, const char *help)
{
  static const struct option opts[] = {
    { "control", required_argument, NULL, 'c' },
    { "timeout", required_argument, NULL, CLI_OPT_TIMEOUT },
    { "details", no_argument, NULL, 'D' },
    { "help", no_argument, NULL, 'h' },
    { NULL, 0, NULL, 0 },
  };
  struct cli_target t = { 0 };
  bool details = false, status = strcmp (cmd, "status") == 0;
  bool degraded = false;
  char **lines, clients[16] = "-";
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
    case 'h': fputs (help, stdout); return cli_finish_output (EXIT_OK);
    default: return EXIT_ERROR;
    }
  }
  if (optind != argc)
    return cli_usage_error (cmd, "unexpected argument '%s'", argv[optind]);
  if (!t.control)
    t.control = getenv ("COWCHAIN_CONTROL");
  if (!t.control)
    return cli_usage_error (cmd, "give --control=SOCKET (or set "
                            "COWCHAIN_CONTROL)");
  if ((r = cli_timeout_set (cmd, t.timeout)) != EXIT_OK)
    return r;
  r = cli_ask (&t, &lines, 1, status ? "status" : "blklist");
  if (r != EXIT_OK)
    return r;
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
  for (char **l = lines; *l; l++) {
    char *w[7];
    int k = control_split (*l, w, 7);
    const char *name;
    /* "clients NAME N" comes before its disk's line (an older server
     * sends none: "-"). */
    if (k == 3 && strcmp (w[0], "clients") == 0) {
      snprintf (clients, sizeof clients, "%.15s", w[2]);
      continue;
    }
    if (k < 3 || strcmp (w[0], "disk") != 0)
      continue;
    name = w[1][0] ? cli_text (w[1]) : "(default)";
    if (status && k == 7) {
      printf (" %-10s %-6s %-8s %-7s %-45s %s\n", name, cli_text (w[4]),
              cli_text (w[5]), cli_text (clients), cli_text (w[2]),
              w[3][0] ? cli_text (w[3]) : "(none: self-contained)");
      strcpy (clients, "-");
      if (strcmp (w[5], "ok") != 0) {
        printf ("   %s: %s\n", name, cli_text (w[6]));
        degraded = true;
      }
    }
    else if (details)
      printf (" %-8s %-8s %-10s %s\n", "file", "disk", name, cli_text (w[2]));
    else if (!status)
      printf (" %-10s %s\n", name, cli_text (w[2]));
  }
  control_free_lines (lines);
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
