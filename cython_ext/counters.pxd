# Per-queue counters, kept per worker: a ring has one block for each thread
# that may count on it (the engine's workers, then its control scratch:
# Worker.id indexes them), each block on cache lines of its own, written by
# its thread alone without atomics and summed when read (the devices'
# ring_stats, on the control thread).  An RX ring is filled by every worker
# whose senders reach it, so a shared counter there would bounce between
# their cores on every frame; TX and blk rings are served by their owner
# (or the control scratch, world stopped), which uses its own block too.
#
# Not here: `errors` (a ring error stops the ring: rare, kept in the Vring)
# and `calls` (counted in the Vring next to flushed_used_idx, a line the
# publisher, owner or RX lock holder, has just written anyway).
#
# Built with VFE_ENGINE_COUNTERS=0 (setup.py) VFE_COUNTERS is 0 and every
# `if VFE_COUNTERS:` below compiles to nothing.
from libc.stdint cimport uint32_t, uint64_t
from virtio cimport *

cdef extern from "counters.h" nogil:
    enum: VFE_COUNTERS            # 1 unless built with VFE_ENGINE_COUNTERS=0
    void *vfe_counters_alloc(size_t n, size_t size)

# Why a net frame was dropped (RingCounters.by on a net ring)
cdef enum DropReason:
    DROP_SHORT = 0        # TX: shorter than an Ethernet header
    DROP_SPOOFED          # TX: a source MAC the port may not use (port security)
    DROP_NO_ROOM          # TX: the destination's RX ring stayed full for STALL_NS;
                          # RX: full when a flooded or representor frame came
    DROP_NO_RING          # TX: the destination has no usable RX ring (not started, paused, stopped)
    DROP_TOO_BIG          # larger than the receiving guest's buffers (no mergeable buffers)
    DROP_OFFLOAD          # a checksum or segmentation the receiver needs could not be done
    DROP_RING_ERROR       # TX: the destination's RX ring broke on this frame
    DROP_TAP              # TX: the representor TAP refused the write
    NDROP

# A blk request's type (RingCounters.by on a blk queue)
cdef enum ReqType:
    REQ_IN = 0
    REQ_OUT
    REQ_FLUSH
    REQ_GET_ID
    REQ_DISCARD
    REQ_WRITE_ZEROES
    REQ_UNSUPPORTED       # any other type
    NREQ

ctypedef struct RingCounters:
    # 128 bytes: two cache lines, a multiple of 64 (vfe_counters_alloc aligns the first)
    # (packets, bytes and buffers, added together per RX frame, are not
    # neighbours: gcc would pair two of them into one SSE add, which costs
    # more than the plain adds -- callgrind, 64 B)
    uint64_t packets      # net: frames; blk: requests answered
    uint64_t kicks        # guest notifications read by the worker (adaptive mode)
    uint64_t bytes        # net: frame bytes (no virtio-net header); blk: data bytes
    uint64_t failed       # blk: requests answered with an error status
    uint64_t buffers      # net RX: buffers used (num_buffers summed)
    uint64_t by[NDROP]    # net: drops by DropReason; blk: requests by ReqType (NREQ <= NDROP)
    uint64_t spare[3]


cdef inline void count_sum(RingCounters *blocks, int n, RingCounters *total) noexcept nogil:
    """Sum n blocks into *total (the read side; a block being written
    meanwhile shows its value of a moment ago)."""
    cdef int i, k
    cdef RingCounters *b
    total.packets = total.bytes = total.buffers = total.kicks = total.failed = 0
    for k in range(<int>NDROP):
        total.by[k] = 0
    for i in range(n):
        b = &blocks[i]
        total.packets += b.packets
        total.bytes += b.bytes
        total.buffers += b.buffers
        total.kicks += b.kicks
        total.failed += b.failed
        for k in range(<int>NDROP):
            total.by[k] += b.by[k]


cdef inline uint32_t req_type(uint32_t kind) noexcept nogil:
    """A blk request header's type as a ReqType."""
    if kind == VIRTIO_BLK_T_IN:
        return REQ_IN
    if kind == VIRTIO_BLK_T_OUT:
        return REQ_OUT
    if kind == VIRTIO_BLK_T_FLUSH:
        return REQ_FLUSH
    if kind == VIRTIO_BLK_T_GET_ID:
        return REQ_GET_ID
    if kind == VIRTIO_BLK_T_DISCARD:
        return REQ_DISCARD
    if kind == VIRTIO_BLK_T_WRITE_ZEROES:
        return REQ_WRITE_ZEROES
    return REQ_UNSUPPORTED
