/* SPDX-License-Identifier: BSD-3-Clause */
/* The event bus of a service, its log, and the debug areas (events.h).
 *
 * Emitting never waits on a subscriber: an event is formatted once,
 * logged, and copied into each subscriber's bounded queue; a full queue
 * counts the event as lost instead, and the subscriber's next take
 * starts with one "lost" line.  The control connection that streams a
 * subscriber's events (control.c) is the only one that waits on its
 * client, and it drops a client that takes nothing for a while.
 * Rejected: one shared ring read at each subscriber's own position (a
 * slow reader then needs the ring to keep what the others have read, or
 * loses events it cannot count), and writing to the sockets from the
 * emitting thread (a snapshot would wait on a client).
 *
 * Locks: taps_lock (this file's, global) guards every disk's links to
 * the buses of the services that serve it (d->events_tap) and is held
 * while an event is delivered, so that a bus can be freed under it; then
 * a bus's lock (its subscribers and their queues).  Both are leaves under the engine's locks (chain.h):
 * an event is emitted with admin_lock or job_lock possibly held, and
 * nothing here takes another lock. */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "cowchain.h"
#include "disk.h"
#include "error.h"
#include "events.h"
#include "words.h"

/*----------------------------------------------------------------------
 * Debug areas.
 */

unsigned events_debug_areas;
static cow_log_fn debug_log;
static void *debug_opaque;

static const char *
area_name (unsigned area)
{
  switch (area) {
  case COW_DEBUG_SNAPSHOT: return "snapshot";
  case COW_DEBUG_JOB: return "job";
  case COW_DEBUG_CONTROL: return "control";
  case COW_DEBUG_EVENTS: return "events";
  case COW_DEBUG_SYNC: return "sync";
  }
  return "debug";
}

void
cow_debug_set (unsigned areas, cow_log_fn log, void *opaque)
{
  debug_log = log;
  debug_opaque = opaque;
  __atomic_store_n (&events_debug_areas, log ? areas : 0, __ATOMIC_RELEASE);
}

void
events_debug (unsigned area, const char *fmt, ...)
{
  char line[1024];
  va_list ap;
  int n;

  if (debug_log == NULL)
    return;
  n = snprintf (line, sizeof line, "%s: ", area_name (area));
  va_start (ap, fmt);
  vsnprintf (line + n, sizeof line - (size_t) n, fmt, ap);
  va_end (ap);
  debug_log (debug_opaque, COW_LOG_DEBUG, line);
}

/*----------------------------------------------------------------------
 * The bus and its subscribers.
 */

/* A disk's link to one bus (a disk may be served by several services,
 * each naming it). */
struct events_tap {
  struct events_bus *bus;
  struct cow_disk *d;
  char *name;
  struct events_tap *next;      /* the bus's list */
  struct events_tap *disk_next; /* the disk's list */
};

struct events_sub {
  struct events_bus *bus;
  char *disk;                   /* NULL: every disk */
  int fd;                       /* eventfd: readable while lines wait */
  /* Under the bus's lock. */
  char *queue[EVENTS_QUEUE_MAX];
  size_t head, n;
  uint64_t lost;
  struct events_sub *next;
};

struct events_bus {
  cow_log_fn log;
  void *log_opaque;
  struct events_tap *taps;      /* under taps_lock */
  pthread_mutex_t lock;         /* subs, and each sub's queue */
  struct events_sub *subs;
  size_t n_subs;
};

static pthread_mutex_t taps_lock = PTHREAD_MUTEX_INITIALIZER;

struct events_bus *
events_bus_new (void)
{
  struct events_bus *b = calloc (1, sizeof *b);

  if (b == NULL) {
    cow_error_errno ("calloc");
    return NULL;
  }
  pthread_mutex_init (&b->lock, NULL);
  return b;
}

