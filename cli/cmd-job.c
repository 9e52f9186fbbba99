/* SPDX-License-Identifier: BSD-3-Clause */
/* The job commands of `cowchain`: commit, pull and delete start a
 * background merge; jobs, wait, pause, resume, cancel and speed watch and
 * steer it.  Online the job runs inside the server and these commands
 * reach it through the control socket.  Offline (--state DIR) commit,
 * pull and delete run the job in this process and wait for it; there is
 * no job for the other commands to reach, so they refuse --state. */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "cowchain.h"

/* How often an offline job's wait and its progress bar look at it. */
#define POLL_INTERVAL_NS (100 * 1000 * 1000)
#define BAR_WIDTH 20

/* The options of every command that reaches a running job. */
#define ONLINE_HELP \
  HELP_OPTIONS \
  "  -c, --control=SOCKET  a running server's control socket (default:\n" \
  "                        $COWCHAIN_CONTROL)\n" \
  "  -d, --disk=NAME       which disk of the server (default: the default\n" \
  "                        export)\n" \
  "      --timeout=SECONDS  give up on the server after this long (default:\n" \
  "                        $COWCHAIN_TIMEOUT, else 60; 0 = wait forever)\n"

static void
sleep_poll_interval (void)
{
  struct timespec ts = { .tv_nsec = POLL_INTERVAL_NS };

  nanosleep (&ts, NULL);
}

static bool
job_is_active (enum cow_job_state s)
{
  return s == COW_JOB_RUNNING || s == COW_JOB_PAUSED;
}

/* A job lives in a running server, or in the offline commit, pull or
 * delete that started it until it ends. */
static int
refuse_offline (const char *cmd)
{
  return cli_usage_error (cmd, "no server: jobs run only inside a running "
                          "server (give --control=SOCKET or set "
                          "COWCHAIN_CONTROL) or inside the offline commit, "
                          "pull or delete that started them, which waits "
                          "for its job");
}

/*----------------------------------------------------------------------
 * Rates.
 */

/* RATE: bytes per second, optionally with a binary suffix K, M or G and
 * "/s"; 0 = unlimited. */
static int
parse_rate (const char *cmd, const char *arg, uint64_t *out)
{
  uint64_t v = 0, unit = 1;
  const char *p = arg;

  if (*p < '0' || *p > '9')
    goto bad;
  for (; *p >= '0' && *p <= '9'; p++) {
    if (v > (UINT64_MAX - (uint64_t) (*p - '0')) / 10)
      goto too_large;
    v = v * 10 + (uint64_t) (*p - '0');
  }
  switch (*p) {
  case 'k': case 'K': unit = UINT64_C (1) << 10; p++; break;
  case 'm': case 'M': unit = UINT64_C (1) << 20; p++; break;
  case 'g': case 'G': unit = UINT64_C (1) << 30; p++; break;
  }
  if (strcmp (p, "/s") == 0)
    p += 2;
  if (*p != '\0')
    goto bad;
  if (v > UINT64_MAX / unit)
    goto too_large;
  *out = v * unit;
  return EXIT_OK;

 bad:
  return cli_usage_error (cmd, "RATE '%s' is not a rate: give bytes per "
                          "second, optionally with a suffix K, M or G "
                          "(binary), or 0 for unlimited", arg);
 too_large:
  return cli_usage_error (cmd, "RATE '%s' is too large", arg);
}

static void
format_rate (uint64_t v, char *buf, size_t len)
{
  char size[32];

  cli_human_size (v, size, sizeof size);
  snprintf (buf, len, "%s/s", size);
}

/*----------------------------------------------------------------------
 * What the server says of its jobs.
 */

struct job_row {
  char *disk;                   /* "" = the unnamed disk */
  char *kind, *top, *base, *message;   /* "" if none */
  enum cow_job_state state;
  uint64_t done, total, speed, rate;
  int64_t started, ended;
  int error;
};

static void
free_job_rows (struct job_row *v, size_t n)
{
  if (v == NULL)
    return;
  for (size_t i = 0; i < n; i++) {
    free (v[i].disk);
    free (v[i].kind);
    free (v[i].top);
    free (v[i].base);
    free (v[i].message);
  }
  free (v);
}

static bool
parse_state (const char *name, enum cow_job_state *out)
{
  for (int s = COW_JOB_NONE; s <= COW_JOB_CANCELLED; s++) {
    const char *n = cow_job_state_name ((enum cow_job_state) s);
    if (n && strcmp (n, name) == 0) {
      *out = (enum cow_job_state) s;
      return true;
    }
  }
  return false;
}

/* Numbers of the reply: decimal, nothing else, in range. */
static bool
parse_u64 (const char *s, uint64_t *out)
{
  char *end;

  if (*s < '0' || *s > '9')
    return false;
  errno = 0;
  *out = strtoull (s, &end, 10);
  return errno == 0 && *end == '\0';
}

