/* nbdkit glue for cowchain: config keys, callbacks that call the engine,
 * nothing of the format.  One disk per server for now. */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include "cowchain.h"

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

static struct cow_disk_config cfg;
static char *base_path, *overlay_path, *base_format;
static struct cow_disk *disk;
static char **allow_backing;        /* NULL-terminated */
static size_t n_allow_backing;

static void
cowchain_unload (void)
{
  if (disk && cow_disk_close (disk) == -1)
    nbdkit_error ("closing the disk: %s", cow_last_error ());
  disk = NULL;
  free (base_path);
  free (overlay_path);
  free (base_format);
  for (size_t i = 0; i < n_allow_backing; i++)
    free (allow_backing[i]);
  free (allow_backing);
}

static int
parse_cluster_size (const char *value)
{
  int64_t r = nbdkit_parse_size (value);

  if (r == -1)
    return -1;
  if (r < 512 || r > (2 << 20) || (r & (r - 1))) {
    nbdkit_error ("cluster-size: %s is not a power of two from 512 to 2M",
                  value);
    return -1;
  }
  cfg.cluster_size = (uint32_t) r;
  return 0;
}

static int
parse_sync (const char *value)
{
  if (strcmp (value, "flush") == 0)
    cfg.sync_mode = COW_SYNC_FLUSH;
  else if (strcmp (value, "always") == 0)
    cfg.sync_mode = COW_SYNC_ALWAYS;
  else {
    uint32_t ms;
    if (nbdkit_parse_uint32_t ("sync", value, &ms) == -1)
      return -1;
    if (ms == 0 || ms > 3600000) {
      nbdkit_error ("sync: interval %s ms must be from 1 to 3600000 (or use "
                    "sync=flush or sync=always)", value);
      return -1;
    }
    cfg.sync_mode = COW_SYNC_INTERVAL;
    cfg.sync_interval_ms = ms;
  }
  return 0;
}

static int
set_string (char **dst, const char *key, const char *value)
{
  if (*dst) {
    nbdkit_error ("%s given twice", key);
    return -1;
  }
  if (value[0] == '\0') {
    nbdkit_error ("%s: empty value", key);
    return -1;
  }
  *dst = strdup (value);
  if (*dst == NULL) {
    nbdkit_error ("strdup: %m");
    return -1;
  }
  return 0;
}

static int
cowchain_config (const char *key, const char *value)
{
  if (strcmp (key, "base") == 0)
    return set_string (&base_path, key, value);
  if (strcmp (key, "overlay") == 0)
    return set_string (&overlay_path, key, value);
  if (strcmp (key, "base-format") == 0) {
    if (strcmp (value, "raw") != 0 && strcmp (value, "qcow2") != 0) {
      nbdkit_error ("base-format: '%s' is not raw or qcow2", value);
      return -1;
    }
    return set_string (&base_format, key, value);
  }
  if (strcmp (key, "cluster-size") == 0)
    return parse_cluster_size (value);
  if (strcmp (key, "sync") == 0)
    return parse_sync (value);
  if (strcmp (key, "cache-size") == 0) {
    int64_t r = nbdkit_parse_size (value);
    if (r == -1)
      return -1;
    if (r < (64 << 10)) {
      nbdkit_error ("cache-size: %s is below the minimum of 64K", value);
      return -1;
    }
    cfg.cache_size = (uint64_t) r;
    return 0;
  }
  if (strcmp (key, "compat") == 0) {
    if (strcmp (value, "1.1") == 0 || strcmp (value, "v3") == 0)
      cfg.compat = 3;
    else if (strcmp (value, "0.10") == 0 || strcmp (value, "v2") == 0)
      cfg.compat = 2;
    else {
      nbdkit_error ("compat: '%s' is not 0.10 or 1.1", value);
      return -1;
    }
    return 0;
  }
  if (strcmp (key, "allow-backing") == 0) {
    char **v = realloc (allow_backing,
                        (n_allow_backing + 2) * sizeof *allow_backing);
    if (v == NULL) {
      nbdkit_error ("realloc: %m");
      return -1;
    }
    allow_backing = v;
    v[n_allow_backing] = strdup (value);
    if (v[n_allow_backing] == NULL) {
      nbdkit_error ("strdup: %m");
      return -1;
    }
    v[++n_allow_backing] = NULL;
    return 0;
  }
  nbdkit_error ("unknown parameter '%s' (see nbdkit cowchain --help)", key);
  return -1;
}

static int
cowchain_config_complete (void)
{
  if (base_path == NULL || overlay_path == NULL) {
    nbdkit_error ("both base=IMAGE and overlay=LAYER.qcow2 are required");
    return -1;
  }
  cfg.base = base_path;
  cfg.overlay = overlay_path;
  cfg.base_format = base_format;
  cfg.allow_backing = (const char *const *) allow_backing;
  return 0;
}

#define cowchain_config_help \
  "base=IMAGE               (required) read-only base image (raw or qcow2)\n" \
  "base-format=raw|qcow2    format of the base (default: by magic)\n" \
  "overlay=LAYER.qcow2      (required) copy-on-write layer, created if absent\n" \
  "cluster-size=SIZE        cluster size of a new overlay (512..2M, default 64K)\n" \
  "sync=flush|always|MS     durability policy (default flush)\n" \
  "cache-size=SIZE          metadata cache size (default 32M)\n" \
  "compat=1.1|0.10          qcow2 version of a new overlay (default 1.1)\n" \
  "allow-backing=PATH       a file a qcow2 base's chain may name outside\n" \
  "                         the base's directory (repeatable)"

