# virtio-blk request queues: how a worker serves, reaps and quiesces one.
# Included by engine.pyx (one compiled module: the worker loop calls these
# directly, and the device classes share its cdef helpers).

cdef uint8_t blk_submit(Worker *w, Vring *vq, BlkDev *d, uint16_t head, int nread, int niov,
                        uint64_t rbytes, uint32_t kind, uint64_t offset, uint32_t nranges,
                        uint32_t data_in) noexcept nogil:
    """Queue a validated file request on the device's pool (blk_aio.pxd).
    BLK_ASYNC once queued; IOERR if its data pieces do not fit a slot (more
    than seg_max allows: a guest bug)."""
    cdef AioRing *ar = &d.aio[vq.index]
    cdef AioReq *r = &ar.slots[head]         # blk_head_free vouched for head and slot
    cdef Iov *last = &w.iov[niov - 1]        # the status byte is the chain's last writable byte
    cdef int i
    r.ring = <void *>ar
    r.head = head
    r.status_ptr = last.base + last.len - 1
    r.status_gpa = last.gpa + last.len - 1
    r.data_in = data_in
    r.offset = offset
    r.direct = 0
    if kind == VIRTIO_BLK_T_IN:
        r.op = AIO_READ
        r.length = data_in
        r.n = aio_slice(&w.iov[nread], niov - nread, 0, data_in, aio_pieces(r), AIO_MAX_PIECES)
    elif kind == VIRTIO_BLK_T_OUT:
        r.op = AIO_WRITE
        r.length = rbytes - VIRTIO_BLK_REQ_HDR_SIZE
        r.n = aio_slice(w.iov, nread, VIRTIO_BLK_REQ_HDR_SIZE, r.length, aio_pieces(r), AIO_MAX_PIECES)
    elif kind == VIRTIO_BLK_T_FLUSH:
        r.op = AIO_FLUSH
        r.n = 0
    else:
        r.op = <uint8_t>kind                 # AIO_DISCARD / AIO_WRITE_ZEROES
        memcpy(r.store, w.lin, nranges * sizeof(AioRange))
        r.n = <int>nranges
    if r.n < 0:
        vfe_add_u64(&d.ioerrs, 1)
        return VIRTIO_BLK_S_IOERR
    if (r.op == AIO_READ or r.op == AIO_WRITE) and d.pool.dfd >= 0:
        # O_DIRECT wants sector-aligned buffers; anything else goes buffered
        r.direct = 1
        for i in range(r.n):
            if ((<uint64_t>aio_pieces(r)[i].base) | aio_pieces(r)[i].len) & (VIRTIO_BLK_SECTOR_SIZE - 1):
                r.direct = 0
                break
    r.busy = 1
    r.epoch = ar.epoch
    if d.in_order:
        r.finished = 0
        blk_order_push(ar, r)
    aio_submit(d.pool, r)
    return BLK_ASYNC


# --force_in_order.  A file bdev's I/O threads finish requests in any order;
# with in_order every head a queue takes joins its AioRing's order list, and
# blk_answer_in_order pushes used entries from the front of that list only,
# as far as requests there are finished.  A request answered within the
# burst (null/malloc never get here; for a file: GET_ID, an IOERR, a
# request we cannot serve) waits in the list too while an earlier one is
# outstanding (blk_defer).  A waiting head stays `busy` and counted in
# `pending` until answered: a stop waits for it, and a guest that posts it
# again stops the ring (E_DUP), as for any outstanding head.

cdef inline void blk_order_push(AioRing *ar, AioReq *r) noexcept nogil:
    r.order_next = -1
    if ar.order_last < 0:
        ar.order_first = r.head
    else:
        ar.slots[ar.order_last].order_next = r.head
    ar.order_last = r.head


cdef inline bint blk_must_wait(BlkDev *d, Vring *vq) noexcept nogil:
    """A request answered now would overtake one taken before it."""
    return d.in_order and d.aio != NULL and d.aio[vq.index].order_first >= 0


cdef void blk_defer(BlkDev *d, Vring *vq, uint16_t head, uint32_t data_in, uint8_t status,
                    uint64_t nbytes) noexcept nogil:
    """Keep a request answered within the burst (status byte written) for
    blk_answer_in_order."""
    cdef AioRing *ar = &d.aio[vq.index]
    cdef AioReq *r = &ar.slots[head]         # blk_head_free vouched for head and slot
    r.head = head
    r.busy = 1
    r.finished = 1
    r.data_in = data_in
    r.status = status
    r.nbytes = nbytes
    ar.pending += 1
    blk_order_push(ar, r)


