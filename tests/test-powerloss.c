/* SPDX-License-Identifier: BSD-3-Clause */
/* Power loss and I/O errors, simulated through the I/O seam.
 *
 * The simulated storage.  Every pwrite, fallocate (punch hole) and
 * ftruncate of the engine goes to the real file, and is also logged per
 * file with the bytes it replaced (an undo log) and the bytes it wrote.
 * fsync makes the file's log durable (the log is dropped; the real
 * fdatasync is skipped: the simulation is the storage, and the test runs
 * fast).  A "power loss" at a random point:
 *
 *   1. from then on every I/O call fails with EIO (the engine cannot
 *      write anything more, as after a real power cut), the engine's
 *      disk is closed (its final flush fails) and the real I/O restored;
 *   2. each file is rolled back to its last synced state by undoing its
 *      log in reverse order (exact, since each entry saved what it
 *      overwrote, file size included);
 *   3. the unsynced changes are replayed forward, each one kept,
 *      dropped or torn (only some of its 512-byte sectors), at random.
 *      Undo-all-then-redo is what makes this right: undoing the dropped
 *      entries in place, in reverse, would put back old bytes over a
 *      later entry that was kept.
 *
 * Half of the crashes use another model of the disk instead of step 3:
 * every sector independently ends up as it was after some prefix of the
 * writes that touched it (a page cache written back at any moment, which
 * never persists a later write to a sector without the earlier ones).
 *
 * The workload runs random writes, zeroes and trims, FUA writes and
 * flushes through the public API, and keeps a model of what is durable:
 * everything answered before a successful flush, and each successful FUA
 * request.  After the crash the disk is reopened; every byte must hold
 * its durable value, or a value some request after the last flush wrote
 * there; `qemu-img check` must find no corruption (leaked clusters are
 * allowed, and counted).
 *
 * The same seam injects EIO and ENOSPC at the Nth pwrite: the request
 * fails with that errno and a message, the disk works again afterwards,
 * and flushed data survive a crash after it.
 */
#undef NDEBUG
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>

#include "cowchain.h"
#include "io.h"
#include "faultio.h"
#include "testutil.h"

#define SECTOR 512

static char *dir;
static char *base_path;

/* Outside the simulation: the real calls, without the cost of fdatasync
 * (durability is what the simulation checks): fio_quick_ops. */
static uint8_t *base_data;
static const uint64_t base_size = 3u << 20;

/*----------------------------------------------------------------------
 * The simulated storage. */

enum ent_kind { ENT_WRITE, ENT_PUNCH, ENT_TRUNC };

struct ent {
  enum ent_kind kind;
  uint64_t off, len;        /* TRUNC: off = new size, len = 0 */
  uint64_t old_size;        /* file size before */
  uint8_t *old;             /* bytes [off, off+len) before (zero past EOF);
                             * TRUNC: [new size, old size) */
  uint8_t *data;            /* WRITE: bytes written */
};

struct simfile {
  char *path;
  struct ent *log;
  size_t n, cap;
  size_t total_ents;        /* statistics */
};

#define MAX_FILES 16
#define MAX_FDS 1024

static struct {
  pthread_mutex_t lock;
  struct simfile files[MAX_FILES];
  size_t n_files;
  struct simfile *fds[MAX_FDS];
  bool crashed;
  /* Crash: count down mutating calls once armed; 0 = crash now. */
  bool crash_armed;
  long crash_countdown;
  /* Error injection: fail the pwrite number err_at (counted from 1)
   * and err_burst - 1 more with err_errno. */
  long pwrites;
  long err_at, err_burst;
  int err_errno;
  long errors_injected;
} sim = { .lock = PTHREAD_MUTEX_INITIALIZER };

static struct simfile *
sim_file (const char *path)
{
  for (size_t i = 0; i < sim.n_files; i++)
    if (strcmp (sim.files[i].path, path) == 0)
      return &sim.files[i];
  assert_true (sim.n_files < MAX_FILES);
  sim.files[sim.n_files].path = strdup (path);
  return &sim.files[sim.n_files++];
}

static void
ent_free (struct ent *e)
{
  free (e->old);
  free (e->data);
}

static void
sim_reset (void)
{
  for (size_t i = 0; i < sim.n_files; i++) {
    for (size_t j = 0; j < sim.files[i].n; j++)
      ent_free (&sim.files[i].log[j]);
    free (sim.files[i].log);
    free (sim.files[i].path);
  }
  memset (sim.files, 0, sizeof sim.files);
  sim.n_files = 0;
  memset (sim.fds, 0, sizeof sim.fds);
  sim.crashed = false;
  sim.crash_armed = false;
  sim.crash_countdown = 0;
  sim.pwrites = 0;
  sim.err_at = 0;
  sim.err_burst = 0;
  sim.err_errno = 0;
  sim.errors_injected = 0;
}

static void
log_push (struct simfile *f, struct ent e)
{
  if (f->n == f->cap) {
    f->cap = f->cap ? 2 * f->cap : 64;
    f->log = realloc (f->log, f->cap * sizeof *f->log);
    assert_non_null (f->log);
  }
  f->log[f->n++] = e;
  f->total_ents++;
}

static uint64_t
fd_size (int fd)
{
  struct stat st;

  assert_int_equal (fstat (fd, &st), 0);
  return (uint64_t) st.st_size;
}

/* The old bytes of [off, off+len): zero past the end of the file. */
static uint8_t *
read_old (int fd, uint64_t off, uint64_t len, uint64_t size)
{
  uint8_t *b = calloc (1, len ? len : 1);

  assert_non_null (b);
  if (off < size) {
    uint64_t n = size - off < len ? size - off : len;
    assert_int_equal (pread (fd, b, n, (off_t) off), (ssize_t) n);
  }
  return b;
}

