# Writing w.hdr_out + a frame into the RX buffers a ring's filler took and
# logging their pages dirty: the one step the split (netdata.pxd
# rx_enqueue) and packed (packed_rx.pxd) layouts share once their buffers
# are mapped into w.rx_iov; and the counting both do (counters.pxd).
from libc.stdint cimport uint8_t, uint32_t
from libc.string cimport memcpy, memmove
from atomics cimport vfe_fence
from vring cimport Vring, Iov, sg_copy, log_pages
from virtio cimport VIRTIO_NET_HDR_LEN, VIRTIO_NET_HDR_MRG_LEN
from netpath cimport Worker, NetDev, R_DROP
from counters cimport RingCounters, VFE_COUNTERS


cdef inline bint one_piece(Iov *src, int nsrc, uint32_t skip, uint32_t length) noexcept nogil:
    """Whether bytes [skip, skip+length) of the src iovecs lie in src[0]."""
    return nsrc > 0 and src[0].len >= skip and src[0].len - skip >= length


cdef inline int rx_drop(Worker *w, Vring *vq, int reason) noexcept nogil:
    """A frame for RX ring vq dropped for `reason` (counters.pxd
    DropReason): counted on the ring, in this thread's block, and noted
    for the sender's count (netdata.pxd tx_frame).  Returns R_DROP."""
    if VFE_COUNTERS:
        vq.cnt[w.id].by[reason] += 1
        w.drop_reason = reason
    return R_DROP


cdef inline void rx_counted(Worker *w, uint32_t frame_len, int nbuffers) noexcept nogil:
    """A frame delivered into the run's RX ring in nbuffers buffers (its
    filler's last step): counted in w.rx_cnt, this thread's block there,
    which no other core writes."""
    cdef RingCounters *cnt
    if VFE_COUNTERS:
        cnt = w.rx_cnt
        cnt.packets += 1
        cnt.bytes += frame_len
        cnt.buffers += nbuffers


cdef inline void rx_copy(Worker *w, NetDev *t, int niov, int nbuffers, Iov *src, int nsrc,
                         uint32_t skip, uint32_t frame_len) noexcept nogil:
    """t.hdr_len bytes of w.hdr_out (num_buffers = nbuffers when the header
    has it), then the frame, into w.rx_iov[0:niov] (whose bytes, the caller
    checked, hold both), and their pages marked in the dirty log."""
    cdef uint8_t *d
    cdef Iov h
    cdef int c
    if t.hdr_len == VIRTIO_NET_HDR_MRG_LEN:
        # num_buffers (le16) follows the header's first VIRTIO_NET_HDR_LEN bytes
        w.hdr_out[VIRTIO_NET_HDR_LEN] = nbuffers & 0xFF
        w.hdr_out[VIRTIO_NET_HDR_LEN + 1] = (nbuffers >> 8) & 0xFF
    if niov == 1 and one_piece(src, nsrc, skip, frame_len):
        # the common layout: one RX buffer of one piece, the frame in one
        # source piece; constant-size header stores
        d = w.rx_iov[0].base
        if t.hdr_len == VIRTIO_NET_HDR_MRG_LEN:
            memcpy(d, w.hdr_out, VIRTIO_NET_HDR_MRG_LEN)
        else:
            memcpy(d, w.hdr_out, VIRTIO_NET_HDR_LEN)
        # memmove: both sides are guest memory and a guest may make them overlap
        memmove(d + t.hdr_len, src[0].base + skip, frame_len)
    else:
        h.base = w.hdr_out
        h.len = t.hdr_len
        sg_copy(w.rx_iov, niov, 0, &h, 1, 0, t.hdr_len)
        sg_copy(w.rx_iov, niov, t.hdr_len, src, nsrc, skip, frame_len)
    if t.log.active:
        vfe_fence()
        for c in range(niov):
            log_pages(&t.log, w.rx_iov[c].gpa, w.rx_iov[c].len)
