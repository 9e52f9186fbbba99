/* main() of the command line tool `cowchain`.  Each command is one entry
 * of the table at the bottom: a name, a one-line summary, its help text
 * and the function that runs it with its own argv (argv[0] = the command
 * name), so that a new command is one function plus one line there.
 *
 * Conventions of every command: errors go to stderr as "cowchain: ...";
 * output goes to stdout, as text or (--output=json) as JSON; the exit
 * status is one of the EXIT_* of cli.h (2 and 3 are those of qemu-img
 * check), documented in `cowchain --help`.  The helpers named cli_* are
 * shared with the commands in other files (cli.h). */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli.h"
#include "cowchain.h"
#include "image.h"
#include "io.h"
#include "layer.h"
#include "qcow2.h"
#include "qcow2-check.h"
#include "words.h"

/* How many backing links `info --backing-chain` follows at most. */
#define MAX_BACKING_DEPTH 64

const char *
cli_text (const char *s)
{
  /* A few results at once, so that one printf can take several. */
  static char *ring[16];
  static unsigned next;
  char **slot = &ring[next++ % 16];

  free (*slot);
  *slot = text_printable (s ? s : "");
  return *slot ? *slot : "(out of memory)";
}

/* A message that may quote anything (a name given on the command line,
 * a path from a header): printed with its control characters escaped. */
static void
print_message (const char *prefix, const char *fmt, va_list ap)
{
  char *msg = NULL;

  if (vasprintf (&msg, fmt, ap) == -1)
    msg = NULL;
  fprintf (stderr, "cowchain: %s%s", prefix,
           msg ? cli_text (msg) : "(out of memory)");
  free (msg);
}

void
cli_error (const char *fmt, ...)
{
  va_list ap;

  va_start (ap, fmt);
  print_message ("", fmt, ap);
  va_end (ap);
  fputc ('\n', stderr);
}

/* A usage error of one command. */
int
cli_usage_error (const char *cmd, const char *fmt, ...)
{
  char *prefix = NULL;
  va_list ap;

  if (asprintf (&prefix, "%s: ", cmd) == -1)
    prefix = NULL;
  va_start (ap, fmt);
  print_message (prefix ? prefix : "", fmt, ap);
  va_end (ap);
  free (prefix);
  fprintf (stderr, "\nTry 'cowchain %s --help' for more information.\n", cmd);
  return EXIT_ERROR;
}

/* Flush stdout and report a failed write (a full disk, a closed pipe). */
int
cli_finish_output (int status)
{
  if (fflush (stdout) == EOF || ferror (stdout)) {
    cli_error ("writing the output: %s", strerror (errno));
    return EXIT_ERROR;
  }
  return status;
}

enum output_format { OUTPUT_HUMAN, OUTPUT_JSON };

static int
parse_output (const char *cmd, const char *arg, enum output_format *out)
{
  if (strcmp (arg, "human") == 0)
    *out = OUTPUT_HUMAN;
  else if (strcmp (arg, "json") == 0)
    *out = OUTPUT_JSON;
  else
    return cli_usage_error (cmd, "--output must be 'human' or 'json', not '%s'",
                        arg);
  return EXIT_OK;
}

/* The one IMAGE operand of a command. */
static int
one_operand (const char *cmd, int argc, char **argv, const char **image)
{
  if (optind >= argc)
    return cli_usage_error (cmd, "missing IMAGE");
  if (optind + 1 < argc)
    return cli_usage_error (cmd, "unexpected argument '%s'", argv[optind + 1]);
  *image = argv[optind];
  return EXIT_OK;
}

/* getopt_long over a command's own argv, with our own error messages.
 * Returns the option, -1 at the end, or '?' after reporting an error. */
int
cli_next_option (const char *cmd, int argc, char **argv, const char *shortopts,
                 const struct option *longopts)
{
  int c;

  opterr = 0;
  c = getopt_long (argc, argv, shortopts, longopts, NULL);
  if (c == '?') {
    if (optopt)
      cli_usage_error (cmd, "invalid option -- '%c'", optopt);
    else
      cli_usage_error (cmd, "unrecognized option '%s'", argv[optind - 1]);
  }
  else if (c == ':')
    cli_usage_error (cmd, "option '%s' requires an argument", argv[optind - 1]);
  return c == ':' ? '?' : c;
}

/*----------------------------------------------------------------------
 * Output helpers.
 */

