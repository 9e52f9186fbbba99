/* SPDX-License-Identifier: BSD-3-Clause */
/* The image commands of `cowchain`: info and check, which read any
 * qcow2 or raw file through the engine's image calls (cow_image_info,
 * cow_image_check), or the active layer of a running server's disk. */
#include <config.h>

#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "cowchain.h"

/* How many backing links `info --backing-chain` follows at most. */
#define MAX_BACKING_DEPTH 64

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

/*----------------------------------------------------------------------
 * info
 */

const char info_help[] =
  "Usage: cowchain info [OPTION]... IMAGE\n"
  "       cowchain info [OPTION]... --disk=NAME [--control=SOCKET]\n"
  "Show what IMAGE (or the active layer of a running server's disk) is,\n"
  "like qemu-img info: its format (qcow2 or raw, by its magic), virtual\n"
  "size, disk size and, for qcow2, cluster size,\n"
  "backing file and format, compat level, refcount width and flags.\n"
  "JSON: qemu-img info's shape (no version field).\n"
  HELP_OPTIONS
  "  --backing-chain        show the backing files too, down to the bottom\n"
  "                         of the chain (at most 64 levels)\n"
  "  --output=text|json     output format (default: text); JSON in the\n"
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
  "Exit status:\n"
  "  0  success\n"
  "  1  error: bad usage, an image that cannot be read\n"
  "\n"
  "Example:\n"
  "  cowchain info --backing-chain -U /var/lib/cowchain/vm1-vda/layer-000002.qcow2\n"
  "  cowchain --control /run/vm1.ctl info --disk vda --output=json\n";

/* -U: layers that a running server holds are read sharing everything. */
static bool info_force_share;

/* Describe the image at path (cow_image_info), reporting any error. */
static int
read_info (const char *path, const char *format, const char *referrer,
           struct cow_image_info *ii)
{
  if (cow_image_info (path, format, referrer,
                      info_force_share ? COW_IMAGE_FORCE_SHARE : 0,
                      ii) == -1) {
    cli_error ("%s", cow_last_error ());
    return -1;
  }
  return 0;
}

static void
print_info_human (const struct cow_image_info *ii)
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
    printf ("    extended l2: %s\n", ii->extended_l2 ? "true" : "false");
  }
}

static void
print_info_json (struct cli_json *j, const struct cow_image_info *ii)
{
  bool qcow2 = strcmp (ii->format, "qcow2") == 0;

  cli_json_open (j, '{');
  cli_json_u64 (j, "virtual-size", ii->virtual_size);
  cli_json_str (j, "filename", ii->filename);
  if (qcow2)
    cli_json_u64 (j, "cluster-size", ii->cluster_size);
  cli_json_str (j, "format", ii->format);
  cli_json_u64 (j, "actual-size", ii->actual_size);
  if (qcow2) {
    cli_json_key (j, "format-specific");
    cli_json_open (j, '{');
    cli_json_str (j, "type", "qcow2");
    cli_json_key (j, "data");
    cli_json_open (j, '{');
    cli_json_str (j, "compat", ii->version >= 3 ? "1.1" : "0.10");
    cli_json_str (j, "compression-type", "zlib");
    if (ii->version >= 3)
      cli_json_bool (j, "lazy-refcounts", ii->lazy_refcounts);
    cli_json_u64 (j, "refcount-bits", ii->refcount_bits);
    if (ii->version >= 3) {
      cli_json_bool (j, "corrupt", ii->corrupt);
      cli_json_bool (j, "extended-l2", ii->extended_l2);
    }
    cli_json_close (j, '}');
    cli_json_close (j, '}');
  }
  if (ii->backing_file) {
    if (ii->full_backing)
      cli_json_str (j, "full-backing-filename", ii->full_backing);
    cli_json_str (j, "backing-filename", ii->backing_file);
    if (ii->backing_format)
      cli_json_str (j, "backing-filename-format", ii->backing_format);
  }
  cli_json_bool (j, "dirty-flag", ii->dirty);
  cli_json_close (j, '}');
}

