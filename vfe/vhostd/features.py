"""``vf -l`` / ``vf -i``'s ``device_feature``: a feature word with its bits
named (the names: vfe/virtio/feature_names.py)."""
from __future__ import annotations

from vfe.virtio.feature_names import BLK_FEATURE_NAMES, DEVICE_BITS_END, NET_FEATURE_NAMES


def feature_info(value: int, kind: str = "virtio_net") -> dict:
    """``{"value": "0x...", "    0": "VIRTIO_NET_F_CSUM", ...}`` (keys "%5d");
    `kind` "virtio_blk" names the device bits as virtio-blk's."""
    out = {"value": f"{value:#x}"}
    for i in range(64):
        if value >> i & 1:
            if kind == "virtio_blk" and i < DEVICE_BITS_END:
                name = BLK_FEATURE_NAMES.get(i, "UNKNOWN FEATURE BIT")
            else:
                name = NET_FEATURE_NAMES.get(i, "UNKNOWN FEATURE BIT")
            out[f"{i:5d}"] = name
    return out