cdef void blk_answer_in_order(Worker *w, Vring *vq, BlkDev *d, AioRing *ar, uint16_t *done,
                              int *ndone) noexcept nogil:
    """Answer the finished requests at the front of the order list, in
    order; stop at the first one still at the I/O threads (w: whose
    counter block).  Once a stop gave up waiting for that one
    (order_given_up), every finished request is answered now instead."""
    cdef AioReq *r
    if ar.order_given_up:
        blk_answer_finished(w, vq, d, ar, done, ndone)
        return
    while ar.order_first >= 0:
        r = &ar.slots[ar.order_first]
        if not r.finished:
            break
        ar.order_first = r.order_next
        if ar.order_first < 0:
            ar.order_last = -1
        r.finished = 0
        r.busy = 0
        ar.pending -= 1
        blk_answer(w, d, vq, r.head, r.data_in, r.status, r.nbytes)
        done[ndone[0]] = r.head
        ndone[0] += 1
        if ndone[0] == BURST:
            blk_flush_done(vq, &d.inflight[vq.index], done, ndone)


cdef void blk_answer_finished(Worker *w, Vring *vq, BlkDev *d, AioRing *ar, uint16_t *done,
                              int *ndone) noexcept nogil:
    """Answer every finished request on the order list, out of order: a
    stop that stopped waiting for a request stuck at the I/O threads must
    not take the finished ones behind it down too (their status bytes are
    written, and the stop index counts them as consumed)."""
    cdef AioReq *r
    cdef int prev = -1
    cdef int h = ar.order_first
    while h >= 0:
        r = &ar.slots[h]
        h = r.order_next
        if not r.finished:
            prev = r.head
            continue
        if prev < 0:                         # unlink r, whose successor is h
            ar.order_first = h
        else:
            ar.slots[prev].order_next = h
        if ar.order_last == r.head:
            ar.order_last = prev
        r.finished = 0
        r.busy = 0
        ar.pending -= 1
        blk_answer(w, d, vq, r.head, r.data_in, r.status, r.nbytes)
        done[ndone[0]] = r.head
        ndone[0] += 1
        if ndone[0] == BURST:
            blk_flush_done(vq, &d.inflight[vq.index], done, ndone)


cdef void blk_order_drop(AioRing *ar) noexcept nogil:
    """Forget the order list (a stop that gives up, or guest memory gone):
    the finished requests waiting there free their slots; the others are
    still at the I/O threads and are counted as such."""
    cdef AioReq *r
    cdef int h = ar.order_first
    while h >= 0:
        r = &ar.slots[h]
        h = r.order_next
        if r.finished:
            r.finished = 0
            r.busy = 0
            ar.pending -= 1
    ar.order_first = -1
    ar.order_last = -1


cdef inline int blk_head_free(Vring *vq, BlkDev *d, uint16_t head) noexcept nogil:
    """0 if request `head` (< vq.size, checked by avail_head or recovery)
    may be taken now; E_DUP if the guest posted it again while its request
    is still at the I/O threads (a file bdev's slot is per head)."""
    cdef AioRing *ar
    if d.aio == NULL:
        return 0                             # null/malloc: answered within the burst
    ar = &d.aio[vq.index]
    if head >= ar.size:
        return E_HEAD
    if ar.slots[head].busy:
        return E_DUP
    return 0


cdef void blk_answer(Worker *w, BlkDev *d, Vring *vq, uint16_t head, uint32_t data_in,
                     uint8_t status, uint64_t nbytes) noexcept nogil:
    """The request at `head` is done (its status byte written and logged):
    its used entry, the last-batch list, the ring's counters (w's block)."""
    cdef RingCounters *cnt
    ring_used_push(vq, head, data_in + 1)
    if not vq.packed:                        # a packed ring's entries go back at the publish
        inflight_link(&d.inflight[vq.index], head)
    if VFE_COUNTERS:
        cnt = &vq.cnt[w.id]
        cnt.packets += 1
        cnt.bytes += nbytes
        if status != VIRTIO_BLK_S_OK:
            cnt.failed += 1


cdef int blk_serve(Worker *w, Vring *vq, BlkDev *d, uint16_t head) noexcept nogil:
    """Serve the request at split ring head `head` (blk_serve_chain)."""
    cdef Chain req
    cdef int rc = walk_chain(vq, head, READABLE_THEN_WRITABLE, BLK_MAX_CHAIN, w.iov, MAX_IOV, &req)
    return blk_serve_chain(w, vq, d, head, &req, rc)


