"""vfe-vhostd's methods (vfe/vhostd/service.py) over a fake controller and
fake relays: every result and error the service can return, with the
reference's numbers and texts (dpdk-vhost-vfe drivers/common/virtio/
virtio_util.c, in vfe/vhostd/errors.py), and the reference's result fields."""
from __future__ import annotations

import errno
import selectors

import pytest

from tests.unit.vhostd.vhostd_fakes import FakeController, FakeRelay, pf, vf
from vfe.rpc.client import RpcConnectionError
from vfe.rpc.protocol import RpcError
from vfe.vhostd.controller_client import Controller
from vfe.vhostd.errors import ERR_STRINGS, VdpaError, errstr
from vfe.vhostd.features import feature_info
from vfe.vhostd.relay import Relay, RelayError
from vfe.vhostd.service import VhostService, parse_bdf

PF0, PF1 = "0000:84:00.2", "0000:84:00.3"
VF0, VF1, VF_OF_PF1 = "0000:90:00.0", "0000:90:00.1", "0000:91:00.0"


@pytest.fixture
def ctl():
    return FakeController([
        pf(0, "84:00.2", "VNETS0D0F2"), pf(1, "84:00.3", "VNETS0D0F3"),
        pf(2, "85:00.0", "VNETS1D0F0", kind="hotplug PF"),
        vf(0, 0, "90:00.0", "VNETS0D0F2VF1"), vf(0, 1, "90:00.1", "VNETS0D0F2VF2", mac="0c:c4:7a:ff:22:93"),
        vf(1, 0, "91:00.0", "VNETS0D0F3VF1"),
    ])


@pytest.fixture
def svc(ctl):
    FakeRelay.instances = []
    FakeRelay.fail_with = None
    sel = selectors.DefaultSelector()
    yield VhostService(ctl, sel, client=True, relay_factory=FakeRelay)
    sel.close()


def err(code):
    return {"errno": code, "errstr": errstr(code)}


OK = {"errno": 0, "errstr": "Success"}


def test_error_table_is_the_references():
    assert len(ERR_STRINGS) == 43                      # VFE_VDPA_ERR_BASE .. VFE_VDPA_ERR_MAX_NUM - 1
    expected = {1000: "Please provide PF name", 1001: "PF device not found", 1002: "Please provide VF name",
                1003: "VF device not found", 1007: "Devargs parse fail", 1008: "PF device already add",
                1010: "PF deviceid not support",
                1013: "Please remove all VF devices before remove PF", 1014: "VF device already add",
                1029: "Exceed vport limit", 1030: "Can't access vhost socket path",
                1036: "Fail in calling rte_vhost_driver_start", 1038: "Vhost socket file already exists",
                1042: "VF device is restoring"}
    for code, text in expected.items():
        assert errstr(-code) == text and errstr(code) == text
    assert errstr(0) == "Success"
    assert errstr(-errno.ENODEV) == "No such device"
    assert errstr(-errno.EOPNOTSUPP) == "Operation not supported"
    assert errstr(-errno.ECONNREFUSED) == "Connection refused"
    assert errstr(-1043) == "Unknown error" and errstr(-999) == "Unknown error"


def test_bdf_forms():
    assert parse_bdf("84:00.2") == parse_bdf("0000:84:00.2") == parse_bdf("0000:84:0.2") == PF0
    assert parse_bdf("AF:04.5") == "0000:af:04.5"
    for bad in ("", "84:00", "84:00.8", "84:20.1", "x", "1:2:3:4.5"):
        with pytest.raises(Exception):
            parse_bdf(bad)


# -- mgmtpf -------------------------------------------------------------------------

def test_mgmtpf_add_list_remove(svc):
    assert svc.mgmtpf({"list": True}, 1) == err(-1001)              # none yet
    assert svc.mgmtpf({"add": True, "dev": PF0}, 1) == OK
    assert svc.mgmtpf({"add": True, "dev": "84:00.3"}, 2) == OK      # bus:slot.func works too
    assert svc.mgmtpf({"add": True, "dev": "85:00.0"}, 2) == OK      # a hot-plugged PF
    assert svc.mgmtpf({"list": True}, 3) == {"devices": [{"pf": PF0}, {"pf": PF1}, {"pf": "0000:85:00.0"}],
                                             **OK}
    assert svc.mgmtpf({"add": True, "dev": PF0}, 4) == err(-1008)
    assert svc.mgmtpf({"remove": True, "dev": "0000:85:00.0"}, 5) == OK
    assert svc.mgmtpf({"remove": True, "dev": "0000:85:00.0"}, 5) == err(-1001)
    assert list(svc.mgmtpf({"list": True}, 3)) == ["devices", "errno", "errstr"]     # the reference's order


