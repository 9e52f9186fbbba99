/* SPDX-License-Identifier: BSD-3-Clause */
/* A service's disks and control commands, driven through the dispatch
 * the control socket's server runs (control_run with
 * cow_service_dispatch): the command table against the protocol, every
 * command with too few and too many arguments, unknown commands and
 * disks, bad numbers and flags, the revert refused under NBD clients,
 * the exact replies of status, blklist, list and jobs, the export-name
 * lookup, and one round trip over a real socket with its log. */
#undef NDEBUG
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "cowchain.h"
#include "control.h"
#include "error.h"
#include "events.h"
#include "io.h"
#include "service.h"
#include "words.h"
#include "testutil.h"

#define SIZE (1u << 20)

/* The commands and their argument counts as the protocol has them: the
 * table must not change them silently. */
static const struct {
  const char *name;
  int min_args, max_args;
} protocol[] = {
  { "status", 0, 0 },
  { "blklist", 0, 0 },
  { "list", 1, 1 },
  { "snapshot", 3, 3 },
  { "snapshot-atomic", 2, 2 },
  { "revert", 3, 3 },
  { "commit", 5, 5 },
  { "pull", 4, 4 },
  { "delete", 3, 3 },
  { "jobs", 0, 1 },
  { "job-pause", 1, 1 },
  { "job-resume", 1, 1 },
  { "job-cancel", 1, 1 },
  { "job-speed", 2, 2 },
  { "events", 0, 1 },
};
#define N_PROTOCOL (sizeof protocol / sizeof protocol[0])

static struct io_ops fast_ops;

static int
group_setup (void **state)
{
  (void) state;
  fast_ops = io_real_ops;
  fast_ops.fsync = tu_nosync;
  io_set_ops (&fast_ops);
  return 0;
}

static int
group_teardown (void **state)
{
  (void) state;
  io_set_ops (NULL);
  return 0;
}

/*----------------------------------------------------------------------
 * Two state-directory disks, vm1 and vm2, served by one service. */

struct fx {
  char *dir;
  struct cow_disk *d[2];
  struct cow_export *e[2];
  struct cow_service *s;
};

static struct cow_disk *
open_disk (const char *dir, const char *name)
{
  char b[64], st[64];
  char *base, *sdir;
  uint8_t *data = calloc (1, SIZE);
  struct cow_disk *d;

  assert_non_null (data);
  snprintf (b, sizeof b, "%s.raw", name);
  snprintf (st, sizeof st, "%s.st", name);
  base = tu_path (dir, b);
  sdir = tu_path (dir, st);
  tu_write_file (base, data, SIZE);
  {
    struct cow_disk_config cfg = {
      .base = base, .base_format = "raw", .state_dir = sdir,
    };
    d = cow_disk_open (&cfg);
  }
  if (d == NULL)
    print_error ("open %s: %s\n", sdir, cow_last_error ());
  assert_non_null (d);
  free (base);
  free (sdir);
  free (data);
  return d;
}

static int
fx_setup (void **state)
{
  struct fx *f = calloc (1, sizeof *f);

  assert_non_null (f);
  f->dir = tu_mkdtemp ("test-service");
  f->d[0] = open_disk (f->dir, "vm1");
  f->d[1] = open_disk (f->dir, "vm2");
  f->s = cow_service_new ();
  assert_non_null (f->s);
  f->e[0] = cow_service_add (f->s, "vm1", f->d[0]);
  f->e[1] = cow_service_add (f->s, "vm2", f->d[1]);
  assert_non_null (f->e[0]);
  assert_non_null (f->e[1]);
  *state = f;
  return 0;
}

static int
fx_teardown (void **state)
{
  struct fx *f = *state;

  cow_service_free (f->s);
  for (int i = 0; i < 2; i++) {
    cow_disk_job_wait (f->d[i]);
    assert_int_equal (cow_disk_close (f->d[i]), 0);
  }
  tu_rmtree (f->dir);
  free (f->dir);
  free (f);
  return 0;
}

/* Run one request (decoded words, NULL-terminated) as the control
 * server does.  Returns its result; *reply (if not NULL) is the whole
 * reply text on success, NULL on error. */
static int
vcall (struct cow_service *s, char **reply, const char *cmd, va_list ap)
{
  char *words[CONTROL_MAX_WORDS + 4];
  char *text = NULL;
  size_t len;
  int n = 0, r;
  const char *w;

  words[n++] = (char *) cmd;
  while ((w = va_arg (ap, const char *)) != NULL) {
    assert_true (n < (int) (sizeof words / sizeof words[0]));
    words[n++] = (char *) w;
  }
  r = control_run (cow_service_dispatch, s, words, n, &text, &len);
  if (r == 0) {
    assert_non_null (text);
    assert_int_equal (strlen (text), len);
  }
  else
    assert_null (text);
  if (reply)
    *reply = text;
  else
    free (text);
  return r;
}

