"""The "host" side of hot-plug: when the controller is told a running QEMU's
QMP socket, hot-plugging a PF also adds the NIC to that VM on a free
pcie-root-port, and unplugging removes it -- what the PCIe switch emulation
does on a DPU.

QEMU answers netdev_add only after the vhost-user handshake with us, and our
control thread is the one that must answer that handshake; so every QMP
conversation runs on a helper thread, one at a time, and the inventory never
waits for it.  The guest sees the NIC a moment after `virtnet hotplug`
returns, as with real PCIe hot-plug.

A transitional PF (`virtnet hotplug -l`) has a legacy I/O BAR, which the
guest can place only behind a root port whose bridge I/O window is open --
what the DPU's switch downstream ports need I/O space for.  Who opens the
windows is the guest (its firmware honours a port's io-reserve, Linux gives
hot-plug ports one at boot unless pci=hpiosize=0), so the windows are read
from QEMU (query-pci: the bridges' I/O base/limit registers) by the helper
thread: at start-up, after each job and every IO_REFRESH_S while idle.  The
control thread picks a port from the last reading and never waits for QEMU.
"""
from __future__ import annotations

import errno
import logging
import queue
import threading
from collections.abc import Iterable, Iterator

from vfe.controller.functions import queue_pairs
from vfe.controller.kind import InventoryError

log = logging.getLogger("vfe.controller")

IO_REFRESH_S = 2.0        # an idle helper re-reads the I/O windows this often


class HostQmp:
    def __init__(self, path: str, root_ports: list[str] | None = None):
        # optional: only with --host-qmp, and qemu.qmp's asyncio machinery is
        # not worth loading otherwise (the project's sync wrapper around it)
        from vfe.qmp import Monitor
        self.path = path
        self.monitor = Monitor(path, name="host")
        self.root_ports = root_ports       # None: discovered from /machine/peripheral
        self.used: dict[str, str] = {}     # vuid -> root port id
        # root ports whose I/O window was open at the last reading; replaced
        # whole by the helper thread, read by the control thread
        self.io_ports: frozenset[str] = frozenset()
        self._io_read_failed = False
        self._jobs: queue.Queue = queue.Queue()
        if self.root_ports is None:
            self.root_ports = self._discover_root_ports()
        self._adopt_plugged()
        self._read_io_windows()
        self._thread = threading.Thread(target=self._run, name="vfe-hostqmp", daemon=True)
        self._thread.start()
        self.idle = threading.Event()
        self.idle.set()

    # -- called by the inventory (control thread): never blocks on QEMU

    def plug(self, f) -> str:
        if self.root_ports is None:
            raise InventoryError("no pcie-root-port list for the host VM", code=-errno.ENODEV)
        if f.vuid in self.used:
            # still in the host VM from before a restart or a live update
            # (a plain stop leaves hot-plugged NICs where they are)
            log.info("%s: already plugged into the host VM on %s", f.vuid, self.used[f.vuid])
            return f"vfe-{f.vuid}"
        port = pick_port(self.root_ports, set(self.used.values()), self.io_ports, bool(f.legacy))
        self.used[f.vuid] = port
        self._submit(self._plug, f.vuid, f.socket, f.mac, f.mtu, port, _pairs(f), bool(f.legacy))
        return f"vfe-{f.vuid}"

    def unplug(self, f) -> None:
        if self.used.pop(f.vuid, None) is not None:
            self._submit(self._unplug, f.vuid)

    def replug(self, f) -> None:
        port = self.used.get(f.vuid)
        if port is None:
            return
        self._submit(self._unplug, f.vuid)
        self._submit(self._plug, f.vuid, f.socket, f.mac, f.mtu, port, _pairs(f), bool(f.legacy))

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)
        self.monitor.close()

    # -- the helper thread

    def _submit(self, fn, *args) -> None:
        self.idle.clear()
        self._jobs.put((fn, args))

    def _run(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=IO_REFRESH_S)
            except queue.Empty:
                self._read_io_windows()
                continue
            if job is None:
                return
            fn, args = job
            try:
                self.monitor.connect(timeout=10)
                fn(*args)
            except Exception as exc:      # a QEMU that refuses is logged, not fatal
                log.error("host QMP %s%s failed: %s", fn.__name__.lstrip("_"), args[:1], exc)
            if self._jobs.empty():
                self._read_io_windows()    # fresh after each change, not only on the idle timer
                self.idle.set()

    def _cmd(self, cmd: str, **args):
        return self.monitor.command(cmd, args, timeout=30)

    def _plug(self, vuid: str, socket_path: str, mac: str, mtu: int, port: str, pairs: int,
              legacy: bool) -> None:
        tcg = not self._cmd("query-kvm").get("enabled", False)
        self._cmd("chardev-add", id=f"vfe-c-{vuid}",
                  backend={"type": "socket", "data": {
                      "addr": {"type": "unix", "data": {"path": socket_path}},
                      "server": False, "reconnect": 1}})
        self._cmd("netdev_add", type="vhost-user", id=f"vfe-n-{vuid}", chardev=f"vfe-c-{vuid}",
                  queues=pairs)
        dev = {"driver": "virtio-net-pci", "id": f"vfe-{vuid}", "netdev": f"vfe-n-{vuid}",
               "mac": mac, "bus": port, "romfile": "", "host_mtu": mtu, **pci_layout(legacy)}
        if pairs > 1:
            dev["mq"] = True
        if tcg:
            dev["vectors"] = 0            # QEMU 7.2 + TCG + vhost-user + MSI-X crashes (facts.md)
        self.monitor.clear_events()
        self._cmd("device_add", **dev)
        log.info("%s: plugged into the host VM on %s (%s)", vuid, port,
                 "transitional" if legacy else "modern only")

    def _unplug(self, vuid: str) -> None:
        self.monitor.clear_events()
        self._cmd("device_del", id=f"vfe-{vuid}")
        try:
            self.monitor.wait_event("DEVICE_DELETED", timeout=20)
        except TimeoutError:
            log.error("%s: the host VM did not release the device in time", vuid)
        for cmd, arg in (("netdev_del", {"id": f"vfe-n-{vuid}"}), ("chardev-remove", {"id": f"vfe-c-{vuid}"})):
            try:
                self._cmd(cmd, **arg)
            except Exception as exc:
                log.error("%s: %s: %s", vuid, cmd, exc)
        log.info("%s: removed from the host VM", vuid)

    def _discover_root_ports(self) -> list[str]:
        """The VM's pcie-root-ports (at start-up, before QEMU can be waiting on us)."""
        self.monitor.connect(timeout=10)
        found = [c["name"] for c in self.monitor.command("qom-list", {"path": "/machine/peripheral"})
                 if c.get("type") == "child<pcie-root-port>"]
        log.info("host VM %s: pcie-root-ports %s", self.path, ", ".join(found) or "none")
        return sorted(found)

    def _adopt_plugged(self) -> None:
        """Note which root ports are taken already: our NICs a previous
        controller plugged (by their vfe-<vuid> id) and anything else there."""
        try:
            self.monitor.connect(timeout=2)
            taken = occupied_ports(self.monitor.command("query-pci", timeout=10), self.root_ports or ())
        except Exception as exc:
            log.error("host VM %s: cannot read which root ports are taken: %s", self.path, exc)
            return
        for dev_id, port in taken.items():
            self.used[dev_id[len("vfe-"):] if dev_id.startswith("vfe-") else f"({dev_id or port})"] = port
        if taken:
            log.info("host VM %s: root ports taken already: %s", self.path,
                     ", ".join(f"{p} ({d or 'unnamed'})" for d, p in sorted(taken.items())))

    def _read_io_windows(self) -> None:
        try:
            self.monitor.connect(timeout=2)
            self.io_ports = frozenset(io_window_ports(self.monitor.command("query-pci", timeout=10),
                                                      self.root_ports or ()))
        except Exception as exc:        # QEMU gone or busy: keep the last reading, say so once
            if not self._io_read_failed:
                log.error("host VM %s: cannot read the root ports' I/O windows: %s", self.path, exc)
            self._io_read_failed = True
            return
        if self._io_read_failed:
            log.info("host VM %s: root ports with an I/O window: %s", self.path,
                     ", ".join(sorted(self.io_ports)) or "none")
        self._io_read_failed = False