static bool
parse_i64 (const char *s, int64_t *out)
{
  char *end;

  if ((*s < '0' || *s > '9') && *s != '-')
    return false;
  errno = 0;
  *out = strtoll (s, &end, 10);
  return errno == 0 && *end == '\0' && end != s;
}

/* "job DISK KIND STATE TOP BASE DONE TOTAL SPEED RATE STARTED ENDED
 * ERRNO MESSAGE" (the control protocol). */
static bool
parse_job_line (const struct cow_control_line *line, struct job_row *j)
{
  char **w = line->words;
  int64_t err;

  if (line->n != 14 || strcmp (w[0], "job") != 0
      || !parse_state (w[3], &j->state)
      || !parse_u64 (w[6], &j->done) || !parse_u64 (w[7], &j->total)
      || !parse_u64 (w[8], &j->speed) || !parse_u64 (w[9], &j->rate)
      || !parse_i64 (w[10], &j->started) || !parse_i64 (w[11], &j->ended)
      || !parse_i64 (w[12], &err) || err < 0 || err > INT32_MAX)
    return false;
  j->error = (int) err;
  j->disk = strdup (w[1]);
  j->kind = strdup (w[2]);
  j->top = strdup (w[4]);
  j->base = strdup (w[5]);
  j->message = strdup (w[13]);
  return true;
}

/* The job of each disk (of t->disk only if one_disk). */
static int
get_jobs (const struct cli_target *t, bool one_disk, struct job_row **out,
          size_t *n)
{
  struct job_row *v;
  struct cow_control_reply reply;
  size_t k;
  int r;

  *out = NULL;
  *n = 0;
  r = one_disk ? cli_ask (t, &reply, 2, "jobs", t->disk)
    : cli_ask (t, &reply, 1, "jobs");
  if (r != EXIT_OK)
    return r;
  k = reply.n;
  v = calloc (k ? k : 1, sizeof *v);
  if (v == NULL) {
    cow_control_free_reply (&reply);
    cli_error ("out of memory");
    return EXIT_ERROR;
  }
  for (size_t i = 0; i < k; i++) {
    struct job_row *j = &v[i];
    if (!parse_job_line (&reply.lines[i], j)) {
      cli_error ("%s: malformed reply to 'jobs' (line %zu)", t->control,
                 i + 1);
      free_job_rows (v, k);
      cow_control_free_reply (&reply);
      return EXIT_ERROR;
    }
    if (!j->disk || !j->kind || !j->top || !j->base || !j->message) {
      cli_error ("out of memory");
      free_job_rows (v, k);
      cow_control_free_reply (&reply);
      return EXIT_ERROR;
    }
  }
  cow_control_free_reply (&reply);
  *out = v;
  *n = k;
  return EXIT_OK;
}

/*----------------------------------------------------------------------
 * Progress bar (stderr, on a terminal only).
 */

static void
draw_progress (const char *label, bool paused, uint64_t done,
               uint64_t total, uint64_t rate)
{
  double f = total ? (double) done / (double) total : 0;
  char bar[BAR_WIDTH + 1], d[32], t[32], r[40];
  int fill;

  if (f > 1)
    f = 1;
  fill = (int) (f * BAR_WIDTH);
  memset (bar, '#', (size_t) fill);
  memset (bar + fill, '.', (size_t) (BAR_WIDTH - fill));
  bar[BAR_WIDTH] = '\0';
  cli_human_size (done, d, sizeof d);
  cli_human_size (total, t, sizeof t);
  format_rate (rate, r, sizeof r);
  /* Trailing blanks wipe what a longer line before left. */
  fprintf (stderr, "\r%.20s [%s] %3d%% %s/%s %s    ", label, bar,
           (int) (f * 100), d, t, paused ? "paused" : r);
  fflush (stderr);
}

/*----------------------------------------------------------------------
 * Waiting for jobs of a running server.
 */

/* The verdict on a job that no longer runs. */
static int
job_outcome (const struct job_row *j)
{
  const char *on = j->disk[0] ? " on disk " : "";

  switch (j->state) {
  case COW_JOB_FAILED:
    cli_error ("%s%s%s failed: %s", j->kind, on, j->disk,
               j->message[0] ? j->message
               : strerror (j->error ? j->error : EIO));
    return EXIT_ERROR;
  case COW_JOB_CANCELLED:
    cli_error ("%s%s%s was cancelled", j->kind, on, j->disk);
    return EXIT_ERROR;
  default:
    return EXIT_OK;
  }
}

/* The disks whose job has been seen running or paused while we wait:
 * the progress bar sums them until the end, so that it does not jump
 * back when one of them finishes first. */
struct watched {
  char **disks;
  size_t n;
};

static bool
is_watched (const struct watched *w, const char *disk)
{
  for (size_t i = 0; i < w->n; i++)
    if (strcmp (w->disks[i], disk) == 0)
      return true;
  return false;
}