void
events_bus_free (struct events_bus *b)
{
  if (b == NULL)
    return;
  /* control_stop joined every stream first. */
  if (b->subs)
    COW_DEBUG (COW_DEBUG_EVENTS, "BUG: a bus freed with %zu subscribers",
               b->n_subs);
  pthread_mutex_lock (&taps_lock);
  while (b->taps) {
    struct events_tap *t = b->taps, **pp;
    b->taps = t->next;
    for (pp = &t->d->events_tap; *pp; pp = &(*pp)->disk_next)
      if (*pp == t) {
        *pp = t->disk_next;
        break;
      }
    free (t->name);
    free (t);
  }
  pthread_mutex_unlock (&taps_lock);
  pthread_mutex_destroy (&b->lock);
  free (b);
}

void
events_bus_set_log (struct events_bus *b, cow_log_fn log, void *opaque)
{
  pthread_mutex_lock (&taps_lock);
  b->log = log;
  b->log_opaque = opaque;
  pthread_mutex_unlock (&taps_lock);
}

void
events_bus_log (struct events_bus *b, enum cow_log_level level,
                const char *line)
{
  cow_log_fn log;
  void *opaque;

  pthread_mutex_lock (&taps_lock);
  log = b->log;
  opaque = b->log_opaque;
  pthread_mutex_unlock (&taps_lock);
  if (log)
    log (opaque, level, line);
}

int
events_bus_attach (struct events_bus *b, struct cow_disk *d, const char *name)
{
  struct events_tap *t = calloc (1, sizeof *t);

  if (t == NULL || (t->name = strdup (name)) == NULL) {
    free (t);
    cow_error_errno ("calloc");
    return -1;
  }
  t->bus = b;
  t->d = d;
  pthread_mutex_lock (&taps_lock);
  t->next = b->taps;
  b->taps = t;
  t->disk_next = d->events_tap;
  d->events_tap = t;
  pthread_mutex_unlock (&taps_lock);
  return 0;
}

