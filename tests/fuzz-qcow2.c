/* SPDX-License-Identifier: BSD-3-Clause */
/* libFuzzer target: the qcow2 open-and-read path on untrusted bytes.
 *
 * Each input is the whole content of a qcow2 file.  It is written to a
 * memfd (no disk I/O; opened again through /proc/self/fd/N as the engine
 * opens any path), opened read-only with qcow2_open, and, if it opens,
 * read from start to end (capped at FUZZ_READ_CAP bytes of virtual disk)
 * in chunks that do not line up with clusters, mapped over the same range,
 * and closed.  Nothing below the layer: unallocated clusters read as zero.
 *
 * Build and run: make fuzz; make fuzz-run FUZZ_SECONDS=300.
 */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "error.h"
#include "layer.h"

#define FUZZ_READ_CAP (64ull << 20)          /* virtual bytes read per input */
#define FUZZ_CHUNK ((1u << 20) + 4097)       /* odd: partial clusters too */

int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

static int memfd = -1;
static char path[64];
static char *buf;

static void
setup (void)
{
  memfd = memfd_create ("fuzz-qcow2", MFD_CLOEXEC);
  if (memfd == -1) {
    perror ("memfd_create");
    abort ();
  }
  snprintf (path, sizeof path, "/proc/self/fd/%d", memfd);
  buf = malloc (FUZZ_CHUNK);
  if (buf == NULL)
    abort ();
}

static void
put_input (const uint8_t *data, size_t size)
{
  size_t done = 0;

  if (ftruncate (memfd, 0) == -1) {
    perror ("ftruncate");
    abort ();
  }
  while (done < size) {
    ssize_t r = pwrite (memfd, data + done, size - done, (off_t) done);
    if (r <= 0) {
      perror ("pwrite");
      abort ();
    }
    done += (size_t) r;
  }
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  struct layer *l;
  uint64_t end, off;

  if (memfd == -1)
    setup ();
  put_input (data, size);

  l = qcow2_open (path, true, 1u << 20);
  if (l == NULL)
    return 0;

  /* The getters must be safe on whatever was accepted. */
  (void) qcow2_backing_file (l);
  (void) qcow2_backing_format (l);
  (void) qcow2_cluster_size (l);

  end = l->size < FUZZ_READ_CAP ? l->size : FUZZ_READ_CAP;
  for (off = 0; off < end; ) {
    uint32_t n = end - off < FUZZ_CHUNK ? (uint32_t) (end - off) : FUZZ_CHUNK;
    /* Errors (corrupt tables, bad compressed data) are expected; the
     * next chunk is still read, as a client would. */
    (void) l->ops->read (l, buf, n, off, NULL);
    off += n;
  }
  for (off = 0; off < end; ) {
    uint64_t len = 0;
    enum layer_status st;
    if (l->ops->map (l, off, end - off, &len, &st) == -1)
      break;
    if (len == 0 || len > end - off) {
      fprintf (stderr, "map at %llu returned length %llu (asked %llu)\n",
               (unsigned long long) off, (unsigned long long) len,
               (unsigned long long) (end - off));
      abort ();
    }
    off += len;
  }
  /* A read-only layer: close never writes, and must not fail. */
  if (l->ops->close (l) == -1) {
    fprintf (stderr, "close of a read-only layer failed\n");
    abort ();
  }
  cow_error_clear ();
  return 0;
}
