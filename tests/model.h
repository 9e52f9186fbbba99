/* SPDX-License-Identifier: BSD-3-Clause */
/* The model-disk fixture of the C tests: a byte array of what a disk
 * must read, requests applied to the disk and, when they succeed, to the
 * model, whole-disk comparisons, and a copy of the model per snapshot.
 * The requests fail the current test when the engine refuses them. */
#ifndef COW_TESTS_MODEL_H
#define COW_TESTS_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TU_MODEL_SNAPS 16

struct cow_disk;

struct tu_model_snap {
  char *name;
  uint8_t *data;                /* the disk when the snapshot was taken */
};

struct tu_model {
  uint8_t *data;                /* what the disk must read now */
  uint64_t size;
  uint32_t cs;                  /* the disk's cluster size */
  /* A trim zeroes the whole clusters inside its range (a zero cluster
   * hides what is under it); false: trim changes nothing (version 2
   * overlays have no zero clusters). */
  bool trim_zeroes;
  /* The disk's subclusters setting (cow_disk_config.subclusters): with
   * subclusters a trim releases whole subclusters (tu_trim_unit). */
  int subclusters;
  uint64_t seed;                /* of the random data written */
  struct tu_model_snap snaps[TU_MODEL_SNAPS];
  size_t n_snaps;
};

/* A model of size bytes of zeroes (cluster size cs, random data from
 * seed). */
void tu_model_init (struct tu_model *m, uint64_t size, uint32_t cs,
                    uint64_t seed);
void tu_model_fini (struct tu_model *m);
/* Random contents from the seed, with a zero run (64 KiB + 511 bytes at
 * a third of the disk, if it fits): what the tests' bases hold. */
void tu_model_fill_base (struct tu_model *m);

/* Requests on d, applied to the model; the test fails if d refuses. */
void tu_model_pwrite (struct tu_model *m, struct cow_disk *d, const void *buf,
                      uint64_t off, uint32_t len, unsigned flags);
/* A write of len random bytes (from the model's seed). */
void tu_model_write (struct tu_model *m, struct cow_disk *d, uint64_t off,
                     uint32_t len, unsigned flags);
void tu_model_zero (struct tu_model *m, struct cow_disk *d, uint64_t off,
                    uint32_t len, unsigned flags);
void tu_model_trim (struct tu_model *m, struct cow_disk *d, uint64_t off,
                    uint32_t len, unsigned flags);
/* The model side of a trim alone. */
void tu_model_trimmed (struct tu_model *m, uint64_t off, uint32_t len);

/* Read the range (in chunks of at most 1 MiB) and compare; on a
 * mismatch the first differing offset is reported with 'what'. */
void tu_model_verify_range (struct tu_model *m, struct cow_disk *d,
                            uint64_t off, uint64_t len, const char *what);
void tu_model_verify (struct tu_model *m, struct cow_disk *d,
                      const char *what);

/* cow_disk_snapshot (the test fails if refused), and a copy of the
 * model kept under its name. */
struct tu_model_snap *tu_model_snapshot (struct tu_model *m,
                                         struct cow_disk *d, const char *name,
                                         const char *description);
/* The copy alone. */
struct tu_model_snap *tu_model_keep (struct tu_model *m, const char *name);
/* The copy kept under name, or NULL. */
struct tu_model_snap *tu_model_snap (struct tu_model *m, const char *name);
/* Drop the copy kept under name (which must be there). */
void tu_model_forget (struct tu_model *m, const char *name);
/* Drop every copy (their buffers are kept for the next ones). */
void tu_model_forget_all (struct tu_model *m);

#endif /* COW_TESTS_MODEL_H */
