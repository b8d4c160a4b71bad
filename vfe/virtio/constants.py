"""Virtio constants with the spec's names (virtio 1.2, sections 2, 5.1 and 5.2).

Pure data: no I/O lives in vfe/virtio/.
"""
from enum import IntEnum, IntFlag


class DeviceId(IntEnum):
    NET = 1
    BLOCK = 2


class Status(IntFlag):
    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


class F(IntEnum):
    """Feature bit numbers (not masks). Use ``bit(F.X)`` for the mask."""

    # virtio-net (5.1.3)
    NET_CSUM = 0
    NET_GUEST_CSUM = 1
    NET_CTRL_GUEST_OFFLOADS = 2
    NET_MTU = 3
    NET_MAC = 5
    NET_GSO = 6
    NET_GUEST_TSO4 = 7
    NET_GUEST_TSO6 = 8
    NET_GUEST_ECN = 9
    NET_GUEST_UFO = 10
    NET_HOST_TSO4 = 11
    NET_HOST_TSO6 = 12
    NET_HOST_ECN = 13
    NET_HOST_UFO = 14
    NET_MRG_RXBUF = 15
    NET_STATUS = 16
    NET_CTRL_VQ = 17
    NET_CTRL_RX = 18
    NET_CTRL_VLAN = 19
    NET_GUEST_ANNOUNCE = 21
    NET_MQ = 22
    NET_CTRL_MAC_ADDR = 23
    # virtio-blk (5.2.3)
    BLK_SIZE_MAX = 1
    BLK_SEG_MAX = 2
    BLK_GEOMETRY = 4
    BLK_RO = 5
    BLK_BLK_SIZE = 6
    BLK_FLUSH = 9
    BLK_TOPOLOGY = 10
    BLK_CONFIG_WCE = 11
    BLK_MQ = 12
    BLK_DISCARD = 13
    BLK_WRITE_ZEROES = 14
    # transport/ring (6)
    NOTIFY_ON_EMPTY = 24
    ANY_LAYOUT = 27
    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34
    IN_ORDER = 35
    # vhost-user specific bits carried in the same 64-bit word
    VHOST_LOG_ALL = 26
    VHOST_USER_PROTOCOL_FEATURES = 30


def bit(n: int) -> int:
    return 1 << int(n)


def mask(*bits: int) -> int:
    m = 0
    for b in bits:
        m |= 1 << int(b)
    return m


# Split ring (2.7)
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1
VRING_DESC_SIZE = 16               # struct virtq_desc
VRING_HEADER_SIZE = 4              # flags, idx: the head of both the avail and the used ring
VRING_AVAIL_ELEM_SIZE = 2          # one avail ring entry (a head index)
VRING_USED_ELEM_SIZE = 8           # struct virtq_used_elem
VRING_EVENT_SIZE = 2               # used_event / avail_event after the ring (EVENT_IDX)
MAX_QUEUE_SIZE = 32768

# Packed virtqueues (virtio 1.2, 2.8): descriptor flags the driver and the
# device flip with their wrap counters, and the event suppression areas.
VRING_PACKED_DESC_F_AVAIL = 1 << 7
VRING_PACKED_DESC_F_USED = 1 << 15
VRING_PACKED_EVENT_SIZE = 4        # struct pvirtq_event_suppress: desc (off | wrap << 15), flags
VRING_PACKED_EVENT_F_WRAP_CTR = 15 # bit of the event offset holding the wrap counter
RING_EVENT_FLAGS_ENABLE = 0
RING_EVENT_FLAGS_DISABLE = 1
RING_EVENT_FLAGS_DESC = 2          # notify at one descriptor (EVENT_IDX)

# virtio-net header (5.1.6)
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_UDP_L4 = 5
VIRTIO_NET_HDR_GSO_ECN = 0x80
VIRTIO_NET_HDR_LEN = 10            # legacy header without num_buffers
VIRTIO_NET_HDR_MRG_LEN = 12        # with num_buffers (VERSION_1 or MRG_RXBUF)
VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_S_ANNOUNCE = 2
# config.mtu with NET_MTU (5.1.4.1: "between 68 and 65535 inclusive")
VIRTIO_NET_MTU_MIN = 68
VIRTIO_NET_MTU_MAX = 65535


# virtio-blk requests (5.2.6)
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
VIRTIO_BLK_REQ_HDR_SIZE = 16       # struct virtio_blk_req: le32 type, le32 reserved, le64 sector
VIRTIO_BLK_ID_BYTES = 20           # GET_ID answer
VIRTIO_BLK_DISCARD_WZ_SIZE = 16    # struct virtio_blk_discard_write_zeroes
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
VIRTIO_BLK_SECTOR_SIZE = 512       # capacity and request sectors are always 512 bytes


def net_hdr_len(features: int) -> int:
    """Length of the virtio-net header for a negotiated feature set."""
    if features & (bit(F.VERSION_1) | bit(F.NET_MRG_RXBUF)):
        return VIRTIO_NET_HDR_MRG_LEN
    return VIRTIO_NET_HDR_LEN
