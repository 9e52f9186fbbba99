/* SPDX-License-Identifier: BSD-3-Clause */
/* Unit tests of the control protocol's request parsing (cow/control.c),
 * which reads lines from any process the socket lets in: control_split
 * (too many words, empty words, encoded spaces, bad escapes), and the
 * server's handling of a request line (over-long lines, NUL and other
 * bytes outside printable ASCII, lines that never end), seen from a
 * client that writes raw bytes to a real server.  A round trip of
 * hostile words through cow_control_request closes it. */
#undef NDEBUG
#include <config.h>

#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <cmocka.h>

#include "cowchain.h"
#include "control.h"
#include "error.h"
#include "testutil.h"

/*----------------------------------------------------------------------
 * control_split. */

/* Split a copy of line; returns the count, the words in w (pointing into
 * *copy, to free). */
static int
split (const char *line, char **w, int max, char **copy)
{
  *copy = strdup (line);
  assert_non_null (*copy);
  return control_split (*copy, w, max);
}

static void
expect_words (const char *line, int n, ...)
{
  char *w[CONTROL_MAX_WORDS + 1], *copy;
  int got = split (line, w, CONTROL_MAX_WORDS, &copy);
  va_list ap;

  if (got != n)
    fail_msg ("'%s': %d words, not %d", line, got, n);
  va_start (ap, n);
  for (int i = 0; i < n; i++) {
    const char *want = va_arg (ap, const char *);
    if (strcmp (w[i], want) != 0)
      fail_msg ("'%s': word %d is '%s', not '%s'", line, i, w[i], want);
  }
  va_end (ap);
  free (copy);
}

static void
expect_split_refused (const char *line, int max)
{
  char *w[CONTROL_MAX_WORDS + 2], *copy;
  int got = split (line, w, max, &copy);

  if (got != -1)
    fail_msg ("'%s' (at most %d words): split into %d words, not refused",
              line, max, got);
  free (copy);
}

static void
test_split_words (void **state)
{
  expect_words ("status", 1, "status");
  expect_words ("list disk0", 2, "list", "disk0");
  /* An empty word is "-"; spaces never make one. */
  expect_words ("snapshot - s1 -", 4, "snapshot", "", "s1", "");
  expect_words ("a  b", 2, "a", "b");
  expect_words ("  a b  ", 2, "a", "b");
  expect_words ("", 0);
  expect_words ("   ", 0);
  /* Encoded spaces, newlines and escapes stay inside their word. */
  expect_words ("snapshot d s%201 a%20b%0Ac", 4, "snapshot", "d", "s 1",
                "a b\nc");
  expect_words ("x %2D %2D%2D -- %25 %2520", 6, "x", "-", "--", "--", "%",
                "%20");
  expect_words ("a\tb c", 2, "a\tb", "c");
  expect_words ("%ff%FE", 1, "\xff\xfe");
}

static void
test_split_refused (void **state)
{
  char line[256], *p = line;

  /* Bad escapes, an escaped NUL: the whole line is refused. */
  expect_split_refused ("status %", CONTROL_MAX_WORDS);
  expect_split_refused ("status %2", CONTROL_MAX_WORDS);
  expect_split_refused ("status %zz", CONTROL_MAX_WORDS);
  expect_split_refused ("status a%00b", CONTROL_MAX_WORDS);
  expect_split_refused ("%G0 ok", CONTROL_MAX_WORDS);
  /* Too many words: max words pass, one more does not. */
  for (int i = 0; i < CONTROL_MAX_WORDS; i++)
    p += sprintf (p, "%sw%d", i ? " " : "", i);
  {
    char *w[CONTROL_MAX_WORDS], *copy;
    assert_int_equal (split (line, w, CONTROL_MAX_WORDS, &copy),
                      CONTROL_MAX_WORDS);
    assert_string_equal (w[CONTROL_MAX_WORDS - 1], "w15");
    free (copy);
  }
  sprintf (p, " one-more");
  expect_split_refused (line, CONTROL_MAX_WORDS);
  expect_split_refused ("a b c", 2);
  expect_split_refused ("a", 0);
}

/*----------------------------------------------------------------------
 * A server that answers each request with its words. */

static char *dir, *sock;
static struct control_server *srv;

/* "echo W...": one line per word, encoded; "fail MESSAGE": EPERM with
 * MESSAGE. */
