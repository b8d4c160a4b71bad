"""The host VM side of hot-plug without a QEMU: which root ports have I/O
space (from a query-pci answer), which port a function goes to, and the
virtio-net-pci layout properties (tests/e2e/test_transitional.py drives the
real thing)."""
from __future__ import annotations

import errno
import sys
import time

import pytest

from vfe.controller.hostqmp import io_window_ports, occupied_ports, pci_layout, pick_port
from vfe.controller.kind import InventoryError

CLOSED = {"base": 0xF000, "limit": 0x0FFF}     # what QEMU 7.2 reports for a port without a window


def root_port(qdev_id: str, io_range: dict | None, devices: list | None = None) -> dict:
    bridge: dict = {"bus": {"number": 1, "secondary": 1, "subordinate": 1,
                            "memory_range": {"base": 0xFE000000, "limit": 0xFE1FFFFF},
                            "prefetchable_range": {"base": 0xFE800000, "limit": 0xFE9FFFFF}}}
    if io_range is not None:
        bridge["bus"]["io_range"] = io_range
    if devices is not None:
        bridge["devices"] = devices
    return {"bus": 0, "slot": 16, "function": 0, "qdev_id": qdev_id,
            "class_info": {"class": 1540, "desc": "PCI bridge"}, "id": {"device": 12, "vendor": 6966},
            "regions": [], "pci_bridge": bridge}


def answer(*devices: dict) -> list:
    return [{"bus": 0, "devices": [{"bus": 0, "slot": 0, "function": 0, "qdev_id": "",
                                    "class_info": {"class": 1536}, "regions": []}, *devices]}]


def test_io_window_ports_reads_each_bridge_window():
    q = answer(root_port("hp0", {"base": 0x1000, "limit": 0x1FFF}),
               root_port("hp1", CLOSED),
               root_port("hp2", {"base": 0xC000, "limit": 0xCFFF}))
    assert io_window_ports(q, ["hp0", "hp1", "hp2"]) == {"hp0", "hp2"}


def test_io_window_ports_only_names_the_given_ports():
    q = answer(root_port("hp0", {"base": 0x1000, "limit": 0x1FFF}),
               root_port("other", {"base": 0x2000, "limit": 0x2FFF}))
    assert io_window_ports(q, ["hp0"]) == {"hp0"}


def test_io_window_ports_finds_ports_behind_bridges():
    inner = root_port("deep", {"base": 0x3000, "limit": 0x3FFF})
    q = answer(root_port("up", CLOSED, devices=[inner]))
    assert io_window_ports(q, ["deep", "up"]) == {"deep"}


@pytest.mark.parametrize("io_range", [
    None,                                    # no io_range at all
    {"base": 0x1000},                        # no limit
    {"base": "0x1000", "limit": 0x1FFF},     # not a number
    {"base": 0x2000, "limit": 0x1FFF},       # base above limit: closed
])
def test_io_window_ports_counts_only_an_open_window(io_range):
    assert io_window_ports(answer(root_port("hp0", io_range)), ["hp0"]) == set()


def test_io_window_ports_a_one_page_window_is_open():
    assert io_window_ports(answer(root_port("hp0", {"base": 0x1000, "limit": 0x1000})), ["hp0"]) == {"hp0"}


def test_pick_port_transitional_needs_an_io_window():
    assert pick_port(["a", "b", "c"], set(), {"b"}, legacy=True) == "b"
    assert pick_port(["a", "b", "c"], {"b"}, {"b", "c"}, legacy=True) == "c"


def test_pick_port_transitional_without_a_free_io_port_is_refused_clearly():
    with pytest.raises(InventoryError) as e:
        pick_port(["a", "b", "c"], {"b"}, {"b"}, legacy=True)
    assert e.value.code == -errno.ENOSPC
    msg = str(e.value)
    assert "I/O space" in msg and "free: a, c" in msg and "with an I/O window: b" in msg
    assert "io-reserve" in msg


def test_pick_port_modern_leaves_io_ports_for_transitional_ones():
    assert pick_port(["a", "b", "c"], set(), {"a", "b"}, legacy=False) == "c"
    assert pick_port(["a", "b"], set(), {"a", "b"}, legacy=False) == "a"     # all have one: any


def test_pick_port_none_free():
    with pytest.raises(InventoryError) as e:
        pick_port(["a"], {"a"}, set(), legacy=False)
    assert e.value.code == -errno.ENOSPC and "no free pcie-root-port" in str(e.value)


def test_pci_layout_transitional_and_modern_only():
    assert pci_layout(True) == {"disable-legacy": "off", "disable-modern": False}
    assert pci_layout(False) == {"disable-legacy": "on", "disable-modern": False}


# -- HostQmp with a stand-in for QEMU's monitor

PLUGGED_AT_START: dict[str, str] = {}     # what the host VM holds when HostQmp starts