static int
call (struct cow_service *s, char **reply, const char *cmd, ...)
{
  va_list ap;
  int r;

  va_start (ap, cmd);
  r = vcall (s, reply, cmd, ap);
  va_end (ap);
  return r;
}

/* A whole reply: "ok", lines, ".". */
static bool
whole_reply (const char *reply)
{
  size_t n = strlen (reply);

  return strncmp (reply, "ok\n", 3) == 0 && n >= 5
    && strcmp (reply + n - 3, "\n.\n") == 0;
}

/* The request must succeed. */
static char *
ok (struct cow_service *s, const char *cmd, ...)
{
  va_list ap;
  char *reply;
  int r;

  va_start (ap, cmd);
  r = vcall (s, &reply, cmd, ap);
  va_end (ap);
  if (r == -1)
    print_error ("%s: %s\n", cmd, cow_last_error ());
  assert_int_equal (r, 0);
  assert_true (whole_reply (reply));
  return reply;
}

/* The request must fail with errnum and exactly msg. */
#define fails(s, errnum, msg, ...)                                      \
  do {                                                                  \
    int r_ = call ((s), NULL, __VA_ARGS__, NULL);                       \
    if (r_ == 0 || cow_last_errno () != (errnum)                        \
        || strcmp (cow_last_error (), (msg)) != 0)                      \
      print_error ("got %d, errno %d '%s'; want errno %d '%s'\n", r_,   \
                   cow_last_errno (), cow_last_error (), (errnum),      \
                   (msg));                                              \
    assert_int_equal (r_, -1);                                          \
    assert_int_equal (cow_last_errno (), (errnum));                     \
    assert_string_equal (cow_last_error (), (msg));                     \
  } while (0)

/* "ok\n" LINES ".\n" must equal want (lines joined by '\n'), given as
 * printf arguments. */
static void
assert_reply (char *reply, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));
static void
assert_reply (char *reply, const char *fmt, ...)
{
  char *want = NULL, *lines = NULL;
  va_list ap;

  va_start (ap, fmt);
  assert_true (vasprintf (&lines, fmt, ap) != -1);
  va_end (ap);
  assert_true (asprintf (&want, "ok\n%s.\n", lines) != -1);
  assert_string_equal (reply, want);
  free (want);
  free (lines);
  free (reply);
}

static char *
enc (const char *s)
{
  char *w = word_encode (s);

  assert_non_null (w);
  return w;
}

/* The active layer's file of a disk, encoded. */
static char *
active_enc (struct cow_disk *d, size_t *depth)
{
  struct cow_layer_info *v;
  size_t n;
  char *w;

  assert_int_equal (cow_disk_layers (d, &v, &n), 0);
  w = enc (v[n - 1].path);
  if (depth)
    *depth = n;
  cow_layer_info_free (v, n);
  return w;
}

/*----------------------------------------------------------------------
 * The table. */

/* Every command of the protocol, no other, with its argument counts and
 * a usage line that shows them. */
static void
test_table (void **state)
{
  (void) state;
  assert_int_equal (cow_n_commands, N_PROTOCOL);
  for (size_t i = 0; i < N_PROTOCOL; i++) {
    const struct cow_command *c = &cow_commands[i];
    char *u = strdup (c->usage), *save, *w;
    int words = 0, optional = 0;

    assert_string_equal (c->name, protocol[i].name);
    assert_int_equal (c->min_args, protocol[i].min_args);
    assert_int_equal (c->max_args, protocol[i].max_args);
    assert_non_null (c->run);
    assert_non_null (u);
    w = strtok_r (u, " ", &save);
    assert_string_equal (w, c->name);
    while ((w = strtok_r (NULL, " ", &save)) != NULL) {
      words++;
      if (w[0] == '[')
        optional++;
      if (words == 1)
        assert_int_equal (c->disk_arg,
                          strcmp (w, "DISK") == 0 || strcmp (w, "[DISK]") == 0);
    }
    assert_int_equal (words, c->max_args);
    assert_int_equal (words - optional, c->min_args);
    free (u);
  }
}

static void
test_unknown_command (void **state)
{
  struct fx *f = *state;

  fails (f->s, EINVAL, "unknown command 'nosuch'", "nosuch");
  fails (f->s, EINVAL, "unknown command ''", "");
  fails (f->s, EINVAL, "unknown command 'STATUS'", "STATUS");
  fails (f->s, EINVAL, "unknown command 'status '", "status ");
  /* Cut at 32 bytes. */
  fails (f->s, EINVAL, "unknown command '0123456789abcdef0123456789abcdef'",
         "0123456789abcdef0123456789abcdef0123456789");
}

/* Every command with one argument too few (when it takes any) and one
 * too many: refused before the disk is looked up or anything runs. */
