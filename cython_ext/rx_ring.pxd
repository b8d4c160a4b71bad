# The destination side of the net data path: a worker takes an RX ring
# (rx_acquire, locked for the rest of its run of frames), fills the frame
# into it by the ring's layout (rx_enqueue: split here, packed in
# packed_rx.pxd), and publishes used->idx once per burst (defer_publish,
# flush_rx).  Drops are counted by reason (drop, rx_fail, rx_full).
# cimported by netdata.pxd, whose senders call it.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t
from atomics cimport *
from vring cimport *
from virtio cimport *
from netpath cimport *
from fault cimport mem_gone
from guard cimport vfe_signal_fence
from packed cimport ring_publish
from packed_rx cimport packed_rx_fill
from rx_copy cimport rx_copy, rx_drop, rx_counted
from counters cimport *

cdef enum:
    STALL_NS = 50 * 1000 * 1000   # a full destination may hold a sender this long, then we drop
    NET_MAX_CHAIN = 262144        # bytes in one TX chain or RX buffer: more is a guest bug


# ---------------------------------------------------------------- rings

cdef inline void break_ring(Worker *w, Vring *vq, int code) noexcept nogil:
    """A guest error: stop this ring only, and tell Python to log it."""
    cdef uint64_t one = 1
    vq.broken = -code
    vq.errors += 1
    if w.event_fd >= 0:
        write(w.event_fd, &one, 8)


cdef inline void rx_lock(Worker *w, Vring *vq) noexcept nogil:
    """Take a destination RX ring's lock, noting it for the SIGBUS
    recovery path (engine.pyx guarded_run), which releases it."""
    vfe_spin_lock(&vq.lock)
    w.rx_held = vq
    vfe_signal_fence()


cdef inline void rx_unlock(Worker *w, Vring *vq) noexcept nogil:
    vfe_signal_fence()
    w.rx_held = NULL
    vfe_spin_unlock(&vq.lock)


cdef inline int ring_usable(Vring *vq) noexcept nogil:
    return vq.ready and vq.enabled and not vq.broken


cdef inline Vring *pick_rx(NetDev *t, int pair) noexcept nogil:
    """The destination's RX ring for traffic from the sender's queue pair `pair`:
    the same pair index modulo the pairs the guest has enabled."""
    cdef int npairs = t.num_vqs // 2
    cdef int k
    cdef Vring *vq
    if npairs <= 0 or t.paused:
        return NULL
    for k in range(npairs):
        vq = &t.vqs[2 * ((pair + k) % npairs)]
        if ring_usable(vq):
            return vq
    return NULL


cdef inline void rx_release(Worker *w) noexcept nogil:
    """End the run of deliveries: release the RX ring this thread holds, if any."""
    if w.rx_held != NULL:
        rx_unlock(w, w.rx_held)


cdef inline Vring *rx_acquire(Worker *w, NetDev *t, int pair) noexcept nogil:
    """The destination RX ring for a frame to t from queue pair `pair`, locked
    and usable; NULL if there is none.  Consecutive deliveries to the same
    (t, pair) are a run that takes the lock once, as DPDK's enqueue locks a
    ring once per burst: the lock stays held until rx_release (a different
    destination, a ring error, or flush_rx at the burst's end).  Nothing
    pick_rx reads changes during a burst except `broken`, which is only set
    under this lock (break_ring) or when the memory vanished (the guarded
    section recovers from the fault either way), so the ring stays the one
    pick_rx would choose.  One ring lock at a time: a held one is released
    before another is taken."""
    cdef Vring *vq = w.rx_held
    if vq != NULL:
        if w.rx_dev == t and w.rx_pair == pair:
            w.rx_fresh = 0
            return vq
        rx_unlock(w, vq)
    vq = pick_rx(t, pair)
    if vq == NULL:
        return NULL
    rx_lock(w, vq)
    if not ring_usable(vq):
        rx_unlock(w, vq)
        return NULL
    w.rx_dev = t
    w.rx_pair = pair
    w.rx_fresh = 1
    w.rx_cnt = &vq.cnt[w.id]
    return vq


cdef inline int drop(Worker *w, int reason) noexcept nogil:
    """R_DROP for a frame, noting why (DropReason) for the sender's count
    (tx_frame); rx_drop also counts it on the receiving ring."""
    if VFE_COUNTERS:
        w.drop_reason = reason
    return R_DROP


cdef inline int rx_fail(Worker *w, Vring *vq, int code) noexcept nogil:
    """A guest error on the held RX ring: stop it and end the run.  The
    frame is dropped (R_DROP)."""
    break_ring(w, vq, code)
    rx_release(w)
    return drop(w, DROP_RING_ERROR)


cdef inline int rx_full(Worker *w, Vring *vq, bint final) noexcept nogil:
    """The RX ring has no room for the frame: R_NO_ROOM to a sender that
    waits for room (a unicast guest frame, tx_frame); a `final` delivery's
    frame (flooded, from the representor, a segment) is dropped and counted."""
    if final:
        return rx_drop(w, vq, DROP_NO_ROOM)
    return R_NO_ROOM


