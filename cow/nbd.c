/* A base on a remote NBD server, read through libnbd.  (Being written.) */
#include <config.h>

#include <errno.h>
#include <string.h>

#include "error.h"
#include "layer.h"

bool
nbd_is_uri (const char *name)
{
  return strncmp (name, "nbd:", 4) == 0 || strncmp (name, "nbds:", 5) == 0
    || strncmp (name, "nbd+", 4) == 0 || strncmp (name, "nbds+", 5) == 0;
}

struct layer *
nbd_layer_open (const char *uri)
{
  cow_error_set (ENOTSUP, "%s: remote NBD bases are not supported yet", uri);
  return NULL;
}