static void
test_argument_counts (void **state)
{
  struct fx *f = *state;
  char *words[CONTROL_MAX_WORDS];

  for (size_t i = 0; i < cow_n_commands; i++) {
    const struct cow_command *c = &cow_commands[i];
    char msg[128];
    int counts[3] = { c->min_args - 1, c->max_args + 1, 0 }, k = 2;

    snprintf (msg, sizeof msg, "wrong number of arguments for '%s'",
              c->name);
    /* No arguments at all, too, where one is needed. */
    if (c->min_args > 1)
      counts[k++] = 0;
    for (int j = 0; j < k; j++) {
      char *text = NULL;
      size_t len;
      int n = 1 + counts[j];
      if (counts[j] < 0)
        continue;
      words[0] = (char *) c->name;
      for (int a = 1; a < n; a++)
        words[a] = (char *) "vm1";
      assert_int_equal (control_run (cow_service_dispatch, f->s, words, n,
                                     &text, &len), -1);
      assert_null (text);
      assert_int_equal (cow_last_errno (), EINVAL);
      assert_string_equal (cow_last_error (), msg);
    }
  }
}

/* Every command that takes a DISK, with the right number of words and
 * a disk that is not served: nothing runs. */
static void
test_unknown_disk (void **state)
{
  struct fx *f = *state;
  char *words[CONTROL_MAX_WORDS];
  char long_name[81];

  for (size_t i = 0; i < cow_n_commands; i++) {
    const struct cow_command *c = &cow_commands[i];
    char *text = NULL;
    size_t len;
    if (!c->disk_arg)
      continue;
    words[0] = (char *) c->name;
    words[1] = (char *) "nosuch";
    /* Arguments that would be valid if the disk were. */
    for (int a = 2; a <= c->max_args; a++)
      words[a] = (char *) "0";
    assert_int_equal (control_run (cow_service_dispatch, f->s, words,
                                   1 + c->max_args, &text, &len), -1);
    assert_int_equal (cow_last_errno (), ENOENT);
    assert_string_equal (cow_last_error (), "no disk named 'nosuch'");
  }
  /* Strict: a served name only, exactly. */
  fails (f->s, ENOENT, "no disk named 'VM1'", "list", "VM1");
  fails (f->s, ENOENT, "no disk named 'vm1 '", "jobs", "vm1 ");
  /* Cut at 64 bytes. */
  memset (long_name, 'x', 80);
  long_name[80] = '\0';
  fails (f->s, ENOENT,
         "no disk named '"
         "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'",
         "list", long_name);
  /* "" is the default disk (the first one). */
  free (ok (f->s, "list", "", NULL));
}

/* SPEED: decimal digits only, no sign, blank or overflow; checked
 * before the engine runs anything. */
static void
test_bad_numbers (void **state)
{
  struct fx *f = *state;

  fails (f->s, EINVAL, "SPEED: '12x' is not a decimal number",
         "job-speed", "vm1", "12x");
  fails (f->s, EINVAL, "SPEED: '' is not a decimal number",
         "job-speed", "vm1", "");
  fails (f->s, EINVAL, "SPEED: '-1' is not a decimal number",
         "job-speed", "vm1", "-1");
  fails (f->s, EINVAL, "SPEED: '+1' is not a decimal number",
         "job-speed", "vm1", "+1");
  fails (f->s, EINVAL, "SPEED: ' 1' is not a decimal number",
         "job-speed", "vm1", " 1");
  fails (f->s, EINVAL, "SPEED: '0x10' is not a decimal number",
         "job-speed", "vm1", "0x10");
  fails (f->s, ERANGE, "SPEED: '18446744073709551616' is too large",
         "job-speed", "vm1", "18446744073709551616");
  fails (f->s, ERANGE, "SPEED: '99999999999999999999999999999999' is too "
         "large", "job-speed", "vm1",
         "999999999999999999999999999999999999999");
  /* The largest number passes the parser: the engine answers (no job). */
  assert_int_equal (call (f->s, NULL, "job-speed", "vm1",
                          "18446744073709551615", NULL), -1);
  assert_int_equal (cow_last_errno (), ENOENT);
  assert_null (strstr (cow_last_error (), "SPEED"));

  fails (f->s, EINVAL, "SPEED: 'fast' is not a decimal number",
         "delete", "vm1", "nosuch", "fast");
  fails (f->s, EINVAL, "SPEED: '1.5' is not a decimal number",
         "pull", "vm1", "", "", "1.5");
  fails (f->s, ERANGE, "SPEED: '18446744073709551616' is too large",
         "commit", "vm1", "active", "", "", "18446744073709551616");
}

/* FLAGS: "" or a comma list of allow-base-write and force; checked
 * before SPEED and before the engine. */
