"""The net functions' recovery files (net_recovery.NetCodec in the one
RecoveryStore): the seed's fields, atomic writes, validation, conflicts,
compatibility."""
import json
import os

import pytest

from vfe.controller import net_recovery
from vfe.controller.functions import NetFunction
from vfe.controller.net_recovery import NetCodec, RecoveryRecord, check_compat
from vfe.controller.nvconfig import DEFAULTS, NvConfig, limits
from vfe.controller.recovery import RecoveryError, RecoveryStore
from vfe.controller.virtnet_conf import parse_virtnet_conf

SEED_FILE = {"port_ib_dev": "mlx5_0", "pf_id": 0, "function_type": "pf", "bdf_raw": 26624,
             "device_type": "hotplug", "mac": "0c:c4:7a:ff:22:93", "pf_num": 0, "sf_num": 2000, "mq": 1}

NON_LAG = parse_virtnet_conf("{}")
LAG = parse_virtnet_conf('{"is_lag": 1}')


def hotplug(vuid="VNETS1D0F0", **kw):
    d = dict(vuid=vuid, port_ib_dev="mlx5_0", pf_id=0, function_type="pf", bdf_raw=0x6800,
             device_type="hotplug", mac="0c:c4:7a:ff:22:93", pf_num=0, sf_num=2000, mq=1)
    d.update(kw)
    return RecoveryRecord(**d)


def static(pf_id=0, vuid=None, **kw):
    d = dict(device_type="static", pf_id=pf_id, bdf_raw=0x8500 + pf_id, sf_num=1000 + pf_id,
             mac=f"00:11:22:33:44:5{pf_id}")
    d.update(kw)
    return hotplug(vuid or f"VNETS0D0F{pf_id + 2}", **d)


def vf(pf_id=0, vf_id=0, **kw):
    d = dict(function_type="vf", vf_id=vf_id, bdf_raw=0x8000 + 8 * pf_id + vf_id + 1,
             sf_num=3000 + 200 * pf_id + vf_id, mac="00:11:22:33:55:00")
    d.update(kw)
    return static(pf_id, vuid=f"VNETS0D0F{pf_id + 2}VF{vf_id + 1}", **d)


@pytest.fixture
def store(tmp_path):
    return RecoveryStore(tmp_path / "recovery", [NetCodec()])


def test_seed_file_loads(store):
    store.dir.mkdir(parents=True)
    (store.dir / "VNETS1D0F0.json").write_text(json.dumps(SEED_FILE, indent=2))
    records, problems = store.load("net")
    assert problems == []
    [r] = records
    assert r.vuid == "VNETS1D0F0" and r.bdf == "68:00.0" and r.sf_num == 2000 and r.vf_id is None
    assert check_compat(r, NON_LAG, DEFAULTS) is None


def test_save_writes_seed_fields_in_order(store):
    r = hotplug(mtu=1500, max_queues=3, max_queue_size=1024, features=0x3000, legacy=True)
    path = store.save(r)
    assert path == store.dir / "VNETS1D0F0.json"
    data = json.loads(path.read_text())
    assert list(data)[:9] == ["port_ib_dev", "pf_id", "function_type", "bdf_raw", "device_type", "mac",
                              "pf_num", "sf_num", "mq"]
    assert {k: data[k] for k in SEED_FILE} == SEED_FILE
    assert data["vuid"] == "VNETS1D0F0" and data["features"] == "0x3000" and data["legacy"] == 1
    [back], _ = store.load("net")
    assert back == r


def test_vf_file_has_vf_id(store):
    store.save(vf())
    data = json.loads((store.dir / "VNETS0D0F2VF1.json").read_text())
    assert list(data)[:3] == ["port_ib_dev", "pf_id", "vf_id"] and data["vf_id"] == 0


