#ifndef VFE_COUNTERS_H
#define VFE_COUNTERS_H
/* The per-queue counters' build switch and their storage (counters.pxd).
 * setup.py writes counters_build.h from the VFE_ENGINE_COUNTERS environment
 * variable (default 1); with 0 every counting statement is then `if (0)` and the compiler
 * drops it, so the benchmark can compare the two builds (scripts/bench
 * --counters-ab). */
#include <stdlib.h>
#include <string.h>

#include "counters_build.h"
#define VFE_COUNTERS (VFE_ENGINE_COUNTERS != 0)

/* n zeroed blocks of `size` bytes (a multiple of 64), each on cache lines
 * of its own: a worker's increments never share a line with another's. */
static inline void *vfe_counters_alloc(size_t n, size_t size)
{
    void *p = NULL;
    if (n == 0 || posix_memalign(&p, 64, n * size) != 0)
        return NULL;
    memset(p, 0, n * size);
    return p;
}
#endif
