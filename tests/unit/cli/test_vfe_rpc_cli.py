"""vfe.cli.vfe_rpc: the seed's spdk_rpc.py / snap_rpc.py command lines ->
RPC method and params; and, through a real RPC socket, the verbs of the
blk kind (vfe.controller.blk_kind, bdevs) on a fake daemon and engine
(output, error codes, the EBUSY of a bdev in use)."""
import errno
import json
import selectors
import threading
import types

import pytest

from vfe.cli import vfe_rpc
from vfe.controller.blk_kind import BlkKind
from vfe.controller.blk_recovery import BlkCodec
from vfe.controller.inventory import Inventory
from vfe.controller.kind import InventoryError
from vfe.controller.paths import Paths
from vfe.controller.recovery import RecoveryStore
from vfe.rpc import RpcError, RpcServer
from tests.unit.blk_fakes import SEED_BLK_LIMITS, FakeDaemon




def req(line: str):
    _, method, params = vfe_rpc.build_request(line.split())
    return method, params


# -- argv -> (method, params) ---------------------------------------------------

@pytest.mark.parametrize("line,method,params", [
    ("bdev_null_create Null0 1024 512", "bdev_null_create",
     {"name": "Null0", "num_blocks": 2097152, "block_size": 512}),
    ("bdev_null_create N 64 4096", "bdev_null_create",
     {"name": "N", "num_blocks": 16384, "block_size": 4096}),
    ("bdev_malloc_create 64 512", "bdev_malloc_create", {"num_blocks": 131072, "block_size": 512}),
    ("bdev_malloc_create 64 512 -b M0", "bdev_malloc_create",
     {"num_blocks": 131072, "block_size": 512, "name": "M0"}),
    ("bdev_aio_create /dev/sdb Aio0", "bdev_aio_create", {"filename": "/dev/sdb", "name": "Aio0"}),
    ("bdev_aio_create /tmp/f Aio0 4096", "bdev_aio_create",
     {"filename": "/tmp/f", "name": "Aio0", "block_size": 4096}),
    ("bdev_aio_create /tmp/f Aio0 --direct", "bdev_aio_create",
     {"filename": "/tmp/f", "name": "Aio0", "direct": True}),
    ("bdev_get_bdevs", "bdev_get_bdevs", {}),
    ("bdev_get_bdevs -b Null0", "bdev_get_bdevs", {"name": "Null0"}),
    ("bdev_null_delete Null0", "bdev_null_delete", {"name": "Null0"}),
    ("bdev_malloc_delete Malloc0", "bdev_malloc_delete", {"name": "Malloc0"}),
    ("bdev_aio_delete Aio0", "bdev_aio_delete", {"name": "Aio0"}),
    # the seed's two forms
    ("controller_virtio_blk_create mlx5_0 --pf_id 0 --bdev_type spdk --bdev Null0 --num_queues 1 --admin_q",
     "controller_virtio_blk_create",
     {"emu_manager": "mlx5_0", "pf_id": 0, "bdev_type": "spdk", "bdev": "Null0", "num_queues": 1,
      "admin_q": True}),
    ("controller_virtio_blk_create mlx5_0 --pf_id 0 --vf_id 0 --bdev_type spdk --bdev Null0 "
     "--num_queues 1 --admin_q --force_in_order", "controller_virtio_blk_create",
     {"emu_manager": "mlx5_0", "pf_id": 0, "vf_id": 0, "bdev_type": "spdk", "bdev": "Null0",
      "num_queues": 1, "admin_q": True, "force_in_order": True}),
    ("controller_virtio_blk_create mlx5_1 --pf_id 2 --bdev_type spdk --bdev M --queue_size 256",
     "controller_virtio_blk_create",
     {"emu_manager": "mlx5_1", "pf_id": 2, "bdev_type": "spdk", "bdev": "M", "queue_size": 256}),
    ("controller_list", "controller_list", {}),
    ("controller_list -c VblkEmu0pf0", "controller_list", {"name": "VblkEmu0pf0"}),
    ("controller_virtio_blk_delete VblkEmu0pf0", "controller_virtio_blk_delete", {"name": "VblkEmu0pf0"}),
    ("controller_virtio_blk_delete VBLKS0D0F2 --force", "controller_virtio_blk_delete",
     {"name": "VBLKS0D0F2", "force": True}),
])
def test_argv_maps_to_rpc(line, method, params):
    assert req(line) == (method, params)