cdef inline int rx_enqueue(Worker *w, NetDev *t, int pair, Iov *src, int nsrc,
                    uint32_t skip, uint32_t frame_len, bint final) noexcept nogil:
    """Write w.hdr_out + the frame into the destination's RX ring (mergeable
    buffers when negotiated); its used->idx is published at the burst's end
    (flush_rx), with an interrupt if wanted.  No room: rx_full(final).
    Each layout fills in a function of its own: compiled into one, the
    packed fill cost the split one registers (callgrind: 14 Ir/packet)."""
    if t.packed:
        return rx_enqueue_packed(w, t, pair, src, nsrc, skip, frame_len, final)
    return rx_enqueue_split(w, t, pair, src, nsrc, skip, frame_len, final)


cdef inline int rx_enqueue_packed(Worker *w, NetDev *t, int pair, Iov *src, int nsrc,
                                  uint32_t skip, uint32_t frame_len, bint final) noexcept nogil:
    """rx_enqueue on a device with packed rings."""
    cdef Vring *vq = rx_acquire(w, t, pair)
    cdef int rc
    if vq == NULL:
        return drop(w, DROP_NO_RING)
    rc = packed_rx_fill(w, t, vq, src, nsrc, skip, frame_len, NET_MAX_CHAIN)
    if rc < 0:
        return rx_fail(w, vq, rc)
    if rc == R_OK:
        defer_publish(w, vq)
    elif rc == R_NO_ROOM:
        return rx_full(w, vq, final)
    return rc


cdef inline int rx_enqueue_split(Worker *w, NetDev *t, int pair, Iov *src, int nsrc,
                                 uint32_t skip, uint32_t frame_len, bint final) noexcept nogil:
    """rx_enqueue on a device with split rings."""
    cdef Vring *vq = rx_acquire(w, t, pair)
    cdef uint32_t need, cap = 0, remaining, l
    cdef int n, nchains = 0, niov = 0, rc, c
    cdef uint16_t head
    cdef Chain buf
    if vq == NULL:
        return drop(w, DROP_NO_RING)
    need = t.hdr_len + frame_len
    # re-read avail->idx on the first delivery of a run, then trust the
    # cached value while it lasts (a frame needing more buffers re-reads in
    # the loop below)
    n = avail_count_cached(vq, 0x10000 if w.rx_fresh else 1)
    if n < 0:
        return rx_fail(w, vq, n)
    while cap < need:
        if nchains >= n:
            n = avail_count_cached(vq, nchains + 1)     # re-read: the guest may have posted more
            if n < 0:
                return rx_fail(w, vq, n)
            if nchains >= n:
                return rx_full(w, vq, final)
        if nchains > 0 and not t.mrg_rxbuf:
            return rx_drop(w, vq, DROP_TOO_BIG)     # frame larger than the guest's buffers
        # one buffer per chain: w.rx_head/rx_cap hold MAX_IOV (walk_chain's
        # E_IOV stops us first, since a chain is at least one piece)
        rc = avail_head(vq, <uint16_t>(vq.last_avail_idx + nchains)) if nchains < MAX_IOV else E_IOV
        if rc >= 0:
            head = <uint16_t>rc
            rc = walk_chain(vq, head, ALL_WRITABLE, NET_MAX_CHAIN, &w.rx_iov[niov],
                            MAX_IOV - niov, &buf)
        if rc < 0:
            return rx_fail(w, vq, rc)
        w.rx_head[nchains] = head
        w.rx_cap[nchains] = <uint32_t>buf.wbytes
        niov += buf.niov
        cap += <uint32_t>buf.wbytes
        nchains += 1
    rx_copy(w, t, niov, nchains, src, nsrc, skip, frame_len)      # cap >= need
    remaining = need
    for c in range(nchains):
        l = w.rx_cap[c]
        if l > remaining:
            l = remaining
        used_push(vq, w.rx_head[c], l)
        remaining -= l
    vq.last_avail_idx = <uint16_t>(vq.last_avail_idx + nchains)
    rx_counted(w, frame_len, nchains)
    defer_publish(w, vq)
    return R_OK


cdef inline void defer_publish(Worker *w, Vring *vq) noexcept nogil:
    """Publish used->idx of a filled RX ring once per burst, not per packet
    (called with vq.lock held).  The first worker to fill it since its last
    publish becomes its publisher; any publish covers every entry pushed so
    far, so a ring filled by two workers is never left behind."""
    if vq.publisher != NULL:
        return
    if w.ndirty < 64:
        vq.publisher = <void *>w
        w.dirty[w.ndirty] = vq
        w.ndirty += 1
    else:
        ring_publish(vq)


cdef inline void publish_rx(Worker *w, Vring *vq) noexcept nogil:
    """flush_rx's step for one ring, lock held."""
    if vq.publisher == <void *>w:
        vq.publisher = NULL
        if vq.ready and not mem_gone(vq):
            ring_publish(vq)


cdef inline void flush_rx(Worker *w) noexcept nogil:
    """End of a burst: end the run, publish the RX rings it filled and
    interrupt their guests, forget what it learned (sw_known) and looked up."""
    cdef int i
    cdef Vring *held = w.rx_held
    cdef Vring *vq
    w.learn_dev = NULL
    w.lookup_valid = 0
    if held != NULL:
        publish_rx(w, held)
        rx_unlock(w, held)
    for i in range(w.ndirty):
        vq = w.dirty[i]
        if vq != held:
            rx_lock(w, vq)
            publish_rx(w, vq)
            rx_unlock(w, vq)
    w.ndirty = 0
