/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit glue for cowchain: config keys into the engine's disk
 * configuration, nbdkit's callbacks into engine calls.  The disks served,
 * their NBD clients and the control socket's commands are the engine's
 * (a struct cow_service); nothing of the format is here.
 *
 * Several disks may be served, one NBD export each: "disk=NAME" starts a
 * disk and the per-disk keys after it belong to it.  Without disk=, the
 * keys describe one disk that every export name reaches. */
#include <config.h>

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include "cowchain.h"

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL
#define MAX_DISKS 64

struct disk_entry {
  char *name;                   /* export name; "" for the unnamed disk */
  char *base, *overlay, *state, *base_format;
  char **allow_backing;         /* NULL-terminated */
  size_t n_allow_backing;
  uint32_t cluster_size;
  int compat;
  int subclusters;              /* 1 on, -1 off, 0 default */
  unsigned max_depth;           /* 0 = no automatic merges */
  uint32_t base_timeout_ms;     /* 0 = the default */
  unsigned seen;                /* KEY_* given for this disk */
  struct cow_disk *disk;
};

/* The keys that may be given once (per disk, or per server): a second
 * one is refused rather than silently winning. */
enum {
  KEY_BASE = 1 << 0, KEY_OVERLAY = 1 << 1, KEY_STATE = 1 << 2,
  KEY_BASE_FORMAT = 1 << 3, KEY_CLUSTER_SIZE = 1 << 4, KEY_COMPAT = 1 << 5,
  KEY_MAX_DEPTH = 1 << 6, KEY_BASE_TIMEOUT = 1 << 7,
  KEY_SYNC = 1 << 8, KEY_CACHE_SIZE = 1 << 9, KEY_CONTROL = 1 << 10,
  KEY_DEFAULT_EXPORT = 1 << 11, KEY_SUBCLUSTERS = 1 << 12,
};

static struct disk_entry disks[MAX_DISKS];
static size_t n_disks;
static bool named_disks;        /* disk= was used */
static char *default_export;

/* Keys for every disk. */
static enum cow_sync_mode sync_mode;
static uint32_t sync_interval_ms;
static char *control_path;
static unsigned server_seen;    /* server KEY_* given */
static uid_t allow_uids[16];
static size_t n_allow_uids;
/* The disks as served (from get_ready on): what a connection's export
 * name reaches, and the control socket. */
static struct cow_service *service;

/* Debug flags, -D cowchain.AREA=1 (shown with -v, as all nbdkit_debug):
 * the engine's COW_DEBUG_* areas.  Exported, as nbdkit sets them by
 * name; read once, in get_ready. */
NBDKIT_DLL_PUBLIC int cowchain_debug_snapshot;
NBDKIT_DLL_PUBLIC int cowchain_debug_job;
NBDKIT_DLL_PUBLIC int cowchain_debug_control;
NBDKIT_DLL_PUBLIC int cowchain_debug_events;
NBDKIT_DLL_PUBLIC int cowchain_debug_sync;

static void
free_entry (struct disk_entry *e)
{
  free (e->name);
  free (e->base);
  free (e->overlay);
  free (e->state);
  free (e->base_format);
  for (size_t i = 0; i < e->n_allow_backing; i++)
    free (e->allow_backing[i]);
  free (e->allow_backing);
}

static void
cowchain_unload (void)
{
  /* Stops the control socket; the disks are ours to close. */
  cow_service_free (service);
  service = NULL;
  for (size_t i = 0; i < n_disks; i++) {
    if (disks[i].disk && cow_disk_close (disks[i].disk) == -1)
      nbdkit_error ("closing disk '%s': %s", disks[i].name,
                    cow_last_error ());
    free_entry (&disks[i]);
  }
  n_disks = 0;
  free (default_export);
  free (control_path);
}

/* value as a decimal number up to max: digits only (nbdkit's own
 * parser says "empty string where we expected a number" of a word, and
 * takes blanks and signs).  -1 if it is not one, nothing reported. */
static int
parse_decimal (const char *value, uint64_t max, uint64_t *out)
{
  uint64_t v = 0;

  if (value[0] == '\0')
    return -1;
  for (const char *p = value; *p; p++) {
    if (*p < '0' || *p > '9')
      return -1;
    if (v > (max - (uint64_t) (*p - '0')) / 10)
      return -1;
    v = v * 10 + (uint64_t) (*p - '0');
  }
  *out = v;
  return 0;
}

