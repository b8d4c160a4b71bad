# A guest's packed TX ring: netdata.pxd's net_tx_burst for the packed
# layout, and net_burst, which the worker loop calls for either layout.
from libc.stdint cimport uint16_t, uint32_t, int64_t
from vring cimport *
from netpath cimport *
from netdata cimport *
from rx_ring cimport *
from packed cimport *
from counters cimport RingCounters, VFE_COUNTERS


cdef inline int packed_tx_burst(Worker *w, Vring *vq) noexcept nogil:
    """Take up to BURST chains from a guest's packed TX ring and switch
    them (or send them to the representor), then publish their used
    descriptors.  A frame whose destination is full stays in the ring
    (taken again next time) until it has waited STALL_NS."""
    cdef NetDev *dev = <NetDev *>vq.dev
    cdef int k, rc, done = 0
    cdef uint32_t slot, total
    cdef uint64_t nbytes = 0
    cdef int wrap
    cdef uint16_t id, ndesc
    cdef Chain frame
    cdef RingCounters *cnt
    for k in range(BURST):
        slot = vq.last_avail_idx
        wrap = vq.avail_wrap
        rc = packed_take_one(vq, &slot, &wrap, ALL_READABLE, NET_MAX_CHAIN, w.iov, MAX_IOV,
                             &frame, &id, &ndesc)
        if rc == 0:
            rc = packed_take(vq, &slot, &wrap, ALL_READABLE, NET_MAX_CHAIN, w.iov, MAX_IOV,
                             &frame, &id, &ndesc, NULL)
        if rc == 0:
            break
        total = <uint32_t>frame.rbytes
        if rc > 0 and total <= <uint32_t>dev.hdr_len:
            rc = E_LEN
        if rc < 0:
            break_ring(w, vq, rc)
            break
        if not tx_frame(w, dev, vq, w.iov, frame.niov, total):
            break
        packed_used_push(vq, id, 0, ndesc)
        vq.last_avail_idx = <uint16_t>slot
        vq.avail_wrap = wrap
        nbytes += total           # headers and all: one add (the headers come off below)
        done += 1
    if VFE_COUNTERS:
        cnt = &vq.cnt[w.id]
        cnt.packets += done
        cnt.bytes += nbytes - <uint64_t>done * dev.hdr_len
    flush_rx(w)
    packed_publish(vq)
    return done


cdef inline int net_burst(Worker *w, Vring *vq) noexcept nogil:
    """One burst of a net TX ring, whichever its layout."""
    if vq.packed:
        return packed_tx_burst(w, vq)
    return net_tx_burst(w, vq)