def test_mgmtpf_errors(svc, ctl):
    assert svc.mgmtpf({"add": True, "dev": "0000:99:00.0"}, 1) == err(-errno.ENODEV)
    assert svc.mgmtpf({"add": True, "dev": "0001:84:00.2"}, 1) == err(-errno.ENODEV)
    assert svc.mgmtpf({"add": True, "dev": VF0}, 1) == err(-1010)
    assert svc.mgmtpf({"add": True, "dev": "not-a-bdf"}, 1) == err(-errno.EINVAL)
    assert svc.mgmtpf({"add": True, "dev": ""}, 1) == err(-1000)
    assert svc.mgmtpf({"add": True, "dev": None}, 1) == err(-1000)
    assert svc.mgmtpf({"remove": True, "dev": None}, 1) == err(-1000)
    for bad in ({"add": True}, {"remove": True}, {}, {"dev": PF0}, [], None):
        assert svc.mgmtpf(bad, 7) == {"Error": "Invalid pf parameters in RPC message", "id": 7}
    ctl.down = True
    assert svc.mgmtpf({"add": True, "dev": PF0}, 1) == err(-errno.ECONNREFUSED)


def test_mgmtpf_remove_with_vfs(svc):
    svc.mgmtpf({"add": True, "dev": PF0}, 1)
    assert svc.vf({"add": True, "vfdev": VF0, "socket_file": "/tmp/vfe-net0"}, 2) == OK
    assert svc.mgmtpf({"remove": True, "dev": PF0}, 3) == err(-1013)
    assert svc.vf({"remove": True, "vfdev": VF0}, 4) == OK
    assert svc.mgmtpf({"remove": True, "dev": PF0}, 5) == OK


# -- vf -a / -r ----------------------------------------------------------------------

def test_vf_add_and_remove(svc):
    svc.mgmtpf({"add": True, "dev": PF0}, 1)
    assert svc.vf({"add": True, "vfdev": VF0, "socket_file": "/tmp/vfe-net0", "uuid": None}, 2) == OK
    relay = FakeRelay.instances[-1]
    assert (relay.socket_path, relay.endpoint, relay.client) == ("/tmp/vfe-net0", "/run/VNETS0D0F2VF1.sock", True)
    assert svc.vfs[VF0].vuid == "VNETS0D0F2VF1"
    assert svc.vf({"remove": True, "vfdev": "90:00.0"}, 3) == OK
    assert relay.closed == "disconnect" and VF0 not in svc.vfs
    assert svc.vf({"remove": True, "vfdev": VF0}, 4) == err(-1003)


def test_vf_socket_path_rules(svc, ctl, tmp_path, monkeypatch):
    monkeypatch.setenv("VFE_ROOT", str(tmp_path))
    svc.mgmtpf({"add": True, "dev": PF0}, 1)
    svc.vf({"add": True, "vfdev": VF0}, 2)          # root's run dir, not /tmp (issue 11)
    assert FakeRelay.instances[-1].socket_path == f"{tmp_path}/run/vfe-vhostd/vf-0000:90:00.0"
    svc.iface = "/tmp/vhost-user-"
    svc.vf({"add": True, "vfdev": VF1, "socket_file": None}, 2)
    assert FakeRelay.instances[-1].socket_path == "/tmp/vhost-user-0000:90:00.1"


