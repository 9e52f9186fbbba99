/* SPDX-License-Identifier: BSD-3-Clause */
/* Snapshots (one disk, or several at one instant: snapshot-atomic),
 * revert to a snapshot, and the listing of a disk's layers.  Every chain
 * change here is a plan of the chain module (chain-plan.c); several
 * disks are locked in the canonical order of chain.h. */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "chain.h"
#include "cleanup.h"
#include "cowchain.h"
#include "error.h"
#include "events.h"
#include "layer.h"
#include "manifest.h"

/*----------------------------------------------------------------------
 * Snapshots.
 *
 * A freeze (DESIGN.md invariant 3): the new layer is created and synced
 * before guest I/O pauses; the pause itself is the pointer switch under
 * the exclusive chain lock; then the old layer is flushed and the manifest
 * replaced while FLUSH and FUA wait on durability_lock.  A crash before the
 * manifest is replaced leaves the old chain (the new file is an orphan,
 * removed at the next open, and none of its writes was reported durable);
 * after it, the new chain, whose frozen layer was flushed first.
 */

static int
check_snapshot_args (struct cow_disk *d, const char *name, const char *desc)
{
  if (d->state_dir == NULL) {
    cow_error_set (ENOTSUP, "%s: snapshots need a state directory (state=), "
                   "not a plain overlay", d->overlay);
    return -1;
  }
  if (manifest_check_name (name) == -1)
    return -1;
  if (desc && manifest_check_description (desc) == -1)
    return -1;
  /* Layer files are named layer-*, which no new name can take; a
   * manifest from elsewhere may name them otherwise. */
  for (size_t i = 0; i < d->man.n_layers; i++)
    if (strcmp (d->man.layers[i].file, name) == 0) {
      cow_error_set (EINVAL, "%s: snapshot name '%s' is reserved: it is the "
                     "name of a layer file of this disk", d->state_dir, name);
      return -1;
    }
  for (size_t i = 0; i < d->man.n_layers; i++)
    if (d->man.layers[i].snapshot
        && strcmp (d->man.layers[i].snapshot, name) == 0) {
      cow_error_set (EEXIST, "%s: a snapshot named '%s' already exists",
                     d->state_dir, name);
      return -1;
    }
  /* The snapshot adds one layer file and one layer under the top. */
  if (d->man.n_layers >= MANIFEST_MAX_LAYERS
      || d->man.n_layers - 1 + chain_base_depth (d) >= COW_MAX_DEPTH) {
    cow_error_set (EMLINK, "%s: the chain already holds %zu layer files "
                   "(and %zu layers of the base); a chain holds at most %d "
                   "of each: merge some first", d->state_dir,
                   d->man.n_layers, chain_base_depth (d), COW_MAX_DEPTH);
    return -1;
  }
  return 0;
}

/* The new layer and the manifest of a freeze, made before I/O pauses. */
static struct chain_plan *
prepare_freeze (struct cow_disk *d, const char *name, const char *desc)
{
  struct chain_plan *p;
  struct manifest_layer *top;
  const char *under;

  if (check_snapshot_args (d, name, desc) == -1)
    return NULL;
  if (chain_settle (d, "snapshot") == -1)
    return NULL;
  p = chain_plan_new (d);
  if (p == NULL)
    return NULL;
  top = &p->next.layers[p->next.n_layers - 1];
  top->snapshot = strdup (name);
  top->description = desc && *desc ? strdup (desc) : NULL;
  top->created = (int64_t) time (NULL);
  if (top->snapshot == NULL || (desc && *desc && top->description == NULL)) {
    cow_error_errno ("strdup");
    goto err;
  }
  under = top->file;
  if (chain_plan_add_layer (d, p, under) == -1
      || chain_plan_build (d, p) == -1)
    goto err;
  return p;

 err:
  chain_plan_free (d, p);
  return NULL;
}

/* Before the cut: the active layer's dirty pages go to the disk in steps
 * of PACE_STEP, each written before the next is sent, so that the flush
 * after the switch (which FLUSH and FUA wait for, on durability_lock)
 * finds little left, and the device never holds more than one step of
 * ours ahead of the guest's requests, as one big flush would.  At most
 * PACE_BOUND_NS: what the guest keeps dirtying is the flush's.  A pace
 * only (io_writeback): durability is still the flush's (invariant 3). */
