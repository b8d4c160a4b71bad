# virtio-blk request queues on packed rings: blk_queue.pxi's blk_burst for
# the packed layout.  Included by engine.pyx (after blk_queue.pxi, whose
# serving, reaping and answering it shares).
#
# A request is known by its buffer id (< size, checked by packed_take),
# which must be unique while the request is outstanding (2.8.20: E_DUP
# otherwise, as for a split head).  Requests may finish out of order: each
# used descriptor goes to the next used slot, and the used cursor moves on
# by the slots that request's own chain took (vq.id_ndesc[id], noted when
# taken), which is how the driver follows it.


cdef int packed_blk_burst(Worker *w, Vring *vq, bint take_new) noexcept nogil:
    """One pass over a packed virtio-blk queue: answer what the I/O threads
    finished, then up to BURST requests the driver made available; publish
    the used descriptors."""
    cdef BlkDev *d = <BlkDev *>vq.dev
    cdef InflightQueue *iq = &d.inflight[vq.index]
    cdef uint16_t done[BURST]
    cdef int k, rc, ndone = 0, work
    cdef uint32_t slot
    cdef int wrap
    cdef uint16_t id, ndesc
    cdef Chain req
    work = blk_reap(vq, d, done, &ndone)
    if take_new and not vq.broken:
        for k in range(BURST):
            slot = vq.last_avail_idx
            wrap = vq.avail_wrap
            rc = packed_take(vq, &slot, &wrap, READABLE_THEN_WRITABLE, BLK_MAX_CHAIN, w.iov,
                             MAX_IOV, &req, &id, &ndesc)
            if rc == 0:
                break
            if rc > 0:
                rc = blk_head_free(vq, d, id)
            if rc < 0:
                break_ring(w, vq, rc)
                break
            vq.id_ndesc[id] = ndesc
            vq.last_avail_idx = <uint16_t>slot
            vq.avail_wrap = wrap
            rc = blk_serve_chain(w, vq, d, id, &req, 0)
            if rc < 0:
                break
            work += 1
            if rc > 0:
                done[ndone] = id
                ndone += 1
                if ndone == BURST:
                    blk_flush_done(vq, iq, done, &ndone)
    blk_flush_done(vq, iq, done, &ndone)
    return work
