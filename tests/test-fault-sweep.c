/* SPDX-License-Identifier: BSD-3-Clause */
/* Fault-then-continue sweep (DESIGN.md invariants 7 and 8).
 *
 * For each operation (see ops[] at the bottom), each errno of {EIO,
 * ENOSPC} and each write-side I/O step N of the operation in turn (all of
 * them when there are few; else the first FIRST_STEPS, the last
 * END_WINDOW and evenly spread ones between, MAX_STEPS in all, the same
 * every run): a fresh small disk is prepared (a raw base of random data,
 * snapshots s1 and s2 with writes, zeroes and trims between, flushed,
 * then a few unflushed writes), the fault is armed so that step N and
 * every later write-side operation fail with the errno until disarmed,
 * and the operation runs (a job: started, then waited for).  Then one of:
 *
 *   (a) "continue": still armed, a guest write and a FLUSH; disarmed,
 *       guest writes (one FUA) and a FLUSH, which must succeed, after
 *       which cow_disk_health must be 0 (the degraded state is repaired
 *       once the disk works again); a snapshot c1 (must succeed); a job
 *       that must complete (the failed job started again, else a delete
 *       of s1, which leaves the layers that took the faults in the chain,
 *       or of c1); a FLUSH; the whole disk must read as the model.  Then
 *       unflushed writes, and a kill.
 *   (b) "kill while faulted": the armed write and FLUSH, then the kill
 *       with the fault still in place.
 *   (c) "manifest still failing", only when the operation left a disk
 *       degraded: the fault narrowed to the manifest (its file, its
 *       temporary file, the directory fsync), so that the layers work but
 *       no manifest can be saved: FLUSH and FUA must fail.  Under (a) and
 *       (b) they fail anyway (the layer flush fails too) and the retry
 *       succeeds as soon as the fault is gone, so nothing else here tests
 *       that FLUSH refuses while degraded.  Then the kill.
 *   (d) "FLUSH once the fault is gone, then kill": what failed flushes
 *       left undone must be done by the first good one; a later write
 *       often redoes it by chance (a flush writes whole tables), which
 *       is why (a) alone does not show it.
 *   (e) "step N alone fails, then kill": a transient fault; the cleanup
 *       after the failure then succeeds, which (b) never lets happen (an
 *       uncertain manifest save must keep the new layer file, say).
 *
 * A kill (as in test-job-crash.c) is every write-side operation failing
 * while the disk is closed: what was written before stays (the page
 * cache survives a kill), nothing after happens.  fsync is a step but a
 * no-op, here and everywhere (speed).  Opening a file with O_CREAT or
 * O_TRUNC is a write-side step too.
 *
 * After the reopen: every byte whose last write was acknowledged (its
 * FLUSH or FUA succeeded, and no later write, failed or not, touched it)
 * reads as acknowledged; every layer passes qemu-img check (leaks
 * allowed); every snapshot name in the chain is one the test took, and
 * its layer read offline by qemu-img (following the relative backing
 * names down to the base) is the disk as it was when it was taken; after
 * a successful operation its snapshot names and layers are there (or
 * gone) as it implies; no file is in the state directory but the lock,
 * the manifest, its temporary file and the chain's layers; the disk is
 * healthy; a clean close and reopen reads the same.
 *
 * The model: per byte, what the guest reads now (live, with a "known"
 * mask: a failed write, zero or trim makes its range unknown, neither the
 * old nor the new data being guaranteed), what was acknowledged (dur, with
 * its own mask), and what was written since the last successful FLUSH
 * (dirty).
 *
 * A case that finds the engine wrong is reported (operation, step, errno,
 * variant, what differed, the operation's error and the last error) and
 * the sweep goes on with the next case; the operation's test fails at the
 * end if any case did. */
#undef NDEBUG
#include <config.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>

#include "cowchain.h"
#include "io.h"
#include "faultio.h"
#include "testutil.h"

#define MAX_STEPS 60            /* sampled steps per (operation, errno) */
#define FIRST_STEPS 5
#define END_WINDOW 30
#define JOB_TIMEOUT 60.0        /* seconds */
#define MAX_SNAPS 8
#define MAX_FAILS_SHOWN 12

/*----------------------------------------------------------------------
 * The fault (faultio.h).  While armed, each write-side operation (an
 * open that creates or truncates included) is a step; step N (counting
 * from 0 at arming) and every later one fail with the errno (or, once,
 * step N alone; or, with the is_manifest_op filter, the manifest's
 * operations).  The job thread does I/O too: faultio's counters are
 * atomic. */

/* The manifest, its temporary file, or a directory (the fsync that
 * makes a rename durable). */
static bool
is_manifest_path (const char *p)
{
  const char *b = strrchr (p, '/');
  struct stat st;

  b = b ? b + 1 : p;
  if (strcmp (b, "manifest") == 0 || strcmp (b, ".manifest.tmp") == 0)
    return true;
  return stat (p, &st) == 0 && S_ISDIR (st.st_mode);
}

/* The filter of the manifest-only fault: the manifest's operations
 * (never rename_noreplace, which the manifest does not use). */
static bool
is_manifest_op (unsigned op, const char *path, const char *path2, int fd)
{
  char fdpath[PATH_MAX];

  if (op == FIO_RENAME_NOREPLACE)
    return false;
  if (op == FIO_RENAME)
    return is_manifest_path (path) || is_manifest_path (path2);
  if (path)
    return is_manifest_path (path);
  return tu_fd_path (fd, fdpath, sizeof fdpath) && is_manifest_path (fdpath);
}

static void
arm (long n, int err)
{
  fio_arm (&(struct fio_fault) { .at = n, .err = err, .ops = FIO_ALL });
}

static void
disarm (void)
{
  fio_disarm ();
}

/*----------------------------------------------------------------------
 * Disks and their models. */

struct snapm {
  char name[16];
  uint8_t *data, *known;
  uint64_t hash;                /* of data and known, if hashed */
  bool hashed;
};

struct dsk {
  char *st, *base;
  struct cow_disk *d;
  uint8_t *base_data;           /* the base's contents */
  uint8_t *live, *lk;           /* what the guest reads now; known mask */
  uint8_t *dur, *dk;            /* acknowledged data; known mask */
  uint8_t *dirty;               /* written since the last good FLUSH */
  uint8_t *buf, *buf2;
  struct snapm snaps[MAX_SNAPS];
  int n_snaps;
  struct tu_chain old;          /* the chain before the operation */
  bool have_old;
};

struct fx;

enum opkind { OP_IO, OP_FLUSH, OP_SNAP, OP_GROUP, OP_REVERT, OP_JOB };

struct opdef {
  const char *tag;
  enum opkind kind;
  int (*run) (struct fx *f);
  uint64_t size;
  uint32_t cs;
  int nd;                       /* disks */
  bool fill8m;                  /* active layer file grown to near 8 MiB */
  /* Metadata cache (0: the default, 32 MiB).  With 512-byte clusters the
   * default means 64 Ki slots per layer, allocated at each open and
   * walked at each flush: slow, and nothing here needs more than a few
   * hundred. */
  uint64_t cache;
  /* Jobs. */
  enum cow_job_kind job;
  const char *top, *base, *del;
  bool base_write;
  /* Names there (and gone) after a successful operation, and the layers
   * of the chain before it (bit i: manifest index i) that it removed. */
  const char *present[3], *absent[3];
  unsigned removed;
  int index;                    /* in ops[] */
};

