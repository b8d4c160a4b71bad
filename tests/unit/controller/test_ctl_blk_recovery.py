"""The blk kind: its functions' `virtnet list` entry, the recovery files of
bdevs and blk controllers (written, removed, loaded, bad files), restoring
them into a fresh inventory, and the virtnet methods that see them (list,
query, modify, unplug, vf_state) -- on a fake daemon and engine."""
import errno
import json
import logging
import os

import pytest

from vfe.controller.blk_kind import BlkKind
from vfe.controller.blk_recovery import (
    BDEV_DIR, BLK_SUBDIR, CONTROLLER_DIR, BdevRecord, BlkCodec, BlkControllerRecord,
)
from vfe.controller.functions import NetFunction
from vfe.controller.inventory import Inventory
from vfe.controller.kind import InventoryError
from vfe.controller.paths import Paths
from vfe.controller.recovery import RecoveryError, RecoveryStore
from tests.unit.blk_fakes import SEED_BLK_LIMITS, FakeDaemon



PF_FIELDS = ("pf_id", "function_type", "vuid", "bdf", "type", "emulation_manager", "max_queues",
             "max_queues_size", "blk_controller", "blk_bdev", "blk_bdev_type", "blk_block_size",
             "blk_num_blocks")
VF_FIELDS = ("vf_id", "parent_pf_id") + PF_FIELDS[1:]


@pytest.fixture
def store(tmp_path):
    return RecoveryStore(tmp_path / "recovery", [BlkCodec()])


def registry(tmp_path, store, daemon=None) -> BlkKind:
    """The blk kind, registered in an inventory of its own."""
    inventory = Inventory()
    blk = BlkKind(inventory, daemon or FakeDaemon(), Paths.from_env(run_dir=str(tmp_path / "run")),
                  store, SEED_BLK_LIMITS)
    inventory.register(blk)
    return blk


def blk_dir(store):
    return store.dir / BLK_SUBDIR


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.truncate(8 << 20)
    return p


def populate(reg, image):
    reg.bdevs.bdev_null_create({"name": "Null0", "num_blocks": 2097152, "block_size": 512})
    reg.bdevs.bdev_malloc_create({"name": "M0", "num_blocks": 16384, "block_size": 4096})
    reg.bdevs.bdev_aio_create({"name": "Aio0", "filename": str(image), "block_size": 4096})
    reg.controller_virtio_blk_create({"emu_manager": "mlx5_0", "pf_id": 0, "bdev_type": "spdk",
                                      "bdev": "Null0", "num_queues": 1, "admin_q": True})
    reg.controller_virtio_blk_create({"emu_manager": "mlx5_0", "pf_id": 0, "vf_id": 9, "bdev_type": "spdk",
                                      "bdev": "Aio0", "num_queues": 4, "queue_size": 256,
                                      "force_in_order": True})
    reg.controller_virtio_blk_create({"emu_manager": "mlx5_2", "pf_id": 1, "bdev_type": "spdk",
                                      "bdev": "M0"})


def files(store) -> dict:
    d = blk_dir(store)
    if not d.exists():
        return {}
    return {str(p.relative_to(d)): p.read_text() for p in sorted(d.rglob("*")) if p.is_file()}


# -- the list entry ----------------------------------------------------------------