/* A mutating call: may be the one where the power goes. */
static bool
crash_point (void)
{
  if (sim.crashed)
    return true;
  if (sim.crash_armed && sim.crash_countdown-- <= 0) {
    sim.crashed = true;
    return true;
  }
  return false;
}

static int
sim_open (const char *path, int flags, mode_t mode)
{
  int fd;

  pthread_mutex_lock (&sim.lock);
  if (sim.crashed) {
    pthread_mutex_unlock (&sim.lock);
    errno = EIO;
    return -1;
  }
  fd = io_real_ops.open (path, flags, mode);
  if (fd >= 0) {
    assert_true (fd < MAX_FDS);
    sim.fds[fd] = sim_file (path);
  }
  pthread_mutex_unlock (&sim.lock);
  return fd;
}

static int
sim_close (int fd)
{
  pthread_mutex_lock (&sim.lock);
  if (fd >= 0 && fd < MAX_FDS)
    sim.fds[fd] = NULL;
  pthread_mutex_unlock (&sim.lock);
  /* Closing never fails, crashed or not: the fd must go. */
  return io_real_ops.close (fd);
}

static ssize_t
sim_pread (int fd, void *buf, size_t count, off_t offset)
{
  if (__atomic_load_n (&sim.crashed, __ATOMIC_ACQUIRE)) {
    errno = EIO;
    return -1;
  }
  return io_real_ops.pread (fd, buf, count, offset);
}

static ssize_t
sim_pwrite (int fd, const void *buf, size_t count, off_t offset)
{
  struct simfile *f;
  struct ent e = { .kind = ENT_WRITE };
  ssize_t r;

  pthread_mutex_lock (&sim.lock);
  if (crash_point ()) {
    pthread_mutex_unlock (&sim.lock);
    errno = EIO;
    return -1;
  }
  sim.pwrites++;
  if (sim.err_at && sim.pwrites >= sim.err_at
      && sim.pwrites < sim.err_at + sim.err_burst) {
    sim.errors_injected++;
    pthread_mutex_unlock (&sim.lock);
    errno = sim.err_errno;
    return -1;
  }
  f = sim.fds[fd];
  assert_non_null (f);
  e.off = (uint64_t) offset;
  e.len = count;
  e.old_size = fd_size (fd);
  e.old = read_old (fd, e.off, e.len, e.old_size);
  e.data = malloc (count ? count : 1);
  assert_non_null (e.data);
  memcpy (e.data, buf, count);
  r = io_real_ops.pwrite (fd, buf, count, offset);
  assert_int_equal (r, (ssize_t) count);
  log_push (f, e);
  pthread_mutex_unlock (&sim.lock);
  return r;
}

static int
sim_fsync (int fd)
{
  struct simfile *f;

  pthread_mutex_lock (&sim.lock);
  if (crash_point ()) {
    pthread_mutex_unlock (&sim.lock);
    errno = EIO;
    return -1;
  }
  f = sim.fds[fd];
  assert_non_null (f);
  for (size_t i = 0; i < f->n; i++)
    ent_free (&f->log[i]);
  f->n = 0;
  pthread_mutex_unlock (&sim.lock);
  return 0;
}

static int
sim_fallocate (int fd, int mode, off_t offset, off_t len)
{
  struct simfile *f;
  struct ent e = { .kind = ENT_PUNCH };
  int r;

  pthread_mutex_lock (&sim.lock);
  if (crash_point ()) {
    pthread_mutex_unlock (&sim.lock);
    errno = EIO;
    return -1;
  }
  /* The engine only punches holes (keeping the size). */
  assert_int_equal (mode, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE);
  f = sim.fds[fd];
  assert_non_null (f);
  e.old_size = fd_size (fd);
  e.off = (uint64_t) offset;
  e.len = e.off < e.old_size
    ? ((uint64_t) len < e.old_size - e.off ? (uint64_t) len : e.old_size - e.off)
    : 0;
  e.old = read_old (fd, e.off, e.len, e.old_size);
  r = io_real_ops.fallocate (fd, mode, offset, len);
  if (r == 0)
    log_push (f, e);
  else
    ent_free (&e);
  pthread_mutex_unlock (&sim.lock);
  return r;
}

static int
sim_ftruncate (int fd, off_t length)
{
  struct simfile *f;
  struct ent e = { .kind = ENT_TRUNC };
  int r;

  pthread_mutex_lock (&sim.lock);
  if (crash_point ()) {
    pthread_mutex_unlock (&sim.lock);
    errno = EIO;
    return -1;
  }
  f = sim.fds[fd];
  assert_non_null (f);
  e.old_size = fd_size (fd);
  e.off = (uint64_t) length;
  if (e.off < e.old_size)
    e.old = read_old (fd, e.off, e.old_size - e.off, e.old_size);
  r = io_real_ops.ftruncate (fd, length);
  if (r == 0)
    log_push (f, e);
  else
    ent_free (&e);
  pthread_mutex_unlock (&sim.lock);
  return r;
}

static int
sim_rename (const char *from, const char *to)
{
  if (sim.crashed) {
    errno = EIO;
    return -1;
  }
  return io_real_ops.rename (from, to);
}

static int
sim_rename_noreplace (const char *from, const char *to)
{
  if (sim.crashed) {
    errno = EIO;
    return -1;
  }
  return io_real_ops.rename_noreplace (from, to);
}

static int
sim_unlink (const char *path)
{
  if (sim.crashed) {
    errno = EIO;
    return -1;
  }
  return io_real_ops.unlink (path);
}

