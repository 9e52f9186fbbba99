/* SPDX-License-Identifier: BSD-3-Clause */
/* cowchain engine API: a virtual disk made of a read-only base and a
 * copy-on-write qcow2 layer on top.  Used by the nbdkit plugin, the
 * command line tool and the tests.  The engine knows nothing of nbdkit.
 *
 * Errors: every function that can fail returns -1 (or NULL) and leaves a
 * message and an errno in a per-thread last error, read back with
 * cow_last_error() and cow_last_errno().
 */
#ifndef COWCHAIN_H
#define COWCHAIN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Sync policy for clients that never send FLUSH. */
enum cow_sync_mode {
  COW_SYNC_FLUSH = 0,   /* honour FLUSH and FUA only (default) */
  COW_SYNC_ALWAYS,      /* every write is durable before it is answered */
  COW_SYNC_INTERVAL,    /* background flush every sync_interval_ms */
};

struct cow_disk_config {
  const char *base;          /* path of the base image (required) */
  const char *base_format;   /* "raw", or NULL to recognise by magic */
  const char *overlay;       /* path of the qcow2 layer; created if absent */
  /* Or: a state directory holding the disk's layers and manifest (needed
   * for snapshots).  base may be NULL once the manifest exists. */
  const char *state_dir;
  uint32_t cluster_size;     /* for a new overlay; 0 = 65536 */
  enum cow_sync_mode sync_mode;
  uint32_t sync_interval_ms; /* for COW_SYNC_INTERVAL */
  /* A limit of each layer's own metadata caches in bytes (tests use a
   * small one to force evictions); 0 = none: the process's shared budget
   * alone bounds them (cow_cache_set_budget). */
  uint64_t cache_size;
  bool readonly;             /* open everything read-only */
  int compat;                /* new overlay: 3 = compat 1.1 (default), 2 = 0.10 */
  /* Subclusters: extended L2 entries in new layers: 1 = on, -1 = off,
   * 0 = on where QEMU allows them (compat 1.1, clusters of 16K or more). */
  int subclusters;
  /* Absolute backing file names inside a qcow2 base chain are followed
   * only if listed here (NULL-terminated); relative ones only if they stay
   * in the base's directory. */
  const char *const *allow_backing;
  /* A remote NBD base: a request to it (or the connection at open) with
   * no answer after this long fails with EIO, and its connection is
   * dropped; 0 = COW_DEFAULT_BASE_TIMEOUT_MS, COW_TIMEOUT_NONE = never. */
  uint32_t base_timeout_ms;
  /* How long a chain change (snapshot, revert, a job's final switch)
   * waits for guest I/O in flight to drain before it fails with
   * ETIMEDOUT, changing nothing; 0 = COW_DEFAULT_DRAIN_TIMEOUT_MS. */
  uint32_t drain_timeout_ms;
};
#define COW_TIMEOUT_NONE UINT32_MAX
#define COW_DEFAULT_BASE_TIMEOUT_MS 30000u
#define COW_DEFAULT_DRAIN_TIMEOUT_MS 10000u

/* Flags of the I/O calls (same meaning as nbdkit's). */
#define COW_FLAG_MAY_TRIM  (1u << 0)
#define COW_FLAG_FUA       (1u << 1)
#define COW_FLAG_FAST_ZERO (1u << 3)

/* Extent types reported by cow_disk_extents. */
#define COW_EXTENT_HOLE (1u << 0)
#define COW_EXTENT_ZERO (1u << 1)

struct cow_disk;

/* Open (and create the overlay of) a disk.  The background sync thread
 * of COW_SYNC_INTERVAL is started by cow_disk_start_sync(), so that a
 * caller that forks can open first and start threads after. */
struct cow_disk *cow_disk_open (const struct cow_disk_config *cfg);
int cow_disk_start_sync (struct cow_disk *d);
/* Flush and close.  Returns -1 if the final flush failed (the disk is
 * closed anyway). */
int cow_disk_close (struct cow_disk *d);

uint64_t cow_disk_size (const struct cow_disk *d);
uint32_t cow_disk_cluster_size (const struct cow_disk *d);

int cow_disk_pread (struct cow_disk *d, void *buf, uint32_t count,
                    uint64_t offset);
int cow_disk_pwrite (struct cow_disk *d, const void *buf, uint32_t count,
                     uint64_t offset, unsigned flags);