/* A size the way qemu-img prints it: at most three significant digits,
 * in the largest binary unit that keeps the number under 1000. */
void
cli_human_size (uint64_t v, char *buf, size_t len)
{
  static const char *const units[] = {
    "B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"
  };
  double d = (double) v;
  size_t i = 0;

  while (i + 1 < sizeof units / sizeof units[0] && d >= 1000) {
    d /= 1024;
    i++;
  }
  snprintf (buf, len, "%0.3g %s", d, units[i]);
}

/* A small JSON writer, indented like qemu-img's output. */
struct json {
  FILE *f;
  unsigned depth;
  bool need_comma;
};

void
cli_json_string (FILE *f, const char *s)
{
  const unsigned char *p = (const unsigned char *) s;

  fputc ('"', f);
  while (*p) {
    size_t len;
    long cp = utf8_decode (p, &len);
    switch (cp) {
    case '"': fputs ("\\\"", f); break;
    case '\\': fputs ("\\\\", f); break;
    case '\n': fputs ("\\n", f); break;
    case '\t': fputs ("\\t", f); break;
    case '\r': fputs ("\\r", f); break;
    case -1: fputs ("\\ufffd", f); break;
    default:
      if (text_is_control (cp) || cp == 0x2028 || cp == 0x2029)
        fprintf (f, "\\u%04lx", cp);
      else
        fwrite (p, 1, len, f);
    }
    p += len;
  }
  fputc ('"', f);
}

static void
json_string (struct json *j, const char *s)
{
  cli_json_string (j->f, s);
}

/* Start the next element of the current object or array. */
static void
json_next (struct json *j)
{
  if (j->need_comma)
    fputc (',', j->f);
  if (j->depth > 0) {
    fputc ('\n', j->f);
    for (unsigned i = 0; i < j->depth; i++)
      fputs ("    ", j->f);
  }
  j->need_comma = true;
}

static void
json_key (struct json *j, const char *key)
{
  json_next (j);
  json_string (j, key);
  fputs (": ", j->f);
}

static void
json_open (struct json *j, char c)
{
  fputc (c, j->f);
  j->depth++;
  j->need_comma = false;
}

static void
json_close (struct json *j, char c)
{
  j->depth--;
  if (j->need_comma) {          /* not empty */
    fputc ('\n', j->f);
    for (unsigned i = 0; i < j->depth; i++)
      fputs ("    ", j->f);
  }
  fputc (c, j->f);
  j->need_comma = true;
  if (j->depth == 0)
    fputc ('\n', j->f);
}

static void
json_str_member (struct json *j, const char *key, const char *v)
{
  json_key (j, key);
  json_string (j, v);
}

static void
json_u64_member (struct json *j, const char *key, uint64_t v)
{
  json_key (j, key);
  fprintf (j->f, "%" PRIu64, v);
}

static void
json_bool_member (struct json *j, const char *key, bool v)
{
  json_key (j, key);
  fputs (v ? "true" : "false", j->f);
}

/*----------------------------------------------------------------------
 * info
 */

static const char info_help[] =
  "Usage: cowchain info [OPTION]... IMAGE\n"
  "       cowchain info [OPTION]... --disk=NAME [--control=SOCKET]\n"
  "Show what IMAGE (or the active layer of a running server's disk) is,\n"
  "like qemu-img info: its format (qcow2 or raw, by its magic), virtual\n"
  "size, disk size and, for qcow2, cluster size,\n"
  "backing file and format, compat level, refcount width and flags.\n"
  "\n"
  "  --backing-chain        show the backing files too, down to the bottom\n"
  "                         of the chain (at most 64 levels)\n"
  "  --output=human|json    output format (default: human); JSON in the\n"
  "                         shape of qemu-img info --output=json, an array\n"
  "                         with --backing-chain\n"
  "  --disk=NAME            the active layer of this disk of the server\n"
  "                         (\"\" = its default disk)\n"
  "  --control=SOCKET       the server's control socket (default:\n"
  "                         $COWCHAIN_CONTROL)\n"
  "  -U, --force-share      read an image that a running server or QEMU\n"
  "                         holds (like qemu-img -U; implied by --disk)\n"
  "  --timeout=SECONDS      give up on the server after this long (default:\n"
  "                         $COWCHAIN_TIMEOUT, else 60; 0 = wait forever)\n"
  "  -h, --help             show this help\n"
  "\n"
  "Relative backing names are relative to the directory of the image that\n"
  "names them.  Backing names that are json: specifications or URLs are\n"
  "shown but never opened; a chain that loops is an error.\n"
  "\n"
  "Exit status: 0 success, 1 error.\n";

