/* SPDX-License-Identifier: BSD-3-Clause */
/* Unit tests of the qcow2 layer: header encode/decode against qemu-img,
 * images made by qemu-img (v3, compat 0.10, every refcount width),
 * refusal of bad headers (each message names the field), random damage
 * to metadata, L1/L2 lookup and allocation, refcounts, many L2 tables,
 * refcount table growth, flushes that fail at each of their steps, and
 * flushes racing other requests (made deterministic through the I/O
 * seam).  qemu-img check / compare are the oracles.  Run one test:
 * ./test-qcow2 'test_reftable*' */
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
#include <time.h>
#include <unistd.h>
#include <cmocka.h>

#include "cowchain.h"
#include "io.h"
#include "layer.h"
#include "qcow2.h"
#include "faultio.h"
#include "testutil.h"

static char *dir;

/* These tests check formats and mappings, not durability: fsync is a
 * no-op (through the seam) so that they run fast on real disks.  The
 * durability tests are in test-powerloss.c. */
static struct io_ops fast_ops;

static int
group_setup (void **state)
{
  (void) state;
  dir = tu_mkdtemp ("test-qcow2");
  fast_ops = *fio_quick_ops ();
  io_set_ops (&fast_ops);
  return 0;
}

static int
group_teardown (void **state)
{
  (void) state;
  tu_rmtree (dir);
  free (dir);
  return 0;
}

/* fx_init makes layers with extended L2 entries while this is set. */
static bool fx_ext;

static struct qcow2 *
Q (struct layer *l)
{
  return (struct qcow2 *) l;
}

static void
get_cluster (struct layer *l, uint64_t gc, enum qcow2_ctype *type,
             uint64_t *host)
{
  struct qcow2 *q = Q (l);

  pthread_mutex_lock (&q->lock);
  assert_int_equal (qcow2_get_cluster (q, gc, type, host), 0);
  pthread_mutex_unlock (&q->lock);
}

static uint64_t
refcount (struct layer *l, uint64_t host_offset)
{
  struct qcow2 *q = Q (l);
  uint64_t ref = 12345;

  pthread_mutex_lock (&q->lock);
  assert_int_equal (qcow2_refcount_get (q, host_offset >> q->cluster_bits,
                                        &ref), 0);
  pthread_mutex_unlock (&q->lock);
  return ref;
}

/*----------------------------------------------------------------------
 * A qcow2 image over a raw base with random contents, and a model of
 * what the guest sees. */

struct fx {
  char *base, *img, *model_path;
  struct layer *base_l, *l;
  uint8_t *model;
  uint64_t size;
  uint32_t cs;
  uint64_t cache;
  uint64_t seed;
};

static int
below_read (void *opaque, void *buf, uint32_t count, uint64_t offset)
{
  struct layer *b = opaque;

  return b->ops->read (b, buf, count, offset, NULL);
}

static struct layer_below
fx_below (struct fx *f)
{
  struct layer_below b = { below_read, f->base_l };
  return b;
}

static void
fx_open (struct fx *f)
{
  f->l = qcow2_open (f->img, false, f->cache);
  if (f->l == NULL)
    print_error ("qcow2_open: %s\n", cow_last_error ());
  assert_non_null (f->l);
}

/* base_size may be smaller than size (the rest reads as zero). */
static void
fx_init (struct fx *f, const char *name, uint64_t size, uint64_t base_size,
         uint32_t cs, uint64_t cache, uint64_t seed)
{
  char bname[256], mname[256];
  struct qcow2_create_opts o = { 0 };
  uint8_t *b;
  int r;

  memset (f, 0, sizeof *f);
  f->size = size;
  f->cs = cs;
  f->cache = cache;
  f->seed = seed;
  snprintf (bname, sizeof bname, "%s.base", name);
  snprintf (mname, sizeof mname, "%s.model", name);
  f->base = tu_path (dir, bname);
  f->img = tu_path (dir, name);
  f->model_path = tu_path (dir, mname);
  f->model = calloc (1, size);
  assert_non_null (f->model);
  b = malloc (base_size ? base_size : 1);
  assert_non_null (b);
  tu_fill_random (b, base_size, &f->seed);
  tu_write_file (f->base, b, base_size);
  memcpy (f->model, b, base_size < size ? base_size : size);
  free (b);
  unlink (f->img);
  o.size = size;
  o.cluster_size = cs;
  o.backing_file = bname;
  o.backing_format = "raw";
  o.extended_l2 = fx_ext;
  r = qcow2_create (f->img, &o);
  if (r == -1)
    print_error ("qcow2_create: %s\n", cow_last_error ());
  assert_int_equal (r, 0);
  f->base_l = raw_open (f->base, true);
  assert_non_null (f->base_l);
  fx_open (f);
}

static void
fx_write (struct fx *f, const void *buf, uint32_t count, uint64_t off)
{
  struct layer_below b = fx_below (f);
  int r = f->l->ops->write (f->l, buf, count, off, &b);

  if (r == -1)
    print_error ("write %u@%" PRIu64 ": %s\n", count, off, cow_last_error ());
  assert_int_equal (r, 0);
  memcpy (f->model + off, buf, count);
}

static void
fx_write_random (struct fx *f, uint32_t count, uint64_t off)
{
  uint8_t *buf = malloc (count);
  struct layer_below b = fx_below (f);
  int r;

  assert_non_null (buf);
  tu_fill_random (buf, count, &f->seed);
  r = f->l->ops->write (f->l, buf, count, off, &b);
  if (r == -1)
    print_error ("write %u@%" PRIu64 ": %s\n", count, off, cow_last_error ());
  assert_int_equal (r, 0);
  memcpy (f->model + off, buf, count);
  free (buf);
}

static void
fx_zero (struct fx *f, uint32_t count, uint64_t off)
{
  struct layer_below b = fx_below (f);
  int r = f->l->ops->zero (f->l, count, off, false, &b);

  if (r == -1)
    print_error ("zero %u@%" PRIu64 ": %s\n", count, off, cow_last_error ());
  assert_int_equal (r, 0);
  memset (f->model + off, 0, count);
}

/* Trim releases whole clusters only (subclusters with extended L2
 * entries); they read as zero after. */
static void
fx_trim (struct fx *f, uint32_t count, uint64_t off)
{
  uint64_t u = Q (f->l)->ext_l2 ? f->cs / 32 : f->cs;
  uint64_t first = (off + u - 1) / u * u;
  uint64_t last = (off + count) / u * u;
  int r = f->l->ops->trim (f->l, count, off);

  if (r == -1)
    print_error ("trim %u@%" PRIu64 ": %s\n", count, off, cow_last_error ());
  assert_int_equal (r, 0);
  /* Version 2 images have no zero clusters: trim does nothing there. */
  if (first < last && Q (f->l)->version >= 3)
    memset (f->model + first, 0, last - first);
}

static void
fx_verify_range (struct fx *f, uint64_t off, uint64_t len)
{
  struct layer_below b = fx_below (f);
  const uint64_t chunk = 1u << 20;
  uint8_t *buf = malloc (chunk);

  assert_non_null (buf);
  while (len > 0) {
    uint32_t n = len > chunk ? (uint32_t) chunk : (uint32_t) len;
    int r = f->l->ops->read (f->l, buf, n, off, &b);
    if (r == -1)
      print_error ("read %u@%" PRIu64 ": %s\n", n, off, cow_last_error ());
    assert_int_equal (r, 0);
    tu_assert_bytes_equal (buf, f->model + off, n, off, f->img);
    off += n;
    len -= n;
  }
  free (buf);
}

static void
fx_verify (struct fx *f)
{
  fx_verify_range (f, 0, f->size);
}

static void
fx_flush (struct fx *f)
{
  int r = f->l->ops->flush (f->l);

  if (r == -1)
    print_error ("flush: %s\n", cow_last_error ());
  assert_int_equal (r, 0);
}

static void
fx_close_layer (struct fx *f)
{
  int r = f->l->ops->close (f->l);

  if (r == -1)
    print_error ("close: %s\n", cow_last_error ());
  assert_int_equal (r, 0);
  f->l = NULL;
}

static void
fx_reopen (struct fx *f)
{
  fx_close_layer (f);
  fx_open (f);
}

/* qemu-img compare of the model against the image (through its backing
 * file). */
static void
fx_qemu_compare (struct fx *f)
{
  char *out = NULL;
  int st;

  tu_write_file (f->model_path, f->model, f->size);
  st = tu_run (&out, "qemu-img compare -f raw -F qcow2 '%s' '%s'",
               f->model_path, f->img);
  if (st != 0)
    print_error ("qemu-img compare: exit %d: %s\n", st, out);
  free (out);
  assert_int_equal (st, 0);
}

static void
fx_fini (struct fx *f)
{
  if (f->l)
    fx_close_layer (f);
  if (f->base_l)
    f->base_l->ops->close (f->base_l);
  unlink (f->img);
  unlink (f->base);
  unlink (f->model_path);
  free (f->img);
  free (f->base);
  free (f->model_path);
  free (f->model);
}

/*----------------------------------------------------------------------
 * Header encode / decode. */

static void
check_created (uint64_t size, uint32_t cs, bool backing, int version)
{
  char *img = tu_path (dir, "hdr.qcow2");
  char *base = tu_path (dir, "hdr-base.raw");
  struct qcow2_create_opts o = {
    .size = size, .cluster_size = cs, .version = version,
  };
  struct layer *l;
  char *s, *info = NULL;
  int r;

  unlink (img);
  if (backing) {
    tu_write_file (base, "", 0);
    o.backing_file = "hdr-base.raw";
    o.backing_format = "raw";
  }
  r = qcow2_create (img, &o);
  if (r == -1)
    print_error ("qcow2_create size %" PRIu64 " cluster %u: %s\n", size, cs,
                 cow_last_error ());
  assert_int_equal (r, 0);

  for (int rw = 0; rw < 2; rw++) {
    l = qcow2_open (img, !rw, 0);
    if (l == NULL)
      print_error ("qcow2_open: %s\n", cow_last_error ());
    assert_non_null (l);
    assert_int_equal (qcow2_cluster_size (l), cs);
    assert_int_equal (l->size, size);
    assert_int_equal (l->readonly, !rw);
    assert_int_equal (Q (l)->version, version ? version : 3);
    assert_int_equal (qcow2_version (l), version ? version : 3);
    assert_int_equal (Q (l)->refcount_order, 4);
    if (backing) {
      assert_string_equal (qcow2_backing_file (l), "hdr-base.raw");
      assert_string_equal (qcow2_backing_format (l), "raw");
    }
    else {
      assert_null (qcow2_backing_file (l));
      assert_null (qcow2_backing_format (l));
    }
    assert_int_equal (l->ops->close (l), 0);
  }

  tu_assert_check_clean (img);
  assert_int_equal (tu_run (&info, "qemu-img info --output=json '%s'", img), 0);
  assert_int_equal (tu_json_int (info, "virtual-size"), (int64_t) size);
  assert_int_equal (tu_json_int (info, "cluster-size"), cs);
  assert_int_equal (tu_json_int (info, "refcount-bits"), 16);
  s = tu_json_str (info, "compat");
  assert_non_null (s);
  assert_string_equal (s, version == 2 ? "0.10" : "1.1");
  free (s);
  s = tu_json_str (info, "backing-filename");
  if (backing) {
    assert_non_null (s);
    assert_string_equal (s, "hdr-base.raw");
    free (s);
    s = tu_json_str (info, "backing-filename-format");
    assert_non_null (s);
    assert_string_equal (s, "raw");
  }
  else
    assert_null (s);
  free (s);
  free (info);
  unlink (img);
  unlink (base);
  free (img);
  free (base);
}

