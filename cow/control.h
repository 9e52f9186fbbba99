/* The control protocol between the `cowchain` tool and a running server,
 * both ends.  Over a UNIX stream socket:
 *
 *   request:  one line of words separated by single spaces, each word
 *             percent-encoded (word_encode), at most CONTROL_MAX_REQUEST
 *             bytes; the first word is the command.
 *   reply:    "ok" or "error ERRNO MESSAGE-WORD", then zero or more
 *             payload lines of encoded words, then a line ".".
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
#define CONTROL_MAX_CONNECTIONS 8

#include "words.h"               /* word_encode, word_decode */

/* Split a line into at most max words (in place, decoded). */
int control_split (char *line, char **words, int max);

/* Client: send argv as a request, read the reply.  Returns 0 with the
 * payload lines (a NULL-terminated array, each line still encoded, free
 * with control_free_lines) or -1 with the server's or the local error as
 * the last error. */
int control_request (const char *socket_path, const char *const *argv,
                     int argc, char ***payload);
void control_free_lines (char **lines);

/* Server side. */
struct control_reply;
int control_reply_line (struct control_reply *r, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));
/* Run a command; return 0 (reply "ok" + lines) or -1 (reply the last
 * error). */
typedef int (*control_handler) (void *opaque, char **words, int n,
                                struct control_reply *r);
struct control_server;
/* Listen on path (mode 0600, refusing other uids than ours and those in
 * allow_uids), serve requests on a thread until control_stop. */
struct control_server *control_start (const char *path, const uid_t *allow_uids,
                                      size_t n_allow, control_handler fn,
                                      void *opaque);
void control_stop (struct control_server *s);

#endif /* COW_CONTROL_H */