static void
watch_active (struct watched *w, const struct job_row *v, size_t n)
{
  for (size_t i = 0; i < n; i++) {
    char **nd;
    if (!job_is_active (v[i].state) || is_watched (w, v[i].disk))
      continue;
    nd = realloc (w->disks, (w->n + 1) * sizeof *nd);
    if (nd == NULL)
      return;                   /* only the bar is less complete */
    w->disks = nd;
    w->disks[w->n] = strdup (v[i].disk);
    if (w->disks[w->n])
      w->n++;
  }
}

static void
free_watched (struct watched *w)
{
  for (size_t i = 0; i < w->n; i++)
    free (w->disks[i]);
  free (w->disks);
}

static void
draw_jobs (const struct job_row *v, size_t n, const struct watched *w)
{
  uint64_t done = 0, total = 0, rate = 0;
  const char *label = NULL;
  size_t count = 0;
  bool paused = true;
  char many[32];

  for (size_t i = 0; i < n; i++) {
    if (!is_watched (w, v[i].disk))
      continue;
    done += v[i].done;
    total += v[i].total;
    rate += v[i].rate;
    paused = paused && v[i].state == COW_JOB_PAUSED;
    label = v[i].kind;
    count++;
  }
  if (count == 0)
    return;
  if (count > 1) {
    snprintf (many, sizeof many, "%zu jobs", count);
    label = many;
  }
  draw_progress (label, paused, done, total, rate);
}

/* Waiting rides on the server's events stream: subscribed first, then
 * the jobs are read once, then again only at each job-end (or, to draw
 * the bar, at a milestone or each second).  A job that ends between the
 * subscription and the first read is seen by that read; one that ends
 * after it sends its job-end, which the stream already holds. */
struct wait_state {
  const struct cli_target *t;
  bool one_disk, bar;
  struct watched watched;
  struct job_row *v;            /* the last jobs read */
  size_t n;
  bool started, finished;
  bool reported;                /* an error was already printed */
};

/* Read the jobs; true when none of them runs or is paused any more. */
static int
wait_look (struct wait_state *w, bool *idle)
{
  bool active = false;

  free_job_rows (w->v, w->n);
  w->v = NULL;
  w->n = 0;
  if (get_jobs (w->t, w->one_disk, &w->v, &w->n) != EXIT_OK) {
    w->reported = true;
    return -1;
  }
  for (size_t i = 0; i < w->n; i++)
    active = active || job_is_active (w->v[i].state);
  watch_active (&w->watched, w->v, w->n);
  if (w->bar)
    draw_jobs (w->v, w->n, &w->watched);
  *idle = !active;
  return 0;
}

static int
wait_event (void *opaque, const struct cow_control_line *line)
{
  struct wait_state *w = opaque;
  bool idle = false;
  const char *kind = line && line->n >= 3 ? line->words[2] : "";

  if (line == NULL && w->started && !w->bar)
    return 0;                   /* idle, or a signal: go on waiting */
  if (line && strcmp (kind, "job-end") != 0
      && !(w->bar && strcmp (kind, "job-progress") == 0))
    return 0;
  w->started = true;
  if (wait_look (w, &idle) == -1)
    return -1;
  w->finished = idle;
  return idle ? 1 : 0;
}

/* Wait until no job of the disk (or of any disk) runs or is paused. */
static int
wait_online (const struct cli_target *t, bool one_disk, bool progress)
{
  struct wait_state w = {
    .t = t, .one_disk = one_disk,
    .bar = progress && isatty (STDERR_FILENO),
  };
  const char *req[2] = { "events", t->disk };
  int status = EXIT_OK, r;

  if (cli_timeout_set (NULL, NULL) != EXIT_OK)
    return EXIT_ERROR;
  r = cow_control_stream (t->control, req, one_disk ? 2 : 1, cli_timeout_ms,
                          w.bar ? 1000 : 0, wait_event, &w);
  if (r == -1 && !w.started && cow_last_errno () == EBUSY) {
    /* Every event stream of the server is taken (or every connection):
     * look at the jobs at intervals instead, as long as it takes. */
    bool idle = false;
    while ((r = wait_look (&w, &idle)) == 0 && !idle)
      sleep_poll_interval ();
    w.finished = r == 0;
  }
  if (w.watched.n && w.bar)
    fputc ('\n', stderr);
  if (r == -1 || !w.finished) {
    if (r == -1 && !w.reported)
      cli_error ("%s", cow_last_error ());
    else if (r == 0)
      cli_error ("%s: the server stopped before the job ended", t->control);
    status = EXIT_ERROR;
  }
  else
    for (size_t i = 0; i < w.n; i++)
      if (job_outcome (&w.v[i]) != EXIT_OK)
        status = EXIT_ERROR;
  free_job_rows (w.v, w.n);
  free_watched (&w.watched);
  return status;
}