static void
test_create_reopen (void **state)
{
  static const uint32_t css[] = { 512, 4096, 65536, 2u << 20 };
  static const uint64_t sizes[] = {
    0, 512, 1u << 20, (1ull << 30) + 512, 100ull << 30,
  };

  (void) state;
  for (size_t i = 0; i < sizeof css / sizeof css[0]; i++)
    for (size_t j = 0; j < sizeof sizes / sizeof sizes[0]; j++) {
      /* Keep the L1 table of 512-byte clusters reasonable. */
      if (css[i] == 512 && sizes[j] > (2ull << 30))
        continue;
      check_created (sizes[j], css[i], (i + j) % 2 == 0,
                     (int[]) { 0, 3, 2 }[(i + j) % 3]);
    }
  /* A 4 MiB L1 table (16 GiB of 512-byte clusters). */
  check_created (16ull << 30, 512, true, 0);
  check_created (1 << 20, 65536, true, 2);
  check_created (1 << 20, 512, false, 2);
}

static void
test_create_refused (void **state)
{
  char *img = tu_path (dir, "refused.qcow2");
  struct qcow2_create_opts o = { .size = 1 << 20 };
  char longname[1100];
  static const uint32_t bad_cs[] = { 0, 256, 1000, 4u << 20, 65537 };

  (void) state;
  for (size_t i = 0; i < sizeof bad_cs / sizeof bad_cs[0]; i++) {
    o.cluster_size = bad_cs[i];
    assert_int_equal (qcow2_create (img, &o), -1);
    assert_int_equal (cow_last_errno (), EINVAL);
    tu_assert_contains (cow_last_error (), "cluster size");
    assert_int_equal (access (img, F_OK), -1);
  }
  /* Versions other than 2 and 3. */
  o.cluster_size = 65536;
  o.version = 4;
  assert_int_equal (qcow2_create (img, &o), -1);
  tu_assert_contains (cow_last_error (), "version");
  o.version = 1;
  assert_int_equal (qcow2_create (img, &o), -1);
  tu_assert_contains (cow_last_error (), "version");
  assert_int_equal (access (img, F_OK), -1);
  o.version = 0;
  /* An L1 table beyond 32 MiB. */
  o.cluster_size = 512;
  o.size = 256ull << 40;
  assert_int_equal (qcow2_create (img, &o), -1);
  assert_int_equal (cow_last_errno (), EFBIG);
  tu_assert_contains (cow_last_error (), "L1");
  /* A backing name longer than 1023 bytes. */
  o.size = 1 << 20;
  o.cluster_size = 65536;
  memset (longname, 'a', sizeof longname - 1);
  longname[sizeof longname - 1] = '\0';
  o.backing_file = longname;
  assert_int_equal (qcow2_create (img, &o), -1);
  tu_assert_contains (cow_last_error (), "backing file name");
  assert_int_equal (access (img, F_OK), -1);
  free (img);
}

/*----------------------------------------------------------------------
 * Images made by qemu-img. */

static void
qemu_image_roundtrip (const char *opts, bool with_backing, int version,
                      unsigned refcount_order)
{
  struct fx f;
  char *out = NULL;
  int st;
  struct layer *l;
  uint64_t size = 8 << 20;

  /* Start from our fixture (base + model), then replace the image with
   * one made by qemu-img. */
  fx_init (&f, "qemu.qcow2", size, with_backing ? size : 0, 65536, 0, 7);
  fx_close_layer (&f);
  unlink (f.img);
  if (!with_backing)
    memset (f.model, 0, size);
  st = tu_run (&out, "cd '%s' && qemu-img create -f qcow2 %s %s qemu.qcow2 %"
               PRIu64, dir, opts,
               with_backing ? "-b qemu.qcow2.base -F raw" : "", size);
  if (st != 0)
    print_error ("qemu-img create: %s\n", out);
  free (out);
  assert_int_equal (st, 0);

  /* Read-only. */
  l = qcow2_open (f.img, true, 0);
  if (l == NULL)
    print_error ("qcow2_open: %s\n", cow_last_error ());
  assert_non_null (l);
  assert_int_equal (Q (l)->version, version);
  assert_int_equal (Q (l)->refcount_order, refcount_order);
  assert_int_equal (l->size, size);
  if (with_backing) {
    assert_string_equal (qcow2_backing_file (l), "qemu.qcow2.base");
    /* QEMU writes the backing format extension for compat=0.10 too. */
    if (qcow2_backing_format (l) == NULL)
      print_error ("backing format of a version %d image made by qemu-img "
                   "was not read (header extensions skipped)\n", version);
    assert_non_null (qcow2_backing_format (l));
    assert_string_equal (qcow2_backing_format (l), "raw");
  }
  else
    assert_null (qcow2_backing_file (l));
  {
    char buf[4096];
    struct layer_below b = { below_read, NULL };
    b.opaque = f.base_l;
    assert_int_equal (l->ops->read (l, buf, sizeof buf, 12345, &b), 0);
    assert_memory_equal (buf, f.model + 12345, sizeof buf);
    /* A read-only layer refuses writes. */
    assert_int_equal (l->ops->write (l, buf, 1, 0, &b), -1);
    assert_int_equal (cow_last_errno (), EROFS);
  }
  assert_int_equal (l->ops->close (l), 0);

  /* Writable: partial and whole clusters, zeroes, trims. */
  fx_open (&f);
  fx_write_random (&f, 1, 65535);
  fx_write_random (&f, 100 * 1024, 3 * 65536 - 1000);
  fx_write_random (&f, 4096, size - 4096);
  fx_zero (&f, 65536 * 2 + 77, 65536 * 10 - 33);
  fx_trim (&f, 65536 * 3, 65536 * 20);
  fx_verify (&f);
  fx_reopen (&f);
  fx_verify (&f);
  fx_close_layer (&f);
  tu_assert_check_clean (f.img);
  fx_qemu_compare (&f);
  fx_fini (&f);
}

static void
test_qemu_v3 (void **state)
{
  (void) state;
  qemu_image_roundtrip ("", false, 3, 4);
  qemu_image_roundtrip ("", true, 3, 4);
}

static void
test_qemu_compat010 (void **state)
{
  (void) state;
  qemu_image_roundtrip ("-o compat=0.10", false, 2, 4);
  qemu_image_roundtrip ("-o compat=0.10", true, 2, 4);
}

static void
test_qemu_refcount_bits (void **state)
{
  static const unsigned orders[] = { 0, 1, 2, 3, 5, 6 };
  char opts[64];

  (void) state;
  for (size_t i = 0; i < sizeof orders / sizeof orders[0]; i++) {
    snprintf (opts, sizeof opts, "-o refcount_bits=%u", 1u << orders[i]);
    qemu_image_roundtrip (opts, true, 3, orders[i]);
  }
}

/*----------------------------------------------------------------------
 * Bad headers. */

struct bad {
  const char *what;
  uint64_t offset;
  int width;            /* 4 or 8; 0: truncate the file to value */
  uint64_t value;
  const char *field;    /* the message must contain this */
  bool ro_ok;           /* the read-only open succeeds */
};

static void
test_bad_headers (void **state)
{
  char *good = tu_path (dir, "good.qcow2");
  char *bad = tu_path (dir, "bad.qcow2");
  char *base = tu_path (dir, "good.base");
  struct qcow2_create_opts o = {
    .size = 16 << 20, .cluster_size = 65536,
    .backing_file = "good.base", .backing_format = "raw",
  };
  uint64_t fsize;
  const struct bad cases[] = {
    { "bad magic", 0, 4, 0x12345678, "magic", false },
    { "version 1", 4, 4, 1, "version", false },
    { "version 4", 4, 4, 4, "version", false },
    { "cluster_bits 8", 20, 4, 8, "cluster_bits", false },
    { "cluster_bits 22", 20, 4, 22, "cluster_bits", false },
    { "cluster_bits huge", 20, 4, 0xffffffff, "cluster_bits", false },
    { "header_length 100", 100, 4, 100, "header_length", false },
    { "header_length 108", 100, 4, 108, "header_length", false },
    { "header_length > cluster", 100, 4, 65536 + 8, "header_length", false },
    { "unknown incompatible bit", 72, 8, 1u << 5, "incompatible", false },
    { "unknown incompatible bit 63", 72, 8, 1ull << 63, "incompatible", false },
    { "external data file", 72, 8, QCOW2_INCOMPAT_DATA_FILE, "data file", false },
    { "compression type", 72, 8, QCOW2_INCOMPAT_COMPRESSION, "compression", false },
    { "dirty (rw)", 72, 8, QCOW2_INCOMPAT_DIRTY, "dirty", true },
    { "corrupt (rw)", 72, 8, QCOW2_INCOMPAT_CORRUPT, "corrupt", true },
    { "refcount_order 7", 96, 4, 7, "refcount_order", false },
    { "refcount_order huge", 96, 4, 0x80000000u, "refcount_order", false },
    { "L1 too small", 36, 4, 0, "L1 table", false },
    { "L1 smaller than size", 24, 8, 1ull << 50, "L1 table", false },
    { "L1 huge", 36, 4, 0x7fffffff, "L1 table", false },
    { "L1 offset past end", 40, 8, 1ull << 30, "L1 table offset", false },
    { "L1 offset just past end", 40, 8, 4 * 65536, "L1 table offset", false },
    { "L1 offset misaligned", 40, 8, 3 * 65536 + 512, "L1 table offset", false },
    { "L1 offset huge", 40, 8, 0xfffffffffff00000ull, "L1 table offset", false },
    { "virtual size huge", 24, 8, 1ull << 60, "virtual size", false },
    { "encrypted", 32, 4, 1, "crypt_method", false },
    { "refcount table past end", 48, 8, 1ull << 40, "refcount table", false },
    { "refcount table misaligned", 48, 8, 65536 + 8, "refcount table", false },
    { "refcount table empty", 56, 4, 0, "refcount table", false },
    { "refcount table huge", 56, 4, 0xffffffff, "refcount table", false },
    { "snapshots", 60, 4, 0x7fffffff, "snapshot", false },
    { "snapshots (rw)", 60, 4, 1, "snapshot", true },
    { "backing name too long", 16, 4, 1024, "backing file name", false },
    { "backing name huge", 16, 4, 0xffffffff, "backing file name", false },
    { "backing offset past cluster", 8, 8, 65536 - 4, "backing file name", false },
    { "backing offset huge", 8, 8, 0xffffffffffffff00ull, "backing file name", false },
    { "backing offset in header", 8, 8, 16, "backing file name", false },
    { "backing format length 0", 116, 4, 0, "backing format", false },
    { "backing format length 40", 116, 4, 40, "extension", false },
    { "extension past cluster", 116, 4, 0xfffff0, "extension", false },
    { "file too small", 0, 0, 50, "too small", false },
    { "empty file", 0, 0, 0, "too small", false },
  };

  (void) state;
  tu_write_file (base, "", 0);
  unlink (good);
  assert_int_equal (qcow2_create (good, &o), 0);
  fsize = tu_file_size (good);
  assert_int_equal (fsize, 4 * 65536);   /* header, reftable, block, L1 */

  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    const struct bad *c = &cases[i];
    size_t n1, n2;
    char *before, *after;

    tu_copy_file (good, bad);
    if (c->width == 4)
      tu_patch_be32 (bad, c->offset, (uint32_t) c->value);
    else if (c->width == 8)
      tu_patch_be64 (bad, c->offset, c->value);
    else
      assert_int_equal (truncate (bad, (off_t) c->value), 0);
    before = tu_read_file (bad, &n1);

    for (int rw = 0; rw < 2; rw++) {
      struct layer *l;
      errno = 0;
      l = qcow2_open (bad, !rw, 0);
      if (!rw && c->ro_ok) {
        if (l == NULL)
          print_error ("%s: read-only open failed: %s\n", c->what,
                       cow_last_error ());
        assert_non_null (l);
        l->ops->close (l);
        continue;
      }
      if (l != NULL) {
        print_error ("%s: %s open succeeded\n", c->what, rw ? "rw" : "ro");
        l->ops->close (l);
        fail ();
      }
      if (strstr (cow_last_error (), c->field) == NULL
          || strstr (cow_last_error (), bad) == NULL) {
        print_error ("%s: message '%s' does not name '%s' and the file\n",
                     c->what, cow_last_error (), c->field);
        fail ();
      }
      assert_true (cow_last_errno () != 0);
    }
    /* Refusing never changes what is stored. */
    after = tu_read_file (bad, &n2);
    assert_int_equal (n1, n2);
    assert_memory_equal (before, after, n1);
    free (before);
    free (after);
  }

  /* Through the public API too: the message reaches cow_last_error. */
  {
    struct cow_disk_config cfg = {
      .base = base, .base_format = "raw", .overlay = bad,
    };
    tu_copy_file (good, bad);
    tu_patch_be32 (bad, 96, 7);
    assert_null (cow_disk_open (&cfg));
    tu_assert_contains (cow_last_error (), "refcount_order");
  }

  unlink (good);
  unlink (bad);
  unlink (base);
  free (good);
  free (bad);
  free (base);
}