def test_vf_add_errors(svc, ctl):
    assert svc.vf({"add": True, "vfdev": VF0, "socket_file": "/tmp/a"}, 1) == err(-1001)   # PF not managed
    svc.mgmtpf({"add": True, "dev": PF0}, 1)
    assert svc.vf({"add": True, "vfdev": VF_OF_PF1, "socket_file": "/tmp/a"}, 1) == err(-1001)
    assert svc.vf({"add": True, "vfdev": PF0, "socket_file": "/tmp/a"}, 1) == err(-1001)   # a PF has no PF
    assert svc.vf({"add": True, "vfdev": "0000:90:07.7", "socket_file": "/tmp/a"}, 1) == err(-errno.ENODEV)
    assert svc.vf({"add": True, "vfdev": "", "socket_file": "/tmp/a"}, 1) == err(-1002)
    assert svc.vf({"add": True, "vfdev": None}, 1) == err(-1002)
    assert svc.vf({"add": True, "vfdev": "bogus"}, 1) == err(-errno.EINVAL)
    assert svc.vf({"add": True, "vfdev": VF0, "uuid": "not-a-uuid"}, 1) == err(-1007)
    assert svc.vf({"add": True, "vfdev": VF0, "socket_file": "/tmp/a"}, 1) == OK
    # the same VF again: on its own socket the reference answers "socket exists" first
    assert svc.vf({"add": True, "vfdev": VF0, "socket_file": "/tmp/a"}, 1) == err(-1038)
    assert svc.vf({"add": True, "vfdev": VF0, "socket_file": "/tmp/b"}, 1) == err(-1014)
    assert svc.vf({"add": True, "vfdev": VF1, "socket_file": "/tmp/a"}, 1) == err(-1038)
    # what the relay reports (socket path, controller endpoint, refused HELLO) is the result
    for code in (-1030, -errno.ENOENT, -errno.ECONNREFUSED, -errno.EPERM, -errno.ENAMETOOLONG):
        FakeRelay.fail_with = RelayError(code, "x")
        assert svc.vf({"add": True, "vfdev": VF1, "socket_file": "/tmp/c"}, 1) == err(code)
        assert VF1 not in svc.vfs
    FakeRelay.fail_with = None
    ctl.down = True
    assert svc.vf({"add": True, "vfdev": VF1, "socket_file": "/tmp/c"}, 1) == err(-errno.ECONNREFUSED)
    for bad in ({"add": True}, {"remove": True}, {"list": True}, {"info": True}, {"debug": True}, {}, None):
        assert svc.vf(bad, 9) == {"Error": "Invalid vf parameters in RPC message", "id": 9}


def test_vf_add_with_vm_uuid(svc):
    svc.mgmtpf({"add": True, "dev": PF0}, 1)
    u = "CDC786F0-59D4-41D9-B554-FED36FF5E89F"
    assert svc.vf({"add": True, "vfdev": VF0, "socket_file": "/tmp/a", "uuid": u}, 2) == OK
    assert svc.vf({"info": True, "vfdev": VF0}, 3)["device"]["vm_uuid"] == u.lower()


# -- vf -l / -i / -d -----------------------------------------------------------------

def test_vf_list_and_info_fields(svc, ctl):
    assert svc.vf({"list": True, "mgmtpf": PF0}, 1) == err(-1001)
    assert svc.vf({"list": True, "mgmtpf": None}, 1) == err(-1000)
    svc.mgmtpf({"add": True, "dev": PF0}, 1)
    assert svc.vf({"list": True, "mgmtpf": PF0}, 1) == OK            # no VFs: no "devices"
    svc.vf({"add": True, "vfdev": VF1, "socket_file": "/tmp/vfe-net1"}, 2)
    ctl.status["VNETS0D0F2VF2"] = "running"
    ctl.features["VNETS0D0F2VF2"] = "0x130000021"
    info = svc.vf({"info": True, "vfdev": VF1}, 3)
    assert list(info) == ["device", "errno", "errstr"] and info["errno"] == 0
    d = info["device"]
    assert list(d) == ["vf", "probed", "msix_num", "queue_num", "queue_size", "device_feature", "mtu", "mac",
                       "vm_uuid", "socket_file", "configured"]
    assert d == {"vf": VF1, "probed": True, "msix_num": "64", "queue_num": "62", "queue_size": "1024",
                 "device_feature": {"value": "0x130000021", "    0": "VIRTIO_NET_F_CSUM",
                                    "    5": "VIRTIO_NET_F_MAC", "   28": "VIRTIO_RING_F_INDIRECT_DESC",
                                    "   29": "VIRTIO_RING_F_EVENT_IDX", "   32": "VIRTIO_F_VERSION_1"},
                 "mtu": "1500", "mac": "0C:C4:7A:FF:22:93", "vm_uuid": "00000000-0000-0000-0000-000000000000",
                 "socket_file": "/tmp/vfe-net1", "configured": True}
    lst = svc.vf({"list": True, "mgmtpf": "84:00.2"}, 4)
    assert lst == {"devices": [d], **OK}
    assert svc.vf({"info": True, "vfdev": VF0}, 5) == err(-1003)
    assert svc.vf({"info": True, "vfdev": ""}, 5) == err(-1002)
    # the controller unreachable: the reference's short form for a VF it cannot probe
    ctl.down = True
    short = {"vf": VF1, "probed": False, "vm_uuid": "00000000-0000-0000-0000-000000000000",
             "socket_file": "/tmp/vfe-net1"}
    assert svc.vf({"info": True, "vfdev": VF1}, 6) == {"device": short, **OK}
    assert svc.vf({"list": True, "mgmtpf": PF0}, 7) == {"devices": [short], **OK}


