/* SPDX-License-Identifier: BSD-3-Clause */
/* Events, the service's log and the debug areas (see events.c).
 *
 * An event is one thing that happened to a disk (a snapshot, a revert,
 * a job's start, milestones and end, the disk becoming degraded): a
 * kind and a few KEY=VALUE fields.  The engine's files emit them with
 * events_emit; the bus of the service that serves the disk logs each one
 * and queues it for every subscriber (the control socket's events
 * request).  A disk that no service serves (offline use) emits nothing.
 *
 * Debug lines: COW_DEBUG (AREA, fmt, ...) costs one load and test when
 * the area is off; nothing is formatted then. */
#ifndef COW_EVENTS_H
#define COW_EVENTS_H

#include <stddef.h>

#include "cowchain.h"

struct cow_disk;

/*----------------------------------------------------------------------
 * Debug areas (COW_DEBUG_* of cowchain.h).
 */

extern unsigned events_debug_areas;
void events_debug (unsigned area, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));
#define COW_DEBUG(area, ...)                                            \
  do {                                                                  \
    if (__builtin_expect (__atomic_load_n (&events_debug_areas,         \
                                           __ATOMIC_RELAXED) & (area), 0)) \
      events_debug ((area), __VA_ARGS__);                               \
  } while (0)
/* Milliseconds between two chain_now_ns () readings, for debug lines. */
#define EVENTS_MS(t0, t1) ((double) ((t1) - (t0)) / 1e6)

/*----------------------------------------------------------------------
 * Emitting.
 */

#define EVENTS_MAX_FIELDS 12
struct events_fields {
  size_t n;
  const char *key[EVENTS_MAX_FIELDS];
  char *value[EVENTS_MAX_FIELDS];
};
/* Add KEY=VALUE (the value formatted like printf).  A field that does
 * not fit or finds no memory is left out. */
void events_add (struct events_fields *f, const char *key, const char *fmt,
                 ...) __attribute__ ((format (printf, 3, 4)));
/* Emit an event of kind on d: logged at level (COW_LOG_INFO: went as
 * planned; COW_LOG_ERROR: a failure) and queued for the subscribers.
 * Frees f's values.  Never waits on a subscriber; takes only the events
 * locks (leaves: callable under any engine lock). */
void events_emit (struct cow_disk *d, const char *kind,
                  enum cow_log_level level, struct events_fields *f);

/* The same for a job's event: its fields after job=JOB top=TOP
 * base=BASE. */
void events_emit_job (struct cow_disk *d, const char *kind,
                      enum cow_log_level level, const char *job,
                      const char *top, const char *base,
                      struct events_fields *f);

/*----------------------------------------------------------------------
 * The bus of a service.
 */

/* At most this many subscribers at once per bus (each holds one control
 * connection: CONTROL_MAX_CONNECTIONS leaves the rest to requests), and
 * this many events queued per subscriber; past it, events are counted
 * and the subscriber gets one "lost" event with the count instead. */
#define EVENTS_MAX_SUBSCRIBERS 16
#define EVENTS_QUEUE_MAX 256

struct events_bus;
struct events_bus *events_bus_new (void);
/* Detach every disk (their later events go nowhere) and free the bus.
 * Its subscribers must have ended. */
void events_bus_free (struct events_bus *b);
void events_bus_set_log (struct events_bus *b, cow_log_fn log, void *opaque);
/* A line for the bus's log (control requests). */
void events_bus_log (struct events_bus *b, enum cow_log_level level,
                     const char *line);
/* d's events go to b under the disk name 'name' ("" the unnamed disk). */
int events_bus_attach (struct events_bus *b, struct cow_disk *d,
                       const char *name);

/* A subscriber: the events of every disk (disk NULL) or of one, from
 * now on.  NULL with EBUSY past EVENTS_MAX_SUBSCRIBERS. */
struct events_sub;
struct events_sub *events_subscribe (struct events_bus *b, const char *disk);
/* Readable while events wait to be taken (for poll). */
int events_sub_fd (const struct events_sub *s);
/* The events waiting, as payload lines of the control protocol (each
 * ending in a newline: TIME DISK KIND KEY=VALUE..., encoded words), a
 * "lost" line first if some were dropped; malloc'd, *len bytes.  NULL
 * if none. */
char *events_sub_take (struct events_sub *s, size_t *len);
void events_unsubscribe (struct events_sub *s);

#endif /* COW_EVENTS_H */
