/* SPDX-License-Identifier: BSD-3-Clause */
/* The control protocol between the `cowchain` tool and a running server,
 * both ends: the socket, the framing, and the server's threads.  The
 * commands and their replies are a table beside this, in service.c.
 * Over a UNIX stream socket:
 *
 *   request:  one line of words separated by single spaces, each word
 *             percent-encoded (word_encode: "" is sent as "-"), at most
 *             CONTROL_MAX_REQUEST bytes of printable ASCII and
 *             CONTROL_MAX_WORDS words; the first word is the command.
 *   reply:    "ok", then zero or more payload lines of encoded words
 *             separated by single spaces, then a line "."; or, when the
 *             request failed, "error ERRNO MESSAGE" (ERRNO the errno in
 *             decimal, MESSAGE one encoded word) and a line ".".
 *   stream:   the reply of a streaming request (events): "ok", then one
 *             payload line per event as it happens, for as long as the
 *             client stays, and the line "." only when the server stops.
 *             No time limit while nothing happens; a client that takes
 *             nothing for CONTROL_REPLY_TIMEOUT_MS while lines wait is
 *             cut off (the connection closes without "."), and so is one
 *             that closes its end.  A stream holds one of the
 *             CONTROL_MAX_CONNECTIONS slots; the events bus admits at
 *             most EVENTS_MAX_SUBSCRIBERS (events.h) at once, so that
 *             requests always find slots.
 *
 * One request per connection.  Before any command runs the server may
 * reply an error with errno EACCES (the peer's uid is not allowed),
 * EBUSY (CONTROL_MAX_CONNECTIONS requests in progress), ETIMEDOUT (the
 * request line did not arrive within CONTROL_REQUEST_TIMEOUT_MS of the
 * connection), EMSGSIZE (a longer line), EPROTO (a byte outside
 * printable ASCII, or the connection ended before a whole line) or
 * EINVAL (bad encoding or too many words), and it may close without
 * reading the rest of the request: a client reads the reply even when
 * its send fails.  Every request and its outcome go to the server's log
 * (control_log).
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

/* Server side.  A handler runs one request (words[0] the command,
 * decoded) and adds the reply's payload lines (encoded words) with
 * control_reply_line; it returns 0 (reply "ok" + lines) or -1 (reply the
 * last error).  The server's handler is a service's (service.h). */
struct control_reply;
int control_reply_line (struct control_reply *r, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));
typedef int (*control_handler) (void *opaque, char **words, int n,
                                struct control_reply *r);
/* A streaming reply: instead of adding lines, a handler hands the
 * connection a source of lines.  After "ok" the connection's thread
 * sends what take returns each time fd (for poll) is readable, until the
 * server stops (then what take still has, and "."), the client goes
 * away or stops reading; then end runs, once, on that thread.  take
 * returns lines (each ending in a newline) in a malloc'd buffer of *len
 * bytes, or NULL when there are none. */
struct control_stream {
  int fd;
  char *(*take) (void *opaque, size_t *len);
  void (*end) (void *opaque);
  void *opaque;
};
void control_reply_stream (struct control_reply *r,
                           const struct control_stream *st);
/* Run fn as the server does for each request: 0 with the whole reply
 * ("ok\n", the lines, ".\n") in *text (malloc'd, *len bytes), or -1
 * with fn's error as the last error.  A stream is ended at once (end
 * runs) after what take has at once. */
int control_run (control_handler fn, void *opaque, char **words, int n,
                 char **text, size_t *len);
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
 * still listens on, is an error (cow_control_check_path, in cowchain.h,
 * checks a path ahead of time; control_start checks again). */
struct control_server *control_start (const char *path, const uid_t *allow_uids,
                                      size_t n_allow, control_handler fn,
                                      control_log log, void *opaque);
/* control_start in two steps: control_listen binds and listens (clients
 * that connect wait in the backlog), control_serve starts the thread
 * that accepts them.  For a server that forks between the two: its
 * socket exists before the fork, its threads after.  control_stop ends
 * either. */
struct control_server *control_listen (const char *path,
                                       const uid_t *allow_uids, size_t n_allow,
                                       control_handler fn, control_log log,
                                       void *opaque);
int control_serve (struct control_server *s);
/* Stop listening, end every connection's waits, and return when the
 * commands still running have ended and every thread is joined. */
void control_stop (struct control_server *s);

#endif /* COW_CONTROL_H */
