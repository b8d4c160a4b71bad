#ifndef VFE_COUNTERS_H
#define VFE_COUNTERS_H
/* The per-queue counters' build switch and their storage (counters.pxd).
 * setup.py defines VFE_ENGINE_COUNTERS=0 when built with that environment
 * variable: every counting statement is then `if (0)` and the compiler
 * drops it, so the benchmark can compare the two builds (scripts/bench
 * --counters-ab). */
#include <stdlib.h>
#include <string.h>

#ifndef VFE_ENGINE_COUNTERS
#define VFE_ENGINE_COUNTERS 1
#endif
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