struct fx {
  const struct opdef *op;
  char *dir, *scratch;
  uint64_t size;
  uint32_t cs;
  int nd;
  struct dsk k[2];
  uint64_t seed;
  /* The current case. */
  char what[160];
  bool cont;                    /* variant (a): the disk went on */
  bool repaired;                /* (a), (d): a FLUSH succeeded after it */
  int op_r;
  char op_err[640];
  bool restarted;
};

/* Coverage counters of the current operation (see struct opstat). */
static long c_op_failed, c_degraded, c_unreached, c_reverted, c_restarted;

/* Failures of the current operation's sweep. */
static jmp_buf case_jmp;
static struct fx *cur;
static unsigned long n_fails;
static char fail_ids[4096];

static void case_fail (const char *fmt, ...)
  __attribute__ ((format (printf, 1, 2), noreturn));

static void
case_fail (const char *fmt, ...)
{
  va_list ap;
  char msg[2048];
  size_t l = strlen (fail_ids);

  va_start (ap, fmt);
  vsnprintf (msg, sizeof msg, fmt, ap);
  va_end (ap);
  n_fails++;
  if (n_fails <= MAX_FAILS_SHOWN)
    print_error ("FAIL %s: %s\n  the operation returned %d%s%s\n"
                 "  last error: %s (errno %d)\n", cur->what, msg, cur->op_r,
                 cur->op_r ? ": " : "", cur->op_r ? cur->op_err : "",
                 cow_last_error (), cow_last_errno ());
  if (l + strlen (cur->what) + 4 < sizeof fail_ids)
    snprintf (fail_ids + l, sizeof fail_ids - l, "  %s\n", cur->what);
  longjmp (case_jmp, 1);
}

static struct cow_disk *
open_disk (struct fx *f, struct dsk *k, bool create)
{
  struct cow_disk_config cfg = { .state_dir = k->st,
                                 .base = create ? k->base : NULL,
                                 .base_format = create ? "raw" : NULL,
                                 .cluster_size = f->cs,
                                 .subclusters = tu_subclusters (),
                                 .cache_size = f->op->cache };

  return cow_disk_open (&cfg);
}

/* Model updates. */
static void
m_change (struct dsk *k, uint64_t off, uint64_t len, const uint8_t *data,
          bool ok, bool fua)
{
  memset (k->dirty + off, 1, len);
  memset (k->dk + off, 0, len);
  if (ok) {
    if (data)
      memcpy (k->live + off, data, len);
    memset (k->lk + off, 1, len);
  }
  else
    memset (k->lk + off, 0, len);
  if (ok && fua) {
    memcpy (k->dur + off, k->live + off, len);
    memset (k->dk + off, 1, len);
    memset (k->dirty + off, 0, len);
  }
}

static void
m_flushed (struct fx *f, struct dsk *k)
{
  for (uint64_t w = 0; w < f->size; w += 8) {
    uint64_t v;
    memcpy (&v, k->dirty + w, 8);
    if (v == 0)
      continue;
    if (v == 0x0101010101010101ull) {
      memcpy (k->dur + w, k->live + w, 8);
      memcpy (k->dk + w, k->lk + w, 8);
      memset (k->dirty + w, 0, 8);
      continue;
    }
    for (uint64_t i = w; i < w + 8; i++)
      if (k->dirty[i]) {
        k->dur[i] = k->live[i];
        k->dk[i] = k->lk[i];
        k->dirty[i] = 0;
      }
  }
}

/* Everything known, as read. */
static void
m_reset (struct fx *f, struct dsk *k, const uint8_t *data)
{
  memcpy (k->live, data, f->size);
  memcpy (k->dur, data, f->size);
  memset (k->lk, 1, f->size);
  memset (k->dk, 1, f->size);
  memset (k->dirty, 0, f->size);
}

/* Guest requests, recorded in the model whatever their result. */
static int
g_write (struct fx *f, struct dsk *k, uint64_t off, uint32_t len,
         unsigned flags)
{
  uint8_t *b = malloc (len);
  int r;

  assert_non_null (b);
  tu_fill_random (b, len, &f->seed);
  r = cow_disk_pwrite (k->d, b, len, off, flags);
  m_change (k, off, len, b, r == 0, flags & COW_FLAG_FUA);
  free (b);
  return r;
}

static int
g_rand_write (struct fx *f, struct dsk *k, uint64_t limit, unsigned flags)
{
  uint32_t len = (uint32_t) (1 + tu_rand_below (&f->seed, 64 * 1024));
  uint64_t off = tu_rand_below (&f->seed, limit - len + 1);

  return g_write (f, k, off, len, flags);
}

static int
g_zero (struct fx *f, struct dsk *k, uint64_t off, uint32_t len,
        unsigned flags)
{
  int r = cow_disk_zero (k->d, len, off, flags);

  (void) f;
  if (r == 0)
    memset (k->live + off, 0, len);
  m_change (k, off, len, NULL, r == 0, flags & COW_FLAG_FUA);
  return r;
}

/* A trim turns the whole clusters it covers into zero clusters and
 * leaves the partial ones at its edges as they were (a failed one: its
 * whole range unknown). */
static int
g_trim (struct fx *f, struct dsk *k, uint64_t off, uint32_t len,
        unsigned flags)
{
  uint64_t u = tu_trim_unit (f->cs, tu_subclusters ());
  uint64_t first = (off + u - 1) / u * u;
  uint64_t last = (off + len) / u * u;
  int r = cow_disk_trim (k->d, len, off, flags);

  if (r == -1)
    m_change (k, off, len, NULL, false, false);
  else if (first < last) {
    memset (k->live + first, 0, last - first);
    m_change (k, first, last - first, NULL, true, flags & COW_FLAG_FUA);
  }
  return r;
}

static int
g_flush (struct fx *f, struct dsk *k)
{
  int r = cow_disk_flush (k->d);

  if (r == 0)
    m_flushed (f, k);
  return r;
}

static struct snapm *
find_snap (struct dsk *k, const char *name)
{
  for (int i = 0; i < k->n_snaps; i++)
    if (strcmp (k->snaps[i].name, name) == 0)
      return &k->snaps[i];
  return NULL;
}

/* The disk as it is now, under a snapshot name about to be taken. */
static void
record_snap (struct fx *f, struct dsk *k, const char *name)
{
  struct snapm *s = find_snap (k, name);

  if (s == NULL) {
    assert_true (k->n_snaps < MAX_SNAPS);
    s = &k->snaps[k->n_snaps++];
    snprintf (s->name, sizeof s->name, "%s", name);
  }
  if (s->data == NULL) {
    s->data = malloc (f->size);
    s->known = malloc (f->size);
    assert_non_null (s->data);
    assert_non_null (s->known);
  }
  /* Mostly what the slot held in the last case: keep its hash then. */
  else if (memcmp (s->data, k->live, f->size) == 0
           && memcmp (s->known, k->lk, f->size) == 0)
    return;
  memcpy (s->data, k->live, f->size);
  memcpy (s->known, k->lk, f->size);
  s->hashed = false;
}