def pci_layout(legacy: bool) -> dict:
    """virtio-net-pci properties: a transitional function (legacy I/O BAR and
    the modern capabilities) or a modern-only one.  QEMU's default, auto, is
    modern-only on a PCIe port already; saying it keeps that independent of
    where the port sits."""
    return {"disable-legacy": "off" if legacy else "on", "disable-modern": False}


def pick_port(ports: Iterable[str], used: set[str], io_ports: frozenset[str] | set[str],
              legacy: bool) -> str:
    """The root port a new function goes to: a transitional one needs a port
    with an open I/O window; a modern one takes a port without one first, so
    the few I/O windows stay free for transitional functions."""
    free = [p for p in ports if p not in used]
    if not free:
        raise InventoryError("the host VM has no free pcie-root-port", code=-errno.ENOSPC)
    with_io = [p for p in free if p in io_ports]
    if legacy:
        if not with_io:
            raise InventoryError(
                "no free pcie-root-port of the host VM has I/O space for a transitional device's "
                f"legacy I/O BAR (free: {', '.join(free)}; with an I/O window: "
                f"{', '.join(sorted(io_ports)) or 'none'}): give the host VM's root ports "
                "io-reserve=4k, or hot-plug without -l", code=-errno.ENOSPC)
        return with_io[0]
    return ([p for p in free if p not in io_ports] or free)[0]


def io_window_ports(query_pci: list, ports: Iterable[str]) -> set[str]:
    """Which of ``ports`` (qdev ids) have an open I/O window in a query-pci
    answer: a bridge forwards I/O only while its I/O base is not above its
    limit (a closed window reads e.g. base 0xf000, limit 0x0fff)."""
    wanted = set(ports)
    found = set()
    for dev in _pci_devices(query_pci):
        bridge = dev.get("pci_bridge")
        if dev.get("qdev_id") not in wanted or not isinstance(bridge, dict):
            continue
        window = (bridge.get("bus") or {}).get("io_range") or {}
        base, limit = window.get("base"), window.get("limit")
        if isinstance(base, int) and isinstance(limit, int) and base <= limit:
            found.add(dev["qdev_id"])
    return found


def occupied_ports(query_pci: list, ports: Iterable[str]) -> dict[str, str]:
    """The devices found behind ``ports`` in a query-pci answer: their qdev
    id -> the port's (one per port: a root port has one slot)."""
    wanted = set(ports)
    found = {}
    for dev in _pci_devices(query_pci):
        bridge = dev.get("pci_bridge")
        if dev.get("qdev_id") in wanted and isinstance(bridge, dict):
            for child in bridge.get("devices") or ():
                found[str(child.get("qdev_id") or "")] = dev["qdev_id"]
    return found


def _pci_devices(query_pci: list) -> Iterator[dict]:
    """Every device of the answer, those behind bridges too (depth first)."""
    stack = [d for bus in query_pci for d in bus.get("devices", ())]
    while stack:
        dev = stack.pop()
        yield dev
        stack.extend((dev.get("pci_bridge") or {}).get("devices", ()))


def _pairs(f) -> int:
    return queue_pairs(f.max_queues)
