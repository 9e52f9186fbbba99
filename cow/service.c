/* SPDX-License-Identifier: BSD-3-Clause */
/* A service: the disks one server serves under their NBD export names,
 * the NBD clients connected to each, and the control commands the
 * `cowchain` tool sends over the control socket (the socket and its
 * framing: control.c).  The command table below is the protocol's list
 * of commands; a front end (the nbdkit plugin) only maps its connections
 * to disks and starts the socket.
 *
 * The set of disks is built before anything is served and never changes
 * after, so lookups take no lock; the client counts are atomic. */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cowchain.h"
#include "control.h"
#include "error.h"
#include "events.h"
#include "service.h"
#include "words.h"

struct cow_export {
  char *name;                   /* export name; "" for the unnamed disk */
  struct cow_disk *disk;        /* not owned */
  /* NBD connections open on this disk (front ends' threads): a revert
   * refuses to change the disk under them unless forced. */
  atomic_uint clients;
};

struct cow_service {
  /* Pointers, so that the handles front ends hold never move. */
  struct cow_export **exports;
  size_t n;
  struct cow_export *def;       /* NULL: the first disk */
  struct control_server *control;
  /* The events of the disks, and the log (events.c). */
  struct events_bus *bus;
};

struct cow_service *
cow_service_new (void)
{
  struct cow_service *s = calloc (1, sizeof *s);

  if (s == NULL) {
    cow_error_errno ("calloc");
    return NULL;
  }
  s->bus = events_bus_new ();
  if (s->bus == NULL) {
    free (s);
    return NULL;
  }
  return s;
}

void
cow_service_free (struct cow_service *s)
{
  if (s == NULL)
    return;
  /* The streams end first: the bus must have no subscriber left. */
  cow_service_stop_control (s);
  events_bus_free (s->bus);
  for (size_t i = 0; i < s->n; i++) {
    free (s->exports[i]->name);
    free (s->exports[i]);
  }
  free (s->exports);
  free (s);
}

int
cow_service_check_name (const char *name)
{
  size_t n = strlen (name);

  if (n == 0 || n > 64) {
    cow_error_set (EINVAL, "name '%s' must be 1 to 64 characters", name);
    return -1;
  }
  for (const char *c = name; *c; c++)
    if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z')
          || (*c >= '0' && *c <= '9') || strchr ("._-", *c))) {
      cow_error_set (EINVAL, "name '%s' may hold only letters, digits, '.', "
                     "'_' and '-'", name);
      return -1;
    }
  return 0;
}

struct cow_export *
cow_service_add (struct cow_service *s, const char *name,
                 struct cow_disk *d)
{
  struct cow_export **v, *e;

  if (name[0] == '\0' ? s->n > 0
      : s->n > 0 && s->exports[0]->name[0] == '\0') {
    cow_error_set (EINVAL, "the unnamed disk must be the only disk");
    return NULL;
  }
  if (name[0] && cow_service_check_name (name) == -1)
    return NULL;
  for (size_t i = 0; i < s->n; i++)
    if (strcmp (s->exports[i]->name, name) == 0) {
      cow_error_set (EEXIST, "a disk named '%s' is already served", name);
      return NULL;
    }
  v = realloc (s->exports, (s->n + 1) * sizeof *v);
  if (v == NULL) {
    cow_error_errno ("realloc");
    return NULL;
  }
  s->exports = v;
  e = calloc (1, sizeof *e);
  if (e == NULL || (e->name = strdup (name)) == NULL) {
    cow_error_errno ("calloc");
    free (e);
    return NULL;
  }
  e->disk = d;
  atomic_init (&e->clients, 0);
  if (events_bus_attach (s->bus, d, name) == -1) {
    free (e->name);
    free (e);
    return NULL;
  }
  s->exports[s->n++] = e;
  return e;
}

/* The disk a name chooses; "" or NULL is the default one.  Lenient (NBD
 * clients): a service whose one disk is unnamed serves it under any
 * export name.  Strict (the control socket): only the real names. */