/*----------------------------------------------------------------------
 * Oracles: qemu-img check and convert, cached by content hash as in
 * test-job-crash.c. */

static struct tu_hashset passed;
static unsigned long qemu_runs;

static uint64_t
hash_bytes (const uint8_t *buf, size_t n, uint64_t h)
{
  size_t i;
  uint64_t w;

  for (i = 0; i + 8 <= n; i += 8) {
    memcpy (&w, buf + i, 8);
    h = (h ^ w) * 0x100000001b3ull;
    h ^= h >> 29;
  }
  for (; i < n; i++)
    h = (h ^ buf[i]) * 0x100000001b3ull;
  return (h ^ n) * 0x100000001b3ull;
}

/* The seed of an operation's disks: the same in every case. */
static uint64_t
op_seed (const struct opdef *op)
{
  return hash_bytes ((const uint8_t *) op->tag, strlen (op->tag), 1);
}

/* Read up to n bytes of a file into buf; returns its size. */
static uint64_t
read_into (const char *path, uint8_t *buf, uint64_t n)
{
  int fd = open (path, O_RDONLY | O_CLOEXEC);
  struct stat st;
  uint64_t done = 0;

  assert_true (fd >= 0);
  assert_int_equal (fstat (fd, &st), 0);
  while (done < n && done < (uint64_t) st.st_size) {
    ssize_t r = read (fd, buf + done, n - done);
    assert_true (r > 0);
    done += (uint64_t) r;
  }
  close (fd);
  return (uint64_t) st.st_size;
}

/* qemu-img check, leaks allowed (the criterion of
 * tu_assert_check_no_corruption, but reported as a case failure). */
static uint64_t
check_layer (const char *path)
{
  uint64_t h = tu_hash_file (path, 0xcbf29ce484222325ull);
  struct tu_check c;

  if (tu_hashset_has (&passed, h))
    return h;
  qemu_runs++;
  tu_qemu_check (path, &c);
  if ((c.status != 0 && c.status != 3) || c.corruptions || c.check_errors) {
    char out[1024];
    snprintf (out, sizeof out, "%s", c.output ? c.output : "");
    free (c.output);
    case_fail ("qemu-img check %s: exit %d, %" PRId64 " corruptions, "
               "%" PRId64 " check errors\n%s", path, c.status, c.corruptions,
               c.check_errors, out);
  }
  free (c.output);
  tu_hashset_add (&passed, h);
  return h;
}

static void
expect_masked (const uint8_t *got, const uint8_t *want, const uint8_t *known,
               uint64_t n, const char *what)
{
  for (uint64_t i = 0; i < n; i++) {
    if (i % 4096 == 0 && n - i >= 4096
        && memcmp (got + i, want + i, 4096) == 0) {
      i += 4095;
      continue;
    }
    if (known[i] && got[i] != want[i]) {
      uint64_t j = i;
      while (j < n && known[j] && got[j] != want[j])
        j++;
      case_fail ("%s: byte %" PRIu64 " (0x%" PRIx64 ") is 0x%02x, want 0x%02x "
                 "(a differing run of %" PRIu64 " bytes)", what, i, i, got[i],
                 want[i], j - i);
    }
  }
}

static void
read_disk (struct fx *f, struct dsk *k, uint8_t *buf, const char *what)
{
  if (cow_disk_pread (k->d, buf, (uint32_t) f->size, 0) == -1)
    case_fail ("%s: reading the disk: %s", what, cow_last_error ());
}

/* Every layer passes qemu-img check; nothing in the state directory but
 * the lock, the manifest (and its temporary file) and the chain. */
static void
check_dir (struct dsk *k, const struct tu_chain *c)
{
  DIR *dir;
  struct dirent *e;

  for (size_t i = 0; i < c->n; i++)
    check_layer (c->path[i]);
  dir = opendir (k->st);
  assert_non_null (dir);
  while ((e = readdir (dir)) != NULL) {
    bool known = strcmp (e->d_name, ".") == 0 || strcmp (e->d_name, "..") == 0
      || strcmp (e->d_name, "lock") == 0
      || strcmp (e->d_name, "manifest") == 0
      || strcmp (e->d_name, ".manifest.tmp") == 0;
    for (size_t i = 0; i < c->n; i++)
      if (strcmp (e->d_name, c->file[i]) == 0)
        known = true;
    if (!known) {
      char name[256];
      snprintf (name, sizeof name, "%s", e->d_name);
      closedir (dir);
      tu_chain_print (c, "  chain");
      case_fail ("%s/%s is not named by the chain", k->st, name);
    }
  }
  closedir (dir);
}

/* Each snapshot of the chain, read offline by qemu-img, is the disk as it
 * was when it was taken (its known bytes). */
static void
check_snapshots (struct fx *f, struct dsk *k, const struct tu_chain *c)
{
  /* The base changes only by a commit into it. */
  uint64_t h = f->op->base_write ? tu_hash_file (k->base, 0x84222325cbf29ce4ull)
    : hash_bytes (k->base_data, 64, f->size);

  for (size_t i = 0; i < c->n; i++) {
    struct snapm *s;
    uint64_t key;
    char *out = NULL;
    int st;
    uint64_t n;

    h = (h ^ tu_hash_file (c->path[i], 0xcbf29ce484222325ull))
      * 0x100000001b3ull;
    if (c->snapshot[i] == NULL)
      continue;
    s = find_snap (k, c->snapshot[i]);
    if (s == NULL)
      case_fail ("the chain holds snapshot '%s', which the test never took",
                 c->snapshot[i]);
    if (!s->hashed) {
      s->hash = hash_bytes (s->known, f->size,
                            hash_bytes (s->data, f->size, 1));
      s->hashed = true;
    }
    key = (h ^ s->hash) * 0x100000001b3ull;
    if (tu_hashset_has (&passed, key))
      continue;
    qemu_runs++;
    unlink (f->scratch);
    st = tu_run (&out, "qemu-img convert -U -f qcow2 -O raw '%s' '%s'",
                 c->path[i], f->scratch);
    if (st != 0) {
      char msg[1024];
      snprintf (msg, sizeof msg, "%s", out ? out : "");
      free (out);
      case_fail ("qemu-img convert %s (snapshot %s): exit %d: %s",
                 c->path[i], s->name, st, msg);
    }
    free (out);
    n = read_into (f->scratch, k->buf2, f->size);
    if (n != f->size)
      case_fail ("snapshot %s read offline: %" PRIu64 " bytes, want %"
                 PRIu64, s->name, n, f->size);
    unlink (f->scratch);
    {
      char what[64];
      snprintf (what, sizeof what, "snapshot %s read offline", s->name);
      expect_masked (k->buf2, s->data, s->known, f->size, what);
    }
    tu_hashset_add (&passed, key);
  }
}