/* Fill chain[] from path down, at most MAX_BACKING_DEPTH links. */
static int
read_chain (const char *path, bool follow, struct cow_image_info *chain,
            size_t *n)
{
  const char *format = NULL;
  const char *referrer = NULL;

  *n = 0;
  for (;;) {
    struct cow_image_info *ii = &chain[*n];
    const struct cow_image_info *above;

    if (read_info (path, format, referrer, ii) == -1) {
      cow_image_info_clear (ii);
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

int
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
  enum cli_output output = CLI_OUTPUT_HUMAN;
  bool follow = false;
  const char *image, *disk = NULL, *control = NULL, *timeout = NULL;
  char *active = NULL;
  struct cow_image_info *chain;
  size_t n = 0;
  int c, r;

  while ((c = cli_next_option ("info", argc, argv, ":hU", longopts)) != -1) {
    switch (c) {
    case 'b': follow = true; break;
    case 'U': info_force_share = true; break;
    case 'o':
      if ((r = cli_parse_output ("info", optarg, &output)) != EXIT_OK)
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
    if (optind < argc && disk)
      return cli_usage_error ("info", "give IMAGE or --disk, not both");
    if (optind < argc)
      return cli_usage_error ("info", "--control shows a running server's "
                              "disk (with --disk, or its default disk): "
                              "leave out IMAGE, or --control");
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
    if (output == CLI_OUTPUT_JSON) {
      struct cli_json j;
      cli_json_init (&j, stdout, 4);
      if (follow)
        cli_json_open (&j, '[');
      for (size_t i = 0; i < n; i++) {
        if (follow)
          cli_json_next (&j);
        print_info_json (&j, &chain[i]);
      }
      if (follow)
        cli_json_close (&j, ']');
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
    cow_image_info_clear (&chain[i]);
  free (chain);
  free (active);
  return cli_finish_output (r);
}

/*----------------------------------------------------------------------
 * check
 */

const char check_help[] =
  "Usage: cowchain check [OPTION]... IMAGE\n"
  "Check the consistency of the qcow2 image IMAGE, like qemu-img check:\n"
  "rebuild the reference count of every cluster of the file from its\n"
  "metadata and compare it with the stored refcounts.  A refcount that is\n"
  "too small, and any malformed table entry, is an error; a refcount that\n"
  "is too large is a leak (wasted space, no harm to data).\n"
  "JSON: qemu-img check's shape (no version field).\n"
  HELP_OPTIONS
  "  -r, --repair=leaks     lower the refcounts of leaked clusters, then\n"
  "                         check again; done only when the image has no\n"
  "                         other error (other repairs: qemu-img check -r all)\n"
  "  --output=text|json     output format (default: text); JSON with the\n"
  "                         keys of qemu-img check --output=json\n"
  "  -h, --help             show this help\n"
  "\n"
  "Images with internal snapshots or persistent bitmaps are not checked.\n"
  "\n"
  "Exit status:  (those of qemu-img check)\n"
  "  0  no errors were found (or the leaks were repaired)\n"
  "  1  the check could not be completed (or bad usage)\n"
  "  2  the image has errors: data may be corrupted\n"
  "  3  the image leaks clusters, and has no errors\n"
  "\n"
  "Example:\n"
  "  cowchain check -r leaks layer.qcow2\n";

static int
check_status (const struct cow_check_result *res)
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
print_findings (const struct cow_check_result *res)
{
  for (size_t i = 0; i < res->n_messages; i++)
    printf ("%s\n", cli_text (res->messages[i]));
  if (res->messages_dropped)
    printf ("(%" PRIu64 " more findings not shown)\n", res->messages_dropped);
}

static void
print_check_human (const struct cow_check_result *res)
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
print_check_json (const char *image, const struct cow_check_result *res)
{
  struct cli_json j;

  cli_json_init (&j, stdout, 4);

  cli_json_open (&j, '{');
  cli_json_u64 (&j, "image-end-offset", res->image_end_offset);
  if (res->compressed_clusters)
    cli_json_u64 (&j, "compressed-clusters", res->compressed_clusters);
  cli_json_u64 (&j, "total-clusters", res->total_clusters);
  if (res->corruptions)
    cli_json_u64 (&j, "corruptions", res->corruptions);
  cli_json_u64 (&j, "check-errors", res->check_errors);
  if (res->leaks)
    cli_json_u64 (&j, "leaks", res->leaks);
  if (res->corruptions_fixed)
    cli_json_u64 (&j, "corruptions-fixed", res->corruptions_fixed);
  if (res->leaks_fixed)
    cli_json_u64 (&j, "leaks-fixed", res->leaks_fixed);
  if (res->allocated_clusters)
    cli_json_u64 (&j, "allocated-clusters", res->allocated_clusters);
  cli_json_str (&j, "filename", image);
  cli_json_str (&j, "format", "qcow2");
  if (res->fragmented_clusters)
    cli_json_u64 (&j, "fragmented-clusters", res->fragmented_clusters);
  if (res->repair_refused)
    cli_json_bool (&j, "repair-refused", true);
  cli_json_key (&j, "messages");
  cli_json_open (&j, '[');
  for (size_t i = 0; i < res->n_messages; i++) {
    cli_json_next (&j);
    cli_json_string (&j, res->messages[i]);
  }
  cli_json_close (&j, ']');
  cli_json_close (&j, '}');
}

int
cmd_check (int argc, char **argv)
{
  static const struct option longopts[] = {
    { "repair", required_argument, NULL, 'r' },
    { "output", required_argument, NULL, 'o' },
    { "help", no_argument, NULL, 'h' },
    { NULL, 0, NULL, 0 },
  };
  enum cli_output output = CLI_OUTPUT_HUMAN;
  bool repair = false;
  const char *image;
  struct cow_check_result *res, *again = NULL;
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
      if ((r = cli_parse_output ("check", optarg, &output)) != EXIT_OK)
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
  if (cow_image_check (image, repair, res) == -1) {
    cli_error ("%s", cow_last_error ());
    free (res);
    return EXIT_ERROR;
  }

  if (res->leaks_fixed > 0) {
    /* Like qemu-img: say what was repaired, then check again, and let
     * that second verdict decide. */
    if (output == CLI_OUTPUT_HUMAN) {
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
    if (cow_image_check (image, false, again) == -1) {
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

  if (output == CLI_OUTPUT_JSON)
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