static const struct io_ops sim_ops = {
  .open = sim_open,
  .close = sim_close,
  .pread = sim_pread,
  .pwrite = sim_pwrite,
  .fsync = sim_fsync,
  .ftruncate = sim_ftruncate,
  .fallocate = sim_fallocate,
  .rename = sim_rename,
  .rename_noreplace = sim_rename_noreplace,
  .unlink = sim_unlink,
};

/* Write [off, off+len) of buf (NULL: zeroes) restricted to [lo, hi). */
static void
put_part (int fd, const uint8_t *buf, uint64_t off, uint64_t len,
          uint64_t lo, uint64_t hi)
{
  static const uint8_t zeroes[SECTOR];
  uint64_t a = off > lo ? off : lo;
  uint64_t b = off + len < hi ? off + len : hi;

  if (a >= b)
    return;
  if (buf)
    assert_int_equal (pwrite (fd, buf + (a - off), b - a, (off_t) a),
                      (ssize_t) (b - a));
  else
    for (uint64_t p = a; p < b; ) {
      uint64_t n = b - p < SECTOR ? b - p : SECTOR;
      assert_int_equal (pwrite (fd, zeroes, n, (off_t) p), (ssize_t) n);
      p += n;
    }
}

/* Apply entry e, restricted to the file range [lo, hi). */
static void
redo (int fd, const struct ent *e, uint64_t lo, uint64_t hi)
{
  switch (e->kind) {
  case ENT_WRITE:
    put_part (fd, e->data, e->off, e->len, lo, hi);
    break;
  case ENT_PUNCH:
    put_part (fd, NULL, e->off, e->len, lo, hi);
    break;
  case ENT_TRUNC:
    if (lo == 0 && hi == UINT64_MAX)
      assert_int_equal (ftruncate (fd, (off_t) e->off), 0);
    break;
  }
}

struct crash_stats {
  long kept, dropped, torn, entries;
};

/* Per-sector model: sector -> how many log entries touch it, and the
 * cut chosen for it.  Open addressing. */
struct sect {
  uint64_t sector;          /* UINT64_MAX = empty */
  uint32_t touches, cut, seen;
};

static struct sect *
sect_find (struct sect *t, size_t cap, uint64_t s)
{
  size_t h = (size_t) ((s * 0x9e3779b97f4a7c15ull) >> 20) & (cap - 1);

  while (t[h].sector != UINT64_MAX && t[h].sector != s)
    h = (h + 1) & (cap - 1);
  if (t[h].sector == UINT64_MAX) {
    t[h].sector = s;
    t[h].touches = t[h].cut = t[h].seen = 0;
  }
  return &t[h];
}

/* Steps 2 and 3 of a power loss for one file (see the top). */
static void
crash_file (struct simfile *f, uint64_t *seed, bool per_sector,
            struct crash_stats *st)
{
  int fd;

  if (f->n == 0)
    return;
  fd = open (f->path, O_RDWR | O_CLOEXEC);
  assert_true (fd >= 0);
  /* Back to the last synced state. */
  for (size_t i = f->n; i-- > 0; ) {
    const struct ent *e = &f->log[i];
    switch (e->kind) {
    case ENT_WRITE:
    case ENT_PUNCH:
      put_part (fd, e->old, e->off, e->len, 0, e->old_size);
      assert_int_equal (ftruncate (fd, (off_t) e->old_size), 0);
      break;
    case ENT_TRUNC:
      assert_int_equal (ftruncate (fd, (off_t) e->old_size), 0);
      if (e->old)
        put_part (fd, e->old, e->off, e->old_size - e->off, 0, UINT64_MAX);
      break;
    }
  }
  st->entries += (long) f->n;

  if (!per_sector) {
    /* Each unsynced change: kept, dropped or torn. */
    for (size_t i = 0; i < f->n; i++) {
      const struct ent *e = &f->log[i];
      uint64_t d = tu_rand_below (seed, 10);
      if (d < 4) {
        redo (fd, e, 0, UINT64_MAX);
        st->kept++;
      }
      else if (d < 8 || e->kind == ENT_TRUNC || e->len == 0)
        st->dropped++;
      else {
        uint64_t s0 = e->off / SECTOR, s1 = (e->off + e->len - 1) / SECTOR;
        for (uint64_t s = s0; s <= s1; s++)
          if (tu_rand_below (seed, 2))
            redo (fd, e, s * SECTOR, (s + 1) * SECTOR);
        st->torn++;
      }
    }
  }
  else {
    /* Each sector as after a random prefix of the changes touching it
     * (truncations are kept or dropped as a whole, in order). */
    size_t cap = 1024;
    size_t used = 0;
    struct sect *t;

    for (size_t i = 0; i < f->n; i++)
      if (f->log[i].len)
        used += (size_t) ((f->log[i].off + f->log[i].len - 1) / SECTOR
                          - f->log[i].off / SECTOR + 1);
    while (cap < 2 * used + 16)
      cap *= 2;
    t = malloc (cap * sizeof *t);
    assert_non_null (t);
    for (size_t i = 0; i < cap; i++)
      t[i].sector = UINT64_MAX;
    for (size_t i = 0; i < f->n; i++) {
      const struct ent *e = &f->log[i];
      if (e->len == 0)
        continue;
      for (uint64_t s = e->off / SECTOR; s <= (e->off + e->len - 1) / SECTOR; s++)
        sect_find (t, cap, s)->touches++;
    }
    for (size_t i = 0; i < cap; i++)
      if (t[i].sector != UINT64_MAX)
        t[i].cut = (uint32_t) tu_rand_below (seed, t[i].touches + 1);
    for (size_t i = 0; i < f->n; i++) {
      const struct ent *e = &f->log[i];
      bool any = false, all = true;
      if (e->kind == ENT_TRUNC) {
        if (tu_rand_below (seed, 2))
          redo (fd, e, 0, UINT64_MAX);
        continue;
      }
      if (e->len == 0)
        continue;
      for (uint64_t s = e->off / SECTOR; s <= (e->off + e->len - 1) / SECTOR; s++) {
        struct sect *x = sect_find (t, cap, s);
        if (x->seen++ < x->cut) {
          redo (fd, e, s * SECTOR, (s + 1) * SECTOR);
          any = true;
        }
        else
          all = false;
      }
      if (all)
        st->kept++;
      else if (any)
        st->torn++;
      else
        st->dropped++;
    }
    free (t);
  }
  close (fd);
}

