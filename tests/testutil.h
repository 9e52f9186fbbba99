/* SPDX-License-Identifier: BSD-3-Clause */
/* Helpers shared by the cmocka unit tests: temporary directories,
 * deterministic random numbers, files, and running qemu-img as an
 * external oracle. */
#ifndef COW_TESTUTIL_H
#define COW_TESTUTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* A fresh temporary directory (mkdtemp under $TMPDIR or /tmp); removed
 * with everything in it by tu_rmtree.  Aborts on failure. */
char *tu_mkdtemp (const char *tag);
void tu_rmtree (const char *dir);
/* dir + "/" + name, malloc'd. */
char *tu_path (const char *dir, const char *name);

/* xorshift64* generator: deterministic for a given seed. */
uint64_t tu_rand (uint64_t *state);
/* Uniform in [0, n) (n > 0). */
uint64_t tu_rand_below (uint64_t *state, uint64_t n);
void tu_fill_random (void *buf, size_t n, uint64_t *state);

/* Seconds on the monotonic clock. */
double tu_now_s (void);
/* An fsync that does nothing, for io_ops tables of tests that check
 * something other than durability. */
int tu_nosync (int fd);
/* The path that fd has open (from /proc/self/fd) into buf of len bytes;
 * false if it cannot be read. */
bool tu_fd_path (int fd, char *buf, size_t len);

/* Whole-file helpers (abort on error). */
void tu_write_file (const char *path, const void *buf, size_t n);
void *tu_read_file (const char *path, size_t *n);
uint64_t tu_file_size (const char *path);
void tu_copy_file (const char *from, const char *to);
/* Overwrite n bytes of a file at offset. */
void tu_patch (const char *path, uint64_t offset, const void *buf, size_t n);
void tu_patch_be32 (const char *path, uint64_t offset, uint32_t v);
void tu_patch_be64 (const char *path, uint64_t offset, uint64_t v);

/* Run a shell command (printf-style); returns its exit status, or -1
 * if it did not exit normally.  The output is captured and returned in
 * *out (malloc'd, may be NULL if out is NULL). */
/* Subclusters task: the subclusters setting that the crash and
 * power-loss tests give their disks: -1 (off) with
 * COWCHAIN_TEST_SUBCLUSTERS=off, else 0, the default (on for compat 1.1
 * layers with clusters of 16K or more; the tests' smaller clusters stay
 * without). */
int tu_subclusters (void);
/* COWCHAIN_TEST_SUBCLUSTERS=on: a test whose clusters are too small for
 * subclusters picks larger ones. */
bool tu_subclusters_wanted (void);
/* What a trim releases in a compat 1.1 layer of cluster size cs made
 * with that setting: the whole cluster, or with subclusters the
 * subcluster. */
uint32_t tu_trim_unit (uint32_t cs, int subclusters);

int tu_run (char **out, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));

/* qemu-img check --output=json.  Returns the exit status (0 clean, 2
 * corruptions, 3 leaks only, ...) and the counts; prints the report when
 * the status is not 0. */
struct tu_check {
  int status;
  int64_t leaks, corruptions, check_errors;
  char *output;                 /* malloc'd */
};
int tu_qemu_check (const char *path, struct tu_check *res);
/* Assert the image is clean (status 0). */
void tu_assert_check_clean (const char *path);
/* Assert no corruption: status 0, or 3 with leaks only.  Returns the
 * number of leaked clusters. */
int64_t tu_assert_check_no_corruption (const char *path);

/* A field of qemu-img info --output=json: the integer after "key": or
 * -1 if absent. */
int64_t tu_qemu_info_int (const char *path, const char *key);
/* The string after "key": (malloc'd), or NULL. */
char *tu_qemu_info_str (const char *path, const char *key);

/* In JSON text: the integer after "key": (-1 if absent), the string
 * after "key": (malloc'd; NULL if absent). */
int64_t tu_json_int (const char *json, const char *key);
char *tu_json_str (const char *json, const char *key);

/* Fail the current test with a message when hay does not contain needle. */
#define tu_assert_contains(hay, needle)                                 \
  do {                                                                  \
    const char *tu_h_ = (hay), *tu_n_ = (needle);                       \
    if (tu_h_ == NULL || strstr (tu_h_, tu_n_) == NULL) {               \
      print_error ("'%s' does not contain '%s'\n",                      \
                   tu_h_ ? tu_h_ : "(null)", tu_n_);                    \
      fail ();                                                          \
    }                                                                   \
  } while (0)

/* Compare two buffers and on mismatch report the first differing offset
 * (plus base, for messages) before failing. */
void tu_assert_bytes_equal (const void *got, const void *want, size_t n,
                            uint64_t base, const char *what);

/* A 64-bit hash of a file's contents (streamed; seed h), and a set of
 * such hashes: tests that check the same file contents over and over
 * (after each of many kills) run an expensive oracle once per content. */
uint64_t tu_hash_file (const char *path, uint64_t h);
struct tu_hashset {
  uint64_t v[8192];
  size_t n;
};
bool tu_hashset_has (const struct tu_hashset *s, uint64_t h);
/* Adds h (silently not once the set is full: the oracle then just runs
 * again). */
void tu_hashset_add (struct tu_hashset *s, uint64_t h);

/* A disk's chain as cow_disk_layers reports it, bottom to top. */
#define TU_CHAIN_MAX 32
struct cow_disk;
struct tu_chain {
  size_t n;
  char *file[TU_CHAIN_MAX];       /* base names */
  char *snapshot[TU_CHAIN_MAX];   /* NULL: none */
  char *path[TU_CHAIN_MAX];
};
void tu_chain_get (struct cow_disk *d, struct tu_chain *c);
void tu_chain_free (struct tu_chain *c);
void tu_chain_print (const struct tu_chain *c, const char *what);
/* Index of the layer carrying a snapshot name, or -1. */
int tu_chain_find (const struct tu_chain *c, const char *name);

#endif /* COW_TESTUTIL_H */
