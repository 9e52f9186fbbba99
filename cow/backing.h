/* SPDX-License-Identifier: BSD-3-Clause */
/* Backing-file names (backing.c): what a new layer records as the image
 * under it, whether an existing overlay records the configured base, and
 * which names stored in a qcow2 base chain may be followed.  Private to
 * the engine. */
#ifndef COW_BACKING_H
#define COW_BACKING_H

#include "layer.h"

struct cow_disk;
struct cow_disk_config;

/* The backing name to store in the overlay: relative to the overlay's
 * directory where possible (NULL with errno if a path does not resolve). */
char *backing_name_for (const char *overlay, const char *base);
/* 0 if the existing overlay 'top' (at path overlay) records base (a file
 * with base_format, or the same NBD URI); else -1 with the reason. */
int backing_check (struct layer *top, const char *overlay, const char *base,
                   const char *base_format);
/* The path the backing name 'name' stored in the image 'from' stands
 * for, not resolved: name if it is absolute or from has no directory,
 * else from's directory joined with name (as qemu-img shows it).  NULL
 * with the last error: EPERM for json: names and URLs, which are never
 * opened as files; ENOMEM. */
char *backing_path (const char *from, const char *name);
/* Where the backing name 'name' stored in the image 'from' leads: a
 * resolved path inside base_dir or listed in allow (NULL-terminated, may
 * be NULL).  NULL with the last error (EPERM for json: names, URLs and
 * paths outside those; ENOENT if it does not resolve). */
char *backing_resolve (const char *const *allow, const char *base_dir,
                       const char *from, const char *name);

/* Open cfg->base (local file of cfg->base_format or probed, or an NBD
 * URI) and, for a qcow2 base, its own backing chain into d->lower[]
 * after the layers already there; *base_format: the base's format. */
int backing_open_chain (struct cow_disk *d, const struct cow_disk_config *cfg,
                        const char **base_format);

#endif /* COW_BACKING_H */