def test_save_is_atomic_and_leaves_no_temp(store, monkeypatch):
    store.save(hotplug())
    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd)))
    store.save(hotplug(mac="0c:c4:7a:ff:22:98"))
    assert len(calls) >= 2                      # the file and its directory
    assert [p.name for p in store.dir.iterdir()] == ["VNETS1D0F0.json"]

    def boom(*a):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        store.save(hotplug(mac="0c:c4:7a:ff:22:99"))
    [r], _ = store.load("net")
    assert r.mac == "0c:c4:7a:ff:22:98"
    assert [p.name for p in store.dir.iterdir()] == ["VNETS1D0F0.json"]


def test_save_refuses_invalid_record(store):
    with pytest.raises(RecoveryError, match="sf_num"):
        store.save(hotplug(sf_num=999))
    with pytest.raises(RecoveryError, match="vuid"):
        store.save(hotplug(vuid="../x"))
    assert not store.dir.exists() or list(store.dir.iterdir()) == []


def test_delete(store):
    store.save(hotplug())
    store.save(hotplug("VNETS1D1F0", pf_id=1, bdf_raw=0x6900, sf_num=2001))
    assert store.delete(hotplug()) is True                  # only the record's key counts
    assert store.delete(hotplug(mac="0c:c4:7a:ff:22:98")) is False
    assert [p.name for p in store.dir.iterdir()] == ["VNETS1D1F0.json"]
    with pytest.raises(RecoveryError, match="vuid"):
        store.delete(hotplug(vuid="../x"))


def test_disabled_store_writes_and_loads_nothing(tmp_path):
    s = RecoveryStore(tmp_path, [NetCodec()], enabled=False)
    assert s.save(hotplug()) is None
    assert list(tmp_path.iterdir()) == []
    RecoveryStore(tmp_path, [NetCodec()]).save(hotplug())
    assert s.load("net") == ([], [])
    assert s.delete(hotplug()) is True


def test_missing_dir_loads_empty(tmp_path):
    assert RecoveryStore(tmp_path / "nope", [NetCodec()]).load("net") == ([], [])


@pytest.mark.parametrize("change,field", [
    ({"sf_num": 999}, "sf_num"), ({"pf_id": -1}, "pf_id"), ({"pf_id": "0"}, "pf_id"),
    ({"function_type": "sf"}, "function_type"), ({"device_type": "dynamic"}, "device_type"),
    ({"bdf_raw": 70000}, "bdf_raw"), ({"mac": "0c:c4:7a:ff:22"}, "mac"), ({"mq": True}, "mq"),
    ({"port_ib_dev": ""}, "port_ib_dev"), ({"function_type": "vf"}, "vf_id"),
    ({"vuid": "OTHER"}, "vuid"), ({"features": "lots"}, "features"), ({"mtu": 20}, "mtu"),
    ({"legacy": "yes"}, "legacy"),
])
def test_invalid_files_are_problems(store, change, field):
    store.dir.mkdir(parents=True)
    (store.dir / "VNETS1D0F0.json").write_text(json.dumps(dict(SEED_FILE, **change)))
    records, problems = store.load("net")
    assert records == []
    [p] = problems
    assert p.vuid == "VNETS1D0F0" and field in p.message
    assert "VNETS1D0F0.json" in p.message and "delete the files under" in p.message


def test_missing_field_and_bad_json(store):
    store.dir.mkdir(parents=True)
    (store.dir / "A.json").write_text(json.dumps({k: v for k, v in SEED_FILE.items() if k != "mac"}))
    (store.dir / "B.json").write_text("{\n nope")
    (store.dir / "C.json").write_text("[]")
    (store.dir / "notes.txt").write_text("ignored")
    (store.dir / ".D.json.abc.tmp").write_text("{")
    records, problems = store.load("net")
    assert records == []
    msgs = sorted(str(p) for p in problems)
    assert len(msgs) == 3
    assert "mac: missing" in msgs[0]
    assert "line 2 column 2" in msgs[1]
    assert "not a JSON object" in msgs[2]