/*----------------------------------------------------------------------
 * The fixture. */

static void
fx_init (struct fx *f, const struct opdef *op)
{
  memset (f, 0, sizeof *f);
  f->op = op;
  f->size = op->size;
  f->cs = op->cs;
  f->nd = op->nd;
  f->dir = tu_mkdtemp (op->tag);
  f->scratch = tu_path (f->dir, "scratch.raw");
  for (int i = 0; i < f->nd; i++) {
    struct dsk *k = &f->k[i];
    char name[32];
    snprintf (name, sizeof name, "st%d", i);
    k->st = tu_path (f->dir, name);
    snprintf (name, sizeof name, "base%d.raw", i);
    k->base = tu_path (f->dir, name);
    k->live = malloc (f->size);
    k->lk = malloc (f->size);
    k->dur = malloc (f->size);
    k->dk = malloc (f->size);
    k->dirty = malloc (f->size);
    k->buf = malloc (f->size);
    k->buf2 = malloc (f->size);
    assert_true (k->live && k->lk && k->dur && k->dk && k->dirty && k->buf
                 && k->buf2);
  }
}

static void
fx_fini (struct fx *f)
{
  for (int i = 0; i < f->nd; i++) {
    struct dsk *k = &f->k[i];
    for (int j = 0; j < MAX_SNAPS; j++) {
      free (k->snaps[j].data);
      free (k->snaps[j].known);
    }
    if (k->have_old)
      tu_chain_free (&k->old);
    free (k->st);
    free (k->base);
    free (k->base_data);
    free (k->live);
    free (k->lk);
    free (k->dur);
    free (k->dk);
    free (k->dirty);
    free (k->buf);
    free (k->buf2);
  }
  tu_rmtree (f->dir);
  free (f->dir);
  free (f->scratch);
}

/* The top quarter of the disk is left to the operations: it reads the
 * base until they write it. */
static uint64_t
reserved (const struct fx *f)
{
  return f->size / 4 * 3;
}

static void
prep_ok (int r, const char *what)
{
  if (r == -1)
    print_error ("preparing: %s: %s\n", what, cow_last_error ());
  assert_int_equal (r, 0);
}

/* Writes, a zeroed cluster, a partial zero and a trimmed cluster, under
 * the reserved range. */
static void
workload (struct fx *f, struct dsk *k, int writes)
{
  uint64_t lim = reserved (f), off;

  for (int i = 0; i < writes; i++)
    prep_ok (g_rand_write (f, k, lim, 0), "write");
  off = tu_rand_below (&f->seed, lim / f->cs) * f->cs;
  prep_ok (g_zero (f, k, off, f->cs, COW_FLAG_MAY_TRIM), "zero");
  off = tu_rand_below (&f->seed, lim - 5000);
  prep_ok (g_zero (f, k, off, 5000, 0), "zero");
  off = tu_rand_below (&f->seed, lim / f->cs) * f->cs;
  prep_ok (g_trim (f, k, off, f->cs, 0), "trim");
}

static uint64_t
be64_at (const char *path, uint64_t off)
{
  size_t n;
  uint8_t *b = tu_read_file (path, &n);
  uint64_t v = 0;

  assert_true (n >= off + 8);
  for (int i = 0; i < 8; i++)
    v = v << 8 | b[off + (uint64_t) i];
  free (b);
  return v;
}

/* Grow the active layer's file to just under 8 MiB: with 512-byte
 * clusters its first refcount table cluster covers no more. */
static void
fill_near_8m (struct fx *f, struct dsk *k)
{
  struct tu_chain c;
  uint64_t off;

  tu_chain_get (k->d, &c);
  for (off = 0; off + 65536 <= reserved (f); ) {
    uint64_t sz = tu_file_size (c.path[c.n - 1]);
    uint32_t len = sz + 320 * 1024 < (8u << 20) ? 65536 : 4096;
    if (sz >= (8u << 20) - 48 * 1024)
      break;
    prep_ok (g_write (f, k, off, len, 0), "fill");
    off += len;
  }
  assert_true (tu_file_size (c.path[c.n - 1]) >= (8u << 20) - 48 * 1024);
  assert_true (tu_file_size (c.path[c.n - 1]) < (8u << 20));
  tu_chain_free (&c);
}

/* A fresh disk (or two): base, s1, s2, flushed, then unflushed writes. */
static void
prepare (struct fx *f, uint64_t seed)
{
  for (int i = 0; i < f->nd; i++) {
    struct dsk *k = &f->k[i];
    uint64_t s = seed * 7919 + (uint64_t) i * 104729 + 1;

    tu_rmtree (k->st);
    if (k->base_data == NULL) {
      /* The same in every case. */
      uint64_t bs = s ^ 0x5bd1e995u;
      k->base_data = malloc (f->size);
      assert_non_null (k->base_data);
      tu_fill_random (k->base_data, f->size, &bs);
      memset (k->base_data + f->size / 3, 0, 65536 + 511);
    }
    f->seed = s;
    tu_write_file (k->base, k->base_data, f->size);
    m_reset (f, k, k->base_data);
    for (int j = 0; j < MAX_SNAPS; j++)
      k->snaps[j].name[0] = '\0';
    k->n_snaps = 0;
    k->d = open_disk (f, k, true);
    if (k->d == NULL)
      print_error ("open %s: %s\n", k->st, cow_last_error ());
    assert_non_null (k->d);
    assert_int_equal (cow_disk_size (k->d), f->size);
    workload (f, k, 6);
    record_snap (f, k, "s1");
    prep_ok (cow_disk_snapshot (k->d, "s1", NULL), "snapshot s1");
    workload (f, k, 6);
    record_snap (f, k, "s2");
    prep_ok (cow_disk_snapshot (k->d, "s2", NULL), "snapshot s2");
    workload (f, k, 6);
    if (f->op->fill8m)
      fill_near_8m (f, k);
    prep_ok (g_flush (f, k), "flush");
    for (int j = 0; j < 2; j++)
      prep_ok (g_rand_write (f, k, reserved (f), 0), "write");
    if (k->have_old)
      tu_chain_free (&k->old);
    tu_chain_get (k->d, &k->old);
    k->have_old = true;
  }
}

/*----------------------------------------------------------------------
 * The operations (run armed).  Several requests each: the first ones
 * plain, the last with FUA, so that the steps include the metadata the
 * FUA writes out. */

static int
both (int a, int b)
{
  return a == 0 && b == 0 ? 0 : -1;
}

/* Partial clusters over base data: copy-on-write. */
static int
op_write_cow (struct fx *f)
{
  struct dsk *k = &f->k[0];
  uint64_t r0 = reserved (f);
  int a = g_write (f, k, r0 + 1000, 3000, 0);
  int b = g_write (f, k, r0 + 2 * f->cs - 2000, 5000, COW_FLAG_FUA);

  return both (a, b);
}

/* Single clusters, each in its own L2 table, carry the file past 8 MiB:
 * new refcount blocks and a bigger refcount table. */
