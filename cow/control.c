/* SPDX-License-Identifier: BSD-3-Clause */
/* The control protocol (see control.h): encoding, the client, and the
 * server: a listening thread that starts one thread per connection, up
 * to CONTROL_MAX_CONNECTIONS at once.
 *
 * No client can hold the server: each connection has a deadline for its
 * whole request line (not one that restarts at every byte) and another
 * for taking its reply, every wait also ends at control_stop, and a
 * connection over the bound is told "busy" at once.  Only the command's
 * own run (the handler) is not bounded here; the engine bounds its
 * waits.  Rejected: one thread serving connections in turn (a client
 * sending a byte every few seconds held everyone), and an event loop
 * (handlers block, e.g. a snapshot's flush, so they need threads
 * anyway). */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "cowchain.h"
#include "control.h"
#include "error.h"
#include "events.h"
#include "words.h"

/* A connection over the bound waits this long for a slot, then is told
 * the server is busy. */
#define BUSY_WAIT_MS 1000
/* After an error reply, how long the server goes on reading what the
 * client still sends, so that the client reads the reply rather than
 * failing on a closed socket. */
#define DRAIN_MS 1000
/* What the log shows of each word, and of an error message. */
#define LOG_WORD_MAX 64
#define LOG_MESSAGE_MAX 512
/* The socket buffer of a stream (the kernel doubles it). */
#define STREAM_SNDBUF 32768
/* A stopping server sends a stream what its source still has, in at
 * most this many takes (events emitted meanwhile could go on for ever). */
#define EVENTS_DRAIN_ROUNDS 4
/* Refusals logged one by one per second; the rest are counted. */
#define REFUSALS_LOGGED 10

int
control_split (char *line, char **words, int max)
{
  int n = 0;
  char *save, *tok;

  for (tok = strtok_r (line, " ", &save); tok; tok = strtok_r (NULL, " ", &save)) {
    if (n == max || word_decode (tok) == -1)
      return -1;
    words[n++] = tok;
  }
  return n;
}

/*----------------------------------------------------------------------
 * Deadlines, shared by both ends.  A deadline is a CLOCK_MONOTONIC time
 * in milliseconds, or -1 for none.
 */