def test_list_entries_of_a_pf_and_a_vf(tmp_path, store, image):
    reg = registry(tmp_path, store)
    populate(reg, image)
    entries = [f.list_entry() for f in reg.in_list_order(reg.functions())]
    assert [tuple(e) for e in entries] == [PF_FIELDS, PF_FIELDS, VF_FIELDS]
    pf0, pf1, vf = entries
    assert pf0 == {"pf_id": 0, "function_type": "static PF", "vuid": "VBLKS0D0F2", "bdf": "a0:00.0",
                   "type": "virtio_blk", "emulation_manager": "mlx5_0", "max_queues": 1,
                   "max_queues_size": 128, "blk_controller": "VblkEmu0pf0", "blk_bdev": "Null0",
                   "blk_bdev_type": "null", "blk_block_size": 512, "blk_num_blocks": 2097152}
    assert (pf1["vuid"], pf1["bdf"], pf1["blk_bdev_type"], pf1["blk_num_blocks"]) == \
        ("VBLKS0D0F3", "a1:00.0", "malloc", 16384)
    assert vf == {"vf_id": 9, "parent_pf_id": 0, "function_type": "VF", "vuid": "VBLKS0D0F2VF10",
                  "bdf": "b0:01.1", "type": "virtio_blk", "emulation_manager": "mlx5_0", "max_queues": 4,
                  "max_queues_size": 256, "blk_controller": "VblkEmu0pf0vf9", "blk_bdev": "Aio0",
                  "blk_bdev_type": "aio", "blk_block_size": 4096, "blk_num_blocks": 2048}
    json.dumps(entries)                          # plain JSON


def test_net_list_entry_is_unchanged():
    """The seed's fields, in its order, and nothing else (no "type")."""
    f = NetFunction(pf_id=0, vf_id=-1, device_type="static", vuid="VNETS0D0F2", bdf_raw=0x8402,
                    ib_dev="mlx5_0", pf_num=0, sf_num=1000, mac="00:11:22:33:44:55", mtu=1500,
                    max_queues=3, max_queue_size=256, num_msix=10, features=0)
    assert tuple(f.list_entry()) == (
        "pf_id", "function_type", "vuid", "bdf", "sf_num", "sf_parent_device", "sf_rep_net_device",
        "sf_rep_net_ifindex", "sf_rdma_device", "sf_vhca_id", "msix_config_vector", "num_msix",
        "max_queues", "max_queues_size", "net_mac", "net_mtu")


# -- the files -----------------------------------------------------------------------

def test_files_written_on_create_in_their_order(tmp_path, store, image):
    reg = registry(tmp_path, store)
    populate(reg, image)
    got = {k: json.loads(v) for k, v in files(store).items()}
    assert sorted(got) == ["bdevs/Aio0.json", "bdevs/M0.json", "bdevs/Null0.json",
                           "controllers/VBLKS0D0F2.json", "controllers/VBLKS0D0F2VF10.json",
                           "controllers/VBLKS0D0F3.json"]
    assert list(got["bdevs/Null0.json"].items()) == [
        ("name", "Null0"), ("bdev_type", "null"), ("block_size", 512), ("num_blocks", 2097152)]
    assert got["bdevs/Aio0.json"] == {"name": "Aio0", "bdev_type": "aio", "block_size": 4096,
                                      "num_blocks": 2048, "filename": str(image)}
    sock = str(tmp_path / "run" / "VBLKS0D0F2VF10.sock")
    assert list(got["controllers/VBLKS0D0F2VF10.json"].items()) == [
        ("name", "VblkEmu0pf0vf9"), ("emulation_manager", "mlx5_0"), ("pf_id", 0), ("vf_id", 9),
        ("vuid", "VBLKS0D0F2VF10"), ("bdf_raw", 0xB009), ("bdev", "Aio0"), ("num_queues", 4),
        ("queue_size", 256), ("admin_q", False), ("force_in_order", True), ("socket", sock)]
    assert "vf_id" not in got["controllers/VBLKS0D0F2.json"]
    # no temp file left, nothing in the net functions' directory itself
    assert [p.name for p in store.dir.iterdir()] == ["blk"]


def test_relative_aio_filename_is_recorded_absolute(tmp_path, store, image, monkeypatch):
    monkeypatch.chdir(image.parent)
    reg = registry(tmp_path, store)
    reg.bdevs.bdev_aio_create({"name": "A", "filename": image.name})
    assert json.loads((store.dir / BDEV_DIR / "A.json").read_text())["filename"] == str(image)


def test_deletes_remove_the_files(tmp_path, store, image):
    reg = registry(tmp_path, store)
    populate(reg, image)
    reg.controller_virtio_blk_delete({"name": "VblkEmu0pf0vf9"})
    reg.bdevs.delete("aio", {"name": "Aio0"})
    assert sorted(files(store)) == ["bdevs/M0.json", "bdevs/Null0.json", "controllers/VBLKS0D0F2.json",
                                    "controllers/VBLKS0D0F3.json"]