/* Random damage to the metadata of an image with data: opening and
 * reading it may fail, but must not crash (run under ASan), and a
 * read-only open never changes the file. */
static void
test_fuzz_metadata (void **state)
{
  struct fx f;
  uint64_t seed = 42;
  size_t n;
  char *good, *bad;
  uint8_t *img;
  uint8_t *buf = malloc (1 << 20);

  (void) state;
  assert_non_null (buf);
  fx_init (&f, "fuzz.qcow2", 1 << 20, 1 << 20, 512, 0, 3);
  for (int i = 0; i < 40; i++)
    fx_write_random (&f, (uint32_t) (1 + tu_rand_below (&seed, 3000)),
                     tu_rand_below (&seed, (1 << 20) - 3000));
  fx_zero (&f, 8192, 65536);
  fx_close_layer (&f);
  tu_assert_check_clean (f.img);
  good = tu_path (dir, "fuzz.good");
  bad = tu_path (dir, "fuzz.bad");
  tu_copy_file (f.img, good);
  img = tu_read_file (good, &n);

  for (int it = 0; it < 120; it++) {
    uint8_t *copy = malloc (n);
    struct layer *l;
    int flips = 1 + (int) tu_rand_below (&seed, 8);

    memcpy (copy, img, n);
    for (int k = 0; k < flips; k++) {
      /* Mostly the header, reftable, first refcount block, L1 and the
       * first L2 tables. */
      uint64_t lim = tu_rand_below (&seed, 2) ? 512 * 32 : n;
      uint64_t at = tu_rand_below (&seed, lim);
      copy[at] ^= (uint8_t) (1u << tu_rand_below (&seed, 8));
    }
    tu_write_file (bad, copy, n);
    l = qcow2_open (bad, true, 0);
    if (l) {
      struct layer_below b = fx_below (&f);
      for (uint64_t off = 0; off < l->size && off < (1 << 20); off += 65536)
        l->ops->read (l, buf, 65536, off, &b);
      l->ops->close (l);
    }
    else
      assert_true (strlen (cow_last_error ()) > 0);
    {
      size_t m;
      uint8_t *after = tu_read_file (bad, &m);
      assert_int_equal (m, n);
      assert_memory_equal (after, copy, n);
      free (after);
    }
    /* Writable: writes may fail on a damaged image, but not crash. */
    l = qcow2_open (bad, false, 16384);
    if (l) {
      struct layer_below b = fx_below (&f);
      for (int k = 0; k < 8; k++) {
        uint64_t off = tu_rand_below (&seed, l->size > 4096 ? l->size - 4096 : 1);
        l->ops->write (l, buf, 4096, off, &b);
        l->ops->read (l, buf, 4096, off, &b);
      }
      l->ops->close (l);
    }
    free (copy);
  }
  free (img);
  free (buf);
  unlink (good);
  unlink (bad);
  free (good);
  free (bad);
  fx_fini (&f);
}

/*----------------------------------------------------------------------
 * L1/L2 lookup and allocation. */

static void
test_lookup_alloc (void **state)
{
  struct fx f;
  const uint32_t c = 65536;
  enum qcow2_ctype t;
  uint64_t h, h0, h5, h6, h7, h9;
  uint8_t *buf = malloc (3 * c);

  (void) state;
  assert_non_null (buf);
  fx_init (&f, "lookup.qcow2", 16 << 20, 16 << 20, c, 0, 11);

  for (uint64_t gc = 0; gc < 256; gc++) {
    get_cluster (f.l, gc, &t, &h);
    assert_int_equal (t, QCOW2_UNALLOCATED);
  }
  /* Past the L1 table: an error, not a crash. */
  pthread_mutex_lock (&Q (f.l)->lock);
  assert_int_equal (qcow2_get_cluster (Q (f.l), 1ull << 40, &t, &h), -1);
  pthread_mutex_unlock (&Q (f.l)->lock);

  /* One byte: the rest of the cluster is copied from below. */
  fx_write_random (&f, 1, 100);
  get_cluster (f.l, 0, &t, &h0);
  assert_int_equal (t, QCOW2_NORMAL);
  assert_int_equal (h0 % c, 0);
  assert_int_equal (refcount (f.l, h0), 1);
  get_cluster (f.l, 1, &t, &h);
  assert_int_equal (t, QCOW2_UNALLOCATED);
  fx_verify_range (&f, 0, 2 * c);

  /* A second write to the same cluster goes in place. */
  fx_write_random (&f, 5000, 3000);
  get_cluster (f.l, 0, &t, &h);
  assert_int_equal (t, QCOW2_NORMAL);
  assert_int_equal (h, h0);

  /* Three whole clusters in one write: contiguous host clusters. */
  tu_fill_random (buf, 3 * c, &f.seed);
  fx_write (&f, buf, 3 * c, 5 * c);
  get_cluster (f.l, 5, &t, &h5);
  assert_int_equal (t, QCOW2_NORMAL);
  get_cluster (f.l, 6, &t, &h6);
  assert_int_equal (t, QCOW2_NORMAL);
  get_cluster (f.l, 7, &t, &h7);
  assert_int_equal (t, QCOW2_NORMAL);
  assert_int_equal (h6, h5 + c);
  assert_int_equal (h7, h6 + c);
  assert_int_equal (refcount (f.l, h5), 1);
  assert_int_equal (refcount (f.l, h6), 1);
  assert_int_equal (refcount (f.l, h7), 1);

  /* A partial write spanning two unallocated clusters: contiguous too. */
  fx_write_random (&f, c, 9 * c + 100);
  get_cluster (f.l, 9, &t, &h9);
  assert_int_equal (t, QCOW2_NORMAL);
  get_cluster (f.l, 10, &t, &h);
  assert_int_equal (t, QCOW2_NORMAL);
  assert_int_equal (h, h9 + c);

  /* Zero of a whole cluster: a ZERO cluster; of part of one: data. */
  fx_zero (&f, c, 5 * c);
  get_cluster (f.l, 5, &t, &h);
  assert_int_equal (t, QCOW2_ZERO);
  fx_zero (&f, 1000, 6 * c + 10);
  get_cluster (f.l, 6, &t, &h);
  assert_int_equal (t, QCOW2_NORMAL);
  assert_int_equal (h, h6);
  /* Zero of an unallocated cluster: ZERO, hiding the base. */
  fx_zero (&f, c, 20 * c);
  get_cluster (f.l, 20, &t, &h);
  assert_int_equal (t, QCOW2_ZERO);
  /* Trim: whole clusters only. */
  fx_trim (&f, c + 200, 7 * c - 100);
  get_cluster (f.l, 7, &t, &h);
  assert_int_equal (t, QCOW2_ZERO);
  get_cluster (f.l, 8, &t, &h);
  assert_int_equal (t, QCOW2_UNALLOCATED);
  fx_trim (&f, 100, 9 * c);         /* partial: nothing happens */
  get_cluster (f.l, 9, &t, &h);
  assert_int_equal (t, QCOW2_NORMAL);
  fx_verify (&f);

  /* A write into a ZERO cluster allocates a new one, zero-filled. */
  fx_write_random (&f, 10, 20 * c + 30);
  get_cluster (f.l, 20, &t, &h);
  assert_int_equal (t, QCOW2_NORMAL);
  fx_verify_range (&f, 20 * c, c);

  /* Freed clusters are released after a flush (twice: the second one
   * writes the refcounts the first one freed), and 0 after reopening. */
  fx_flush (&f);
  fx_flush (&f);
  assert_int_equal (refcount (f.l, h5), 0);
  assert_int_equal (refcount (f.l, h7), 0);
  fx_reopen (&f);
  assert_int_equal (refcount (f.l, h0), 1);
  assert_int_equal (refcount (f.l, h5), 0);
  assert_int_equal (refcount (f.l, h6), 1);
  assert_int_equal (refcount (f.l, h7), 0);
  get_cluster (f.l, 5, &t, &h);
  assert_int_equal (t, QCOW2_ZERO);
  get_cluster (f.l, 6, &t, &h);
  assert_int_equal (t, QCOW2_NORMAL);
  get_cluster (f.l, 7, &t, &h);
  assert_int_equal (t, QCOW2_ZERO);
  fx_verify (&f);

  /* Rewriting a freed-and-released cluster's guest cluster reuses the
   * freed storage or the end of the file, never a live cluster. */
  for (int i = 0; i < 4; i++) {
    fx_trim (&f, c, 0);
    fx_flush (&f);
    fx_flush (&f);
    fx_write_random (&f, 10, 10);
    get_cluster (f.l, 0, &t, &h);
    assert_int_equal (t, QCOW2_NORMAL);
    assert_true (h != h6 && h != h9 && h != h9 + c);
    assert_int_equal (refcount (f.l, h), 1);
  }
  fx_verify (&f);
  fx_close_layer (&f);
  tu_assert_check_clean (f.img);
  fx_qemu_compare (&f);
  free (buf);
  fx_fini (&f);
}

/*----------------------------------------------------------------------
 * Extended L2 entries (subclusters). */

/* The L2 entry of guest cluster gc: descriptor and bitmap (0, 0 without
 * an L2 table). */
static void
ext_entry (struct layer *l, uint64_t gc, uint64_t *desc, uint64_t *bm)
{
  struct qcow2 *q = Q (l);
  uint64_t per = 1ull << q->l2_bits, off, *t;

  assert_true (q->ext_l2);
  pthread_mutex_lock (&q->lock);
  off = q->l1[gc / per] & QCOW2_OFFSET_MASK;
  *desc = *bm = 0;
  if (off) {
    t = qcow2_cache_lookup (q->l2_cache, off);
    assert_non_null (t);
    *desc = be64_get (&t[2 * (gc % per)]);
    *bm = be64_get (&t[2 * (gc % per) + 1]);
    qcow2_cache_put (q->l2_cache, t);
  }
  pthread_mutex_unlock (&q->lock);
}

static void
assert_bitmap (struct layer *l, uint64_t gc, uint64_t alloc, uint64_t zero)
{
  uint64_t d, bm;

  ext_entry (l, gc, &d, &bm);
  if (bm != qcow2_sc_bitmap (alloc, zero))
    print_error ("cluster %" PRIu64 ": bitmap 0x%016" PRIx64 ", expected "
                 "0x%016" PRIx64 "\n", gc, bm, qcow2_sc_bitmap (alloc, zero));
  assert_int_equal (bm, qcow2_sc_bitmap (alloc, zero));
  assert_int_equal (d != 0, alloc != 0);
}