static void
test_bad_flags (void **state)
{
  struct fx *f = *state;

  fails (f->s, EINVAL, "FLAGS: 'bogus' is not allow-base-write or force",
         "commit", "vm1", "active", "", "bogus", "x");
  fails (f->s, EINVAL, "FLAGS: 'FORCE' is not allow-base-write or force",
         "pull", "vm1", "", "FORCE", "0");
  fails (f->s, EINVAL, "FLAGS: '' is not allow-base-write or force",
         "pull", "vm1", "", ",force", "0");
  fails (f->s, EINVAL, "FLAGS: '' is not allow-base-write or force",
         "pull", "vm1", "", "force,,force", "0");
  fails (f->s, EINVAL, "FLAGS: 'force,' ends with a comma",
         "pull", "vm1", "", "force,", "0");
  fails (f->s, EINVAL, "FLAGS: 'allow-base-writes' is not allow-base-write "
         "or force", "commit", "vm1", "active", "", "allow-base-writes", "0");
  /* Cut at 32 bytes. */
  fails (f->s, EINVAL, "FLAGS: '0123456789abcdef0123456789abcdef' is not "
         "allow-base-write or force", "pull", "vm1", "",
         "0123456789abcdef0123456789abcdef0123456789,force", "0");
  /* Valid flags reach the engine, which refuses the unknown base. */
  assert_int_equal (call (f->s, NULL, "pull", "vm1", "nosuch",
                          "allow-base-write,force", "0", NULL), -1);
  assert_int_equal (cow_last_errno (), ENOENT);
  assert_null (strstr (cow_last_error (), "FLAGS"));
}

/* A revert is refused while NBD clients are attached to the disk (with
 * their count), unless forced; FORCE is "force" or "". */
static void
test_revert_clients (void **state)
{
  struct fx *f = *state;
  char *reply;
  unsigned long long ns;

  reply = ok (f->s, "snapshot", "vm1", "s1", "first", NULL);
  assert_int_equal (sscanf (reply, "ok\npause-ns %llu\n.\n", &ns), 1);
  free (reply);
  free (ok (f->s, "snapshot", "vm1", "s2", "", NULL));

  cow_export_attach (f->e[0]);
  cow_export_attach (f->e[0]);
  cow_export_attach (f->e[1]);
  assert_int_equal (cow_export_clients (f->e[0]), 2);
  fails (f->s, EBUSY, "2 NBD clients are connected to disk vm1; reverting "
         "changes the disk under them; stop them or use --force",
         "revert", "vm1", "s2", "");
  fails (f->s, EINVAL, "revert: FORCE must be 'force' or empty, not 'yes'",
         "revert", "vm1", "s2", "yes");
  fails (f->s, EINVAL, "revert: FORCE must be 'force' or empty, not '-'",
         "revert", "vm1", "s2", "-");
  cow_export_detach (f->e[0]);
  fails (f->s, EBUSY, "1 NBD client is connected to disk vm1; reverting "
         "changes the disk under it; stop it or use --force",
         "revert", "vm1", "s2", "");
  /* Forced: it goes ahead with the client connected. */
  free (ok (f->s, "revert", "vm1", "s2", "force", NULL));
  cow_export_detach (f->e[0]);
  assert_int_equal (cow_export_clients (f->e[0]), 0);
  /* vm2's client does not hold vm1; without clients, the engine's own
   * refusal (a later snapshot would be lost) is the one left. */
  assert_int_equal (call (f->s, NULL, "revert", "vm1", "s1", "", NULL), -1);
  assert_int_equal (cow_last_errno (), EBUSY);
  assert_null (strstr (cow_last_error (), "NBD client"));
  free (ok (f->s, "revert", "vm1", "s2", "", NULL));
  cow_export_detach (f->e[1]);
}

/* The last line of a status reply: the process's metadata cache and
 * merged maps, as they are now (malloc'd). */
static char *
memory_line (void)
{
  struct cow_memory_usage u;
  char *line;

  cow_memory_usage (&u);
  assert_true (asprintf (&line, "memory %" PRIu64 " %" PRIu64 " %" PRIu64
                         " %" PRIu64 "\n", u.cache_budget, u.cache_used,
                         u.cache_peak, u.map_bytes) != -1);
  return line;
}