/*----------------------------------------------------------------------
 * Running a job offline, in this process.
 */

static volatile sig_atomic_t interrupted;

static void
on_interrupt (int sig)
{
  interrupted = 1;
}

/* Wait for the job that was just started on d; Ctrl-C cancels it (the
 * chain stays as it was) rather than leaving it half done. */
static int
wait_offline (struct cow_disk *d, const char *what)
{
  struct sigaction sa = { .sa_handler = on_interrupt }, old_int, old_term;
  bool bar = isatty (STDERR_FILENO), drawn = false, cancelled = false;
  int status = EXIT_OK;

  interrupted = 0;
  sigemptyset (&sa.sa_mask);
  sigaction (SIGINT, &sa, &old_int);
  sigaction (SIGTERM, &sa, &old_term);
  for (;;) {
    struct cow_job_info ji = { 0 };
    bool active;

    if (cow_disk_job_info (d, &ji) == -1)
      break;                    /* cow_disk_job_wait says how it ended */
    active = job_is_active (ji.state);
    if (bar && (active || drawn)) {
      draw_progress (what, false, ji.done, ji.total, ji.rate);
      drawn = true;
    }
    cow_job_info_clear (&ji);
    if (!active)
      break;
    if (interrupted && !cancelled) {
      if (drawn)
        fputc ('\n', stderr);
      drawn = false;
      fprintf (stderr, "cowchain: interrupted: cancelling the %s\n", what);
      cow_disk_job_cancel (d);
      cancelled = true;
    }
    sleep_poll_interval ();
  }
  if (drawn)
    fputc ('\n', stderr);
  if (cow_disk_job_wait (d) == -1) {
    cli_error ("%s", cow_last_error ());
    status = EXIT_ERROR;
  }
  sigaction (SIGINT, &old_int, NULL);
  sigaction (SIGTERM, &old_term, NULL);
  return status;
}

/*----------------------------------------------------------------------
 * commit, pull, delete
 */

#define LAYER_HELP \
  "LAYER is a snapshot name, a layer file name (layer-000003.qcow2), or\n" \
  "'active' or 'base'.\n"

#define JOB_START_HELP \
  TARGET_HELP \
  "      --speed=RATE      at most RATE bytes per second (suffixes K, M,\n" \
  "                        G; default 0 = unlimited)\n" \
  "  -w, --wait            wait until the job ends (as cowchain wait)\n" \
  "  -p, --progress        with --wait, draw a progress bar on stderr\n" \
  "                        when it is a terminal\n" \
  HELP_HELP \
  "\n" \
  "Online the job runs in the server and the command returns once it has\n" \
  "started (follow it with cowchain jobs or wait).\n" \
  "Offline (--state) the command runs the job and waits for it, with a\n" \
  "progress bar when stderr is a terminal; Ctrl-C cancels it.  A job that\n" \
  "fails, is cancelled or is killed leaves the chain's layers as they were\n" \
  "(snapshot names it dropped at the start stay dropped).\n" \
  "\n" \
  "Exit status:\n" \
  "  0  the job started (with --wait or offline: it completed)\n" \
  "  1  error, or the job failed or was cancelled\n"

const char commit_help[] =
  "Usage: cowchain commit [OPTION]... --top=LAYER [--base=LAYER]\n"
  "Merge the layers from TOP down into BASE in the background, while the\n"
  "guest runs (like virsh blockcommit): BASE then holds the disk as it was\n"
  "at TOP and takes TOP's snapshot name; the layers above BASE up to TOP\n"
  "leave the chain.  TOP may be the active layer: the job follows the\n"
  "guest's writes, then BASE becomes the active layer.\n"
  LAYER_HELP
  HELP_OPTIONS
  "  -t, --top=LAYER       the highest layer to merge (required)\n"
  "  -b, --base=LAYER      the layer to merge into (default: the one right\n"
  "                        under TOP)\n"
  "      --allow-base-write  allow BASE to be the disk's original base,\n"
  "                        which is then written\n"
  "  -f, --force           also when snapshots on BASE or between it and\n"
  "                        TOP would be lost\n"
  JOB_START_HELP
  "\n"
  "Example (virsh blockcommit):\n"
  "  cowchain --control /run/vm1.ctl commit --disk vda --top s2 --base s1 --wait\n"
  "  cowchain --control /run/vm1.ctl commit --disk vda --top active --base s1\n";

