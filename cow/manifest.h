/* SPDX-License-Identifier: BSD-3-Clause */
/* The manifest: the persistent record of one disk's chain (base, layers
 * bottom to top, snapshot names, times, descriptions), replaced
 * atomically: write a temporary file, fsync, rename, fsync the directory.
 *
 * Format (text, one record per line; strings percent-encoded so that a
 * field never holds a space, newline or control byte):
 *   cowchain-manifest 1
 *   base PATH FORMAT        (or "nobase": the layers are self-contained)
 *   layer FILE CREATED SNAPSHOT DESCRIPTION     (bottom to top)
 *   rebase FILE             (after the layers; zero or more)
 * SNAPSHOT and DESCRIPTION are "-" when empty; the last layer is active.
 * "rebase FILE": the header of layer FILE may still name the backing it
 * had before this manifest was saved (a merge rewrites it just after);
 * only such a layer's backing name is repaired at open, any other
 * mismatch is refused.
 */
#ifndef COW_MANIFEST_H
#define COW_MANIFEST_H

#include <stdbool.h>
#include <stdint.h>
#include <stddef.h>

#include "cowchain.h"          /* COW_NAME_MAX, cow_snapshot_name_reserved */

#define MANIFEST_NAME "manifest"
/* A chain's layers (the disk's depth limit; a longer list is refused). */
#define MANIFEST_MAX_LAYERS 128
#define COW_DESC_MAX 1024           /* descriptions */

struct manifest_layer {
  char *file;             /* name inside the state directory */
  int64_t created;        /* seconds since the epoch */
  char *snapshot;         /* NULL if none */
  char *description;      /* NULL if none */
};

struct manifest {
  char *base;
  char *base_format;
  bool no_base;           /* pulled self-contained: base is NULL */
  struct manifest_layer *layers;
  size_t n_layers;
  char **rebase;          /* layer files whose backing may lag (see above) */
  size_t n_rebase;
};

/* Read dir/manifest: 1 loaded, 0 absent, -1 error (named).  Refused:
 * malformed lines, more than MANIFEST_MAX_LAYERS layers, a file or name
 * listed twice, a snapshot name on the last (active) layer. */
int manifest_load (const char *dir, struct manifest *m);
/* Replace dir/manifest with m.  On failure, *uncertain (if not NULL)
 * says whether the file may have been replaced anyway: false means the
 * old manifest is untouched; true (the rename was done but the
 * directory's fsync failed) means either may be there after a crash. */
int manifest_save (const char *dir, const struct manifest *m,
                   bool *uncertain);
void manifest_free (struct manifest *m);
int manifest_push (struct manifest *m, const char *file, int64_t created,
                   const char *snapshot, const char *description);
/* Mark layer file 'file' as one whose backing name may lag. */
int manifest_add_rebase (struct manifest *m, const char *file);
bool manifest_has_rebase (const struct manifest *m, const char *file);
/* Remove entries [from, to] (inclusive; from <= to < n_layers). */
void manifest_cut (struct manifest *m, size_t from, size_t to);
/* A deep copy (for changes that may fail). */
int manifest_copy (struct manifest *dst, const struct manifest *src);

/* A new snapshot name: 1 to COW_NAME_MAX bytes of [A-Za-z0-9._+-:@],
 * not starting with '.' or '-', and not reserved (below).  A new
 * description: at most COW_DESC_MAX bytes of valid UTF-8 without control
 * characters (C0 including tab and newline, DEL, C1).  Both return 0 or
 * -1 with an error naming what is wrong and where.  A loaded manifest is
 * held only to the older rules (names: the characters; descriptions: no
 * C0 but tab), so that manifests of older versions still open. */
int manifest_check_name (const char *name);
int manifest_check_description (const char *desc);
/* cow_snapshot_name_reserved: public (cowchain.h). */

#endif /* COW_MANIFEST_H */
