/* The control protocol (see control.h): encoding, the client, and a
 * server thread that serves one request per connection. */
#include <config.h>

#include <ctype.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <fcntl.h>
#include <unistd.h>

#include "cowchain.h"
#include "control.h"
#include "error.h"
#include "words.h"

#define IO_TIMEOUT_MS 5000

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

void
control_free_lines (char **lines)
{
  if (lines == NULL)
    return;
  for (char **l = lines; *l; l++)
    free (*l);
  free (lines);
}

/*----------------------------------------------------------------------
 * Client.
 */

static int
write_all (int fd, const char *p, size_t n)
{
  while (n > 0) {
    ssize_t r = write (fd, p, n);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    p += r;
    n -= (size_t) r;
  }
  return 0;
}

static int
connect_to (const char *path)
{
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
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
  if (connect (fd, (struct sockaddr *) &sa, sizeof sa) == -1) {
    cow_error_errno ("%s: cannot connect to the control socket (is the "
                     "server running?)", path);
    close (fd);
    return -1;
  }
  return fd;
}

int
control_request (const char *socket_path, const char *const *argv, int argc,
                 char ***payload)
{
  char *req = NULL, *buf = NULL, *line, *save;
  size_t len = 0, cap = 0, n_lines = 0;
  char **lines = NULL;
  FILE *f;
  int fd, ret = -1;

  *payload = NULL;
  f = open_memstream (&req, &len);
  if (f == NULL) {
    cow_error_errno ("open_memstream");
    return -1;
  }
  for (int i = 0; i < argc; i++) {
    char *w = word_encode (argv[i]);
    if (w == NULL) {
      fclose (f);
      free (req);
      cow_error_errno ("encode");
      return -1;
    }
    fprintf (f, "%s%s", i ? " " : "", w);
    free (w);
  }
  fputc ('\n', f);
  fclose (f);
  fd = connect_to (socket_path);
  if (fd == -1) {
    free (req);
    return -1;
  }
  if (write_all (fd, req, len) == -1) {
    cow_error_errno ("%s: sending the request", socket_path);
    goto out;
  }
  shutdown (fd, SHUT_WR);
  len = 0;
  for (;;) {
    ssize_t r;
    if (len + 4096 + 1 > cap) {
      char *nb;
      cap = cap ? cap * 2 : 65536;
      if (cap > (64u << 20)) {
        cow_error_set (EPROTO, "%s: reply too large", socket_path);
        goto out;
      }
      nb = realloc (buf, cap);
      if (nb == NULL) {
        cow_error_errno ("realloc");
        goto out;
      }
      buf = nb;
    }
    r = read (fd, buf + len, cap - len - 1);
    if (r == -1 && errno == EINTR)
      continue;
    if (r == -1) {
      cow_error_errno ("%s: reading the reply", socket_path);
      goto out;
    }
    if (r == 0)
      break;
    len += (size_t) r;
  }
  if (buf == NULL || len == 0) {
    cow_error_set (EPROTO, "%s: the server closed the connection without "
                   "a reply", socket_path);
    goto out;
  }
  buf[len] = '\0';
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
  lines = calloc (1, sizeof *lines);
  if (lines == NULL)
    goto oom;
  while ((line = strtok_r (NULL, "\n", &save)) != NULL) {
    char **nl;
    if (strcmp (line, ".") == 0) {
      *payload = lines;
      lines = NULL;
      ret = 0;
      goto out;
    }
    nl = realloc (lines, (n_lines + 2) * sizeof *lines);
    if (nl == NULL)
      goto oom;
    lines = nl;
    lines[n_lines] = strdup (line);
    if (lines[n_lines] == NULL)
      goto oom;
    lines[++n_lines] = NULL;
  }
  cow_error_set (EPROTO, "%s: truncated reply", socket_path);
  goto out;
 oom:
  cow_error_errno ("reply");
 out:
  control_free_lines (lines);
  free (buf);
  free (req);
  close (fd);
  return ret;
}