struct events_sub *
events_subscribe (struct events_bus *b, const char *disk)
{
  struct events_sub *s = calloc (1, sizeof *s);

  if (s == NULL) {
    cow_error_errno ("calloc");
    return NULL;
  }
  s->bus = b;
  s->fd = eventfd (0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (s->fd == -1 || (disk && (s->disk = strdup (disk)) == NULL)) {
    cow_error_errno ("events subscriber");
    if (s->fd != -1)
      close (s->fd);
    free (s);
    return NULL;
  }
  pthread_mutex_lock (&b->lock);
  if (b->n_subs >= EVENTS_MAX_SUBSCRIBERS) {
    pthread_mutex_unlock (&b->lock);
    close (s->fd);
    free (s->disk);
    free (s);
    cow_error_set (EBUSY, "too many event subscribers (at most %d at once)",
                   EVENTS_MAX_SUBSCRIBERS);
    return NULL;
  }
  s->next = b->subs;
  b->subs = s;
  b->n_subs++;
  pthread_mutex_unlock (&b->lock);
  COW_DEBUG (COW_DEBUG_EVENTS, "subscriber %p for %s%s%s: %zu now", (void *) s,
             disk ? "disk '" : "every disk", disk ? disk : "",
             disk ? "'" : "", b->n_subs);
  return s;
}

int
events_sub_fd (const struct events_sub *s)
{
  return s->fd;
}

/* Now, in ISO 8601 UTC with milliseconds: 2026-12-08T01:40:00.123Z. */
static void
format_now (char *buf, size_t len)
{
  struct timespec ts;
  struct tm t;

  clock_gettime (CLOCK_REALTIME, &ts);
  gmtime_r (&ts.tv_sec, &t);
  snprintf (buf, len, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ",
            t.tm_year + 1900, t.tm_mon + 1, t.tm_mday, t.tm_hour, t.tm_min,
            t.tm_sec, (int) (ts.tv_nsec / 1000000));
}

/* The protocol's line for one event: encoded words. */
static char *
encode_line (const char *time, const char *disk, const char *kind,
             const struct events_fields *f, size_t *len)
{
  char *text = NULL, *w;
  FILE *m = open_memstream (&text, len);

  if (m == NULL)
    return NULL;
  fputs (time, m);
  w = word_encode (disk);
  fprintf (m, " %s %s", w ? w : "-", kind);
  free (w);
  for (size_t i = 0; f && i < f->n; i++) {
    char *kv = NULL;
    if (asprintf (&kv, "%s=%s", f->key[i], f->value[i]) == -1)
      continue;
    w = word_encode (kv);
    if (w)
      fprintf (m, " %s", w);
    free (w);
    free (kv);
  }
  fputc ('\n', m);
  if (fclose (m) == EOF) {
    free (text);
    return NULL;
  }
  return text;
}

char *
events_sub_take (struct events_sub *s, size_t *len)
{
  struct events_bus *b = s->bus;
  char *text = NULL, tm[80];
  FILE *m;
  uint64_t ignored, lost;
  size_t n;

  /* Reset first: an event queued after this is signalled again. */
  if (read (s->fd, &ignored, sizeof ignored) == -1 && errno != EAGAIN)
    return NULL;
  m = open_memstream (&text, len);
  if (m == NULL)
    return NULL;
  pthread_mutex_lock (&b->lock);
  lost = s->lost;
  s->lost = 0;
  n = s->n;
  if (lost) {
    struct events_fields f = { .n = 1, .key = { "count" } };
    char count[32], *line;
    size_t ll;
    snprintf (count, sizeof count, "%" PRIu64, lost);
    f.value[0] = count;
    format_now (tm, sizeof tm);
    line = encode_line (tm, s->disk ? s->disk : "", "lost", &f, &ll);
    if (line)
      fputs (line, m);
    free (line);
  }
  for (size_t i = 0; i < s->n; i++) {
    char *line = s->queue[(s->head + i) % EVENTS_QUEUE_MAX];
    fputs (line, m);
    free (line);
  }
  s->head = s->n = 0;
  pthread_mutex_unlock (&b->lock);
  if (fclose (m) == EOF) {
    free (text);
    return NULL;
  }
  if (lost)
    COW_DEBUG (COW_DEBUG_EVENTS, "subscriber %p: %" PRIu64 " events lost "
               "(its queue of %d was full)", (void *) s, lost,
               EVENTS_QUEUE_MAX);
  if (*len == 0) {
    free (text);
    return NULL;
  }
  COW_DEBUG (COW_DEBUG_EVENTS, "subscriber %p: %zu events taken (%zu bytes)",
             (void *) s, n + (lost ? 1 : 0), *len);
  return text;
}

void
events_unsubscribe (struct events_sub *s)
{
  struct events_bus *b;
  struct events_sub **pp;

  if (s == NULL)
    return;
  b = s->bus;
  pthread_mutex_lock (&b->lock);
  for (pp = &b->subs; *pp; pp = &(*pp)->next)
    if (*pp == s) {
      *pp = s->next;
      b->n_subs--;
      break;
    }
  pthread_mutex_unlock (&b->lock);
  COW_DEBUG (COW_DEBUG_EVENTS, "subscriber %p gone (%zu events unsent, %"
             PRIu64 " lost)", (void *) s, s->n, s->lost);
  for (size_t i = 0; i < s->n; i++)
    free (s->queue[(s->head + i) % EVENTS_QUEUE_MAX]);
  close (s->fd);
  free (s->disk);
  free (s);
}

/*----------------------------------------------------------------------
 * Emitting.
 */

void
events_add (struct events_fields *f, const char *key, const char *fmt, ...)
{
  va_list ap;
  char *v;
  int r;

  if (f->n == EVENTS_MAX_FIELDS)
    return;
  va_start (ap, fmt);
  r = vasprintf (&v, fmt, ap);
  va_end (ap);
  if (r == -1)
    return;
  f->key[f->n] = key;
  f->value[f->n++] = v;
}

/* A value as the log shows it: as it is when it holds only printable
 * ASCII and no blank, quote or backslash; else in double quotes, with
 * \" \\ and \xNN for the rest. */
static void
log_value (FILE *m, const char *v)
{
  bool plain = v[0] != '\0';

  for (const unsigned char *c = (const unsigned char *) v; *c && plain; c++)
    plain = *c > 0x20 && *c < 0x7f && *c != '"' && *c != '\\';
  if (plain) {
    fputs (v, m);
    return;
  }
  fputc ('"', m);
  for (const unsigned char *c = (const unsigned char *) v; *c; c++) {
    if (*c == '"' || *c == '\\')
      fprintf (m, "\\%c", *c);
    else if (*c < 0x20 || *c >= 0x7f)
      fprintf (m, "\\x%02x", *c);
    else
      fputc (*c, m);
  }
  fputc ('"', m);
}

static void
log_event (struct events_bus *b, enum cow_log_level level, const char *disk,
           const char *kind, const struct events_fields *f)
{
  char *text = NULL;
  size_t len;
  FILE *m;

  if (b->log == NULL)
    return;
  m = open_memstream (&text, &len);
  if (m == NULL)
    return;
  fputs ("event: ", m);
  log_value (m, disk[0] ? disk : "-");
  fprintf (m, " %s", kind);
  for (size_t i = 0; i < f->n; i++) {
    fprintf (m, " %s=", f->key[i]);
    log_value (m, f->value[i]);
  }
  if (fclose (m) == 0)
    b->log (b->log_opaque, level, text);
  free (text);
}

/* Queue line (a copy) for s, or count it lost (also when it could not
 * be formatted: NULL).  Caller holds the bus's lock. */
static void
deliver (struct events_sub *s, const char *line)
{
  static const uint64_t one = 1;
  char *copy;

  if (line == NULL || s->n == EVENTS_QUEUE_MAX
      || (copy = strdup (line)) == NULL)
    s->lost++;
  else {
    s->queue[(s->head + s->n) % EVENTS_QUEUE_MAX] = copy;
    s->n++;
  }
  /* Cannot block: the counter would have to reach 2^64 - 1. */
  if (write (s->fd, &one, sizeof one) == -1)
    events_debug (COW_DEBUG_EVENTS, "eventfd: %s", strerror (errno));
}

void
events_emit (struct cow_disk *d, const char *kind, enum cow_log_level level,
             struct events_fields *f)
{
  struct events_tap *t;
  char when[80];

  format_now (when, sizeof when);
  pthread_mutex_lock (&taps_lock);
  for (t = d->events_tap; t; t = t->disk_next) {
    struct events_bus *b = t->bus;
    size_t len;
    char *line;

    log_event (b, level, t->name, kind, f);
    line = encode_line (when, t->name, kind, f, &len);
    pthread_mutex_lock (&b->lock);
    for (struct events_sub *s = b->subs; s; s = s->next)
      if (s->disk == NULL || strcmp (s->disk, t->name) == 0) {
        deliver (s, line);
      }
    pthread_mutex_unlock (&b->lock);
    free (line);
  }
  pthread_mutex_unlock (&taps_lock);
  for (size_t i = 0; i < f->n; i++)
    free (f->value[i]);
  f->n = 0;
}

void
events_emit_job (struct cow_disk *d, const char *kind,
                 enum cow_log_level level, const char *job, const char *top,
                 const char *base, struct events_fields *f)
{
  struct events_fields all = { 0 };

  events_add (&all, "job", "%s", job);
  events_add (&all, "top", "%s", top);
  events_add (&all, "base", "%s", base);
  for (size_t i = 0; i < f->n; i++) {
    if (all.n < EVENTS_MAX_FIELDS) {
      all.key[all.n] = f->key[i];
      all.value[all.n++] = f->value[i];
    }
    else
      free (f->value[i]);
  }
  f->n = 0;
  events_emit (d, kind, level, &all);
}