struct image_info {
  char *filename;
  const char *format;           /* "qcow2" or "raw" */
  uint64_t virtual_size;
  uint64_t actual_size;
  dev_t dev;
  ino_t ino;
  /* qcow2 only */
  uint64_t cluster_size;
  unsigned version;
  unsigned refcount_bits;
  bool lazy_refcounts, corrupt, dirty;
  char *backing_file;           /* as stored; NULL if none */
  char *backing_format;         /* header extension; NULL if none */
  char *full_backing;           /* resolved path; NULL if not a file name */
};

static void
image_info_free (struct image_info *ii)
{
  free (ii->filename);
  free (ii->backing_file);
  free (ii->backing_format);
  free (ii->full_backing);
}

/* Backing names that are never opened as files. */
static bool
is_not_a_file_name (const char *name)
{
  return strncmp (name, "json:", 5) == 0 || strstr (name, "://") != NULL
    || remote_is_uri (name);
}

/* name, relative to the directory of the image that refers to it. */
static char *
resolve_backing (const char *referrer, const char *name)
{
  const char *slash = strrchr (referrer, '/');
  size_t dirlen;
  char *r;

  if (name[0] == '/' || slash == NULL)
    return strdup (name);
  dirlen = (size_t) (slash - referrer) + 1;
  r = malloc (dirlen + strlen (name) + 1);
  if (r) {
    memcpy (r, referrer, dirlen);
    strcpy (r + dirlen, name);
  }
  return r;
}

/* -U: layers that a running server holds are read sharing everything. */
static bool info_force_share;

static int
read_qcow2_info (const char *path, struct image_info *ii)
{
  struct layer *l = qcow2_open (path, LAYER_RDONLY
                                | (info_force_share ? LAYER_FORCE_SHARE : 0),
                                1u << 20);
  struct qcow2 *q;

  if (l == NULL) {
    cli_error ("%s", cow_last_error ());
    return -1;
  }
  q = (struct qcow2 *) l;
  ii->format = "qcow2";
  ii->virtual_size = l->size;
  ii->cluster_size = q->cluster_size;
  ii->version = q->version;
  ii->refcount_bits = 1u << q->refcount_order;
  ii->lazy_refcounts = q->compat & 1;
  ii->corrupt = q->incompat & QCOW2_INCOMPAT_CORRUPT;
  ii->dirty = q->incompat & QCOW2_INCOMPAT_DIRTY;
  if ((q->backing_file && (ii->backing_file = strdup (q->backing_file)) == NULL)
      || (q->backing_format
          && (ii->backing_format = strdup (q->backing_format)) == NULL)) {
    cli_error ("out of memory");
    l->ops->close (l);
    return -1;
  }
  l->ops->close (l);
  if (ii->backing_file && !is_not_a_file_name (ii->backing_file)) {
    ii->full_backing = resolve_backing (path, ii->backing_file);
    if (ii->full_backing == NULL) {
      cli_error ("out of memory");
      return -1;
    }
  }
  return 0;
}

static int
read_raw_info (const char *path, struct image_info *ii)
{
  int fd = image_open (path, O_RDONLY, 0);
  off_t end;

  if (fd == -1) {
    cli_error ("%s", cow_last_error ());
    return -1;
  }
  /* lseek rather than st_size, which is 0 for a block device. */
  end = lseek (fd, 0, SEEK_END);
  if (end == -1) {
    cli_error ("%s: cannot find its size: %s", path, strerror (errno));
    io_close (fd);
    return -1;
  }
  io_close (fd);
  ii->format = "raw";
  ii->virtual_size = (uint64_t) end;
  return 0;
}

/* Describe the image at path.  format: "qcow2" or "raw" as declared by
 * the image above (referrer), or NULL to recognise it by its magic. */
static int
read_info (const char *path, const char *format, const char *referrer,
           struct image_info *ii)
{
  struct stat st;
  int is_qcow2;