const char pull_help[] =
  "Usage: cowchain pull [OPTION]... [--base=LAYER]\n"
  "Copy the data of the layers under the active one, down to (not\n"
  "including) BASE, up into the active layer in the background, then cut\n"
  "them from the chain (like virsh blockpull).  Without --base everything\n"
  "is copied, the original base too, and the active layer becomes\n"
  "self-contained.\n"
  LAYER_HELP
  HELP_OPTIONS
  "  -b, --base=LAYER      the layer the active one backs onto afterwards\n"
  "  -f, --force           also when snapshots cut from the chain would be\n"
  "                        lost\n"
  JOB_START_HELP
  "\n"
  "Example (virsh blockpull):\n"
  "  cowchain --control /run/vm1.ctl pull --disk vda --base s1 --wait --progress\n";

const char delete_help[] =
  "Usage: cowchain delete [OPTION]... NAME\n"
  "Delete snapshot NAME: the name goes at once, and its layer is merged\n"
  "into the layer above it in the background.  What the guest sees never\n"
  "changes.\n"
  HELP_OPTIONS
  JOB_START_HELP
  "\n"
  "Example:\n"
  "  cowchain --control /run/vm1.ctl delete --disk vda s1 --wait\n";

#define JOB_START_OPTIONS \
  TARGET_OPTIONS, \
  { "speed", required_argument, NULL, 'S' }, \
  { "wait", no_argument, NULL, 'w' }, \
  { "progress", no_argument, NULL, 'p' }, \
  { "help", no_argument, NULL, 'h' }

static const struct option commit_options[] = {
  JOB_START_OPTIONS,
  { "top", required_argument, NULL, 't' },
  { "base", required_argument, NULL, 'b' },
  { "allow-base-write", no_argument, NULL, 'A' },
  { "force", no_argument, NULL, 'f' },
  { NULL, 0, NULL, 0 },
};

static const struct option pull_options[] = {
  JOB_START_OPTIONS,
  { "base", required_argument, NULL, 'b' },
  { "force", no_argument, NULL, 'f' },
  { NULL, 0, NULL, 0 },
};

static const struct option delete_options[] = {
  JOB_START_OPTIONS,
  { NULL, 0, NULL, 0 },
};

/* What each of the three commands is. */
struct job_command {
  const char *cmd;
  enum cow_job_kind kind;
  const char *help;
  const struct option *options;
  const char *shortopts;
};

static const struct job_command commit_command = {
  "commit", COW_JOB_COMMIT, commit_help, commit_options, "c:s:d:t:b:fwph"
};
static const struct job_command pull_command = {
  "pull", COW_JOB_PULL, pull_help, pull_options, "c:s:d:b:fwph"
};
static const struct job_command delete_command = {
  "delete", COW_JOB_DELETE, delete_help, delete_options, "c:s:d:wph"
};

static int
start_offline (const struct cli_target *t, enum cow_job_kind kind,
               const char *name, const struct cow_job_opts *o)
{
  struct cow_disk *d = cli_open_offline (t, false);
  int r;

  if (d == NULL)
    return EXIT_ERROR;
  r = kind == COW_JOB_COMMIT ? cow_disk_commit (d, o)
    : kind == COW_JOB_PULL ? cow_disk_pull (d, o)
    : cow_disk_delete (d, name, o);
  if (r == -1) {
    cli_error ("%s", cow_last_error ());
    return cli_close_offline (d, EXIT_ERROR);
  }
  return cli_close_offline (d, wait_offline (d, cow_job_kind_name (kind)));
}

static int
start_online (const struct cli_target *t, enum cow_job_kind kind,
              const char *name, const struct cow_job_opts *o)
{
  char speed[32], flags[32] = "";
  struct cow_control_reply reply;
  int r;

  snprintf (speed, sizeof speed, "%" PRIu64, o->speed);
  if (o->allow_base_write)
    strcat (flags, "allow-base-write");
  if (o->force)
    strcat (flags, flags[0] ? ",force" : "force");
  if (kind == COW_JOB_COMMIT)
    r = cli_ask (t, &reply, 6, "commit", t->disk, o->top,
                 o->base ? o->base : "", flags, speed);
  else if (kind == COW_JOB_PULL)
    r = cli_ask (t, &reply, 5, "pull", t->disk, o->base ? o->base : "",
                 flags, speed);
  else
    r = cli_ask (t, &reply, 4, "delete", t->disk, name, speed);
  if (r == EXIT_OK)
    cow_control_free_reply (&reply);
  return r;
}