/* Power loss: call with the engine's disk already closed (its flush
 * failed) and the real I/O restored. */
static void
crash_apply (uint64_t *seed, bool per_sector, struct crash_stats *st)
{
  for (size_t i = 0; i < sim.n_files; i++)
    crash_file (&sim.files[i], seed, per_sector, st);
}

/*----------------------------------------------------------------------
 * The workload and its model of durability. */

struct pend {
  uint64_t seq;
  uint64_t off, len;
  uint8_t *data;            /* NULL: zeroes */
};

struct wl {
  struct cow_disk_config cfg;
  struct cow_disk *d;
  char *overlay;
  uint64_t size;
  uint32_t cs;
  uint64_t seed;
  uint8_t *model;           /* what reads return now */
  uint8_t *durable;         /* what a power loss must leave */
  struct pend *pend;        /* requests since the last flush */
  size_t n_pend, cap_pend;
  struct pend *fua;         /* FUA requests since the last flush: where
                             * they landed, earlier pending requests no
                             * longer count */
  size_t n_fua, cap_fua;
  uint64_t seq;
  unsigned flush_pct;       /* % of requests that are flushes */
  unsigned fua_den;         /* 1 in fua_den writes is FUA */
  long flushes, fuas, writes, zeroes, trims;
};

static struct pend *
pend_add (struct pend **v, size_t *n, size_t *cap)
{
  if (*n == *cap) {
    *cap = *cap ? 2 * *cap : 64;
    *v = realloc (*v, *cap * sizeof **v);
    assert_non_null (*v);
  }
  return &(*v)[(*n)++];
}

static void
pend_push (struct wl *w, uint64_t off, uint64_t len, const uint8_t *data)
{
  struct pend *p;

  if (len == 0)
    return;
  p = pend_add (&w->pend, &w->n_pend, &w->cap_pend);
  p->seq = w->seq;
  p->off = off;
  p->len = len;
  p->data = NULL;
  if (data) {
    p->data = malloc (len);
    assert_non_null (p->data);
    memcpy (p->data, data, len);
  }
}

static void
pend_clear (struct wl *w)
{
  for (size_t i = 0; i < w->n_pend; i++)
    free (w->pend[i].data);
  w->n_pend = 0;
  w->n_fua = 0;
}

/* A request has been answered successfully. */
static void
wl_done (struct wl *w, uint64_t off, uint64_t len, const uint8_t *data,
         bool fua)
{
  if (data)
    memcpy (w->model + off, data, len);
  else
    memset (w->model + off, 0, len);
  if (fua) {
    /* This request is durable (whatever else the engine flushed). */
    struct pend *f = pend_add (&w->fua, &w->n_fua, &w->cap_fua);
    memcpy (w->durable + off, w->model + off, len);
    f->seq = w->seq;
    f->off = off;
    f->len = len;
    f->data = NULL;
  }
  else
    pend_push (w, off, len, data);
  w->seq++;
}

static void
wl_flushed (struct wl *w)
{
  memcpy (w->durable, w->model, w->size);
  pend_clear (w);
  w->flushes++;
}

static void
wl_open (struct wl *w)
{
  w->d = cow_disk_open (&w->cfg);
  if (w->d == NULL)
    print_error ("cow_disk_open %s: %s\n", w->overlay, cow_last_error ());
  assert_non_null (w->d);
}

static void
wl_init (struct wl *w, const char *name, uint32_t cs, uint64_t cache,
         uint64_t seed)
{
  memset (w, 0, sizeof *w);
  w->overlay = tu_path (dir, name);
  w->size = base_size;
  w->cs = cs;
  w->seed = seed;
  w->model = malloc (w->size);
  w->durable = malloc (w->size);
  assert_non_null (w->model);
  assert_non_null (w->durable);
  memcpy (w->model, base_data, w->size);
  memcpy (w->durable, base_data, w->size);
  unlink (w->overlay);
  w->cfg.base = base_path;
  w->cfg.base_format = "raw";
  w->cfg.overlay = w->overlay;
  w->cfg.cluster_size = cs;
  w->cfg.subclusters = tu_subclusters ();
  w->cfg.cache_size = cache;
  w->flush_pct = 10;
  w->fua_den = 8;
  /* Create the overlay with the real I/O: creation is not under test. */
  wl_open (w);
  assert_int_equal (cow_disk_close (w->d), 0);
  w->d = NULL;
}

static void
wl_fini (struct wl *w)
{
  pend_clear (w);
  free (w->pend);
  free (w->model);
  free (w->durable);
  free (w->fua);
  unlink (w->overlay);
  free (w->overlay);
}

enum step_result { STEP_OK, STEP_FAILED };

