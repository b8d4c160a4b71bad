"""The names of feature bits in ``vf -l`` / ``vf -i``'s ``device_feature``
(the reference's vdpa_rpc.c feature_names, plus the standard bits it lacks)."""
from __future__ import annotations

FEATURE_NAMES = {
    0: "VIRTIO_NET_F_CSUM", 1: "VIRTIO_NET_F_GUEST_CSUM", 3: "VIRTIO_NET_F_MTU",
    6: "VIRTIO_NET_F_GSO", 5: "VIRTIO_NET_F_MAC", 7: "VIRTIO_NET_F_GUEST_TSO4",
    8: "VIRTIO_NET_F_GUEST_TSO6", 9: "VIRTIO_NET_F_GUEST_ECN", 10: "VIRTIO_NET_F_GUEST_UFO",
    11: "VIRTIO_NET_F_HOST_TSO4", 12: "VIRTIO_NET_F_HOST_TSO6", 13: "VIRTIO_NET_F_HOST_ECN",
    14: "VIRTIO_NET_F_HOST_UFO", 15: "VIRTIO_NET_F_MRG_RXBUF", 16: "VIRTIO_NET_F_STATUS",
    17: "VIRTIO_NET_F_CTRL_VQ", 18: "VIRTIO_NET_F_CTRL_RX", 19: "VIRTIO_NET_F_CTRL_VLAN",
    20: "VIRTIO_NET_F_CTRL_RX_EXTRA", 21: "VIRTIO_NET_F_GUEST_ANNOUNCE", 22: "VIRTIO_NET_F_MQ",
    23: "VIRTIO_NET_F_CTRL_MAC_ADDR", 24: "VIRTIO_F_NOTIFY_ON_EMPTY", 27: "VIRTIO_F_ANY_LAYOUT",
    32: "VIRTIO_F_VERSION_1", 33: "VIRTIO_F_IOMMU_PLATFORM", 40: "VIRTIO_F_RING_RESET",
    41: "VIRTIO_F_ADMIN_VQ", 42: "VIRTIO_F_ADMIN_VQ_INDIRECT_DESC", 43: "VIRTIO_F_ADMIN_VQ_IN_ORDER",
    44: "VIRTIO_F_ADMIN_MIGRATION", 45: "VIRTIO_F_ADMIN_MIGRATION_DYNAMIC_INTERNAL_STATE_TRACK",
    46: "VIRTIO_F_ADMIN_DIRTY_PAGE_PUSH_BITMAP_TRACK", 47: "VIRTIO_F_ADMIN_DIRTY_PAGE_PUSH_BYTEMAP_TRACK",
    48: "VIRTIO_F_ADMIN_DIRTY_PAGE_PULL_BITMAP_TRACK", 49: "VIRTIO_F_ADMIN_DIRTY_PAGE_PULL_BYTEMAP_TRACK",
    # standard virtio bits the reference's table does not name
    28: "VIRTIO_RING_F_INDIRECT_DESC", 29: "VIRTIO_RING_F_EVENT_IDX", 34: "VIRTIO_F_RING_PACKED",
    35: "VIRTIO_F_IN_ORDER", 36: "VIRTIO_F_ORDER_PLATFORM", 37: "VIRTIO_F_SR_IOV",
    38: "VIRTIO_F_NOTIFICATION_DATA", 57: "VIRTIO_NET_F_HASH_REPORT", 60: "VIRTIO_NET_F_RSS",
    61: "VIRTIO_NET_F_RSC_EXT", 62: "VIRTIO_NET_F_STANDBY", 63: "VIRTIO_NET_F_SPEED_DUPLEX",
}


# virtio-blk's device bits (virtio 1.2 5.2.3) where they differ from net's
BLK_FEATURE_NAMES = {
    0: "VIRTIO_BLK_F_BARRIER", 1: "VIRTIO_BLK_F_SIZE_MAX", 2: "VIRTIO_BLK_F_SEG_MAX",
    4: "VIRTIO_BLK_F_GEOMETRY", 5: "VIRTIO_BLK_F_RO", 6: "VIRTIO_BLK_F_BLK_SIZE",
    7: "VIRTIO_BLK_F_SCSI", 9: "VIRTIO_BLK_F_FLUSH", 10: "VIRTIO_BLK_F_TOPOLOGY",
    11: "VIRTIO_BLK_F_CONFIG_WCE", 12: "VIRTIO_BLK_F_MQ", 13: "VIRTIO_BLK_F_DISCARD",
    14: "VIRTIO_BLK_F_WRITE_ZEROES", 15: "VIRTIO_BLK_F_LIFETIME", 16: "VIRTIO_BLK_F_SECURE_ERASE",
    17: "VIRTIO_BLK_F_ZONED",
}
DEVICE_BITS = range(24)           # below 24 the bits are the device type's own


def feature_info(value: int, kind: str = "virtio_net") -> dict:
    """``{"value": "0x...", "    0": "VIRTIO_NET_F_CSUM", ...}`` (keys "%5d");
    `kind` "virtio_blk" names the device bits as virtio-blk's."""
    out = {"value": f"{value:#x}"}
    for i in range(64):
        if value >> i & 1:
            if kind == "virtio_blk" and i in DEVICE_BITS:
                name = BLK_FEATURE_NAMES.get(i, "UNKNOWN FEATURE BIT")
            else:
                name = FEATURE_NAMES.get(i, "UNKNOWN FEATURE BIT")
            out[f"{i:5d}"] = name
    return out