static int
cowchain_get_ready (void)
{
  disk = cow_disk_open (&cfg);
  if (disk == NULL) {
    nbdkit_error ("%s", cow_last_error ());
    return -1;
  }
  return 0;
}

static int
cowchain_after_fork (void)
{
  if (cow_disk_start_sync (disk) == -1) {
    nbdkit_error ("%s", cow_last_error ());
    return -1;
  }
  return 0;
}

static void *
cowchain_open (int readonly)
{
  return disk;
}

static void
report (void)
{
  nbdkit_error ("%s", cow_last_error ());
  nbdkit_set_error (cow_last_errno ());
}

static int64_t
cowchain_get_size (void *h)
{
  return (int64_t) cow_disk_size (h);
}

static int
cowchain_block_size (void *h, uint32_t *minimum, uint32_t *preferred,
                     uint32_t *maximum)
{
  *minimum = 1;
  *preferred = cow_disk_cluster_size (h);
  if (*preferred < 4096)
    *preferred = 4096;
  *maximum = 0xffffffff;
  return 0;
}

static int
cowchain_can_multi_conn (void *h)
{
  return 1;
}

static int
cowchain_can_fua (void *h)
{
  return NBDKIT_FUA_NATIVE;
}

static int
cowchain_can_true (void *h)
{
  return 1;
}

static unsigned
to_cow_flags (uint32_t flags)
{
  unsigned f = 0;

  if (flags & NBDKIT_FLAG_FUA)
    f |= COW_FLAG_FUA;
  if (flags & NBDKIT_FLAG_MAY_TRIM)
    f |= COW_FLAG_MAY_TRIM;
  if (flags & NBDKIT_FLAG_FAST_ZERO)
    f |= COW_FLAG_FAST_ZERO;
  return f;
}

static int
cowchain_pread (void *h, void *buf, uint32_t count, uint64_t offset,
                uint32_t flags)
{
  if (cow_disk_pread (h, buf, count, offset) == -1) {
    report ();
    return -1;
  }
  return 0;
}

static int
cowchain_pwrite (void *h, const void *buf, uint32_t count, uint64_t offset,
                 uint32_t flags)
{
  if (cow_disk_pwrite (h, buf, count, offset, to_cow_flags (flags)) == -1) {
    report ();
    return -1;
  }
  return 0;
}

static int
cowchain_zero (void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
  if (cow_disk_zero (h, count, offset, to_cow_flags (flags)) == -1) {
    /* A refused fast zero is not worth a log line. */
    if (cow_last_errno () != ENOTSUP || !(flags & NBDKIT_FLAG_FAST_ZERO))
      nbdkit_error ("%s", cow_last_error ());
    nbdkit_set_error (cow_last_errno ());
    return -1;
  }
  return 0;
}

static int
cowchain_trim (void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
  if (cow_disk_trim (h, count, offset, to_cow_flags (flags)) == -1) {
    report ();
    return -1;
  }
  return 0;
}

static int
cowchain_flush (void *h, uint32_t flags)
{
  if (cow_disk_flush (h) == -1) {
    report ();
    return -1;
  }
  return 0;
}

static int
add_extent (void *opaque, uint64_t offset, uint64_t length, uint32_t type)
{
  struct nbdkit_extents *e = opaque;
  uint32_t t = 0;

  if (type & COW_EXTENT_HOLE)
    t |= NBDKIT_EXTENT_HOLE;
  if (type & COW_EXTENT_ZERO)
    t |= NBDKIT_EXTENT_ZERO;
  return nbdkit_add_extent (e, offset, length, t) == -1 ? -1 : 0;
}

static int
cowchain_extents (void *h, uint32_t count, uint64_t offset, uint32_t flags,
                  struct nbdkit_extents *extents)
{
  if (cow_disk_extents (h, count, offset, add_extent, extents) == -1) {
    report ();
    return -1;
  }
  return 0;
}

static struct nbdkit_plugin plugin = {
  .name = "cowchain",
  .longname = "cowchain: live external snapshots over NBD",
  .version = PACKAGE_VERSION,
  .unload = cowchain_unload,
  .config = cowchain_config,
  .config_complete = cowchain_config_complete,
  .config_help = cowchain_config_help,
  .magic_config_key = "base",
  .get_ready = cowchain_get_ready,
  .after_fork = cowchain_after_fork,
  .open = cowchain_open,
  .get_size = cowchain_get_size,
  .block_size = cowchain_block_size,
  .can_write = cowchain_can_true,
  .can_flush = cowchain_can_true,
  .can_fua = cowchain_can_fua,
  .can_trim = cowchain_can_true,
  .can_zero = cowchain_can_true,
  .can_fast_zero = cowchain_can_true,
  .can_extents = cowchain_can_true,
  .can_multi_conn = cowchain_can_multi_conn,
  .pread = cowchain_pread,
  .pwrite = cowchain_pwrite,
  .zero = cowchain_zero,
  .trim = cowchain_trim,
  .flush = cowchain_flush,
  .extents = cowchain_extents,
  .errno_is_preserved = 0,
};

NBDKIT_REGISTER_PLUGIN (plugin)