class FakeMonitor:
    """Answers what HostQmp asks a host VM with three root ports; only hp1
    has an I/O window until ``windows`` changes."""

    def __init__(self, path: str, name: str = "vm"):
        self.commands: list[tuple[str, dict]] = []
        self.windows = {"hp0": CLOSED, "hp1": {"base": 0xD000, "limit": 0xDFFF}, "hp2": CLOSED}
        self.plugged: dict[str, str] = PLUGGED_AT_START.copy()     # port -> the device's qdev id

    def connect(self, timeout: float = 30.0) -> None:
        pass

    def command(self, cmd: str, args: dict | None = None, timeout: float | None = 60.0):
        self.commands.append((cmd, dict(args or {})))
        if cmd == "qom-list":
            return [{"name": n, "type": "child<pcie-root-port>"} for n in self.windows] + \
                   [{"name": "type", "type": "string"}]
        if cmd == "query-pci":
            return answer(*(root_port(n, w, [{"qdev_id": self.plugged[n], "regions": []}]
                                      if n in self.plugged else None)
                            for n, w in self.windows.items()))
        if cmd == "query-kvm":
            return {"enabled": False, "present": False}
        return {}

    def clear_events(self) -> None:
        pass

    def wait_event(self, name=None, timeout=60.0) -> dict:
        return {"event": name}

    def close(self) -> None:
        pass


class Fn:
    def __init__(self, vuid: str, legacy: bool):
        self.vuid, self.legacy = vuid, legacy
        self.socket, self.mac, self.mtu, self.max_queues = f"/run/{vuid}.sock", "0c:c4:7a:ff:22:93", 1500, 3


@pytest.fixture
def host(monkeypatch):
    import vfe.qmp
    from vfe.controller import hostqmp
    monkeypatch.setattr(vfe.qmp, "Monitor", FakeMonitor)
    monkeypatch.setattr(hostqmp, "IO_REFRESH_S", 0.01)
    h = hostqmp.HostQmp("/run/qmp.sock")
    yield h
    h.close()


def device_adds(h) -> list[dict]:
    assert h.idle.wait(10)
    return [args for cmd, args in h.monitor.commands if cmd == "device_add"]


def test_host_plugs_a_transitional_function_on_the_io_port(host):
    assert host.io_ports == {"hp1"}              # read at start-up, before any plug
    assert host.plug(Fn("T", legacy=True)) == "vfe-T"
    assert host.plug(Fn("M", legacy=False)) == "vfe-M"
    adds = {a["id"]: a for a in device_adds(host)}
    assert (adds["vfe-T"]["bus"], adds["vfe-T"]["disable-legacy"]) == ("hp1", "off")
    assert (adds["vfe-M"]["bus"], adds["vfe-M"]["disable-legacy"]) == ("hp0", "on")
    assert adds["vfe-T"]["vectors"] == 0          # TCG: INTx (facts.md)
    with pytest.raises(InventoryError, match="I/O space"):
        host.plug(Fn("T2", legacy=True))          # hp2, the last free port, has none
    assert "T2" not in host.used


def test_host_replug_keeps_the_transitional_layout(host):
    host.plug(Fn("T", legacy=True))
    host.replug(Fn("T", legacy=True))
    adds = device_adds(host)
    assert [(a["bus"], a["disable-legacy"]) for a in adds] == [("hp1", "off"), ("hp1", "off")]


def test_host_rereads_the_io_windows_while_idle(host):
    host.monitor.windows["hp2"] = {"base": 0xC000, "limit": 0xCFFF}   # the guest opened one
    for _ in range(1000):                          # the helper's next idle reading (every 0.01 s here)
        if "hp2" in host.io_ports:
            break
        time.sleep(0.01)
    assert host.io_ports == {"hp1", "hp2"}
    host.plug(Fn("T", legacy=True))
    assert host.plug(Fn("T2", legacy=True)) == "vfe-T2"
    assert sorted(a["bus"] for a in device_adds(host)) == ["hp1", "hp2"]


def test_occupied_ports_names_what_sits_behind_each_port():
    q = answer(root_port("hp0", CLOSED, devices=[{"qdev_id": "vfe-A", "regions": []}]),
               root_port("hp1", CLOSED),
               root_port("hp2", CLOSED, devices=[{"qdev_id": "", "regions": []}]),
               root_port("other", CLOSED, devices=[{"qdev_id": "x", "regions": []}]))
    assert occupied_ports(q, ["hp0", "hp1", "hp2"]) == {"vfe-A": "hp0", "": "hp2"}


def test_host_adopts_the_nics_a_previous_controller_plugged(monkeypatch):
    # after a restart or a live update the host VM still holds vfe-A on hp0
    # and a device of its own on hp2: a new function must not be sent there,
    # and A, recovered, is not plugged a second time
    monkeypatch.setattr(sys.modules[__name__], "PLUGGED_AT_START", {"hp0": "vfe-A", "hp2": "disk0"})
    import vfe.qmp
    from vfe.controller import hostqmp
    monkeypatch.setattr(vfe.qmp, "Monitor", FakeMonitor)
    h = hostqmp.HostQmp("/run/qmp.sock")
    try:
        assert h.plug(Fn("A", legacy=False)) == "vfe-A"
        assert h.plug(Fn("B", legacy=False)) == "vfe-B"
        assert [(a["id"], a["bus"]) for a in device_adds(h)] == [("vfe-B", "hp1")]
        with pytest.raises(InventoryError, match="no free"):
            h.plug(Fn("C", legacy=False))
        h.unplug(Fn("A", legacy=False))
        assert h.plug(Fn("C", legacy=False)) == "vfe-C"
        assert ("vfe-C", "hp0") in [(a["id"], a["bus"]) for a in device_adds(h)]
    finally:
        h.close()