cdef int blk_serve_chain(Worker *w, Vring *vq, BlkDev *d, uint16_t head, Chain *req,
                         int rc) noexcept nogil:
    """Serve request `head` (a split head or a packed buffer id), whose
    chain the ring's walk put in w.iov (*req; rc the walk's result): run it
    against the backend, write the status byte, log what we wrote into
    guest memory when migrating, and push its used entry (published by
    the caller).  Returns 1 if answered, 0 if queued for the I/O threads
    (answered when reaped) or, in order, behind one that is, or the E_*
    code that stopped the ring."""
    cdef int c, niov, nread
    cdef uint64_t rbytes, wbytes, nbytes, offset = 0
    cdef uint32_t data_in, kind = 0, nranges = 0
    cdef uint8_t status
    cdef Iov st
    niov, nread, rbytes, wbytes = req.niov, req.nread, req.rbytes, req.wbytes
    if rc == 0 and rbytes < VIRTIO_BLK_REQ_HDR_SIZE:
        rc = E_BLK_HDR
    if rc == 0 and wbytes == 0:
        rc = E_BLK_STATUS
    if rc < 0:
        break_ring(w, vq, rc)
        return rc
    status = blk_request(d, w.iov, nread, niov - nread, rbytes, wbytes, w.lin, &data_in,
                         &kind, &offset, &nranges)
    if VFE_COUNTERS:
        vq.cnt[w.id].by[req_type(kind)] += 1
    if status == BLK_ASYNC:
        status = blk_submit(w, vq, d, head, nread, niov, rbytes, kind, offset, nranges, data_in)
        if status == BLK_ASYNC:
            return 0
        data_in = 0
    st.base = &status
    st.len = 1
    sg_copy(&w.iov[nread], niov - nread, <uint32_t>(wbytes - 1), &st, 1, 0, 1)
    if d.log.active:
        vfe_fence()
        for c in range(nread, niov):
            log_pages(&d.log, w.iov[c].gpa, w.iov[c].len)
    nbytes = data_in if data_in else (rbytes - VIRTIO_BLK_REQ_HDR_SIZE if status == VIRTIO_BLK_S_OK else 0)
    if blk_must_wait(d, vq):
        blk_defer(d, vq, head, data_in, status, nbytes)
        return 0
    blk_answer(w, d, vq, head, data_in, status, nbytes)
    return 1


cdef inline void blk_flush_done(Vring *vq, InflightQueue *iq, uint16_t *done, int *ndone) noexcept nogil:
    """Publish used->idx for the answered heads, then clear their inflight marks."""
    if vq.packed:
        packed_blk_flush(vq, iq, done, ndone)
        return
    used_publish(vq)
    inflight_clear(iq, done, ndone[0], vq.last_used_idx)
    ndone[0] = 0


cdef int blk_reap(Worker *w, Vring *vq, BlkDev *d, uint16_t *done, int *ndone) noexcept nogil:
    """Answer the ring's requests the I/O threads have finished (w: whose
    counter block)."""
    cdef AioRing *ar
    cdef AioReq *r
    cdef int k, n = 0
    cdef Iov *p
    if d.aio == NULL:
        return 0
    ar = &d.aio[vq.index]
    if ar.reaping == NULL:
        ar.reaping = aio_take_done(ar)
    r = ar.reaping
    while r != NULL:
        # off the list and the counts (in order: marked finished) before
        # guest memory is touched: should that fault (includes/guard.h),
        # the rest stays in ar.reaping
        ar.reaping = r.next
        if r.epoch != ar.epoch:
            # abandoned by a stop that stopped waiting: the ring has moved
            # on (maybe to other memory); only its slot is ours again
            r.busy = 0
            ar.abandoned -= 1
            r = ar.reaping
            continue
        r.nbytes = r.length if r.status == VIRTIO_BLK_S_OK and r.op <= AIO_WRITE else 0
        if d.in_order:
            r.finished = 1                   # answered by blk_answer_in_order
        else:
            r.busy = 0
            ar.pending -= 1
        vfe_store_u8(r.status_ptr, r.status)
        if d.log.active:
            vfe_fence()
            if r.op == AIO_READ and r.status == VIRTIO_BLK_S_OK:
                p = aio_pieces(r)
                for k in range(r.n):
                    log_pages(&d.log, p[k].gpa, p[k].len)
            log_pages(&d.log, r.status_gpa, 1)
        if r.status != VIRTIO_BLK_S_OK:
            vfe_add_u64(&d.ioerrs, 1)
        n += 1
        if not d.in_order:
            blk_answer(w, d, vq, r.head, r.data_in, r.status, r.nbytes)
            done[ndone[0]] = r.head
            ndone[0] += 1
            if ndone[0] == BURST:
                blk_flush_done(vq, &d.inflight[vq.index], done, ndone)
        r = ar.reaping
    if d.in_order:
        blk_answer_in_order(w, vq, d, ar, done, ndone)
    return n