/* Record that key was given; refuse it if it was given before (for
 * disk, or for the server if disk is NULL). */
static int
once (unsigned *seen, unsigned bit, const struct disk_entry *disk,
      const char *key, const char *value)
{
  if (*seen & bit) {
    if (disk && disk->name[0])
      nbdkit_error ("%s=%s: %s= was already given for disk '%s'; give it "
                    "once per disk", key, value, key, disk->name);
    else if (disk && named_disks)
      nbdkit_error ("%s=%s: %s= was already given for this disk; give it "
                    "once per disk", key, value, key);
    else
      nbdkit_error ("%s=%s: %s= was already given; give it once", key,
                    value, key);
    return -1;
  }
  *seen |= bit;
  return 0;
}

static int
set_string (char **dst, const char *key, const char *value)
{
  if (*dst) {
    nbdkit_error ("%s given twice", key);
    return -1;
  }
  if (value[0] == '\0') {
    nbdkit_error ("%s: empty value", key);
    return -1;
  }
  *dst = strdup (value);
  if (*dst == NULL) {
    nbdkit_error ("strdup: %m");
    return -1;
  }
  return 0;
}

/* The disk that per-disk keys apply to now. */
static struct disk_entry *
current (const char *key)
{
  if (n_disks == 0) {
    disks[0].name = strdup ("");
    if (disks[0].name == NULL) {
      nbdkit_error ("strdup: %m");
      return NULL;
    }
    n_disks = 1;
  }
  return &disks[n_disks - 1];
}

static int
new_disk (const char *name)
{
  if (cow_service_check_name (name) == -1) {
    nbdkit_error ("disk: %s", cow_last_error ());
    return -1;
  }
  if (n_disks > 0 && !named_disks) {
    nbdkit_error ("disk=%s: per-disk keys were given before the first "
                  "disk=; put disk= first", name);
    return -1;
  }
  for (size_t i = 0; i < n_disks; i++)
    if (strcmp (disks[i].name, name) == 0) {
      nbdkit_error ("disk=%s given twice", name);
      return -1;
    }
  if (n_disks == MAX_DISKS) {
    nbdkit_error ("at most %d disks per server", MAX_DISKS);
    return -1;
  }
  disks[n_disks].name = strdup (name);
  if (disks[n_disks].name == NULL) {
    nbdkit_error ("strdup: %m");
    return -1;
  }
  n_disks++;
  named_disks = true;
  return 0;
}

static int
parse_sync (const char *value)
{
  if (once (&server_seen, KEY_SYNC, NULL, "sync", value) == -1)
    return -1;
  if (strcmp (value, "flush") == 0)
    sync_mode = COW_SYNC_FLUSH;
  else if (strcmp (value, "always") == 0)
    sync_mode = COW_SYNC_ALWAYS;
  else {
    uint64_t ms;
    if (parse_decimal (value, 3600000, &ms) == -1) {
      nbdkit_error ("sync: '%s' is not flush, always or a number of "
                    "milliseconds from 1 to 3600000", value);
      return -1;
    }
    if (ms == 0 || ms > 3600000) {
      nbdkit_error ("sync: interval %s ms must be from 1 to 3600000 (or use "
                    "sync=flush or sync=always)", value);
      return -1;
    }
    sync_mode = COW_SYNC_INTERVAL;
    sync_interval_ms = (uint32_t) ms;
  }
  return 0;
}

/* The once-only per-disk keys. */
static const struct {
  const char *key;
  unsigned bit;
} disk_once_keys[] = {
  { "base", KEY_BASE }, { "overlay", KEY_OVERLAY }, { "state", KEY_STATE },
  { "base-format", KEY_BASE_FORMAT }, { "cluster-size", KEY_CLUSTER_SIZE },
  { "compat", KEY_COMPAT }, { "max-depth", KEY_MAX_DEPTH },
  { "base-timeout", KEY_BASE_TIMEOUT }, { "subclusters", KEY_SUBCLUSTERS },
};