def test_feature_info_unknown_bits():
    assert feature_info(0) == {"value": "0x0"}
    assert feature_info(1 << 2 | 1 << 22) == {"value": "0x400004", "    2": "UNKNOWN FEATURE BIT",
                                               "   22": "VIRTIO_NET_F_MQ"}


def test_vf_debug(svc, ctl):
    svc.mgmtpf({"add": True, "dev": PF0}, 1)
    assert svc.vf({"debug": True, "vfdev": VF0, "test_operation": 1}, 2) == {"Error": "Fail to find VF device"}
    svc.vf({"add": True, "vfdev": VF0, "socket_file": "/tmp/a"}, 2)
    assert svc.vf({"debug": True, "vfdev": VF0, "test_operation": 2}, 3) == {"Success": VF0}
    assert ctl.lm_state["VNETS0D0F2VF1"] == "quiesced"
    six = svc.vf({"debug": True, "vfdev": VF0, "test_operation": 6}, 3)
    assert six == {"device": {"vf": VF0, "lm_status": "2"}, "Success": VF0} and list(six) == ["device", "Success"]
    assert svc.vf({"debug": True, "vfdev": VF0, "test_operation": 3}, 3) == {"Success": VF0}
    assert svc.vf({"debug": True, "vfdev": VF0, "test_operation": 6}, 3)["device"]["lm_status"] == "3"
    assert svc.vf({"debug": True, "vfdev": "90:00.0", "test_operation": 1}, 3) == {"Success": VF0}
    assert svc.vf({"debug": True, "vfdev": VF0, "test_operation": 4, "size_mode": 1}, 4) == \
        {"Error": "Fail to debug VF device", "errno": -61, "errstr": "No data available"}
    ctl.down = True
    assert svc.vf({"debug": True, "vfdev": VF0, "test_operation": 1}, 4) == \
        {"Error": "Fail to debug VF device", "errno": -111, "errstr": "Connection refused"}
    ctl.down = False
    for op in (0, 7, None, "1", True):
        assert svc.vf({"debug": True, "vfdev": VF0, "test_operation": op}, 5) == \
            {"Error": "Invalid vf parameters in RPC message", "id": 5}


def test_version(svc, ctl):
    v = svc.version({}, 1)
    assert list(v) == ["vfe-vhostd version", "vfe-vhostd build time", "vfe-vhostd-ha version",
                       "vfe-vhostd-ha build time", "errno", "errstr"]
    assert v["vfe-vhostd-ha version"] == "virtio-net-controller 9.9.9" and v["errno"] == 0
    ctl.down = True
    v = svc.version({}, 1)
    assert v["vfe-vhostd-ha version"] == "Not Known Due to HA Disconnected" and v["errno"] == 0


# -- a VF that goes away ---------------------------------------------------------------

def test_vf_gone_is_forgotten_and_must_be_provisioned_again(svc, ctl):
    svc.mgmtpf({"add": True, "dev": PF0}, 1)
    svc.vf({"add": True, "vfdev": VF0, "socket_file": "/tmp/a"}, 2)
    relay = FakeRelay.instances[-1]
    assert relay.vf_exists() is True
    ctl.functions_ = [f for f in ctl.functions_ if f["function_type"] != "VF"]     # SR-IOV disabled
    assert relay.vf_exists() is False
    relay.on_gone(relay, "destroyed")
    assert relay.closed == "disconnect" and VF0 not in svc.vfs
    assert svc.vf({"list": True, "mgmtpf": PF0}, 3) == OK
    ctl.down = True
    assert relay.vf_exists() is None                     # unknown, not gone


def test_close_hands_front_ends_to_the_controller(svc):
    svc.mgmtpf({"add": True, "dev": PF0}, 1)
    svc.vf({"add": True, "vfdev": VF0, "socket_file": "/tmp/a"}, 2)
    svc.close()
    assert FakeRelay.instances[-1].closed == "handoff" and not svc.vfs


