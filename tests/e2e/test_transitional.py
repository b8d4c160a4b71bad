"""Transitional hot-plug for real: with --host-qmp, `virtnet hotplug -l`
adds a transitional virtio-net-pci (legacy I/O BAR and modern capabilities)
to the running host VM, on a pcie-root-port whose I/O window is open, and a
guest booted with virtio_pci.force_legacy=1 drives it as a legacy (virtio
0.95) device and passes traffic.  Without -l the function stays modern-only,
and -l with no free port that has I/O space is refused with a clear error.

The host VM's three root ports: lp0 and lp2 without an I/O window (the guest
boots with pci=hpiosize=0, so Linux reserves none for hot-plug ports, and
no io-reserve asks the firmware for one), lp1 with io-reserve=4k (SeaBIOS
gives it a 4K window, as a host BIOS does for the DPU's switch ports).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
import threading
import time

import pytest

from tests.harness.netns import NetNs
from tests.harness.service import ControllerService

pytestmark = pytest.mark.e2e

MODERN_MAC = "0c:c4:7a:ff:22:b0"
LEGACY_MAC = "0c:c4:7a:ff:22:b1"
REFUSED_MAC = "0c:c4:7a:ff:22:b2"
PEER_IP, GUEST_IP = "10.4.0.100", "10.4.0.1"
VIRTIO_TRANSITIONAL_NET_ID = "0x1000"      # legacy PCI device ID of a network device
VIRTIO_MODERN_NET_ID = "0x1041"            # 0x1040 + device type 1: modern only
IORESOURCE_IO = 0x100
PAYLOAD = 1 << 20


@pytest.fixture
def short_dir():
    d = tempfile.mkdtemp(prefix="vfe-t-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def root_ports() -> list[str]:
    args = []
    for i, extra in enumerate(("", ",io-reserve=4k", "")):
        args += ["-device", f"pcie-root-port,id=lp{i},bus=pcie.0,chassis={i + 1},"
                            f"port={0x10 + i},addr={0x10 + i:#x}{extra}"]
    return args


def wait_guest(vm, cmd, timeout=40.0):
    deadline = time.monotonic() + timeout
    while True:
        rc, out = vm.run(cmd, timeout=15)
        if rc == 0:
            return out
        assert time.monotonic() < deadline, f"{cmd!r} still exits {rc}: {out}"
        time.sleep(0.3)


def pci_function(vm, ifname: str) -> dict:
    """What the guest's PCI core and virtio driver say about a NIC."""
    pci = f"/sys/class/net/{ifname}/device/.."
    rc, out = vm.run(f"cat {pci}/device; head -1 {pci}/resource; cat /sys/class/net/{ifname}/device/features; "
                     f"basename $(readlink {pci}/driver)")
    assert rc == 0, out
    device_id, bar0, features, driver = out.split("\n")[:4]
    return {"device_id": device_id.strip(), "bar0_flags": int(bar0.split()[2], 16),
            "version_1": features.strip()[32] == "1", "driver": driver.strip()}


def receive_all(server: socket.socket, got: dict) -> None:
    conn, _ = server.accept()
    with conn:
        conn.settimeout(60)
        data = bytearray()
        while chunk := conn.recv(65536):
            data += chunk
    got["md5"], got["len"] = hashlib.md5(data).hexdigest(), len(data)