static void
assert_map (struct layer *l, uint64_t off, uint64_t count,
            enum layer_status want, uint64_t want_len)
{
  uint64_t len;
  enum layer_status st;

  assert_int_equal (l->ops->map (l, off, count, &len, &st), 0);
  if (st != want || len != want_len)
    print_error ("map at %" PRIu64 ": status %d len %" PRIu64 ", expected "
                 "%d len %" PRIu64 "\n", off, st, len, want, want_len);
  assert_int_equal (st, want);
  assert_int_equal (len, want_len);
}

/* Writes at subcluster edges: only the touched subclusters are written
 * and marked; partial ones are filled from below or zero; map, zero and
 * trim work per subcluster; QEMU agrees (check, compare, qemu-io). */
static void
test_subclusters_edges (void **state)
{
  struct fx f;
  const uint32_t c = 65536, sc = c / 32;
  uint64_t d1, d2, bm;
  uint8_t pat[3 * 2048];
  char *out = NULL;
  int st;

  (void) state;
  fx_ext = true;
  fx_init (&f, "subcl.qcow2", 8 << 20, 8 << 20, c, 0, 41);
  fx_ext = false;
  assert_true (Q (f.l)->ext_l2);
  assert_int_equal (Q (f.l)->l2_bits, 12);
  assert_int_equal (Q (f.l)->sc_bits, 11);

  /* 4K aligned to subclusters: two subclusters, nothing copied. */
  fx_write_random (&f, 4096, 1 * c + 3 * sc);
  assert_bitmap (f.l, 1, 0x18, 0);
  ext_entry (f.l, 1, &d1, &bm);
  assert_map (f.l, 1 * c, c, LAYER_ABSENT, 3 * sc);
  assert_map (f.l, 1 * c + 3 * sc, c, LAYER_DATA, 2 * sc);
  assert_map (f.l, 1 * c + 5 * sc, c - 5 * sc, LAYER_ABSENT, c - 5 * sc);
  /* Unaligned inside one subcluster: the rest of it from below. */
  fx_write_random (&f, 100, 2 * c + 1000);
  assert_bitmap (f.l, 2, 0x1, 0);
  /* Partial at both ends over four subclusters. */
  fx_write_random (&f, 5000, 3 * c + 1500);
  assert_bitmap (f.l, 3, 0xf, 0);
  /* Across a cluster boundary: the last subcluster of one cluster and
   * the first of the next. */
  fx_write_random (&f, 3000, 5 * c - 1000);
  assert_bitmap (f.l, 4, 1ull << 31, 0);
  assert_bitmap (f.l, 5, 0x1, 0);
  /* In place into an unallocated subcluster of a cluster of our own: the
   * same host cluster, one more bit. */
  fx_write_random (&f, 10, 1 * c + 100);
  ext_entry (f.l, 1, &d2, &bm);
  assert_int_equal (d1, d2);
  assert_bitmap (f.l, 1, 0x19, 0);
  /* Over allocated and unallocated subclusters at once. */
  fx_write_random (&f, 3 * sc, 1 * c + 2 * sc + 5);
  assert_bitmap (f.l, 1, 0x3d, 0);
  fx_verify_range (&f, 0, 8 * c);

  /* Zero: whole subclusters get the zero bit, partial ones data. */
  fx_zero (&f, 4 * sc, 6 * c + 2 * sc);
  assert_bitmap (f.l, 6, 0, 0x3c);
  assert_map (f.l, 6 * c, c, LAYER_ABSENT, 2 * sc);
  assert_map (f.l, 6 * c + 2 * sc, c, LAYER_ZERO, 4 * sc);
  fx_write_random (&f, 100, 6 * c + 2 * sc + 10);   /* into a zero one */
  assert_bitmap (f.l, 6, 0x4, 0x38);
  fx_zero (&f, sc + 1000, 3 * c + sc - 500);         /* partial ends */
  assert_bitmap (f.l, 3, 0xd, 0x2);
  /* Zero of every allocated subcluster releases the host cluster. */
  fx_zero (&f, 2 * sc, 4 * c + 30 * sc);
  assert_bitmap (f.l, 4, 0, 0xc0000000);
  /* Trim: whole subclusters only; partial ones are left alone. */
  fx_trim (&f, 2 * sc + 100, 1 * c + 2 * sc - 50);
  assert_bitmap (f.l, 1, 0x31, 0xc);
  fx_trim (&f, 100, 2 * c + 10);
  assert_bitmap (f.l, 2, 0x1, 0);
  fx_trim (&f, c, 5 * c);
  assert_bitmap (f.l, 5, 0, 0xffffffff);
  assert_map (f.l, 5 * c, c, LAYER_ZERO, c);
  fx_verify (&f);

  /* Fast zero of a partial subcluster: refused, nothing changes. */
  {
    struct layer_below b = fx_below (&f);
    assert_int_equal (f.l->ops->zero (f.l, 100, 7 * c, true, &b), -1);
    assert_int_equal (f.l->ops->zero (f.l, sc, 7 * c, true, &b), 0);
    memset (f.model + 7 * c, 0, sc);
    assert_bitmap (f.l, 7, 0, 0x1);
  }

  /* A pattern QEMU reads back directly. */
  memset (pat, 0xab, sizeof pat);
  fx_write (&f, pat, sizeof pat, 100 * c + 5 * sc);
  fx_verify (&f);
  fx_reopen (&f);
  fx_verify (&f);
  assert_bitmap (f.l, 1, 0x31, 0xc);
  fx_close_layer (&f);
  tu_assert_check_clean (f.img);
  fx_qemu_compare (&f);
  st = tu_run (&out, "qemu-io -f qcow2 -r -c 'read -P 0xab %u %zu' '%s'",
               100 * c + 5 * sc, sizeof pat, f.img);
  if (st != 0 || strstr (out, "Pattern verification failed"))
    print_error ("qemu-io: exit %d: %s\n", st, out);
  assert_int_equal (st, 0);
  assert_null (strstr (out, "Pattern verification failed"));
  free (out);
  fx_fini (&f);
}

/* Populate (the fill of a pull) fills only the subclusters that neither
 * hold data nor read as zero, in place or in a new cluster; with NULL it
 * marks them zero. */
static void
test_subclusters_populate (void **state)
{
  struct fx f;
  const uint32_t c = 65536, sc = c / 32;
  uint8_t *buf = malloc (4 * c);

  (void) state;
  assert_non_null (buf);
  fx_ext = true;
  fx_init (&f, "subcl-pop.qcow2", 4 << 20, 4 << 20, c, 0, 43);
  fx_ext = false;
  fx_write_random (&f, 2 * sc, 0 * c + 4 * sc);     /* cluster 0: data */
  fx_zero (&f, 2 * sc, 1 * c + 8 * sc);              /* cluster 1: zero */
  fx_write_random (&f, sc, 2 * c);
  fx_zero (&f, sc, 2 * c + 31 * sc);                 /* cluster 2: both */
  /* Populate with other bytes than the model holds: only the absent
   * subclusters may take them. */
  tu_fill_random (buf, 4 * c, &f.seed);
  assert_int_equal (qcow2_layer_populate (f.l, buf, 4 * c, 0), 0);
  for (unsigned gc = 0; gc < 4; gc++)
    for (unsigned s = 0; s < 32; s++) {
      bool held = (gc == 0 && (s == 4 || s == 5))
        || (gc == 1 && (s == 8 || s == 9)) || (gc == 2 && (s == 0 || s == 31));
      if (!held)
        memcpy (f.model + gc * c + s * sc, buf + gc * c + s * sc, sc);
    }
  assert_bitmap (f.l, 0, 0xffffffff, 0);
  assert_bitmap (f.l, 1, 0xffffffff & ~0x300ull, 0x300);
  assert_bitmap (f.l, 2, 0x7fffffff, 0x80000000);
  assert_bitmap (f.l, 3, 0xffffffff, 0);
  fx_verify (&f);
  /* Zero populate marks the absent subclusters zero. */
  fx_write_random (&f, sc, 10 * c + 3 * sc);
  assert_int_equal (qcow2_layer_populate (f.l, NULL, c, 10 * c), 0);
  memset (f.model + 10 * c, 0, 3 * sc);
  memset (f.model + 10 * c + 4 * sc, 0, c - 4 * sc);
  assert_bitmap (f.l, 10, 0x8, 0xfffffff7);
  fx_verify (&f);
  fx_close_layer (&f);
  tu_assert_check_clean (f.img);
  fx_qemu_compare (&f);
  free (buf);
  fx_fini (&f);
}

/* Images qemu-img made with extended_l2=on are read; damaged bitmaps give
 * EIO and are reported by the checker, never wrong data. */
static void
test_subclusters_qemu_and_damage (void **state)
{
  char *img = tu_path (dir, "qemu-extl2.qcow2");
  char *out = NULL;
  struct layer *l;
  uint8_t buf[4096];
  int st;

  (void) state;
  unlink (img);
  st = tu_run (&out, "qemu-img create -q -f qcow2 -o extended_l2=on,"
               "cluster_size=64k '%s' 4M && qemu-io -f qcow2 -c 'write -P 0x5a "
               "4096 4096' -c 'write -z 65536 8192' '%s'", img, img);
  free (out);
  assert_int_equal (st, 0);
  l = qcow2_open (img, LAYER_RDONLY, 0);
  assert_non_null (l);
  assert_true (qcow2_extended_l2 (l));
  assert_int_equal (l->ops->read (l, buf, 4096, 4096, NULL), 0);
  for (size_t i = 0; i < sizeof buf; i++)
    assert_int_equal (buf[i], 0x5a);
  assert_map (l, 0, 65536, LAYER_ABSENT, 4096);
  assert_map (l, 4096, 65536, LAYER_DATA, 4096);
  assert_map (l, 65536, 65536, LAYER_ZERO, 8192);
  l->ops->close (l);

  /* Allocated and zero at once. */
  st = tu_run (&out, "python3 '%s/tests/qcow2-patch.py' '%s' "
               "'l2bm[0]|=0xc00000000'",
               getenv ("abs_top_srcdir") ? getenv ("abs_top_srcdir") : "..",
               img);
  free (out);
  assert_int_equal (st, 0);
  l = qcow2_open (img, LAYER_RDONLY, 0);
  assert_non_null (l);
  assert_int_equal (l->ops->read (l, buf, 4096, 4096, NULL), -1);
  assert_int_equal (errno, EIO);
  assert_non_null (strstr (cow_last_error (), "both"));
  l->ops->close (l);
  st = tu_run (&out, "qemu-img check '%s'", img);
  assert_int_equal (st, 2);
  free (out);

  /* The feature bit on clusters too small for it: refused at open. */
  unlink (img);
  st = tu_run (&out, "qemu-img create -q -f qcow2 -o cluster_size=4k '%s' 4M "
               "&& python3 '%s/tests/qcow2-patch.py' '%s' "
               "'incompatible_features|=16'", img,
               getenv ("abs_top_srcdir") ? getenv ("abs_top_srcdir") : "..",
               img);
  free (out);
  assert_int_equal (st, 0);
  assert_null (qcow2_open (img, LAYER_RDONLY, 0));
  assert_non_null (strstr (cow_last_error (), "extended L2"));
  free (img);
}

/* 512-byte clusters: an L2 table covers 32 KiB, so writes all over a
 * 64 MiB disk need hundreds of L2 tables; a small cache forces
 * evictions of dirty tables. */