static int
op_write_grow (struct fx *f)
{
  struct dsk *k = &f->k[0];
  uint64_t r0 = reserved (f);
  int r = 0;

  for (uint64_t i = 0; i < 64; i++)
    if (g_write (f, k, r0 + i * 40960 + (i * 1536) % 32768, 512,
                 i == 63 ? COW_FLAG_FUA : 0) == -1)
      r = -1;
  return r;
}

static int
op_zero (struct fx *f)
{
  struct dsk *k = &f->k[0];
  uint64_t r0 = reserved (f);
  int a = g_zero (f, k, 0, 2 * f->cs, 0);
  int b = g_zero (f, k, r0 + 3 * f->cs + 1000, 2 * f->cs, COW_FLAG_FUA);

  return both (a, b);
}

static int
op_trim (struct fx *f)
{
  struct dsk *k = &f->k[0];
  uint64_t r0 = reserved (f);
  int a = g_trim (f, k, 2 * f->cs, f->cs, 0);
  int b = g_trim (f, k, r0 + 5 * f->cs + 100, 2 * f->cs, COW_FLAG_FUA);

  return both (a, b);
}

static int
op_flush (struct fx *f)
{
  return g_flush (f, &f->k[0]);
}

static int
op_snapshot (struct fx *f)
{
  record_snap (f, &f->k[0], "x");
  return cow_disk_snapshot (f->k[0].d, "x", "under a fault");
}

static int
op_group (struct fx *f)
{
  struct cow_disk *ds[2] = { f->k[0].d, f->k[1].d };

  record_snap (f, &f->k[0], "g");
  record_snap (f, &f->k[1], "g");
  return cow_disk_snapshot_group (ds, 2, "g", NULL);
}

static int
op_revert (struct fx *f)
{
  struct dsk *k = &f->k[0];
  int r = cow_disk_revert (k->d, "s1", true);

  if (r == 0) {
    struct snapm *s = find_snap (k, "s1");
    memcpy (k->live, s->data, f->size);
    memcpy (k->dur, s->data, f->size);
    memcpy (k->lk, s->known, f->size);
    memcpy (k->dk, s->known, f->size);
    memset (k->dirty, 0, f->size);
  }
  return r;
}

static int
job_wait_bounded (struct cow_disk *d)
{
  double t0 = tu_now_s ();

  for (;;) {
    struct cow_job_info i;
    bool running;

    if (cow_disk_job_info (d, &i) == -1)
      case_fail ("cow_disk_job_info: %s", cow_last_error ());
    running = i.state == COW_JOB_RUNNING || i.state == COW_JOB_PAUSED;
    cow_job_info_clear (&i);
    if (!running)
      break;
    if (tu_now_s () - t0 > JOB_TIMEOUT)
      case_fail ("the job still runs after %.0f s", JOB_TIMEOUT);
    nanosleep (&(struct timespec) { .tv_nsec = 200000 }, NULL);
  }
  return cow_disk_job_wait (d);
}

/* A layer word of the operation's job; with 'files', a snapshot name is
 * replaced by the file of its layer in the chain before the operation
 * (the job may have dropped the name when it started). */
static const char *
job_word (const struct dsk *k, const char *w, bool files)
{
  int i;

  if (w == NULL || !files)
    return w;
  i = tu_chain_find (&k->old, w);
  return i >= 0 ? k->old.file[i] : w;
}

static int
start_op_job (struct fx *f, struct dsk *k, bool files)
{
  const struct opdef *op = f->op;
  struct cow_job_opts o = { .top = job_word (k, op->top, files),
                            .base = job_word (k, op->base, files),
                            .allow_base_write = op->base_write,
                            .force = true };

  switch (op->job) {
  case COW_JOB_COMMIT: return cow_disk_commit (k->d, &o);
  case COW_JOB_PULL: return cow_disk_pull (k->d, &o);
  case COW_JOB_DELETE:
    return cow_disk_delete (k->d, job_word (k, op->del, files), &o);
  }
  return -1;
}

static int
op_job (struct fx *f)
{
  struct dsk *k = &f->k[0];
  int r = start_op_job (f, k, false);

  return r == 0 ? job_wait_bounded (k->d) : r;
}

/*----------------------------------------------------------------------
 * A case. */

static void
kill_disks (struct fx *f)
{
  for (int i = 0; i < f->nd; i++) {
    cow_disk_close (f->k[i].d);
    f->k[i].d = NULL;
  }
  disarm ();
}

static void
must (int r, const char *what)
{
  if (r == -1)
    case_fail ("%s failed: %s", what, cow_last_error ());
}

/* A FLUSH succeeded: the disk is not degraded. */
static void
expect_healthy (struct dsk *k, int i)
{
  char *reason = NULL;
  int e = cow_disk_health (k->d, &reason);

  if (e != 0) {
    char msg[512];
    snprintf (msg, sizeof msg, "%s", reason ? reason : "(no reason)");
    free (reason);
    case_fail ("disk %d: FLUSH succeeded but cow_disk_health says %d: %s",
               i, e, msg);
  }
  free (reason);
}

/* The job after the snapshot c1 of variant (a) (other than the failed
 * job started again): delete s1 when its layer lies right under s2's,
 * which leaves the layers that took the faults in the chain, and c1's
 * layer to be read offline after the kill; else delete c1 (which copies
 * c1's layer into the active one). */
static const char *
followup_delete (struct dsk *k)
{
  struct tu_chain c;
  int a, b;

  tu_chain_get (k->d, &c);
  a = tu_chain_find (&c, "s1");
  b = tu_chain_find (&c, "s2");
  tu_chain_free (&c);
  return a >= 0 && b == a + 1 ? "s1" : "c1";
}

/* Variant (a) after the fault is gone: the disk works again. */
static void
continue_after (struct fx *f)
{
  for (int i = 0; i < f->nd; i++) {
    struct dsk *k = &f->k[i];
    must (g_rand_write (f, k, f->size, 0), "a write once the fault is gone");
    must (g_rand_write (f, k, f->size, 0), "a write once the fault is gone");
    must (g_rand_write (f, k, f->size, COW_FLAG_FUA),
          "a FUA write once the fault is gone");
    must (g_flush (f, k), "FLUSH once the fault is gone");
    expect_healthy (k, i);
    record_snap (f, k, "c1");
  }
  if (f->nd == 2) {
    struct cow_disk *ds[2] = { f->k[0].d, f->k[1].d };
    must (cow_disk_snapshot_group (ds, 2, "c1", NULL),
          "a group snapshot once the fault is gone");
  }
  else
    must (cow_disk_snapshot (f->k[0].d, "c1", NULL),
          "a snapshot once the fault is gone");
  for (int i = 0; i < f->nd; i++) {
    struct dsk *k = &f->k[i];
    struct cow_job_opts o = { .force = true };
    const char *del = NULL;
    int r;
    /* The failed job again (its layers named by file: a name it dropped
     * when it started is gone), else a delete. */
    f->restarted = f->op->kind == OP_JOB && f->op_r == -1;
    c_restarted += f->restarted;
    if (!f->restarted)
      del = followup_delete (k);
    r = f->restarted ? start_op_job (f, k, true)
      : cow_disk_delete (k->d, del, &o);
    must (r, f->restarted ? "starting the failed job again"
          : "starting the delete (of s1, or else c1)");
    must (job_wait_bounded (k->d), f->restarted ? "the failed job started "
          "again" : "the delete (of s1, or else c1)");
    must (g_flush (f, k), "FLUSH after the job");
    must (g_rand_write (f, k, f->size, 0), "a write after the job");
    read_disk (f, k, k->buf, "the disk once the fault is gone");
    expect_masked (k->buf, k->live, k->lk, f->size,
                   "the disk once the fault is gone");
    /* Left unflushed for the kill. */
    must (g_rand_write (f, k, f->size, 0), "a write before the kill");
  }
}