static int
disk_config (struct disk_entry *e, const char *key, const char *value)
{
  for (size_t i = 0; i < sizeof disk_once_keys / sizeof disk_once_keys[0];
       i++)
    if (strcmp (key, disk_once_keys[i].key) == 0
        && once (&e->seen, disk_once_keys[i].bit, e, key, value) == -1)
      return -1;
  if (strcmp (key, "base") == 0)
    return set_string (&e->base, key, value);
  if (strcmp (key, "overlay") == 0)
    return set_string (&e->overlay, key, value);
  if (strcmp (key, "state") == 0)
    return set_string (&e->state, key, value);
  if (strcmp (key, "base-format") == 0) {
    if (strcmp (value, "raw") != 0 && strcmp (value, "qcow2") != 0) {
      nbdkit_error ("base-format: '%s' is not raw or qcow2", value);
      return -1;
    }
    return set_string (&e->base_format, key, value);
  }
  if (strcmp (key, "cluster-size") == 0) {
    int64_t r = nbdkit_parse_size (value);
    if (r == -1) {
      nbdkit_error ("cluster-size: '%s' is not a size", value);
      return -1;
    }
    if (r < 512 || r > (2 << 20) || (r & (r - 1))) {
      nbdkit_error ("cluster-size: %s is not a power of two from 512 to 2M",
                    value);
      return -1;
    }
    e->cluster_size = (uint32_t) r;
    return 0;
  }
  if (strcmp (key, "compat") == 0) {
    if (strcmp (value, "1.1") == 0 || strcmp (value, "v3") == 0)
      e->compat = 3;
    else if (strcmp (value, "0.10") == 0 || strcmp (value, "v2") == 0)
      e->compat = 2;
    else {
      nbdkit_error ("compat: '%s' is not 0.10 or 1.1", value);
      return -1;
    }
    return 0;
  }
  if (strcmp (key, "subclusters") == 0) {
    int b = nbdkit_parse_bool (value);
    if (b == -1) {
      nbdkit_error ("subclusters: '%s' is not on or off", value);
      return -1;
    }
    e->subclusters = b ? 1 : -1;
    return 0;
  }
  if (strcmp (key, "max-depth") == 0) {
    uint64_t n;
    if (parse_decimal (value, 1000, &n) == -1) {
      nbdkit_error ("max-depth: '%s' is not a number from 0 to 1000 "
                    "(0 = off)", value);
      return -1;
    }
    e->max_depth = (unsigned) n;
    return 0;
  }
  if (strcmp (key, "base-timeout") == 0) {
    char *end;
    double t;

    /* Decimal only: strtod also takes hex, "inf" and leading blanks. */
    if (value[strspn (value, "0123456789.")] != '\0') {
      nbdkit_error ("base-timeout: '%s' is not a number of seconds from "
                    "0.001 to 86400 (or 0 = never)", value);
      return -1;
    }
    errno = 0;
    t = strtod (value, &end);
    if (errno || end == value || *end || !(t >= 0 && t <= 86400)
        || (t > 0 && t < 0.001)) {
      nbdkit_error ("base-timeout: '%s' is not a number of seconds from "
                    "0.001 to 86400 (or 0 = never)", value);
      return -1;
    }
    e->base_timeout_ms = t == 0 ? COW_TIMEOUT_NONE
      : (uint32_t) (t * 1000 + 0.5);
    return 0;
  }
  if (strcmp (key, "allow-backing") == 0) {
    char **v;
    if (value[0] == '\0') {
      nbdkit_error ("allow-backing: empty value (give the path of a file "
                    "that a qcow2 base's chain may name)");
      return -1;
    }
    v = realloc (e->allow_backing,
                        (e->n_allow_backing + 2) * sizeof *v);
    if (v == NULL) {
      nbdkit_error ("realloc: %m");
      return -1;
    }
    e->allow_backing = v;
    v[e->n_allow_backing] = strdup (value);
    if (v[e->n_allow_backing] == NULL) {
      nbdkit_error ("strdup: %m");
      return -1;
    }
    v[++e->n_allow_backing] = NULL;
    return 0;
  }
  return 1;                     /* not a per-disk key */
}