#define PACE_STEP (8u << 20)
#define PACE_BOUND_NS (2000u * 1000000u)

static void
pace_writeback (struct layer *l)
{
  uint64_t pos = 0, t0 = chain_now_ns ();
  int r;

  if (l->ops->writeback == NULL)
    return;
  do
    r = l->ops->writeback (l, &pos, PACE_STEP, true);
  while (r == 1 && chain_now_ns () - t0 < PACE_BOUND_NS);
  if (r == -1)
    cow_error_clear ();
}

/* After the switch: flush the frozen layer, then record the new chain.
 * A failure cannot undo the switch (guest writes already went to the new
 * layer): the disk is degraded until chain_settle succeeds, and no FLUSH
 * or FUA is answered with success meanwhile (DESIGN.md invariant 7). */
static int
commit_freeze (struct cow_disk *d, const char *name)
{
  struct layer *old = chain_under (d, d->top);
  uint64_t t0 = chain_now_ns ();
  int e;

  if (old->ops->flush (old) == 0) {
    uint64_t t1 = chain_now_ns ();
    qcow2_mark_frozen (old);
    e = chain_commit_installed (d, "saving the manifest of a snapshot");
    COW_DEBUG (COW_DEBUG_SNAPSHOT, "%s: '%s': frozen layer flushed in %.3f "
               "ms, manifest %s in %.3f ms", d->state_dir, name,
               EVENTS_MS (t0, t1), e == 0 ? "saved" : "NOT saved",
               EVENTS_MS (t1, chain_now_ns ()));
    if (e == 0)
      return 0;
  }
  else {
    d->unflushed = old;
    chain_set_degraded (d, "flushing the frozen layer of a snapshot");
  }
  e = cow_last_errno ();
  pthread_mutex_lock (&d->health_lock);
  cow_error_set (e ? e : EIO, "%s: snapshot '%s' is taken but not yet "
                 "durable (%s); the disk is degraded: FLUSH fails until a "
                 "retry (at every FLUSH and chain change) succeeds",
                 d->state_dir, name,
                 d->degraded_msg ? d->degraded_msg : "unknown");
  pthread_mutex_unlock (&d->health_lock);
  return -1;
}

/* The event of a snapshot of d, taken (ok: with its pause) or not (the
 * last error says why). */
static void
emit_snapshot (struct cow_disk *d, const char *name, bool ok, uint64_t start,
               uint64_t pause_ns)
{
  struct events_fields f = { 0 };

  events_add (&f, "name", "%s", name);
  if (ok) {
    events_add (&f, "layer", "%s", d->man.layers[d->man.n_layers - 2].file);
    events_add (&f, "pause-ns", "%" PRIu64, pause_ns);
  }
  else {
    events_add (&f, "errno", "%d", cow_last_errno () ? cow_last_errno ()
                : EIO);
    events_add (&f, "error", "%s", cow_last_error ());
  }
  events_add (&f, "duration-ms", "%.3f",
              EVENTS_MS (start, chain_now_ns ()));
  events_emit (d, ok ? "snapshot" : "snapshot-failed",
               ok ? COW_LOG_INFO : COW_LOG_ERROR, &f);
}

static int snapshot_group (struct cow_disk *const *disks, size_t n,
                           const char *name, const char *description,
                           uint64_t start);

int
cow_disk_snapshot_group (struct cow_disk *const *disks, size_t n,
                         const char *name, const char *description)
{
  uint64_t start = chain_now_ns ();
  int ret = snapshot_group (disks, n, name, description, start);

  /* Refused before the switch: nothing changed on any disk.  (After it,
   * -2, each disk's event was emitted.) */
  if (ret == -1)
    for (size_t i = 0; i < n; i++)
      emit_snapshot (disks[i], name ? name : "", false, start, 0);
  return ret == 0 ? 0 : -1;
}