int cow_disk_zero (struct cow_disk *d, uint32_t count, uint64_t offset,
                   unsigned flags);
int cow_disk_trim (struct cow_disk *d, uint32_t count, uint64_t offset,
                   unsigned flags);
int cow_disk_flush (struct cow_disk *d);

/* Report the allocation of [offset, offset+count) through the whole
 * chain: fn is called for consecutive extents starting at offset (at
 * least one); it returns 0 to go on, 1 to stop, -1 on error. */
typedef int (*cow_extent_fn) (void *opaque, uint64_t offset, uint64_t length,
                              uint32_t type);
int cow_disk_extents (struct cow_disk *d, uint32_t count, uint64_t offset,
                      cow_extent_fn fn, void *opaque);

/* Live snapshots (state-directory disks only).
 *
 * cow_disk_snapshot freezes the active layer under the name and stacks a
 * new one on top.  Guest I/O pauses only for the switch; the old layer's
 * flush and the manifest update follow, and FLUSH/FUA requests wait for
 * them.  Names: see manifest.h (1-128 of [A-Za-z0-9._+-:@]; active,
 * base, layer-* and the disk's layer file names reserved); descriptions:
 * printable UTF-8, one line.
 * Errors: EINVAL bad or reserved name or bad description, EEXIST
 * duplicate name, ENOTSUP no state
 * directory, ENOSPC/EIO creating the new layer (nothing changed).
 * cow_disk_snapshot_group does it for several disks at one cut. */
int cow_disk_snapshot (struct cow_disk *d, const char *name,
                       const char *description);
int cow_disk_snapshot_group (struct cow_disk *const *disks, size_t n,
                             const char *name, const char *description);
/* Return the disk to a snapshot (by name, or by its layer file name):
 * the layers above it are dropped (their files deleted) and a new empty
 * layer is stacked on it.  ENOENT unknown name; EBUSY other snapshots
 * would be dropped and !force.  Connected NBD clients are the caller's
 * concern (a service's revert command refuses to revert under them
 * unless forced). */
int cow_disk_revert (struct cow_disk *d, const char *name, bool force);

struct cow_layer_info {
  char *path;            /* the layer file */
  int64_t created;       /* seconds since the epoch */
  char *snapshot;        /* NULL: no snapshot name */
  char *description;     /* NULL: none */
  bool active;
};
/* The chain, bottom (oldest layer) to top (active); free with
 * cow_layer_info_free.  Overlay-mode disks report their one layer. */
int cow_disk_layers (struct cow_disk *d, struct cow_layer_info **out,
                     size_t *n);
void cow_layer_info_free (struct cow_layer_info *v, size_t n);
/* The base as configured (path or URI) and its format. */
const char *cow_disk_base (const struct cow_disk *d);
/* 0 if the disk is healthy; else the errno of why it is degraded (a
 * chain change whose manifest could not be saved: FLUSH and FUA fail
 * with EIO until a retry saves it) and, in *reason (malloc'd, may be
 * NULL), the reason. */
int cow_disk_health (struct cow_disk *d, char **reason);
/* Pause (ns) that the last snapshot imposed on guest I/O. */
uint64_t cow_disk_last_pause_ns (const struct cow_disk *d);

/* Background merges (state-directory disks only).  One job at a time per
 * disk, on its own thread; guest I/O goes on.  A job changes the chain
 * only in its last step (under the exclusive chain lock, through the
 * manifest), so a job that is cancelled, fails or is killed leaves the
 * chain as it was and can be started again.
 *
 * Layers are named by the words "active" and "base", by layer file name
 * ("layer-000003.qcow2"), or by snapshot name, in that order: a snapshot
 * name never shadows the others (new names cannot take their forms; one
 * an older version recorded is reached by its layer file name).
 *
 * commit: the disk as seen at 'top' is written into 'base' (default: the
 *   layer right under top); the layers above base up to top leave the
 *   chain and base takes top's snapshot name.  top may be the active
 *   layer (active commit: the guest keeps writing, the job converges,
 *   then base becomes the active layer).  Writing into the original base
 *   needs allow_base_write.  Snapshots whose state would be lost (names
 *   on base and between it and top, and top's own when base is the
 *   original base, which carries no name) need force; they are dropped when
 *   the job starts (the states they name start changing then), so a
 *   cancelled commit leaves the chain without them.
 * pull: the data of the layers under the active one, down to (not
 *   including) 'base' (default: everything, the original base too), is
 *   copied into the active layer, which then backs onto base (or onto
 *   nothing: self-contained).  Snapshots cut from the chain need force.
 * delete: the snapshot name is removed at once and its layer merged into
 *   the layer above it (what the guest sees never changes).
 *
 * Errors when starting: ENOENT unknown layer, EINVAL bad range, EBUSY a
 * job is running or snapshots would be lost without force, EPERM base
 * write without allow_base_write, ENOTSUP no state directory or a remote
 * base to write. */