def test_case_of_seed_strings_is_tolerated(store):
    store.dir.mkdir(parents=True)
    (store.dir / "VNETS1D0F0.json").write_text(json.dumps(dict(SEED_FILE, function_type="PF",
                                                               device_type="Hotplug")))
    [r], _ = store.load("net")
    assert r.function_type == "pf" and r.device_type == "hotplug"


def test_unknown_fields_survive(store):
    store.dir.mkdir(parents=True)
    (store.dir / "VNETS1D0F0.json").write_text(json.dumps(dict(SEED_FILE, future=7)))
    [r], _ = store.load("net")
    assert r.extra == {"future": 7}
    store.save(r)
    assert json.loads((store.dir / "VNETS1D0F0.json").read_text())["future"] == 7


def test_conflicting_files_are_all_refused(store):
    store.save(hotplug())
    store.save(hotplug("VNETS1D1F0", pf_id=1, bdf_raw=0x6900))          # same SF
    store.save(static(0))
    store.save(static(0, vuid="VNETS0D0F3", sf_num=1005, bdf_raw=0x8505))  # same function
    store.save(static(1, vuid="VNETS0D0F4"))
    records, problems = store.load("net")
    assert [r.vuid for r in records] == ["VNETS0D0F4"]
    by = {p.vuid: p.message for p in problems}
    assert set(by) == {"VNETS1D0F0", "VNETS1D1F0", "VNETS0D0F2", "VNETS0D0F3"}
    assert "same SF" in by["VNETS1D0F0"] and "VNETS1D1F0.json" in by["VNETS1D0F0"]
    assert "same function" in by["VNETS0D0F3"]


def test_same_sf_number_on_two_ports_is_fine(store):
    store.save(hotplug("A"))
    store.save(hotplug("B", port_ib_dev="mlx5_1", pf_num=1, pf_id=1, bdf_raw=0x6900))
    records, problems = store.load("net")
    assert len(records) == 2 and problems == []


# -- compatibility ---------------------------------------------------------------------

def test_compatible_records():
    nv = dict(DEFAULTS, SRIOV_EN=1, VIRTIO_NET_EMULATION_NUM_VF=4)
    for r in (hotplug(), static(0), static(1), vf(1, 3), hotplug(pf_id=15),
              hotplug(port_ib_dev="mlx5_1", pf_num=1)):
        assert check_compat(r, NON_LAG, nv) is None, r


def test_lag_switched_on():
    msg = check_compat(hotplug(), LAG, DEFAULTS)
    assert msg.startswith("recovery file VNETS1D0F0.json does not match the current configuration (")
    assert "is_lag is 1" in msg and "mlx5_bond_0" in msg
    assert msg.endswith("delete the files under /opt/mellanox/mlnx_virtnet/recovery and restart")


def test_lag_switched_off():
    r = hotplug(port_ib_dev="mlx5_bond_0")
    assert check_compat(r, LAG, DEFAULTS) is None
    assert "is the LAG device, but is_lag is 0" in check_compat(r, NON_LAG, DEFAULTS)


def test_ports_swapped():
    conf = parse_virtnet_conf('{"ib_dev_p0": "mlx5_1", "ib_dev_p1": "mlx5_0"}')
    assert "pf_num 0, but mlx5_0 is port 1" in check_compat(hotplug(), conf, DEFAULTS)


def test_single_port_drops_port1():
    conf = parse_virtnet_conf('{"single_port": 1}')
    assert check_compat(hotplug(port_ib_dev="mlx5_1", pf_num=1), conf, DEFAULTS) is not None


def test_static_pf_device_changed():
    conf = parse_virtnet_conf('{"ib_dev_for_static_pf": "mlx5_1"}')
    assert "ib_dev_for_static_pf is mlx5_1" in check_compat(static(0), conf, DEFAULTS)
    assert check_compat(static(0, port_ib_dev="mlx5_1", pf_num=1), conf, DEFAULTS) is None


