# The net data path, run by the workers with their lock held: a guest's TX
# burst, the switch (switch.pxd) or the representor (TAP) it goes to, the
# delivery into the destination's RX ring (rx_ring.pxd fills and publishes
# it), and the software offload slow path (the Numba kernels, reached through the
# worker's function pointers).  All nogil; no Python object per packet.
# Included into the engine module through cimport (cdef inline): one
# compilation unit, no call across modules on the hot path.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t
from libc.string cimport memcpy, memmove, memset
from atomics cimport *
from linux cimport *
from vring cimport *
from virtio cimport *
from netpath cimport *
from switch cimport *
from rx_copy cimport rx_drop
from counters cimport *
from rx_ring cimport *

cdef inline int linearize(Worker *w, Iov *src, int nsrc, uint32_t skip, uint32_t frame_len) noexcept nogil:
    cdef Iov d
    if frame_len > LIN_CAP:
        return -1
    d.base = w.lin
    d.len = LIN_CAP
    if <uint32_t>sg_copy(&d, 1, 0, src, nsrc, skip, frame_len) != frame_len:
        return -1
    return 0


cdef inline int rx_dropped(Worker *w, NetDev *t, int pair, int reason) noexcept nogil:
    """A frame for t from queue pair `pair` dropped for `reason`: counted on
    the RX ring it would have gone to, if there is one (rx_drop).  R_DROP."""
    cdef Vring *vq = pick_rx(t, pair)
    if vq != NULL:
        return rx_drop(w, vq, reason)
    return drop(w, reason)


cdef inline int soft_offload(Worker *w, Iov *src, int nsrc, uint32_t skip, uint32_t frame_len,
                      int need_seg) noexcept nogil:
    """The slow path: linearize the frame (header in w.hdr_in), then finish
    its checksum or cut it into MSS-sized segments with the Numba kernels.
    The results are w.seg_off/w.seg_len over w.lin (1 frame) or w.seg.
    Returns how many frames, 1 for a checksum, or -1."""
    cdef int32_t csum_start = w.hdr_in[6] | (w.hdr_in[7] << 8)
    cdef int32_t csum_offset = w.hdr_in[8] | (w.hdr_in[9] << 8)
    cdef int32_t hdr_len = w.hdr_in[2] | (w.hdr_in[3] << 8)
    cdef int32_t gso_size = w.hdr_in[4] | (w.hdr_in[5] << 8)
    cdef int nseg
    if linearize(w, src, nsrc, skip, frame_len) < 0:
        return -1
    if not need_seg:
        if w.csum == NULL or w.csum(w.lin, frame_len, csum_start, csum_offset) < 0:
            return -1
        w.seg_off[0] = -1             # marks "the frame is in w.lin"
        w.seg_len[0] = frame_len
        return 1
    if w.gso == NULL:
        return -1
    nseg = w.gso(w.lin, frame_len, w.hdr_in[1], hdr_len, gso_size, csum_start, csum_offset,
                 w.seg, SEG_CAP, w.seg_off, w.seg_len, MAX_SEGS)
    return nseg if nseg > 0 else -1


cdef inline void soft_frame(Worker *w, int i, Iov *out) noexcept nogil:
    out.base = w.lin if w.seg_off[i] < 0 else w.seg + w.seg_off[i]
    out.len = w.seg_len[i]


cdef inline int needs_segmentation(uint8_t gso, int tso4, int tso6, int ecn) noexcept nogil:
    cdef uint8_t base = gso & ~VIRTIO_NET_HDR_GSO_ECN
    if base == VIRTIO_NET_HDR_GSO_NONE:
        return 0
    if (gso & VIRTIO_NET_HDR_GSO_ECN) and not ecn:
        return 1
    if base == VIRTIO_NET_HDR_GSO_TCPV4:
        return not tso4
    if base == VIRTIO_NET_HDR_GSO_TCPV6:
        return not tso6
    return 1                          # UFO is never offered