enum cow_job_kind { COW_JOB_COMMIT = 1, COW_JOB_PULL, COW_JOB_DELETE };
enum cow_job_state {
  COW_JOB_NONE = 0,     /* no job has run since the disk was opened */
  COW_JOB_RUNNING,
  COW_JOB_PAUSED,
  COW_JOB_COMPLETED,
  COW_JOB_FAILED,
  COW_JOB_CANCELLED,
};

struct cow_job_opts {
  const char *top;          /* commit: required */
  const char *base;         /* NULL: the default above */
  bool allow_base_write;
  bool force;
  uint64_t speed;           /* bytes per second; 0 = unlimited */
};

int cow_disk_commit (struct cow_disk *d, const struct cow_job_opts *o);
int cow_disk_pull (struct cow_disk *d, const struct cow_job_opts *o);
int cow_disk_delete (struct cow_disk *d, const char *name,
                     const struct cow_job_opts *o);

struct cow_job_info {
  enum cow_job_kind kind;
  enum cow_job_state state;
  char *top;                /* layer file names ("base" / "none") */
  char *base;
  uint64_t done, total;     /* bytes */
  uint64_t speed;           /* limit, bytes per second; 0 = none */
  uint64_t rate;            /* bytes per second: the last second's while
                               running, the average once ended */
  int64_t started, ended;   /* seconds since the epoch; ended 0 = running */
  int error;                /* errno of a failed job */
  char *message;            /* its error message, or NULL */
};
/* The running job, or else the last one (state COW_JOB_NONE if none);
 * free with cow_job_info_clear. */
int cow_disk_job_info (struct cow_disk *d, struct cow_job_info *out);
void cow_job_info_clear (struct cow_job_info *i);
const char *cow_job_kind_name (enum cow_job_kind k);
const char *cow_job_state_name (enum cow_job_state s);
/* ENOENT if no job is running. */
int cow_disk_job_pause (struct cow_disk *d);
int cow_disk_job_resume (struct cow_disk *d);
int cow_disk_job_cancel (struct cow_disk *d);
int cow_disk_job_set_speed (struct cow_disk *d, uint64_t speed);
/* Wait until no job runs; returns 0 if the last job completed, -1 with
 * its error otherwise (ECANCELED if cancelled). */
int cow_disk_job_wait (struct cow_disk *d);
/* Merge automatically (as delete does) the oldest frozen layer without a
 * snapshot name while the chain has more than n layers; 0 = never. */
void cow_disk_set_max_depth (struct cow_disk *d, unsigned n);

/* Serving disks: the disks one server serves under NBD export names,
 * the NBD clients connected to each, and the control socket through
 * which the `cowchain` tool snapshots and merges them (its framing:
 * cow/control.h; its commands: cow/service.c).  A front end opens the
 * disks, adds them to a service, maps each of its connections to one
 * (cow_service_lookup, cow_export_attach/detach) and starts the control
 * socket; the service runs the commands.
 *
 * Add every disk (and set the default) before serving a client or
 * starting the control socket: the set is read without a lock.  The
 * service does not own the disks: free it (which stops the control
 * socket) before closing them. */
struct cow_service;
struct cow_export;              /* one disk of a service */

struct cow_service *cow_service_new (void);
void cow_service_free (struct cow_service *s);
/* A disk name: 1 to 64 letters, digits, '.', '_' and '-'; 0, or -1
 * (EINVAL) with "name 'NAME' must be ..." as the last error. */
int cow_service_check_name (const char *name);
/* Serve d under name: a checked name, or "" for one unnamed disk that
 * every export name reaches (then it is the only disk).  NULL with
 * EINVAL (a bad name, or named and unnamed disks mixed) or EEXIST. */
struct cow_export *cow_service_add (struct cow_service *s, const char *name,
                                    struct cow_disk *d);
/* The disk that an empty export name (and the control protocol's "")
 * chooses; by default the first one added.  ENOENT if none is named so. */
