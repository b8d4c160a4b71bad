# The virtio facts the C code needs at compile time: the C side of
# vfe/virtio (constants.py, layouts.py), with the same names -- feature bits
# as the spec spells them (VIRTIO_NET_F_GUEST_CSUM is vfe.virtio's
# F.NET_GUEST_CSUM).  tests/unit/virtio/test_virtio_c_side.py checks every
# constant here against vfe.virtio, and the ring-area functions against
# vfe.virtio.layouts.ring_area_sizes (through vfe._engine.ring_area_sizes).
from libc.stdint cimport uint64_t

# Split ring (2.7)
cdef enum:
    VRING_DESC_F_NEXT = 1
    VRING_DESC_F_WRITE = 2
    VRING_DESC_F_INDIRECT = 4
    VRING_AVAIL_F_NO_INTERRUPT = 1
    VRING_USED_F_NO_NOTIFY = 1
    VRING_DESC_SIZE = 16
    VRING_HEADER_SIZE = 4          # flags, idx: the head of both the avail and the used ring
    VRING_AVAIL_ELEM_SIZE = 2
    VRING_USED_ELEM_SIZE = 8
    VRING_EVENT_SIZE = 2           # used_event / avail_event after the ring (EVENT_IDX)
    MAX_QUEUE_SIZE = 32768

# Feature bits (bit numbers, not masks)
cdef enum:
    VIRTIO_NET_F_GUEST_CSUM = 1
    VIRTIO_NET_F_GUEST_TSO4 = 7
    VIRTIO_NET_F_GUEST_TSO6 = 8
    VIRTIO_NET_F_GUEST_ECN = 9
    VIRTIO_NET_F_MRG_RXBUF = 15
    VIRTIO_BLK_F_DISCARD = 13
    VIRTIO_BLK_F_WRITE_ZEROES = 14
    VHOST_F_LOG_ALL = 26
    VIRTIO_RING_F_INDIRECT_DESC = 28
    VIRTIO_RING_F_EVENT_IDX = 29
    VIRTIO_F_VERSION_1 = 32
    VIRTIO_F_RING_PACKED = 34

# virtio-net header (5.1.6)
cdef enum:
    VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
    VIRTIO_NET_HDR_F_DATA_VALID = 2
    VIRTIO_NET_HDR_GSO_NONE = 0
    VIRTIO_NET_HDR_GSO_TCPV4 = 1
    VIRTIO_NET_HDR_GSO_TCPV6 = 4
    VIRTIO_NET_HDR_GSO_ECN = 0x80
    VIRTIO_NET_HDR_LEN = 10        # without num_buffers
    VIRTIO_NET_HDR_MRG_LEN = 12    # with num_buffers (VERSION_1 or MRG_RXBUF)

# virtio-blk requests (5.2.6)
cdef enum:
    VIRTIO_BLK_T_IN = 0
    VIRTIO_BLK_T_OUT = 1
    VIRTIO_BLK_T_FLUSH = 4
    VIRTIO_BLK_T_GET_ID = 8
    VIRTIO_BLK_T_DISCARD = 11
    VIRTIO_BLK_T_WRITE_ZEROES = 13
    VIRTIO_BLK_S_OK = 0
    VIRTIO_BLK_S_IOERR = 1
    VIRTIO_BLK_S_UNSUPP = 2
    VIRTIO_BLK_REQ_HDR_SIZE = 16   # struct virtio_blk_req: le32 type, le32 reserved, le64 sector
    VIRTIO_BLK_ID_BYTES = 20
    VIRTIO_BLK_DISCARD_WZ_SIZE = 16  # struct virtio_blk_discard_write_zeroes
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
    VIRTIO_BLK_SECTOR_SIZE = 512


# The bytes of a ring's three areas (vfe/virtio/layouts.py): avail_event and
# used_event exist only with EVENT_IDX (2.7.10).

cdef inline uint64_t vring_desc_size(uint64_t size) noexcept nogil:
    return VRING_DESC_SIZE * size


cdef inline uint64_t vring_avail_size(uint64_t size, bint event_idx) noexcept nogil:
    return VRING_HEADER_SIZE + VRING_AVAIL_ELEM_SIZE * size + (VRING_EVENT_SIZE if event_idx else 0)


cdef inline uint64_t vring_used_size(uint64_t size, bint event_idx) noexcept nogil:
    return VRING_HEADER_SIZE + VRING_USED_ELEM_SIZE * size + (VRING_EVENT_SIZE if event_idx else 0)