/* One random request.  On failure, the request's range may hold old or
 * new bytes: it is recorded as pending (uncertain) and the caller
 * decides what to do. */
static enum step_result
wl_step (struct wl *w, uint64_t *s, uint64_t *fail_off, uint64_t *fail_len,
         uint8_t **fail_data, bool *fail_zero)
{
  uint64_t kind = tu_rand_below (s, 100);
  uint32_t cs = w->cs;
  uint32_t max = tu_rand_below (s, 4) == 0 ? 3 * cs + 4096 : cs + cs / 2;
  uint32_t len = (uint32_t) (1 + tu_rand_below (s, max));
  uint64_t off;
  bool fua = tu_rand_below (s, w->fua_den) == 0;
  unsigned flags = fua ? COW_FLAG_FUA : 0;
  int r;

  if (len > 256 * 1024)
    len = 256 * 1024;
  off = tu_rand_below (s, w->size - len + 1);
  if (tu_rand_below (s, 3) == 0)
    off = off / cs * cs;
  /* Stay near a few hot spots half of the time: rewrites, in-place
   * writes and trims of recently written clusters. */
  if (tu_rand_below (s, 2))
    off = (off % (w->size / 4)) + (w->size / 4) * tu_rand_below (s, 2);
  if (off + len > w->size)
    off = w->size - len;
  *fail_data = NULL;
  *fail_zero = false;
  *fail_off = off;
  *fail_len = len;

  if (kind < 55) {
    uint8_t *buf = malloc (len);
    assert_non_null (buf);
    tu_fill_random (buf, len, s);
    r = cow_disk_pwrite (w->d, buf, len, off, flags);
    if (r == 0) {
      wl_done (w, off, len, buf, fua);
      free (buf);
      w->writes++;
      w->fuas += fua;
      return STEP_OK;
    }
    *fail_data = buf;
    return STEP_FAILED;
  }
  if (kind < 70) {
    r = cow_disk_zero (w->d, len, off,
                       flags | (tu_rand_below (s, 2) ? COW_FLAG_MAY_TRIM : 0));
    *fail_zero = true;
    if (r == 0) {
      wl_done (w, off, len, NULL, fua);
      w->zeroes++;
      w->fuas += fua;
      return STEP_OK;
    }
    return STEP_FAILED;
  }
  if (kind < 82) {
    uint64_t u = tu_trim_unit (cs, w->cfg.subclusters);
    uint64_t first = (off + u - 1) / u * u;
    uint64_t last = (off + len) / u * u;
    r = cow_disk_trim (w->d, len, off, flags);
    *fail_zero = true;
    *fail_off = first;
    *fail_len = first < last ? last - first : 0;
    if (r == 0) {
      /* A trim inside one cluster changes nothing. */
      if (first < last)
        wl_done (w, first, last - first, NULL, fua);
      w->trims++;
      return STEP_OK;
    }
    return STEP_FAILED;
  }
  if (kind < 82 + w->flush_pct) {
    *fail_len = 0;
    r = cow_disk_flush (w->d);
    if (r == 0) {
      wl_flushed (w);
      return STEP_OK;
    }
    return STEP_FAILED;
  }
  {
    /* Read back a range: it must match the model. */
    uint8_t *buf = malloc (len);
    assert_non_null (buf);
    *fail_len = 0;
    r = cow_disk_pread (w->d, buf, len, off);
    if (r == 0)
      tu_assert_bytes_equal (buf, w->model + off, len, off, "read");
    free (buf);
    return r == 0 ? STEP_OK : STEP_FAILED;
  }
}

/* Did a FUA request after seq land on byte b? */
static bool
fua_after (const struct wl *w, uint64_t seq, uint64_t b)
{
  for (size_t i = 0; i < w->n_fua; i++)
    if (w->fua[i].seq > seq && b >= w->fua[i].off
        && b < w->fua[i].off + w->fua[i].len)
      return true;
  return false;
}

/* After a power loss and reopen: every byte durable, or written by a
 * request since the last flush (and not overwritten since by a FUA
 * request). */
static void
wl_check_after_crash (struct wl *w, uint8_t *got)
{
  uint64_t bad = 0, first_bad = 0;

  for (uint64_t b = 0; b < w->size; b++) {
    bool ok = false;
    if (b % 4096 == 0 && b + 4096 <= w->size
        && memcmp (got + b, w->durable + b, 4096) == 0) {
      b += 4095;
      continue;
    }
    if (got[b] == w->durable[b])
      continue;
    for (size_t i = w->n_pend; i-- > 0; ) {
      const struct pend *p = &w->pend[i];
      if (b < p->off || b >= p->off + p->len || fua_after (w, p->seq, b))
        continue;
      if ((p->data ? p->data[b - p->off] : 0) == got[b]) {
        ok = true;
        break;
      }
    }
    if (!ok && bad++ == 0)
      first_bad = b;
  }
  if (bad) {
    uint64_t b = first_bad;
    print_error ("after the power loss %" PRIu64 " bytes hold neither their "
                 "durable value nor one written since the last flush; the "
                 "first at offset %" PRIu64 " (cluster %" PRIu64 "): got "
                 "0x%02x, durable 0x%02x, model 0x%02x, base 0x%02x\n",
                 bad, b, b / w->cs, got[b], w->durable[b], w->model[b],
                 base_data[b]);
    fail ();
  }
}

static uint8_t *
read_all (struct cow_disk *d, uint64_t size)
{
  uint8_t *buf = malloc (size);
  int r;

  assert_non_null (buf);
  for (uint64_t off = 0; off < size; off += 1u << 20) {
    uint32_t n = size - off < (1u << 20) ? (uint32_t) (size - off) : 1u << 20;
    r = cow_disk_pread (d, buf + off, n, off);
    if (r == -1)
      print_error ("pread after reopen at %" PRIu64 ": %s\n", off,
                   cow_last_error ());
    assert_int_equal (r, 0);
  }
  return buf;
}