cdef bint blk_quiesced(Worker *w, Vring *vq) noexcept nogil:
    """One step of a blk queue's stop (world stopped, `w` is scratch, the
    ring `stopping`): answer what the I/O threads finished and serve the
    resubmissions still queued.  True once nothing is left: taken heads
    must be answered before the stop reports its index, and no thread may
    write into guest memory after it."""
    cdef BlkDev *d = <BlkDev *>vq.dev
    cdef InflightQueue *iq = &d.inflight[vq.index]
    cdef AioRing *ar = &d.aio[vq.index] if d.aio != NULL else NULL
    if mem_gone(vq):
        # the guest memory vanished (fault.pxd): nothing can be answered;
        # count off what the I/O threads finished, touching none of it
        if ar != NULL:
            if ar.reaping == NULL:
                ar.reaping = aio_take_done(ar)
            while ar.reaping != NULL:
                if ar.reaping.epoch != ar.epoch:
                    ar.abandoned -= 1
                elif not ar.reaping.finished:    # (a finished one: blk_order_drop's)
                    ar.pending -= 1
                ar.reaping.busy = 0
                ar.reaping.finished = 0
                ar.reaping = ar.reaping.next
            blk_order_drop(ar)
    else:
        blk_burst(w, vq, 0)
    return ((iq.resubmit_pos >= iq.nresubmit or vq.broken)
            and (ar == NULL or ar.pending == 0))


cdef bint blk_give_up_order(Vring *vq) noexcept nogil:
    """A stop stops waiting on an in-order queue: from now on its finished
    requests are answered as they come (True: it was in order)."""
    cdef BlkDev *d = <BlkDev *>vq.dev
    if not d.in_order or d.aio == NULL:
        return False
    d.aio[vq.index].order_given_up = 1
    return True


cdef void blk_abandon(Vring *vq) noexcept nogil:
    """A stop waited long enough: give up on the requests still at the I/O
    threads.  Their completions are dropped by blk_reap (new epoch) without
    touching guest memory; their slots stay busy until then."""
    cdef BlkDev *d = <BlkDev *>vq.dev
    cdef AioRing *ar
    if d.aio == NULL:
        return
    ar = &d.aio[vq.index]
    blk_order_drop(ar)                       # what is left is at the I/O threads
    ar.abandoned += ar.pending
    ar.pending = 0
    ar.epoch += 1


cdef inline bint blk_has_work(Vring *vq) noexcept nogil:
    """Something for blk_burst besides new avail entries."""
    cdef BlkDev *d = <BlkDev *>vq.dev
    cdef InflightQueue *iq = &d.inflight[vq.index]
    if iq.resubmit_pos < iq.nresubmit:
        return True
    return d.aio != NULL and vfe_load_acquire_u64(<uint64_t *>&d.aio[vq.index].done) != 0


cdef int blk_burst(Worker *w, Vring *vq, bint take_new=1) noexcept nogil:
    """One pass over a virtio-blk queue (blk.pxd): answer what the I/O
    threads finished, serve the heads a previous process left inflight
    (resubmitted in fetch order), then up to BURST new avail entries;
    publish used->idx, then clear the answered heads' inflight marks."""
    cdef BlkDev *d = <BlkDev *>vq.dev
    cdef InflightQueue *iq = &d.inflight[vq.index]
    cdef uint16_t done[BURST]
    cdef int n, k, rc, ndone = 0, work
    cdef uint16_t head
    if vq.packed:
        return packed_blk_burst(w, vq, take_new)
    work = blk_reap(w, vq, d, done, &ndone)
    k = 0
    while iq.resubmit_pos < iq.nresubmit and k < BURST and not vq.broken:
        head = inflight_next_resubmit(iq)
        rc = blk_head_free(vq, d, head)
        if rc < 0:
            break_ring(w, vq, rc)
            break
        rc = blk_serve(w, vq, d, head)
        if rc < 0:
            break
        k += 1
        if rc > 0:
            done[ndone] = head
            ndone += 1
            if ndone == BURST:
                blk_flush_done(vq, iq, done, &ndone)
    work += k
    if take_new and k < BURST and not vq.broken:
        n = avail_count(vq)
        if n < 0:
            break_ring(w, vq, n)
            n = 0
        if n > BURST - k:
            n = BURST - k
        for k in range(n):
            rc = avail_head(vq, vq.last_avail_idx)
            if rc >= 0:
                head = <uint16_t>rc
                rc = blk_head_free(vq, d, head)
            if rc < 0:
                break_ring(w, vq, rc)
                break
            # marked before anything else happens to it: a crash from here
            # on leaves it for the next process to serve
            inflight_take(iq, head)
            rc = blk_serve(w, vq, d, head)
            if rc < 0:
                break
            vq.last_avail_idx += 1
            work += 1
            if rc > 0:
                done[ndone] = head
                ndone += 1
                if ndone == BURST:
                    blk_flush_done(vq, iq, done, &ndone)
    blk_flush_done(vq, iq, done, &ndone)
    return work