static int64_t
now_ms (void)
{
  struct timespec t;

  clock_gettime (CLOCK_MONOTONIC, &t);
  return (int64_t) t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static int64_t
deadline_in (int ms)
{
  return ms > 0 ? now_ms () + ms : -1;
}

/* Wait until fd has one of events.  Returns 0, or -1 with errno
 * ETIMEDOUT at the deadline, ECANCELED when stop_fd (-1: none) becomes
 * readable, or poll's error. */
static int
wait_fd (int fd, short events, int64_t deadline, int stop_fd)
{
  for (;;) {
    struct pollfd p[2] = {
      { .fd = fd, .events = events },
      { .fd = stop_fd, .events = POLLIN },
    };
    int64_t left = deadline < 0 ? -1 : deadline - now_ms ();
    int r;

    if (deadline >= 0 && left <= 0) {
      errno = ETIMEDOUT;
      return -1;
    }
    r = poll (p, stop_fd >= 0 ? 2 : 1, left > INT32_MAX ? INT32_MAX : (int) left);
    if (r == -1 && errno == EINTR)
      continue;
    if (r == -1)
      return -1;
    if (stop_fd >= 0 && p[1].revents) {
      errno = ECANCELED;
      return -1;
    }
    if (p[0].revents)
      return 0;
  }
}

/* Send all of p on a non-blocking socket before the deadline. */
static int
send_all (int fd, const char *p, size_t n, int64_t deadline, int stop_fd)
{
  while (n > 0) {
    ssize_t r = send (fd, p, n, MSG_NOSIGNAL);
    if (r == -1 && errno == EINTR)
      continue;
    if (r == -1 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (wait_fd (fd, POLLOUT, deadline, stop_fd) == -1)
        return -1;
      continue;
    }
    if (r == -1)
      return -1;
    p += r;
    n -= (size_t) r;
  }
  return 0;
}

/* Read what is there (waiting until the deadline if nothing is): bytes
 * read, 0 at the end, or -1. */
static ssize_t
recv_some (int fd, char *buf, size_t n, int64_t deadline, int stop_fd)
{
  for (;;) {
    ssize_t r = recv (fd, buf, n, 0);
    if (r == -1 && errno == EINTR)
      continue;
    if (r == -1 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (wait_fd (fd, POLLIN, deadline, stop_fd) == -1)
        return -1;
      continue;
    }
    return r;
  }
}

static int
set_nonblocking (int fd)
{
  int fl = fcntl (fd, F_GETFL);

  return fl == -1 ? -1 : fcntl (fd, F_SETFL, fl | O_NONBLOCK);
}

/*----------------------------------------------------------------------
 * Client.
 */

/* "after 5 s" for the messages of an expired wait. */
static const char *
after (int timeout_ms, char *buf, size_t len)
{
  snprintf (buf, len, "after %g s", timeout_ms / 1000.0);
  return buf;
}

/* Connect before the deadline: a blocking connect waits for room in a
 * full listen queue for at most SO_SNDTIMEO (Linux), then fails with
 * EAGAIN. */
static int
connect_to (const char *path, int timeout_ms, int64_t deadline)
{
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  char t[32];
  int fd;

  if (strlen (path) >= sizeof sa.sun_path) {
    cow_error_set (ENAMETOOLONG, "%s: control socket path too long", path);
    return -1;
  }
  strcpy (sa.sun_path, path);
  fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd == -1) {
    cow_error_errno ("socket");
    return -1;
  }
  if (deadline >= 0) {
    int64_t left = deadline - now_ms ();
    struct timeval tv = {
      .tv_sec = left / 1000, .tv_usec = (left % 1000) * 1000
    };
    if (left <= 0)
      tv.tv_usec = 1000;
    setsockopt (fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  }
  while (connect (fd, (struct sockaddr *) &sa, sizeof sa) == -1) {
    if (errno == EINTR)
      continue;
    if (errno == EAGAIN && deadline >= 0)
      cow_error_set (ETIMEDOUT, "%s: timed out %s waiting for the server to "
                     "accept the connection", path,
                     after (timeout_ms, t, sizeof t));
    else if (errno == EACCES)
      cow_error_errno ("%s: cannot connect to the control socket (only the "
                       "server's uid, root and its control-allow-uid= "
                       "uids may)", path);
    else
      cow_error_errno ("%s: cannot connect to the control socket (is the "
                       "server running?)", path);
    close (fd);
    return -1;
  }
  if (set_nonblocking (fd) == -1) {
    cow_error_errno ("%s: fcntl", path);
    close (fd);
    return -1;
  }
  return fd;
}

/* The request line of argv, encoded. */
static char *
encode_request (const char *const *argv, int argc, size_t *len)
{
  char *req = NULL;
  FILE *f = open_memstream (&req, len);

  if (f == NULL) {
    cow_error_errno ("open_memstream");
    return NULL;
  }
  for (int i = 0; i < argc; i++) {
    char *w = word_encode (argv[i]);
    if (w == NULL) {
      fclose (f);
      free (req);
      cow_error_errno ("encode");
      return NULL;
    }
    fprintf (f, "%s%s", i ? " " : "", w);
    free (w);
  }
  fputc ('\n', f);
  if (fclose (f) == EOF) {
    free (req);
    cow_error_errno ("encode");
    return NULL;
  }
  return req;
}

/* Read the whole reply into a NUL-terminated buffer.  A reset after a
 * complete reply (it ends with the "." line) is not an error: a server
 * that refused the request may close before reading all of it. */
static char *
read_reply (int fd, const char *path, const char *cmd, int timeout_ms,
            int64_t deadline, size_t *lenp)
{
  char *buf = NULL, t[32];
  size_t len = 0, cap = 0;

  for (;;) {
    ssize_t r;
    if (len + 4096 + 1 > cap) {
      char *nb;
      cap = cap ? cap * 2 : 65536;
      if (cap > (64u << 20)) {
        cow_error_set (EPROTO, "%s: reply too large", path);
        goto err;
      }
      nb = realloc (buf, cap);
      if (nb == NULL) {
        cow_error_errno ("realloc");
        goto err;
      }
      buf = nb;
    }
    r = recv_some (fd, buf + len, cap - len - 1, deadline, -1);
    if (r == -1 && errno == ECONNRESET && len >= 2
        && memcmp (buf + len - 2, ".\n", 2) == 0)
      break;
    if (r == -1 && errno == ETIMEDOUT) {
      cow_error_set (ETIMEDOUT, "%s: timed out %s waiting for the reply to "
                     "'%.32s' (the server may still carry it out; see "
                     "--timeout)", path, after (timeout_ms, t, sizeof t), cmd);
      goto err;
    }
    if (r == -1 && len >= 8 && memcmp (buf, "NBDMAGIC", 8) == 0)
      break;                    /* said below */
    if (r == -1) {
      cow_error_errno ("%s: reading the reply%s", path, errno == ECONNRESET
                       ? " (is it a cowchain control socket, the server's "
                       "control= key?)" : "");
      goto err;
    }
    if (r == 0)
      break;
    len += (size_t) r;
  }
  /* An NBD server greets first, and drops our request as garbage. */
  if (len >= 8 && memcmp (buf, "NBDMAGIC", 8) == 0) {
    cow_error_set (EPROTO, "%s is not a cowchain control socket: an NBD "
                   "server answers there (give the server's control= "
                   "socket, not its NBD one)", path);
    goto err;
  }
  buf[len] = '\0';
  *lenp = len;
  return buf;
 err:
  free (buf);
  return NULL;
}

void
cow_control_free_reply (struct cow_control_reply *reply)
{
  for (size_t i = 0; i < reply->n; i++)
    free (reply->lines[i].words);
  free (reply->lines);
  reply->lines = NULL;
  reply->n = 0;
}

/* Append the payload line to reply, split into its decoded words: one
 * allocation holding the word pointers, then the text they point into. */
static int
add_line (struct cow_control_reply *reply, const char *line)
{
  struct cow_control_line *nl, *l;
  size_t len = strlen (line), max = 1;
  char *text;

  for (const char *p = line; *p; p++)
    max += *p == ' ';
  /* The array doubles when n reaches a power of two: a reply of n lines
   * costs O(n) copying, not O(n^2). */
  if ((reply->n & (reply->n - 1)) == 0) {
    nl = realloc (reply->lines, (reply->n ? reply->n * 2 : 1) * sizeof *nl);
    if (nl == NULL)
      return -1;
    reply->lines = nl;
  }
  nl = reply->lines;
  l = &nl[reply->n];
  l->words = malloc ((max + 1) * sizeof *l->words + len + 1);
  if (l->words == NULL)
    return -1;
  text = (char *) (l->words + max + 1);
  memcpy (text, line, len + 1);
  l->n = control_split (text, l->words, (int) max);
  reply->n++;
  return 0;
}

/* Connect to socket_path and send the request: the connected socket
 * (its sending side shut), or -1.  A server that refuses the request may
 * close before reading all of it: then its reply says why, so a send
 * that fails with EPIPE or ECONNRESET is not an error here; its errno
 * goes to *send_errno for the caller that gets no reply either. */
static int
send_request (const char *socket_path, const char *const *argv, int argc,
              int timeout_ms, int64_t deadline, int *send_errno)
{
  char *req, t[32];
  size_t len = 0;
  int fd;

  *send_errno = 0;
  req = encode_request (argv, argc, &len);
  if (req == NULL)
    return -1;
  fd = connect_to (socket_path, timeout_ms, deadline);
  if (fd != -1 && send_all (fd, req, len, deadline, -1) == -1) {
    *send_errno = errno;
    if (errno == ETIMEDOUT)
      cow_error_set (ETIMEDOUT, "%s: timed out %s waiting for the server to "
                     "take the request", socket_path,
                     after (timeout_ms, t, sizeof t));
    else if (errno != EPIPE && errno != ECONNRESET)
      cow_error_errno ("%s: sending the request", socket_path);
    if (errno != EPIPE && errno != ECONNRESET) {
      close (fd);
      fd = -1;
    }
  }
  if (fd != -1)
    shutdown (fd, SHUT_WR);
  free (req);
  return fd;
}

int
cow_control_request (const char *socket_path, const char *const *argv,
                     int argc, int timeout_ms, struct cow_control_reply *reply)
{
  int64_t deadline = deadline_in (timeout_ms);
  char *buf = NULL, *line, *save;
  size_t len = 0;
  struct cow_control_reply lines = { 0 };
  int fd, ret = -1, send_errno;

  reply->n = 0;
  reply->lines = NULL;
  fd = send_request (socket_path, argv, argc, timeout_ms, deadline,
                     &send_errno);
  if (fd == -1)
    return -1;
  buf = read_reply (fd, socket_path, argc ? argv[0] : "", timeout_ms,
                    deadline, &len);
  if (buf == NULL)
    goto out;
  if (len == 0) {
    if (send_errno)
      cow_error_set (send_errno, "%s: sending the request: %s", socket_path,
                     strerror (send_errno));
    else
      cow_error_set (EPROTO, "%s: the server closed the connection without "
                     "a reply", socket_path);
    goto out;
  }
  line = strtok_r (buf, "\n", &save);
  if (line && strncmp (line, "error ", 6) == 0) {
    char *w[3];
    int n = control_split (line, w, 3), e;
    e = n == 3 ? atoi (w[1]) : EPROTO;
    cow_error_set (e > 0 ? e : EPROTO, "%s", n == 3 ? w[2] : "malformed error reply");
    goto out;
  }
  if (line == NULL || strcmp (line, "ok") != 0) {
    cow_error_set (EPROTO, "%s: malformed reply", socket_path);
    goto out;
  }
  while ((line = strtok_r (NULL, "\n", &save)) != NULL) {
    if (strcmp (line, ".") == 0) {
      *reply = lines;
      lines.lines = NULL;
      lines.n = 0;
      ret = 0;
      goto out;
    }
    if (add_line (&lines, line) == -1)
      goto oom;
  }
  cow_error_set (EPROTO, "%s: truncated reply", socket_path);
  goto out;
 oom:
  cow_error_errno ("reply");
 out:
  cow_control_free_reply (&lines);
  free (buf);
  close (fd);
  return ret;
}

/* The stream's reader: bytes read and not yet split into lines. */
struct stream_in {
  char *buf;
  size_t len, cap;
};

/* The first whole line in in (without its newline, NUL-terminated, to
 * free), or NULL if none yet. */
static char *
next_line (struct stream_in *in)
{
  char *nl = in->len ? memchr (in->buf, '\n', in->len) : NULL, *line;
  size_t n;

  if (nl == NULL)
    return NULL;
  n = (size_t) (nl - in->buf);
  line = malloc (n + 1);
  if (line == NULL)
    return NULL;
  memcpy (line, in->buf, n);
  line[n] = '\0';
  memmove (in->buf, nl + 1, in->len - n - 1);
  in->len -= n + 1;
  return line;
}

/* Read more into in: bytes read, 0 at the end, -1 with errno (EINTR
 * when a signal came, ETIMEDOUT after wait_ms, -1 = no limit). */
static ssize_t
read_more (int fd, struct stream_in *in, int wait_ms)
{
  struct pollfd p = { .fd = fd, .events = POLLIN };
  ssize_t r;

  if (in->cap - in->len < 4096) {
    size_t cap = in->cap ? in->cap * 2 : 8192;
    char *nb;
    if (cap > CONTROL_MAX_REQUEST * 2u) {
      errno = EMSGSIZE;
      return -1;
    }
    nb = realloc (in->buf, cap);
    if (nb == NULL)
      return -1;
    in->buf = nb;
    in->cap = cap;
  }
  r = poll (&p, 1, wait_ms);
  if (r == -1)
    return -1;
  if (r == 0) {
    errno = ETIMEDOUT;
    return -1;
  }
  r = recv (fd, in->buf + in->len, in->cap - in->len, 0);
  if (r == -1 && (errno == EAGAIN || errno == EWOULDBLOCK))
    errno = EINTR;              /* nothing after all: look again */
  if (r > 0)
    in->len += (size_t) r;
  return r;
}

int
cow_control_stream (const char *socket_path, const char *const *argv,
                    int argc, int timeout_ms, int idle_ms,
                    cow_control_line_fn fn, void *opaque)
{
  int64_t deadline = deadline_in (timeout_ms);
  struct stream_in in = { 0 };
  struct cow_control_reply one = { 0 };
  char *line = NULL, t[32];
  const char *cmd = argc ? argv[0] : "";
  bool started = false;
  int fd, ret = -1, send_errno;

  fd = send_request (socket_path, argv, argc, timeout_ms, deadline,
                     &send_errno);
  if (fd == -1)
    return -1;
  for (;;) {
    ssize_t r;
    int r_fn;

    free (line);
    line = next_line (&in);
    if (line == NULL) {
      int wait = !started ? (deadline < 0 ? -1 : (int) (deadline - now_ms ()))
        : idle_ms > 0 ? idle_ms : -1;
      if (!started && deadline >= 0 && wait <= 0) {
        errno = ETIMEDOUT;
        r = -1;
      }
      else
        r = read_more (fd, &in, wait);
      if (r > 0)
        continue;
      if (r == 0 || (r == -1 && (errno == ECONNRESET || errno == EPIPE))) {
        cow_error_set (EPIPE, "%s: the server ended the '%.32s' stream "
                       "without its end line (did it crash?)", socket_path,
                       cmd);
        goto out;
      }
      if (r == -1 && errno == ETIMEDOUT && !started) {
        cow_error_set (ETIMEDOUT, "%s: timed out %s waiting for the reply "
                       "to '%.32s' (see --timeout)", socket_path,
                       after (timeout_ms, t, sizeof t), cmd);
        goto out;
      }
      if (r == -1 && errno != ETIMEDOUT && errno != EINTR) {
        cow_error_errno ("%s: reading the '%.32s' stream", socket_path, cmd);
        goto out;
      }
      if (!started)
        continue;
      r_fn = fn (opaque, NULL);
    }
    else if (!started) {
      if (strncmp (line, "error ", 6) == 0) {
        char *w[3];
        int n = control_split (line, w, 3), e = n == 3 ? atoi (w[1]) : 0;
        cow_error_set (e > 0 ? e : EPROTO, "%s",
                       n == 3 ? w[2] : "malformed error reply");
        goto out;
      }
      if (strcmp (line, "ok") != 0) {
        cow_error_set (EPROTO, "%s: malformed reply", socket_path);
        goto out;
      }
      started = true;
      r_fn = fn (opaque, NULL);
    }
    else if (strcmp (line, ".") == 0) {
      ret = 0;
      goto out;
    }
    else {
      if (add_line (&one, line) == -1) {
        cow_error_errno ("reply");
        goto out;
      }
      r_fn = fn (opaque, &one.lines[0]);
      cow_control_free_reply (&one);
    }
    if (r_fn != 0) {
      ret = r_fn > 0 ? 0 : -1;
      goto out;
    }
  }
 out:
  cow_control_free_reply (&one);
  free (line);
  free (in.buf);
  close (fd);
  return ret;
}

/*----------------------------------------------------------------------
 * Server.
 */

struct control_reply {
  FILE *f;
  bool streamed;
  struct control_stream stream;
};

void
control_reply_stream (struct control_reply *r, const struct control_stream *st)
{
  r->streamed = true;
  r->stream = *st;
}

int
control_reply_line (struct control_reply *r, const char *fmt, ...)
{
  va_list ap;
  int n;

  va_start (ap, fmt);
  n = vfprintf (r->f, fmt, ap);
  va_end (ap);
  fputc ('\n', r->f);
  return n < 0 ? -1 : 0;
}

/* Run fn: 0 with "ok\n" and the lines in *text (and ".\n" unless fn
 * made the reply a stream: then *st holds it and *streamed is true), or
 * -1. */
static int
run_request (control_handler fn, void *opaque, char **words, int n,
             char **text, size_t *len, struct control_stream *st,
             bool *streamed)
{
  struct control_reply r = { 0 };

  *text = NULL;
  *len = 0;
  *streamed = false;
  r.f = open_memstream (text, len);
  if (r.f == NULL) {
    cow_error_set (ENOMEM, "out of memory");
    return -1;
  }
  fputs ("ok\n", r.f);
  if (fn (opaque, words, n, &r) == -1) {
    fclose (r.f);
    free (*text);
    *text = NULL;
    *len = 0;
    return -1;
  }
  if (r.streamed) {
    *st = r.stream;
    *streamed = true;
  }
  else
    fputs (".\n", r.f);
  fclose (r.f);
  return 0;
}

int
control_run (control_handler fn, void *opaque, char **words, int n,
             char **text, size_t *len)
{
  struct control_stream st;
  bool streamed;
  FILE *f;
  char *more, *all = NULL;
  size_t more_len = 0, all_len = 0;

  if (run_request (fn, opaque, words, n, text, len, &st, &streamed) == -1)
    return -1;
  if (!streamed)
    return 0;
  more = st.take (st.opaque, &more_len);
  st.end (st.opaque);
  f = open_memstream (&all, &all_len);
  if (f == NULL) {
    free (more);
    free (*text);
    *text = NULL;
    cow_error_set (ENOMEM, "out of memory");
    return -1;
  }
  fwrite (*text, 1, *len, f);
  if (more)
    fwrite (more, 1, more_len, f);
  fputs (".\n", f);
  fclose (f);
  free (more);
  free (*text);
  *text = all;
  *len = all_len;
  return 0;
}

/* One accepted connection and the thread serving it.  The list of them
 * and finished belong to the server's lock. */
struct control_conn {
  struct control_server *s;
  int fd;
  uid_t uid;
  int64_t accepted;
  pthread_t thread;
  bool finished;                /* the thread is about to return */
  struct control_conn *next;
};

struct control_server {
  char *path;
  int listen_fd;
  /* Written once by control_stop and never read: readable from then on,
   * it ends every wait of every thread. */
  int stop_pipe[2];
  pthread_t thread;
  bool serving;                 /* thread started (control_serve) */
  uid_t *allow;
  size_t n_allow;
  control_handler fn;
  control_log log;
  void *opaque;

  pthread_mutex_t lock;
  pthread_cond_t slot_freed;    /* a connection thread finished */
  struct control_conn *conns;   /* not yet joined */
  size_t n_running;             /* of them, not finished */

  /* Refusals logged in the current second (the listening thread's own:
   * a uid that is not allowed must not flood the log). */
  int64_t refuse_second;
  unsigned refuse_logged;
  unsigned long refuse_unlogged;
};

/* Append s to the log line at *p (of end - *p bytes left), every byte
 * outside printable ASCII as '?', at most max bytes of it and "..." if
 * cut. */
static void
log_append (char **p, char *end, const char *s, size_t max)
{
  size_t i;

  for (i = 0; s[i] && i < max && *p + 1 < end; i++)
    *(*p)++ = (s[i] >= 0x20 && s[i] < 0x7f) ? s[i] : '?';
  if (s[i] && *p + 4 < end) {
    memcpy (*p, "...", 3);
    *p += 3;
  }
  **p = '\0';
}

/* Log "uid U: WORDS: outcome" (WORDS encoded, each cut at LOG_WORD_MAX)
 * or "uid U: outcome" without words. */
static void
log_request (struct control_server *s, uid_t uid, char **words, int n,
             const char *fmt, ...)
{
  char line[CONTROL_MAX_WORDS * (LOG_WORD_MAX + 4) + LOG_MESSAGE_MAX + 64];
  char msg[LOG_MESSAGE_MAX + 1], *p = line, *end = line + sizeof line;
  va_list ap;

  if (s->log == NULL)
    return;
  p += snprintf (line, sizeof line, "uid %u: ", (unsigned) uid);
  for (int i = 0; i < n; i++) {
    char *w = word_encode (words[i]);
    if (i)
      log_append (&p, end, " ", 1);
    log_append (&p, end, w ? w : "?", LOG_WORD_MAX);
    free (w);
  }
  if (n)
    log_append (&p, end, ": ", 2);
  va_start (ap, fmt);
  vsnprintf (msg, sizeof msg, fmt, ap);
  va_end (ap);
  log_append (&p, end, msg, LOG_MESSAGE_MAX);
  s->log (s->opaque, line);
}

/* Root may always connect: it could take over the server anyway. */
static bool
uid_allowed (struct control_server *s, uid_t uid)
{
  if (uid == 0 || uid == geteuid ())
    return true;
  for (size_t i = 0; i < s->n_allow; i++)
    if (s->allow[i] == uid)
      return true;
  return false;
}

static uid_t
peer_uid (int fd)
{
  struct ucred cred;
  socklen_t len = sizeof cred;

  if (getsockopt (fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == -1)
    return (uid_t) -1;
  return cred.uid;
}

/* Reply an error, then let the client finish sending (bounded in bytes
 * and time) before the caller closes. */
static void
send_error (struct control_server *s, int fd, int errnum, const char *msg,
            int64_t deadline)
{
  char head[32], *m = word_encode (msg), *out = NULL;
  int64_t drain_end = deadline_in (DRAIN_MS);
  size_t total = 0;
  char buf[4096];

  snprintf (head, sizeof head, "error %d ", errnum ? errnum : EIO);
  if (m && asprintf (&out, "%s%s\n.\n", head, m) != -1)
    send_all (fd, out, strlen (out), deadline, s->stop_pipe[0]);
  free (m);
  free (out);
  shutdown (fd, SHUT_WR);
  if (deadline >= 0 && deadline < drain_end)
    drain_end = deadline;
  while (total < (16u << 20)) {
    ssize_t r = recv_some (fd, buf, sizeof buf, drain_end, s->stop_pipe[0]);
    if (r <= 0)
      break;
    total += (size_t) r;
  }
}

/* Read one request line before the deadline.  NULL with *why set if
 * there is none. */
static char *
read_request (struct control_server *s, int fd, int64_t deadline, int *err,
              const char **why)
{
  char *buf = malloc (CONTROL_MAX_REQUEST + 1);
  size_t len = 0;

  if (buf == NULL) {
    *err = ENOMEM;
    *why = "out of memory";
    return NULL;
  }
  for (;;) {
    ssize_t r = recv_some (fd, buf + len, CONTROL_MAX_REQUEST + 1 - len,
                           deadline, s->stop_pipe[0]);
    char *nl;
    if (r == -1) {
      *err = errno;
      *why = errno == ETIMEDOUT ? "the request line did not arrive in time"
        : errno == ECANCELED ? "the server is stopping"
        : "cannot read the request";
      break;
    }
    if (r == 0) {
      *err = EPROTO;
      *why = "the connection ended before a whole request line";
      break;
    }
    nl = memchr (buf + len, '\n', (size_t) r);
    len += (size_t) r;
    if (nl) {
      *nl = '\0';
      if (memchr (buf, '\0', (size_t) (nl - buf))) {
        *err = EPROTO;
        *why = "malformed request (a NUL byte)";
        break;
      }
      return buf;
    }
    if (len > CONTROL_MAX_REQUEST) {
      *err = EMSGSIZE;
      *why = "request too large";
      break;
    }
  }
  free (buf);
  return NULL;
}

/* After "ok" of a streaming reply: send the source's lines as they
 * come (see control.h) until the server stops (then what is left, and
 * "."), the client goes away, or it takes nothing for
 * CONTROL_REPLY_TIMEOUT_MS while lines wait.  Returns why it ended. */
static const char *
stream_reply (struct control_server *s, struct control_conn *c,
              const struct control_stream *st)
{
  char *buf = NULL;
  size_t len = 0, off = 0;
  int64_t deadline = -1;        /* while lines wait for the client */
  bool client_eof = false;
  const char *why;
  int sndbuf = STREAM_SNDBUF;

  /* What a reader that lags may have in flight, on top of its queue
   * (EVENTS_QUEUE_MAX events): beyond, its events are lost and counted. */
  setsockopt (c->fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);

  for (;;) {
    struct pollfd p[3];
    int64_t left;
    int r;

    if (off == len) {
      free (buf);
      buf = st->take (st->opaque, &len);
      off = 0;
      if (buf == NULL)
        len = 0;
      deadline = -1;
    }
    if (off < len) {
      ssize_t k = send (c->fd, buf + off, len - off, MSG_NOSIGNAL);
      if (k > 0) {
        off += (size_t) k;
        deadline = deadline_in (CONTROL_REPLY_TIMEOUT_MS);
        continue;
      }
      if (k == -1 && errno == EINTR)
        continue;
      if (k == -1 && errno != EAGAIN && errno != EWOULDBLOCK) {
        why = "the client went away";
        goto out;
      }
      if (deadline < 0)
        deadline = deadline_in (CONTROL_REPLY_TIMEOUT_MS);
    }
    p[0] = (struct pollfd) { .fd = off < len ? -1 : st->fd, .events = POLLIN };
    p[1] = (struct pollfd) {
      .fd = c->fd,
      .events = (short) ((off < len ? POLLOUT : 0) | (client_eof ? 0 : POLLIN))
    };
    p[2] = (struct pollfd) { .fd = s->stop_pipe[0], .events = POLLIN };
    left = deadline < 0 ? -1 : deadline - now_ms ();
    if (deadline >= 0 && left <= 0) {
      why = "the client took nothing for too long: cut off";
      goto out;
    }
    r = poll (p, 3, left > INT32_MAX ? INT32_MAX : (int) left);
    if (r == -1 && errno == EINTR)
      continue;
    if (r == -1) {
      why = "poll failed";
      goto out;
    }
    if (p[2].revents)
      break;
    if (p[1].revents & (POLLERR | POLLHUP)) {
      why = "the client went away";
      goto out;
    }
    if (p[1].revents & POLLIN) {
      /* A stream reads nothing more; a client may half-close. */
      char junk[256];
      ssize_t k = recv (c->fd, junk, sizeof junk, 0);
      if (k == 0)
        client_eof = true;
      else if (k == -1 && errno != EAGAIN && errno != EINTR) {
        why = "the client went away";
        goto out;
      }
    }
  }

  /* The server stops: what is left, then the end line, briefly. */
  why = "the server is stopping";
  for (int i = 0; i < EVENTS_DRAIN_ROUNDS; i++) {
    int64_t end = deadline_in (DRAIN_MS);
    if (off < len && send_all (c->fd, buf + off, len - off, end, -1) == -1)
      goto out;
    free (buf);
    buf = st->take (st->opaque, &len);
    off = 0;
    if (buf == NULL)
      break;
  }
  send_all (c->fd, ".\n", 2, deadline_in (DRAIN_MS), -1);
 out:
  free (buf);
  COW_DEBUG (COW_DEBUG_CONTROL, "uid %u: stream ended: %s", (unsigned) c->uid,
             why);
  return why;
}

/* Serve the one request of a connection. */
static void
serve (struct control_conn *c)
{
  struct control_server *s = c->s;
  int64_t deadline = c->accepted + CONTROL_REQUEST_TIMEOUT_MS;
  char *line, *words[CONTROL_MAX_WORDS], *text = NULL;
  const char *why;
  size_t len = 0;
  struct control_stream st;
  bool streamed = false;
  int64_t t0;
  int err, n;

  line = read_request (s, c->fd, deadline, &err, &why);
  if (line == NULL) {
    log_request (s, c->uid, NULL, 0, "no request: %s", why);
    if (err != ECANCELED)
      send_error (s, c->fd, err, why, deadline);
    return;
  }
  for (char *p = line; *p; p++)
    if ((unsigned char) *p < 0x20 || (unsigned char) *p >= 0x7f) {
      why = "request holds bytes outside printable ASCII";
      log_request (s, c->uid, NULL, 0, "no request: %s", why);
      send_error (s, c->fd, EPROTO, why, deadline);
      free (line);
      return;
    }
  n = control_split (line, words, CONTROL_MAX_WORDS);
  if (n <= 0) {
    why = "malformed request (bad encoding or too many words)";
    log_request (s, c->uid, NULL, 0, "no request: %s", why);
    send_error (s, c->fd, EINVAL, why, deadline);
    free (line);
    return;
  }
  t0 = now_ms ();
  if (run_request (s->fn, s->opaque, words, n, &text, &len, &st,
                   &streamed) == -1) {
    log_request (s, c->uid, words, n, "error: %s", cow_last_error ());
    send_error (s, c->fd, cow_last_errno (), cow_last_error (),
                deadline_in (CONTROL_REPLY_TIMEOUT_MS));
  }
  else {
    log_request (s, c->uid, words, n, streamed ? "ok (a stream)" : "ok");
    COW_DEBUG (COW_DEBUG_CONTROL, "uid %u: '%.32s' ran in %" PRId64 " ms, "
               "%zu bytes of reply", (unsigned) c->uid, words[0],
               now_ms () - t0, len);
    if (send_all (c->fd, text, len, deadline_in (CONTROL_REPLY_TIMEOUT_MS),
                  s->stop_pipe[0]) == -1) {
      log_request (s, c->uid, words, n, "the reply was not taken: %s",
                   errno == ETIMEDOUT ? "timed out" : strerror (errno));
      if (streamed)
        st.end (st.opaque);
    }
    else if (streamed) {
      const char *ended = stream_reply (s, c, &st);
      st.end (st.opaque);
      log_request (s, c->uid, words, n, "stream ended: %s", ended);
    }
    free (text);
  }
  free (line);
}

static void *
conn_thread (void *arg)
{
  struct control_conn *c = arg;
  struct control_server *s = c->s;

  serve (c);
  close (c->fd);
  c->fd = -1;
  cow_error_clear ();
  pthread_mutex_lock (&s->lock);
  c->finished = true;
  s->n_running--;
  pthread_cond_signal (&s->slot_freed);
  pthread_mutex_unlock (&s->lock);
  return NULL;
}

/* Join the finished connection threads (caller holds the lock; they no
 * longer need it). */
static void
reap (struct control_server *s)
{
  struct control_conn **pp = &s->conns;

  while (*pp) {
    struct control_conn *c = *pp;
    if (c->finished) {
      pthread_join (c->thread, NULL);
      *pp = c->next;
      free (c);
    }
    else
      pp = &c->next;
  }
}

/* Tell a client that is not served why, without waiting for it. */
static void
refuse (struct control_server *s, int fd, uid_t uid, int errnum,
        const char *msg)
{
  int64_t second = now_ms () / 1000;

  if (second != s->refuse_second) {
    if (s->refuse_unlogged)
      log_request (s, uid, NULL, 0, "and %lu more connections refused "
                   "within that second, not logged one by one (at most %d "
                   "a second are)", s->refuse_unlogged, REFUSALS_LOGGED);
    s->refuse_second = second;
    s->refuse_logged = s->refuse_unlogged = 0;
  }
  if (s->refuse_logged < REFUSALS_LOGGED)
    log_request (s, uid, NULL, 0, "refused: %s", msg);
  else
    s->refuse_unlogged++;
  s->refuse_logged++;
  send_error (s, fd, errnum, msg, now_ms ());
  close (fd);
}

/* Check the peer's uid; wait (bounded) for a free slot, then start a
 * thread for fd; or refuse.  Refusals never take a slot, so that uids
 * not allowed cannot crowd out those allowed. */
static void
admit (struct control_server *s, int fd)
{
  struct timespec until;
  struct control_conn *c;
  uid_t uid = peer_uid (fd);
  char msg[160];
  bool full;
  int e = 0;

  if (!uid_allowed (s, uid)) {
    snprintf (msg, sizeof msg, "uid %u is not allowed on this control "
              "socket (see control-allow-uid)", (unsigned) uid);
    refuse (s, fd, uid, EACCES, msg);
    return;
  }
  clock_gettime (CLOCK_MONOTONIC, &until);
  until.tv_sec += BUSY_WAIT_MS / 1000;
  until.tv_nsec += (BUSY_WAIT_MS % 1000) * 1000000L;
  if (until.tv_nsec >= 1000000000L) {
    until.tv_sec++;
    until.tv_nsec -= 1000000000L;
  }
  pthread_mutex_lock (&s->lock);
  reap (s);
  while (s->n_running >= CONTROL_MAX_CONNECTIONS && e != ETIMEDOUT) {
    e = pthread_cond_timedwait (&s->slot_freed, &s->lock, &until);
    reap (s);
  }
  full = s->n_running >= CONTROL_MAX_CONNECTIONS;
  e = 0;
  c = full ? NULL : calloc (1, sizeof *c);
  if (c) {
    c->s = s;
    c->fd = fd;
    c->uid = uid;
    c->accepted = now_ms ();
    e = pthread_create (&c->thread, NULL, conn_thread, c);
    if (e == 0) {
      c->next = s->conns;
      s->conns = c;
      s->n_running++;
    }
    else {
      free (c);
      c = NULL;
    }
  }
  pthread_mutex_unlock (&s->lock);
  if (c)
    return;
  if (full)
    snprintf (msg, sizeof msg, "the control socket is busy (%d requests "
              "in progress); try again", CONTROL_MAX_CONNECTIONS);
  else
    snprintf (msg, sizeof msg, "cannot start a control thread: %s",
              strerror (e ? e : ENOMEM));
  refuse (s, fd, uid, full ? EBUSY : EAGAIN, msg);
}

static void *
listen_thread (void *arg)
{
  struct control_server *s = arg;

  for (;;) {
    int fd;
    if (wait_fd (s->listen_fd, POLLIN, -1, s->stop_pipe[0]) == -1) {
      if (errno == ECANCELED)
        break;
      continue;
    }
    fd = accept4 (s->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd == -1) {
      /* Out of descriptors: do not spin; the backlog waits. */
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS
          || errno == ENOMEM) {
        struct pollfd p = { .fd = s->stop_pipe[0], .events = POLLIN };
        poll (&p, 1, 100);
      }
      continue;
    }
    admit (s, fd);
  }
  cow_error_clear ();
  return NULL;
}

/* Whether another uid than ours and root's may connect. */
static bool
others_allowed (const uid_t *allow, size_t n)
{
  for (size_t i = 0; i < n; i++)
    if (allow[i] != 0 && allow[i] != geteuid ())
      return true;
  return false;
}

/* 0 if path is free or a socket no server listens on (*stale then
 * true), else -1 with the reason. */
static int
check_path (const char *path, const struct sockaddr_un *sa, bool *stale)
{
  struct stat st;
  int fd, r;

  *stale = false;
  if (lstat (path, &st) == -1) {
    if (errno == ENOENT) {
      /* The socket goes into a directory that must exist and take it
       * (checked here too, before nbdkit goes into the background, so
       * that a bad path stops the start). */
      char *dir = strdup (path), *slash;
      int err = 0;
      if (dir == NULL) {
        cow_error_errno ("strdup");
        return -1;
      }
      slash = strrchr (dir, '/');
      if (slash == dir)
        slash[1] = '\0';
      else if (slash)
        *slash = '\0';
      else
        strcpy (dir, ".");
      if (stat (dir, &st) == -1)
        err = errno;
      else if (!S_ISDIR (st.st_mode))
        err = ENOTDIR;
      else if (access (dir, W_OK | X_OK) == -1)
        err = errno;
      if (err)
        cow_error_set (err, "%s: control socket: cannot be created in '%s': "
                       "%s", path, dir, strerror (err));
      free (dir);
      return err ? -1 : 0;
    }
    cow_error_errno ("%s: control socket", path);
    return -1;
  }
  if (!S_ISSOCK (st.st_mode)) {
    cow_error_set (EEXIST, "%s: control socket: the path exists and is not "
                   "a socket", path);
    return -1;
  }
  fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd == -1) {
    cow_error_errno ("socket");
    return -1;
  }
  r = connect (fd, (const struct sockaddr *) sa, sizeof *sa);
  close (fd);
  if (r == 0 || errno == EAGAIN) {
    cow_error_set (EADDRINUSE, "%s: control socket: another server is "
                   "listening on it", path);
    return -1;
  }
  *stale = true;
  return 0;
}

