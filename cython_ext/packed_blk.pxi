# virtio-blk request queues on packed rings: blk_queue.pxi's blk_burst for
# the packed layout, its inflight tracking (inflight.pxd's packed half) and
# the recovery at ring start.  Included by engine.pyx (after blk_queue.pxi,
# whose serving, reaping and answering it shares).
#
# A request is known by its buffer id (< size, checked by packed_take),
# which must be unique while the request is outstanding (2.8.20: E_DUP
# otherwise, as for a split head): from its take until its used descriptor
# is published (vq.id_out), on every backend.  Requests may finish out of order: each
# used descriptor goes to the next used slot, and the used cursor moves on
# by the slots that request's own chain took (vq.id_ndesc[id], noted when
# taken), which is how the driver follows it.  vq.id_ndesc[size + id] is
# the request's first entry in the inflight region.


cdef void packed_blk_flush(Vring *vq, InflightQueue *iq, uint16_t *done, int *ndone) noexcept nogil:
    """blk_flush_done for a packed ring: the answered requests' region
    entries back on its free list with the used cursor, the used
    descriptors made visible, the commit (inflight.pxd), and only then the
    interrupt: a process killed on the way must not leave a guest that
    was told about a batch its region does not have committed."""
    cdef uint16_t entries[BURST]
    cdef int i, n = ndone[0]
    cdef bint exposed
    for i in range(n):
        entries[i] = vq.id_ndesc[vq.size + done[i]]
    pinflight_return(iq, entries, n, vq.last_used_idx, vq.used_wrap)
    exposed = packed_expose(vq)
    pinflight_commit(iq, entries, n)
    for i in range(n):
        vq.id_out[done[i]] = 0
    if exposed:
        packed_signal(vq)
    ndone[0] = 0