static struct cow_export *
find (const struct cow_service *s, const char *name, bool lenient)
{
  if (s->n == 0)
    return NULL;
  if (name == NULL || name[0] == '\0')
    return s->def ? s->def : s->exports[0];
  for (size_t i = 0; i < s->n; i++)
    if (strcmp (s->exports[i]->name, name) == 0)
      return s->exports[i];
  if (lenient && s->exports[0]->name[0] == '\0')
    return s->exports[0];
  return NULL;
}

int
cow_service_set_default (struct cow_service *s, const char *name)
{
  struct cow_export *e = name[0] ? find (s, name, false) : NULL;

  if (e == NULL) {
    cow_error_set (ENOENT, "no disk named '%.64s'", name);
    return -1;
  }
  s->def = e;
  return 0;
}

struct cow_export *
cow_service_lookup (const struct cow_service *s, const char *export_name)
{
  struct cow_export *e = find (s, export_name, true);

  if (e == NULL)
    cow_error_set (ENOENT, "no disk (export) named '%s'",
                   export_name ? export_name : "");
  return e;
}

struct cow_disk *
cow_export_disk (const struct cow_export *e)
{
  return e->disk;
}

const char *
cow_export_name (const struct cow_export *e)
{
  return e->name;
}

void
cow_export_attach (struct cow_export *e)
{
  atomic_fetch_add (&e->clients, 1);
}

void
cow_export_detach (struct cow_export *e)
{
  atomic_fetch_sub (&e->clients, 1);
}

unsigned
cow_export_clients (const struct cow_export *e)
{
  return atomic_load (&e->clients);
}

/*----------------------------------------------------------------------
 * The control commands.
 *
 * Each request is a command and its words (see control.h for the
 * framing: words are percent-encoded, "" is sent as "-"); a reply is
 * "ok" and the lines below, or an error.  DISK is a disk's name, ""
 * the default disk.
 *
 *   status                       per disk: "clients NAME N" (the NBD
 *                                connections open on it; tools skip
 *                                lines they do not know), then "disk
 *                                NAME ACTIVE-PATH BASE DEPTH HEALTH
 *                                REASON": ACTIVE-PATH the active layer's
 *                                file, BASE as configured ("" once
 *                                self-contained), DEPTH the number of
 *                                layers, HEALTH "ok" or "degraded",
 *                                REASON why ("" when ok); last, one
 *                                "memory BUDGET USED PEAK MAPS" (bytes:
 *                                the metadata cache budget of the
 *                                server, held now, held at most; the
 *                                merged maps of the frozen layers)
 *   blklist                      per disk: "disk NAME ACTIVE-PATH"
 *   list DISK                    per layer, bottom to top: "layer PATH
 *                                CREATED SNAPSHOT DESCRIPTION STATE"
 *                                (CREATED seconds since the epoch,
 *                                SNAPSHOT and DESCRIPTION "" if none,
 *                                STATE "active" or "frozen")
 *   snapshot DISK NAME DESC      "pause-ns N": the pause guest I/O saw
 *   snapshot-atomic NAME DESC    every disk at one cut; "pause-ns N" of
 *                                the first disk
 *   revert DISK NAME FORCE       nothing.  FORCE "force" or "" (else the
 *                                arguments are wrong).  Without force,
 *                                refused (EBUSY) while NBD clients are
 *                                connected to DISK, or when later
 *                                snapshots would be deleted.
 *
 * Background merges (see cowchain.h).  SPEED: bytes per second, in
 * decimal digits only, 0 = unlimited.  FLAGS: "" or a comma list of
 * allow-base-write and force.  BASE "" = the default base.  Each replies
 * nothing once the job has started (or the control has acted).
 *   commit DISK TOP BASE FLAGS SPEED
 *   pull DISK BASE FLAGS SPEED
 *   delete DISK NAME SPEED
 *   jobs [DISK]                  per disk (every disk, or only DISK):
 *                                "job DISK KIND STATE TOP BASE DONE TOTAL
 *                                SPEED RATE STARTED ENDED ERRNO MESSAGE"
 *                                (KIND, TOP, BASE "" if no job ran; KIND
 *                                commit|pull|delete; STATE a
 *                                cow_job_state_name, "none" if no job
 *                                ran; DONE and TOTAL bytes; SPEED the
 *                                limit and RATE the measured bytes per
 *                                second; STARTED and ENDED seconds since
 *                                the epoch, ENDED 0 while running; ERRNO
 *                                0 unless failed; MESSAGE "" if none)
 *   job-pause DISK, job-resume DISK, job-cancel DISK
 *   job-speed DISK SPEED
 *
 *   events [DISK]                a stream (control.h): "ok", then per
 *                                event of every disk (or of DISK) "TIME
 *                                DISK KIND KEY=VALUE...", until "." when
 *                                the server stops.  The kinds and their
 *                                fields: docs/cowchain-control.pod.
 *
 * Errors before a command runs: "unknown command 'X'", "wrong number of
 * arguments for 'X'" (EINVAL), "no disk named 'X'" (ENOENT).
 */

