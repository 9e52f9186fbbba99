/* SPDX-License-Identifier: BSD-3-Clause */
/* The engine's side of serving disks (see service.c): what the control
 * socket's server runs for each request.  Front ends use the public part
 * in cowchain.h (cow_service_*, cow_export_*); this header is for the
 * engine and its tests. */
#ifndef COW_SERVICE_H
#define COW_SERVICE_H

#include "cowchain.h"
#include "control.h"

/* One control command: its name, how many words may follow it, whether
 * the first of them (if given) names a disk, and what runs it.  The
 * table is data so that the dispatch, its errors and the protocol's
 * description cannot drift apart. */
struct cow_command {
  const char *name;
  int min_args, max_args;       /* words after the command */
  bool disk_arg;                /* args[0], when given, is a DISK (strict
                                   lookup: only real names and "") */
  /* e: the disk of args[0] if disk_arg and given, else NULL. */
  int (*run) (struct cow_service *s, struct cow_export *e, char **args,
              int n, struct control_reply *r);
  const char *usage;            /* one line: "NAME ARG...", optional
                                   arguments in [ ] */
};
extern const struct cow_command cow_commands[];
extern const size_t cow_n_commands;

/* The control_handler of a service (opaque: the struct cow_service):
 * look up words[0] in the table, check the number of arguments and the
 * disk, run the command.  0 with the reply's lines in r, or -1 with the
 * last error ("unknown command 'X'", "wrong number of arguments for
 * 'X'", "no disk named 'X'", or the command's own). */
int cow_service_dispatch (void *service, char **words, int n,
                          struct control_reply *r);

#endif /* COW_SERVICE_H */