static bool
chain_has (const struct tu_chain *c, const char *name)
{
  return tu_chain_find (c, name) >= 0;
}

static bool
chain_has_file (const struct tu_chain *c, const char *file)
{
  for (size_t i = 0; i < c->n; i++)
    if (strcmp (c->file[i], file) == 0)
      return true;
  return false;
}

/* A successful operation left the snapshot names and layers it implies
 * (c: the chain now). */
static void
check_op_result (struct fx *f, struct dsk *k, int i, const struct tu_chain *c,
                 const char *when)
{
  for (size_t j = 0; j < k->old.n; j++)
    if ((f->op->removed >> j & 1) && chain_has_file (c, k->old.file[j])) {
      tu_chain_print (&k->old, "  before");
      tu_chain_print (c, "  now");
      case_fail ("disk %d, %s: layer %s is still in the chain after the "
                 "operation succeeded", i, when, k->old.file[j]);
    }
  for (int j = 0; j < 3; j++) {
    if (f->op->present[j] && !chain_has (c, f->op->present[j])) {
      tu_chain_print (c, "  chain");
      case_fail ("disk %d, %s: snapshot %s is gone after the operation "
                 "succeeded", i, when, f->op->present[j]);
    }
    if (f->op->absent[j] && chain_has (c, f->op->absent[j])) {
      tu_chain_print (c, "  chain");
      case_fail ("disk %d, %s: snapshot %s is still there after the "
                 "operation succeeded", i, when, f->op->absent[j]);
    }
  }
}

/* After the kill: reopen, check, close cleanly, reopen, read the same. */
static void
check_after_kill (struct fx *f)
{
  struct tu_chain c[2];
  char *reason = NULL;

  for (int i = 0; i < f->nd; i++) {
    struct dsk *k = &f->k[i];
    bool reverted = false;
    k->d = open_disk (f, k, false);
    if (k->d == NULL)
      case_fail ("disk %d: reopening after the kill: %s", i,
                 cow_last_error ());
    if (cow_disk_health (k->d, &reason) != 0) {
      char msg[512];
      snprintf (msg, sizeof msg, "%s", reason ? reason : "(no reason)");
      free (reason);
      case_fail ("disk %d: degraded right after opening: %s", i, msg);
    }
    free (reason);
    tu_chain_get (k->d, &c[i]);
    read_disk (f, k, k->buf, "the disk after the kill");
    /* A revert that failed in its manifest save after the rename may
     * leave either manifest on disk, so a kill may find either chain:
     * the old one (s2 there) or the reverted one.  In variants (a) and
     * (d) a FLUSH succeeded first, which saved the old chain again. */
    if (f->op->kind == OP_REVERT && f->op_r == -1 && !f->repaired
        && !chain_has (&c[i], "s2")) {
      struct snapm *s = find_snap (k, "s1");
      reverted = true;
      c_reverted++;
      expect_masked (k->buf, s->data, s->known, f->size,
                     "the reverted disk after a failed revert and a kill");
    }
    if (!reverted)
      expect_masked (k->buf, k->dur, k->dk, f->size,
                     "acknowledged data after the kill");
    /* Not after (a): its snapshot c1 may take the file name of a layer
     * the operation removed, and its job may delete s1. */
    if (f->op_r == 0 && !f->cont)
      check_op_result (f, k, i, &c[i], "after the kill");
    check_dir (k, &c[i]);
    m_reset (f, k, k->buf);
  }
  for (int i = 0; i < f->nd; i++) {
    struct dsk *k = &f->k[i];
    int r = cow_disk_close (k->d);
    k->d = NULL;
    if (r == -1)
      case_fail ("disk %d: a clean close after the reopen: %s", i,
                 cow_last_error ());
  }
  for (int i = 0; i < f->nd; i++) {
    struct dsk *k = &f->k[i];
    check_snapshots (f, k, &c[i]);
    tu_chain_free (&c[i]);
    c[i].n = 0;
    k->d = open_disk (f, k, false);
    if (k->d == NULL)
      case_fail ("disk %d: reopening after a clean close: %s", i,
                 cow_last_error ());
    read_disk (f, k, k->buf2, "the disk after a clean close and reopen");
    expect_masked (k->buf2, k->live, k->lk, f->size,
                   "the disk after a clean close and reopen");
    if (cow_disk_close (k->d) == -1) {
      k->d = NULL;
      case_fail ("disk %d: the last close: %s", i, cow_last_error ());
    }
    k->d = NULL;
  }
}

enum variant {
  V_CONTINUE, V_KILL, V_MANIFEST, V_RECOVER, V_TRANSIENT, N_VARIANTS
};

static const char *const vname[] = {
  [V_CONTINUE] = "(a) continue",
  [V_KILL] = "(b) kill while faulted",
  [V_MANIFEST] = "(c) manifest still failing",
  [V_RECOVER] = "(d) FLUSH once the fault is gone, then kill",
  [V_TRANSIENT] = "(e) step N alone fails, then kill",
};

/* Variant (c), for a disk the operation left degraded: the layers work
 * again but the manifest still cannot be saved, so FLUSH and FUA must
 * still fail (invariant 7); with the failure everywhere, as in (b), this
 * is never put to the test. */
static void
manifest_still_failing (struct fx *f, const bool *degraded)
{
  fio_arm (&(struct fio_fault) { .at = 0, .err = fio_current ().err,
                                 .ops = FIO_ALL, .filter = is_manifest_op });
  for (int i = 0; i < f->nd; i++) {
    struct dsk *k = &f->k[i];
    g_rand_write (f, k, f->size, 0);
    if (g_flush (f, k) == 0 && degraded[i])
      case_fail ("disk %d: FLUSH answered success while the manifest "
                 "cannot be saved (the disk was degraded)", i);
    if (g_rand_write (f, k, f->size, COW_FLAG_FUA) == 0 && degraded[i])
      case_fail ("disk %d: a FUA write answered success while the "
                 "manifest cannot be saved (the disk was degraded)", i);
  }
}