  memset (ii, 0, sizeof *ii);
  ii->filename = strdup (path);
  if (ii->filename == NULL) {
    cli_error ("out of memory");
    return -1;
  }
  if (stat (path, &st) == -1) {
    if (referrer)
      cli_error ("%s: %s (the backing file of %s)", path, strerror (errno),
             referrer);
    else
      cli_error ("%s: %s", path, strerror (errno));
    return -1;
  }
  ii->dev = st.st_dev;
  ii->ino = st.st_ino;
  ii->actual_size = (uint64_t) st.st_blocks * 512;
  if (format == NULL) {
    is_qcow2 = qcow2_probe (path);
    if (is_qcow2 == -1) {
      cli_error ("%s", cow_last_error ());
      return -1;
    }
  }
  else
    is_qcow2 = strcmp (format, "qcow2") == 0;
  return is_qcow2 ? read_qcow2_info (path, ii) : read_raw_info (path, ii);
}

static void
print_info_human (const struct image_info *ii)
{
  char size[32];

  printf ("image: %s\n", cli_text (ii->filename));
  printf ("file format: %s\n", ii->format);
  cli_human_size (ii->virtual_size, size, sizeof size);
  printf ("virtual size: %s (%" PRIu64 " bytes)\n", size, ii->virtual_size);
  cli_human_size (ii->actual_size, size, sizeof size);
  printf ("disk size: %s\n", size);
  if (strcmp (ii->format, "qcow2") != 0)
    return;
  printf ("cluster_size: %" PRIu64 "\n", ii->cluster_size);
  if (ii->backing_file) {
    printf ("backing file: %s", cli_text (ii->backing_file));
    if (ii->full_backing && strcmp (ii->full_backing, ii->backing_file) != 0)
      printf (" (actual path: %s)", cli_text (ii->full_backing));
    putchar ('\n');
    if (ii->backing_format)
      printf ("backing file format: %s\n", cli_text (ii->backing_format));
  }
  printf ("Format specific information:\n");
  printf ("    compat: %s\n", ii->version >= 3 ? "1.1" : "0.10");
  printf ("    compression type: zlib\n");
  if (ii->version >= 3)
    printf ("    lazy refcounts: %s\n", ii->lazy_refcounts ? "true" : "false");
  printf ("    refcount bits: %u\n", ii->refcount_bits);
  if (ii->version >= 3) {
    printf ("    corrupt: %s\n", ii->corrupt ? "true" : "false");
    printf ("    dirty: %s\n", ii->dirty ? "true" : "false");
    printf ("    extended l2: false\n");
  }
}

static void
print_info_json (struct json *j, const struct image_info *ii)
{
  bool qcow2 = strcmp (ii->format, "qcow2") == 0;

  json_open (j, '{');
  json_u64_member (j, "virtual-size", ii->virtual_size);
  json_str_member (j, "filename", ii->filename);
  if (qcow2)
    json_u64_member (j, "cluster-size", ii->cluster_size);
  json_str_member (j, "format", ii->format);
  json_u64_member (j, "actual-size", ii->actual_size);
  if (qcow2) {
    json_key (j, "format-specific");
    json_open (j, '{');
    json_str_member (j, "type", "qcow2");
    json_key (j, "data");
    json_open (j, '{');
    json_str_member (j, "compat", ii->version >= 3 ? "1.1" : "0.10");
    json_str_member (j, "compression-type", "zlib");
    if (ii->version >= 3)
      json_bool_member (j, "lazy-refcounts", ii->lazy_refcounts);
    json_u64_member (j, "refcount-bits", ii->refcount_bits);
    if (ii->version >= 3) {
      json_bool_member (j, "corrupt", ii->corrupt);
      json_bool_member (j, "extended-l2", false);
    }
    json_close (j, '}');
    json_close (j, '}');
  }
  if (ii->backing_file) {
    if (ii->full_backing)
      json_str_member (j, "full-backing-filename", ii->full_backing);
    json_str_member (j, "backing-filename", ii->backing_file);
    if (ii->backing_format)
      json_str_member (j, "backing-filename-format", ii->backing_format);
  }
  json_bool_member (j, "dirty-flag", ii->dirty);
  json_close (j, '}');
}