static int
cowchain_config (const char *key, const char *value)
{
  struct disk_entry *e;
  int r;

  if (strcmp (key, "disk") == 0)
    return new_disk (value);
  if (strcmp (key, "sync") == 0)
    return parse_sync (value);
  if (strcmp (key, "cache-size") == 0) {
    int64_t s;
    if (once (&server_seen, KEY_CACHE_SIZE, NULL, key, value) == -1)
      return -1;
    s = nbdkit_parse_size (value);
    if (s == -1) {
      nbdkit_error ("cache-size: '%s' is not a size", value);
      return -1;
    }
    if (s < (64 << 10)) {
      nbdkit_error ("cache-size: %s is below the minimum of 64K", value);
      return -1;
    }
    cow_cache_set_budget ((uint64_t) s);
    return 0;
  }
  if (strcmp (key, "control") == 0) {
    /* Made absolute now: the socket is created after nbdkit went into
     * the background, in /. */
    char *abs;
    int rc;
    if (once (&server_seen, KEY_CONTROL, NULL, key, value) == -1)
      return -1;
    if (value[0] == '\0')
      return set_string (&control_path, key, value);
    abs = nbdkit_absolute_path (value);
    if (abs == NULL)
      return -1;
    rc = set_string (&control_path, key, abs);
    free (abs);
    return rc;
  }
  if (strcmp (key, "control-allow-uid") == 0) {
    uint64_t uid;
    if (parse_decimal (value, UINT32_MAX, &uid) == -1
        || (uid_t) uid == (uid_t) -1) {
      nbdkit_error ("control-allow-uid: '%s' is not a uid (a number from 0 "
                    "to 4294967294)", value);
      return -1;
    }
    if (n_allow_uids == sizeof allow_uids / sizeof allow_uids[0]) {
      nbdkit_error ("control-allow-uid: too many (at most %zu)",
                    sizeof allow_uids / sizeof allow_uids[0]);
      return -1;
    }
    allow_uids[n_allow_uids++] = (uid_t) uid;
    return 0;
  }
  if (strcmp (key, "default-export") == 0) {
    if (once (&server_seen, KEY_DEFAULT_EXPORT, NULL, key, value) == -1)
      return -1;
    return set_string (&default_export, key, value);
  }

  e = current (key);
  if (e == NULL)
    return -1;
  r = disk_config (e, key, value);
  if (r != 1)
    return r;
  nbdkit_error ("unknown parameter '%s' (see nbdkit cowchain --help)", key);
  return -1;
}

/* path made absolute with its directory's symbolic links resolved (the
 * file itself may not exist yet), or NULL if its directory cannot be
 * resolved (opening it will say why). */
static char *
canonical_path (const char *path)
{
  char *r = realpath (path, NULL), *copy, *slash, *dir, *out = NULL;
  const char *name;

  if (r)
    return r;
  copy = strdup (path);
  if (copy == NULL)
    return NULL;
  slash = strrchr (copy, '/');
  name = slash ? slash + 1 : copy;
  if (slash == copy)
    dir = strdup ("");
  else if (slash) {
    *slash = '\0';
    dir = realpath (copy, NULL);
  }
  else
    dir = realpath (".", NULL);
  if (dir) {
    size_t len = strlen (dir) + strlen (name) + 2;
    out = malloc (len);
    if (out)
      snprintf (out, len, "%s/%s", strcmp (dir, "/") == 0 ? "" : dir, name);
  }
  free (dir);
  free (copy);
  return out;
}

/* Two disks on one overlay= file would both write it: say so, rather
 * than let the second fail on the first's lock as if another process
 * held it.  (Two on one state= directory: the engine says so.) */
static int
check_distinct_overlays (void)
{
  char *canon[MAX_DISKS];
  int ret = 0;

  for (size_t i = 0; i < n_disks; i++)
    canon[i] = disks[i].overlay ? canonical_path (disks[i].overlay) : NULL;
  for (size_t i = 0; i < n_disks && ret == 0; i++)
    for (size_t j = i + 1; j < n_disks && ret == 0; j++)
      if (canon[i] && canon[j] && strcmp (canon[i], canon[j]) == 0) {
        nbdkit_error ("disks '%s' and '%s' both name the same overlay= file "
                      "(%s): each disk needs its own", disks[i].name,
                      disks[j].name, canon[i]);
        ret = -1;
      }
  for (size_t i = 0; i < n_disks; i++)
    free (canon[i]);
  return ret;
}