static void
wrong_args (const char *cmd)
{
  cow_error_set (EINVAL, "wrong number of arguments for '%.32s'", cmd);
}

/* A control word that must be a decimal number: digits only, no sign,
 * no blanks, no overflow. */
static int
parse_number (const char *what, const char *word, uint64_t *out)
{
  uint64_t v = 0;

  if (word[0] == '\0')
    goto bad;
  for (const char *c = word; *c; c++) {
    if (*c < '0' || *c > '9')
      goto bad;
    if (v > (UINT64_MAX - (uint64_t) (*c - '0')) / 10) {
      cow_error_set (ERANGE, "%s: '%.32s' is too large", what, word);
      return -1;
    }
    v = v * 10 + (uint64_t) (*c - '0');
  }
  *out = v;
  return 0;
 bad:
  cow_error_set (EINVAL, "%s: '%.32s' is not a decimal number", what, word);
  return -1;
}

/* FLAGS of commit and pull: "" or a comma list of allow-base-write and
 * force. */
static int
parse_job_flags (const char *word, struct cow_job_opts *o)
{
  const char *p = word;

  while (*p) {
    size_t len = strcspn (p, ",");
    if (len == 16 && strncmp (p, "allow-base-write", len) == 0)
      o->allow_base_write = true;
    else if (len == 5 && strncmp (p, "force", len) == 0)
      o->force = true;
    else {
      cow_error_set (EINVAL, "FLAGS: '%.*s' is not allow-base-write or force",
                     (int) (len < 32 ? len : 32), p);
      return -1;
    }
    p += len;
    if (*p == ',' && *++p == '\0') {
      cow_error_set (EINVAL, "FLAGS: '%.64s' ends with a comma", word);
      return -1;
    }
  }
  return 0;
}

/* status and blklist: one or two lines per disk. */
static int
reply_disks (struct cow_service *s, bool status, struct control_reply *r)
{
  for (size_t i = 0; i < s->n; i++) {
    struct cow_export *e = s->exports[i];
    struct cow_layer_info *v;
    size_t k;
    char *name, *path, *base, *why = NULL, *ewhy;
    int health;

    if (cow_disk_layers (e->disk, &v, &k) == -1)
      return -1;
    health = cow_disk_health (e->disk, &why);
    name = word_encode (e->name);
    path = word_encode (v[k - 1].path);
    base = word_encode (cow_disk_base (e->disk));
    ewhy = word_encode (health ? (why ? why : "unknown") : "");
    if (name && path && base && ewhy) {
      if (status) {
        /* Before its disk line: older tools skip it. */
        control_reply_line (r, "clients %s %u", name,
                            atomic_load (&e->clients));
        control_reply_line (r, "disk %s %s %s %zu %s %s", name, path, base,
                            k, health ? "degraded" : "ok", ewhy);
      }
      else
        control_reply_line (r, "disk %s %s", name, path);
    }
    free (name);
    free (path);
    free (base);
    free (why);
    free (ewhy);
    cow_layer_info_free (v, k);
  }
  if (status) {
    /* The server's memory: the metadata cache budget
     * shared by all disks, what it holds and held at most, and the
     * merged maps' bytes. */
    struct cow_memory_usage u;
    cow_memory_usage (&u);
    control_reply_line (r, "memory %" PRIu64 " %" PRIu64 " %" PRIu64
                        " %" PRIu64, u.cache_budget, u.cache_used,
                        u.cache_peak, u.map_bytes);
  }
  return 0;
}