static void
test_many_l2_tables (void **state)
{
  struct fx f;
  uint64_t seed = 5;
  const uint64_t size = 64 << 20;
  unsigned l1_used = 0;

  (void) state;
  fx_init (&f, "manyl2.qcow2", size, size, 512, 16384, 13);
  for (int i = 0; i < 600; i++) {
    uint64_t off = tu_rand_below (&seed, size - 2000);
    fx_write_random (&f, (uint32_t) (1 + tu_rand_below (&seed, 1500)), off);
    if (i % 97 == 0)
      fx_flush (&f);
  }
  /* Every 32 KiB slot written at its end boundary too. */
  for (uint64_t off = 32768 - 3; off < size; off += 32768 * 37)
    fx_write_random (&f, 6, off);
  for (uint32_t i = 0; i < Q (f.l)->l1_size; i++)
    if (Q (f.l)->l1[i])
      l1_used++;
  assert_true (l1_used > 400);
  fx_verify (&f);
  fx_reopen (&f);
  fx_verify (&f);
  fx_close_layer (&f);
  tu_assert_check_clean (f.img);
  fx_qemu_compare (&f);
  fx_fini (&f);
}

/* With 512-byte clusters and 16-bit refcounts the first refcount table
 * cluster (64 entries of 256 clusters) covers 8 MiB of file: writing
 * more forces new refcount blocks and a move to a bigger table. */
/* Write the whole disk: 64 KiB writes in order up to big_upto, then
 * write_size writes (in random order if asked) up to small_upto, then
 * 64 KiB writes again. */
static void
reftable_growth (uint32_t write_size, bool random_order, uint64_t big_upto,
                 uint64_t small_upto, uint64_t seed)
{
  struct fx f;
  const uint64_t size = 12 << 20;
  const uint64_t old_reftable = 512;
  uint64_t n = (small_upto - big_upto) / write_size;
  uint64_t *order = malloc ((n ? n : 1) * sizeof *order);
  struct qcow2 *q;
  uint64_t bad = 0;

  assert_non_null (order);
  fx_init (&f, "reftable.qcow2", size, size, 512, 256 * 1024, seed);
  q = Q (f.l);
  assert_int_equal (q->reftable_offset, old_reftable);
  assert_int_equal (q->reftable_clusters, 1);
  for (uint64_t off = 0; off < big_upto; off += 65536)
    fx_write_random (&f, 65536, off);
  for (uint64_t i = 0; i < n; i++)
    order[i] = i;
  if (random_order)
    for (uint64_t i = n - 1; i > 0; i--) {
      uint64_t j = tu_rand_below (&seed, i + 1), t = order[i];
      order[i] = order[j];
      order[j] = t;
    }
  for (uint64_t i = 0; i < n; i++) {
    fx_write_random (&f, write_size, big_upto + order[i] * write_size);
    if (i % 4096 == 4095)
      fx_flush (&f);
  }
  for (uint64_t off = small_upto; off < size; off += 65536)
    fx_write_random (&f, 65536, off);
  q = Q (f.l);
  assert_true (q->reftable_clusters > 1);
  assert_true (q->reftable_offset != old_reftable);
  assert_true (q->file_end > (9u << 20));
  /* Every mapped cluster, and the refcount table itself, has refcount 1. */
  for (uint64_t gc = 0; gc < size / 512; gc++) {
    enum qcow2_ctype t;
    uint64_t h, r;
    get_cluster (f.l, gc, &t, &h);
    assert_int_equal (t, QCOW2_NORMAL);
    if ((r = refcount (f.l, h)) != 1 && bad++ < 5)
      print_error ("guest cluster %" PRIu64 " at host %" PRIu64 " has "
                   "refcount %" PRIu64 "\n", gc, h, r);
  }
  for (uint64_t i = 0; i < q->reftable_clusters; i++) {
    uint64_t r = refcount (f.l, q->reftable_offset + i * 512);
    if (r != 1 && bad++ < 10)
      print_error ("refcount table cluster %" PRIu64 " (host %" PRIu64
                   ") has refcount %" PRIu64 ", want 1\n", i,
                   q->reftable_offset + i * 512, r);
  }
  fx_verify (&f);
  fx_reopen (&f);
  fx_verify (&f);
  fx_close_layer (&f);
  {
    struct tu_check c;
    tu_qemu_check (f.img, &c);
    free (c.output);
    assert_int_equal (bad, 0);
    assert_int_equal (c.status, 0);
  }
  fx_qemu_compare (&f);
  free (order);
  fx_fini (&f);
}

static void
test_reftable_growth_sequential (void **state)
{
  (void) state;
  reftable_growth (65536, false, 0, 0, 1);
}

static void
test_reftable_growth_random (void **state)
{
  (void) state;
  reftable_growth (4096, true, 0, 12 << 20, 2);
}

/* Single-cluster allocations: the end of the file crosses the 8 MiB
 * boundary exactly at an allocation, so the new refcount table lands in
 * a range that has no refcount block yet. */
static void
test_reftable_growth_single_clusters (void **state)
{
  (void) state;
  /* The file reaches 8 MiB while the 512-byte writes run. */
  reftable_growth (512, true, 7 << 20, 9 << 20, 3);
}

/*----------------------------------------------------------------------
 * A flush that races a move of the refcount table: the flush copies the
 * refcount table under the lock, then writes it without the lock.  Here
 * a writer moves the table in that window (deterministically: from the
 * seam, during the flush's first fsync).  After the flush returns, the
 * file must be consistent: a copy of it taken then must pass qemu-img
 * check (that copy is what a power loss right after the flush leaves).
 */

static struct fx race_fx;
static int race_armed;
static pthread_t race_thread;
static void *(*race_fn) (void *);
/* The racing thread cannot use cmocka's asserts: it reports here. */
static char race_error[512];

static void
race_fail (const char *what, uint64_t off)
{
  if (race_error[0] == '\0')
    snprintf (race_error, sizeof race_error, "%s at %" PRIu64 ": %s", what,
              off, cow_last_error ());
}

static uint64_t
file_end_clusters (struct qcow2 *q)
{
  uint64_t e;

  pthread_mutex_lock (&q->lock);
  e = q->file_end >> q->cluster_bits;
  pthread_mutex_unlock (&q->lock);
  return e;
}

/* Write fresh clusters of the upper half (whose L2 tables exist) until
 * the refcount table has moved.  The write that moves it straddles the
 * 8 MiB boundary of the file (cluster 16384), so that the new table
 * lands where a refcount block already exists. */
static void *
race_writer (void *arg)
{
  struct fx *f = arg;
  struct qcow2 *q = Q (f->l);
  uint64_t off = f->size / 2;
  uint8_t buf[32768];
  struct layer_below b = fx_below (f);

  memset (buf, 0xa5, sizeof buf);
  while (q->reftable_clusters == 1) {
    uint64_t gap = 16384 - file_end_clusters (q);
    uint32_t len = 4096;
    if (gap <= 24) {
      off = (off + 32767) & ~32767ull;     /* within one L2 table */
      len = (uint32_t) (gap + 2) * 512;
    }
    if (off + len > f->size) {
      race_fail ("no room", off);
      break;
    }
    if (f->l->ops->write (f->l, buf, len, off, &b) == -1) {
      race_fail ("write", off);
      break;
    }
    memcpy (f->model + off, buf, len);
    off += len;
  }
  return NULL;
}

static pthread_mutex_t race_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t race_cv = PTHREAD_COND_INITIALIZER;
static bool race_done, race_started;

static void *
race_wrap (void *arg)
{
  race_fn (arg);
  pthread_mutex_lock (&race_mu);
  race_done = true;
  pthread_cond_signal (&race_cv);
  pthread_mutex_unlock (&race_mu);
  return NULL;
}

/* Inside qcow2_layer_flush, between its collect and its writes, with no
 * lock held: another request runs now.  The flush waits for it to
 * finish (up to 2 s: an engine that makes the request wait for the
 * flush is not wrong), then goes on. */
static int
race_fsync (int fd)
{
  if (__atomic_exchange_n (&race_armed, 0, __ATOMIC_SEQ_CST)) {
    struct timespec ts;
    race_done = false;
    if (pthread_create (&race_thread, NULL, race_wrap, &race_fx) != 0)
      abort ();
    race_started = true;
    clock_gettime (CLOCK_REALTIME, &ts);
    ts.tv_sec += 2;
    pthread_mutex_lock (&race_mu);
    while (!race_done)
      if (pthread_cond_timedwait (&race_cv, &race_mu, &ts) != 0)
        break;
    pthread_mutex_unlock (&race_mu);
  }
  return fast_ops.fsync (fd);
}

/* Flush with another request racing it (see race_fsync). */
static int
racing_flush (struct fx *f, void *(*fn) (void *))
{
  struct io_ops ops = fast_ops;
  int r;

  ops.fsync = race_fsync;
  race_fn = fn;
  race_error[0] = '\0';
  race_started = false;
  io_set_ops (&ops);
  race_armed = 1;
  r = f->l->ops->flush (f->l);
  if (race_started)
    pthread_join (race_thread, NULL);
  io_set_ops (&fast_ops);
  assert_int_equal (race_armed, 0);
  assert_true (race_started);
  if (r == -1)
    print_error ("flush: %s\n", cow_last_error ());
  if (race_error[0])
    print_error ("the racing request failed: %s\n", race_error);
  assert_int_equal (race_error[0], '\0');
  return r;
}

static void
test_flush_races_reftable_move (void **state)
{
  struct fx *f = &race_fx;
  struct qcow2 *q;
  char *snap = tu_path (dir, "race.snapshot");
  uint64_t i;
  int r;

  (void) state;
  fx_init (f, "race.qcow2", 16 << 20, 0, 512, 256 * 1024, 21);
  q = Q (f->l);
  /* L2 tables for the upper half, without data. */
  fx_zero (f, 8 << 20, 8 << 20);
  /* Fill the file up to 8 MiB - 192 KiB: the next refcount block
   * boundary is then 8 MiB - 128 KiB, still within the first table. */
  for (i = 0; q->file_end < (8u << 20) - 192 * 1024; i++)
    fx_write_random (f, 4096, i * 4096);
  fx_flush (f);
  /* Make the refcount table dirty: write until a new refcount block
   * has been made. */
  while (!q->reftable_dirty) {
    fx_write_random (f, 512, i * 4096);
    i++;
  }
  assert_int_equal (q->reftable_clusters, 1);
  assert_true (q->file_end < (8u << 20) - 64 * 1024);

  r = racing_flush (f, race_writer);
  assert_int_equal (r, 0);
  assert_true (q->reftable_clusters > 1);

  /* What is on disk right now must be a consistent image: the table in
   * the file matches the one in memory, and a copy of the file passes
   * qemu-img check. */
  {
    size_t n;
    uint8_t *img = tu_read_file (f->img, &n);
    uint64_t bad = 0, first_bad = 0;
    for (uint64_t k = 0; k < q->reftable_entries; k++) {
      uint64_t want = q->reftable[k], got = 0;
      for (int bte = 0; bte < 8; bte++)
        got = got << 8 | img[q->reftable_offset + k * 8 + bte];
      if (got != want && bad++ == 0)
        first_bad = k;
    }
    if (bad)
      print_error ("%" PRIu64 " refcount table entries in the file differ "
                   "from memory, the first is entry %" PRIu64 "\n", bad,
                   first_bad);
    free (img);
    tu_copy_file (f->img, snap);
    tu_assert_check_no_corruption (snap);
    assert_int_equal (bad, 0);
  }
  fx_verify (f);
  fx_close_layer (f);
  tu_assert_check_clean (f->img);
  unlink (snap);
  free (snap);
  fx_fini (f);
}