static int
job_start_command (const struct job_command *jc, int argc, char **argv)
{
  struct cli_target t = { 0 };
  struct cow_job_opts o = { 0 };
  const char *name = NULL;
  bool wait = false, progress = false;
  int c, r;

  while ((c = cli_next_option (jc->cmd, argc, argv, jc->shortopts,
                               jc->options)) != -1) {
    if (cli_target_option (&t, c, optarg))
      continue;
    switch (c) {
    case 't': o.top = optarg; break;
    case 'b': o.base = optarg; break;
    case 'A': o.allow_base_write = true; break;
    case 'f': o.force = true; break;
    case 'S':
      if ((r = parse_rate (jc->cmd, optarg, &o.speed)) != EXIT_OK)
        return r;
      break;
    case 'w': wait = true; break;
    case 'p': progress = true; break;
    case 'h': fputs (jc->help, stdout); return cli_finish_output (EXIT_OK);
    default: return EXIT_ERROR;
    }
  }
  if (jc->kind == COW_JOB_DELETE) {
    if (optind + 1 != argc)
      return cli_usage_error (jc->cmd, optind >= argc ? "missing NAME"
                              : "unexpected argument '%s'", argv[optind + 1]);
    name = argv[optind];
  }
  else if (optind != argc)
    return cli_usage_error (jc->cmd, "unexpected argument '%s'",
                            argv[optind]);
  if (jc->kind == COW_JOB_COMMIT && o.top == NULL)
    return cli_usage_error (jc->cmd, "missing --top=LAYER (a snapshot name, "
                            "a layer file name or 'active')");
  r = cli_target_done (jc->cmd, &t);
  if (r != EXIT_OK)
    return r;
  if (progress && !wait && !t.state)
    return cli_usage_error (jc->cmd, "--progress goes with --wait");

  if (t.state)
    r = start_offline (&t, jc->kind, name, &o);
  else {
    r = start_online (&t, jc->kind, name, &o);
    if (r == EXIT_OK && wait)
      r = wait_online (&t, true, progress);
    else if (r == EXIT_OK) {
      if (jc->kind == COW_JOB_DELETE)
        printf ("Snapshot %s deleted; its layer is being merged\n",
                cli_text (name));
      else
        printf ("%s job started\n", jc->kind == COW_JOB_COMMIT ? "Commit"
                : "Pull");
      return cli_finish_output (EXIT_OK);
    }
  }
  if (r == EXIT_OK) {
    if (jc->kind == COW_JOB_DELETE)
      printf ("Snapshot %s deleted and its layer merged\n", cli_text (name));
    else
      printf ("%s completed\n", jc->kind == COW_JOB_COMMIT ? "Commit"
              : "Pull");
  }
  return cli_finish_output (r);
}

int
cmd_commit (int argc, char **argv)
{
  return job_start_command (&commit_command, argc, argv);
}

int
cmd_pull (int argc, char **argv)
{
  return job_start_command (&pull_command, argc, argv);
}

int
cmd_delete (int argc, char **argv)
{
  return job_start_command (&delete_command, argc, argv);
}

/*----------------------------------------------------------------------
 * jobs
 */

const char jobs_help[] =
  "Usage: cowchain jobs [OPTION]...\n"
  "The background job of each disk of a running server (or of one disk):\n"
  "the running or paused one, else the last one that ran.  A failed job's\n"
  "error is shown under its row.\n"
  "JSON: {\"version\": 1, \"jobs\": [{\"disk\", \"kind\", \"state\", \"top\",\n"
  "\"base\", \"done\", \"total\", \"speed\", \"rate\", \"started\", \"ended\",\n"
  "\"errno\", \"message\"}]}: sizes in bytes, rates in bytes/s, times in\n"
  "seconds since the epoch.\n"
  ONLINE_HELP
  "      --output=FORMAT   text (default) or json\n"
  HELP_HELP
  HELP_EXIT_SIMPLE
  "\n"
  "Example:\n"
  "  cowchain --control /run/vm1.ctl jobs --output=json\n";

static void
print_jobs_json (const struct job_row *v, size_t n)
{
  struct cli_json j;

  cli_json_init (&j, stdout, 2);
  cli_json_open (&j, '{');
  cli_json_u64 (&j, "version", 1);
  cli_json_key (&j, "jobs");
  cli_json_open (&j, '[');
  for (size_t i = 0; i < n; i++) {
    const struct job_row *r = &v[i];
    cli_json_next (&j);
    cli_json_open_inline (&j, '{');
    cli_json_str (&j, "disk", r->disk);
    /* "" (none) is null. */
    cli_json_str_or_null (&j, "kind", r->kind);
    cli_json_str (&j, "state", cow_job_state_name (r->state));
    cli_json_str_or_null (&j, "top", r->top);
    cli_json_str_or_null (&j, "base", r->base);
    cli_json_u64 (&j, "done", r->done);
    cli_json_u64 (&j, "total", r->total);
    cli_json_u64 (&j, "speed", r->speed);
    cli_json_u64 (&j, "rate", r->rate);
    cli_json_i64 (&j, "started", r->started);
    cli_json_i64 (&j, "ended", r->ended);
    cli_json_i64 (&j, "errno", r->error);
    cli_json_str_or_null (&j, "message", r->message);
    cli_json_close (&j, '}');
  }
  cli_json_close (&j, ']');
  cli_json_close (&j, '}');
}