def test_transitional_hotplug_serves_a_force_legacy_guest(short_dir, vm_factory):
    host_qmp = os.path.join(short_dir, "host-qmp.sock")
    vm = vm_factory("legacyhost", kernel_args="virtio_pci.force_legacy=1 pci=hpiosize=0",
                    extra_args=[*root_ports(),
                                "-chardev", f"socket,id=ctlqmp,path={host_qmp},server=on,wait=off",
                                "-mon", "chardev=ctlqmp,mode=control"])
    vm.wait_booted(90)
    with NetNs() as ns:
        svc = ControllerService(os.path.join(short_dir, "root"), ns, extra=["--host-qmp", host_qmp])
        try:
            svc.mlxconfig("s", "VIRTIO_NET_EMULATION_PF_PCI_LAYOUT=1", "VIRTIO_EMULATION_HOTPLUG_TRANS=1")
            svc.start()
            hotplug = ("hotplug", "-i", "mlx5_0", "-f", "0x0", "-t", "1500", "-n", "3", "-s", "256")

            # without -l: modern only (device ID 0x1041, no I/O BAR), on a port
            # without I/O space; even a force_legacy guest can only drive it as
            # virtio 1.x (Linux falls back to the modern probe for such an ID)
            svc.virtnet_json(*hotplug, "-m", MODERN_MAC)
            modern = pci_function(vm, wait_guest(vm, f"vfe-ifname {MODERN_MAC}").strip())
            assert modern["device_id"] == VIRTIO_MODERN_NET_ID and modern["version_1"], modern
            assert not modern["bar0_flags"] & IORESOURCE_IO, modern

            # with -l: transitional, on the port with an I/O window; the
            # force_legacy guest binds the legacy interface (I/O BAR 0, no VERSION_1)
            hp = svc.virtnet_json(*hotplug, "-m", LEGACY_MAC, "-l")
            assert hp["transitional"] == 1
            ifname = wait_guest(vm, f"vfe-ifname {LEGACY_MAC}").strip()
            legacy = pci_function(vm, ifname)
            assert legacy == {"device_id": VIRTIO_TRANSITIONAL_NET_ID, "bar0_flags": legacy["bar0_flags"],
                              "version_1": False, "driver": "virtio-pci"}, legacy
            assert legacy["bar0_flags"] & IORESOURCE_IO, legacy
            assert "plugged into the host VM on lp1 (transitional)" in svc.log()

            # traffic: ping, then 1 MiB each way with equal md5
            rep = hp["sf_rep_net_device"]
            ns.run("ip", "addr", "add", f"{PEER_IP}/24", "dev", rep)
            ns.run("ip", "link", "set", "dev", rep, "up")
            rc, out = vm.run(f"vfe-netup {ifname} {GUEST_IP}/24", timeout=30)
            assert rc == 0, out
            rc, out = vm.run(f"ping -c 3 -W 3 {PEER_IP}", timeout=30)
            assert rc == 0 and "3 packets received" in out, out

            data = os.urandom(PAYLOAD)
            vm.run(f"dd if=/dev/urandom of=/tmp/out bs=64k count={PAYLOAD >> 16} 2>/dev/null", check=True)
            with ns.enter():
                server = socket.create_server((PEER_IP, 5001))
            got: dict = {}
            with server:
                server.settimeout(60)
                rx = threading.Thread(target=receive_all, args=(server, got))
                rx.start()
                rc, out = vm.run(f"vfe-send {PEER_IP} 5001 /tmp/out && md5sum /tmp/out", timeout=120)
                rx.join(70)
            assert rc == 0, out
            assert (got.get("md5"), got.get("len")) == (out.split()[0], PAYLOAD), (got, out)

            recv = vm.run_bg("vfe-recv 5002 /tmp/in")
            deadline = time.monotonic() + 30
            while True:
                with ns.enter():
                    peer = socket.socket()
                try:
                    peer.settimeout(60)
                    peer.connect((GUEST_IP, 5002))
                    peer.sendall(data)
                    break
                except ConnectionRefusedError:      # vfe-recv not listening yet
                    assert time.monotonic() < deadline, "the guest never listened on 5002"
                    time.sleep(0.3)
                finally:
                    peer.close()
            assert recv.wait(timeout=120) == 0
            assert recv.output().split() == [hashlib.md5(data).hexdigest(), str(PAYLOAD)]

            # -l again: lp2, the only free port, has no I/O window: a clear
            # refusal, and nothing of the function is left behind
            r = svc.virtnet(*hotplug, "-m", REFUSED_MAC, "-l")
            assert r.returncode == 1, r.stdout + r.stderr
            assert "I/O space" in r.stderr and "io-reserve" in r.stderr, r.stderr
            macs = {d["net_mac"].lower() for d in svc.virtnet_json("list")["devices"]}
            assert REFUSED_MAC not in macs and LEGACY_MAC in macs
        finally:
            svc.stop()