static int
echo_handler (void *opaque, char **words, int n, struct control_reply *r)
{
  if (strcmp (words[0], "fail") == 0) {
    cow_error_set (EPERM, "%s", n > 1 ? words[1] : "failed");
    return -1;
  }
  for (int i = 0; i < n; i++) {
    char *e = word_encode (words[i]);
    if (e == NULL) {
      cow_error_set (ENOMEM, "out of memory");
      return -1;
    }
    control_reply_line (r, "%s", e);
    free (e);
  }
  return 0;
}

static int
group_setup (void **state)
{
  dir = tu_mkdtemp ("test-protocol");
  sock = tu_path (dir, "ctl");
  srv = control_start (sock, NULL, 0, echo_handler, NULL, NULL);
  if (srv == NULL) {
    fprintf (stderr, "control_start: %s\n", cow_last_error ());
    return -1;
  }
  return 0;
}

static int
group_teardown (void **state)
{
  if (srv)
    control_stop (srv);
  tu_rmtree (dir);
  free (dir);
  free (sock);
  return 0;
}

/* Send len raw bytes, close the sending side, read the whole reply
 * (malloc'd, NUL-terminated). */
static char *
raw_request (const void *req, size_t len)
{
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  const char *p = req;
  size_t cap = 1 << 20, got = 0;
  char *reply = malloc (cap + 1);
  int fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

  assert_non_null (reply);
  assert_true (fd >= 0);
  snprintf (sa.sun_path, sizeof sa.sun_path, "%s", sock);
  assert_int_equal (connect (fd, (struct sockaddr *) &sa, sizeof sa), 0);
  /* The server may refuse before it read everything: then stop. */
  while (len > 0) {
    ssize_t r = send (fd, p, len, MSG_NOSIGNAL);
    if (r <= 0)
      break;
    p += r;
    len -= (size_t) r;
  }
  shutdown (fd, SHUT_WR);
  for (;;) {
    ssize_t r = recv (fd, reply + got, cap - got, 0);
    if (r <= 0)
      break;
    got += (size_t) r;
    assert_true (got < cap);
  }
  close (fd);
  reply[got] = '\0';
  return reply;
}

/* The reply to req is "error ERRNO ..." and the message says why. */
static void
expect_error_reply (const void *req, size_t len, int err, const char *why)
{
  char *reply = raw_request (req, len), head[32];
  size_t hl = (size_t) snprintf (head, sizeof head, "error %d ", err);

  if (strncmp (reply, head, hl) != 0)
    fail_msg ("reply '%.200s', not '%s...'", reply, head);
  {
    char *msg = strdup (reply + hl), *nl = strchr (msg, '\n');
    assert_non_null (nl);
    *nl = '\0';
    assert_int_equal (word_decode (msg), 0);
    tu_assert_contains (msg, why);
    assert_string_equal (nl + 1, ".\n");
    free (msg);
  }
  free (reply);
}

#define expect_error(lit, err, why) \
  expect_error_reply ((lit), sizeof (lit) - 1, (err), (why))

static void
test_request_lines (void **state)
{
  char *reply;

  reply = raw_request ("echo a%20b - %2D\n", 17);
  assert_string_equal (reply, "ok\necho\na%20b\n-\n%2D\n.\n");
  free (reply);
  /* Only the first line counts. */
  reply = raw_request ("echo 1\necho 2\n", 14);
  assert_string_equal (reply, "ok\necho\n1\n.\n");
  free (reply);

  expect_error ("\n", EINVAL, "malformed request");
  expect_error ("   \n", EINVAL, "malformed request");
  expect_error ("echo %zz\n", EINVAL, "bad encoding");
  expect_error ("echo a%00\n", EINVAL, "bad encoding");
  expect_error ("echo a\0b\n", EPROTO, "a NUL byte");
  expect_error ("\0\n", EPROTO, "a NUL byte");
  expect_error ("echo a\tb\n", EPROTO, "outside printable ASCII");
  expect_error ("echo a\rb\n", EPROTO, "outside printable ASCII");
  expect_error ("echo \x7f\n", EPROTO, "outside printable ASCII");
  expect_error ("echo \xc3\xa9\n", EPROTO, "outside printable ASCII");
  expect_error ("echo", EPROTO, "ended before a whole request line");
  expect_error ("", EPROTO, "ended before a whole request line");
  expect_error ("fail why%20not\n", EPERM, "why not");
}

