/* SPDX-License-Identifier: BSD-3-Clause */
/* The chain module: the one place that changes a state-directory disk's
 * chain (its lock-order table and declarations: chain.h).  A disk's
 * layers are numbered one way only, by manifest index (0 the bottom
 * layer, n-1 the active one); chain_layer (chain-layers.c) maps an index
 * to its open layer.
 *
 * Every change (snapshot, revert, the last step of a job, dropping
 * names) is a plan: a copy of the manifest edited into the chain wanted
 * (chain_plan_new, plus at most one new layer file, chain_plan_add_layer),
 * resolved into the layer arrays it implies (chain_plan_build), then
 * committed and applied in one of two orders:
 *
 *   save, then install (revert, jobs): nothing changes in memory until
 *     the new manifest is on disk; a failed save leaves the old chain.
 *   install, then save (snapshot): guest I/O resumes on the new chain at
 *     once; the save follows, with FLUSH and FUA held back until it is
 *     done.
 *
 * Invariant (DESIGN.md 7): d->man always describes the in-memory chain.
 * When the manifest file may differ from it (a save after install failed,
 * or a save failed after its rename so that either file may survive a
 * crash), the disk is degraded: man_unsaved is set, every FLUSH and FUA
 * answers EIO, and chain_settle saves d->man again at the next FLUSH,
 * durable write or chain change, until it succeeds.  So no write is
 * acknowledged that a restart could drop, and a restart finds either the
 * old chain (whose acknowledged writes are all in it) or the new one.
 *
 * Cleanup at open (statedir.c) deletes only layer files that the manifest
 * does not name; by the invariant above none of them holds acknowledged
 * data.
 */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "cowchain.h"
#include "chain.h"
#include "cleanup.h"
#include "error.h"
#include "events.h"
#include "io.h"
#include "layer.h"
#include "manifest.h"

/*----------------------------------------------------------------------
 * Degraded state.
 */

/* Record why the manifest file may not be d->man (caller holds
 * admin_lock); the message is the current last error. */
void
chain_set_degraded (struct cow_disk *d, const char *what)
{
  char *msg = NULL;
  int was;

  CHAIN_ASSERT_ADMIN (d);
  if (asprintf (&msg, "%s: %s", what, cow_last_error ()) == -1)
    msg = NULL;
  pthread_mutex_lock (&d->health_lock);
  free (d->degraded_msg);
  d->degraded_msg = msg;
  d->degraded_errno = cow_last_errno () ? cow_last_errno () : EIO;
  pthread_mutex_unlock (&d->health_lock);
  was = __atomic_exchange_n (&d->man_unsaved, 1, __ATOMIC_ACQ_REL);
  if (!was) {
    struct events_fields f = { 0 };
    events_add (&f, "errno", "%d", cow_last_errno () ? cow_last_errno ()
                : EIO);
    events_add (&f, "error", "%s: %s", what, cow_last_error ());
    events_emit (d, "degraded", COW_LOG_ERROR, &f);
  }
}

static void
clear_degraded (struct cow_disk *d)
{
  __atomic_store_n (&d->man_unsaved, 0, __ATOMIC_RELEASE);
  pthread_mutex_lock (&d->health_lock);
  free (d->degraded_msg);
  d->degraded_msg = NULL;
  d->degraded_errno = 0;
  pthread_mutex_unlock (&d->health_lock);
}

bool
chain_degraded (struct cow_disk *d)
{
  return __atomic_load_n (&d->man_unsaved, __ATOMIC_ACQUIRE) != 0;
}

int
chain_refuse_degraded (struct cow_disk *d, int err, const char *what)
{
  pthread_mutex_lock (&d->health_lock);
  cow_error_set (err, "%s: %s refused: the disk is degraded (%s); it is "
                 "retried at every FLUSH and chain change", d->state_dir,
                 what, d->degraded_msg ? d->degraded_msg : "unknown");
  pthread_mutex_unlock (&d->health_lock);
  return -1;
}