def test_shutdown_keeps_the_files(tmp_path, store, image):
    reg = registry(tmp_path, store)
    populate(reg, image)
    before = files(store)
    reg.shutdown()
    assert reg.functions() == [] and files(store) == before


def test_a_malloc_bdev_refuses_a_live_update(tmp_path, store, image):
    """Its data lives in this process only; null and aio bdevs move."""
    reg = registry(tmp_path, store)
    reg.bdevs.bdev_null_create({"name": "Null0", "num_blocks": 2048, "block_size": 512})
    assert reg.update_refusal() is None
    reg.bdevs.bdev_malloc_create({"name": "M1", "size_mb": 1})
    reg.bdevs.bdev_malloc_create({"name": "M0", "size_mb": 1})
    assert reg.update_refusal() == ("cannot update while malloc bdev(s) M0, M1 exist: their data lives in "
                                    "this process only; delete them (or use aio bdevs) first")


def test_disabled_store_writes_and_loads_nothing(tmp_path, image):
    store = RecoveryStore(tmp_path / "recovery", [BlkCodec()], enabled=False)
    populate(registry(tmp_path, store), image)
    assert files(store) == {}
    assert store.load("blk") == ([], [], [])


def test_unwritable_store_fails_the_create_and_leaves_nothing(tmp_path, store):
    daemon = FakeDaemon()
    reg = registry(tmp_path, store, daemon)
    blk_dir(store).mkdir(parents=True)
    (store.dir / BDEV_DIR).write_text("not a directory")
    with pytest.raises(InventoryError) as exc:
        reg.bdevs.bdev_null_create({"name": "Null0", "num_blocks": 2048, "block_size": 512})
    assert "bdev Null0: cannot write its recovery file" in str(exc.value) and exc.value.code < 0
    assert reg.bdevs.by_name == {}

    (store.dir / BDEV_DIR).unlink()
    reg.bdevs.bdev_null_create({"name": "Null0", "num_blocks": 2048, "block_size": 512})
    (store.dir / CONTROLLER_DIR).write_text("not a directory")
    with pytest.raises(InventoryError) as exc:
        reg.controller_virtio_blk_create({"emu_manager": "mlx5_0", "pf_id": 0, "bdev": "Null0"})
    assert "VblkEmu0pf0: cannot write its recovery file" in str(exc.value)
    assert reg.functions() == [] and daemon.endpoints == [] and reg.bdevs.by_name["Null0"].users == []


def test_a_failed_create_writes_no_file(tmp_path, store):
    reg = registry(tmp_path, store, FakeDaemon(fail_listen=OSError(errno.EADDRINUSE, "Address in use")))
    reg.bdevs.bdev_null_create({"name": "Null0", "num_blocks": 2048, "block_size": 512})
    with pytest.raises(InventoryError):
        reg.controller_virtio_blk_create({"emu_manager": "mlx5_0", "pf_id": 0, "bdev": "Null0"})
    assert sorted(files(store)) == ["bdevs/Null0.json"]


def test_bad_bdev_names_never_become_paths(tmp_path, store, image):
    reg = registry(tmp_path, store)
    for name in ("../x", "a/b", ".."):
        with pytest.raises(InventoryError):
            reg.bdevs.bdev_aio_create({"name": name, "filename": str(image)})
        with pytest.raises(InventoryError):
            reg.bdevs.bdev_null_create({"name": name, "num_blocks": 2048, "block_size": 512})
    with pytest.raises(InventoryError):                 # a block size that is not a number: EINVAL
        reg.bdevs.bdev_aio_create({"name": "A", "filename": str(image), "block_size": "x"})
    assert files(store) == {} and reg.bdevs.by_name == {}