@pytest.mark.parametrize("record,nv,needle", [
    (static(1), {"VIRTIO_NET_EMULATION_NUM_PF": 1}, "VIRTIO_NET_EMULATION_NUM_PF=1"),
    (hotplug(pf_id=4), {"PCI_SWITCH_EMULATION_NUM_PORT": 4}, "PCI_SWITCH_EMULATION_NUM_PORT=4"),
    (hotplug(), {"PCI_SWITCH_EMULATION_ENABLE": 0}, "PCI switch emulation is off"),
    (vf(0, 0), {"VIRTIO_NET_EMULATION_NUM_VF": 4}, "SRIOV_EN"),
    (vf(0, 4), {"VIRTIO_NET_EMULATION_NUM_VF": 4, "SRIOV_EN": 1}, "VIRTIO_NET_EMULATION_NUM_VF=4"),
    (vf(2, 0), {"VIRTIO_NET_EMULATION_NUM_VF": 4, "SRIOV_EN": 1}, "VIRTIO_NET_EMULATION_NUM_PF=2"),
    (vf(0, 0, device_type="hotplug"), {"VIRTIO_NET_EMULATION_NUM_VF": 4, "SRIOV_EN": 1}, "hot-plugged"),
    (hotplug(legacy=True), {}, "transitional"),
    (hotplug(), {"VIRTIO_NET_EMULATION_ENABLE": 0}, "VIRTIO_NET_EMULATION_ENABLE"),
])
def test_nv_config_changed(record, nv, needle):
    msg = check_compat(record, NON_LAG, nv)
    assert msg is not None and needle in msg
    assert f"recovery file {record.vuid}.json does not match" in msg


def test_transitional_ok_when_enabled():
    nv = {"VIRTIO_NET_EMULATION_PF_PCI_LAYOUT": 1, "VIRTIO_EMULATION_HOTPLUG_TRANS": 1}
    assert check_compat(hotplug(legacy=True), NON_LAG, nv) is None
    assert check_compat(hotplug(legacy=True), NON_LAG, limits(nv)) is None


def test_check_compat_with_nvconfig_and_dir(tmp_path):
    nv = NvConfig.load(tmp_path)
    nv.set(PCI_SWITCH_EMULATION_NUM_PORT=1)
    assert check_compat(hotplug(pf_id=3), NON_LAG, nv) is None        # next boot is not current
    nv.apply_pending()
    msg = check_compat(hotplug(pf_id=3), NON_LAG, nv, recovery_dir="/r/opt/mellanox/mlnx_virtnet/recovery")
    assert msg.endswith("delete the files under /r/opt/mellanox/mlnx_virtnet/recovery and restart")


def test_load_compatible(tmp_path):
    def store(conf):
        return RecoveryStore(tmp_path, [NetCodec(conf, DEFAULTS)],
                             display_dir="/opt/mellanox/mlnx_virtnet/recovery (under VFE_ROOT)")
    s = store(LAG)
    s.save(hotplug())
    s.save(static(0))
    s.dir.joinpath("BAD.json").write_text("{}")
    records, problems = s.load("net")
    assert records == []
    assert len(problems) == 3
    assert all("(under VFE_ROOT)" in p.message for p in problems)
    records, problems = store(NON_LAG).load("net")
    assert sorted(r.vuid for r in records) == ["VNETS0D0F2", "VNETS1D0F0"] and len(problems) == 1


def test_seed_recovery_dir_constant():
    assert net_recovery.SEED_RECOVERY_DIR == "/opt/mellanox/mlnx_virtnet/recovery"


# -- the switch port of hot-plugged PFs ------------------------------------------------

def test_hotplug_slot_is_port_field_else_pf_id():
    assert hotplug(pf_id=3).slot == 3                       # seed-only file: pf_id
    assert hotplug(pf_id=17, port=15).slot == 15            # vfe numbers PFs across static + hot-plugged
    assert static(0, port=-1).slot is None and vf().slot is None


