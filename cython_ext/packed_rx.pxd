# A frame into a packed RX ring: netdata.pxd's rx_enqueue for the packed
# layout (it picks and locks the ring, then hands over here, and breaks the
# ring on an E_* code or defers the publish on R_OK).
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from atomics cimport *
from vring cimport *
from virtio cimport *
from netpath cimport *
from packed cimport *
from rx_copy cimport rx_copy, rx_drop, rx_counted
from counters cimport DROP_TOO_BIG


cdef inline int packed_rx_fill(Worker *w, NetDev *t, Vring *vq, Iov *src, int nsrc,
                               uint32_t skip, uint32_t frame_len, uint64_t limit) noexcept nogil:
    """Write w.hdr_out + the frame into the buffers the driver made
    available (several with mergeable buffers, num_buffers saying how
    many), and push one used descriptor per buffer (published by the
    caller).  Returns R_OK, R_DROP (the frame does not fit one buffer
    without mergeable buffers), R_NO_ROOM (nothing taken: the ring stays
    as it was) or an E_* code.  Buffers over `limit` bytes are a guest bug."""
    cdef uint32_t need = t.hdr_len + frame_len, cap, remaining, l
    cdef uint32_t slot = vq.last_avail_idx, nslots
    cdef int wrap = vq.avail_wrap
    cdef int nchains = 1, niov, rc, c
    cdef uint16_t id, ndesc
    cdef Chain buf
    # the first buffer: with a frame that fits it (every frame without
    # mergeable buffers, most with) the only one, kept in locals
    rc = packed_take_one(vq, &slot, &wrap, ALL_WRITABLE, limit, w.rx_iov, MAX_IOV, &buf, &id,
                         &ndesc)
    if rc == 0:
        rc = packed_take(vq, &slot, &wrap, ALL_WRITABLE, limit, w.rx_iov, MAX_IOV, &buf, &id,
                         &ndesc, NULL)
    if rc == 0:
        return R_NO_ROOM
    if rc < 0:
        return rc
    niov = buf.niov
    cap = <uint32_t>buf.wbytes
    if cap < need:
        # more buffers: the first one's too into the arrays
        w.rx_head[0] = id
        w.rx_cap[0] = cap
        vq.id_ndesc[0] = ndesc
        nslots = ndesc
    while cap < need:
        if nchains > 0 and not t.mrg_rxbuf:
            return rx_drop(w, vq, DROP_TOO_BIG)     # frame larger than the guest's buffers
        if nchains >= MAX_IOV:
            return E_IOV
        rc = packed_take(vq, &slot, &wrap, ALL_WRITABLE, limit, &w.rx_iov[niov],
                         MAX_IOV - niov, &buf, &id, &ndesc, NULL)
        if rc == 0:
            return R_NO_ROOM
        if rc < 0:
            return rc
        # a driver rewriting flags under us could show us a lap twice
        nslots += ndesc
        if nslots > vq.size:
            return E_LOOP
        w.rx_head[nchains] = id
        w.rx_cap[nchains] = <uint32_t>buf.wbytes
        vq.id_ndesc[nchains] = ndesc          # nchains <= slots taken <= size
        niov += buf.niov
        cap += <uint32_t>buf.wbytes
        nchains += 1
    rx_copy(w, t, niov, nchains, src, nsrc, skip, frame_len)      # cap >= need
    if nchains == 1:
        # the common case: one buffer, the last one taken (cap >= need)
        packed_used_push(vq, id, need, ndesc)
    else:
        remaining = need
        for c in range(nchains):
            l = w.rx_cap[c]
            if l > remaining:
                l = remaining
            packed_used_push(vq, w.rx_head[c], l, vq.id_ndesc[c])
            remaining -= l
    vq.last_avail_idx = <uint16_t>slot
    vq.avail_wrap = wrap
    rx_counted(w, frame_len, nchains)
    return R_OK