@pytest.mark.parametrize("name", ["ok\n", "ok\n../x", "ok;junk", "ok/x", "ok x", "x" * 65])
def test_names_are_matched_whole(tmp_path, store, image, name):
    """A trailing newline would pass a `^...$` regex with match(): names are
    fullmatched, from RPC and from recovery files alike."""
    reg = registry(tmp_path, store)
    with pytest.raises(InventoryError, match="bad bdev name"):
        reg.bdevs.bdev_null_create({"name": name, "num_blocks": 2048, "block_size": 512})
    with pytest.raises(InventoryError, match="bad bdev name"):
        reg.bdevs.bdev_aio_create({"name": name, "filename": str(image)})
    reg.bdevs.bdev_null_create({"name": "Null0", "num_blocks": 2048, "block_size": 512})
    with pytest.raises(InventoryError, match="no emulation manager"):
        reg.controller_virtio_blk_create({"emu_manager": "mlx5_0\n", "pf_id": 0, "bdev": "Null0"})
    with pytest.raises(RecoveryError):
        BdevRecord(name, "null", 512, 2048).validate()
    with pytest.raises(RecoveryError):
        BlkControllerRecord.from_json(GOOD_CTRL | {"emulation_manager": "mlx5_0\n"}, "VBLKS0D0F2VF2")
    assert files(store) == {"bdevs/Null0.json": files(store)["bdevs/Null0.json"]}


@pytest.mark.parametrize("what", ["a symlink", "a FIFO", "a character device", "a directory"])
def test_aio_bdev_files_are_regular_files_or_block_devices(tmp_path, store, image, what):
    odd = {"a symlink": tmp_path / "link.img", "a FIFO": tmp_path / "fifo",
           "a character device": "/dev/zero", "a directory": tmp_path}[what]
    if what == "a symlink":
        odd.symlink_to(image)
    elif what == "a FIFO":
        os.mkfifo(odd)
    reg = registry(tmp_path, store)
    with pytest.raises(InventoryError, match=f"is {what}, not a regular file or a block device"):
        reg.bdevs.bdev_aio_create({"name": "Aio0", "filename": str(odd)})
    assert reg.bdevs.by_name == {} and files(store) == {}


def test_a_file_that_shrank_is_not_grown_back(tmp_path, store, image):
    """The file of an aio bdev shrinks before its controller is created (or
    recovered): the controller is refused and the file keeps its size."""
    from vfe.engine import Engine
    daemon = FakeDaemon()
    daemon.engine = Engine()
    reg = registry(tmp_path, store, daemon)
    reg.bdevs.bdev_aio_create({"name": "Aio0", "filename": str(image)})
    os.truncate(image, 4 << 20)
    with pytest.raises(InventoryError, match=r"smaller than the 8388608 bytes the disk serves \(it is not grown"):
        reg.controller_virtio_blk_create({"emu_manager": "mlx5_0", "pf_id": 0, "bdev": "Aio0"})
    assert os.stat(image).st_size == 4 << 20
    assert reg.functions() == [] and daemon.endpoints == []


# -- loading and restoring -------------------------------------------------------------

def test_restore_brings_back_the_same_functions(tmp_path, store, image, caplog):
    reg = registry(tmp_path, store)
    populate(reg, image)
    listed = [f.list_entry() for f in reg.in_list_order(reg.functions())]
    sockets = {f.vuid: f.socket for f in reg.functions()}
    bdevs = reg.bdevs.bdev_get_bdevs({})
    before = files(store)

    loaded = store.load("blk")
    assert loaded.problems == [] and len(loaded.bdevs) == 3 and len(loaded.controllers) == 3
    daemon = FakeDaemon()
    reg2 = registry(tmp_path, store, daemon)
    with caplog.at_level(logging.INFO, logger="vfe.controller.blk"):
        assert reg2.restore(loaded) == "3 recovered bdev(s) and 3 blk controller(s)"
    assert [f.list_entry() for f in reg2.in_list_order(reg2.functions())] == listed
    assert {f.vuid: f.socket for f in reg2.functions()} == sockets
    assert sorted(ep.path for ep in daemon.endpoints) == sorted(sockets.values())
    assert sorted(reg2.bdevs.bdev_get_bdevs({}), key=lambda b: b["name"]) == sorted(bdevs, key=lambda b: b["name"])
    assert files(store) == before                      # restoring rewrites nothing
    assert "bdev M0: recovered EMPTY" in caplog.text   # a malloc bdev's contents are gone: said so
    # the aio bdev serves the same file at the same size
    dev = [d for d in daemon.engine.devices if d.storage.kind == "file"][0]
    assert dev.capacity == 8 << 20 and dev.storage.path == str(image)