@pytest.mark.parametrize("line", [
    "bdev_null_create Null0 1024",                       # block size missing
    "bdev_null_create Null0 0 512",
    "bdev_null_create Null0 x 512",
    "controller_virtio_blk_create mlx5_0 --bdev_type spdk --bdev N",         # no --pf_id
    "controller_virtio_blk_create mlx5_0 --pf_id 0 --bdev N",                # no --bdev_type
    "controller_virtio_blk_create mlx5_0 --pf_id 0 --bdev_type none --bdev N",
    "controller_virtio_blk_create mlx5_0 --pf_id -1 --bdev_type spdk --bdev N",
    "controller_virtio_blk_delete",
    "no_such_verb",
])
def test_bad_arguments_exit_2(line, capsys):
    with pytest.raises(SystemExit) as exc:
        vfe_rpc.build_request(line.split())
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_every_verb_has_help(capsys):
    with pytest.raises(SystemExit):
        vfe_rpc.main(["-h"])
    out = capsys.readouterr().out
    for verb in ("bdev_null_create", "bdev_malloc_create", "bdev_aio_create", "bdev_get_bdevs",
                 "bdev_null_delete", "bdev_malloc_delete", "bdev_aio_delete",
                 "controller_virtio_blk_create", "controller_list", "controller_virtio_blk_delete"):
        assert verb in out


# -- the registry behind a real socket ------------------------------------------

class Service:
    """control.py's dispatch of the inventory's method table: methods[method](params),
    InventoryError -> RpcError; no recovery files."""

    def __init__(self, path, run_dir):
        self.daemon = FakeDaemon()
        self.inventory = Inventory()
        self.blk = BlkKind(self.inventory, self.daemon, Paths.from_env(run_dir=run_dir),
                           RecoveryStore(run_dir, [BlkCodec()], enabled=False), SEED_BLK_LIMITS)
        self.inventory.register(self.blk)
        self.handlers = self.inventory.methods()
        self.sel = selectors.DefaultSelector()
        self.server = RpcServer(path, self.handle, self.sel)
        self.path = path
        self.stopping = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def handle(self, method, params):
        fn = self.handlers.get(method)
        if fn is None:
            raise RpcError.method_not_found(method)
        try:
            return fn(params or {})
        except InventoryError as exc:
            raise RpcError(exc.code, str(exc)) from None

    def run(self):
        while not self.stopping:
            for key, _ in self.sel.select(0.05):
                if key.data[0] == "rpc":
                    key.data[1].on_readable()

    def stop(self):
        self.stopping = True
        self.thread.join(5)
        self.server.close()
        self.sel.close()


@pytest.fixture
def svc(tmp_path):
    s = Service(str(tmp_path / "virtnet.sock"), str(tmp_path / "run"))
    yield s
    s.stop()


def rpc(capsys, svc, line):
    rc = vfe_rpc.main(["-s", svc.path, *line.split()])
    out, err = capsys.readouterr()
    return rc, out, err


def ok(capsys, svc, line):
    rc, out, err = rpc(capsys, svc, line)
    assert (rc, err) == (0, ""), err
    return json.loads(out) if out else None


def fails(capsys, svc, line, code):
    rc, out, err = rpc(capsys, svc, line)
    assert rc == 1 and out == ""
    assert "Got JSON-RPC error response" in err
    resp = json.loads(err.split("response:\n", 1)[1])
    assert resp["code"] == code, resp
    return resp["message"]


def test_seed_commands_then_delete(capsys, svc, tmp_path):
    assert ok(capsys, svc, "bdev_null_create Null0 1024 512") == "Null0"
    assert ok(capsys, svc, "bdev_get_bdevs") == [
        {"name": "Null0", "product_name": "Null disk", "block_size": 512, "num_blocks": 2097152,
         "claimed": False}]
    made = ok(capsys, svc, "controller_virtio_blk_create mlx5_0 --pf_id 0 --bdev_type spdk "
                           "--bdev Null0 --num_queues 1 --admin_q")
    sock = str(tmp_path / "run" / "VBLKS0D0F2.sock")
    assert made == {"name": "VblkEmu0pf0", "vuid": "VBLKS0D0F2", "pci_bdf": "a0:00.0", "socket": sock}
    dev = svc.daemon.engine.devices[0]
    assert (dev.queues, dev.capacity, dev.block_size, dev.storage.kind) == (1, 1 << 30, 512, "null")
    assert [ep.path for ep in svc.daemon.endpoints] == [sock]
    listed = ok(capsys, svc, "controller_list")
    assert [(c["name"], c["vuid"], c["pci_bdf"], c["bdev"], c["admin_q"], c["force_in_order"])
            for c in listed] == [("VblkEmu0pf0", "VBLKS0D0F2", "a0:00.0", "Null0", True, False)]
    assert ok(capsys, svc, "bdev_get_bdevs -b Null0")[0]["claimed"] is True

    msg = fails(capsys, svc, "bdev_null_delete Null0", -errno.EBUSY)
    assert "in use by controller VblkEmu0pf0" in msg
    # several functions on one bdev (as SPDK allows): the bdev stays in use until the last goes
    ok(capsys, svc, "controller_virtio_blk_create mlx5_0 --pf_id 1 --bdev_type spdk --bdev Null0")
    assert ok(capsys, svc, "bdev_get_bdevs -b Null0")[0]["claimed_by"] == ["VblkEmu0pf0", "VblkEmu0pf1"]
    assert svc.daemon.engine.devices[1].storage is dev.storage      # the same storage
    msg = fails(capsys, svc, "bdev_null_delete Null0", -errno.EBUSY)
    assert "in use by controllers VblkEmu0pf0, VblkEmu0pf1" in msg
    assert rpc(capsys, svc, "controller_virtio_blk_delete VblkEmu0pf1") == (0, "", "")

    assert rpc(capsys, svc, "controller_virtio_blk_delete VBLKS0D0F2") == (0, "", "")   # by VUID
    assert svc.daemon.endpoints == []
    assert ok(capsys, svc, "controller_list") == []
    assert rpc(capsys, svc, "bdev_null_delete Null0") == (0, "", "")
    assert ok(capsys, svc, "bdev_get_bdevs") == []


