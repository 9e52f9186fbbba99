/* SPDX-License-Identifier: BSD-3-Clause */
/* The shared pieces of the `cowchain` tool (cli.h): error and usage
 * messages, text made safe for a terminal, sizes, the one --output
 * parser, the options of a command, and the one JSON writer every
 * command's --output=json goes through. */
#include <config.h>

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "cowchain.h"

const char *
cli_text (const char *s)
{
  /* A few results at once, so that one printf can take several. */
  static char *ring[16];
  static unsigned next;
  char **slot = &ring[next++ % 16];

  free (*slot);
  *slot = cow_text_printable (s ? s : "");
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

int
cli_parse_output (const char *cmd, const char *arg, enum cli_output *out)
{
  /* "human" is the older name of text. */
  if (strcmp (arg, "text") == 0 || strcmp (arg, "human") == 0)
    *out = CLI_OUTPUT_HUMAN;
  else if (strcmp (arg, "json") == 0)
    *out = CLI_OUTPUT_JSON;
  else
    return cli_usage_error (cmd, "--output must be 'text' or 'json', not '%s'",
                            arg);
  return EXIT_OK;
}

/* The name of option c as the user may have written it. */
static void
option_name (int c, const struct option *longopts, char *buf, size_t len)
{
  for (const struct option *o = longopts; o->name; o++)
    if (o->val == c && o->flag == NULL) {
      snprintf (buf, len, "--%s", o->name);
      return;
    }
  snprintf (buf, len, "-%c", c);
}

/* getopt_long over a command's own argv, with our own error messages.
 * Returns the option, -1 at the end, or '?' after reporting an error.
 * An option with a value given twice is an error (the second would
 * silently win otherwise), also when one of them came before the
 * command (main.c passes global options on as the first ones). */
int
cli_next_option (const char *cmd, int argc, char **argv, const char *shortopts,
                 const struct option *longopts)
{
  /* Values seen, by option (short options and CLI_OPT_*). */
  static const char *seen[0x200];
  char opts[64], name[64];
  int c;

  /* A leading ':' makes getopt tell a missing value (':') from an
   * unknown option ('?'). */
  snprintf (opts, sizeof opts, "%s%s", shortopts[0] == ':' ? "" : ":",
            shortopts);
  opterr = 0;
  c = getopt_long (argc, argv, opts, longopts, NULL);
  if (c == '?') {
    const char *word = argv[optind - 1];
    if (optopt >= '0' && optopt <= '9' && word[0] == '-'
        && word[1] >= '0' && word[1] <= '9')
      cli_usage_error (cmd, "'%s' is not an option, and no value of %s is "
                       "negative", word, cmd);
    else if (optopt)
      cli_usage_error (cmd, "invalid option -- '%c'", optopt);
    else
      cli_usage_error (cmd, "unrecognized option '%s'", argv[optind - 1]);
  }
  else if (c == ':') {
    option_name (optopt, longopts, name, sizeof name);
    cli_usage_error (cmd, "option '%s' requires a value", name);
  }
  else if (c >= 0 && c < 0x200 && optarg) {
    if (seen[c]) {
      option_name (c, longopts, name, sizeof name);
      cli_usage_error (cmd, "option '%s' given twice ('%s', then '%s'); "
                       "give it once", name, seen[c], optarg);
      return '?';
    }
    seen[c] = optarg;
  }
  return c == ':' ? '?' : c;
}

/*----------------------------------------------------------------------
 * Sizes.
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


/*----------------------------------------------------------------------
 * JSON.
 */

/* s as a JSON string (cli.h). */
static void
json_string (FILE *f, const char *s)
{
  const unsigned char *p = (const unsigned char *) s;

  fputc ('"', f);
  while (*p) {
    size_t len;
    long cp = cow_utf8_decode (p, &len);
    switch (cp) {
    case '"': fputs ("\\\"", f); break;
    case '\\': fputs ("\\\\", f); break;
    case '\n': fputs ("\\n", f); break;
    case '\t': fputs ("\\t", f); break;
    case '\r': fputs ("\\r", f); break;
    case -1: fputs ("\\ufffd", f); break;
    default:
      if (cow_text_is_control (cp) || cp == 0x2028 || cp == 0x2029)
        fprintf (f, "\\u%04lx", cp);
      else
        fwrite (p, 1, len, f);
    }
    p += len;
  }
  fputc ('"', f);
}

void
cli_json_init (struct cli_json *j, FILE *f, unsigned indent)
{
  memset (j, 0, sizeof *j);
  j->f = f;
  j->indent = indent;
}

/* Is the container we are in written on one line? */
static bool
json_inline (const struct cli_json *j)
{
  return j->depth > 0 && j->depth <= 32
    && (j->inline_levels & (UINT32_C (1) << (j->depth - 1)));
}

static void
json_newline (struct cli_json *j)
{
  fputc ('\n', j->f);
  for (unsigned i = 0; i < j->depth * j->indent; i++)
    fputc (' ', j->f);
}

void
cli_json_next (struct cli_json *j)
{
  if (json_inline (j)) {
    if (j->need_comma)
      fputs (", ", j->f);
  }
  else {
    if (j->need_comma)
      fputc (',', j->f);
    if (j->depth > 0)
      json_newline (j);
  }
  j->need_comma = true;
}

static void
json_open (struct cli_json *j, char c, bool one_line)
{
  fputc (c, j->f);
  j->depth++;
  if (j->depth <= 32) {
    if (one_line)
      j->inline_levels |= UINT32_C (1) << (j->depth - 1);
    else
      j->inline_levels &= ~(UINT32_C (1) << (j->depth - 1));
  }
  j->need_comma = false;
}

void
cli_json_open (struct cli_json *j, char c)
{
  json_open (j, c, false);
}

void
cli_json_open_inline (struct cli_json *j, char c)
{
  json_open (j, c, true);
}

void
cli_json_close (struct cli_json *j, char c)
{
  bool one_line = json_inline (j);

  j->depth--;
  if (!one_line && j->need_comma)       /* not empty */
    json_newline (j);
  fputc (c, j->f);
  j->need_comma = true;
  if (j->depth == 0)
    fputc ('\n', j->f);
}

void
cli_json_key (struct cli_json *j, const char *key)
{
  cli_json_next (j);
  json_string (j->f, key);
  fputs (": ", j->f);
}

void
cli_json_string (struct cli_json *j, const char *s)
{
  json_string (j->f, s);
}

void
cli_json_str (struct cli_json *j, const char *key, const char *v)
{
  cli_json_key (j, key);
  json_string (j->f, v);
}

void
cli_json_str_or_null (struct cli_json *j, const char *key, const char *v)
{
  cli_json_key (j, key);
  if (v && v[0])
    json_string (j->f, v);
  else
    fputs ("null", j->f);
}

void
cli_json_u64 (struct cli_json *j, const char *key, uint64_t v)
{
  cli_json_key (j, key);
  fprintf (j->f, "%" PRIu64, v);
}

void
cli_json_i64 (struct cli_json *j, const char *key, int64_t v)
{
  cli_json_key (j, key);
  fprintf (j->f, "%" PRId64, v);
}

void
cli_json_bool (struct cli_json *j, const char *key, bool v)
{
  cli_json_key (j, key);
  fputs (v ? "true" : "false", j->f);
}
