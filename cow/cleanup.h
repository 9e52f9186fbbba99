/* SPDX-License-Identifier: BSD-3-Clause */
/* Scoped cleanup for the engine (GCC and Clang's cleanup attribute, as
 * nbdkit's common/include/cleanup.h does): a variable declared with one
 * of these is released when it goes out of scope, so that error paths
 * need no hand-paired free or unlock.  Used only where it makes a
 * function shorter; the I/O path does not use them. */
#ifndef COW_CLEANUP_H
#define COW_CLEANUP_H

#include <pthread.h>
#include <stdlib.h>

static inline void
cow_cleanup_free (void *ptr)
{
  free (*(void **) ptr);
}
/* A malloc'd pointer freed at the end of its scope. */
#define CLEANUP_FREE __attribute__ ((cleanup (cow_cleanup_free)))

static inline void
cow_cleanup_mutex_unlock (pthread_mutex_t **ptr)
{
  pthread_mutex_unlock (*ptr);
}
/* Hold mutex m for the rest of the scope. */
#define COW_LOCK_FOR_SCOPE_(m, n)                                       \
  pthread_mutex_t *cow_scoped_lock_##n                                  \
    __attribute__ ((cleanup (cow_cleanup_mutex_unlock), unused)) = (m); \
  pthread_mutex_lock (cow_scoped_lock_##n)
#define COW_LOCK_FOR_SCOPE_N(m, n) COW_LOCK_FOR_SCOPE_ (m, n)
#define LOCK_FOR_SCOPE(m) COW_LOCK_FOR_SCOPE_N (m, __LINE__)

#endif /* COW_CLEANUP_H */