static int
snapshot_group (struct cow_disk *const *disks, size_t n, const char *name,
                const char *description, uint64_t start)
{
  CLEANUP_FREE struct cow_disk **sorted = NULL;
  CLEANUP_FREE struct chain_plan **p = NULL;
  uint64_t t0, pause;
  size_t ready = 0;
  int ret = 0;

  if (n == 0) {
    cow_error_set (EINVAL, "no disks to snapshot");
    return -1;
  }
  /* The same disk twice is refused before anything is locked. */
  sorted = chain_disks_sorted (disks, n,
                               n > 1 ? "snapshot-atomic" : "snapshot");
  if (sorted == NULL)
    return -1;
  p = calloc (n, sizeof *p);
  if (p == NULL) {
    cow_error_errno ("calloc");
    return -1;
  }
  /* In the canonical order; the rest goes in the caller's (the first
   * disk that refuses names the error). */
  chain_admin_lock_all (sorted, n);
  for (size_t i = 0; i < n; i++)
    if (job_active_commit (disks[i])) {
      ret = -1;
      goto out;
    }
  /* New layers first, with no I/O paused. */
  for (; ready < n; ready++)
    if ((p[ready] = prepare_freeze (disks[ready], name, description)) == NULL)
      break;
  if (ready < n) {
    for (size_t i = 0; i < ready; i++)
      chain_plan_free (disks[i], p[i]);
    ret = -1;
    goto out;
  }
  COW_DEBUG (COW_DEBUG_SNAPSHOT, "'%s': %zu new layer%s ready in %.3f ms; "
             "draining guest I/O", name, n, n == 1 ? "" : "s",
             EVENTS_MS (start, chain_now_ns ()));
  for (size_t i = 0; i < n; i++)
    pace_writeback (disks[i]->top);
  /* The cut: every disk drained (in bounded windows, all or none), then
   * all switched. */
  if (chain_wait_exclusive (sorted, n,
                            CHAIN_HOLD_DURABILITY | CHAIN_HOLD_CHAIN,
                            n > 1 ? "snapshot-atomic" : "snapshot", &t0)
      == -1) {
    for (size_t i = 0; i < n; i++)
      chain_plan_free (disks[i], p[i]);
    ret = -1;
    goto out;
  }
  for (size_t i = 0; i < n; i++)
    chain_plan_install (disks[i], p[i]);
  chain_release (sorted, n, CHAIN_HOLD_CHAIN);
  pause = chain_now_ns () - t0;
  COW_DEBUG (COW_DEBUG_SNAPSHOT, "'%s': switched; guest I/O paused %.3f ms "
             "(drain began %.3f ms after the start)", name, EVENTS_MS (0, pause),
             EVENTS_MS (start, t0));
  /* Taken on every disk: each says so, or why it is not durable (the
   * caller then emits nothing more: -2). */
  for (size_t i = 0; i < n; i++) {
    disks[i]->last_pause_ns = pause;
    if (commit_freeze (disks[i], name) == -1) {
      ret = -2;
      emit_snapshot (disks[i], name, false, start, 0);
    }
    else
      emit_snapshot (disks[i], name, true, start, pause);
  }
  chain_release (sorted, n, CHAIN_HOLD_DURABILITY);
  for (size_t i = 0; i < n; i++) {
    chain_plan_free (disks[i], p[i]);
    if (!chain_degraded (disks[i]))
      job_check_depth (disks[i]);
  }
 out:
  chain_admin_unlock_all (sorted, n);
  return ret;
}

int
cow_disk_snapshot (struct cow_disk *d, const char *name,
                   const char *description)
{
  return cow_disk_snapshot_group (&d, 1, name, description);
}

static int revert (struct cow_disk *d, const char *name, bool force,
                   size_t *dropped);

int
cow_disk_revert (struct cow_disk *d, const char *name, bool force)
{
  struct events_fields f = { 0 };
  uint64_t start = chain_now_ns ();
  size_t dropped = 0;
  int ret = revert (d, name, force, &dropped);

  events_add (&f, "name", "%s", name);
  if (ret == 0) {
    events_add (&f, "dropped", "%zu", dropped);
    events_add (&f, "layer", "%s", d->man.layers[d->man.n_layers - 1].file);
  }
  else {
    events_add (&f, "errno", "%d", cow_last_errno () ? cow_last_errno ()
                : EIO);
    events_add (&f, "error", "%s", cow_last_error ());
  }
  events_add (&f, "duration-ms", "%.3f", EVENTS_MS (start, chain_now_ns ()));
  events_emit (d, ret == 0 ? "revert" : "revert-failed",
               ret == 0 ? COW_LOG_INFO : COW_LOG_ERROR, &f);
  return ret;
}