static void
test_request_word_count (void **state)
{
  char line[512], *p = line, *reply;

  p += sprintf (p, "echo");
  for (int i = 1; i < CONTROL_MAX_WORDS; i++)
    p += sprintf (p, " %d", i);
  *p++ = '\n';
  reply = raw_request (line, (size_t) (p - line));
  assert_non_null (strstr (reply, "\n15\n.\n"));
  assert_int_equal (strncmp (reply, "ok\n", 3), 0);
  free (reply);
  p--;
  p += sprintf (p, " 16\n");
  expect_error_reply (line, (size_t) (p - line), EINVAL, "too many words");
}

/* A line of CONTROL_MAX_REQUEST bytes (its newline not counted) is
 * served; one byte more is refused, as is a line that never ends. */
static void
test_request_length (void **state)
{
  size_t max = CONTROL_MAX_REQUEST;
  char *line = malloc (max + 3), *reply;

  assert_non_null (line);
  memcpy (line, "echo ", 5);
  memset (line + 5, 'x', max - 5);
  line[max] = '\n';
  reply = raw_request (line, max + 1);
  assert_int_equal (strncmp (reply, "ok\necho\nxxx", 11), 0);
  assert_int_equal (strlen (reply), 3 + 5 + (max - 5) + 1 + 2);
  free (reply);

  line[max] = 'x';
  line[max + 1] = '\n';
  expect_error_reply (line, max + 2, EMSGSIZE, "request too large");
  expect_error_reply (line, max + 1, EMSGSIZE, "request too large");
  /* Far more than that, without a newline: refused all the same. */
  {
    size_t big = 4 * max;
    char *huge = malloc (big);
    assert_non_null (huge);
    memset (huge, 'y', big);
    expect_error_reply (huge, big, EMSGSIZE, "request too large");
    free (huge);
  }
  free (line);
}

/* Hostile words through the client and back. */
static void
test_client_round_trip (void **state)
{
  char all[256];
  struct cow_control_reply payload = { 0 };
  const char *argv[CONTROL_MAX_WORDS] = {
    "echo", all, "", "-", "--", " ", "%", "%2D", "a b\nc", "\t",
    "\xff", "status", "-x", "x-", "%00", "\x01\x7f",
  };

  for (int c = 1; c < 256; c++)
    all[c - 1] = (char) c;
  all[255] = '\0';
  if (cow_control_request (sock, argv, CONTROL_MAX_WORDS, 5000, &payload)
      == -1)
    fail_msg ("cow_control_request: %s", cow_last_error ());
  /* One payload line per word, decoded by the client. */
  assert_true (payload.n == CONTROL_MAX_WORDS);
  for (int i = 0; i < CONTROL_MAX_WORDS; i++) {
    assert_int_equal (payload.lines[i].n, 1);
    if (strcmp (payload.lines[i].words[0], argv[i]) != 0)
      fail_msg ("word %d came back different", i);
  }
  cow_control_free_reply (&payload);

  /* One word too many: the server refuses it. */
  {
    const char *more[CONTROL_MAX_WORDS + 1];
    memcpy (more, argv, sizeof argv);
    more[CONTROL_MAX_WORDS] = "x";
    assert_int_equal (cow_control_request (sock, more, CONTROL_MAX_WORDS + 1,
                                           5000, &payload), -1);
    assert_int_equal (cow_last_errno (), EINVAL);
    tu_assert_contains (cow_last_error (), "too many words");
  }
  /* The handler's error, whole. */
  {
    const char *f[] = { "fail", "a message\nwith % and -" };
    assert_int_equal (cow_control_request (sock, f, 2, 5000, &payload), -1);
    assert_int_equal (cow_last_errno (), EPERM);
    assert_string_equal (cow_last_error (), "a message\nwith % and -");
  }
}

int
main (int argc, char **argv)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test (test_split_words),
    cmocka_unit_test (test_split_refused),
    cmocka_unit_test (test_request_lines),
    cmocka_unit_test (test_request_word_count),
    cmocka_unit_test (test_request_length),
    cmocka_unit_test (test_client_round_trip),
  };

  if (argc > 1)
    cmocka_set_test_filter (argv[1]);
  return cmocka_run_group_tests (tests, group_setup, group_teardown);
}
