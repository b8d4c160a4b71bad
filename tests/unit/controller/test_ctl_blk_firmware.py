"""The blk kind within the firmware's limits (VIRTIO_BLK_EMULATION_*,
SRIOV_EN, the MSI-X vectors that bound its queues), and one bdev serving
several controllers (the seed's PF and VF on Null0) -- on a fake daemon
whose engine records the devices made."""
from __future__ import annotations

import errno

import pytest

from vfe.controller.blk_kind import BlkKind
from vfe.controller.blk_recovery import BlkCodec
from vfe.controller.inventory import Inventory
from vfe.controller.kind import InventoryError
from vfe.controller.nvconfig import blk_limits
from vfe.controller.paths import Paths
from vfe.controller.recovery import RecoveryStore
from tests.unit.blk_fakes import FakeDaemon



SEED_NV = {"VIRTIO_BLK_EMULATION_ENABLE": 1, "VIRTIO_BLK_EMULATION_NUM_PF": 1,
           "VIRTIO_BLK_EMULATION_NUM_VF": 16, "VIRTIO_BLK_EMULATION_NUM_MSIX": 64, "NUM_VF_MSIX": 64,
           "SRIOV_EN": 1}


def kind(tmp_path, **nv) -> BlkKind:
    blk = BlkKind(Inventory(), FakeDaemon(), Paths.from_env(run_dir=str(tmp_path)),
                  RecoveryStore(tmp_path, [BlkCodec()], enabled=False), blk_limits(nv))
    blk.inventory.register(blk)
    blk.bdevs.bdev_null_create({"name": "Null0", "num_blocks": 2097152, "block_size": 512})
    return blk


def create(blk: BlkKind, pf_id: int = 0, vf_id: int | None = None, **more) -> dict:
    p = {"emu_manager": "mlx5_0", "pf_id": pf_id, "bdev_type": "spdk", "bdev": "Null0"} | more
    if vf_id is not None:
        p["vf_id"] = vf_id
    return blk.controller_virtio_blk_create(p)


def refused(blk: BlkKind, code: int, **kw) -> str:
    before = list(blk.functions())
    with pytest.raises(InventoryError) as exc:
        create(blk, **kw)
    assert exc.value.code == code, exc.value
    assert blk.functions() == before
    return str(exc.value)


def test_nothing_without_blk_emulation(tmp_path):
    msg = refused(kind(tmp_path), -errno.ENODEV)             # the firmware's default: disabled
    assert "VIRTIO_BLK_EMULATION_ENABLE is False(0)" in msg and "vfe-mlxconfig" in msg
    msg = refused(kind(tmp_path, **SEED_NV | {"VIRTIO_BLK_EMULATION_ENABLE": 0}), -errno.ENODEV)
    assert "VIRTIO_BLK_EMULATION_ENABLE" in msg


def test_pf_and_vf_ids_within_num_pf_and_num_vf(tmp_path):
    blk = kind(tmp_path, **SEED_NV)
    assert "VIRTIO_BLK_EMULATION_NUM_PF=1" in refused(blk, -errno.ENODEV, pf_id=1)
    assert "VIRTIO_BLK_EMULATION_NUM_VF=16" in refused(blk, -errno.ENODEV, vf_id=16)
    create(blk, vf_id=15)
    create(blk)
    assert sorted(f.name for f in blk.functions()) == ["VblkEmu0pf0", "VblkEmu0pf0vf15"]


def test_vfs_need_sriov(tmp_path):
    blk = kind(tmp_path, **SEED_NV | {"SRIOV_EN": 0})
    assert "SRIOV_EN is False(0)" in refused(blk, -errno.ENODEV, vf_id=0)
    create(blk)                                              # the PF is there