/* Entries of the refcount table in the file that differ from memory. */
static uint64_t
reftable_mismatches (struct fx *f, uint64_t *first_bad)
{
  struct qcow2 *q = Q (f->l);
  size_t n;
  uint8_t *img = tu_read_file (f->img, &n);
  uint64_t bad = 0;

  for (uint64_t k = 0; k < q->reftable_entries; k++) {
    uint64_t want = q->reftable[k], got = 0;
    for (int bte = 0; bte < 8; bte++)
      got = got << 8 | img[q->reftable_offset + k * 8 + bte];
    if (got != want && bad++ == 0)
      *first_bad = k;
  }
  free (img);
  return bad;
}

/* The other writer of the refcount table: evicting a dirty L2 table
 * writes the refcount blocks and the table first (qcow2_cache_get ->
 * write_slot -> qcow2_reftable_writeback).  Here that happens, with new
 * refcount blocks, while a flush holds an older copy of the table that
 * it is about to write. */
static void *
race_evictor (void *arg)
{
  struct fx *f = arg;
  uint8_t buf[512];
  struct layer_below b = fx_below (f);

  memset (buf, 0x5a, sizeof buf);
  /* One cluster in each of 400 fresh 32 KiB regions: 800 new clusters
   * (data and L2 tables), new refcount blocks, and with 4 cache slots
   * many evictions of dirty L2 tables. */
  for (uint64_t i = 0; i < 400; i++) {
    uint64_t off = f->size / 2 + i * 32768;
    if (f->l->ops->write (f->l, buf, sizeof buf, off, &b) == -1) {
      race_fail ("write", off);
      break;
    }
    memcpy (f->model + off, buf, sizeof buf);
  }
  return NULL;
}

static void
test_flush_races_reftable_writeback (void **state)
{
  struct fx *f = &race_fx;
  struct qcow2 *q;
  uint64_t i, bad, first_bad = 0;
  int r;

  (void) state;
  /* Eight L2 and four refcount block slots. */
  fx_init (f, "race2.qcow2", 32 << 20, 0, 512, 8 * 512, 22);
  q = Q (f->l);
  /* Fill the file to a little before a refcount block boundary (every
   * 256 clusters), flush; then allocate clusters in one L2 region until
   * a new refcount block makes the table dirty: the flush then holds
   * few tables pinned. */
  for (i = 0; ((q->file_end >> 9) & 255) < 232; i++)
    fx_write_random (f, 4096, i * 4096);
  fx_flush (f);
  i = (i * 4096 + 32767) / 32768 * 32768;
  while (!q->reftable_dirty) {
    fx_write_random (f, 512, i);
    i += 512;
  }
  assert_true (i < f->size / 2);

  r = racing_flush (f, race_evictor);
  assert_int_equal (r, 0);

  bad = reftable_mismatches (f, &first_bad);
  if (bad)
    print_error ("after the flush %" PRIu64 " refcount table entries in the "
                 "file differ from memory (the first: entry %" PRIu64 "); "
                 "memory says the table is %s\n", bad, first_bad,
                 q->reftable_dirty ? "dirty" : "clean");
  fx_verify (f);
  fx_close_layer (f);
  /* After a clean close the file must be consistent. */
  tu_assert_check_clean (f->img);
  assert_int_equal (bad, 0);
  fx_fini (f);
}

/* A request that needs a metadata table while a flush has every cache
 * slot pinned for writing must not fail: it may wait, or use another
 * slot, but ENOMEM "metadata cache exhausted" reaches the guest as a
 * failed write.  (A small cache_size is a supported setting.) */
static void *
race_new_region (void *arg)
{
  struct fx *f = arg;
  uint8_t buf[512];
  struct layer_below b = fx_below (f);
  uint64_t off = f->size - 32768;

  memset (buf, 0x3c, sizeof buf);
  if (f->l->ops->write (f->l, buf, sizeof buf, off, &b) == -1)
    race_fail ("write", off);
  else
    memcpy (f->model + off, buf, sizeof buf);
  return NULL;
}

static void
test_flush_pins_whole_cache (void **state)
{
  struct fx *f = &race_fx;
  int r;

  (void) state;
  /* Four L2 table slots, all dirty at the flush. */
  fx_init (f, "race3.qcow2", 4 << 20, 0, 512, 4 * 512, 23);
  fx_flush (f);
  for (uint64_t i = 0; i < 4; i++)
    fx_write_random (f, 512, i * 32768);
  r = racing_flush (f, race_new_region);
  assert_int_equal (r, 0);
  fx_verify (f);
  fx_close_layer (f);
  tu_assert_check_clean (f->img);
  fx_fini (f);
}

/*----------------------------------------------------------------------
 * A flush that fails.  Clusters dropped by an L2 change (trim, zero)
 * may be reused only once that change is on disk: a failed flush must
 * release none of them, whichever of its steps failed, and must not
 * report success; the next flush that succeeds releases them.
 *
 * The flush fails at its Nth pwrite or fsync, for every N until it
 * succeeds.  After a failure a second flush fails too, at its first
 * pwrite after an fsync (the L2 tables or the refcount table: the
 * refcount blocks are written by then), and a copy of the file, what a
 * crash then leaves, must pass qemu-img check: had the failed flush
 * released a cluster, its refcount 0 would be on disk under an L2 entry
 * that still points at it. */

/* Faults on pwrite and fsync (faultio.h): FAULT_NTH fails the op with
 * index nth alone (both kinds counted), FAULT_AFTER_SYNC every pwrite
 * after the first fsync. */
enum { FAULT_NTH = 1, FAULT_AFTER_SYNC };
static bool fault_synced;       /* FAULT_AFTER_SYNC: an fsync was seen */

static bool
after_sync (unsigned op, const char *path, const char *path2, int fd)
{
  if (op == FIO_FSYNC) {
    fault_synced = true;
    return false;
  }
  return fault_synced;
}

static void
fault_arm (int mode, int nth)
{
  fault_synced = false;
  if (mode == FAULT_NTH)
    fio_arm (&(struct fio_fault) { .at = nth, .once = true,
                                   .ops = FIO_PWRITE | FIO_FSYNC });
  else
    fio_arm (&(struct fio_fault) { .at = 0, .filter = after_sync,
                                   .ops = FIO_PWRITE | FIO_FSYNC });
  io_set_ops (fio_ops ());
}

static void
fault_disarm (void)
{
  io_set_ops (&fast_ops);
  fio_disarm ();
}

/* One run: data in 16 clusters, flushed; 8 of them trimmed (and, if
 * l1_dirty, a range without an L2 table zeroed, so that the flush has
 * the L1 table to write too); the flush fails at its op nth.  Returns
 * false once the flush had fewer ops than that (it then succeeded). */
static bool
flush_fails_at (bool l1_dirty, int nth)
{
  struct fx f;
  const uint32_t c = 4096;
  const uint64_t region = (uint64_t) c * (c / 8);   /* one L2 table's */
  char what[64];
  uint64_t freed[8];
  int r;

  snprintf (what, sizeof what, "flushfail%d-%d.qcow2", l1_dirty, nth);
  fx_init (&f, what, 4 * region, 0, c, 0, 31 + (uint64_t) nth);
  fx_write_random (&f, 16 * c, 0);
  fx_flush (&f);
  for (int i = 0; i < 8; i++) {
    enum qcow2_ctype t;
    get_cluster (f.l, 4 + (uint64_t) i, &t, &freed[i]);
    assert_int_equal (t, QCOW2_NORMAL);
  }
  fx_trim (&f, 8 * c, 4 * c);
  if (l1_dirty)
    fx_zero (&f, 4 * c, 2 * region);

  fault_arm (FAULT_NTH, nth);
  r = f.l->ops->flush (f.l);
  fault_disarm ();
  if (fio_failed () == 0) {
    /* Fewer steps than nth: the flush went through, and released. */
    if (r == -1)
      print_error ("%s: flush without a fault: %s\n", what,
                   cow_last_error ());
    assert_int_equal (r, 0);
    for (int i = 0; i < 8; i++)
      assert_int_equal (refcount (f.l, freed[i]), 0);
    fx_verify (&f);
    fx_close_layer (&f);
    tu_assert_check_clean (f.img);
    fx_fini (&f);
    return false;
  }
  if (r != -1)
    print_error ("%s: the flush failed at op %d but reported success\n",
                 what, nth);
  assert_int_equal (r, -1);
  /* Nothing released: the trimmed clusters keep their refcount. */
  for (int i = 0; i < 8; i++) {
    uint64_t ref = refcount (f.l, freed[i]);
    if (ref != 1)
      print_error ("%s: cluster at %" PRIu64 " has refcount %" PRIu64
                   " after the failed flush, want 1\n", what, freed[i], ref);
    assert_int_equal (ref, 1);
  }

  /* A second failure, after the refcount blocks were written: a crash
   * now leaves this copy. */
  fault_arm (FAULT_AFTER_SYNC, 0);
  r = f.l->ops->flush (f.l);
  fault_disarm ();
  assert_int_equal (r, -1);
  {
    char *copy = tu_path (dir, "flushfail.copy");
    tu_copy_file (f.img, copy);
    tu_assert_check_no_corruption (copy);
    unlink (copy);
    free (copy);
  }

  /* New data: it must not land in a trimmed cluster yet. */
  for (uint64_t gc = 32; gc < 40; gc++) {
    enum qcow2_ctype t;
    uint64_t h;
    fx_write_random (&f, c, gc * c);
    get_cluster (f.l, gc, &t, &h);
    for (int i = 0; i < 8; i++)
      if (h == freed[i]) {
        print_error ("%s: guest cluster %" PRIu64 " was written to host "
                     "%" PRIu64 ", trimmed by an L2 change not on disk\n",
                     what, gc, h);
        fail ();
      }
  }

  /* A flush that works finishes the job. */
  fx_flush (&f);
  for (int i = 0; i < 8; i++)
    assert_int_equal (refcount (f.l, freed[i]), 0);
  fx_write_random (&f, 8 * c, 48 * c);
  fx_verify (&f);
  fx_reopen (&f);
  fx_verify (&f);
  fx_close_layer (&f);
  tu_assert_check_no_corruption (f.img);
  fx_qemu_compare (&f);
  fx_fini (&f);
  return true;
}

static void
test_flush_fails_l1_clean (void **state)
{
  int n;

  (void) state;
  for (n = 0; flush_fails_at (false, n); n++)
    ;
  print_message ("the flush failed at each of its %d steps\n", n);
  assert_true (n >= 3);
}

static void
test_flush_fails_l1_dirty (void **state)
{
  int n;

  (void) state;
  for (n = 0; flush_fails_at (true, n); n++)
    ;
  print_message ("the flush failed at each of its %d steps\n", n);
  assert_true (n >= 6);
}

/*----------------------------------------------------------------------
 * The backing name rewritten while the refcount table grows.  A job's
 * last step rewrites the header of a layer that the guest may be
 * writing (qcow2_set_backing); a refcount table that moves meanwhile
 * must stay the one the header names.  512-byte clusters: the table
 * moves at 8, 24 and 56 MiB of file.  The header read of the rewrite is
 * slowed down through the seam so that the moves fall inside it. */

static int grow_fd;             /* the layer's own descriptor */

static ssize_t
slow_header_pread (int fd, void *buf, size_t n, off_t off)
{
  ssize_t r = fast_ops.pread (fd, buf, n, off);

  if (off == 0 && fd != __atomic_load_n (&grow_fd, __ATOMIC_RELAXED))
    usleep (500);
  return r;
}

/* Does the header in the file name another refcount table than memory?
 * Caller holds the lock. */