def test_restore_skips_what_cannot_be_recreated_and_keeps_its_files(tmp_path, store, image, caplog):
    populate(registry(tmp_path, store), image)
    before = files(store)
    os.truncate(image, 4 << 20)                          # shrunk: not the disk the guest had
    reg = registry(tmp_path, store)
    with caplog.at_level(logging.INFO, logger="vfe.controller.blk"):
        assert reg.restore(store.load("blk")) == "2 recovered bdev(s) and 2 blk controller(s)"
    assert "bdev Aio0: cannot recover:" in caplog.text and "smaller than the 8 MiB" in caplog.text
    assert "VBLKS0D0F2VF10: cannot recover VblkEmu0pf0vf9: its bdev Aio0 was not recreated" in caplog.text
    assert sorted(f.vuid for f in reg.functions()) == ["VBLKS0D0F2", "VBLKS0D0F3"]
    assert files(store) == before

    image.unlink()                                       # gone: not silently recreated empty
    caplog.clear()
    reg = registry(tmp_path, store)
    with caplog.at_level(logging.INFO, logger="vfe.controller.blk"):
        assert reg.restore(store.load("blk")) == "2 recovered bdev(s) and 2 blk controller(s)"
    assert "No such file or directory" in caplog.text and not image.exists()
    assert files(store) == before


def test_grown_aio_file_keeps_the_recorded_size(tmp_path, store, image):
    populate(registry(tmp_path, store), image)
    os.truncate(image, 16 << 20)
    reg = registry(tmp_path, store)
    reg.restore(store.load("blk"))
    assert reg.bdevs.by_name["Aio0"].size_mb == 8


GOOD_BDEV = {"name": "Null0", "bdev_type": "null", "block_size": 512, "num_blocks": 2048}
GOOD_CTRL = {"name": "VblkEmu0pf0vf1", "emulation_manager": "mlx5_0", "pf_id": 0, "vf_id": 1,
             "vuid": "VBLKS0D0F2VF2", "bdf_raw": 0xB001, "bdev": "Null0", "num_queues": 1,
             "queue_size": 128, "admin_q": False, "force_in_order": False, "socket": "/run/x.sock"}


def write(store, kind, stem, content):
    d = store.dir / (BDEV_DIR if kind == "bdev" else CONTROLLER_DIR)
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{stem}.json").write_text(content if isinstance(content, str) else json.dumps(content))


def test_good_files_load():
    assert BdevRecord.from_json(GOOD_BDEV, "Null0").size_mb == 1
    rec = BlkControllerRecord.from_json(GOOD_CTRL, "VBLKS0D0F2VF2")
    assert rec.create_params() == {"emu_manager": "mlx5_0", "pf_id": 0, "vf_id": 1, "bdev_type": "spdk",
                                   "bdev": "Null0", "num_queues": 1, "queue_size": 128, "admin_q": False,
                                   "force_in_order": False}
    # unknown fields (a later version's) are ignored
    assert BdevRecord.from_json(GOOD_BDEV | {"comment": 1}, "Null0").name == "Null0"