static int
socket_address (const char *path, struct sockaddr_un *sa)
{
  memset (sa, 0, sizeof *sa);
  sa->sun_family = AF_UNIX;
  if (strlen (path) >= sizeof sa->sun_path) {
    cow_error_set (ENAMETOOLONG, "%s: control socket path too long (at "
                   "most %zu bytes)", path, sizeof sa->sun_path - 1);
    return -1;
  }
  strcpy (sa->sun_path, path);
  return 0;
}

int
cow_control_check_path (const char *path)
{
  struct sockaddr_un sa;
  bool stale;

  if (socket_address (path, &sa) == -1)
    return -1;
  return check_path (path, &sa, &stale);
}

/* Remove the socket an earlier server left behind, but never another
 * kind of file, nor a socket some server still listens on. */
static int
remove_stale_socket (const char *path, const struct sockaddr_un *sa)
{
  bool stale;

  if (check_path (path, sa, &stale) == -1)
    return -1;
  if (stale && unlink (path) == -1 && errno != ENOENT) {
    cow_error_errno ("%s: removing the stale control socket", path);
    return -1;
  }
  return 0;
}

struct control_server *
control_listen (const char *path, const uid_t *allow, size_t n_allow,
                control_handler fn, control_log log, void *opaque)
{
  struct sockaddr_un sa;
  pthread_condattr_t ca;
  struct control_server *s;
  bool bound = false, sync_init = false;

  if (socket_address (path, &sa) == -1)
    return NULL;
  s = calloc (1, sizeof *s);
  if (s == NULL) {
    cow_error_errno ("calloc");
    return NULL;
  }
  s->listen_fd = -1;
  s->stop_pipe[0] = s->stop_pipe[1] = -1;
  s->fn = fn;
  s->log = log;
  s->opaque = opaque;
  s->path = strdup (path);
  if (n_allow) {
    s->allow = malloc (n_allow * sizeof *allow);
    if (s->allow)
      memcpy (s->allow, allow, n_allow * sizeof *allow);
    s->n_allow = n_allow;
  }
  if (s->path == NULL || (n_allow && s->allow == NULL)) {
    cow_error_errno ("calloc");
    goto err;
  }
  pthread_mutex_init (&s->lock, NULL);
  pthread_condattr_init (&ca);
  pthread_condattr_setclock (&ca, CLOCK_MONOTONIC);
  pthread_cond_init (&s->slot_freed, &ca);
  pthread_condattr_destroy (&ca);
  sync_init = true;
  if (remove_stale_socket (path, &sa) == -1)
    goto err;
  s->listen_fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (s->listen_fd == -1) {
    cow_error_errno ("socket");
    goto err;
  }
  if (bind (s->listen_fd, (struct sockaddr *) &sa, sizeof sa) == -1) {
    cow_error_errno ("%s: cannot bind the control socket", path);
    goto err;
  }
  bound = true;
  /* Other uids need write permission to connect; who may then talk is
   * decided per connection (uid_allowed). */
  if (chmod (path, others_allowed (allow, n_allow) ? 0666 : 0600) == -1
      || listen (s->listen_fd, CONTROL_MAX_CONNECTIONS) == -1) {
    cow_error_errno ("%s: control socket", path);
    goto err;
  }
  if (pipe2 (s->stop_pipe, O_CLOEXEC) == -1) {
    cow_error_errno ("pipe");
    goto err;
  }
  return s;

 err:
  if (s->listen_fd != -1)
    close (s->listen_fd);
  if (bound)
    unlink (path);
  if (s->stop_pipe[0] != -1) {
    close (s->stop_pipe[0]);
    close (s->stop_pipe[1]);
  }
  if (sync_init) {
    pthread_cond_destroy (&s->slot_freed);
    pthread_mutex_destroy (&s->lock);
  }
  free (s->allow);
  free (s->path);
  free (s);
  return NULL;
}