static int
cmd_status (struct cow_service *s, struct cow_export *e, char **args, int n,
            struct control_reply *r)
{
  return reply_disks (s, true, r);
}

static int
cmd_blklist (struct cow_service *s, struct cow_export *e, char **args, int n,
             struct control_reply *r)
{
  return reply_disks (s, false, r);
}

static int
cmd_list (struct cow_service *s, struct cow_export *e, char **args, int n,
          struct control_reply *r)
{
  struct cow_layer_info *v;
  size_t k;

  if (cow_disk_layers (e->disk, &v, &k) == -1)
    return -1;
  for (size_t i = 0; i < k; i++) {
    char *p = word_encode (v[i].path);
    char *sn = word_encode (v[i].snapshot ? v[i].snapshot : "");
    char *d = word_encode (v[i].description ? v[i].description : "");
    if (p && sn && d)
      control_reply_line (r, "layer %s %" PRId64 " %s %s %s", p, v[i].created,
                          sn, d, v[i].active ? "active" : "frozen");
    free (p);
    free (sn);
    free (d);
  }
  cow_layer_info_free (v, k);
  return 0;
}

static int
cmd_snapshot (struct cow_service *s, struct cow_export *e, char **args,
              int n, struct control_reply *r)
{
  if (cow_disk_snapshot (e->disk, args[1], args[2]) == -1)
    return -1;
  control_reply_line (r, "pause-ns %" PRIu64,
                      cow_disk_last_pause_ns (e->disk));
  return 0;
}

static int
cmd_snapshot_atomic (struct cow_service *s, struct cow_export *e,
                     char **args, int n, struct control_reply *r)
{
  struct cow_disk **all = calloc (s->n ? s->n : 1, sizeof *all);
  int ret;

  if (all == NULL) {
    cow_error_errno ("calloc");
    return -1;
  }
  for (size_t i = 0; i < s->n; i++)
    all[i] = s->exports[i]->disk;
  ret = cow_disk_snapshot_group (all, s->n, args[0], args[1]);
  if (ret == 0)
    control_reply_line (r, "pause-ns %" PRIu64,
                        cow_disk_last_pause_ns (all[0]));
  free (all);
  return ret;
}

#define REVERT_CLIENT_GRACE_MS 1000

static int
cmd_revert (struct cow_service *s, struct cow_export *e, char **args,
            int n, struct control_reply *r)
{
  bool force;
  unsigned clients;

  if (strcmp (args[2], "force") != 0 && args[2][0] != '\0') {
    cow_error_set (EINVAL, "revert: FORCE must be 'force' or empty, not "
                   "'%.32s'", args[2]);
    return -1;
  }
  force = args[2][0] != '\0';
  /* A client's page cache would go on holding the old disk: refused
   * unless forced.  The count is read once, not held: a client that
   * connects while the revert runs (a few milliseconds) is not
   * counted, and may read some of the old disk before the switch.
   * A client that has just hung up (qemu-img or nbdsh run right before)
   * is counted until nbdkit has closed its connection, a moment later:
   * up to REVERT_CLIENT_GRACE_MS is given for the count to fall to 0. */
  clients = atomic_load (&e->clients);
  for (int waited = 0; clients > 0 && !force
         && waited < REVERT_CLIENT_GRACE_MS; waited += 10) {
    const struct timespec ts = { .tv_nsec = 10 * 1000 * 1000 };
    nanosleep (&ts, NULL);
    clients = atomic_load (&e->clients);
  }
  if (clients > 0 && !force) {
    cow_error_set (EBUSY, "%u NBD client%s %s connected to disk %s; "
                   "reverting changes the disk under %s; stop %s or use "
                   "--force", clients, clients == 1 ? "" : "s",
                   clients == 1 ? "is" : "are",
                   e->name[0] ? e->name : "(default)",
                   clients == 1 ? "it" : "them",
                   clients == 1 ? "it" : "them");
    return -1;
  }
  return cow_disk_revert (e->disk, args[1], force);
}