def test_real_relay_factory_signature_matches(ctl):
    """VhostService builds relays with Relay's real signature."""
    import inspect
    params = inspect.signature(Relay).parameters
    assert list(params)[:5] == ["name", "socket_path", "endpoint", "client", "sel"]
    assert {"vf_exists", "on_gone"} <= set(params)


def test_controller_errors_become_errnos(monkeypatch):
    c = Controller("/nonexistent/virtnet.sock", timeout=1)
    with pytest.raises(VdpaError) as e:
        c.functions()
    assert e.value.code == -errno.ENOENT                 # no controller socket
    for raised, code in ((RpcError(-32601, "Method not found: vf_state"), -errno.EOPNOTSUPP),
                         (RpcError(-19, "no such device"), -errno.ENODEV),
                         (RpcError(-32602, "Invalid params"), -errno.EIO),
                         (RpcConnectionError(-errno.ECONNREFUSED, "x"), -errno.ECONNREFUSED)):
        def boom(*a, _r=raised, **k):
            raise _r
        monkeypatch.setattr("vfe.vhostd.controller_client.call", boom)
        with pytest.raises(VdpaError) as e:
            c.vf_state("VNETS0D0F2VF1", 2)
        assert e.value.code == code


# -- virtio-blk functions (the seed's "Provision the virtio-blk PF") -----------------

BLK_PF, BLK_VF = "0000:a0:00.0", "0000:b0:00.0"


def blk(entry: dict) -> dict:
    """A blk function's `virtnet list` entry: "type" and the blk fields, no net ones."""
    out = {k: v for k, v in entry.items() if not k.startswith("net_") and k != "num_msix"}
    return out | {"type": "virtio_blk", "blk_bdev": "Null0"}


def test_blk_vf_is_provisioned_under_the_blk_pf_of_its_pf_id(ctl):
    ctl.functions_ += [blk(pf(0, "a0:00.0", "VBLKS0D0F2")), blk(vf(0, 0, "b0:00.0", "VBLKS0D0F2VF1"))]
    FakeRelay.instances = []
    FakeRelay.fail_with = None
    sel = selectors.DefaultSelector()
    try:
        svc = VhostService(ctl, sel, client=True, relay_factory=FakeRelay)
        # the net PF 0 is managed: it is not the blk VF's PF, although both have pf_id 0
        assert svc.mgmtpf({"add": True, "dev": PF0}, 1) == OK
        assert svc.vf({"add": True, "vfdev": BLK_VF, "socket_file": "/tmp/vfe-blk0"}, 2) == err(-1001)
        assert svc.mgmtpf({"add": True, "dev": BLK_PF}, 3) == OK
        assert svc.mgmtpf({"list": True}, 4)["devices"] == [{"pf": PF0}, {"pf": BLK_PF}]
        assert svc.vf({"add": True, "vfdev": BLK_VF, "socket_file": "/tmp/vfe-blk0"}, 5) == OK
        relay = FakeRelay.instances[-1]
        assert (relay.socket_path, relay.endpoint) == ("/tmp/vfe-blk0", "/run/VBLKS0D0F2VF1.sock")
        assert svc.vfs[BLK_VF].pf == BLK_PF
        # and the net VF 0 of pf_id 0 still goes under the net PF
        assert svc.vf({"add": True, "vfdev": VF0, "socket_file": "/tmp/vfe-net0"}, 6) == OK
        assert svc.vfs[VF0].pf == PF0
        assert svc.vf({"list": True, "mgmtpf": BLK_PF}, 7)["devices"][0]["vf"] == BLK_VF
        # vf -i names a blk device's feature bits as virtio-blk's
        ctl.features["VBLKS0D0F2VF1"] = hex(1 << 6 | 1 << 9 | 1 << 32)
        d = svc.vf({"info": True, "vfdev": BLK_VF}, 8)["device"]
        assert d["device_feature"] == {"value": "0x100000240", "    6": "VIRTIO_BLK_F_BLK_SIZE",
                                       "    9": "VIRTIO_BLK_F_FLUSH", "   32": "VIRTIO_F_VERSION_1"}
        assert (d["mtu"], d["mac"], d["queue_num"]) == ("0", "", "62")
        assert svc.mgmtpf({"remove": True, "dev": BLK_PF}, 9) == err(-1013)
    finally:
        sel.close()