/* Fill chain[] from path down, at most MAX_BACKING_DEPTH links. */
static int
read_chain (const char *path, bool follow, struct image_info *chain,
            size_t *n)
{
  const char *format = NULL;
  const char *referrer = NULL;

  *n = 0;
  for (;;) {
    struct image_info *ii = &chain[*n];
    const struct image_info *above;

    if (read_info (path, format, referrer, ii) == -1) {
      image_info_free (ii);
      return -1;
    }
    (*n)++;
    for (size_t k = 0; k + 1 < *n; k++) {
      if (chain[k].dev == ii->dev && chain[k].ino == ii->ino) {
        cli_error ("%s: the backing chain loops: %s, the backing file of %s, "
               "is already in the chain as %s", chain[0].filename, path,
               referrer, chain[k].filename);
        return -1;
      }
    }
    if (!follow || ii->backing_file == NULL)
      return 0;
    if (ii->full_backing == NULL) {
      fprintf (stderr, "cowchain: note: %s: backing file '%s' is not "
               "followed (json: names and URLs are never opened)\n",
               cli_text (ii->filename), cli_text (ii->backing_file));
      return 0;
    }
    if (*n > MAX_BACKING_DEPTH) {
      cli_error ("%s: the backing chain is deeper than %d levels",
             chain[0].filename, MAX_BACKING_DEPTH);
      return -1;
    }
    above = ii;
    format = above->backing_format;
    if (format && strcmp (format, "qcow2") != 0 && strcmp (format, "raw") != 0) {
      cli_error ("%s: backing file '%s' has format '%s', which cowchain does "
             "not read", above->filename, above->backing_file, format);
      return -1;
    }
    path = above->full_backing;
    referrer = above->filename;
  }
}

static int
cmd_info (int argc, char **argv)
{
  static const struct option longopts[] = {
    { "backing-chain", no_argument, NULL, 'b' },
    { "output", required_argument, NULL, 'o' },
    { "disk", required_argument, NULL, 'd' },
    { "control", required_argument, NULL, 'c' },
    { "force-share", no_argument, NULL, 'U' },
    { "timeout", required_argument, NULL, CLI_OPT_TIMEOUT },
    { "help", no_argument, NULL, 'h' },
    { NULL, 0, NULL, 0 },
  };
  enum output_format output = OUTPUT_HUMAN;
  bool follow = false;
  const char *image, *disk = NULL, *control = NULL, *timeout = NULL;
  char *active = NULL;
  struct image_info *chain;
  size_t n = 0;
  int c, r;

  while ((c = cli_next_option ("info", argc, argv, ":hU", longopts)) != -1) {
    switch (c) {
    case 'b': follow = true; break;
    case 'U': info_force_share = true; break;
    case 'o':
      if ((r = parse_output ("info", optarg, &output)) != EXIT_OK)
        return r;
      break;
    case 'd': disk = optarg; break;
    case 'c': control = optarg; break;
    case CLI_OPT_TIMEOUT: timeout = optarg; break;
    case 'h': fputs (info_help, stdout); return cli_finish_output (EXIT_OK);
    default: return EXIT_ERROR;
    }
  }
  if (disk || control) {
    /* A disk of a running server: its active layer. */
    if (optind < argc)
      return cli_usage_error ("info", "give IMAGE or --disk, not both");
    if (control == NULL)
      control = getenv ("COWCHAIN_CONTROL");
    if (control == NULL)
      return cli_usage_error ("info", "--disk needs --control=SOCKET (or "
                              "COWCHAIN_CONTROL)");
    if ((r = cli_timeout_set ("info", timeout)) != EXIT_OK)
      return r;
    active = cli_active_layer (control, disk ? disk : "");
    if (active == NULL)
      return EXIT_ERROR;
    image = active;
    info_force_share = true;    /* the server holds its layers */
  }
  else if ((r = one_operand ("info", argc, argv, &image)) != EXIT_OK)
    return r;

  chain = calloc (MAX_BACKING_DEPTH + 1, sizeof *chain);
  if (chain == NULL) {
    cli_error ("out of memory");
    free (active);
    return EXIT_ERROR;
  }
  r = read_chain (image, follow, chain, &n) == 0 ? EXIT_OK : EXIT_ERROR;
  if (r == EXIT_OK) {
    if (output == OUTPUT_JSON) {
      struct json j = { .f = stdout };
      if (follow)
        json_open (&j, '[');
      for (size_t i = 0; i < n; i++) {
        if (follow)
          json_next (&j);
        print_info_json (&j, &chain[i]);
      }
      if (follow)
        json_close (&j, ']');
    }
    else {
      for (size_t i = 0; i < n; i++) {
        if (i > 0)
          putchar ('\n');
        print_info_human (&chain[i]);
      }
    }
  }
  for (size_t i = 0; i < n; i++)
    image_info_free (&chain[i]);
  free (chain);
  free (active);
  return cli_finish_output (r);
}