static int
cowchain_config_complete (void)
{
  if (n_disks == 0) {
    nbdkit_error ("no disk configured: give base=IMAGE and overlay=LAYER or "
                  "state=DIR");
    return -1;
  }
  if (n_allow_uids && control_path == NULL) {
    nbdkit_error ("control-allow-uid needs control=SOCKET");
    return -1;
  }
  for (size_t i = 0; i < n_disks; i++) {
    struct disk_entry *e = &disks[i];
    const char *what = e->name[0] ? e->name : "the disk";
    if (e->overlay && e->state) {
      nbdkit_error ("%s: give overlay= or state=, not both", what);
      return -1;
    }
    if (!e->overlay && !e->state) {
      if (e->base)
        nbdkit_error ("%s: overlay=LAYER.qcow2 or state=DIR is required",
                      what);
      else
        nbdkit_error ("%s: base=IMAGE and overlay=LAYER.qcow2 (or state=DIR) "
                      "are required", what);
      return -1;
    }
    if (e->overlay && !e->base) {
      nbdkit_error ("%s: base=IMAGE is required", what);
      return -1;
    }
    if (e->overlay && e->max_depth) {
      nbdkit_error ("%s: max-depth= needs state=DIR (an overlay= disk has "
                    "one layer)", what);
      return -1;
    }
  }
  if (check_distinct_overlays () == -1)
    return -1;
  if (default_export) {
    size_t i;
    for (i = 0; i < n_disks; i++)
      if (strcmp (disks[i].name, default_export) == 0)
        break;
    if (i == n_disks) {
      nbdkit_error ("default-export: no disk named '%s'", default_export);
      return -1;
    }
  }
  return 0;
}

#define cowchain_config_help \
  "base=IMAGE               read-only base: raw or qcow2 file, or an NBD URI\n" \
  "base-format=raw|qcow2    format of the base (default: by magic)\n" \
  "overlay=LAYER.qcow2      a single copy-on-write layer, created if absent\n" \
  "state=DIR                or: a state directory (layers + manifest), for\n" \
  "                         snapshots; base= may be left out once it exists\n" \
  "cluster-size=SIZE        cluster size of new layers (512..2M, default 64K)\n" \
  "compat=1.1|0.10          qcow2 version of new layers (default 1.1)\n" \
  "subclusters=on|off       extended L2 entries in new layers (default on\n" \
  "                         for compat 1.1 with clusters of 16K or more)\n" \
  "max-depth=N              merge unnamed frozen layers in the background\n" \
  "                         while the chain has more than N layers (state=\n" \
  "                         disks; 0..1000, default 0 = never)\n" \
  "base-timeout=SECONDS     a request to a remote NBD base fails (EIO)\n" \
  "                         after this long without an answer (default\n" \
  "                         30, 0 = never)\n" \
  "allow-backing=PATH       a file a qcow2 base's chain may name outside\n" \
  "                         the base's directory (repeatable)\n" \
  "disk=NAME                start another disk (NBD export NAME); the keys\n" \
  "                         above that follow belong to it\n" \
  "default-export=NAME      disk for clients that send no export name\n" \
  "sync=flush|always|MS     durability policy (default flush)\n" \
  "cache-size=SIZE          metadata cache of the whole server, all layers\n" \
  "                         of all disks (default 64M)\n" \
  "control=SOCKET           control socket for the cowchain tool\n" \
  "control-allow-uid=UID    another uid allowed on the control socket\n" \
  "                         (repeatable; makes the socket mode 0666)"

static void log_fn (void *opaque, enum cow_log_level level,
                    const char *line);