/* The exact lines of status, blklist, list, jobs and snapshot-atomic. */
static void
test_replies (void **state)
{
  struct fx *f = *state;
  char *a1, *a2, *b1, *b2, *reply, *mem;
  size_t k1, k2;
  unsigned long long ns;

  a1 = active_enc (f->d[0], &k1);
  a2 = active_enc (f->d[1], &k2);
  b1 = enc (cow_disk_base (f->d[0]));
  b2 = enc (cow_disk_base (f->d[1]));
  assert_int_equal (k1, 1);
  cow_export_attach (f->e[1]);
  reply = ok (f->s, "status", NULL);
  mem = memory_line ();
  assert_reply (reply,
                "clients vm1 0\ndisk vm1 %s %s 1 ok -\n"
                "clients vm2 1\ndisk vm2 %s %s 1 ok -\n%s", a1, b1, a2, b2,
                mem);
  free (mem);
  cow_export_detach (f->e[1]);
  assert_reply (ok (f->s, "blklist", NULL), "disk vm1 %s\ndisk vm2 %s\n",
                a1, a2);
  assert_reply (ok (f->s, "jobs", NULL),
                "job vm1 - none - - 0 0 0 0 0 0 0 -\n"
                "job vm2 - none - - 0 0 0 0 0 0 0 -\n");
  assert_reply (ok (f->s, "jobs", "vm2", NULL),
                "job vm2 - none - - 0 0 0 0 0 0 0 -\n");

  /* Both disks at one cut. */
  reply = ok (f->s, "snapshot-atomic", "both", "a description", NULL);
  assert_int_equal (sscanf (reply, "ok\npause-ns %llu\n.\n", &ns), 1);
  free (reply);
  for (int i = 0; i < 2; i++) {
    struct cow_layer_info *v;
    size_t n;
    char *p0, *p1, *d;
    assert_int_equal (cow_disk_layers (f->d[i], &v, &n), 0);
    assert_int_equal (n, 2);
    p0 = enc (v[0].path);
    p1 = enc (v[1].path);
    d = enc ("a description");
    assert_reply (ok (f->s, "list", i ? "vm2" : "vm1", NULL),
                  "layer %s %" PRId64 " both %s frozen\n"
                  "layer %s %" PRId64 " - - active\n",
                  p0, v[0].created, d, p1, v[1].created);
    free (p0);
    free (p1);
    free (d);
    cow_layer_info_free (v, n);
  }
  /* A name taken on one disk fails the whole group. */
  free (ok (f->s, "snapshot", "vm2", "taken", "", NULL));
  assert_int_equal (call (f->s, NULL, "snapshot-atomic", "taken", "",
                          NULL), -1);
  assert_int_equal (cow_last_errno (), EEXIST);
  free (a1);
  free (a2);
  a1 = active_enc (f->d[0], &k1);
  a2 = active_enc (f->d[1], &k2);
  assert_int_equal (k1, 2);
  assert_int_equal (k2, 3);
  reply = ok (f->s, "status", NULL);
  mem = memory_line ();
  assert_reply (reply,
                "clients vm1 0\ndisk vm1 %s %s 2 ok -\n"
                "clients vm2 0\ndisk vm2 %s %s 3 ok -\n%s", a1, b1, a2, b2,
                mem);
  free (mem);
  free (a1);
  free (a2);
  free (b1);
  free (b2);
}

/* A job's line while it runs and once it ended. */
static void
test_jobs_line (void **state)
{
  struct fx *f = *state;
  char *reply, *w[15], *line;
  unsigned long long done, total;

  free (ok (f->s, "snapshot", "vm1", "s1", "", NULL));
  free (ok (f->s, "commit", "vm1", "active", "", "force", "0", NULL));
  assert_int_equal (cow_disk_job_wait (f->d[0]), 0);
  reply = ok (f->s, "jobs", "vm1", NULL);
  line = reply + 3;
  *strchr (line, '\n') = '\0';
  assert_int_equal (control_split (line, w, 15), 14);
  assert_string_equal (w[0], "job");
  assert_string_equal (w[1], "vm1");
  assert_string_equal (w[2], "commit");
  assert_string_equal (w[3], "completed");
  done = strtoull (w[6], NULL, 10);
  total = strtoull (w[7], NULL, 10);
  assert_true (done == total);
  assert_string_not_equal (w[11], "0");          /* ENDED */
  assert_string_equal (w[12], "0");              /* ERRNO */
  free (reply);
  /* Job controls with no job running: the engine's ENOENT. */
  assert_int_equal (call (f->s, NULL, "job-pause", "vm1", NULL), -1);
  assert_int_equal (cow_last_errno (), ENOENT);
  assert_int_equal (call (f->s, NULL, "job-cancel", "vm1", NULL), -1);
  assert_int_equal (cow_last_errno (), ENOENT);
}

/*----------------------------------------------------------------------
 * Names and lookups. */