int cow_service_set_default (struct cow_service *s, const char *name);
/* The disk an NBD client's export name reaches: the default for "" or
 * NULL, the disk of that name, or, on a service whose one disk is
 * unnamed, that disk for any name.  NULL (ENOENT) if none. */
struct cow_export *cow_service_lookup (const struct cow_service *s,
                                       const char *export_name);
struct cow_disk *cow_export_disk (const struct cow_export *e);
const char *cow_export_name (const struct cow_export *e);
/* Count an NBD connection on the disk from its open to its close (any
 * thread): the control socket's status shows the count, and a revert
 * is refused under connected clients unless forced. */
void cow_export_attach (struct cow_export *e);
void cow_export_detach (struct cow_export *e);
unsigned cow_export_clients (const struct cow_export *e);

/* The service's log: one printable line without a newline, and how
 * much it matters.  Told each control request and its outcome
 * (COW_LOG_NOTICE: "control: uid U: WORDS: ok", "control: uid U: WORDS:
 * error: MESSAGE", "control: uid U: refused: WHY", "control: uid U: no
 * request: WHY"), each event of its disks ("event: DISK KIND
 * KEY=VALUE...": COW_LOG_INFO for what went as planned, COW_LOG_ERROR
 * for a failure; the events are listed in docs/cowchain-control.pod),
 * and, from cow_debug_set, debug lines (COW_LOG_DEBUG).  Called from the
 * engine's threads (control, job, I/O), possibly at once; it must not
 * call back into the engine. */
enum cow_log_level {
  COW_LOG_DEBUG,                /* a debug area's line (cow_debug_set) */
  COW_LOG_INFO,                 /* an event that went as planned */
  COW_LOG_NOTICE,               /* a control request and its outcome */
  COW_LOG_ERROR,                /* a failure: snapshot, revert, job, a
                                   disk that became degraded */
};
typedef void (*cow_log_fn) (void *opaque, enum cow_log_level level,
                            const char *line);
/* Listen on path (a UNIX socket) and serve the control commands on the
 * service's disks until cow_service_stop_control, each connection on a
 * thread of its own.  Only our euid, root and allow_uids may talk; the
 * socket is mode 0600, or 0666 when allow_uids names another uid.  A
 * socket an earlier run left at path is replaced; any other file, or a
 * socket a server still listens on, is an error.  log may be NULL. */
int cow_service_start_control (struct cow_service *s, const char *path,
                               const uid_t *allow_uids, size_t n_allow,
                               cow_log_fn log, void *opaque);
/* The same in two steps, for a server that forks into the background:
 * cow_service_listen_control creates the socket (clients that connect
 * wait until it is served), then cow_service_start_control, after the
 * fork, starts serving it (its other arguments are then not used).  So
 * the socket exists as soon as the server's start command returns. */
int cow_service_listen_control (struct cow_service *s, const char *path,
                                const uid_t *allow_uids, size_t n_allow,
                                cow_log_fn log, void *opaque);
/* Stop listening and return once the commands still running have ended
 * (nothing if the socket was not started).  Event streams get their
 * queued events and the end line "." first. */
void cow_service_stop_control (struct cow_service *s);
/* Whether the control socket could be started at path (no other kind of
 * file there, no server listening on it, a directory that can take
 * it): 0, or -1 with the reason.  For refusing a bad path before a
 * server forks into the background. */
int cow_control_check_path (const char *path);

/* Images: what `cowchain info` and `cowchain check` show, for any qcow2
 * or raw file (not only a disk's layers).
 *
 * cow_image_info describes the image at path.  format: "qcow2" or "raw"
 * as declared by the image above it, or NULL to recognise it by its
 * magic.  referrer: the image that names path as its backing file, for
 * the error message when path cannot be found (NULL: none).  Flags:
 * COW_IMAGE_FORCE_SHARE reads an image that a running server or QEMU
 * holds (as qemu-img -U).  The backing name is not opened; full_backing
 * is the path it stands for, by the engine's rules: relative to the
 * directory of the image that names it, never for json: names or URLs
 * (then NULL).  Free with cow_image_info_clear. */
#define COW_IMAGE_FORCE_SHARE 0x1u