static int
cowchain_get_ready (void)
{
  cow_debug_set ((cowchain_debug_snapshot ? COW_DEBUG_SNAPSHOT : 0)
                 | (cowchain_debug_job ? COW_DEBUG_JOB : 0)
                 | (cowchain_debug_control ? COW_DEBUG_CONTROL : 0)
                 | (cowchain_debug_events ? COW_DEBUG_EVENTS : 0)
                 | (cowchain_debug_sync ? COW_DEBUG_SYNC : 0), log_fn, NULL);
  for (size_t i = 0; i < n_disks; i++) {
    struct disk_entry *e = &disks[i];
    struct cow_disk_config cfg = {
      .base = e->base,
      .base_format = e->base_format,
      .overlay = e->overlay,
      .state_dir = e->state,
      .cluster_size = e->cluster_size,
      .compat = e->compat,
      .subclusters = e->subclusters,
      .sync_mode = sync_mode,
      .sync_interval_ms = sync_interval_ms,
      .allow_backing = (const char *const *) e->allow_backing,
      .base_timeout_ms = e->base_timeout_ms,
    };
    e->disk = cow_disk_open (&cfg);
    if (e->disk == NULL) {
      if (e->name[0])
        nbdkit_error ("disk '%s': %s", e->name, cow_last_error ());
      else
        nbdkit_error ("%s", cow_last_error ());
      return -1;
    }
    if (cow_disk_base_format_guessed (e->disk))
      nbdkit_error ("warning: %s%s%sbase %s: no base-format= given, so the "
                    "format was guessed from the file's first bytes: %s.  "
                    "A raw image that starts like a qcow2 header would be "
                    "misread; give base-format=raw or base-format=qcow2",
                    e->name[0] ? "disk '" : "", e->name,
                    e->name[0] ? "': " : "", e->base,
                    cow_disk_base_format_guessed (e->disk));
  }
  service = cow_service_new ();
  if (service == NULL) {
    nbdkit_error ("%s", cow_last_error ());
    return -1;
  }
  cow_service_set_log (service, log_fn, NULL);
  for (size_t i = 0; i < n_disks; i++)
    if (cow_service_add (service, disks[i].name, disks[i].disk) == NULL) {
      nbdkit_error ("%s", cow_last_error ());
      return -1;
    }
  if (default_export && cow_service_set_default (service,
                                                 default_export) == -1) {
    nbdkit_error ("%s", cow_last_error ());
    return -1;
  }
  /* The control socket is made now, before nbdkit forks into the
   * background and its start command returns, so that a `cowchain`
   * command run right after finds it (connections wait in its backlog
   * until after_fork serves it); a bad path still stops nbdkit here. */
  if (control_path
      && cow_service_listen_control (service, control_path, allow_uids,
                                     n_allow_uids, log_fn, NULL) == -1) {
    nbdkit_error ("%s", cow_last_error ());
    return -1;
  }
  return 0;
}

/* The engine's log: events, control requests, debug areas.
 * nbdkit_error is nbdkit's only channel that is always shown (stderr, or
 * syslog with --log=syslog): failures and control requests go there;
 * events that went as planned and debug lines go to nbdkit_debug, shown
 * with -v. */
static void
log_fn (void *opaque, enum cow_log_level level, const char *line)
{
  if (level >= COW_LOG_NOTICE)
    nbdkit_error ("%s", line);
  else
    nbdkit_debug ("%s", line);
}

/* Threads started before nbdkit forks into the background would not
 * exist in the server, so the sync thread, max-depth (whose merges run
 * on a job thread) and the control socket's threads wait until after
 * the fork. */
static int
cowchain_after_fork (void)
{
  for (size_t i = 0; i < n_disks; i++) {
    if (cow_disk_start_sync (disks[i].disk) == -1) {
      nbdkit_error ("%s", cow_last_error ());
      return -1;
    }
    if (disks[i].max_depth)
      cow_disk_set_max_depth (disks[i].disk, disks[i].max_depth);
  }
  if (control_path) {
    if (cow_service_start_control (service, control_path, allow_uids,
                                   n_allow_uids, log_fn, NULL) == -1) {
      nbdkit_error ("%s", cow_last_error ());
      return -1;
    }
  }
  return 0;
}

/* The line nbdinfo --list shows for a disk: what it is made of now
 * (its base and its active layer, which a snapshot or revert changes)
 * and whether a client that sends no export name reaches it.  Paths are
 * shown escaped: the description must be printable UTF-8. */