int
control_serve (struct control_server *s)
{
  int e;

  if (s->serving) {
    cow_error_set (EBUSY, "%s: the control socket is already served",
                   s->path);
    return -1;
  }
  e = pthread_create (&s->thread, NULL, listen_thread, s);
  if (e) {
    cow_error_set (e, "%s: cannot start the control thread", s->path);
    return -1;
  }
  s->serving = true;
  return 0;
}

struct control_server *
control_start (const char *path, const uid_t *allow, size_t n_allow,
               control_handler fn, control_log log, void *opaque)
{
  struct control_server *s = control_listen (path, allow, n_allow, fn, log,
                                             opaque);

  if (s && control_serve (s) == -1) {
    control_stop (s);
    return NULL;
  }
  return s;
}

/* Every thread's waits end at the stop pipe, so this waits only for
 * commands already running in the engine. */
void
control_stop (struct control_server *s)
{
  if (s == NULL)
    return;
  while (write (s->stop_pipe[1], "x", 1) == -1 && errno == EINTR)
    ;
  if (s->serving)
    pthread_join (s->thread, NULL);
  close (s->listen_fd);
  unlink (s->path);
  while (s->conns) {
    struct control_conn *c = s->conns;
    pthread_join (c->thread, NULL);
    s->conns = c->next;
    free (c);
  }
  close (s->stop_pipe[0]);
  close (s->stop_pipe[1]);
  pthread_cond_destroy (&s->slot_freed);
  pthread_mutex_destroy (&s->lock);
  free (s->allow);
  free (s->path);
  free (s);
}
