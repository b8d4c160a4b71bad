"""Guests started by a real libvirtd (a private one, tests/harness/libvirt.py)
on sockets the controller provisioned, with the domain XML docs/libvirt.md
gives: ``<interface type='vhostuser'>``, ``<disk type='vhostuser'>``,
memfd-backed shared memory, ``vectors=0`` through ``<qemu:override>``.

1. Service mode: a hot-plugged PF (``virtnet hotplug``) and a blk function
   (``vfe-rpc controller_virtio_blk_create`` on a malloc bdev) in one domain;
   the guest pings an address on the PF's representor and writes a pattern
   to the disk.  ``virsh destroy`` + ``virsh start``: both sockets are taken
   again, the guest pings and reads its pattern back.
2. ``--device`` sockets: two domains on two ``net`` sockets ping each other;
   one has a ``--device blk`` disk and reads back what it wrote.
3. The seed's VFE vDPA ``<qemu:commandline>`` block (QEMU the server on
   /tmp/vfe-net0-like paths) with docs/libvirt.md's substitutions: vfe-vhostd
   --client relays it to an SR-IOV VF, provisioned with vhostmgmt; the guest
   pings the VF's representor.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.harness.libvirt import GuestDomain, Libvirtd, VhostUserDisk, VhostUserNic, libvirtd_available
from tests.harness.netns import NetNs
from tests.harness.service import ControllerService

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not libvirtd_available(),
                                 reason="libvirtd/virsh missing (apt libvirt-daemon-system, scripts/setup)")]

PATTERN_KB = 256          # the disk pattern: small, TCG is slow


@pytest.fixture(scope="module")
def libvirtd():
    with Libvirtd() as lv:
        yield lv


@pytest.fixture
def domains(libvirtd, guest_image):
    """define(name, **GuestDomain kwargs) -> a defined (not started) domain;
    every one is destroyed and undefined after the test, pass or fail, and
    its logs printed (shown when the test failed)."""
    made: list[GuestDomain] = []

    def define(name: str, **kw) -> GuestDomain:
        dom = libvirtd.define(GuestDomain(name, guest_image, **kw))
        made.append(dom)
        return dom

    try:
        yield define
    finally:
        for dom in made:
            print(f"--- {dom.name}: console tail ---\n{dom.console_tail(20)}\n{dom.qemu_log_tail(10)}")
            libvirtd.remove(dom)


@pytest.fixture
def short_root():
    d = tempfile.mkdtemp(prefix="vfe-lr-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def boot(dom: GuestDomain, addr: str | None = None) -> None:
    dom.start()
    dom.wait_booted(120)
    if addr:
        dom.run(f"vfe-netup eth0 {addr}/24", timeout=30, check=True)


def ping(dom: GuestDomain, addr: str, count: int = 2) -> None:
    rc, out = dom.run(f"ping -c {count} -W 3 {addr}", timeout=10 + 4 * count)
    assert rc == 0 and f"{count} packets received" in out, out


def write_pattern(dom: GuestDomain, dev: str = "/dev/vda") -> str:
    """Random data to the disk's start, read back with O_DIRECT; its md5."""
    out = dom.run(f"dd if=/dev/urandom of=/tmp/p bs=1k count={PATTERN_KB} 2>/dev/null && "
                  f"dd if=/tmp/p of={dev} bs=64k oflag=direct 2>/dev/null && md5sum < /tmp/p",
                  timeout=60, check=True)[1]
    written = out.split()[0]
    assert read_pattern(dom, dev) == written
    return written


def read_pattern(dom: GuestDomain, dev: str = "/dev/vda") -> str:
    cmd = f"dd if={dev} bs=64k count={PATTERN_KB // 64} iflag=direct 2>/dev/null | md5sum"
    return dom.run(cmd, timeout=60, check=True)[1].split()[0]


def vfe_rpc(svc: ControllerService, *args: str):
    r = subprocess.run([sys.executable, "-m", "vfe.cli.vfe_rpc", *args], env=svc.env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"vfe-rpc {' '.join(args)}: {r.stderr}{r.stdout}"
    return json.loads(r.stdout)


def test_hotplug_pf_and_blk_function_then_destroy_and_start(libvirtd, domains, short_root):
    mac, peer = "0c:c4:7a:ff:22:b1", "10.8.0.100"
    with NetNs() as ns:
        svc = ControllerService(short_root, ns)
        try:
            svc.start()
            pf = svc.virtnet_json("hotplug", "-i", "mlx5_0", "-f", "0x0", "-m", mac, "-t", "1500",
                                  "-n", "2", "-s", "256")
            rep = pf["sf_rep_net_device"]
            ns.run("ip", "addr", "add", f"{peer}/24", "dev", rep)
            ns.run("ip", "link", "set", "dev", rep, "up")
            vfe_rpc(svc, "bdev_malloc_create", "-b", "Malloc0", "8", "512")
            blk = vfe_rpc(svc, "controller_virtio_blk_create", "mlx5_0", "--pf_id", "0",
                          "--bdev_type", "spdk", "--bdev", "Malloc0", "--num_queues", "1")

            dom = domains("lv-pf", interfaces=[VhostUserNic(svc.socket(pf["vuid"]), mac)],
                          disks=[VhostUserDisk(blk["socket"])])
            boot(dom, "10.8.0.1")
            ping(dom, peer)
            written = write_pattern(dom)

            # pull the plug and start again: QEMU connects both sockets anew
            dom.destroy()
            assert dom.state() == "shut off"
            connected = svc.log().count("front-end connected")
            boot(dom, "10.8.0.1")
            ping(dom, peer)
            assert read_pattern(dom) == written        # the same blk function, its data kept
            assert svc.log().count("front-end connected") >= connected + 2, svc.log()[-3000:]
        finally:
            svc.stop()


def test_device_sockets_net_between_two_domains_and_blk(libvirtd, domains, controller, sockdir):
    sa, sb, sd = (str(Path(sockdir) / n) for n in ("a.sock", "b.sock", "d.sock"))
    controller([f"net,socket={sa}", f"net,socket={sb}", f"blk,socket={sd},bdev=malloc,size=8"])
    a = domains("lv-a", interfaces=[VhostUserNic(sa, "52:54:00:1f:00:01")], disks=[VhostUserDisk(sd)])
    b = domains("lv-b", interfaces=[VhostUserNic(sb, "52:54:00:1f:00:02")])
    a.start()
    b.start()
    for dom, addr in ((a, "10.9.0.1"), (b, "10.9.0.2")):
        dom.wait_booted(120)
        dom.run(f"vfe-netup eth0 {addr}/24", timeout=30, check=True)
    ping(a, "10.9.0.2")
    ping(b, "10.9.0.1")
    write_pattern(a)
    xml = libvirtd.virsh("dumpxml", "lv-a")
    assert "type='vhostuser'" in xml and "<access mode='shared'/>" in xml