int
cow_disk_health (struct cow_disk *d, char **reason)
{
  int e = 0;

  *reason = NULL;
  if (!chain_degraded (d))
    return 0;
  pthread_mutex_lock (&d->health_lock);
  if (d->degraded_msg)
    *reason = strdup (d->degraded_msg);
  e = d->degraded_errno ? d->degraded_errno : EIO;
  pthread_mutex_unlock (&d->health_lock);
  return e;
}

int
chain_settle (struct cow_disk *d, const char *what)
{
  CHAIN_ASSERT_ADMIN (d);
  if (!chain_degraded (d))
    return 0;
  if (d->unflushed) {
    if (d->unflushed->ops->flush (d->unflushed) == -1) {
      chain_set_degraded (d, "flushing the frozen layer");
      return chain_refuse_degraded (d, cow_last_errno (), what);
    }
    qcow2_mark_frozen (d->unflushed);
    d->unflushed = NULL;
  }
  if (manifest_save (d->state_dir, &d->man, NULL) == -1) {
    chain_set_degraded (d, "saving the manifest");
    return chain_refuse_degraded (d, cow_last_errno (), what);
  }
  clear_degraded (d);
  return 0;
}

void
chain_try_settle (struct cow_disk *d, bool wait)
{
  if (!chain_degraded (d))
    return;
  /* A FLUSH waits no longer than a chain change may (which holds
   * admin_lock); if it does not come free, the FLUSH fails as degraded. */
  if (wait) {
    if (!chain_admin_lock_bounded (d))
      return;
  }
  else if (!chain_admin_trylock (d))
    return;
  chain_settle (d, "settle");
  chain_admin_unlock (d);
  cow_error_clear ();
}

int
chain_check_durable (struct cow_disk *d)
{
  if (!chain_degraded (d))
    return 0;
  return chain_refuse_degraded (d, EIO, "FLUSH/FUA");
}

/*----------------------------------------------------------------------
 * Plans.
 */

struct chain_plan *
chain_plan_new (struct cow_disk *d)
{
  struct chain_plan *p = calloc (1, sizeof *p);

  CHAIN_ASSERT_ADMIN (d);
  if (p == NULL) {
    cow_error_errno ("chain plan");
    return NULL;
  }
  if (manifest_copy (&p->next, &d->man) == -1) {
    free (p);
    return NULL;
  }
  return p;
}

int
chain_plan_add_layer (struct cow_disk *d, struct chain_plan *p,
                      const char *backing)
{
  CHAIN_ASSERT_ADMIN (d);
  if (p->added) {
    cow_error_set (EINVAL, "a chain change adds at most one layer");
    return -1;
  }
  p->added_file = statedir_new_layer_name (d, &p->next);
  if (p->added_file == NULL)
    return -1;
  if (manifest_push (&p->next, p->added_file, (int64_t) time (NULL), NULL,
                     NULL) == -1)
    goto err;
  p->added = statedir_create_layer (d, p->added_file, backing);
  if (p->added == NULL) {
    p->next.n_layers--;
    free (p->next.layers[p->next.n_layers].file);
    goto err;
  }
  return 0;

 err:
  /* statedir_create_layer may have left a partial file. */
  statedir_unlink_layer (d, p->added_file);
  free (p->added_file);
  p->added_file = NULL;
  return -1;
}

/* Does layer l (index i of m) name another backing than m records? */
static bool
backing_lags (const struct manifest *m, size_t i, struct layer *l)
{
  const char *bn = qcow2_backing_file (l);

  if (i > 0)
    return bn == NULL || strcmp (bn, m->layers[i - 1].file) != 0;
  if (m->no_base)
    return bn != NULL;
  /* Over the base: lags only while it still names a merged layer. */
  return bn && strncmp (bn, "layer-", 6) == 0 && strchr (bn, '/') == NULL;
}

/* The "rebase" marks of next: exactly the layers whose header the
 * change leaves to be rewritten (chain_plan_free rewrites them; open
 * repairs only those after a crash). */
static int
mark_rebases (struct chain_plan *p, struct layer *const *ls)
{
  for (size_t i = 0; i < p->next.n_rebase; i++)
    free (p->next.rebase[i]);
  p->next.n_rebase = 0;
  for (size_t i = 0; i < p->next.n_layers; i++)
    if (backing_lags (&p->next, i, ls[i])
        && manifest_add_rebase (&p->next, p->next.layers[i].file) == -1)
      return -1;
  return 0;
}

