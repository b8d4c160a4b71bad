# Inflight I/O tracking of split rings (vhost-user INFLIGHT_SHMFD, QEMU
# docs/interop/vhost-user.rst "Inflight I/O tracking"): a request queue
# records in a region QEMU keeps which descriptor heads it has taken and
# not yet completed, so that a new process after a crash (kill -9) can
# complete each of them exactly once.  The layout is described in
# vfe/vhost/inflight.py.
#
# The writes here are ordered for a crash at *any* instruction, not for
# another CPU: a killed process's stores are all in the shared pages, but
# the compiler must not move a flag before the data it vouches for.  Hence
# release stores on the fields recovery trusts (inflight flag,
# last_batch_head, used_idx).
#
# Runtime (the ring's worker, inside its burst):
#   taken from avail:  counter, then inflight = 1           (inflight_take)
#   used entry written: next = last_batch_head, head = it    (inflight_link)
#   used->idx published: inflight = 0 for the batch, then used_idx = used->idx
#                                                            (inflight_clear)
# Recovery (ring start, world stopped): inflight_recover.
#
# The region is the front-end's memory: every field in it (version,
# desc_num, last_batch_head, used_idx, the flags, counters and next links)
# may hold anything, and may change while we read it.  Nothing read from
# it is used as an index without a check against the ring size, and the
# ring size is checked against what the region holds (`ndesc`, from the
# region's length) before anything is written: ring_start refuses a ring
# that does not fit.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport qsort
from atomics cimport *

# Sizes and field offsets; the engine's inflight_layout() hands them to
# tests/unit/virtio/test_virtio_c_side.py, which checks them against
# vfe/vhost/inflight.py's structs.
cdef enum:
    IF_HDR = 16                 # QueueRegionSplit header
    IF_DESC = 16                # one DescStateSplit
    IF_VERSION = 8
    IF_DESC_NUM = 10
    IF_LAST_BATCH = 12
    IF_USED_IDX = 14
    IF_D_INFLIGHT = 0
    IF_D_NEXT = 6
    IF_D_COUNTER = 8

# inflight_recover results (besides a count >= 0)
cdef enum:
    IF_FRESH = -1               # version 0: initialised now, the front-end's base stands
    IF_BAD_SIZE = -2            # desc_num differs from the ring size
    IF_BAD_VERSION = -3         # a version we do not know (not 0 or 1)
    IF_TOO_SMALL = -4           # the region holds fewer entries than the ring has

ctypedef struct InflightQueue:
    uint8_t *region             # this queue's QueueRegionSplit; NULL: not tracked
    uint32_t ndesc              # DescStateSplit entries it has room for (bounds every index)
    uint64_t counter            # next fetch counter
    uint16_t *resubmit          # heads left inflight, in counter order (malloc'd at start)
    int nresubmit
    int resubmit_pos            # next one to serve


cdef inline uint8_t *if_desc(uint8_t *q, uint32_t head) noexcept nogil:
    return q + IF_HDR + IF_DESC * head


cdef inline void inflight_take(InflightQueue *iq, uint16_t head) noexcept nogil:
    """Head `head` was just read from the avail ring."""
    cdef uint8_t *d
    if iq.region == NULL or head >= iq.ndesc:
        return
    d = if_desc(iq.region, head)
    vfe_store_u64(<uint64_t *>(d + IF_D_COUNTER), iq.counter)
    iq.counter += 1
    vfe_store_release_u8(d + IF_D_INFLIGHT, 1)


cdef inline void inflight_link(InflightQueue *iq, uint16_t head) noexcept nogil:
    """Head `head`'s used entry is written (not yet published): put it on
    the last-batch list recovery walks if used->idx got ahead of used_idx."""
    cdef uint8_t *d
    cdef uint16_t *lbh
    if iq.region == NULL or head >= iq.ndesc:
        return
    d = if_desc(iq.region, head)
    lbh = <uint16_t *>(iq.region + IF_LAST_BATCH)
    vfe_store_u16(<uint16_t *>(d + IF_D_NEXT), vfe_load_u16(lbh))
    vfe_store_release_u16(lbh, head)