/* Power loss now: everything fails, close, restore, apply. */
static void
power_loss (struct wl *w, uint64_t *s, bool per_sector,
            struct crash_stats *st)
{
  pthread_mutex_lock (&sim.lock);
  sim.crashed = true;
  pthread_mutex_unlock (&sim.lock);
  cow_disk_close (w->d);            /* its flush fails: expected */
  w->d = NULL;
  io_set_ops (fio_quick_ops ());
  crash_apply (s, per_sector, st);
  sim_reset ();
}

/* Reopen after a power loss, check the data against the durability
 * model, qemu-img check the overlay; then go on using the disk and
 * check it again.  Returns the leaked clusters. */
static int64_t
recover_and_check (struct wl *w, uint64_t *s, bool go_on)
{
  uint8_t *got;
  int64_t leaks;

  wl_open (w);
  got = read_all (w->d, w->size);
  wl_check_after_crash (w, got);
  assert_int_equal (cow_disk_close (w->d), 0);
  w->d = NULL;
  leaks = tu_assert_check_no_corruption (w->overlay);
  if (!go_on) {
    free (got);
    return leaks;
  }

  /* The recovered disk is usable: writes over and around whatever the
   * crash left, a clean close, and qemu-img check again. */
  memcpy (w->model, got, w->size);
  memcpy (w->durable, got, w->size);
  pend_clear (w);
  free (got);
  wl_open (w);
  for (int i = 0; i < 40; i++) {
    uint64_t fo, fl;
    uint8_t *fd;
    bool fz;
    assert_int_equal (wl_step (w, s, &fo, &fl, &fd, &fz), STEP_OK);
  }
  assert_int_equal (cow_disk_close (w->d), 0);
  w->d = NULL;
  wl_open (w);
  got = read_all (w->d, w->size);
  tu_assert_bytes_equal (got, w->model, w->size, 0, "after recovery");
  free (got);
  assert_int_equal (cow_disk_close (w->d), 0);
  w->d = NULL;
  tu_assert_check_no_corruption (w->overlay);
  return leaks;
}

/*----------------------------------------------------------------------
 * Tests. */

static int
group_setup (void **state)
{
  uint64_t s = 77;

  (void) state;
  dir = tu_mkdtemp ("test-powerloss");
  io_set_ops (fio_quick_ops ());
  base_path = tu_path (dir, "base.raw");
  base_data = malloc (base_size);
  assert_non_null (base_data);
  tu_fill_random (base_data, base_size, &s);
  /* A zero run in the base too. */
  memset (base_data + 65536 * 5, 0, 65536 * 2 + 100);
  tu_write_file (base_path, base_data, base_size);
  return 0;
}

static int
group_teardown (void **state)
{
  (void) state;
  io_set_ops (NULL);
  sim_reset ();
  tu_rmtree (dir);
  free (dir);
  free (base_path);
  free (base_data);
  return 0;
}

struct iter_params {
  uint32_t cs;
  uint64_t cache;
};

static void
one_crash (uint64_t seed, int *total_leaks, int *leaky_runs,
           struct crash_stats *st)
{
  static const struct iter_params params[] = {
    { 65536, 0 },
    { 4096, 0 },
    { 512, 0 },
    { 1024, 4 * 1024 },        /* a tiny cache: evictions of dirty tables */
    { 512, 4 * 512 },
    { 65536, 4 * 65536 },
  };
  const struct iter_params *p = &params[seed % (sizeof params / sizeof params[0])];
  struct wl w;
  uint64_t s = seed * 0x100000001b3ull + 1;
  int n_ops = 100 + (int) tu_rand_below (&s, 200);
  /* Late in the run, when there is more to lose. */
  int crash_op = n_ops / 3 + (int) tu_rand_below (&s, (uint64_t) (n_ops - n_ops / 3));
  bool per_sector = seed % 2;
  int64_t leaks;

  wl_init (&w, "pl.qcow2", p->cs, p->cache, seed);
  /* Few flushes in some runs: more unsynced changes at the crash. */
  w.flush_pct = (unsigned[]) { 1, 4, 10 }[seed % 3];
  w.fua_den = (unsigned[]) { 40, 12, 6 }[seed % 3];
  sim_reset ();
  io_set_ops (&sim_ops);
  wl_open (&w);
  for (int i = 0; i < n_ops; i++) {
    uint64_t fo, fl;
    uint8_t *fd;
    bool fz;
    if (i == crash_op) {
      pthread_mutex_lock (&sim.lock);
      sim.crash_armed = true;
      sim.crash_countdown = (long) tu_rand_below (&s, 40);
      pthread_mutex_unlock (&sim.lock);
    }
    if (wl_step (&w, &s, &fo, &fl, &fd, &fz) == STEP_FAILED) {
      /* Only the power loss makes requests fail here. */
      if (!sim.crashed)
        print_error ("seed %" PRIu64 ": request failed before the crash: "
                     "%s\n", seed, cow_last_error ());
      assert_true (sim.crashed);
      assert_int_equal (cow_last_errno (), EIO);
      /* What it did may have reached the disk, or part of it. */
      if (fl)
        pend_push (&w, fo, fl, fz ? NULL : fd);
      free (fd);
      break;
    }
  }
  power_loss (&w, &s, per_sector, st);
  leaks = recover_and_check (&w, &s, seed % 4 == 0);
  if (leaks) {
    *total_leaks += (int) leaks;
    (*leaky_runs)++;
  }
  wl_fini (&w);
}

