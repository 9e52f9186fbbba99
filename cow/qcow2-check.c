/* Consistency check of a qcow2 file. (Being written.) */
#include <config.h>

#include "qcow2-check.h"