/* See run_case. */
static int
case_body (struct fx *f, long n, int err, enum variant v)
{
  const struct opdef *op = f->op;
  bool degraded[2] = { false, false }, any = false;

  prepare (f, op_seed (op));
  fio_arm (&(struct fio_fault) { .at = n, .err = err, .ops = FIO_ALL,
                                 .once = v == V_TRANSIENT });
  f->op_r = op->run (f);
  if (f->op_r == -1)
    snprintf (f->op_err, sizeof f->op_err, "%s (errno %d)", cow_last_error (),
              cow_last_errno ());
  for (int i = 0; i < f->nd; i++) {
    char *reason = NULL;
    degraded[i] = cow_disk_health (f->k[i].d, &reason) != 0;
    any |= degraded[i];
    free (reason);
    if (f->op_r == 0) {
      struct tu_chain c;
      tu_chain_get (f->k[i].d, &c);
      check_op_result (f, &f->k[i], i, &c, "right after it");
      tu_chain_free (&c);
    }
  }
  if (v == V_MANIFEST && !any) {
    disarm ();
    for (int i = 0; i < f->nd; i++) {
      cow_disk_close (f->k[i].d);
      f->k[i].d = NULL;
    }
    return -1;
  }
  c_op_failed += f->op_r == -1;
  c_degraded += any;
  c_unreached += fio_failed () == 0;
  if (v == V_MANIFEST)
    manifest_still_failing (f, degraded);
  else if (v != V_TRANSIENT)
    /* Still armed: a write and a FLUSH, whatever they answer. */
    for (int i = 0; i < f->nd; i++) {
      g_rand_write (f, &f->k[i], f->size, 0);
      g_flush (f, &f->k[i]);
    }
  if (v == V_CONTINUE) {
    disarm ();
    continue_after (f);
  }
  else if (v == V_RECOVER) {
    /* What the failed flushes left undone, the first good one does: a
     * later write would often redo it (each writes whole tables), so
     * the kill comes right after. */
    disarm ();
    for (int i = 0; i < f->nd; i++) {
      must (g_flush (f, &f->k[i]), "FLUSH once the fault is gone");
      expect_healthy (&f->k[i], i);
    }
  }
  /* The kill: everything fails. */
  arm (0, EIO);
  kill_disks (f);
  check_after_kill (f);
  return 1;
}

/* 1: ran, 0: failed (reported already), -1: not applicable (variant (c)
 * when the operation left no disk degraded). */
static int
run_case (struct fx *f, long n, long steps, int err, enum variant v)
{
  static const char *const ename[] = { [EIO] = "EIO", [ENOSPC] = "ENOSPC" };

  snprintf (f->what, sizeof f->what, "%s: step %ld of %ld, %s, variant %s",
            f->op->tag, n, steps, ename[err], vname[v]);
  f->cont = v == V_CONTINUE;
  f->repaired = v == V_CONTINUE || v == V_RECOVER;
  f->op_r = 0;
  f->op_err[0] = '\0';
  f->restarted = false;
  cur = f;
  if (setjmp (case_jmp)) {
    disarm ();
    for (int i = 0; i < f->nd; i++)
      if (f->k[i].d) {
        cow_disk_close (f->k[i].d);
        f->k[i].d = NULL;
      }
    return 0;
  }
  return case_body (f, n, err, v);
}

/*----------------------------------------------------------------------
 * The sweep of one operation. */

struct opstat {
  long steps, sampled, cases, failed;
  /* Coverage: the operation failed; the disk was degraded after it; the
   * fault was never reached; a kill found the reverted chain after a
   * failed revert; the failed job was started again. */
  long op_failed, degraded, unreached, reverted, restarted;
  long by_variant[N_VARIANTS];
  double secs;
  unsigned long qemu;
};

static struct opstat stats[16];

/* The write-side steps of the operation, run without a fault. */
static long
count_steps (struct fx *f)
{
  struct tu_chain c;
  uint64_t reft = 0;
  long steps;
  int r;

  prepare (f, op_seed (f->op));
  tu_chain_get (f->k[0].d, &c);
  if (f->op->fill8m)
    reft = be64_at (c.path[c.n - 1], 48);
  arm (LONG_MAX / 2, EIO);
  r = f->op->run (f);
  steps = fio_steps ();
  disarm ();
  if (r == -1)
    print_error ("%s: %s\n", f->op->tag, cow_last_error ());
  assert_int_equal (r, 0);
  if (f->op->fill8m) {
    /* The operation did move the refcount table. */
    uint64_t now = be64_at (c.path[c.n - 1], 48);
    if (now == reft)
      print_error ("%s: the refcount table is still at %" PRIu64 "\n",
                   f->op->tag, reft);
    assert_true (now != reft);
  }
  tu_chain_free (&c);
  for (int i = 0; i < f->nd; i++) {
    assert_int_equal (cow_disk_close (f->k[i].d), 0);
    f->k[i].d = NULL;
  }
  return steps;
}

static long
dry_run (struct fx *f)
{
  snprintf (f->what, sizeof f->what, "%s: dry run", f->op->tag);
  cur = f;
  if (setjmp (case_jmp))
    fail ();
  return count_steps (f);
}

/* The steps to fail at: all when few; else the first FIRST_STEPS, the
 * last END_WINDOW (the chain switch, manifest save, backing-name rewrite,
 * file deletions) and evenly spread ones between. */
static long
sample_steps (long steps, long *out)
{
  long n = 0, lo = FIRST_STEPS, hi = steps - END_WINDOW, mid;

  if (steps <= MAX_STEPS) {
    for (long i = 0; i < steps; i++)
      out[n++] = i;
    return n;
  }
  for (long i = 0; i < lo; i++)
    out[n++] = i;
  mid = MAX_STEPS - FIRST_STEPS - END_WINDOW;
  for (long i = 0; i < mid; i++) {
    long s = lo + (hi - lo) * i / mid;
    if (s > out[n - 1])
      out[n++] = s;
  }
  for (long i = hi; i < steps; i++)
    if (i > out[n - 1])
      out[n++] = i;
  return n;
}

static void
sweep (const struct opdef *op)
{
  static const int errs[] = { EIO, ENOSPC };
  struct fx f;
  long steps, ns, sample[MAX_STEPS + 1];
  struct opstat *st = &stats[op->index];
  double t0 = tu_now_s ();

  io_set_ops (fio_ops ());
  disarm ();
  passed.n = 0;
  qemu_runs = 0;
  n_fails = 0;
  fail_ids[0] = '\0';
  c_op_failed = c_degraded = c_unreached = c_reverted = c_restarted = 0;
  fx_init (&f, op);
  steps = dry_run (&f);
  ns = sample_steps (steps, sample);
  st->steps = steps;
  st->sampled = ns;
  for (long i = 0; i < ns; i++)
    for (size_t e = 0; e < sizeof errs / sizeof errs[0]; e++)
      for (int v = 0; v < N_VARIANTS; v++) {
        int r = run_case (&f, sample[i], steps, errs[e], (enum variant) v);
        if (r == -1)
          continue;
        st->failed += r == 0;
        st->cases++;
        st->by_variant[v]++;
      }
  st->secs = tu_now_s () - t0;
  st->qemu = qemu_runs;
  st->op_failed = c_op_failed;
  st->degraded = c_degraded;
  st->unreached = c_unreached;
  st->reverted = c_reverted;
  st->restarted = c_restarted;
  print_message ("%s: %ld write-side steps, %ld sampled, %ld cases, %ld "
                 "failed, %lu qemu-img runs, %.1f s\n"
                 "  the operation failed in %ld, left the disk degraded in "
                 "%ld, never reached its fault in %ld; a kill found the "
                 "reverted chain in %ld; the failed job started again in "
                 "%ld\n", op->tag, steps, ns, st->cases, st->failed,
                 qemu_runs, st->secs, c_op_failed, c_degraded, c_unreached,
                 c_reverted, c_restarted);
  if (n_fails) {
    print_error ("%s: %lu failing cases%s:\n%s", op->tag, n_fails,
                 n_fails > MAX_FAILS_SHOWN ? " (the first ones detailed "
                 "above)" : "", fail_ids);
  }
  fx_fini (&f);
  io_set_ops (NULL);
  assert_int_equal (n_fails, 0);
}

