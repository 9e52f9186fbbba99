/* SPDX-License-Identifier: BSD-3-Clause */
/* The model-disk fixture: see model.h. */
#include <config.h>

#include <inttypes.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "cowchain.h"
#include "model.h"
#include "testutil.h"

#define CHUNK (1u << 20)

void
tu_model_init (struct tu_model *m, uint64_t size, uint32_t cs, uint64_t seed)
{
  memset (m, 0, sizeof *m);
  m->size = size;
  m->cs = cs;
  m->seed = seed;
  m->trim_zeroes = true;
  m->subclusters = tu_subclusters ();
  m->data = calloc (1, size);
  assert_non_null (m->data);
}

void
tu_model_fini (struct tu_model *m)
{
  for (size_t i = 0; i < TU_MODEL_SNAPS; i++) {
    free (m->snaps[i].name);
    free (m->snaps[i].data);
  }
  free (m->data);
  memset (m, 0, sizeof *m);
}

void
tu_model_fill_base (struct tu_model *m)
{
  tu_fill_random (m->data, m->size, &m->seed);
  if (m->size > 3 * 65536)
    memset (m->data + m->size / 3, 0, 65536 + 511);
}

void
tu_model_pwrite (struct tu_model *m, struct cow_disk *d, const void *buf,
                 uint64_t off, uint32_t len, unsigned flags)
{
  int r = cow_disk_pwrite (d, buf, len, off, flags);

  if (r == -1)
    print_error ("pwrite %u@%" PRIu64 ": %s\n", len, off, cow_last_error ());
  assert_int_equal (r, 0);
  memcpy (m->data + off, buf, len);
}

void
tu_model_write (struct tu_model *m, struct cow_disk *d, uint64_t off,
                uint32_t len, unsigned flags)
{
  uint8_t *buf = malloc (len ? len : 1);

  assert_non_null (buf);
  tu_fill_random (buf, len, &m->seed);
  tu_model_pwrite (m, d, buf, off, len, flags);
  free (buf);
}

void
tu_model_zero (struct tu_model *m, struct cow_disk *d, uint64_t off,
               uint32_t len, unsigned flags)
{
  int r = cow_disk_zero (d, len, off, flags);

  if (r == -1)
    print_error ("zero %u@%" PRIu64 ": %s\n", len, off, cow_last_error ());
  assert_int_equal (r, 0);
  memset (m->data + off, 0, len);
}

void
tu_model_trimmed (struct tu_model *m, uint64_t off, uint32_t len)
{
  uint64_t u = tu_trim_unit (m->cs, m->subclusters);
  uint64_t first = (off + u - 1) / u * u;
  uint64_t last = (off + len) / u * u;

  if (first < last && m->trim_zeroes)
    memset (m->data + first, 0, last - first);
}

void
tu_model_trim (struct tu_model *m, struct cow_disk *d, uint64_t off,
               uint32_t len, unsigned flags)
{
  int r = cow_disk_trim (d, len, off, flags);

  if (r == -1)
    print_error ("trim %u@%" PRIu64 ": %s\n", len, off, cow_last_error ());
  assert_int_equal (r, 0);
  tu_model_trimmed (m, off, len);
}

void
tu_model_verify_range (struct tu_model *m, struct cow_disk *d, uint64_t off,
                       uint64_t len, const char *what)
{
  uint8_t *buf = malloc (len < CHUNK ? (len ? len : 1) : CHUNK);

  assert_non_null (buf);
  while (len > 0) {
    uint32_t n = len > CHUNK ? CHUNK : (uint32_t) len;
    int r = cow_disk_pread (d, buf, n, off);
    if (r == -1)
      print_error ("%s: pread %u@%" PRIu64 ": %s\n", what, n, off,
                   cow_last_error ());
    assert_int_equal (r, 0);
    tu_assert_bytes_equal (buf, m->data + off, n, off, what);
    off += n;
    len -= n;
  }
  free (buf);
}

void
tu_model_verify (struct tu_model *m, struct cow_disk *d, const char *what)
{
  tu_model_verify_range (m, d, 0, m->size, what);
}

struct tu_model_snap *
tu_model_keep (struct tu_model *m, const char *name)
{
  struct tu_model_snap *s;

  assert_true (m->n_snaps < TU_MODEL_SNAPS);
  s = &m->snaps[m->n_snaps++];
  free (s->name);
  s->name = strdup (name);
  assert_non_null (s->name);
  if (s->data == NULL)
    s->data = malloc (m->size);
  assert_non_null (s->data);
  memcpy (s->data, m->data, m->size);
  return s;
}

struct tu_model_snap *
tu_model_snapshot (struct tu_model *m, struct cow_disk *d, const char *name,
                   const char *description)
{
  int r = cow_disk_snapshot (d, name, description);

  if (r == -1)
    print_error ("snapshot %s: %s\n", name, cow_last_error ());
  assert_int_equal (r, 0);
  return tu_model_keep (m, name);
}

struct tu_model_snap *
tu_model_snap (struct tu_model *m, const char *name)
{
  for (size_t i = 0; i < m->n_snaps; i++)
    if (strcmp (m->snaps[i].name, name) == 0)
      return &m->snaps[i];
  return NULL;
}

void
tu_model_forget (struct tu_model *m, const char *name)
{
  struct tu_model_snap *s = tu_model_snap (m, name), t;

  assert_non_null (s);
  /* Swap with the last, whose buffer moves to the freed slot's place. */
  t = *s;
  *s = m->snaps[--m->n_snaps];
  m->snaps[m->n_snaps] = t;
}

void
tu_model_forget_all (struct tu_model *m)
{
  m->n_snaps = 0;
}