/*----------------------------------------------------------------------
 * check
 */

static const char check_help[] =
  "Usage: cowchain check [OPTION]... IMAGE\n"
  "Check the consistency of the qcow2 image IMAGE, like qemu-img check:\n"
  "rebuild the reference count of every cluster of the file from its\n"
  "metadata and compare it with the stored refcounts.  A refcount that is\n"
  "too small, and any malformed table entry, is an error; a refcount that\n"
  "is too large is a leak (wasted space, no harm to data).\n"
  "\n"
  "  -r, --repair=leaks     lower the refcounts of leaked clusters, then\n"
  "                         check again; done only when the image has no\n"
  "                         other error (other repairs: qemu-img check -r all)\n"
  "  --output=human|json    output format (default: human); JSON with the\n"
  "                         keys of qemu-img check --output=json\n"
  "  -h, --help             show this help\n"
  "\n"
  "Images with internal snapshots or persistent bitmaps are not checked.\n"
  "\n"
  "Exit status (as qemu-img check):\n"
  "  0  no errors were found (or the leaks were repaired)\n"
  "  1  the check could not be completed (or bad usage)\n"
  "  2  the image has errors: data may be corrupted\n"
  "  3  the image leaks clusters, and has no errors\n";

static int
check_status (const struct qcow2_check_result *res)
{
  if (res->check_errors)
    return EXIT_ERROR;
  if (res->corruptions)
    return EXIT_CORRUPT;
  if (res->leaks)
    return EXIT_LEAKS;
  return EXIT_OK;
}

static void
print_findings (const struct qcow2_check_result *res)
{
  for (size_t i = 0; i < res->n_messages; i++)
    printf ("%s\n", cli_text (res->messages[i]));
  if (res->messages_dropped)
    printf ("(%" PRIu64 " more findings not shown)\n", res->messages_dropped);
}

static void
print_check_human (const struct qcow2_check_result *res)
{
  if (res->corruptions == 0 && res->leaks == 0 && res->check_errors == 0)
    printf ("No errors were found on the image.\n");
  if (res->corruptions)
    printf ("\n%" PRIu64 " errors were found on the image.\n"
            "Data may be corrupted, or further writes to the image may "
            "corrupt it.\n", res->corruptions);
  if (res->leaks)
    printf ("\n%" PRIu64 " leaked clusters were found on the image.\n"
            "This means waste of disk space, but no harm to data.\n",
            res->leaks);
  if (res->check_errors)
    printf ("\n%" PRIu64 " internal errors have occurred during the check.\n",
            res->check_errors);
  if (res->total_clusters && res->allocated_clusters)
    printf ("%" PRIu64 "/%" PRIu64 " = %0.2f%% allocated, %0.2f%% fragmented, "
            "%0.2f%% compressed clusters\n",
            res->allocated_clusters, res->total_clusters,
            100.0 * (double) res->allocated_clusters
            / (double) res->total_clusters,
            100.0 * (double) res->fragmented_clusters
            / (double) res->allocated_clusters,
            100.0 * (double) res->compressed_clusters
            / (double) res->allocated_clusters);
  if (res->image_end_offset)
    printf ("Image end offset: %" PRIu64 "\n", res->image_end_offset);
}

static void
print_check_json (const char *image, const struct qcow2_check_result *res)
{
  struct json j = { .f = stdout };

  json_open (&j, '{');
  json_u64_member (&j, "image-end-offset", res->image_end_offset);
  if (res->compressed_clusters)
    json_u64_member (&j, "compressed-clusters", res->compressed_clusters);
  json_u64_member (&j, "total-clusters", res->total_clusters);
  if (res->corruptions)
    json_u64_member (&j, "corruptions", res->corruptions);
  json_u64_member (&j, "check-errors", res->check_errors);
  if (res->leaks)
    json_u64_member (&j, "leaks", res->leaks);
  if (res->corruptions_fixed)
    json_u64_member (&j, "corruptions-fixed", res->corruptions_fixed);
  if (res->leaks_fixed)
    json_u64_member (&j, "leaks-fixed", res->leaks_fixed);
  if (res->allocated_clusters)
    json_u64_member (&j, "allocated-clusters", res->allocated_clusters);
  json_str_member (&j, "filename", image);
  json_str_member (&j, "format", "qcow2");
  if (res->fragmented_clusters)
    json_u64_member (&j, "fragmented-clusters", res->fragmented_clusters);
  if (res->repair_refused)
    json_bool_member (&j, "repair-refused", true);
  json_key (&j, "messages");
  json_open (&j, '[');
  for (size_t i = 0; i < res->n_messages; i++) {
    json_next (&j);
    json_string (&j, res->messages[i]);
  }
  json_close (&j, ']');
  json_close (&j, '}');
}