static void
test_names (void **state)
{
  struct fx *f = *state;
  struct cow_service *s;
  struct cow_export *e;
  char n65[66];

  (void) f;
  assert_int_equal (cow_service_check_name ("vm-1.a_B"), 0);
  assert_int_equal (cow_service_check_name (""), -1);
  assert_int_equal (cow_last_errno (), EINVAL);
  assert_string_equal (cow_last_error (),
                       "name '' must be 1 to 64 characters");
  memset (n65, 'a', 65);
  n65[65] = '\0';
  assert_int_equal (cow_service_check_name (n65), -1);
  n65[64] = '\0';
  assert_int_equal (cow_service_check_name (n65), 0);
  assert_int_equal (cow_service_check_name ("a/b"), -1);
  assert_string_equal (cow_last_error (), "name 'a/b' may hold only "
                       "letters, digits, '.', '_' and '-'");
  assert_int_equal (cow_service_check_name ("a b"), -1);

  /* Named disks: exact names only, "" the default. */
  s = cow_service_new ();
  assert_non_null (s);
  assert_null (cow_service_lookup (s, "x"));
  assert_non_null (cow_service_add (s, "a", f->d[0]));
  assert_null (cow_service_add (s, "a", f->d[1]));
  assert_int_equal (cow_last_errno (), EEXIST);
  assert_null (cow_service_add (s, "", f->d[1]));
  assert_int_equal (cow_last_errno (), EINVAL);
  assert_null (cow_service_add (s, "b/c", f->d[1]));
  assert_int_equal (cow_last_errno (), EINVAL);
  e = cow_service_add (s, "b", f->d[1]);
  assert_non_null (e);
  assert_string_equal (cow_export_name (e), "b");
  assert_ptr_equal (cow_export_disk (e), f->d[1]);
  assert_ptr_equal (cow_export_disk (cow_service_lookup (s, "")), f->d[0]);
  assert_ptr_equal (cow_export_disk (cow_service_lookup (s, NULL)), f->d[0]);
  assert_ptr_equal (cow_service_lookup (s, "b"), e);
  assert_null (cow_service_lookup (s, "c"));
  assert_int_equal (cow_last_errno (), ENOENT);
  assert_string_equal (cow_last_error (), "no disk (export) named 'c'");
  assert_int_equal (cow_service_set_default (s, "c"), -1);
  assert_int_equal (cow_last_errno (), ENOENT);
  assert_int_equal (cow_service_set_default (s, "b"), 0);
  assert_ptr_equal (cow_service_lookup (s, ""), e);
  /* The control protocol's "" follows the default too. */
  cow_export_attach (e);
  fails (s, EBUSY, "1 NBD client is connected to disk b; reverting changes "
         "the disk under it; stop it or use --force",
         "revert", "", "nosuch", "");
  cow_export_detach (e);
  cow_service_free (s);

  /* One unnamed disk: every export name reaches it, but the control
   * socket knows it only as "". */
  s = cow_service_new ();
  assert_non_null (s);
  e = cow_service_add (s, "", f->d[0]);
  assert_non_null (e);
  assert_null (cow_service_add (s, "b", f->d[1]));
  assert_int_equal (cow_last_errno (), EINVAL);
  assert_ptr_equal (cow_service_lookup (s, "anything"), e);
  assert_ptr_equal (cow_service_lookup (s, ""), e);
  fails (s, ENOENT, "no disk named 'anything'", "list", "anything");
  free (ok (s, "list", "", NULL));
  cow_export_attach (e);
  fails (s, EBUSY, "1 NBD client is connected to disk (default); reverting "
         "changes the disk under it; stop it or use --force",
         "revert", "", "nosuch", "");
  cow_export_detach (e);
  {
    char *a = active_enc (f->d[0], NULL), *b = enc (cow_disk_base (f->d[0]));
    char *reply = ok (s, "status", NULL), *mem = memory_line ();
    assert_reply (reply, "clients - 0\ndisk - %s %s 1 ok -\n%s", a, b, mem);
    free (mem);
    free (a);
    free (b);
  }
  cow_service_free (s);
}

/*----------------------------------------------------------------------
 * Over the socket. */

static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;
static char log_text[8192];

static void
log_fn (void *opaque, enum cow_log_level level, const char *line)
{
  pthread_mutex_lock (&log_lock);
  assert_ptr_equal (opaque, &log_text);
  strncat (log_text, line, sizeof log_text - strlen (log_text) - 2);
  strcat (log_text, "\n");
  pthread_mutex_unlock (&log_lock);
}