def test_num_queues_default_and_bound_from_msix(tmp_path):
    blk = kind(tmp_path, **SEED_NV | {"NUM_VF_MSIX": 8})
    create(blk)
    create(blk, vf_id=0)
    # one vector per queue plus one for config changes: the default is all of them
    assert [d.queues for d in blk.daemon.engine.devices] == [63, 7]
    assert [f.num_queues for f in blk.functions()] == [63, 7]
    msg = refused(blk, -errno.EINVAL, vf_id=1, num_queues=8)
    assert msg.startswith("--num_queues 8 is more than the 7 this function may have") and "NUM_VF_MSIX" in msg
    msg = refused(kind(tmp_path, **SEED_NV), -errno.EINVAL, num_queues=64)
    assert "--num_queues 64" in msg and "VIRTIO_BLK_EMULATION_NUM_MSIX=64" in msg
    create(blk, vf_id=1, num_queues=4)
    # the firmware's default VIRTIO_BLK_EMULATION_NUM_MSIX=2: one queue
    blk2 = kind(tmp_path / "b", **SEED_NV | {"VIRTIO_BLK_EMULATION_NUM_MSIX": 2})
    create(blk2)
    assert blk2.daemon.engine.devices[0].queues == 1
    msg = refused(kind(tmp_path / "c", **SEED_NV | {"VIRTIO_BLK_EMULATION_NUM_MSIX": 1}), -errno.ENODEV)
    assert "no MSI-X vector for a queue" in msg


def test_the_queues_hint_names_num_queues(tmp_path):
    blk = kind(tmp_path, **SEED_NV)
    create(blk, num_queues=1)
    hint = blk.functions()[0].model.spec().queues_hint
    assert hint.startswith("controller VblkEmu0pf0 was created with --num_queues 1;")
    assert "--num_queues N, N at least QEMU's num-queues (at most 63 here)" in hint


def test_the_seeds_pf_and_vf_share_null0(tmp_path):
    blk = kind(tmp_path, **SEED_NV)
    create(blk, num_queues=1, admin_q=True)
    create(blk, vf_id=0, force_in_order=True)
    pf, vf = blk.daemon.engine.devices
    assert pf.storage is vf.storage is blk.bdevs.by_name["Null0"].storage
    assert (pf.kw["in_order"], vf.kw["in_order"]) == (False, True)
    info = blk.bdevs.bdev_get_bdevs({"name": "Null0"})[0]
    assert info["claimed"] is True and info["claimed_by"] == ["VblkEmu0pf0", "VblkEmu0pf0vf0"]
    with pytest.raises(InventoryError) as exc:
        blk.bdevs.delete("null", {"name": "Null0"})
    assert exc.value.code == -errno.EBUSY
    assert "in use by controllers VblkEmu0pf0, VblkEmu0pf0vf0; delete them first" in str(exc.value)
    blk.controller_virtio_blk_delete({"name": "VblkEmu0pf0"})
    with pytest.raises(InventoryError, match="in use by controller VblkEmu0pf0vf0; delete it first"):
        blk.bdevs.delete("null", {"name": "Null0"})
    blk.controller_virtio_blk_delete({"name": "VblkEmu0pf0vf0"})
    assert blk.bdevs.bdev_get_bdevs({"name": "Null0"})[0]["claimed"] is False
    assert blk.bdevs.delete("null", {"name": "Null0"}) is True


def test_recovery_skips_what_the_firmware_no_longer_allows(tmp_path, caplog):
    store = RecoveryStore(tmp_path / "rec", [BlkCodec()])
    made = BlkKind(Inventory(), FakeDaemon(), Paths.from_env(run_dir=str(tmp_path)), store,
                   blk_limits(SEED_NV | {"VIRTIO_BLK_EMULATION_NUM_PF": 2}))
    made.inventory.register(made)
    made.bdevs.bdev_null_create({"name": "Null0", "num_blocks": 2048, "block_size": 512})
    create(made)
    create(made, pf_id=1)
    # the firmware now has one blk PF: pf_id 1 is not recreated, its file stays
    blk = BlkKind(Inventory(), FakeDaemon(), Paths.from_env(run_dir=str(tmp_path)), store, blk_limits(SEED_NV))
    blk.inventory.register(blk)
    with caplog.at_level("INFO", logger="vfe.controller.blk"):
        assert blk.restore(store.load("blk")) == "1 recovered bdev(s) and 1 blk controller(s)"
    assert [f.name for f in blk.functions()] == ["VblkEmu0pf0"]
    assert "cannot recover VblkEmu0pf1: no virtio-blk PF with pf_id 1: VIRTIO_BLK_EMULATION_NUM_PF=1" in caplog.text
    assert (tmp_path / "rec" / "blk" / "controllers" / "VBLKS0D0F3.json").exists()