static int
cmd_check (int argc, char **argv)
{
  static const struct option longopts[] = {
    { "repair", required_argument, NULL, 'r' },
    { "output", required_argument, NULL, 'o' },
    { "help", no_argument, NULL, 'h' },
    { NULL, 0, NULL, 0 },
  };
  enum output_format output = OUTPUT_HUMAN;
  bool repair = false;
  const char *image;
  struct qcow2_check_result *res, *again = NULL;
  int c, r;

  while ((c = cli_next_option ("check", argc, argv, ":hr:", longopts)) != -1) {
    switch (c) {
    case 'r':
      if (strcmp (optarg, "leaks") != 0)
        return cli_usage_error ("check", "only '-r leaks' is supported, not '%s' "
                            "(other repairs: qemu-img check -r all)", optarg);
      repair = true;
      break;
    case 'o':
      if ((r = parse_output ("check", optarg, &output)) != EXIT_OK)
        return r;
      break;
    case 'h': fputs (check_help, stdout); return cli_finish_output (EXIT_OK);
    default: return EXIT_ERROR;
    }
  }
  if ((r = one_operand ("check", argc, argv, &image)) != EXIT_OK)
    return r;

  res = malloc (sizeof *res);
  if (res == NULL) {
    cli_error ("out of memory");
    return EXIT_ERROR;
  }
  if (qcow2_check (image, repair, res) == -1) {
    cli_error ("%s", cow_last_error ());
    free (res);
    return EXIT_ERROR;
  }

  if (res->leaks_fixed > 0) {
    /* Like qemu-img: say what was repaired, then check again, and let
     * that second verdict decide. */
    if (output == OUTPUT_HUMAN) {
      print_findings (res);
      printf ("The following inconsistencies were found and repaired:\n\n"
              "    %" PRIu64 " leaked clusters\n"
              "    %" PRIu64 " corruptions\n\n"
              "Double checking the fixed image now...\n",
              res->leaks_fixed, res->corruptions_fixed);
    }
    again = malloc (sizeof *again);
    if (again == NULL) {
      cli_error ("out of memory");
      free (res);
      return EXIT_ERROR;
    }
    if (qcow2_check (image, false, again) == -1) {
      cli_error ("%s", cow_last_error ());
      free (res);
      free (again);
      return cli_finish_output (EXIT_ERROR);
    }
    again->leaks_fixed = res->leaks_fixed;
    again->corruptions_fixed = res->corruptions_fixed;
    free (res);
    res = again;
  }

  if (output == OUTPUT_JSON)
    print_check_json (image, res);
  else {
    print_findings (res);
    if (res->repair_refused)
      printf ("The %" PRIu64 " leaked clusters were not repaired: the image "
              "has errors that -r leaks does not fix (qemu-img check -r all "
              "may).\n", res->leaks);
    print_check_human (res);
  }
  r = check_status (res);
  free (res);
  return cli_finish_output (r);
}

/*----------------------------------------------------------------------
 * Dispatch.
 */

struct command {
  const char *name;
  const char *summary;
  const char *help;
  int (*run) (int argc, char **argv);
};

/* In the order `cowchain --help` lists them.  A command defined in
 * another file declares its cmd_* function and help text in cli.h. */