@pytest.mark.parametrize("kind,stem,content,needle", [
    ("bdev", "Null0", "{", "is not valid JSON (line 1 column 2"),
    ("bdev", "Null0", "[]", "is invalid (not a JSON object)"),
    ("bdev", "Null0", "\xff", "is not valid JSON"),
    ("bdev", "Null0", {k: v for k, v in GOOD_BDEV.items() if k != "num_blocks"}, "num_blocks: missing"),
    ("bdev", "Null1", GOOD_BDEV, "name: 'Null0' but the file is named Null1.json"),
    ("bdev", "Null0", GOOD_BDEV | {"bdev_type": "nvme"}, "bdev_type: 'nvme' is not one of null, malloc, aio"),
    ("bdev", "Null0", GOOD_BDEV | {"block_size": 520}, "block_size: 520 is not one of"),
    ("bdev", "Null0", GOOD_BDEV | {"block_size": "512"}, "block_size: must be an integer"),
    ("bdev", "Null0", GOOD_BDEV | {"num_blocks": 2047}, "num_blocks: 2047 blocks of 512 bytes is not a whole"),
    ("bdev", "Null0", GOOD_BDEV | {"num_blocks": 0}, "num_blocks: 0 is out of range"),
    ("bdev", "Null0", GOOD_BDEV | {"filename": "/x"}, "filename: a null bdev has no file"),
    ("bdev", "Null0", GOOD_BDEV | {"bdev_type": "aio"}, "filename: must be a non-empty string"),
    ("bdev", "Null0", GOOD_BDEV | {"bdev_type": "aio", "filename": "disk.img"}, "is not an absolute path"),
    ("ctrl", "VBLKS0D0F2VF2", GOOD_CTRL | {"vuid": "VBLKS0D0F3"}, "but the file is named VBLKS0D0F2VF2.json"),
    ("ctrl", "VBLKS0D0F2VF2", GOOD_CTRL | {"vf_id": 2}, "vuid: 'VBLKS0D0F2VF2', but pf_id 0 vf_id 2 is VBLKS0D0F2VF3"),
    ("ctrl", "VBLKS0D0F2VF2", {k: v for k, v in GOOD_CTRL.items() if k != "vf_id"},
     "but pf_id 0 is VBLKS0D0F2"),
    ("ctrl", "VBLKS0D0F2VF2", GOOD_CTRL | {"bdf_raw": 0xB002}, "bdf_raw: 45058, but VBLKS0D0F2VF2 is at 45057"),
    ("ctrl", "VBLKS0D0F2VF2", GOOD_CTRL | {"name": "VblkEmu1pf0vf1"}, "name: 'VblkEmu1pf0vf1', but the controller"),
    ("ctrl", "VBLKS0D0F2VF2", GOOD_CTRL | {"emulation_manager": "eth0"}, "emulation_manager: 'eth0' is not mlx5_<n>"),
    ("ctrl", "VBLKS0D0F2VF2", GOOD_CTRL | {"pf_id": 16}, "pf_id: 16 is out of range (0..15)"),
    ("ctrl", "VBLKS0D0F2VF2", GOOD_CTRL | {"queue_size": 100}, "queue_size: 100 is not a power of 2"),
    ("ctrl", "VBLKS0D0F2VF2", GOOD_CTRL | {"num_queues": 65}, "num_queues: 65 is out of range (1..64)"),
    ("ctrl", "VBLKS0D0F2VF2", GOOD_CTRL | {"admin_q": 1}, "admin_q: must be true or false"),
    ("ctrl", "VBLKS0D0F2VF2", GOOD_CTRL | {"bdev": "../x"}, "bdev: '../x' is not a bdev name"),
    ("ctrl", "VBLKS0D0F2VF2", GOOD_CTRL | {"bdev": "Other"},
     "names bdev Other, which has no recovery file (blk/bdevs/Other.json)"),
])
def test_bad_files_are_problems_and_lose_nothing_else(tmp_path, store, image, kind, stem, content, needle):
    populate(registry(tmp_path, store), image)          # three good bdevs and controllers
    if kind == "ctrl" or stem != "Null0":
        write(store, "bdev", "Null0", GOOD_BDEV)        # the bdev GOOD_CTRL names (replaces populate's)
    if kind == "bdev":
        write(store, "ctrl", "VBLKS0D0F2VF2", GOOD_CTRL)
    write(store, kind, stem, content)
    before = files(store)
    loaded = store.load("blk")
    msgs = [p.message for p in loaded.problems]
    what = "bdevs" if kind == "bdev" else "controllers"
    assert any(needle in m for m in msgs), msgs
    bad = [m for m in msgs if needle in m][0]
    assert bad.startswith(f"recovery file blk/{what}/{stem}.json "), bad
    assert f"delete it ({blk_dir(store) / what / (stem + '.json')}) and restart" in bad, bad
    # the others still load; nothing was changed on disk
    assert {"Aio0", "M0"} <= {b.name for b in loaded.bdevs}
    assert {"VBLKS0D0F2VF10", "VBLKS0D0F3"} <= {c.vuid for c in loaded.controllers}
    assert files(store) == before