static void
test_power_loss (void **state)
{
  int total_leaks = 0, leaky_runs = 0;
  struct crash_stats st = { 0 };
  int iterations = 30;
  uint64_t first = 1;
  const char *e;

  (void) state;
  /* For longer soak runs: TEST_POWERLOSS_ITERATIONS=1000, and
   * TEST_POWERLOSS_SEED=N to start from another seed. */
  if ((e = getenv ("TEST_POWERLOSS_ITERATIONS")) != NULL && atoi (e) > 0)
    iterations = atoi (e);
  if ((e = getenv ("TEST_POWERLOSS_SEED")) != NULL && atoi (e) > 0)
    first = (uint64_t) atoi (e);
  for (uint64_t seed = first; seed < first + (uint64_t) iterations; seed++)
    one_crash (seed, &total_leaks, &leaky_runs, &st);
  printf ("# %d power losses: %ld unsynced changes (%ld kept, %ld dropped, "
          "%ld torn); %d runs leaked %d clusters in all\n", iterations,
          st.entries, st.kept, st.dropped, st.torn, leaky_runs, total_leaks);
}

/* I/O errors: the Nth pwrite (and maybe a few after it) fails with EIO
 * or ENOSPC.  The request fails with that errno and a message naming
 * it; its range then holds old or new bytes; once the errors stop the
 * disk works, a flush succeeds, and what was flushed survives a power
 * loss. */
static void
one_error_run (uint64_t seed, int err, bool crash_at_end, int *n_failed)
{
  struct wl w;
  uint64_t s = seed * 7919 + 3;
  const uint32_t css[] = { 65536, 4096, 512 };
  int n_ops = 150;
  int64_t leaks;
  char *msg_errno = strerror (err);

  wl_init (&w, "err.qcow2", css[seed % 3], seed % 2 ? 8 * css[seed % 3] : 0,
           seed);
  sim_reset ();
  io_set_ops (&sim_ops);
  wl_open (&w);
  /* A burst of errors somewhere in the first part of the run. */
  pthread_mutex_lock (&sim.lock);
  sim.err_at = 1 + (long) tu_rand_below (&s, 60);
  sim.err_burst = 1 + (long) tu_rand_below (&s, 3);
  sim.err_errno = err;
  pthread_mutex_unlock (&sim.lock);

  for (int i = 0; i < n_ops; i++) {
    uint64_t fo, fl;
    uint8_t *fd;
    bool fz;
    if (wl_step (&w, &s, &fo, &fl, &fd, &fz) == STEP_OK)
      continue;
    (*n_failed)++;
    /* The errno, and a message that says what failed. */
    if (cow_last_errno () != err)
      print_error ("seed %" PRIu64 ": errno %d (%s), want %d\n", seed,
                   cow_last_errno (), cow_last_error (), err);
    assert_int_equal (cow_last_errno (), err);
    tu_assert_contains (cow_last_error (), msg_errno);
    tu_assert_contains (cow_last_error (), w.overlay);
    /* The failed request's range: old or new, byte by byte; from now on
     * it must stay what it reads as. */
    if (fl) {
      uint8_t *now = malloc (fl);
      assert_non_null (now);
      int tries = 0;
      while (cow_disk_pread (w.d, now, (uint32_t) fl, fo) == -1) {
        /* The read itself hit the error (a metadata write-back). */
        assert_int_equal (cow_last_errno (), err);
        assert_true (++tries < 8);
      }
      for (uint64_t b = 0; b < fl; b++) {
        uint8_t nv = fz ? 0 : fd[b];
        if (now[b] != w.model[fo + b] && now[b] != nv) {
          print_error ("seed %" PRIu64 ": after a failed request byte %"
                       PRIu64 " is 0x%02x: neither old 0x%02x nor new "
                       "0x%02x\n", seed, fo + b, now[b], w.model[fo + b], nv);
          fail ();
        }
      }
      /* Uncertain until the next flush: either value may be durable. */
      pend_push (&w, fo, fl, fz ? NULL : fd);
      w.seq++;
      pend_push (&w, fo, fl, now);
      w.seq++;
      memcpy (w.model + fo, now, fl);
      free (now);
    }
    free (fd);
  }
  /* Errors are over (the burst is short): everything works. */
  assert_true (sim.errors_injected > 0);
  {
    int r = cow_disk_flush (w.d);
    if (r == -1)
      print_error ("seed %" PRIu64 ": flush after the errors: %s\n", seed,
                   cow_last_error ());
    assert_int_equal (r, 0);
    wl_flushed (&w);
  }
  {
    uint8_t *got = read_all (w.d, w.size);
    tu_assert_bytes_equal (got, w.model, w.size, 0, "after errors");
    free (got);
  }
  if (crash_at_end) {
    for (int i = 0; i < 30; i++) {
      uint64_t fo, fl;
      uint8_t *fd;
      bool fz;
      assert_int_equal (wl_step (&w, &s, &fo, &fl, &fd, &fz), STEP_OK);
    }
    power_loss (&w, &s, seed % 2, &(struct crash_stats) { 0 });
    leaks = recover_and_check (&w, &s, true);
  }
  else {
    assert_int_equal (cow_disk_close (w.d), 0);
    w.d = NULL;
    io_set_ops (fio_quick_ops ());
    sim_reset ();
    wl_open (&w);
    {
      uint8_t *got = read_all (w.d, w.size);
      tu_assert_bytes_equal (got, w.model, w.size, 0, "reopened");
      free (got);
    }
    assert_int_equal (cow_disk_close (w.d), 0);
    w.d = NULL;
    leaks = tu_assert_check_no_corruption (w.overlay);
  }
  (void) leaks;
  wl_fini (&w);
}