static int
add_export (struct nbdkit_exports *exports, const struct disk_entry *e,
            bool is_default)
{
  struct cow_layer_info *layers = NULL;
  size_t n = 0, snaps = 0;
  char *base = cow_text_printable (cow_disk_base (e->disk));
  char *active = NULL;
  char desc[1024];

  if (cow_disk_layers (e->disk, &layers, &n) == 0 && n > 0) {
    active = cow_text_printable (layers[n - 1].path);
    for (size_t i = 0; i < n; i++)
      snaps += layers[i].snapshot != NULL;
  }
  /* Cut (never fail) when the paths are long. */
  snprintf (desc, sizeof desc,
            "cowchain disk %s: base %s, active layer %s, %zu layer%s, "
            "%zu snapshot%s%s",
            e->name[0] ? e->name : "(unnamed)", base ? base : "?",
            active ? active : "?", n, n == 1 ? "" : "s",
            snaps, snaps == 1 ? "" : "s",
            is_default ? "; the default export" : "");
  cow_layer_info_free (layers, n);
  free (base);
  free (active);
  return nbdkit_add_export (exports, e->name, desc);
}

/* Every disk is listed under the one name that reaches it: a disk=NAME
 * disk as NAME, the one unnamed disk as "".  The default export ("")
 * also reaches the default disk, which its description says. */
static int
cowchain_list_exports (int readonly, int is_tls, struct nbdkit_exports *exports)
{
  const char *def = default_export ? default_export : disks[0].name;

  for (size_t i = 0; i < n_disks; i++)
    if (add_export (exports, &disks[i],
                    strcmp (disks[i].name, def) == 0) == -1)
      return -1;
  return 0;
}

static const char *
cowchain_default_export (int readonly, int is_tls)
{
  if (default_export)
    return default_export;
  return disks[0].name;
}

/* The names a client may ask for, for the refusal below. */
static void
served_names (char *buf, size_t len)
{
  size_t used = 0;

  buf[0] = '\0';
  for (size_t i = 0; i < n_disks && used < len; i++) {
    int k = snprintf (buf + used, len - used, "%s%s", i ? ", " : "exports ",
                      disks[i].name);
    if (k < 0)
      break;
    used += (size_t) k;
  }
}

/* The handle of a connection is the served disk its export name
 * reaches, counted as one client of it until the connection closes.
 * Only the listed names and "" (the default disk; oldstyle clients send
 * no name) reach a disk: a client that asks for another name is refused
 * rather than given some other disk, also when the one disk is unnamed
 * (the service itself would serve that disk under any name). */
static void *
cowchain_open (int readonly)
{
  const char *name = nbdkit_export_name ();
  struct cow_export *e;

  if (name == NULL)
    name = "";
  e = cow_service_lookup (service, name);
  if (e != NULL && name[0] && strcmp (cow_export_name (e), name) != 0)
    e = NULL;
  if (e == NULL) {
    char served[512], cut[65];
    char *shown;

    /* The client's bytes, at most 64 of them, escaped for the log (a
     * character cut in two shows as \xNN escapes). */
    snprintf (cut, sizeof cut, "%s", name);
    shown = cow_text_printable (cut);
    if (named_disks)
      served_names (served, sizeof served);
    else
      snprintf (served, sizeof served, "one unnamed disk, export \"\"");
    nbdkit_error ("no export named '%s%s' is served here (%s; \"\" "
                  "reaches the default one); nbdinfo --list shows them",
                  shown ? shown : "?", strlen (name) > 64 ? "..." : "",
                  served);
    free (shown);
    errno = ENOENT;
    return NULL;
  }
  cow_export_attach (e);
  return e;
}

static void
cowchain_close (void *h)
{
  cow_export_detach (h);
}

#define DISK_OF(h) cow_export_disk (h)

static void
report (void)
{
  nbdkit_error ("%s", cow_last_error ());
  nbdkit_set_error (cow_last_errno ());
}

static int64_t
cowchain_get_size (void *h)
{
  return (int64_t) cow_disk_size (DISK_OF (h));
}

static int
cowchain_block_size (void *h, uint32_t *minimum, uint32_t *preferred,
                     uint32_t *maximum)
{
  *minimum = 1;
  *preferred = cow_disk_cluster_size (DISK_OF (h));  /* 512 B .. 2 MiB: valid */
  *maximum = 0xffffffff;
  return 0;
}

static int
cowchain_can_multi_conn (void *h)
{
  return 1;
}