static void
print_jobs_table (const struct job_row *v, size_t n)
{
  printf (" %-10s %-7s %-10s %-20s %-20s %-26s %-12s %s\n", "Disk", "Kind",
          "State", "Top", "Base", "Progress", "Rate", "Speed limit");
  printf ("-------------------------------------------------------------"
          "-----------------------------------------------------------\n");
  for (size_t i = 0; i < n; i++) {
    const struct job_row *j = &v[i];
    char progress[96] = "-", rate[40] = "-", limit[40] = "-";
    if (j->state != COW_JOB_NONE) {
      char d[32], t[32];
      double pct = j->total ? 100.0 * (double) j->done / (double) j->total
        : 0;
      cli_human_size (j->done, d, sizeof d);
      cli_human_size (j->total, t, sizeof t);
      snprintf (progress, sizeof progress, "%s/%s (%.0f%%)", d, t, pct);
      if (j->state == COW_JOB_RUNNING)
        format_rate (j->rate, rate, sizeof rate);
      if (j->speed)
        format_rate (j->speed, limit, sizeof limit);
      else
        strcpy (limit, "unlimited");
    }
    printf (" %-10s %-7s %-10s %-20s %-20s %-26s %-12s %s\n",
            j->disk[0] ? cli_text (j->disk) : "(default)",
            j->kind[0] ? cli_text (j->kind) : "-",
            cow_job_state_name (j->state), j->top[0] ? cli_text (j->top) : "-",
            j->base[0] ? cli_text (j->base) : "-", progress, rate, limit);
    if (j->state == COW_JOB_FAILED
        || (j->state == COW_JOB_CANCELLED && j->message[0]))
      printf ("   error: %s\n", j->message[0] ? cli_text (j->message)
              : strerror (j->error ? j->error : EIO));
  }
}

int
cmd_jobs (int argc, char **argv)
{
  static const struct option opts[] = {
    TARGET_OPTIONS,
    { "output", required_argument, NULL, 'o' },
    { "help", no_argument, NULL, 'h' },
    { NULL, 0, NULL, 0 },
  };
  struct cli_target t = { 0 };
  struct job_row *v;
  enum cli_output output = CLI_OUTPUT_HUMAN;
  bool one_disk;
  size_t n;
  int c, r;

  while ((c = cli_next_option ("jobs", argc, argv, "c:s:d:h", opts)) != -1) {
    if (cli_target_option (&t, c, optarg))
      continue;
    switch (c) {
    case 'o':
      if ((r = cli_parse_output ("jobs", optarg, &output)) != EXIT_OK)
        return r;
      break;
    case 'h': fputs (jobs_help, stdout); return cli_finish_output (EXIT_OK);
    default: return EXIT_ERROR;
    }
  }
  if (optind != argc)
    return cli_usage_error ("jobs", "unexpected argument '%s'", argv[optind]);
  if (t.state)
    return refuse_offline ("jobs");
  one_disk = t.disk != NULL;
  r = cli_target_done ("jobs", &t);
  if (r != EXIT_OK)
    return r;
  if (get_jobs (&t, one_disk, &v, &n) != EXIT_OK)
    return EXIT_ERROR;
  if (output == CLI_OUTPUT_JSON)
    print_jobs_json (v, n);
  else
    print_jobs_table (v, n);
  free_job_rows (v, n);
  return cli_finish_output (EXIT_OK);
}

/*----------------------------------------------------------------------
 * wait
 */

const char wait_help[] =
  "Usage: cowchain wait [OPTION]...\n"
  "Wait until the background job of the disk given by --disk (without\n"
  "--disk: of every disk, not only the default one) is neither running\n"
  "nor paused.  It follows the server's events\n"
  "(cowchain events) and looks at the jobs when one ends.\n"
  "\n"
  ONLINE_HELP
  "  -p, --progress        draw a progress bar on stderr when it is a\n"
  "                        terminal\n"
  HELP_HELP
  "\n"
  "Exit status:\n"
  "  0  the job completed (or no job has run)\n"
  "  1  it failed or was cancelled (its error on stderr), or error\n"
  "\n"
  "Example:\n"
  "  cowchain --control /run/vm1.ctl wait --disk vda --progress\n";

int
cmd_wait (int argc, char **argv)
{
  static const struct option opts[] = {
    TARGET_OPTIONS,
    { "progress", no_argument, NULL, 'p' },
    { "help", no_argument, NULL, 'h' },
    { NULL, 0, NULL, 0 },
  };
  struct cli_target t = { 0 };
  bool progress = false, one_disk;
  int c, r;

  while ((c = cli_next_option ("wait", argc, argv, "c:s:d:ph", opts)) != -1) {
    if (cli_target_option (&t, c, optarg))
      continue;
    switch (c) {
    case 'p': progress = true; break;
    case 'h': fputs (wait_help, stdout); return cli_finish_output (EXIT_OK);
    default: return EXIT_ERROR;
    }
  }
  if (optind != argc)
    return cli_usage_error ("wait", "unexpected argument '%s'", argv[optind]);
  if (t.state)
    return refuse_offline ("wait");
  one_disk = t.disk != NULL;
  r = cli_target_done ("wait", &t);
  if (r != EXIT_OK)
    return r;
  return cli_finish_output (wait_online (&t, one_disk, progress));
}