struct cow_image_info {
  char *filename;             /* path as given */
  const char *format;         /* "qcow2" or "raw" */
  uint64_t virtual_size;
  uint64_t actual_size;       /* bytes the file takes on its file system */
  uint64_t dev, ino;          /* of the file (to find a loop in a chain) */
  /* qcow2 only */
  uint64_t cluster_size;
  unsigned version;           /* 2 (compat 0.10) or 3 (compat 1.1) */
  unsigned refcount_bits;
  bool lazy_refcounts, corrupt, dirty;
  bool extended_l2;           /* extended L2 entries (subclusters) */
  char *backing_file;         /* as stored; NULL if none */
  char *backing_format;       /* header extension; NULL if none */
  char *full_backing;         /* the path it stands for; NULL if not a file */
};
int cow_image_info (const char *path, const char *format,
                    const char *referrer, unsigned flags,
                    struct cow_image_info *out);
void cow_image_info_clear (struct cow_image_info *ii);

/* Consistency check of a qcow2 image, in the manner of qemu-img check:
 * the reference count of every host cluster is rebuilt from the metadata
 * and compared with the stored refcounts.  With repair_leaks, leaks (and
 * nothing else) are repaired, only when the image has no other error;
 * refused for an image marked corrupt or dirty.  No other process may
 * write the image meanwhile.
 *
 * Returns 0 when the check ran to its end: *res holds the verdict (which
 * may still count check_errors, such as an unreadable L2 table).  Returns
 * -1 when it could not be done at all (the file cannot be opened, is not
 * a qcow2 image, has internal snapshots or persistent bitmaps, memory
 * runs out); then the last error says why and res->check_errors is at
 * least 1. */
#define COW_CHECK_MAX_MESSAGES 100
#define COW_CHECK_MESSAGE_LEN 256

struct cow_check_result {
  /* The verdict, in qemu-img check's terms. */
  uint64_t corruptions;        /* errors: data may be at risk */
  uint64_t leaks;              /* clusters whose refcount is too high */
  uint64_t check_errors;       /* the check itself failed somewhere */
  uint64_t leaks_fixed;        /* with repair_leaks */
  uint64_t corruptions_fixed;  /* always 0: corruptions are never repaired */
  bool repair_refused;         /* leaks not repaired: the image has errors */
  /* Guest clusters of the virtual size, and those the image holds (data,
   * compressed, or zero with a host cluster kept). */
  uint64_t total_clusters;
  uint64_t allocated_clusters;
  uint64_t fragmented_clusters;
  uint64_t compressed_clusters;
  /* End of the last host cluster that is referenced or has a refcount. */
  uint64_t image_end_offset;
  uint64_t cluster_size;
  /* What was found, in order; later findings are counted, not kept. */
  size_t n_messages;
  uint64_t messages_dropped;
  char messages[COW_CHECK_MAX_MESSAGES][COW_CHECK_MESSAGE_LEN];
};
int cow_image_check (const char *path, bool repair_leaks,
                     struct cow_check_result *res);

/* The control client: one request to a running server's control socket
 * (the protocol and its commands: cow/control.h).  Each payload line of
 * the reply comes split into its words, decoded. */
struct cow_control_line {
  int n;                       /* words; -1: the line does not decode */
  char **words;
};
struct cow_control_reply {
  size_t n;                    /* payload lines */
  struct cow_control_line *lines;
};
/* Send argv (argc words) as a request and read the reply, all within
 * timeout_ms (0 = no limit).  Returns 0 with the payload in *reply (free
 * with cow_control_free_reply), or -1 with the server's or the local
 * error as the last error (ETIMEDOUT, saying what it waited for, when the
 * time ran out). */
int cow_control_request (const char *socket_path, const char *const *argv,
                         int argc, int timeout_ms,
                         struct cow_control_reply *reply);
void cow_control_free_reply (struct cow_control_reply *reply);

/*----------------------------------------------------------------------
 * Events, logs and debug areas.
 */

/* The service's log (events of its disks, control requests) without a
 * control socket too: a server whose max-depth= merges run with no
 * control= still logs them.  cow_service_start_control sets it as well
 * (when its log is not NULL).  Set it before serving. */
void cow_service_set_log (struct cow_service *s, cow_log_fn log,
                          void *opaque);

/* Debug areas: lines a developer wants, off by default and costing one
 * test of a flag when off.  cow_debug_set turns on the areas of the
 * mask (process-wide, every disk), their lines going to log at
 * COW_LOG_DEBUG; 0 turns them all off.  Call it before any disk is
 * used. */
