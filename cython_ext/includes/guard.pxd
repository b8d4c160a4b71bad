# Recovery from SIGBUS on guest memory (guard.h: why and how).
from libc.stdint cimport uint64_t

cdef extern from "guard.h" nogil:
    enum:
        VFE_FAULTED
    ctypedef int (*vfe_match_fn)(void *ctx, uint64_t addr) noexcept nogil
    ctypedef int (*vfe_guarded_fn)(void *arg) noexcept nogil
    int vfe_sigbus_install()
    int vfe_thread_guard_init()
    void vfe_thread_guard_fini()
    int vfe_guarded(vfe_guarded_fn fn, void *arg, void *ctx, vfe_match_fn match)
    uint64_t vfe_guard_addr()
    void vfe_signal_fence()