cdef inline void inflight_clear(InflightQueue *iq, uint16_t *heads, int n,
                                uint16_t used_idx) noexcept nogil:
    """used->idx (now `used_idx`) was published with `heads` in it."""
    cdef int i
    if iq.region == NULL or n == 0:
        return
    for i in range(n):
        if heads[i] < iq.ndesc:
            vfe_store_release_u8(if_desc(iq.region, heads[i]) + IF_D_INFLIGHT, 0)
    vfe_store_release_u16(<uint16_t *>(iq.region + IF_USED_IDX), used_idx)


cdef inline uint16_t inflight_next_resubmit(InflightQueue *iq) noexcept nogil:
    cdef uint16_t head = iq.resubmit[iq.resubmit_pos]
    iq.resubmit_pos += 1
    return head


ctypedef struct _IfEntry:
    uint64_t counter
    uint32_t head


cdef inline int _if_cmp(const void *a, const void *b) noexcept nogil:
    cdef uint64_t x = (<_IfEntry *>a).counter, y = (<_IfEntry *>b).counter
    return -1 if x < y else (1 if x > y else 0)


cdef inline int inflight_recover(InflightQueue *iq, uint16_t size, uint16_t used_idx,
                                 _IfEntry *scratch) noexcept nogil:
    """A ring of `size` entries starts with this queue's region and the
    guest's used->idx `used_idx` (the front-end's SET_VRING_BASE is not
    trusted after a crash: QEMU falls back to its own idea of used_idx).

    A ring larger than the region: IF_TOO_SMALL; a version other than 0
    and 1: IF_BAD_VERSION; nothing written in either case.
    Version 0 (never used): initialise the header; IF_FRESH.  desc_num
    other than `size`: IF_BAD_SIZE, nothing changed.  Otherwise finish a
    batch the dead process published but did not clear (used->idx ahead of
    the region's used_idx: walk that many entries of the last-batch list),
    then collect the heads still inflight into iq.resubmit (caller-sized
    `size` entries) in counter order and return how many; the ring's next
    avail index is used_idx + that count."""
    cdef uint8_t *q = iq.region
    cdef uint16_t *hdr_used = <uint16_t *>(q + IF_USED_IDX)
    cdef uint16_t n, h
    cdef uint32_t i, steps
    cdef int count = 0
    cdef uint64_t top = 0
    cdef uint16_t version
    if size > iq.ndesc:
        return IF_TOO_SMALL
    version = vfe_load_u16(<uint16_t *>(q + IF_VERSION))
    if version > 1:
        return IF_BAD_VERSION
    if version == 0:
        for i in range(size):
            vfe_store_u8(if_desc(q, i) + IF_D_INFLIGHT, 0)
        vfe_store_u16(<uint16_t *>(q + IF_DESC_NUM), size)
        vfe_store_u16(<uint16_t *>(q + IF_LAST_BATCH), 0)
        vfe_store_u16(hdr_used, used_idx)
        vfe_store_release_u16(<uint16_t *>(q + IF_VERSION), 1)
        iq.counter = 0
        iq.nresubmit = 0
        iq.resubmit_pos = 0
        return IF_FRESH
    if vfe_load_u16(<uint16_t *>(q + IF_DESC_NUM)) != size:
        return IF_BAD_SIZE
    n = <uint16_t>(used_idx - vfe_load_u16(hdr_used))
    if n:
        h = vfe_load_u16(<uint16_t *>(q + IF_LAST_BATCH))
        steps = 0
        # a list longer than the ring is corrupt: stop there
        while n > 0 and steps < size and h < size:
            vfe_store_u8(if_desc(q, h) + IF_D_INFLIGHT, 0)
            h = vfe_load_u16(<uint16_t *>(if_desc(q, h) + IF_D_NEXT))
            n -= 1
            steps += 1
        vfe_store_release_u16(hdr_used, used_idx)
    for i in range(size):
        if vfe_load_u8(if_desc(q, i) + IF_D_INFLIGHT) == 1:
            scratch[count].head = i
            scratch[count].counter = vfe_load_u64(<uint64_t *>(if_desc(q, i) + IF_D_COUNTER))
            if scratch[count].counter >= top:
                top = scratch[count].counter + 1
            count += 1
    qsort(scratch, count, sizeof(_IfEntry), _if_cmp)
    for i in range(count):
        iq.resubmit[i] = <uint16_t>scratch[i].head
    iq.nresubmit = count
    iq.resubmit_pos = 0
    iq.counter = top
    return count