def test_controller_on_a_bad_bdev_file_is_a_problem_too(store):
    write(store, "bdev", "Null0", GOOD_BDEV | {"block_size": 3})
    write(store, "ctrl", "VBLKS0D0F2VF2", GOOD_CTRL)
    msgs = sorted(p.message for p in store.load("blk").problems)
    assert len(msgs) == 2
    assert "blk/bdevs/Null0.json is invalid (block_size" in msgs[0]
    assert "blk/controllers/VBLKS0D0F2VF2.json names bdev Null0, whose recovery file is invalid" in msgs[1]


def test_two_controllers_on_one_bdev_are_both_restored(tmp_path, store):
    """The seed's PF and VF on Null0: both come back, on one storage."""
    write(store, "bdev", "Null0", GOOD_BDEV)
    write(store, "ctrl", "VBLKS0D0F2VF2", GOOD_CTRL)
    write(store, "ctrl", "VBLKS0D0F2", GOOD_CTRL | {"name": "VblkEmu0pf0", "vf_id": None,
                                                   "vuid": "VBLKS0D0F2", "bdf_raw": 0xA000})
    loaded = store.load("blk")
    assert loaded.problems == [] and sorted(c.vuid for c in loaded.controllers) == ["VBLKS0D0F2", "VBLKS0D0F2VF2"]
    daemon = FakeDaemon()
    reg = registry(tmp_path, store, daemon)
    assert reg.restore(loaded) == "1 recovered bdev(s) and 2 blk controller(s)"
    assert sorted(reg.bdevs.by_name["Null0"].users) == ["VblkEmu0pf0", GOOD_CTRL["name"]]
    first, second = daemon.engine.devices
    assert first.storage is second.storage is reg.bdevs.by_name["Null0"].storage


def test_temp_files_and_strays_are_ignored(store):
    write(store, "bdev", "Null0", GOOD_BDEV)
    (store.dir / BDEV_DIR / ".Null0.json.abc.tmp").write_text("{")      # a crash during a write
    (store.dir / BDEV_DIR / "README").write_text("x")
    (store.dir / CONTROLLER_DIR).mkdir()
    (store.dir / CONTROLLER_DIR / "sub.json").mkdir()
    loaded = store.load("blk")
    assert [b.name for b in loaded.bdevs] == ["Null0"] and loaded.problems == []


# -- the virtnet methods -----------------------------------------------------------------

class FakeNetFunction:
    kind = "net"
    vuid, pf_id, vf_id = "VNETS0D0F2", 0, -1

    def list_entry(self):
        return dict(FakeNetKind.entry)


class FakeNetKind:
    """A net kind with one function, whose virtnet answers name it."""

    name = "net"
    numbered_by_virtnet = True
    entry = {"pf_id": 0, "function_type": "static PF", "vuid": "VNETS0D0F2", "bdf": "84:00.2"}

    def methods(self):
        return {}

    def summary(self):
        return {"emulation_manager": "mlx5_0"}

    def in_list_order(self, functions):
        return functions

    def query_entry(self, f, brief):
        return dict(self.entry)

    def modify(self, f, p):
        return {"modified": f.vuid}

    def unplug(self, f, p):
        return {"unplugged": f.vuid}

    def vf_state(self, f, p):
        return {"net": f.vuid}


