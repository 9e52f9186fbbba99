/* The control protocol between the `cowchain` tool and a running server,
 * both ends.  Over a UNIX stream socket:
 *
 *   request:  one line of words separated by single spaces, each word
 *             percent-encoded (word_encode), at most CONTROL_MAX_REQUEST
 *             bytes; the first word is the command.
 *   reply:    "ok" or "error ERRNO MESSAGE-WORD", then zero or more
 *             payload lines of encoded words, then a line ".".
 *
 * One request per connection.  Before any command runs the server may
 * reply "error EACCES" (the peer's uid is not allowed), "error EBUSY"
 * (CONTROL_MAX_CONNECTIONS requests in progress) or "error ETIMEDOUT"
 * (the request line did not arrive within CONTROL_REQUEST_TIMEOUT_MS of
 * the connection), and it may close without reading the rest of the
 * request: a client reads the reply even when its send fails.
 *
 * Commands (DISK "" = the default disk):
 *   status                       -> per disk "clients NAME N" (the NBD
 *                                   connections open on it), then "disk
 *                                   NAME ACTIVE-PATH BASE DEPTH HEALTH
 *                                   REASON" (BASE "" if self-contained;
 *                                   DEPTH the layers; HEALTH ok|degraded;
 *                                   REASON "" if ok).  Clients skip lines
 *                                   they do not know.
 *   blklist                      -> "disk NAME ACTIVE-PATH" per disk
 *   list DISK                    -> "layer PATH CREATED SNAPSHOT DESC STATE"
 *                                   bottom to top (SNAPSHOT/DESC "-" if none,
 *                                   STATE active|frozen)
 *   snapshot DISK NAME DESC      -> "pause-ns N"
 *   snapshot-atomic NAME DESC    -> all disks at one cut; "pause-ns N"
 *   revert DISK NAME force|-     -> nothing.  Without force, refused
 *                                   (EBUSY) while NBD clients are
 *                                   connected to DISK or when later
 *                                   snapshots would be deleted; force
 *                                   allows both.
 *
 * Background merges (see cowchain.h).  SPEED: bytes per second in
 * decimal, 0 = unlimited.  FLAGS: "-" or a comma list of
 * allow-base-write and force.  BASE "-" = the default base.
 *   commit DISK TOP BASE FLAGS SPEED -> nothing (the job has started)
 *   pull DISK BASE FLAGS SPEED   -> nothing
 *   delete DISK NAME SPEED       -> nothing
 *   jobs [DISK]                  -> per disk (every disk, or only DISK):
 *                                   "job DISK KIND STATE TOP BASE DONE TOTAL
 *                                   SPEED RATE STARTED ENDED ERRNO MESSAGE"
 *                                   (KIND/TOP/BASE/MESSAGE "-" if none;
 *                                   STATE a cow_job_state_name, "none" if
 *                                   no job ran; DONE/TOTAL bytes; SPEED the
 *                                   limit, RATE the measured bytes/s;
 *                                   STARTED/ENDED seconds since the epoch,
 *                                   ENDED 0 while running)
 *   job-pause DISK, job-resume DISK, job-cancel DISK -> nothing
 *   job-speed DISK SPEED         -> nothing
 */
#ifndef COW_CONTROL_H
#define COW_CONTROL_H

#include <stddef.h>
#include <sys/types.h>

#define CONTROL_MAX_REQUEST 65536
#define CONTROL_MAX_WORDS 16
/* Requests served at once; a connection over this waits up to a second
 * for one of them to end, then gets "error EBUSY". */
#define CONTROL_MAX_CONNECTIONS 64
/* A client has this long from its connection to send its whole request
 * line, and, once the command has run, this long to take the reply. */
#define CONTROL_REQUEST_TIMEOUT_MS 5000
#define CONTROL_REPLY_TIMEOUT_MS 5000

#include "words.h"               /* word_encode, word_decode */

/* Split a line into at most max words (in place, decoded). */
int control_split (char *line, char **words, int max);

/* The client, cow_control_request and cow_control_free_reply, is public
 * (cowchain.h). */

/* Server side. */
struct control_reply;
int control_reply_line (struct control_reply *r, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));
/* Run a command; return 0 (reply "ok" + lines) or -1 (reply the last
 * error). */
typedef int (*control_handler) (void *opaque, char **words, int n,
                                struct control_reply *r);
/* Told each request and its outcome, as one printable line without a
 * newline: "uid U: WORDS: ok", "uid U: WORDS: error: MESSAGE", "uid U:
 * refused: WHY", "uid U: no request: WHY" (WORDS encoded and cut at 64
 * bytes each).  Called from the server's threads, possibly at once. */
typedef void (*control_log) (void *opaque, const char *line);
struct control_server;
/* Listen on path and serve each connection on its own thread until
 * control_stop; fn (and log, if not NULL) run on those threads, several
 * at once.  Only our euid, root and allow_uids may talk; the socket is
 * mode 0600, or 0666 when allow_uids names another uid (then the uid
 * check of each connection is the only gate).  A socket left at path by
 * an earlier run is replaced; any other file, or a socket a server
 * still listens on, is an error. */
struct control_server *control_start (const char *path, const uid_t *allow_uids,
                                      size_t n_allow, control_handler fn,
                                      control_log log, void *opaque);
/* Whether control_start could listen on path (no other kind of file
 * there, no server listening on it): 0, or -1 with the reason.  For
 * refusing before nbdkit forks; control_start checks again. */
int control_check_path (const char *path);
/* Stop listening, end every connection's waits, and return when the
 * commands still running have ended and every thread is joined. */
void control_stop (struct control_server *s);

#endif /* COW_CONTROL_H */