/*----------------------------------------------------------------------
 * pause, resume, cancel, speed
 */

const char pause_help[] =
  "Usage: cowchain pause [OPTION]...\n"
  "Pause the disk's background job; cowchain resume continues it.\n"
  ONLINE_HELP
  HELP_HELP
  HELP_EXIT_SIMPLE
  "\n"
  "Example:\n"
  "  cowchain --control /run/vm1.ctl pause --disk vda\n";

const char resume_help[] =
  "Usage: cowchain resume [OPTION]...\n"
  "Resume the disk's paused background job.\n"
  ONLINE_HELP
  HELP_HELP
  HELP_EXIT_SIMPLE
  "\n"
  "Example:\n"
  "  cowchain --control /run/vm1.ctl resume --disk vda\n";

const char cancel_help[] =
  "Usage: cowchain cancel [OPTION]...\n"
  "Cancel the disk's background job.  Its layers stay as they were before\n"
  "the job, which can be started again later; snapshot names that it\n"
  "dropped when it started (delete's NAME, or those given up with\n"
  "--force) stay dropped.  The job stops soon after (cowchain wait to see\n"
  "it end).\n"
  ONLINE_HELP
  HELP_HELP
  HELP_EXIT_SIMPLE
  "\n"
  "Example:\n"
  "  cowchain --control /run/vm1.ctl cancel --disk vda\n";

const char speed_help[] =
  "Usage: cowchain speed [OPTION]... RATE\n"
  "Change the speed limit of the disk's running job to RATE bytes per\n"
  "second (suffixes K, M, G; 0 = unlimited).\n"
  ONLINE_HELP
  HELP_HELP
  HELP_EXIT_SIMPLE
  "\n"
  "Example:\n"
  "  cowchain --control /run/vm1.ctl speed --disk vda 50M\n";

/* A command that steers the running job of one disk. */
static int
steer_command (const char *cmd, const char *request, const char *help,
               int argc, char **argv)
{
  static const struct option opts[] = {
    TARGET_OPTIONS,
    { "help", no_argument, NULL, 'h' },
    { NULL, 0, NULL, 0 },
  };
  struct cli_target t = { 0 };
  bool is_speed = strcmp (cmd, "speed") == 0;
  uint64_t speed = 0;
  struct cow_control_reply reply;
  char rate[40];
  int c, r;

  while ((c = cli_next_option (cmd, argc, argv, "c:s:d:h", opts)) != -1) {
    if (cli_target_option (&t, c, optarg))
      continue;
    switch (c) {
    case 'h': fputs (help, stdout); return cli_finish_output (EXIT_OK);
    default: return EXIT_ERROR;
    }
  }
  if (is_speed) {
    if (optind + 1 != argc)
      return cli_usage_error (cmd, optind >= argc ? "missing RATE"
                              : "unexpected argument '%s'", argv[optind + 1]);
    if ((r = parse_rate (cmd, argv[optind], &speed)) != EXIT_OK)
      return r;
  }
  else if (optind != argc)
    return cli_usage_error (cmd, "unexpected argument '%s'", argv[optind]);
  if (t.state)
    return refuse_offline (cmd);
  r = cli_target_done (cmd, &t);
  if (r != EXIT_OK)
    return r;
  snprintf (rate, sizeof rate, "%" PRIu64, speed);
  r = is_speed ? cli_ask (&t, &reply, 3, request, t.disk, rate)
    : cli_ask (&t, &reply, 2, request, t.disk);
  if (r != EXIT_OK)
    return r;
  cow_control_free_reply (&reply);
  if (!is_speed)
    printf ("Job %s\n", strcmp (cmd, "pause") == 0 ? "paused"
            : strcmp (cmd, "resume") == 0 ? "resumed"
            : "cancel requested (cowchain wait shows it end)");
  else if (speed == 0)
    printf ("Job speed limit removed\n");
  else {
    format_rate (speed, rate, sizeof rate);
    printf ("Job speed limit set to %s\n", rate);
  }
  return cli_finish_output (EXIT_OK);
}

int
cmd_pause (int argc, char **argv)
{
  return steer_command ("pause", "job-pause", pause_help, argc, argv);
}

int
cmd_resume (int argc, char **argv)
{
  return steer_command ("resume", "job-resume", resume_help, argc, argv);
}

int
cmd_cancel (int argc, char **argv)
{
  return steer_command ("cancel", "job-cancel", cancel_help, argc, argv);
}

int
cmd_speed (int argc, char **argv)
{
  return steer_command ("speed", "job-speed", speed_help, argc, argv);
}