def test_vf_identity_and_errors(capsys, svc):
    assert ok(capsys, svc, "bdev_malloc_create 64 4096") == "Malloc0"
    assert ok(capsys, svc, "bdev_malloc_create 16 512") == "Malloc1"
    vf = ok(capsys, svc, "controller_virtio_blk_create mlx5_0 --pf_id 0 --vf_id 0 --bdev_type spdk "
                         "--bdev Malloc0 --num_queues 4 --force_in_order")
    assert (vf["name"], vf["vuid"], vf["pci_bdf"]) == ("VblkEmu0pf0vf0", "VBLKS0D0F2VF1", "b0:00.0")
    pf = ok(capsys, svc, "controller_virtio_blk_create mlx5_0 --pf_id 3 --bdev_type spdk --bdev Malloc1")
    assert (pf["vuid"], pf["pci_bdf"]) == ("VBLKS0D0F5", "a3:00.0")
    fails(capsys, svc, "bdev_malloc_delete Malloc0", -errno.EBUSY)
    assert "bdev_malloc_delete" in fails(capsys, svc, "bdev_null_delete Malloc1", -errno.ENODEV)
    fails(capsys, svc, "bdev_null_delete Nope", -errno.ENODEV)
    fails(capsys, svc, "bdev_malloc_create 64 512 -b Malloc0", -errno.EEXIST)
    fails(capsys, svc, "bdev_null_create N 1 500", -errno.EINVAL)
    assert "cannot use" in fails(capsys, svc, "bdev_aio_create /nonexistent/x Aio0", -errno.ENOENT)
    fails(capsys, svc, "controller_virtio_blk_create mlx5_0 --pf_id 0 --bdev_type spdk --bdev Gone",
          -errno.ENODEV)
    fails(capsys, svc, "controller_virtio_blk_create ib0 --pf_id 0 --bdev_type spdk --bdev Malloc1",
          -errno.ENODEV)
    fails(capsys, svc, "controller_virtio_blk_create mlx5_0 --pf_id 16 --bdev_type spdk --bdev X",
          -errno.EINVAL)
    fails(capsys, svc, "controller_virtio_blk_create mlx5_0 --pf_id 1 --bdev_type spdk --bdev X "
                       "--queue_size 100", -errno.EINVAL)
    ok(capsys, svc, "bdev_null_create X 8 512")
    assert "already exists" in fails(
        capsys, svc, "controller_virtio_blk_create mlx5_1 --pf_id 3 --bdev_type spdk --bdev X", -errno.EEXIST)
    fails(capsys, svc, "controller_virtio_blk_delete VblkEmu9pf9", -errno.ENODEV)
    assert ok(capsys, svc, "controller_list -c VBLKS0D0F2VF1")[0]["num_queues"] == 4

    # a bound function needs --force
    f = svc.blk.find("VblkEmu0pf3")
    f.endpoint.session = types.SimpleNamespace(started=True)
    assert "in use by a guest" in fails(capsys, svc, "controller_virtio_blk_delete VblkEmu0pf3", -errno.EBUSY)
    assert rpc(capsys, svc, "controller_virtio_blk_delete VblkEmu0pf3 --force")[0] == 0

    # shutdown closes every function and frees its bdev
    rings = svc.blk.find("VblkEmu0pf0vf0").model.rings
    svc.inventory.shutdown()
    svc.inventory.shutdown()
    assert rings.closed and svc.inventory.functions == [] and svc.daemon.endpoints == []
    assert rpc(capsys, svc, "bdev_malloc_delete Malloc0")[0] == 0


def test_unreachable_controller_is_an_error(capsys, tmp_path):
    rc = vfe_rpc.main(["-s", str(tmp_path / "none.sock"), "bdev_get_bdevs"])
    out, err = capsys.readouterr()
    assert rc == 1 and out == "" and "not found" in err and "JSON-RPC" not in err