int
chain_plan_build (struct cow_disk *d, struct chain_plan *p)
{
  size_t m = p->next.n_layers, nold = d->man.n_layers, nbase;
  bool kept[MANIFEST_MAX_LAYERS] = { false };
  struct layer *ls[MANIFEST_MAX_LAYERS];

  CHAIN_ASSERT_ADMIN (d);
  if (m == 0) {
    cow_error_set (EINVAL, "%s: a chain needs an active layer", d->state_dir);
    return -1;
  }
  if (p->next.no_base != d->man.no_base && !p->next.no_base) {
    cow_error_set (EINVAL, "%s: a self-contained disk cannot take a base "
                   "again", d->state_dir);
    return -1;
  }
  nbase = p->next.no_base ? 0 : d->n_lower - d->n_frozen;
  if (m - 1 + nbase > COW_MAX_DEPTH) {
    cow_error_set (EMLINK, "%s: the chain would hold %zu layers (at most %d)",
                   d->state_dir, m + nbase, COW_MAX_DEPTH);
    return -1;
  }
  for (size_t i = 0; i < m; i++) {
    const char *f = p->next.layers[i].file;
    size_t j;
    CLEANUP_FREE char *path = NULL;
    struct stat st;

    if (p->added && strcmp (f, p->added_file) == 0) {
      ls[i] = p->added;
      continue;
    }
    for (j = 0; j < nold; j++)
      if (strcmp (d->man.layers[j].file, f) == 0)
        break;
    if (j == nold || kept[j]) {
      cow_error_set (EINVAL, "%s: chain change names layer '%s' that the "
                     "chain does not hold", d->state_dir, f);
      return -1;
    }
    /* A layer file removed under a running server cannot be recorded. */
    path = statedir_path (d, f);
    if (path == NULL)
      return -1;
    if (stat (path, &st) == -1) {
      cow_error_errno ("%s: layer file '%s' of the chain is gone (removed "
                       "while the disk is open?)", d->state_dir, f);
      return -1;
    }
    kept[j] = true;
    ls[i] = chain_layer (d, j);
  }
  if (mark_rebases (p, ls) == -1)
    return -1;
  p->top = ls[m - 1];
  p->n_lower = 0;
  for (size_t i = m - 1; i-- > 0; )
    p->lower[p->n_lower++].l = ls[i];
  p->n_frozen = p->n_lower;
  p->n_gone = p->n_gone_files = 0;
  for (size_t k = d->n_frozen; k < d->n_lower; k++) {
    if (nbase)
      p->lower[p->n_lower++].l = d->lower[k].l;
    else
      p->gone[p->n_gone++] = d->lower[k].l;
  }
  for (size_t j = 0; j < nold; j++)
    if (!kept[j]) {
      p->gone[p->n_gone++] = chain_layer (d, j);
      p->gone_files[p->n_gone_files] = strdup (d->man.layers[j].file);
      if (p->gone_files[p->n_gone_files++] == NULL) {
        cow_error_errno ("chain plan");
        return -1;
      }
    }
  return 0;
}

void
chain_plan_install (struct cow_disk *d, struct chain_plan *p)
{
  struct manifest old = d->man;

  CHAIN_ASSERT_EXCLUSIVE (d);
  CHAIN_ASSERT_ADMIN (d);
  d->top = p->top;
  memcpy (d->lower, p->lower, p->n_lower * sizeof p->lower[0]);
  d->n_lower = p->n_lower;
  d->n_frozen = p->n_frozen;
  chain_link (d);
  d->man = p->next;
  p->next = old;                /* freed with the plan */
  p->installed = true;
}

int
chain_plan_save (struct cow_disk *d, struct chain_plan *p)
{
  bool uncertain;

  CHAIN_ASSERT_ADMIN (d);
  if (manifest_save (d->state_dir, &p->next, &uncertain) == 0)
    return 0;
  if (uncertain) {
    /* The new manifest may be the one on disk: until d->man (the old
     * chain, still served) is saved again, nothing is durable. */
    int e = cow_last_errno ();
    CLEANUP_FREE char *m = strdup (cow_last_error ());
    chain_set_degraded (d, "a chain change failed after replacing the manifest");
    p->keep_added_file = true;
    cow_error_set (e, "%s", m ? m : "saving the manifest");
  }
  return -1;
}