static bool
header_reftable_differs (struct fx *f, uint64_t *offset)
{
  struct qcow2 *q = Q (f->l);
  uint8_t h[12];
  uint64_t off = 0;
  uint32_t clusters = 0;
  int fd = open (f->img, O_RDONLY);

  assert_true (fd >= 0);
  assert_int_equal (pread (fd, h, sizeof h, 48), (ssize_t) sizeof h);
  close (fd);
  for (int i = 0; i < 8; i++)
    off = off << 8 | h[i];
  for (int i = 8; i < 12; i++)
    clusters = clusters << 8 | h[i];
  *offset = off;
  return off != q->reftable_offset || clusters != q->reftable_clusters;
}

/* Fresh 4 KiB runs in random order over the whole disk. */
static void *
grow_writer (void *arg)
{
  struct fx *f = arg;
  uint64_t n = f->size / 4096, seed = f->seed;
  uint64_t *order = malloc (n * sizeof *order);
  struct layer_below b = fx_below (f);
  uint8_t buf[4096];

  if (order == NULL) {
    race_fail ("malloc", 0);
    return NULL;
  }
  for (uint64_t i = 0; i < n; i++)
    order[i] = i;
  for (uint64_t i = n - 1; i > 0; i--) {
    uint64_t j = tu_rand_below (&seed, i + 1), t = order[i];
    order[i] = order[j];
    order[j] = t;
  }
  for (uint64_t i = 0; i < n; i++) {
    uint64_t off = order[i] * 4096;
    tu_fill_random (buf, sizeof buf, &seed);
    if (f->l->ops->write (f->l, buf, sizeof buf, off, &b) == -1) {
      race_fail ("write", off);
      break;
    }
    memcpy (f->model + off, buf, sizeof buf);
  }
  free (order);
  __atomic_store_n (&race_done, true, __ATOMIC_RELEASE);
  return NULL;
}

static void
test_set_backing_races_reftable_growth (void **state)
{
  struct fx *f = &race_fx;
  struct io_ops ops = fast_ops;
  struct qcow2 *q;
  pthread_t t;
  char names[2][64];
  unsigned long calls = 0, bad = 0;
  uint64_t moved_back = 0;
  struct tu_check check = { 0 };
  char *bf;

  (void) state;
  fx_init (f, "setbacking.qcow2", 64 << 20, 0, 512, 256 * 1024, 24);
  q = Q (f->l);
  snprintf (names[0], sizeof names[0], "setbacking.qcow2.base");
  snprintf (names[1], sizeof names[1], "./setbacking.qcow2.base");
  grow_fd = q->fd;
  ops.pread = slow_header_pread;
  io_set_ops (&ops);
  race_error[0] = '\0';
  race_done = false;
  assert_int_equal (pthread_create (&t, NULL, grow_writer, f), 0);
  while (!__atomic_load_n (&race_done, __ATOMIC_ACQUIRE)) {
    const char *name = names[calls % 2];
    if (qcow2_set_backing (f->l, name, "raw") == -1) {
      print_error ("qcow2_set_backing: %s\n", cow_last_error ());
      fail ();
    }
    calls++;
    /* The header in the file names the table in memory (every writer
     * of the header holds the lock). */
    pthread_mutex_lock (&q->lock);
    if (header_reftable_differs (f, &moved_back) && bad++ == 0) {
      char *copy = tu_path (dir, "setbacking.copy");
      tu_copy_file (f->img, copy);
      print_error ("after rewrite %lu the header names the refcount table "
                   "at %" PRIu64 ", not the one at %" PRIu64 "\n", calls,
                   moved_back, q->reftable_offset);
      pthread_mutex_unlock (&q->lock);
      /* What a crash now leaves. */
      tu_qemu_check (copy, &check);
      free (check.output);
      unlink (copy);
      free (copy);
      continue;
    }
    pthread_mutex_unlock (&q->lock);
  }
  pthread_join (t, NULL);
  io_set_ops (&fast_ops);
  if (race_error[0])
    print_error ("the writer failed: %s\n", race_error);
  assert_int_equal (race_error[0], '\0');
  print_message ("%lu backing name rewrites; the refcount table is now %u "
                 "clusters at %" PRIu64 "\n", calls, q->reftable_clusters,
                 q->reftable_offset);
  assert_true (q->reftable_clusters >= 7);
  assert_true (calls >= 10);
  assert_int_equal (bad, 0);

  fx_flush (f);
  fx_verify (f);
  fx_close_layer (f);
  tu_assert_check_clean (f->img);
  bf = tu_qemu_info_str (f->img, "backing-filename");
  assert_non_null (bf);
  assert_string_equal (bf, names[(calls - 1) % 2]);
  free (bf);
  fx_open (f);
  fx_verify (f);
  fx_close_layer (f);
  fx_qemu_compare (f);
  fx_fini (f);
}

/*----------------------------------------------------------------------
 * A read that needs a table the cache does not hold, when every slot
 * holds a dirty table that cannot be written back (the writes of the
 * layer fail: a merge target on a failing disk, say).  The dirty tables
 * must stay, and the read must not fail for them: it did not depend on
 * them.  Four L2 slots (and four spare ones); 512-byte clusters, so an
 * L2 table maps 32 KiB. */

static int fail_writes;         /* atomic: pwrites fail with EIO */

static ssize_t
maybe_failing_pwrite (int fd, const void *buf, size_t n, off_t off)
{
  if (__atomic_load_n (&fail_writes, __ATOMIC_SEQ_CST)) {
    errno = EIO;
    return -1;
  }
  return fast_ops.pwrite (fd, buf, n, off);
}

static void
test_read_with_unwritable_dirty_cache (void **state)
{
  struct fx f;
  struct io_ops ops = fast_ops;
  const uint64_t region = 32768;
  uint8_t buf[4096];
  struct layer_below b;

  (void) state;
  fx_init (&f, "dirtycache.qcow2", 64 * region, 64 * region, 512, 4 * 512,
           25);
  /* Data in regions 0 to 15, on disk. */
  for (uint64_t i = 0; i < 16; i++)
    fx_write_random (&f, 4096, i * region + 8192);
  fx_flush (&f);
  ops.pwrite = maybe_failing_pwrite;
  io_set_ops (&ops);
  __atomic_store_n (&fail_writes, 1, __ATOMIC_SEQ_CST);

  /* Zero clusters need no data write: dirty tables fill the four slots,
   * then the spare ones; a ninth table does not fit (the zero fails, it
   * depends on the writes). */
  for (uint64_t i = 0; i < 8; i++)
    fx_zero (&f, 512, i * region + 8192);
  b = fx_below (&f);
  assert_int_equal (f.l->ops->zero (f.l, 512, 8 * region + 8192, false, &b),
                    -1);
  assert_int_equal (cow_last_errno (), EIO);
  /* Reads of the other regions, over and over: each needs a table. */
  for (int pass = 0; pass < 3; pass++)
    for (uint64_t i = 8; i < 16; i++) {
      uint64_t off = i * region + 8192;
      int r = f.l->ops->read (f.l, buf, sizeof buf, off, &b);
      if (r == -1)
        print_error ("read at %" PRIu64 " with writes failing: %s\n", off,
                     cow_last_error ());
      assert_int_equal (r, 0);
      tu_assert_bytes_equal (buf, f.model + off, sizeof buf, off, f.img);
    }
  fx_verify (&f);
  /* The flush fails; the zeroed clusters still read as zero. */
  assert_int_equal (f.l->ops->flush (f.l), -1);
  fx_verify (&f);

  /* Writes work again: nothing was lost. */
  __atomic_store_n (&fail_writes, 0, __ATOMIC_SEQ_CST);
  io_set_ops (&fast_ops);
  fx_flush (&f);
  fx_reopen (&f);
  fx_verify (&f);
  fx_close_layer (&f);
  tu_assert_check_clean (f.img);
  fx_qemu_compare (&f);
  fx_fini (&f);
}

/*----------------------------------------------------------------------
 * The on-disk format helpers (qcow2-format.h), against the byte layout
 * of docs/interop/qcow2.txt written out here by hand.
 */

static void
be_bytes (uint8_t *p, uint64_t v, size_t width)
{
  for (size_t k = 0; k < width; k++)
    p[k] = (uint8_t) (v >> (8 * (width - 1 - k)));
}

static void
test_header_round_trip (void **state)
{
  const struct qcow2_header h = {
    .magic = QCOW2_MAGIC, .version = 3,
    .backing_file_offset = 0x0102030405060708ull,
    .backing_file_size = 0x11121314,
    .cluster_bits = 0x21222324,
    .size = 0x3132333435363738ull,
    .crypt_method = 0x41424344,
    .l1_size = 0x51525354,
    .l1_table_offset = 0x6162636465666768ull,
    .refcount_table_offset = 0x7172737475767778ull,
    .refcount_table_clusters = 0x81828384,
    .nb_snapshots = 0x91929394,
    .snapshots_offset = 0xa1a2a3a4a5a6a7a8ull,
    .incompatible_features = 0xb1b2b3b4b5b6b7b8ull,
    .compatible_features = 0xc1c2c3c4c5c6c7c8ull,
    .autoclear_features = 0xd1d2d3d4d5d6d7d8ull,
    .refcount_order = 0xe1e2e3e4,
    .header_length = 0xf1f2f3f4,
    .compression_type = 0x7e,
  };
  /* offset, width, value: the table of the spec. */
  const struct { size_t off, width; uint64_t v; } f[] = {
    { 0, 4, h.magic }, { 4, 4, h.version },
    { 8, 8, h.backing_file_offset }, { 16, 4, h.backing_file_size },
    { 20, 4, h.cluster_bits }, { 24, 8, h.size },
    { 32, 4, h.crypt_method }, { 36, 4, h.l1_size },
    { 40, 8, h.l1_table_offset }, { 48, 8, h.refcount_table_offset },
    { 56, 4, h.refcount_table_clusters }, { 60, 4, h.nb_snapshots },
    { 64, 8, h.snapshots_offset }, { 72, 8, h.incompatible_features },
    { 80, 8, h.compatible_features }, { 88, 8, h.autoclear_features },
    { 96, 4, h.refcount_order }, { 100, 4, h.header_length },
    { 104, 1, h.compression_type },
  };
  uint8_t want[128], buf[128];
  struct qcow2_header d;

  (void) state;
  assert_int_equal (sizeof (struct qcow2_header_be), 112);

  /* Encode: every field at its offset; the padding after
   * compression_type and the bytes past len are left alone. */
  memset (want, 0xa5, sizeof want);
  for (size_t i = 0; i < sizeof f / sizeof f[0]; i++)
    be_bytes (want + f[i].off, f[i].v, f[i].width);
  memset (buf, 0xa5, sizeof buf);
  qcow2_header_encode (&h, buf, sizeof buf);
  assert_memory_equal (buf, want, sizeof buf);

  /* Decode gives every field back. */
  memset (&d, 0x5a, sizeof d);
  qcow2_header_decode (&d, buf, sizeof buf);
  assert_int_equal (d.magic, h.magic);
  assert_int_equal (d.version, h.version);
  assert_int_equal (d.backing_file_offset, h.backing_file_offset);
  assert_int_equal (d.backing_file_size, h.backing_file_size);
  assert_int_equal (d.cluster_bits, h.cluster_bits);
  assert_int_equal (d.size, h.size);
  assert_int_equal (d.crypt_method, h.crypt_method);
  assert_int_equal (d.l1_size, h.l1_size);
  assert_int_equal (d.l1_table_offset, h.l1_table_offset);
  assert_int_equal (d.refcount_table_offset, h.refcount_table_offset);
  assert_int_equal (d.refcount_table_clusters, h.refcount_table_clusters);
  assert_int_equal (d.nb_snapshots, h.nb_snapshots);
  assert_int_equal (d.snapshots_offset, h.snapshots_offset);
  assert_int_equal (d.incompatible_features, h.incompatible_features);
  assert_int_equal (d.compatible_features, h.compatible_features);
  assert_int_equal (d.autoclear_features, h.autoclear_features);
  assert_int_equal (d.refcount_order, h.refcount_order);
  assert_int_equal (d.header_length, h.header_length);
  assert_int_equal (d.compression_type, h.compression_type);

  /* And encoding what was decoded gives the same bytes. */
  memset (buf, 0xa5, sizeof buf);
  qcow2_header_encode (&d, buf, sizeof buf);
  assert_memory_equal (buf, want, sizeof buf);

  /* A version 2 header: 72 bytes written, the rest untouched; decoded
   * from 72 bytes, the version 3 fields read as 0. */
  memset (buf, 0xa5, sizeof buf);
  qcow2_header_encode (&h, buf, QCOW2_V2_HEADER_LENGTH);
  assert_memory_equal (buf, want, QCOW2_V2_HEADER_LENGTH);
  for (size_t i = QCOW2_V2_HEADER_LENGTH; i < sizeof buf; i++)
    assert_int_equal (buf[i], 0xa5);
  qcow2_header_decode (&d, buf, QCOW2_V2_HEADER_LENGTH);
  assert_int_equal (d.l1_table_offset, h.l1_table_offset);
  assert_int_equal (d.snapshots_offset, h.snapshots_offset);
  assert_int_equal (d.incompatible_features, 0);
  assert_int_equal (d.refcount_order, 0);
  assert_int_equal (d.header_length, 0);
  assert_int_equal (d.compression_type, 0);

  /* A version 3 header of the minimum length (no compression type). */
  memset (buf, 0xa5, sizeof buf);
  qcow2_header_encode (&h, buf, QCOW2_V3_HEADER_LENGTH);
  assert_memory_equal (buf, want, QCOW2_V3_HEADER_LENGTH);
  assert_int_equal (buf[QCOW2_V3_HEADER_LENGTH], 0xa5);
  qcow2_header_decode (&d, buf, QCOW2_V3_HEADER_LENGTH);
  assert_int_equal (d.header_length, h.header_length);
  assert_int_equal (d.compression_type, 0);

  /* Field ranges, as the in-place header writes use them. */
  assert_int_equal (QCOW2_HDR_OFFSET (l1_size), 36);
  assert_int_equal (QCOW2_HDR_END (l1_table_offset), 48);
  assert_int_equal (QCOW2_HDR_OFFSET (refcount_table_offset), 48);
  assert_int_equal (QCOW2_HDR_END (refcount_table_clusters), 60);
}