static int
cmd_commit (struct cow_service *s, struct cow_export *e, char **args,
            int n, struct control_reply *r)
{
  struct cow_job_opts o = { .top = args[1] };

  o.base = args[2][0] ? args[2] : NULL;
  if (parse_job_flags (args[3], &o) == -1
      || parse_number ("SPEED", args[4], &o.speed) == -1)
    return -1;
  return cow_disk_commit (e->disk, &o);
}

static int
cmd_pull (struct cow_service *s, struct cow_export *e, char **args, int n,
          struct control_reply *r)
{
  struct cow_job_opts o = { 0 };

  o.base = args[1][0] ? args[1] : NULL;
  if (parse_job_flags (args[2], &o) == -1
      || parse_number ("SPEED", args[3], &o.speed) == -1)
    return -1;
  return cow_disk_pull (e->disk, &o);
}

static int
cmd_delete (struct cow_service *s, struct cow_export *e, char **args,
            int n, struct control_reply *r)
{
  struct cow_job_opts o = { 0 };

  if (parse_number ("SPEED", args[2], &o.speed) == -1)
    return -1;
  return cow_disk_delete (e->disk, args[1], &o);
}

/* One "job" line. */
static int
reply_job (struct cow_export *e, struct control_reply *r)
{
  struct cow_job_info ji;
  char *name, *top, *base, *msg;
  bool ran;

  if (cow_disk_job_info (e->disk, &ji) == -1)
    return -1;
  ran = ji.state != COW_JOB_NONE;
  name = word_encode (e->name);
  top = word_encode (ran && ji.top ? ji.top : "");
  base = word_encode (ran && ji.base ? ji.base : "");
  msg = word_encode (ji.message ? ji.message : "");
  if (name && top && base && msg)
    control_reply_line (r, "job %s %s %s %s %s %" PRIu64 " %" PRIu64
                        " %" PRIu64 " %" PRIu64 " %" PRId64 " %" PRId64
                        " %d %s", name,
                        ran ? cow_job_kind_name (ji.kind) : "-",
                        cow_job_state_name (ji.state), top, base, ji.done,
                        ji.total, ji.speed, ji.rate, ji.started, ji.ended,
                        ji.error, msg);
  free (name);
  free (top);
  free (base);
  free (msg);
  cow_job_info_clear (&ji);
  return 0;
}

static int
cmd_jobs (struct cow_service *s, struct cow_export *e, char **args, int n,
          struct control_reply *r)
{
  if (e)
    return reply_job (e, r);
  for (size_t i = 0; i < s->n; i++)
    if (reply_job (s->exports[i], r) == -1)
      return -1;
  return 0;
}

static int
cmd_job_pause (struct cow_service *s, struct cow_export *e, char **args,
               int n, struct control_reply *r)
{
  return cow_disk_job_pause (e->disk);
}

static int
cmd_job_resume (struct cow_service *s, struct cow_export *e, char **args,
                int n, struct control_reply *r)
{
  return cow_disk_job_resume (e->disk);
}

static int
cmd_job_cancel (struct cow_service *s, struct cow_export *e, char **args,
                int n, struct control_reply *r)
{
  return cow_disk_job_cancel (e->disk);
}

static int
cmd_job_speed (struct cow_service *s, struct cow_export *e, char **args,
               int n, struct control_reply *r)
{
  uint64_t speed;

  if (parse_number ("SPEED", args[1], &speed) == -1)
    return -1;
  return cow_disk_job_set_speed (e->disk, speed);
}

/* events [DISK]: a stream (control.h) of the events of every disk, or
 * of DISK, from now until the server stops. */
static char *
stream_take (void *sub, size_t *len)
{
  return events_sub_take (sub, len);
}

static void
stream_end (void *sub)
{
  events_unsubscribe (sub);
}

static int
cmd_events (struct cow_service *s, struct cow_export *e, char **args, int n,
            struct control_reply *r)
{
  struct events_sub *sub = events_subscribe (s->bus, e ? e->name : NULL);
  struct control_stream st = {
    .take = stream_take, .end = stream_end, .opaque = sub,
  };