def test_virtnet_methods_see_blk_functions(tmp_path, store, image):
    """The inventory's list/query/modify/unplug/vf_state with a net function
    and blk ones: each reaches its own kind."""
    inv = Inventory()
    net = FakeNetKind()
    inv.register(net)
    reg = BlkKind(inv, FakeDaemon(), Paths.from_env(run_dir=str(tmp_path / "run")), store, SEED_BLK_LIMITS)
    inv.register(reg)
    inv.add(FakeNetFunction())
    handlers = inv.methods()
    populate(reg, image)
    listed = handlers["list"]({})["devices"]
    assert listed[0] == net.entry                               # the net entry, untouched, first
    assert [d["vuid"] for d in listed] == ["VNETS0D0F2", "VBLKS0D0F2", "VBLKS0D0F3", "VBLKS0D0F2VF10"]

    q = handlers["query"]({"vuid": "VBLKS0D0F2VF10", "brief": True})["devices"]
    assert len(q) == 1 and q[0]["vuid"] == "VBLKS0D0F2VF10" and q[0]["type"] == "virtio_blk"
    assert q[0]["socket"] == str(tmp_path / "run" / "VBLKS0D0F2VF10.sock")
    assert (q[0]["status"], q[0]["negotiated_features"]) == ("not connected", "0x0")
    full = handlers["query"]({"vuid": "VBLKS0D0F2"})["devices"][0]
    assert [qq["type"] for qq in full["queues"]] == ["req"]
    assert [d["vuid"] for d in handlers["query"]({"all": True, "brief": True})["devices"]] == \
        [d["vuid"] for d in listed]
    assert handlers["query"]({"vuid": "VNETS0D0F2"})["devices"] == [net.entry]
    with pytest.raises(InventoryError):
        handlers["query"]({"vuid": "VBLKS0D0F9"})          # neither: "no such device"

    for cmd in ("modify", "unplug"):
        with pytest.raises(InventoryError) as exc:
            handlers[cmd]({"vuid": "VBLKS0D0F2", "mac": "00:00:00:00:00:01"})
        assert exc.value.code == -errno.EOPNOTSUPP
        assert f"VBLKS0D0F2 is a virtio-blk function (VblkEmu0pf0): virtnet {cmd}" in str(exc.value)
        assert handlers[cmd]({"vuid": "VNETS0D0F2"})       # net functions as before
    assert handlers["vf_state"]({"vuid": "VBLKS0D0F2VF10", "op": 6}) == {
        "vuid": "VBLKS0D0F2VF10", "bdf": "b0:01.1", "state": "running", "logging": False, "log_size": 0}
    with pytest.raises(InventoryError) as exc:
        handlers["vf_state"]({"vuid": "VBLKS0D0F2VF10", "op": 2})
    assert exc.value.code == -errno.EOPNOTSUPP and "only 6 (status)" in str(exc.value)
    assert handlers["vf_state"]({"vuid": "VNETS0D0F2", "op": 2}) == {"net": "VNETS0D0F2"}


def test_a_socket_path_too_long_for_a_unix_socket_is_refused(tmp_path, store):
    """The function's socket (<run dir>/<VUID>.sock) must fit a sockaddr_un:
    refused before anything is made, saying what to do."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    inventory = Inventory()
    blk = BlkKind(inventory, FakeDaemon(), Paths.from_env(run_dir=str(deep)), store, SEED_BLK_LIMITS)
    inventory.register(blk)
    blk.bdevs.bdev_null_create({"name": "Null0", "num_blocks": 2048, "block_size": 512})
    with pytest.raises(InventoryError) as err:
        blk.controller_virtio_blk_create({"emu_manager": "mlx5_0", "pf_id": 0, "bdev_type": "spdk",
                                          "bdev": "Null0"})
    assert err.value.code == -errno.ENAMETOOLONG
    assert str(err.value) == (f"socket path {deep}/VBLKS0D0F2.sock is longer than 107 bytes; "
                              f"use a shorter run dir")
    assert inventory.functions == [] and blk.daemon.endpoints == []