static void
test_socket (void **state)
{
  struct fx *f = *state;
  char *path = tu_path (f->dir, "ctl"), *file = tu_path (f->dir, "file");
  char *nodir = tu_path (f->dir, "nodir/ctl"), want[256];
  struct cow_control_reply reply;
  const char *status[] = { "status" }, *bad[] = { "list", "nosuch" };

  assert_int_equal (cow_control_check_path (path), 0);
  tu_write_file (file, "x", 1);
  assert_int_equal (cow_control_check_path (file), -1);
  assert_int_equal (cow_last_errno (), EEXIST);
  assert_int_equal (cow_control_check_path (nodir), -1);
  assert_int_equal (cow_last_errno (), ENOENT);
  assert_int_equal (cow_service_start_control (f->s, file, NULL, 0, NULL,
                                               NULL), -1);

  log_text[0] = '\0';
  assert_int_equal (cow_service_start_control (f->s, path, NULL, 0, log_fn,
                                               &log_text), 0);
  assert_int_equal (cow_service_start_control (f->s, path, NULL, 0, log_fn,
                                               &log_text), -1);
  assert_int_equal (cow_last_errno (), EBUSY);
  assert_int_equal (cow_control_check_path (path), -1);
  assert_int_equal (cow_last_errno (), EADDRINUSE);

  assert_int_equal (cow_control_request (path, status, 1, 5000, &reply), 0);
  assert_true (reply.n == 5);
  assert_int_equal (reply.lines[0].n, 3);
  assert_string_equal (reply.lines[0].words[0], "clients");
  assert_string_equal (reply.lines[0].words[1], "vm1");
  assert_string_equal (reply.lines[0].words[2], "0");
  assert_true (reply.lines[1].n >= 2);
  assert_string_equal (reply.lines[1].words[0], "disk");
  assert_string_equal (reply.lines[1].words[1], "vm1");
  assert_int_equal (reply.lines[2].n, 3);
  assert_string_equal (reply.lines[2].words[0], "clients");
  assert_string_equal (reply.lines[2].words[1], "vm2");
  assert_string_equal (reply.lines[2].words[2], "0");
  assert_int_equal (reply.lines[4].n, 5);
  assert_string_equal (reply.lines[4].words[0], "memory");
  cow_control_free_reply (&reply);
  assert_int_equal (cow_control_request (path, bad, 2, 5000, &reply), -1);
  assert_int_equal (cow_last_errno (), ENOENT);
  assert_string_equal (cow_last_error (), "no disk named 'nosuch'");

  cow_service_stop_control (f->s);
  cow_service_stop_control (f->s);
  assert_int_equal (access (path, F_OK), -1);
  /* Each request's line (the probe of cow_control_check_path, which
   * sent nothing, has one too, from another thread: not in order). */
  snprintf (want, sizeof want, "uid %u: status: ok\n",
            (unsigned) geteuid ());
  tu_assert_contains (log_text, want);
  snprintf (want, sizeof want, "uid %u: list nosuch: error: no disk named "
            "'nosuch'\n", (unsigned) geteuid ());
  tu_assert_contains (log_text, want);
  snprintf (want, sizeof want, "uid %u: no request: the connection ended "
            "before a whole request line\n", (unsigned) geteuid ());
  tu_assert_contains (log_text, want);
  free (path);
  free (file);
  free (nodir);
}

/*----------------------------------------------------------------------
 * Events. */

/* A stream's lines, without their time (words[0]), words joined by
 * '|'; calls counts the calls without a line. */
struct stream_fx {
  char *path;
  struct fx *f;
  int calls;                    /* atomic */
  int want;                     /* end after this many lines */
  char lines[8][512];
  int n;
};

static int
record_line (void *opaque, const struct cow_control_line *line)
{
  struct stream_fx *x = opaque;
  char *p;

  if (line == NULL) {
    __atomic_add_fetch (&x->calls, 1, __ATOMIC_SEQ_CST);
    return 0;
  }
  assert_true (x->n < 8);
  p = x->lines[x->n++];
  p[0] = '\0';
  for (int i = 1; i < line->n; i++) {
    strncat (p, line->words[i], 500 - strlen (p));
    strcat (p, "|");
  }
  return x->n == x->want ? 1 : 0;
}

static void
wait_subscribed (struct stream_fx *x)
{
  while (__atomic_load_n (&x->calls, __ATOMIC_SEQ_CST) == 0)
    usleep (1000);
}

/* Once the stream is in place: an event of vm2 (not wanted), then
 * vm1's. */
static void *
events_actor (void *arg)
{
  struct stream_fx *x = arg;
  struct cow_disk *vm1 = x->f->d[0], *vm2 = x->f->d[1];

  wait_subscribed (x);
  assert_int_equal (cow_disk_snapshot (vm2, "t1", NULL), 0);
  assert_int_equal (cow_disk_snapshot (vm1, "s2", NULL), 0);
  assert_int_equal (cow_disk_snapshot (vm1, "s2", NULL), -1);
  assert_int_equal (cow_disk_revert (vm1, "s1", true), 0);
  assert_int_equal (cow_disk_revert (vm1, "nosuch", true), -1);
  cow_error_clear ();
  return NULL;
}

static void *
stream_until_stop (void *arg)
{
  struct stream_fx *x = arg;
  const char *req[] = { "events" };
  intptr_t r = cow_control_stream (x->path, req, 1, 5000, 0, record_line, x);

  cow_error_clear ();
  return (void *) r;
}