static int
cowchain_can_fua (void *h)
{
  return NBDKIT_FUA_NATIVE;
}

static int
cowchain_can_true (void *h)
{
  return 1;
}

static unsigned
to_cow_flags (uint32_t flags)
{
  unsigned f = 0;

  if (flags & NBDKIT_FLAG_FUA)
    f |= COW_FLAG_FUA;
  if (flags & NBDKIT_FLAG_MAY_TRIM)
    f |= COW_FLAG_MAY_TRIM;
  if (flags & NBDKIT_FLAG_FAST_ZERO)
    f |= COW_FLAG_FAST_ZERO;
  return f;
}

static int
cowchain_pread (void *h, void *buf, uint32_t count, uint64_t offset,
                uint32_t flags)
{
  if (cow_disk_pread (DISK_OF (h), buf, count, offset) == -1) {
    report ();
    return -1;
  }
  return 0;
}

static int
cowchain_pwrite (void *h, const void *buf, uint32_t count, uint64_t offset,
                 uint32_t flags)
{
  if (cow_disk_pwrite (DISK_OF (h), buf, count, offset,
                       to_cow_flags (flags)) == -1) {
    report ();
    return -1;
  }
  return 0;
}

static int
cowchain_zero (void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
  if (cow_disk_zero (DISK_OF (h), count, offset, to_cow_flags (flags)) == -1) {
    /* A refused fast zero is not worth a log line. */
    if (cow_last_errno () != ENOTSUP || !(flags & NBDKIT_FLAG_FAST_ZERO))
      nbdkit_error ("%s", cow_last_error ());
    nbdkit_set_error (cow_last_errno ());
    return -1;
  }
  return 0;
}

static int
cowchain_trim (void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
  if (cow_disk_trim (DISK_OF (h), count, offset, to_cow_flags (flags)) == -1) {
    report ();
    return -1;
  }
  return 0;
}

static int
cowchain_flush (void *h, uint32_t flags)
{
  if (cow_disk_flush (DISK_OF (h)) == -1) {
    report ();
    return -1;
  }
  return 0;
}

static int
add_extent (void *opaque, uint64_t offset, uint64_t length, uint32_t type)
{
  struct nbdkit_extents *e = opaque;
  uint32_t t = 0;

  if (type & COW_EXTENT_HOLE)
    t |= NBDKIT_EXTENT_HOLE;
  if (type & COW_EXTENT_ZERO)
    t |= NBDKIT_EXTENT_ZERO;
  return nbdkit_add_extent (e, offset, length, t) == -1 ? -1 : 0;
}

static int
cowchain_extents (void *h, uint32_t count, uint64_t offset, uint32_t flags,
                  struct nbdkit_extents *extents)
{
  if (cow_disk_extents (DISK_OF (h), count, offset, add_extent,
                        extents) == -1) {
    report ();
    return -1;
  }
  return 0;
}

static struct nbdkit_plugin plugin = {
  .name = "cowchain",
  .longname = "cowchain: live external snapshots over NBD",
  .version = PACKAGE_VERSION,
  .unload = cowchain_unload,
  .config = cowchain_config,
  .config_complete = cowchain_config_complete,
  .config_help = cowchain_config_help,
  .magic_config_key = "base",
  .get_ready = cowchain_get_ready,
  .after_fork = cowchain_after_fork,
  .list_exports = cowchain_list_exports,
  .default_export = cowchain_default_export,
  .open = cowchain_open,
  .close = cowchain_close,
  .get_size = cowchain_get_size,
  .block_size = cowchain_block_size,
  .can_write = cowchain_can_true,
  .can_flush = cowchain_can_true,
  .can_fua = cowchain_can_fua,
  .can_trim = cowchain_can_true,
  .can_zero = cowchain_can_true,
  .can_fast_zero = cowchain_can_true,
  .can_extents = cowchain_can_true,
  .can_multi_conn = cowchain_can_multi_conn,
  .pread = cowchain_pread,
  .pwrite = cowchain_pwrite,
  .zero = cowchain_zero,
  .trim = cowchain_trim,
  .flush = cowchain_flush,
  .extents = cowchain_extents,
  .errno_is_preserved = 0,
};

NBDKIT_REGISTER_PLUGIN (plugin)