#define MIB (1ull << 20)

static const struct opdef ops[] = {
  { .index = 0, .tag = "write-cow", .kind = OP_IO, .run = op_write_cow,
    .size = 2 * MIB, .cs = 65536, .nd = 1 },
  { .index = 1, .tag = "write-grow-reftable", .kind = OP_IO,
    .run = op_write_grow, .size = 12 * MIB, .cs = 512, .nd = 1,
    .fill8m = true, .cache = 2 * MIB },
  { .index = 2, .tag = "zero", .kind = OP_IO, .run = op_zero,
    .size = 2 * MIB, .cs = 65536, .nd = 1 },
  { .index = 3, .tag = "trim", .kind = OP_IO, .run = op_trim,
    .size = 2 * MIB, .cs = 65536, .nd = 1 },
  { .index = 4, .tag = "flush", .kind = OP_FLUSH, .run = op_flush,
    .size = 2 * MIB, .cs = 65536, .nd = 1 },
  { .index = 5, .tag = "snapshot", .kind = OP_SNAP, .run = op_snapshot,
    .size = 2 * MIB, .cs = 65536, .nd = 1, .present = { "x", "s1", "s2" } },
  { .index = 6, .tag = "snapshot-group", .kind = OP_GROUP, .run = op_group,
    .size = 2 * MIB, .cs = 65536, .nd = 2, .present = { "g", "s1", "s2" } },
  { .index = 7, .tag = "revert", .kind = OP_REVERT, .run = op_revert,
    .size = 2 * MIB, .cs = 65536, .nd = 1, .present = { "s1" },
    .absent = { "s2" }, .removed = 6 },
  { .index = 8, .tag = "commit-frozen", .kind = OP_JOB, .run = op_job,
    .size = 2 * MIB, .cs = 65536, .nd = 1, .job = COW_JOB_COMMIT,
    .top = "s2", .present = { "s2" }, .absent = { "s1" }, .removed = 2 },
  { .index = 9, .tag = "commit-active", .kind = OP_JOB, .run = op_job,
    .size = 2 * MIB, .cs = 65536, .nd = 1, .job = COW_JOB_COMMIT,
    .top = "active", .base = "s2", .present = { "s1" }, .absent = { "s2" },
    .removed = 4 },
  { .index = 10, .tag = "commit-base", .kind = OP_JOB, .run = op_job,
    .size = 2 * MIB, .cs = 65536, .nd = 1, .job = COW_JOB_COMMIT,
    .top = "s1", .base = "base", .base_write = true, .present = { "s2" },
    .absent = { "s1" }, .removed = 1 },
  { .index = 11, .tag = "pull-base", .kind = OP_JOB, .run = op_job,
    .size = 2 * MIB, .cs = 65536, .nd = 1, .job = COW_JOB_PULL,
    .base = "s1", .present = { "s1" }, .absent = { "s2" }, .removed = 2 },
  { .index = 12, .tag = "pull-self-contained", .kind = OP_JOB, .run = op_job,
    .size = 2 * MIB, .cs = 65536, .nd = 1, .job = COW_JOB_PULL,
    .absent = { "s1", "s2" }, .removed = 3 },
  { .index = 13, .tag = "delete", .kind = OP_JOB, .run = op_job,
    .size = 2 * MIB, .cs = 65536, .nd = 1, .job = COW_JOB_DELETE,
    .del = "s1", .present = { "s2" }, .absent = { "s1" }, .removed = 1 },
};
static const size_t n_ops = sizeof ops / sizeof ops[0];

static void t_write_cow (void **s) { (void) s; sweep (&ops[0]); }
static void t_write_grow (void **s) { (void) s; sweep (&ops[1]); }
static void t_zero (void **s) { (void) s; sweep (&ops[2]); }
static void t_trim (void **s) { (void) s; sweep (&ops[3]); }
static void t_flush (void **s) { (void) s; sweep (&ops[4]); }
static void t_snapshot (void **s) { (void) s; sweep (&ops[5]); }
static void t_snapshot_group (void **s) { (void) s; sweep (&ops[6]); }
static void t_revert (void **s) { (void) s; sweep (&ops[7]); }
static void t_commit_frozen (void **s) { (void) s; sweep (&ops[8]); }
static void t_commit_active (void **s) { (void) s; sweep (&ops[9]); }
static void t_commit_base (void **s) { (void) s; sweep (&ops[10]); }
static void t_pull_base (void **s) { (void) s; sweep (&ops[11]); }
static void t_pull_self (void **s) { (void) s; sweep (&ops[12]); }
static void t_delete (void **s) { (void) s; sweep (&ops[13]); }

int
main (int argc, char **argv)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test (t_write_cow),
    cmocka_unit_test (t_write_grow),
    cmocka_unit_test (t_zero),
    cmocka_unit_test (t_trim),
    cmocka_unit_test (t_flush),
    cmocka_unit_test (t_snapshot),
    cmocka_unit_test (t_snapshot_group),
    cmocka_unit_test (t_revert),
    cmocka_unit_test (t_commit_frozen),
    cmocka_unit_test (t_commit_active),
    cmocka_unit_test (t_commit_base),
    cmocka_unit_test (t_pull_base),
    cmocka_unit_test (t_pull_self),
    cmocka_unit_test (t_delete),
  };
  long total = 0;
  int r;

  if (argc > 1)
    cmocka_set_test_filter (argv[1]);
  r = cmocka_run_group_tests (tests, NULL, NULL);
  print_message ("\nCases run (operation x step x errno x variant; (c) "
                 "only where the operation left the disk degraded):\n");
  for (size_t i = 0; i < n_ops; i++) {
    if (stats[i].cases == 0)
      continue;
    print_message ("  %-20s %4ld cases: %3ld of %3ld steps x 2 errnos x "
                   "(a+b+c+d+e = %ld+%ld+%ld+%ld+%ld); %ld failed; %.1f s\n",
                   ops[i].tag, stats[i].cases, stats[i].sampled,
                   stats[i].steps, stats[i].by_variant[0],
                   stats[i].by_variant[1], stats[i].by_variant[2],
                   stats[i].by_variant[3], stats[i].by_variant[4],
                   stats[i].failed, stats[i].secs);
    total += stats[i].cases;
  }
  print_message ("  total %ld cases\n", total);
  return r;
}