/* A header written in place changes the bytes of its fields only. */
static void
test_header_write_fields (void **state)
{
  char *path = tu_path (dir, "fields.bin");
  const struct qcow2_header h = {
    .magic = 1, .size = 2,
    .refcount_table_offset = 0x0000000123450000ull,
    .refcount_table_clusters = 7,
  };
  uint8_t want[256], *got;
  size_t n;
  int fd;

  (void) state;
  memset (want, 0xee, sizeof want);
  tu_write_file (path, want, sizeof want);
  be_bytes (want + 48, h.refcount_table_offset, 8);
  be_bytes (want + 56, h.refcount_table_clusters, 4);
  fd = io_open (path, O_RDWR, 0);
  assert_true (fd >= 0);
  assert_int_equal (qcow2_header_write_fields (fd, &h,
                      QCOW2_HDR_OFFSET (refcount_table_offset),
                      QCOW2_HDR_END (refcount_table_clusters)), 0);
  io_close (fd);
  got = (uint8_t *) tu_read_file (path, &n);
  assert_int_equal (n, sizeof want);
  assert_memory_equal (got, want, sizeof want);
  free (got);
  free (path);
}

/* Header extensions, compressed descriptors and the byte-order helpers. */
static void
test_format_helpers (void **state)
{
  uint8_t b[16], want[16];
  uint32_t type, len;
  uint64_t off, size;

  (void) state;
  memset (b, 0, sizeof b);
  qcow2_ext_encode (b + 1, QCOW2_EXT_BACKING_FORMAT, 0x01020304);
  memset (want, 0, sizeof want);
  be_bytes (want + 1, QCOW2_EXT_BACKING_FORMAT, 4);
  be_bytes (want + 5, 0x01020304, 4);
  assert_memory_equal (b, want, sizeof b);
  qcow2_ext_decode (b + 1, &type, &len);
  assert_int_equal (type, QCOW2_EXT_BACKING_FORMAT);
  assert_int_equal (len, 0x01020304);
  assert_int_equal (QCOW2_EXT_HEADER_SIZE, 8);
  assert_int_equal (qcow2_ext_padded (0), 0);
  assert_int_equal (qcow2_ext_padded (1), 8);
  assert_int_equal (qcow2_ext_padded (8), 8);
  assert_int_equal (qcow2_ext_padded (9), 16);
  assert_int_equal (qcow2_ext_padded (0xffffffffu), 0x100000000ull);

  /* Unaligned loads and stores, every width. */
  memset (b, 0, sizeof b);
  be16_put (b + 1, 0x0102);
  be32_put (b + 3, 0x03040506);
  be64_put (b + 7, 0x0708090a0b0c0d0eull);
  for (unsigned i = 1; i <= 14; i++)
    assert_int_equal (b[i], i);
  assert_int_equal (b[0], 0);
  assert_int_equal (b[15], 0);
  assert_int_equal (be16_get (b + 1), 0x0102);
  assert_int_equal (be32_get (b + 3), 0x03040506);
  assert_int_equal (be64_get (b + 7), 0x0708090a0b0c0d0eull);

  /* 64 KiB clusters: 54 offset bits, then 8 bits of extra sectors. */
  qcow2_compressed_range (16, QCOW2_OFLAG_COMPRESSED | QCOW2_OFLAG_COPIED
                          | (3ull << 54) | 0x12345, &off, &size);
  assert_int_equal (off, 0x12345);
  assert_int_equal (size, 4 * 512 - 0x145);
  qcow2_compressed_range (16, QCOW2_OFLAG_COMPRESSED | (0xffull << 54)
                          | ((1ull << 54) - 1), &off, &size);
  assert_int_equal (off, (1ull << 54) - 1);
  assert_int_equal (size, 256 * 512 - 511);
  /* 512-byte clusters: one bit of extra sectors. */
  qcow2_compressed_range (9, QCOW2_OFLAG_COMPRESSED | (1ull << 61) | 1024,
                          &off, &size);
  assert_int_equal (off, 1024);
  assert_int_equal (size, 1024);
}

/* The expected bit layout of entry i of a refcount block, written out
 * bit by bit: below 8 bits from the least significant bit of each byte
 * up, from 8 bits big-endian. */
static uint64_t
ref_ref_get (unsigned order, const uint8_t *p, uint64_t i)
{
  unsigned bits = 1u << order;
  uint64_t v = 0;

  for (unsigned k = 0; k < bits; k++) {
    uint64_t bit;
    if (bits < 8)
      bit = i * bits + k;                          /* LSB first */
    else
      bit = i * bits + (bits - 8 - k / 8 * 8) + k % 8;
    v |= (uint64_t) ((p[bit / 8] >> (bit % 8)) & 1) << k;
  }
  return v;
}

static void
test_refcount_entries (void **state)
{
  (void) state;
  for (unsigned order = 0; order <= 6; order++) {
    const unsigned bits = 1u << order;
    const uint64_t max = bits == 64 ? UINT64_MAX : (1ull << bits) - 1;
    const uint64_t n = 512 / bits;                 /* a 64-byte block */
    uint8_t block[64], copy[64];

    assert_int_equal (qcow2_refcount_max (order), max);

    /* Every entry its own value: get agrees with the bit layout, and
     * with what was set. */
    memset (block, 0, sizeof block);
    for (uint64_t i = 0; i < n; i++)
      qcow2_refcount_entry_set (order, block, i,
                                (i * 0x9e3779b97f4a7c15ull + 1) & max);
    for (uint64_t i = 0; i < n; i++) {
      uint64_t v = (i * 0x9e3779b97f4a7c15ull + 1) & max;
      assert_int_equal (qcow2_refcount_entry_get (order, block, i), v);
      assert_int_equal (ref_ref_get (order, block, i), v);
    }

    /* Setting one entry leaves its neighbours alone, at 0 and at max. */
    for (uint64_t i = 0; i < n; i++) {
      memcpy (copy, block, sizeof block);
      qcow2_refcount_entry_set (order, copy, i, max);
      for (uint64_t j = 0; j < n; j++)
        assert_int_equal (qcow2_refcount_entry_get (order, copy, j),
                          j == i ? max
                          : qcow2_refcount_entry_get (order, block, j));
      qcow2_refcount_entry_set (order, copy, i, 0);
      assert_int_equal (ref_ref_get (order, copy, i), 0);
      qcow2_refcount_entry_set (order, copy, i,
                                qcow2_refcount_entry_get (order, block, i));
      assert_memory_equal (copy, block, sizeof block);
    }

    /* A refcount of 1 for entry 0 and for the last entry, as bytes. */
    memset (block, 0, sizeof block);
    qcow2_refcount_entry_set (order, block, 0, 1);
    qcow2_refcount_entry_set (order, block, n - 1, 1);
    if (bits < 8) {
      assert_int_equal (block[0], 1);
      assert_int_equal (block[63], 1u << (8 - bits));
    }
    else {
      assert_int_equal (block[bits / 8 - 1], 1);
      assert_int_equal (block[63], 1);
    }
    for (size_t k = 0; k < sizeof block; k++)
      if (k != 63 && k != (bits < 8 ? 0 : bits / 8 - 1))
        assert_int_equal (block[k], 0);
  }
}

int
main (int argc, char **argv)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test (test_header_round_trip),
    cmocka_unit_test (test_header_write_fields),
    cmocka_unit_test (test_format_helpers),
    cmocka_unit_test (test_refcount_entries),
    cmocka_unit_test (test_create_reopen),
    cmocka_unit_test (test_create_refused),
    cmocka_unit_test (test_qemu_v3),
    cmocka_unit_test (test_qemu_compat010),
    cmocka_unit_test (test_qemu_refcount_bits),
    cmocka_unit_test (test_bad_headers),
    cmocka_unit_test (test_fuzz_metadata),
    cmocka_unit_test (test_lookup_alloc),
    cmocka_unit_test (test_subclusters_edges),
    cmocka_unit_test (test_subclusters_populate),
    cmocka_unit_test (test_subclusters_qemu_and_damage),
    cmocka_unit_test (test_many_l2_tables),
    cmocka_unit_test (test_reftable_growth_sequential),
    cmocka_unit_test (test_reftable_growth_random),
    cmocka_unit_test (test_reftable_growth_single_clusters),
    cmocka_unit_test (test_flush_races_reftable_writeback),
    cmocka_unit_test (test_flush_pins_whole_cache),
    cmocka_unit_test (test_flush_fails_l1_clean),
    cmocka_unit_test (test_flush_fails_l1_dirty),
    cmocka_unit_test (test_set_backing_races_reftable_growth),
    cmocka_unit_test (test_read_with_unwritable_dirty_cache),
    /* Last: under ASan its heap overflow ends the program. */
    cmocka_unit_test (test_flush_races_reftable_move),
  };
  if (argc > 1)
    cmocka_set_test_filter (argv[1]);
  return cmocka_run_group_tests (tests, group_setup, group_teardown);
}
