/* Consistency check of a qcow2 file, in the manner of qemu-img check: the
 * reference count of every host cluster is rebuilt from the metadata and
 * compared with the stored refcounts.  Optionally repairs leaks (and
 * nothing else). */
#ifndef COW_QCOW2_CHECK_H
#define COW_QCOW2_CHECK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define QCOW2_CHECK_MAX_MESSAGES 100
#define QCOW2_CHECK_MESSAGE_LEN 256

struct qcow2_check_result {
  /* The verdict, in qemu-img check's terms. */
  uint64_t corruptions;        /* errors: data may be at risk */
  uint64_t leaks;              /* clusters whose refcount is too high */
  uint64_t check_errors;       /* the check itself failed somewhere */
  uint64_t leaks_fixed;        /* with repair_leaks */
  uint64_t corruptions_fixed;  /* always 0: corruptions are never repaired */
  bool repair_refused;         /* leaks not repaired: the image has errors */

  /* Guest clusters of the virtual size, and those the image holds (data,
   * compressed, or zero with a host cluster kept). */
  uint64_t total_clusters;
  uint64_t allocated_clusters;
  uint64_t fragmented_clusters;
  uint64_t compressed_clusters;

  /* End of the last host cluster that is referenced or has a refcount. */
  uint64_t image_end_offset;
  uint64_t cluster_size;

  /* What was found, in order; later findings are counted, not kept. */
  size_t n_messages;
  uint64_t messages_dropped;
  char messages[QCOW2_CHECK_MAX_MESSAGES][QCOW2_CHECK_MESSAGE_LEN];
};

/* Check the qcow2 image at path.  Opens it read-only, and also
 * read-write when repair_leaks is set (refused for an image marked
 * corrupt or dirty); leaks are repaired only when the image has no other
 * error.  No other process may write the image meanwhile.
 *
 * Returns 0 when the check ran to its end: *res holds the verdict (which
 * may still count check_errors, such as an unreadable L2 table).  Returns
 * -1 when it could not be done at all (the file cannot be opened, is not
 * a qcow2 image, has internal snapshots or persistent bitmaps, memory
 * runs out); then the last error says why and res->check_errors is at
 * least 1. */
int qcow2_check (const char *path, bool repair_leaks,
                 struct qcow2_check_result *res);

#endif /* COW_QCOW2_CHECK_H */