/* *dropped: the layers it took out of the chain. */
static int
revert (struct cow_disk *d, const char *name, bool force, size_t *dropped)
{
  struct chain_plan *p = NULL;
  long k, later;
  size_t n;
  int ret = -1;

  if (d->state_dir == NULL) {
    cow_error_set (ENOTSUP, "%s: snapshots need a state directory (state=)",
                   d->overlay);
    return -1;
  }
  chain_admin_lock (d);
  if (job_busy (d, "revert") || chain_settle (d, "revert") == -1)
    goto out;
  n = d->man.n_layers;
  /* A snapshot by its layer file name first (as commit and delete read
   * a layer word), then by its name. */
  k = chain_find (d, name, true);
  if (k < 0) {
    cow_error_set (ENOENT, "%s: no snapshot named '%s'", d->state_dir, name);
    goto out;
  }
  later = chain_first_snapshot (d, k + 1, (long) n - 1);
  if (!force && later >= 0) {
    cow_error_set (EBUSY, "%s: reverting to '%s' would delete the later "
                   "snapshot '%s'; use --force", d->state_dir, name,
                   d->man.layers[later].snapshot);
    goto out;
  }
  p = chain_plan_new (d);
  if (p == NULL)
    goto out;
  manifest_cut (&p->next, (size_t) k + 1, n - 1);
  if (chain_plan_add_layer (d, p, d->man.layers[k].file) == -1
      || chain_plan_build (d, p) == -1)
    goto out;
  /* The manifest first: a failed save leaves the old chain served. */
  if (chain_wait_exclusive (&d, 1, CHAIN_HOLD_DURABILITY | CHAIN_HOLD_CHAIN,
                            "revert", NULL) == -1)
    goto out;
  if (chain_plan_save (d, p) == 0) {
    chain_plan_install (d, p);
    *dropped = n - 1 - (size_t) k;
    ret = 0;
  }
  chain_release (&d, 1, CHAIN_HOLD_DURABILITY | CHAIN_HOLD_CHAIN);
  COW_DEBUG (COW_DEBUG_SNAPSHOT, "%s: revert to '%s': %s", d->state_dir,
             name, ret == 0 ? "switched" : "manifest not saved");
 out:
  chain_plan_free (d, p);
  chain_admin_unlock (d);
  return ret;
}

int
cow_disk_layers (struct cow_disk *d, struct cow_layer_info **out, size_t *n)
{
  ADMIN_LOCK_FOR_SCOPE (d);
  size_t count = d->state_dir ? d->man.n_layers : 1;
  struct cow_layer_info *v = calloc (count, sizeof *v);

  if (v == NULL)
    goto oom;
  if (d->state_dir == NULL) {
    v[0].path = strdup (d->overlay);
    v[0].active = true;
    if (v[0].path == NULL)
      goto oom;
  }
  else
    for (size_t i = 0; i < count; i++) {
      const struct manifest_layer *l = &d->man.layers[i];
      v[i].path = statedir_path (d, l->file);
      v[i].created = l->created;
      v[i].snapshot = l->snapshot ? strdup (l->snapshot) : NULL;
      v[i].description = l->description ? strdup (l->description) : NULL;
      v[i].active = i + 1 == count;
      if (v[i].path == NULL || (l->snapshot && !v[i].snapshot)
          || (l->description && !v[i].description))
        goto oom;
    }
  *out = v;
  *n = count;
  return 0;

 oom:
  cow_error_errno ("cow_disk_layers");
  if (v)
    cow_layer_info_free (v, count);
  return -1;
}

void
cow_layer_info_free (struct cow_layer_info *v, size_t n)
{
  for (size_t i = 0; i < n; i++) {
    free (v[i].path);
    free (v[i].snapshot);
    free (v[i].description);
  }
  free (v);
}