static void
test_events_stream (void **state)
{
  struct fx *f = *state;
  struct stream_fx x = { .path = tu_path (f->dir, "ctl"), .f = f, .want = 4 };
  struct stream_fx y = { .path = x.path, .f = f, .want = 8 };
  const char *req[] = { "events", "vm1" }, *bad[] = { "events", "nosuch" };
  struct cow_control_reply reply;
  pthread_t th;
  void *ret;

  log_text[0] = '\0';
  assert_int_equal (cow_service_start_control (f->s, x.path, NULL, 0, log_fn,
                                               &log_text), 0);
  assert_int_equal (cow_control_request (x.path, bad, 2, 5000, &reply), -1);
  assert_int_equal (cow_last_errno (), ENOENT);
  /* Before any subscription: logged, not streamed. */
  assert_int_equal (cow_disk_snapshot (f->d[0], "s1", NULL), 0);
  assert_int_equal (pthread_create (&th, NULL, events_actor, &x), 0);
  assert_int_equal (cow_control_stream (x.path, req, 2, 5000, 0, record_line,
                                        &x), 0);
  pthread_join (th, NULL);
  assert_int_equal (x.calls, 1);
  assert_int_equal (x.n, 4);
  tu_assert_contains (x.lines[0], "vm1|snapshot|name=s2|layer=layer-");
  tu_assert_contains (x.lines[0], "|pause-ns=");
  tu_assert_contains (x.lines[1], "vm1|snapshot-failed|name=s2|errno=17|"
                      "error=");
  tu_assert_contains (x.lines[1], "already exists");
  tu_assert_contains (x.lines[2], "vm1|revert|name=s1|dropped=2|layer=");
  tu_assert_contains (x.lines[3], "vm1|revert-failed|name=nosuch|errno=2|");

  /* The server's stop ends a stream with its end line: 0. */
  assert_int_equal (pthread_create (&th, NULL, stream_until_stop, &y), 0);
  wait_subscribed (&y);
  cow_service_stop_control (f->s);
  pthread_join (th, &ret);
  assert_int_equal ((int) (intptr_t) ret, 0);
  assert_int_equal (y.n, 0);

  tu_assert_contains (log_text, "event: vm1 snapshot name=s1 layer=");
  tu_assert_contains (log_text, "event: vm2 snapshot name=t1 layer=");
  tu_assert_contains (log_text, "event: vm1 snapshot-failed name=s2 errno=17 "
                      "error=\"");
  tu_assert_contains (log_text, ": events vm1: ok (a stream)\n");
  tu_assert_contains (log_text, ": events vm1: stream ended: ");
  tu_assert_contains (log_text, ": events: stream ended: the server is "
                      "stopping\n");
  free (x.path);
}

/* The bus alone: a subscriber that does not take its events gets at
 * most EVENTS_QUEUE_MAX of them and one "lost" line with the count of
 * the rest; a filter on another disk gets none; the subscribers are
 * bounded. */
static void
test_events_bus (void **state)
{
  struct fx *f = *state;
  struct cow_disk *d = open_disk (f->dir, "vm3");
  struct events_bus *b = events_bus_new ();
  struct events_sub *all, *other, *subs[EVENTS_MAX_SUBSCRIBERS];
  char *text, *line, *save;
  size_t len, n = 0;

  assert_non_null (b);
  assert_int_equal (events_bus_attach (b, d, "vm3"), 0);
  all = events_subscribe (b, NULL);
  other = events_subscribe (b, "vm1");
  assert_non_null (all);
  assert_non_null (other);
  assert_null (events_sub_take (all, &len));
  for (int i = 0; i < EVENTS_QUEUE_MAX + 10; i++) {
    struct events_fields ev = { 0 };
    events_add (&ev, "i", "%d", i);
    events_add (&ev, "text", "a b%%c");
    events_emit (d, "test", COW_LOG_INFO, &ev);
    assert_int_equal (ev.n, 0);
  }
  assert_null (events_sub_take (other, &len));
  text = events_sub_take (all, &len);
  assert_non_null (text);
  assert_int_equal (strlen (text), len);
  for (line = strtok_r (text, "\n", &save); line;
       line = strtok_r (NULL, "\n", &save), n++) {
    char want[64];
    if (n == 0) {
      tu_assert_contains (line, "Z - lost count=10");
      continue;
    }
    snprintf (want, sizeof want, "Z vm3 test i=%zu text=a%%20b%%25c", n - 1);
    tu_assert_contains (line, want);
  }
  assert_int_equal (n, EVENTS_QUEUE_MAX + 1);
  free (text);
  assert_null (events_sub_take (all, &len));
  for (size_t i = 2; i < EVENTS_MAX_SUBSCRIBERS; i++) {
    subs[i] = events_subscribe (b, NULL);
    assert_non_null (subs[i]);
  }
  assert_null (events_subscribe (b, NULL));
  assert_int_equal (cow_last_errno (), EBUSY);
  for (size_t i = 2; i < EVENTS_MAX_SUBSCRIBERS; i++)
    events_unsubscribe (subs[i]);
  events_unsubscribe (all);
  events_unsubscribe (other);
  events_bus_free (b);
  /* Detached: its events go nowhere. */
  assert_int_equal (cow_disk_snapshot (d, "x", NULL), 0);
  assert_int_equal (cow_disk_close (d), 0);
}

int
main (int argc, char **argv)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test (test_table),
#define T(fn) cmocka_unit_test_setup_teardown (fn, fx_setup, fx_teardown)
    T (test_unknown_command),
    T (test_argument_counts),
    T (test_unknown_disk),
    T (test_bad_numbers),
    T (test_bad_flags),
    T (test_revert_clients),
    T (test_replies),
    T (test_jobs_line),
    T (test_names),
    T (test_socket),
    T (test_events_stream),
    T (test_events_bus),
#undef T
  };

  return cmocka_run_group_tests (tests, group_setup, group_teardown);
}