static void
test_eio (void **state)
{
  int failed = 0;

  (void) state;
  for (uint64_t seed = 1; seed <= 9; seed++)
    one_error_run (seed, EIO, seed % 3 == 0, &failed);
  assert_true (failed > 0);
  printf ("# EIO: %d requests failed as injected\n", failed);
}

static void
test_enospc (void **state)
{
  int failed = 0;

  (void) state;
  for (uint64_t seed = 101; seed <= 109; seed++)
    one_error_run (seed, ENOSPC, seed % 3 == 0, &failed);
  assert_true (failed > 0);
  printf ("# ENOSPC: %d requests failed as injected\n", failed);
}

/* The simulator itself: undo-then-redo leaves exactly the kept
 * changes, in order, and the synced ones always. */
static void
sim_scenario (const int *decisions, const char *want, size_t want_len)
{
  char *p = tu_path (dir, "sim.bin");
  uint8_t a[2048], b[2048], c[512], o[1024];
  int fd;
  size_t n;
  uint8_t *got;
  struct simfile *f;
  int rfd;

  memset (o, 'o', sizeof o);
  tu_write_file (p, o, sizeof o);                /* synced: 1 KiB of 'o' */
  sim_reset ();
  io_set_ops (&sim_ops);
  fd = io_open (p, O_RDWR, 0);
  assert_true (fd >= 0);
  memset (a, 'a', sizeof a);
  memset (b, 'b', sizeof b);
  memset (c, 'c', sizeof c);
  assert_int_equal (io_pwrite (fd, a, 1024, 512), 0);     /* extends */
  assert_int_equal (io_fsync (fd), 0);                    /* durable */
  assert_int_equal (io_pwrite (fd, b, 2048, 0), 0);       /* extends */
  assert_int_equal (io_pwrite (fd, c, 512, 1024), 0);
  assert_int_equal (io_punch_hole (fd, 1536, 512), 0);
  io_close (fd);
  io_set_ops (fio_quick_ops ());
  f = &sim.files[0];
  assert_int_equal (f->n, 3);
  rfd = open (p, O_RDWR);
  assert_true (rfd >= 0);
  for (size_t i = f->n; i-- > 0; ) {
    put_part (rfd, f->log[i].old, f->log[i].off, f->log[i].len, 0,
              f->log[i].old_size);
    assert_int_equal (ftruncate (rfd, (off_t) f->log[i].old_size), 0);
  }
  for (size_t i = 0; i < f->n; i++)
    if (decisions[i])
      redo (rfd, &f->log[i], 0, UINT64_MAX);
  close (rfd);
  got = tu_read_file (p, &n);
  assert_int_equal (n, want_len);
  assert_memory_equal (got, want, want_len);
  free (got);
  sim_reset ();
  unlink (p);
  free (p);
}

static void
test_simulator (void **state)
{
  char want[2048];
  uint64_t s = 9;

  (void) state;
  /* Nothing unsynced kept: 'o' then the synced 'a', 1536 bytes. */
  memset (want, 'o', 512);
  memset (want + 512, 'a', 1024);
  sim_scenario ((const int[]) { 0, 0, 0 }, want, 1536);
  /* Only the 'c' write: it wins where it lands. */
  memset (want + 1024, 'c', 512);
  sim_scenario ((const int[]) { 0, 1, 0 }, want, 1536);
  /* The 'b' write and the hole, not 'c'. */
  memset (want, 'b', 2048);
  memset (want + 1536, 0, 512);
  sim_scenario ((const int[]) { 1, 0, 1 }, want, 2048);
  /* All of them. */
  memset (want + 1024, 'c', 512);
  sim_scenario ((const int[]) { 1, 1, 1 }, want, 2048);

  /* Random crashes of a scripted workload: sizes stay sane and synced
   * bytes are always there. */
  for (int it = 0; it < 50; it++) {
    char *p = tu_path (dir, "sim2.bin");
    struct crash_stats st = { 0 };
    uint8_t buf[4096];
    size_t n;
    uint8_t *got;
    int fd;

    tu_write_file (p, "", 0);
    sim_reset ();
    io_set_ops (&sim_ops);
    fd = io_open (p, O_RDWR, 0);
    memset (buf, 's', sizeof buf);
    assert_int_equal (io_pwrite (fd, buf, 4096, 0), 0);
    assert_int_equal (io_fsync (fd), 0);
    for (int k = 0; k < 20; k++) {
      uint64_t off = tu_rand_below (&s, 8192);
      memset (buf, 'A' + k, sizeof buf);
      assert_int_equal (io_pwrite (fd, buf, 1 + tu_rand_below (&s, 4096),
                                   off + 4096), 0);
    }
    io_close (fd);
    io_set_ops (fio_quick_ops ());
    crash_apply (&s, it % 2, &st);
    sim_reset ();
    got = tu_read_file (p, &n);
    assert_true (n >= 4096 && n <= 4096 + 8192 + 4096);
    for (size_t i = 0; i < 4096; i++)
      assert_int_equal (got[i], 's');
    free (got);
    unlink (p);
    free (p);
  }
}

int
main (int argc, char **argv)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test (test_simulator),
    cmocka_unit_test (test_power_loss),
    cmocka_unit_test (test_eio),
    cmocka_unit_test (test_enospc),
  };

  if (argc > 1)
    cmocka_set_test_filter (argv[1]);
  return cmocka_run_group_tests (tests, group_setup, group_teardown);
}
