"""The display names of feature bits agree with vfe.virtio's numbers."""
from vfe.virtio.constants import F
from vfe.virtio.feature_names import BLK_FEATURE_NAMES, DEVICE_BITS_END, NET_FEATURE_NAMES

SPEC_PREFIX = {"NET_": "VIRTIO_NET_F_", "BLK_": "VIRTIO_BLK_F_", "RING_": "VIRTIO_RING_F_"}
SPELLED_OTHERWISE = {"ACCESS_PLATFORM": "VIRTIO_F_IOMMU_PLATFORM",     # the reference's older name
                     "RING_PACKED": "VIRTIO_F_RING_PACKED"}             # a VIRTIO_F_ bit despite its RING_
# the reference prints bit 2 as an unknown bit, and vhostmgmt keeps its output
NOT_NAMED = {"NET_CTRL_GUEST_OFFLOADS"}


def spec_name(member_name: str) -> str:
    if member_name in SPELLED_OTHERWISE:
        return SPELLED_OTHERWISE[member_name]
    for ours, spec in SPEC_PREFIX.items():
        if member_name.startswith(ours):
            return spec + member_name[len(ours):]
    return "VIRTIO_F_" + member_name


def test_every_named_bit_vfe_knows_has_its_spec_name():
    for name, member in F.__members__.items():
        if name.startswith("VHOST_") or name in NOT_NAMED:
            continue                        # vhost-user bits, not virtio's: not in these tables
        table = BLK_FEATURE_NAMES if name.startswith("BLK_") else NET_FEATURE_NAMES
        assert table.get(member.value) == spec_name(name), name


def test_blk_table_holds_only_device_bits():
    assert all(n < DEVICE_BITS_END for n in BLK_FEATURE_NAMES)
