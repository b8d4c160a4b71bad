# Which device's memory vanished: the engine's registry of guest mappings,
# searched when a guarded section faults (includes/guard.h), and the
# breaking of that one device.
#
# A device's fault domain is every mapping its front-end gave us: the
# memory table's regions, the dirty log and (blk) the inflight region.
# The in-engine switch copies from one guest's memory into another's, so
# the device to break is the one whose mapping the address is in, whoever
# was being served.
#
# The registry changes only with the world stopped and the engine's Python
# lock held; it is searched by a worker holding its own lock or by the
# control thread holding the world or that lock -- so never while it
# changes.  I/O threads do not search it (their guard has no match
# function: they only ever touch guest memory).
from libc.stdint cimport uint8_t, uint64_t
from atomics cimport *
from linux cimport write
from vring cimport Vring, MemTable, DirtyLog

cdef enum:
    E_FAULT = -16      # the guest's memory vanished under us (SIGBUS: its file was truncated)

ctypedef struct FaultDomain:
    MemTable *mem
    DirtyLog *log
    Vring *vqs
    int nvqs
    uint64_t extra_base      # the front-end's other mapping (a blk device's inflight region)
    uint64_t extra_len

ctypedef struct FaultRegistry:
    int n
    int cap
    FaultDomain **doms


cdef inline bint fault_in(FaultDomain *d, uint64_t a) noexcept nogil:
    cdef int i
    cdef MemTable *mt = d.mem
    for i in range(mt.n):
        if a >= mt.r[i].hva and a - mt.r[i].hva < mt.r[i].size:
            return True
    if d.log != NULL and d.log.base != NULL and a >= <uint64_t>d.log.base \
            and a - <uint64_t>d.log.base < d.log.size:
        return True
    return d.extra_len != 0 and a >= d.extra_base and a - d.extra_base < d.extra_len


cdef inline FaultDomain *fault_find(FaultRegistry *reg, uint64_t addr) noexcept nogil:
    cdef int i
    if reg == NULL:
        return NULL
    for i in range(reg.n):
        if fault_in(reg.doms[i], addr):
            return reg.doms[i]
    return NULL


cdef inline int fault_match(void *ctx, uint64_t addr) noexcept nogil:
    """The SIGBUS handler's question: is this address some guest's memory?"""
    return fault_find(<FaultRegistry *>ctx, addr) != NULL


cdef inline bint mem_gone(Vring *vq) noexcept nogil:
    """The ring's guest memory faulted: touch nothing of it any more."""
    return vq.mem != NULL and vq.mem.fault_addr != 0


cdef inline void fault_mark(FaultDomain *d, uint64_t addr, int event_fd) noexcept nogil:
    """Break every ring of the device whose memory faulted at `addr` (its
    other workers see `broken` at their next burst) and tell Python."""
    cdef uint64_t one = 1
    cdef int i
    cdef Vring *vq
    if d.mem.fault_addr == 0:
        d.mem.fault_addr = addr
    for i in range(d.nvqs):
        vq = &d.vqs[i]
        if not vq.broken:
            vfe_store_release_int(&vq.broken, -E_FAULT)
            vfe_add_u64(&vq.errors, 1)
    if event_fd >= 0:
        write(event_fd, &one, 8)
