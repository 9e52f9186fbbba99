/* Shared pieces of the `cowchain` tool (cowchain.c) and its chain
 * commands (cli-chain.c). */
#ifndef COW_CLI_H
#define COW_CLI_H

#include <getopt.h>
#include <stdio.h>

#define EXIT_OK 0
#define EXIT_ERROR 1            /* error, bad usage, check not completed */
#define EXIT_CORRUPT 2          /* check: the image has errors */
#define EXIT_LEAKS 3            /* check: leaked clusters, nothing worse */

void cli_error (const char *fmt, ...) __attribute__ ((format (printf, 1, 2)));
int cli_usage_error (const char *cmd, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));
int cli_finish_output (int status);
int cli_next_option (const char *cmd, int argc, char **argv,
                     const char *shortopts, const struct option *longopts);
/* Print s as a JSON string (quoted, escaped). */
void cli_json_string (FILE *f, const char *s);

/* The active layer of a disk of a running server (for info --disk). */
char *cli_active_layer (const char *control, const char *disk);

extern const char snapshot_help[], list_help[], revert_help[],
  blklist_help[], status_help[];
int cmd_snapshot (int argc, char **argv);
int cmd_list (int argc, char **argv);
int cmd_revert (int argc, char **argv);
int cmd_blklist (int argc, char **argv);
int cmd_status (int argc, char **argv);

#endif /* COW_CLI_H */
