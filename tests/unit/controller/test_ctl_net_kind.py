"""The net kind without an engine: it restores its functions from the typed
records its codec loads (a seed-only file takes vfe's defaults), and it
removes a function's recovery file before the function -- a file that
cannot go leaves the function whole and the error reported."""
import errno
import json
import types

import pytest

from vfe.controller.inventory import Inventory
from vfe.controller.kind import InventoryError
from vfe.controller.net_kind import ALWAYS_OFFERED, NetKind
from vfe.controller.nvconfig import limits
from vfe.controller.recovery import RecoveryStore
from vfe.controller.sf_pool import SfPool
from vfe.controller.virtnet_conf import parse_virtnet_conf
from vfe.devices.net import NET_FEATURES

# the seed's example of a hot-plugged PF: none of vfe's fields
SEED_FILE = {"port_ib_dev": "mlx5_0", "pf_id": 0, "function_type": "pf", "bdf_raw": 0x8500,
             "device_type": "hotplug", "mac": "0c:c4:7a:ff:22:93", "pf_num": 0, "sf_num": 2000, "mq": 1}
NO_STATIC_PFS = {"VIRTIO_NET_EMULATION_NUM_PF": 0}


class FakeRings:
    def __init__(self):
        self.closed, self.paused, self.tap, self.mac = False, False, -1, None

    def set_port_mac(self, mac):
        self.mac = mac

    def set_tap(self, fd):
        self.tap = fd

    def set_paused(self, paused):
        self.paused = paused

    def close(self):
        self.closed = True


class FakeDaemon:
    def __init__(self):
        self.engine = types.SimpleNamespace(new_net_device=lambda n: FakeRings())
        self.endpoints = []

    def add_endpoint(self, model, socket_path, client, name):
        ep = types.SimpleNamespace(name=name, socket=socket_path, session=None)
        self.endpoints.append(ep)
        return ep

    def remove_endpoint(self, ep):
        self.endpoints.remove(ep)


class UndeletableStore(RecoveryStore):
    """A recovery directory whose files cannot be removed."""

    def delete(self, record):
        raise PermissionError(errno.EACCES, "Permission denied")


def service(tmp_path, store_class=RecoveryStore, files=(), nv=NO_STATIC_PFS):
    """A net kind in an inventory, its records restored from ``files``."""
    conf = parse_virtnet_conf("{}")
    store = store_class(tmp_path / "recovery")
    store.dir.mkdir()
    for vuid, data in files:
        (store.dir / f"{vuid}.json").write_text(json.dumps(data))
    pools = {dev: SfPool(tmp_path, total=64, ib_dev=dev) for dev in conf.sf_devices}
    inv = Inventory()
    paths = types.SimpleNamespace(endpoint_socket=lambda vuid: tmp_path / f"{vuid}.sock")
    kind = NetKind(inv, FakeDaemon(), paths, limits(nv), conf, pools, store, None, datapath="switch")
    inv.register(kind)
    store.register(kind.codec)
    loaded = store.load("net")
    assert loaded.problems == []
    summary = kind.restore(loaded)
    return types.SimpleNamespace(inv=inv, kind=kind, store=store, pools=pools, summary=summary)


def test_a_seed_file_restores_with_vfes_defaults(tmp_path):
    svc = service(tmp_path, files=[("VNETS1D0F0", SEED_FILE)])
    assert svc.summary == "0 static PF(s), 16 hot-plug port(s), 1 recovered function(s)"
    [f] = svc.inv.functions
    assert (f.vuid, f.bdf, f.device_type, f.pf_id, f.vf_id, f.sf_num, f.mac) == \
        ("VNETS1D0F0", "85:00.0", "hotplug", 0, -1, 2000, "0c:c4:7a:ff:22:93")
    assert (f.mtu, f.max_queues, f.max_queue_size, f.num_msix, f.features, f.legacy, f.port) == \
        (1500, 2, 256, svc.kind.limits.pf_msix, 0, False, -1)
    assert f.model.features == NET_FEATURES
    assert svc.pools["mlx5_0"].user_of(2000) == "VNETS1D0F0"        # the pool kept its SF


def test_vfes_own_fields_restore_as_recorded(tmp_path):
    data = dict(SEED_FILE, vuid="VNETS1D0F0", mtu=9000, max_queues=5, max_queue_size=1024, num_msix=3,
                features="0x3000", legacy=0, port=0)              # features as the file has them: hex
    svc = service(tmp_path, files=[("VNETS1D0F0", data)])
    [f] = svc.inv.functions
    assert (f.mtu, f.max_queues, f.max_queue_size, f.num_msix, f.features, f.legacy, f.port) == \
        (9000, 5, 1024, 3, 0x3000, False, 0)
    assert f.model.features == NET_FEATURES & (0x3000 | ALWAYS_OFFERED)


def test_unplug_removes_the_file_then_the_function(tmp_path):
    svc = service(tmp_path, files=[("VNETS1D0F0", SEED_FILE)])
    [f] = svc.inv.functions
    rings = f.model.rings
    assert svc.inv.methods()["unplug"]({"vuid": "VNETS1D0F0"})["status"] == "success"
    assert svc.inv.functions == [] and rings.closed and svc.kind.daemon.endpoints == []
    assert not (svc.store.dir / "VNETS1D0F0.json").exists()
    assert svc.pools["mlx5_0"].user_of(2000) is None and 2000 in svc.pools["mlx5_0"].pooled


def test_a_file_that_cannot_go_keeps_its_function(tmp_path):
    """Were the function torn down first, the file left behind would bring
    it back at the next start; so the file goes first, and if it cannot, the
    function stays as it was and the user hears why."""
    svc = service(tmp_path, store_class=UndeletableStore, files=[("VNETS1D0F0", SEED_FILE)])
    [f] = svc.inv.functions
    with pytest.raises(InventoryError, match="VNETS1D0F0: cannot remove its recovery file: .*Permission "
                                             "denied") as exc:
        svc.inv.methods()["unplug"]({"vuid": "VNETS1D0F0"})
    assert exc.value.code == -errno.EACCES
    assert svc.inv.functions == [f] and not f.model.rings.closed and svc.kind.daemon.endpoints == [f.endpoint]
    assert svc.pools["mlx5_0"].user_of(2000) == "VNETS1D0F0"
    assert (svc.store.dir / "VNETS1D0F0.json").exists()


def test_vfs_whose_files_cannot_go_stay(tmp_path):
    svc = service(tmp_path, store_class=UndeletableStore,
                  nv={"VIRTIO_NET_EMULATION_NUM_PF": 1, "SRIOV_EN": 1, "VIRTIO_NET_EMULATION_NUM_VF": 4})
    sriov = svc.inv.methods()["sriov_numvfs"]
    assert sriov({"pf": 0, "num_vfs": 2})["sriov_numvfs"] == 2
    with pytest.raises(InventoryError, match="cannot remove its recovery file"):
        sriov({"pf": 0, "num_vfs": 0})
    assert sriov({"pf": 0})["sriov_numvfs"] == 2
    assert all(not f.model.rings.closed for f in svc.inv.functions)