  if (sub == NULL)
    return -1;
  st.fd = events_sub_fd (sub);
  control_reply_stream (r, &st);
  return 0;
}

const struct cow_command cow_commands[] = {
  { "status", 0, 0, false, cmd_status, "status" },
  { "blklist", 0, 0, false, cmd_blklist, "blklist" },
  { "list", 1, 1, true, cmd_list, "list DISK" },
  { "snapshot", 3, 3, true, cmd_snapshot, "snapshot DISK NAME DESC" },
  { "snapshot-atomic", 2, 2, false, cmd_snapshot_atomic,
    "snapshot-atomic NAME DESC" },
  { "revert", 3, 3, true, cmd_revert, "revert DISK NAME FORCE" },
  { "commit", 5, 5, true, cmd_commit, "commit DISK TOP BASE FLAGS SPEED" },
  { "pull", 4, 4, true, cmd_pull, "pull DISK BASE FLAGS SPEED" },
  { "delete", 3, 3, true, cmd_delete, "delete DISK NAME SPEED" },
  { "jobs", 0, 1, true, cmd_jobs, "jobs [DISK]" },
  { "job-pause", 1, 1, true, cmd_job_pause, "job-pause DISK" },
  { "job-resume", 1, 1, true, cmd_job_resume, "job-resume DISK" },
  { "job-cancel", 1, 1, true, cmd_job_cancel, "job-cancel DISK" },
  { "job-speed", 2, 2, true, cmd_job_speed, "job-speed DISK SPEED" },
  { "events", 0, 1, true, cmd_events, "events [DISK]" },
};
const size_t cow_n_commands = sizeof cow_commands / sizeof cow_commands[0];

int
cow_service_dispatch (void *service, char **words, int n,
                      struct control_reply *r)
{
  struct cow_service *s = service;
  const struct cow_command *c = NULL;
  struct cow_export *e = NULL;
  int n_args = n - 1;

  for (size_t i = 0; i < cow_n_commands && c == NULL; i++)
    if (strcmp (words[0], cow_commands[i].name) == 0)
      c = &cow_commands[i];
  if (c == NULL) {
    cow_error_set (EINVAL, "unknown command '%.32s'", words[0]);
    return -1;
  }
  if (n_args < c->min_args || n_args > c->max_args) {
    wrong_args (c->name);
    return -1;
  }
  if (c->disk_arg && n_args > 0) {
    e = find (s, words[1], false);
    if (e == NULL) {
      cow_error_set (ENOENT, "no disk named '%.64s'", words[1]);
      return -1;
    }
  }
  return c->run (s, e, words + 1, n_args, r);
}

/*----------------------------------------------------------------------
 * The control socket.
 */

/* The control server's lines go to the service's log (the bus's). */
static void
service_log (void *service, const char *line)
{
  struct cow_service *s = service;
  char *l = NULL;

  if (asprintf (&l, "control: %s", line) == -1)
    return;
  events_bus_log (s->bus, COW_LOG_NOTICE, l);
  free (l);
}

void
cow_service_set_log (struct cow_service *s, cow_log_fn log, void *opaque)
{
  events_bus_set_log (s->bus, log, opaque);
}

int
cow_service_start_control (struct cow_service *s, const char *path,
                           const uid_t *allow_uids, size_t n_allow,
                           cow_log_fn log, void *opaque)
{
  if (s->control == NULL
      && cow_service_listen_control (s, path, allow_uids, n_allow, log,
                                     opaque) == -1)
    return -1;
  return control_serve (s->control);
}

int
cow_service_listen_control (struct cow_service *s, const char *path,
                            const uid_t *allow_uids, size_t n_allow,
                            cow_log_fn log, void *opaque)
{
  if (s->control) {
    cow_error_set (EBUSY, "%s: the control socket is already started", path);
    return -1;
  }
  if (log)
    events_bus_set_log (s->bus, log, opaque);
  s->control = control_listen (path, allow_uids, n_allow,
                               cow_service_dispatch, service_log, s);
  return s->control ? 0 : -1;
}

void
cow_service_stop_control (struct cow_service *s)
{
  control_stop (s->control);
  s->control = NULL;
}