cdef inline int deliver(Worker *w, NetDev *t, int pair, Iov *src, int nsrc, uint32_t skip,
                 uint32_t frame_len, bint final) noexcept nogil:
    """Hand one frame (header in w.hdr_in) to device t.  The header passes
    through when t negotiated the offloads it uses; otherwise the checksum is
    finished, or the frame segmented, in software (Numba kernels).  `final`:
    no one retries the frame if t has no room (rx_full)."""
    cdef int need_seg = needs_segmentation(w.hdr_in[1], t.guest_tso4, t.guest_tso6, t.guest_ecn)
    cdef int i, n, result = R_OK
    cdef Iov seg
    if not need_seg and not ((w.hdr_in[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM) and not t.guest_csum):
        memcpy(w.hdr_out, w.hdr_in, VIRTIO_NET_HDR_LEN)
        return rx_enqueue(w, t, pair, src, nsrc, skip, frame_len, final)
    n = soft_offload(w, src, nsrc, skip, frame_len, need_seg)
    if n < 0:
        return rx_dropped(w, t, pair, DROP_OFFLOAD)
    vfe_add_u64(&t.sw_gso if need_seg else &t.sw_csum, 1)
    memset(w.hdr_out, 0, VIRTIO_NET_HDR_MRG_LEN)
    if t.guest_csum:
        w.hdr_out[0] = VIRTIO_NET_HDR_F_DATA_VALID     # we computed every checksum
    for i in range(n):
        soft_frame(w, i, &seg)
        if rx_enqueue(w, t, pair, &seg, 1, 0, seg.len, True) != R_OK:   # a segment is not retried
            result = R_DROP       # why: noted by the last segment that failed
    return result


# ---------------------------------------------------------------- representor (TAP) port
#
# A device attached to a representor sends every guest frame to the TAP fd
# and receives whatever the kernel (OVS, the host stack) writes to it.  The
# TAP carries a 12-byte virtio-net header but advertises no offloads, so the
# kernel hands us complete frames, and we finish checksums and segment TSO
# frames before writing (userspace OVS forwards partial checksums as they
# are, and receivers behind it drop them: facts.md).

cdef inline int tap_write_one(Worker *w, int fd, Iov *src, int nsrc, uint32_t skip,
                       uint32_t frame_len) noexcept nogil:
    """writev a zero virtio-net header plus the frame, straight from guest memory."""
    cdef iovec vec[MAX_IOV + 1]
    cdef int n = 1, i = 0
    cdef uint32_t left = frame_len, off = skip, l
    memset(w.hdr_out, 0, VIRTIO_NET_HDR_MRG_LEN)
    vec[0].iov_base = w.hdr_out
    vec[0].iov_len = VIRTIO_NET_HDR_MRG_LEN
    while i < nsrc and left > 0:
        if off >= src[i].len:
            off -= src[i].len
            i += 1
            continue
        l = src[i].len - off
        if l > left:
            l = left
        vec[n].iov_base = src[i].base + off
        vec[n].iov_len = l
        n += 1
        left -= l
        off = 0
        i += 1
    if writev(fd, vec, n) < 0:
        return drop(w, DROP_TAP)
    return R_OK


cdef inline int tap_out(Worker *w, NetDev *dev, Iov *src, int nsrc, uint32_t skip,
                 uint32_t frame_len) noexcept nogil:
    """A guest frame (header in w.hdr_in) out to the device's representor."""
    cdef int need_seg = needs_segmentation(w.hdr_in[1], 0, 0, 0)
    cdef int i, n, result = R_OK
    cdef Iov seg
    if not need_seg and not (w.hdr_in[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM):
        return tap_write_one(w, dev.tap_fd, src, nsrc, skip, frame_len)
    n = soft_offload(w, src, nsrc, skip, frame_len, need_seg)
    if n < 0:
        return drop(w, DROP_OFFLOAD)
    vfe_add_u64(&dev.sw_gso if need_seg else &dev.sw_csum, 1)
    for i in range(n):
        soft_frame(w, i, &seg)
        if tap_write_one(w, dev.tap_fd, &seg, 1, 0, seg.len) != R_OK:
            result = R_DROP
    return result


cdef inline int tap_in(Worker *w, NetDev *dev) noexcept nogil:
    """Up to BURST frames from the representor into the guest's RX ring."""
    cdef int k, done = 0
    cdef ssize_t n
    cdef Iov frame
    for k in range(BURST):
        n = read(dev.tap_fd, w.tap_buf, LIN_CAP + VIRTIO_NET_HDR_MRG_LEN)
        if n <= VIRTIO_NET_HDR_MRG_LEN:
            break
        memcpy(w.hdr_in, w.tap_buf, VIRTIO_NET_HDR_MRG_LEN)
        frame.base = w.tap_buf + VIRTIO_NET_HDR_MRG_LEN
        frame.len = <uint32_t>(n - VIRTIO_NET_HDR_MRG_LEN)
        if deliver(w, dev, 0, &frame, 1, 0, frame.len, True) != R_OK:
            dev.tap_rx_dropped += 1
        done += 1
    if done:
        flush_rx(w)
    return done


cdef inline void notice(Worker *w, NetDev *dev, uint8_t bit) noexcept nogil:
    """Tell Python about a security event on dev, once until it re-arms
    (security_notices): a guest flooding spoofed frames costs one log line."""
    cdef uint64_t one = 1
    if dev.notices & bit:
        return
    vfe_fetch_or_u8(&dev.notices, bit)
    if w.event_fd >= 0:
        write(w.event_fd, &one, 8)


cdef inline int spoofed(Worker *w, NetDev *dev, uint64_t srcmac) noexcept nogil:
    """Port security: drop a frame whose source MAC the port may not use."""
    vfe_add_u64(&dev.spoofed, 1)
    if not (dev.notices & NOTICE_SPOOF):
        dev.spoof_src = srcmac    # the log names the first spoofed MAC since the re-arm
    notice(w, dev, NOTICE_SPOOF)
    return drop(w, DROP_SPOOFED)


cdef inline void read_net_hdr(Worker *w, uint8_t *p, uint32_t hl) noexcept nogil:
    """The sender's virtio-net header (hl bytes at p, one piece) into
    w.hdr_in: copied once, so what is checked is what is used."""
    if hl == VIRTIO_NET_HDR_MRG_LEN:
        memcpy(w.hdr_in, p, VIRTIO_NET_HDR_MRG_LEN)
    else:
        memcpy(w.hdr_in, p, VIRTIO_NET_HDR_LEN)
        memset(w.hdr_in + VIRTIO_NET_HDR_LEN, 0, VIRTIO_NET_HDR_MRG_LEN - VIRTIO_NET_HDR_LEN)


cdef inline int switch_frame(Worker *w, NetDev *src_dev, int pair, Iov *src, int nsrc,
                      uint32_t total) noexcept nogil:
    """Check the sender's source MAC (port security), learn it, then
    forward: unicast to a known port, flood broadcast/multicast/unknown to
    every other port."""
    cdef Switch *sw = w.sw
    cdef uint32_t hl = src_dev.hdr_len
    cdef uint32_t frame_len = total - hl
    cdef uint8_t eth[12]
    cdef Iov d
    cdef uint64_t dst, srcmac
    cdef uint64_t *slot
    cdef int p, r
    cdef NetDev *t
    if frame_len < 14:
        return drop(w, DROP_SHORT)
    if src[0].len >= hl + 12:
        # the usual layout (testpmd, Linux guests): the header and both MACs
        # in the chain's first piece, read in place
        read_net_hdr(w, src[0].base, hl)
        vfe_eth_macs(src[0].base + hl, &dst, &srcmac)
    else:
        d.base = w.hdr_in
        d.len = hl
        memset(w.hdr_in, 0, VIRTIO_NET_HDR_MRG_LEN)
        sg_copy(&d, 1, 0, src, nsrc, 0, hl)
        d.base = eth
        d.len = 12
        sg_copy(&d, 1, 0, src, nsrc, hl, 12)
        vfe_eth_macs(eth, &dst, &srcmac)
    if src_dev.port_mac != 0 and srcmac != src_dev.port_mac:
        return spoofed(w, src_dev, srcmac)
    if src_dev.port >= 0 and not (srcmac >> 40) & 1:
        # a burst comes from one source MAC or a few: learn each once
        if not (w.learn_dev == src_dev and w.learn_mac == srcmac and
                sw_known(w.learn_slot, w.learn_entry)):
            w.lookup_valid = 0        # the table may change: look destinations up again
            r = sw_learn(sw, src_dev, srcmac, &slot)
            if r == LEARN_OK:
                if slot != NULL:
                    w.learn_dev = src_dev
                    w.learn_mac = srcmac
                    w.learn_slot = slot
                    w.learn_entry = sw_entry(src_dev, srcmac)
            elif r == LEARN_OWNED:
                return spoofed(w, src_dev, srcmac)
            elif r == LEARN_CAPPED:
                vfe_add_u64(&src_dev.learn_capped, 1)
                notice(w, src_dev, NOTICE_CAPPED)
            else:
                vfe_add_u64(&src_dev.table_full, 1)
                notice(w, src_dev, NOTICE_FULL)
    if not (dst >> 40) & 1:
        # a burst goes to one destination or a few: look each up once (the
        # table changes only by learning, ours resets this, or another
        # worker's, as racy per frame as per burst)
        if w.lookup_valid and w.lookup_mac == dst:
            p = w.lookup_port
        else:
            p = sw_lookup(sw, dst)
            w.lookup_mac = dst
            w.lookup_port = p
            w.lookup_valid = 1
        if p >= 0 and p < MAX_PORTS:
            if p == src_dev.port:
                return R_OK           # hairpin: the destination is the sender
            t = sw.ports[p]
            if t != NULL:
                return deliver(w, t, pair, src, nsrc, hl, frame_len, False)
    for p in range(sw.nports):
        t = sw.ports[p]
        if t != NULL and t != src_dev:
            deliver(w, t, pair, src, nsrc, hl, frame_len, True)     # a flood waits for no one
    return R_OK


cdef inline int tap_send(Worker *w, NetDev *dev, Iov *src, int nsrc, uint32_t total) noexcept nogil:
    cdef Iov d
    cdef uint32_t hl = dev.hdr_len
    d.base = w.hdr_in
    d.len = hl
    memset(w.hdr_in, 0, VIRTIO_NET_HDR_MRG_LEN)
    sg_copy(&d, 1, 0, src, nsrc, 0, hl)
    if total - hl < 14:
        return drop(w, DROP_SHORT)
    return tap_out(w, dev, src, nsrc, hl, total - hl)


cdef inline bint tx_frame(Worker *w, NetDev *dev, Vring *vq, Iov *iov, int niov,
                          uint32_t total) noexcept nogil:
    """Send one guest frame from TX ring vq (either layout) to the
    representor or the switch.  False: its destination is full and has been
    for less than STALL_NS -- the frame stays in the ring and the burst
    stops (w.blocked); True: it is done with, delivered or dropped (and
    counted on vq by its reason: the one its drop site noted in
    w.drop_reason, or DROP_NO_ROOM)."""
    cdef int rc, reason
    cdef int64_t t
    if dev.tap_fd >= 0:
        rc = tap_send(w, dev, iov, niov, total)
    else:
        rc = switch_frame(w, dev, vq.index >> 1, iov, niov, total)
    if rc != R_OK:
        reason = w.drop_reason
        if rc == R_NO_ROOM:
            t = now_ns()
            if vq.stall_ns == 0:
                vq.stall_ns = t
            if t - vq.stall_ns < STALL_NS:
                w.blocked = 1
                return False
            reason = DROP_NO_ROOM
        if VFE_COUNTERS:
            vq.cnt[w.id].by[reason] += 1
    vq.stall_ns = 0
    return True


cdef inline int net_tx_burst(Worker *w, Vring *vq) noexcept nogil:
    """Take up to BURST chains from a guest TX ring and switch them."""
    cdef NetDev *dev = <NetDev *>vq.dev
    cdef int n = avail_count(vq)
    cdef int k, rc, niov = 0, done = 0
    cdef uint32_t total = 0
    cdef uint64_t nbytes = 0
    cdef uint16_t head
    cdef Chain frame
    cdef RingCounters *cnt
    if n <= 0:
        if n < 0:
            break_ring(w, vq, n)
        return 0
    if n > BURST:
        n = BURST
    for k in range(n):
        rc = avail_head(vq, vq.last_avail_idx)
        if rc >= 0:
            head = <uint16_t>rc
            rc = walk_chain(vq, head, ALL_READABLE, NET_MAX_CHAIN, w.iov, MAX_IOV, &frame)
            niov = frame.niov
            total = <uint32_t>frame.rbytes
        if rc == 0 and total <= <uint32_t>dev.hdr_len:
            rc = E_LEN
        if rc < 0:
            break_ring(w, vq, rc)
            break
        if not tx_frame(w, dev, vq, w.iov, niov, total):
            break
        used_push(vq, head, 0)
        vq.last_avail_idx += 1
        nbytes += total           # headers and all: one add (the headers come off below)
        done += 1
    if VFE_COUNTERS:
        cnt = &vq.cnt[w.id]
        cnt.packets += done
        cnt.bytes += nbytes - <uint64_t>done * dev.hdr_len
    flush_rx(w)
    used_publish(vq)
    return done