static const struct command commands[] = {
  { "info", "show an image's format, sizes and backing chain",
    info_help, cmd_info },
  { "check", "check a qcow2 image's consistency; repair leaks",
    check_help, cmd_check },
  { "snapshot", "freeze the active layer as a named snapshot, live",
    snapshot_help, cmd_snapshot },
  { "list", "list a disk's snapshots", list_help, cmd_list },
  { "revert", "return a disk to a snapshot", revert_help, cmd_revert },
  { "blklist", "each disk of a server and its active layer",
    blklist_help, cmd_blklist },
  { "status", "each disk of a server: active layer, base, depth",
    status_help, cmd_status },
  { "commit", "merge layers down into a lower one, in the background",
    commit_help, cmd_commit },
  { "pull", "copy lower layers up into the active one, in the background",
    pull_help, cmd_pull },
  { "delete", "delete a snapshot, merging its layer in the background",
    delete_help, cmd_delete },
  { "jobs", "the background job of each disk and its progress",
    jobs_help, cmd_jobs },
  { "wait", "wait for background jobs to end", wait_help, cmd_wait },
  { "pause", "pause a disk's background job", pause_help, cmd_pause },
  { "resume", "resume a disk's paused job", resume_help, cmd_resume },
  { "cancel", "cancel a disk's background job", cancel_help, cmd_cancel },
  { "speed", "change the speed limit of a disk's job", speed_help,
    cmd_speed },
};

#define N_COMMANDS (sizeof commands / sizeof commands[0])

static void
main_help (FILE *f)
{
  fprintf (f,
           "Usage: cowchain [--timeout=SECONDS] COMMAND [OPTION]... [ARG]...\n"
           "       cowchain COMMAND --help\n"
           "       cowchain --help | --version\n"
           "Work with the qcow2 layers of cowchain disks.\n"
           "\n"
           "Commands:\n");
  for (size_t i = 0; i < N_COMMANDS; i++)
    fprintf (f, "  %-10s %s\n", commands[i].name, commands[i].summary);
  fprintf (f,
           "\n"
           "Exit status:\n"
           "  0  success\n"
           "  1  error: bad usage, an image that cannot be read, a check\n"
           "     that could not be completed, a job that failed or was\n"
           "     cancelled (wait, --wait, offline commit/pull/delete)\n"
           "  2  check: the image has errors (data may be corrupted)\n"
           "  3  check: the image leaks clusters, and has no errors\n"
           "\n"
           "Errors are reported on stderr, prefixed with 'cowchain: '.\n"
           "\n"
           "--timeout=SECONDS (before or after COMMAND; default\n"
           "$COWCHAIN_TIMEOUT, else %d; 0 = no limit) bounds each request\n"
           "to a running server: connecting, sending, and the whole reply.\n",
           CLI_DEFAULT_TIMEOUT);
}

static const struct command *
find_command (const char *name)
{
  for (size_t i = 0; i < N_COMMANDS; i++)
    if (strcmp (commands[i].name, name) == 0)
      return &commands[i];
  return NULL;
}

int
main (int argc, char **argv)
{
  const struct command *cmd;
  const char *name;

  /* Global options, before the command. */
  while (argc > 1 && strncmp (argv[1], "--timeout", 9) == 0
         && (argv[1][9] == '\0' || argv[1][9] == '=')) {
    const char *v = argv[1][9] == '=' ? argv[1] + 10 : argv[2];
    int shift = argv[1][9] == '=' ? 1 : 2;
    if (v == NULL) {
      cli_error ("option '--timeout' requires an argument");
      return EXIT_ERROR;
    }
    if (cli_timeout_set (NULL, v) != EXIT_OK)
      return EXIT_ERROR;
    argc -= shift;
    argv += shift;
  }
  if (argc < 2) {
    main_help (stderr);
    return EXIT_ERROR;
  }
  name = argv[1];
  if (strcmp (name, "--help") == 0 || strcmp (name, "-h") == 0
      || strcmp (name, "help") == 0) {
    if (argc > 2 && strcmp (name, "help") == 0) {
      cmd = find_command (argv[2]);
      if (cmd == NULL) {
        cli_error ("unknown command '%s'; try 'cowchain --help'", argv[2]);
        return EXIT_ERROR;
      }
      fputs (cmd->help, stdout);
    }
    else
      main_help (stdout);
    return cli_finish_output (EXIT_OK);
  }
  if (strcmp (name, "--version") == 0 || strcmp (name, "-V") == 0) {
    printf ("cowchain %s\n", PACKAGE_VERSION);
    return cli_finish_output (EXIT_OK);
  }
  if (name[0] == '-') {
    cli_error ("unrecognized option '%s'; try 'cowchain --help'", name);
    return EXIT_ERROR;
  }
  cmd = find_command (name);
  if (cmd == NULL) {
    cli_error ("unknown command '%s'; try 'cowchain --help'", name);
    return EXIT_ERROR;
  }
  return cmd->run (argc - 1, argv + 1);
}