int
chain_plan_switch (struct cow_disk *d, struct chain_plan *p, const char *what)
{
  CHAIN_ASSERT_ADMIN (d);
  if (chain_wait_exclusive (&d, 1, CHAIN_HOLD_CHAIN, what, NULL) == -1) {
    chain_set_degraded (d, what);
    return -1;
  }
  chain_plan_install (d, p);
  chain_release (&d, 1, CHAIN_HOLD_CHAIN);
  return 0;
}

int
chain_commit_installed (struct cow_disk *d, const char *what)
{
  CHAIN_ASSERT_ADMIN (d);
  if (manifest_save (d->state_dir, &d->man, NULL) == 0)
    return 0;
  chain_set_degraded (d, what);
  return -1;
}

static void *
close_thread (void *arg)
{
  int *fds = arg;

  for (size_t i = 0; fds[i] != -1; i++)
    io_close (fds[i]);
  free (fds);
  return NULL;
}

/* Delete the files that left the chain.  The last close of a deleted
 * file frees its cached pages and its blocks, which for a merged layer
 * of a GiB takes a good part of a second: so each file is opened once
 * more before its name goes, and that descriptor, which outlives the
 * layer's own, is closed by a thread of its own (close_later) once the
 * layers are closed, while the job goes on to report its end.  Returns
 * the descriptors (-1 ends the array), or NULL without memory. */
static int *
unlink_files (struct cow_disk *d, struct chain_plan *p)
{
  int *fds = calloc (p->n_gone_files + 1, sizeof *fds);
  size_t n = 0;

  for (size_t i = 0; i < p->n_gone_files; i++) {
    CLEANUP_FREE char *path = statedir_path (d, p->gone_files[i]);
    int fd = fds && path
      ? io_open (path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC, 0) : -1;

    statedir_unlink_layer (d, p->gone_files[i]);
    if (fd != -1)
      fds[n++] = fd;
  }
  if (fds)
    fds[n] = -1;
  return fds;
}

static void
close_later (struct cow_disk *d, int *fds)
{
  if (fds == NULL)
    return;
  /* The previous one has long ended (it only closes descriptors). */
  chain_join_closer (d);
  if (fds[0] != -1
      && pthread_create (&d->closer, NULL, close_thread, fds) == 0) {
    d->closer_joinable = true;
    return;
  }
  close_thread (fds);
}

/* The thread of close_later must end before the disk (and the code:
 * nbdkit unloads the plugin after closing its disks) goes. */
void
chain_join_closer (struct cow_disk *d)
{
  if (d->closer_joinable) {
    pthread_join (d->closer, NULL);
    d->closer_joinable = false;
  }
}

void
chain_plan_free (struct cow_disk *d, struct chain_plan *p)
{
  if (p == NULL)
    return;
  if (p->installed) {
    /* Backing names that the change made stale (the layer over a merged
     * one): exactly the layers mark_rebases marked, so a change without
     * marks (snapshot, revert, names) has nothing to check.  A failure is
     * repaired at the next open (statedir_check_names). */
    int *fds = NULL;

    if (d->man.n_rebase > 0 && statedir_check_names (d, false) == -1)
      cow_error_clear ();
    /* Only once the manifest that drops them is on disk. */
    if (!chain_degraded (d))
      fds = unlink_files (d, p);
    for (size_t i = 0; i < p->n_gone; i++)
      p->gone[i]->ops->close (p->gone[i]);
    close_later (d, fds);
  }
  else if (p->added) {
    p->added->ops->close (p->added);
    if (!p->keep_added_file)
      statedir_unlink_layer (d, p->added_file);
  }
  for (size_t i = 0; i < p->n_gone_files; i++)
    free (p->gone_files[i]);
  free (p->added_file);
  manifest_free (&p->next);
  free (p);
}