def test_hotplug_pf_id_beyond_ports_is_fine_with_port():
    # two static PFs then 16 hot-plugged ones: pf_id 2..17 on switch ports 0..15
    assert check_compat(hotplug(pf_id=17, port=15), NON_LAG, DEFAULTS) is None
    msg = check_compat(hotplug(pf_id=5, port=4), NON_LAG, {"PCI_SWITCH_EMULATION_NUM_PORT": 4})
    assert "switch port 4, but PCI_SWITCH_EMULATION_NUM_PORT=4" in msg


def test_same_switch_port_conflicts(store):
    store.save(hotplug(pf_id=2, port=0))
    store.save(hotplug("X", pf_id=3, port=0, bdf_raw=0x6900, sf_num=2001))
    records, problems = store.load("net")
    assert records == [] and all("hot-plug switch port" in p.message for p in problems)


def test_inventory_record_shape_round_trips(store):
    data = {"port_ib_dev": "mlx5_0", "pf_id": 2, "function_type": "pf", "bdf_raw": 0x6800,
            "device_type": "hotplug", "mac": "0c:c4:7a:ff:22:93", "pf_num": 0, "sf_num": 1002, "mq": 1,
            "vuid": "VNETS1D0F0", "mtu": 1500, "max_queues": 3, "max_queue_size": 1024, "num_msix": 4,
            "features": 0, "legacy": 0, "port": 0}
    r = RecoveryRecord.from_json(data, "VNETS1D0F0")
    assert r.extra == {} and r.num_msix == 4 and r.port == 0
    store.save(r)
    back = json.loads((store.dir / "VNETS1D0F0.json").read_text())
    assert back == dict(data, features="0x0")
    with pytest.raises(RecoveryError, match="port"):
        RecoveryRecord.from_json(dict(data, port=-2), "VNETS1D0F0")
    with pytest.raises(RecoveryError, match="num_msix"):
        RecoveryRecord.from_json(dict(data, num_msix=0), "VNETS1D0F0")


def test_record_of_a_running_function(store):
    """What the net kind writes for a function (and hands a live update):
    the seed's fields in its order, a VF's device_type static."""
    hp = NetFunction(pf_id=2, vf_id=-1, device_type="hotplug", vuid="VNETS1D0F0", bdf_raw=0x8500,
                     ib_dev="mlx5_1", pf_num=1, sf_num=1001, mac="00:11:22:33:44:56", mtu=9000,
                     max_queues=5, max_queue_size=1024, num_msix=4, features=0x3000, legacy=True, port=0)
    store.save(RecoveryRecord.of(hp))
    assert list(json.loads((store.dir / "VNETS1D0F0.json").read_text()).items()) == [
        ("port_ib_dev", "mlx5_1"), ("pf_id", 2), ("function_type", "pf"), ("bdf_raw", 0x8500),
        ("device_type", "hotplug"), ("mac", "00:11:22:33:44:56"), ("pf_num", 1), ("sf_num", 1001),
        ("mq", 1), ("vuid", "VNETS1D0F0"), ("mtu", 9000), ("max_queues", 5), ("max_queue_size", 1024),
        ("num_msix", 4), ("features", "0x3000"), ("legacy", 1), ("port", 0)]
    vf_ = NetFunction(pf_id=0, vf_id=3, device_type="vf", vuid="VNETS0D0F2VF4", bdf_raw=0x9003,
                      ib_dev="mlx5_0", pf_num=0, sf_num=1010, mac="00:11:22:33:44:57", mtu=1500,
                      max_queues=2, max_queue_size=1024, num_msix=2, features=0)
    assert list(RecoveryRecord.of(vf_).validate().to_json().items())[:9] == [
        ("port_ib_dev", "mlx5_0"), ("pf_id", 0), ("vf_id", 3), ("function_type", "vf"),
        ("bdf_raw", 0x9003), ("device_type", "static"), ("mac", "00:11:22:33:44:57"), ("pf_num", 0),
        ("sf_num", 1010)]