/*----------------------------------------------------------------------
 * Server.
 */

struct control_reply {
  FILE *f;
};

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

struct control_server {
  char *path;
  int listen_fd;
  int stop_pipe[2];
  pthread_t thread;
  uid_t *allow;
  size_t n_allow;
  control_handler fn;
  void *opaque;
};

static bool
peer_allowed (struct control_server *s, int fd, uid_t *uid)
{
  struct ucred cred;
  socklen_t len = sizeof cred;

  if (getsockopt (fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == -1)
    return false;
  *uid = cred.uid;
  if (cred.uid == geteuid ())
    return true;
  for (size_t i = 0; i < s->n_allow; i++)
    if (s->allow[i] == cred.uid)
      return true;
  return false;
}

/* After an early reply: let the client finish sending (up to a bound)
 * before closing, so that it reads the reply instead of a reset. */
static void
drain (int fd)
{
  char buf[4096];
  size_t total = 0;

  struct timespec t0, t;

  /* Bounded in bytes and in time: a client may not hold the thread. */
  clock_gettime (CLOCK_MONOTONIC, &t0);
  shutdown (fd, SHUT_WR);
  while (total < (16u << 20)) {
    struct pollfd p = { .fd = fd, .events = POLLIN };
    ssize_t r;
    clock_gettime (CLOCK_MONOTONIC, &t);
    if (t.tv_sec - t0.tv_sec >= 2 || poll (&p, 1, 500) <= 0)
      break;
    r = read (fd, buf, sizeof buf);
    if (r <= 0)
      break;
    total += (size_t) r;
  }
}

static void
send_error (int fd, int errnum, const char *msg)
{
  char head[32], *m = word_encode (msg), *out = NULL;

  snprintf (head, sizeof head, "error %d ", errnum ? errnum : EIO);
  if (m && asprintf (&out, "%s%s\n.\n", head, m) != -1)
    write_all (fd, out, strlen (out));
  free (m);
  free (out);
  drain (fd);
}

/* Read one request line within the limits. */
static char *
read_request (int fd, int *err)
{
  char *buf = malloc (CONTROL_MAX_REQUEST + 1);
  size_t len = 0;

  *err = 0;
  if (buf == NULL) {
    *err = ENOMEM;
    return NULL;
  }
  for (;;) {
    struct pollfd p = { .fd = fd, .events = POLLIN };
    ssize_t r;
    char *nl;
    if (poll (&p, 1, IO_TIMEOUT_MS) <= 0) {
      *err = ETIMEDOUT;
      break;
    }
    r = read (fd, buf + len, CONTROL_MAX_REQUEST + 1 - len);
    if (r == -1 && errno == EINTR)
      continue;
    if (r <= 0) {
      *err = r == 0 ? EPROTO : errno;
      break;
    }
    len += (size_t) r;
    nl = memchr (buf, '\n', len);
    if (nl) {
      *nl = '\0';
      if (memchr (buf, '\0', (size_t) (nl - buf))) {
        *err = EPROTO;
        break;
      }
      return buf;
    }
    if (len > CONTROL_MAX_REQUEST) {
      *err = EMSGSIZE;
      break;
    }
  }
  free (buf);
  return NULL;
}

static void
serve_one (struct control_server *s, int fd)
{
  struct timeval tv = { .tv_sec = IO_TIMEOUT_MS / 1000 };
  char *line, *words[CONTROL_MAX_WORDS], *text = NULL;
  size_t len = 0;
  struct control_reply r;
  uid_t uid = (uid_t) -1;
  int err, n;

  setsockopt (fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  if (!peer_allowed (s, fd, &uid)) {
    char msg[128];
    snprintf (msg, sizeof msg, "connections from uid %u are not allowed",
              (unsigned) uid);
    send_error (fd, EACCES, msg);
    return;
  }
  line = read_request (fd, &err);
  if (line == NULL) {
    send_error (fd, err, err == EMSGSIZE ? "request too large"
                : err == ETIMEDOUT ? "request timed out"
                : "malformed request");
    return;
  }
  for (char *c = line; *c; c++)
    if ((unsigned char) *c < 0x20 || (unsigned char) *c >= 0x7f) {
      send_error (fd, EPROTO, "request holds bytes outside printable ASCII");
      free (line);
      return;
    }
  n = control_split (line, words, CONTROL_MAX_WORDS);
  if (n <= 0) {
    send_error (fd, EINVAL, "malformed request (bad encoding or too many "
                "words)");
    free (line);
    return;
  }
  r.f = open_memstream (&text, &len);
  if (r.f == NULL) {
    send_error (fd, ENOMEM, "out of memory");
    free (line);
    return;
  }
  fputs ("ok\n", r.f);
  if (s->fn (s->opaque, words, n, &r) == -1) {
    fclose (r.f);
    free (text);
    send_error (fd, cow_last_errno (), cow_last_error ());
  }
  else {
    fputs (".\n", r.f);
    fclose (r.f);
    write_all (fd, text, len);
    free (text);
  }
  free (line);
}

static void *
server_thread (void *arg)
{
  struct control_server *s = arg;

  for (;;) {
    struct pollfd p[2] = {
      { .fd = s->listen_fd, .events = POLLIN },
      { .fd = s->stop_pipe[0], .events = POLLIN },
    };
    int fd;
    if (poll (p, 2, -1) == -1) {
      if (errno == EINTR)
        continue;
      break;
    }
    if (p[1].revents)
      break;
    fd = accept4 (s->listen_fd, NULL, NULL, SOCK_CLOEXEC);
    if (fd == -1)
      continue;
    serve_one (s, fd);
    close (fd);
  }
  cow_error_clear ();
  return NULL;
}

struct control_server *
control_start (const char *path, const uid_t *allow, size_t n_allow,
               control_handler fn, void *opaque)
{
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  struct control_server *s;
  int e;

  if (strlen (path) >= sizeof sa.sun_path) {
    cow_error_set (ENAMETOOLONG, "%s: control socket path too long", path);
    return NULL;
  }
  s = calloc (1, sizeof *s);
  if (s == NULL) {
    cow_error_errno ("calloc");
    return NULL;
  }
  s->listen_fd = -1;
  s->stop_pipe[0] = s->stop_pipe[1] = -1;
  s->fn = fn;
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
  strcpy (sa.sun_path, path);
  s->listen_fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (s->listen_fd == -1) {
    cow_error_errno ("socket");
    goto err;
  }
  unlink (path);                /* a stale socket of an earlier run */
  if (bind (s->listen_fd, (struct sockaddr *) &sa, sizeof sa) == -1) {
    cow_error_errno ("%s: cannot bind the control socket", path);
    goto err;
  }
  if (chmod (path, 0600) == -1 || listen (s->listen_fd, CONTROL_MAX_CONNECTIONS) == -1) {
    cow_error_errno ("%s: control socket", path);
    goto err;
  }
  if (pipe2 (s->stop_pipe, O_CLOEXEC) == -1) {
    cow_error_errno ("pipe");
    goto err;
  }
  e = pthread_create (&s->thread, NULL, server_thread, s);
  if (e) {
    cow_error_set (e, "cannot start the control thread");
    goto err;
  }
  return s;

 err:
  if (s->listen_fd != -1)
    close (s->listen_fd);
  if (s->stop_pipe[0] != -1) {
    close (s->stop_pipe[0]);
    close (s->stop_pipe[1]);
  }
  free (s->allow);
  free (s->path);
  free (s);
  return NULL;
}

void
control_stop (struct control_server *s)
{
  if (s == NULL)
    return;
  write_all (s->stop_pipe[1], "x", 1);
  pthread_join (s->thread, NULL);
  close (s->listen_fd);
  close (s->stop_pipe[0]);
  close (s->stop_pipe[1]);
  unlink (s->path);
  free (s->allow);
  free (s->path);
  free (s);
}