cdef int packed_resubmitted_chain(Vring *vq, InflightQueue *iq, uint32_t first, uint16_t num,
                                  Iov *iov, int max_iov, Chain *c, uint16_t *id,
                                  uint16_t *ndesc) noexcept nogil:
    """A request a previous process left inflight, from the copies of its
    descriptors in the region (its ring slots may hold used descriptors
    now): the same checks as packed_take's, with the region's entry links
    instead of consecutive slots, and the `num` (1..size) recovery read
    (the region's may have changed since).  Returns 0 or an E_* code."""
    cdef uint32_t entry = first, k
    cdef uint16_t flags, bid = 0
    cdef uint64_t addr
    cdef uint32_t dlen
    cdef uint8_t *table
    cdef int rc
    chain_start(c)
    for k in range(num):
        if pinflight_chain(iq, &entry, &addr, &dlen, &flags, &bid) < 0:
            return E_NEXT
        if flags & VRING_DESC_F_INDIRECT:
            if k + 1 != num:
                return E_INDIRECT          # an indirect descriptor ends its chain
            table = indirect_table(vq, addr, dlen, flags, 0, &rc)
            if table == NULL:
                return rc
            rc = packed_walk_table(vq, c, iov, max_iov, READABLE_THEN_WRITABLE, BLK_MAX_CHAIN,
                                   table, dlen // VRING_DESC_SIZE)
        else:
            rc = chain_add(vq.mem, c, iov, max_iov, READABLE_THEN_WRITABLE, BLK_MAX_CHAIN,
                           addr, dlen, flags)
        if rc < 0:
            return rc
    if bid >= vq.size:
        return E_PACKED_ID
    id[0] = bid
    ndesc[0] = num
    return chain_end(c, READABLE_THEN_WRITABLE)


cdef inline int packed_blk_id_free(Vring *vq, BlkDev *d, uint16_t id) noexcept nogil:
    """0 if buffer `id` may be taken now; E_DUP while a request of that id
    is outstanding -- also one answered in this burst whose used
    descriptor is not published yet: its copy would overwrite the chain
    length and region entry the publish needs."""
    if vq.id_out[id]:
        return E_DUP
    return blk_head_free(vq, d, id)


cdef int packed_blk_take(Worker *w, Vring *vq, BlkDev *d, uint16_t id, uint16_t ndesc,
                         uint32_t entry, Chain *req, uint16_t *done, int *ndone) noexcept nogil:
    """Serve request `id` (its chain in w.iov, not outstanding: the caller
    checked), taken from the ring or the region: note its slots and region
    entry.  Returns what blk_serve_chain does."""
    cdef int rc
    vq.id_out[id] = 1
    vq.id_ndesc[id] = ndesc
    vq.id_ndesc[vq.size + id] = <uint16_t>entry
    rc = blk_serve_chain(w, vq, d, id, req, 0)
    if rc > 0:
        done[ndone[0]] = id
        ndone[0] += 1
        if ndone[0] == BURST:
            packed_blk_flush(vq, &d.inflight[vq.index], done, ndone)
    return rc


cdef int packed_blk_burst(Worker *w, Vring *vq, bint take_new) noexcept nogil:
    """One pass over a packed virtio-blk queue: answer what the I/O threads
    finished, serve what a previous process left inflight (in fetch
    order), then up to BURST requests the driver made available; publish
    the used descriptors."""
    cdef BlkDev *d = <BlkDev *>vq.dev
    cdef InflightQueue *iq = &d.inflight[vq.index]
    cdef InflightQueue *track = iq if iq.region != NULL else NULL
    cdef uint16_t done[BURST]
    cdef int k = 0, rc, ndone = 0, work
    cdef uint32_t slot, entry
    cdef int wrap
    cdef uint16_t id, ndesc, num
    cdef Chain req
    work = blk_reap(w, vq, d, done, &ndone)
    while iq.resubmit_pos < iq.nresubmit and k < BURST and not vq.broken:
        num = iq.resubmit_num[iq.resubmit_pos]
        entry = inflight_next_resubmit(iq)
        rc = packed_resubmitted_chain(vq, iq, entry, num, w.iov, MAX_IOV, &req, &id, &ndesc)
        if rc == 0:
            rc = packed_blk_id_free(vq, d, id)
        if rc < 0:
            break_ring(w, vq, rc)
            break
        if packed_blk_take(w, vq, d, id, ndesc, entry, &req, done, &ndone) < 0:
            break
        k += 1
    work += k
    if take_new and not vq.broken:
        while k < BURST:
            slot = vq.last_avail_idx
            wrap = vq.avail_wrap
            rc = packed_take(vq, &slot, &wrap, READABLE_THEN_WRITABLE, BLK_MAX_CHAIN, w.iov,
                             MAX_IOV, &req, &id, &ndesc, track)
            if rc == 0:
                break
            if rc > 0:
                rc = packed_blk_id_free(vq, d, id)
            if rc < 0:
                if track != NULL:
                    pinflight_take_abort(iq)
                break_ring(w, vq, rc)
                break
            # inflight before anything else happens to it (a copy posted
            # while outstanding never is): a crash from here on leaves it
            # for the next process to serve
            entry = pinflight_take_done(iq, ndesc) if track != NULL else iq.ndesc
            vq.last_avail_idx = <uint16_t>slot
            vq.avail_wrap = wrap
            if packed_blk_take(w, vq, d, id, ndesc, entry, &req, done, &ndone) < 0:
                break
            work += 1
            k += 1
    packed_blk_flush(vq, iq, done, &ndone)
    return work


# Recovery at ring start (engine.pyx ring_start, world stopped, guarded)

ctypedef struct _PackedRecover:
    Vring *vq
    InflightQueue *iq
    _IfEntry *scratch
    uint8_t *seen
    int rc


cdef int _start_recover_packed(void *arg) noexcept nogil:
    """pinflight_recover, then the ring's cursors from it: used where the
    region says, avail as many slots on as the resubmitted chains hold."""
    cdef _PackedRecover *a = <_PackedRecover *>arg
    cdef Vring *vq = a.vq
    cdef uint16_t used = vq.last_used_idx
    cdef int used_wrap = vq.used_wrap
    cdef uint32_t nslots = 0, avail
    a.rc = pinflight_recover(a.iq, vq.size, vq.desc, &used, &used_wrap, &nslots, a.scratch,
                             a.seen)
    if a.rc >= 0:
        avail = used
        vq.last_used_idx = vq.flushed_used_idx = used
        vq.used_wrap = vq.flushed_used_wrap = used_wrap
        vq.avail_wrap = used_wrap
        packed_step(vq, &avail, &vq.avail_wrap, nslots)
        vq.last_avail_idx = <uint16_t>avail
    return 0