#define COW_DEBUG_SNAPSHOT 0x01u   /* snapshot and revert steps, timings */
#define COW_DEBUG_JOB      0x02u   /* merge jobs: plan, copy, final switch */
#define COW_DEBUG_CONTROL  0x04u   /* control connections and streams */
#define COW_DEBUG_EVENTS   0x08u   /* event subscribers, queues, drops */
#define COW_DEBUG_SYNC     0x10u   /* the sync=MS thread's flushes */
void cow_debug_set (unsigned areas, cow_log_fn log, void *opaque);

/* The control client for a request whose reply is a stream (events):
 * send argv, and once the server has answered "ok" (within timeout_ms,
 * 0 = no limit; the stream itself has no time limit) call fn for each
 * payload line as it arrives, split into its decoded words.  fn is also
 * called with line NULL: once right after "ok" (the subscription is in
 * place: what happens from then on is streamed), after each idle_ms
 * (0 = never) without a line, and when a signal interrupted the wait.
 * fn returns 0 to go on, 1 to end the stream here, -1 to end it with
 * its own last error.  Returns 0 when the server ended the stream (the
 * line ".": it is stopping) or fn returned 1; -1 with the server's
 * error reply, a time-out before "ok", a stream cut without its end
 * line (EPIPE), or fn's error. */
typedef int (*cow_control_line_fn) (void *opaque,
                                    const struct cow_control_line *line);
int cow_control_stream (const char *socket_path, const char *const *argv,
                        int argc, int timeout_ms, int idle_ms,
                        cow_control_line_fn fn, void *opaque);

/* Text shown to people (snapshot names, descriptions, paths).
 *
 * cow_utf8_decode: the code point of the UTF-8 sequence at s, its length
 * in *len; -1 (and *len 1) if s does not start a valid sequence (a stray
 * continuation byte, an overlong form, a surrogate, beyond U+10FFFF, a
 * truncated sequence).  s must not be at its terminating NUL. */
long cow_utf8_decode (const unsigned char *s, size_t *len);
/* A character a terminal acts on instead of showing it: C0 (U+0000 to
 * U+001F), DEL (U+007F), C1 (U+0080 to U+009F), or a bidirectional
 * formatting character. */
bool cow_text_is_control (long cp);
/* A copy of s that shows every control character as \uNNNN (\t, \n,
 * \r for those three), every invalid byte as \xNN, and '\' as "\\";
 * valid printable UTF-8 is kept as it is.  NULL on ENOMEM. */
char *cow_text_printable (const char *s);

/* Snapshot names: at most COW_NAME_MAX bytes (see cow_disk_snapshot). */
#define COW_NAME_MAX 128
/* Why a snapshot name is reserved, or NULL if it is not: "active" and
 * "base" (any case) and names starting with "layer-" mean a layer where
 * a command takes one.  A reserved name that an older version recorded
 * still works where only snapshot names are read (revert); elsewhere its
 * layer file name reaches that snapshot. */
const char *cow_snapshot_name_reserved (const char *name);

/* The base's format as cow_disk_open guessed it
 * from the file's first bytes ("raw" or "qcow2"), or NULL when it was
 * given (base_format) or recorded in the state directory's manifest.  A
 * raw image whose first bytes look like a qcow2 header is misread as
 * qcow2 when guessed; a caller warns about it. */
const char *cow_disk_base_format_guessed (const struct cow_disk *d);

/* Memory: one metadata cache budget for the whole
 * process, shared by every layer of every disk (default
 * COW_CACHE_DEFAULT_BUDGET); the tables of idle layers leave first.
 * Set it before opening disks (a smaller budget later is reached as
 * tables leave). */
#define COW_CACHE_DEFAULT_BUDGET (64ull << 20)
void cow_cache_set_budget (uint64_t bytes);
struct cow_memory_usage {
  uint64_t cache_budget;      /* bytes */
  uint64_t cache_used;        /* bytes of metadata tables held now */
  uint64_t cache_peak;        /* the most held so far */
  uint64_t cache_tables;      /* tables held now */
  uint64_t map_bytes;         /* merged maps of the frozen layers (all disks) */
};
void cow_memory_usage (struct cow_memory_usage *u);

/* Last error of the calling thread. */
const char *cow_last_error (void);
int cow_last_errno (void);

#ifdef __cplusplus
}
#endif

#endif /* COWCHAIN_H */
