"""The "host" side of hot-plug: when the controller is told a running QEMU's
QMP socket, hot-plugging a PF also adds the NIC to that VM on a free
pcie-root-port, and unplugging removes it -- what the PCIe switch emulation
does on a DPU.

QEMU answers netdev_add only after the vhost-user handshake with us, and our
control thread is the one that must answer that handshake; so every QMP
conversation runs on a helper thread, one at a time, and the inventory never
waits for it.  The guest sees the NIC a moment after `virtnet hotplug`
returns, as with real PCIe hot-plug.
"""
from __future__ import annotations

import logging
import queue
import threading

from vfe.controller.functions import queue_pairs

log = logging.getLogger("vfe.controller")


class HostQmp:
    def __init__(self, path: str, root_ports: list[str] | None = None):
        # optional: only with --host-qmp, and qemu.qmp's asyncio machinery is
        # not worth loading otherwise (the project's sync wrapper around it)
        from vfe.qmp import Monitor
        self.path = path
        self.monitor = Monitor(path, name="host")
        self.root_ports = root_ports       # None: discovered from /machine/peripheral
        self.used: dict[str, str] = {}     # vuid -> root port id
        self._jobs: queue.Queue = queue.Queue()
        if self.root_ports is None:
            self.root_ports = self._discover_root_ports()
        self._thread = threading.Thread(target=self._run, name="vfe-hostqmp", daemon=True)
        self._thread.start()
        self.idle = threading.Event()
        self.idle.set()

    # -- called by the inventory (control thread): never blocks on QEMU

    def plug(self, f) -> str:
        port = self._free_port()
        self.used[f.vuid] = port
        self._submit(self._plug, f.vuid, f.socket, f.mac, f.mtu, port, _pairs(f))
        return f"vfe-{f.vuid}"

    def unplug(self, f) -> None:
        if self.used.pop(f.vuid, None) is not None:
            self._submit(self._unplug, f.vuid)

    def replug(self, f) -> None:
        port = self.used.get(f.vuid)
        if port is None:
            return
        self._submit(self._unplug, f.vuid)
        self._submit(self._plug, f.vuid, f.socket, f.mac, f.mtu, port, _pairs(f))

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
            job = self._jobs.get()
            if job is None:
                return
            fn, args = job
            try:
                self.monitor.connect(timeout=10)
                fn(*args)
            except Exception as exc:      # a QEMU that refuses is logged, not fatal
                log.error("host QMP %s%s failed: %s", fn.__name__.lstrip("_"), args[:1], exc)
            if self._jobs.empty():
                self.idle.set()

    def _cmd(self, cmd: str, **args):
        return self.monitor.command(cmd, args, timeout=30)

    def _plug(self, vuid: str, socket_path: str, mac: str, mtu: int, port: str, pairs: int) -> None:
        tcg = not self._cmd("query-kvm").get("enabled", False)
        self._cmd("chardev-add", id=f"vfe-c-{vuid}",
                  backend={"type": "socket", "data": {
                      "addr": {"type": "unix", "data": {"path": socket_path}},
                      "server": False, "reconnect": 1}})
        self._cmd("netdev_add", type="vhost-user", id=f"vfe-n-{vuid}", chardev=f"vfe-c-{vuid}",
                  queues=pairs)
        dev = {"driver": "virtio-net-pci", "id": f"vfe-{vuid}", "netdev": f"vfe-n-{vuid}",
               "mac": mac, "bus": port, "romfile": "", "host_mtu": mtu}
        if pairs > 1:
            dev["mq"] = True
        if tcg:
            dev["vectors"] = 0            # QEMU 7.2 + TCG + vhost-user + MSI-X crashes (facts.md)
        self.monitor.clear_events()
        self._cmd("device_add", **dev)
        log.info("%s: plugged into the host VM on %s", vuid, port)

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

    def _free_port(self) -> str:
        ports = self.root_ports
        if ports is None:
            raise RuntimeError("no pcie-root-port list for the host VM (give --host-qmp-ports)")
        for p in ports:
            if p not in self.used.values():
                return p
        raise RuntimeError("the host VM has no free pcie-root-port")


def _pairs(f) -> int:
    return queue_pairs(f.max_queues)
