"""Guests started by a real libvirtd (a private one, tests/harness/libvirt.py)
on sockets the controller provisioned, with the domain XML docs/libvirt.md
gives: ``<interface type='vhostuser'>``, ``<disk type='vhostuser'>``,
memfd-backed shared memory, ``vectors=0`` through ``<qemu:override>``.

1. Service mode: a hot-plugged PF (``virtnet hotplug``) and a blk function
   (``vfe-rpc controller_virtio_blk_create`` on a malloc bdev) in one domain;
   the guest pings an address on the PF's representor and writes a pattern
   to the disk.  ``virsh destroy`` + ``virsh start``: both sockets are taken
   again, the guest pings and reads its pattern back.
2. ``--device`` sockets: two domains on two ``net`` sockets ping each other
   (one the controller listens on, one it connects to: ``client=on``, QEMU
   the server); one has a ``--device blk`` disk and reads back what it wrote.
3. The seed's VFE vDPA ``<qemu:commandline>`` block (QEMU the server on
   /tmp/vfe-net0-like paths) with docs/libvirt.md's substitutions: vfe-vhostd
   --client relays it to an SR-IOV VF, provisioned with vhostmgmt; the guest
   pings the VF's representor.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.e2e.test_vfe_vdpa import PF_BDF, SEED_MAC, SEED_NV, VF_BDF, Vhostd, sriov
from tests.harness.libvirt import GuestDomain, Libvirtd, VhostUserDisk, VhostUserNic, libvirtd_available
from tests.harness.netns import NetNs
from tests.harness.service import BLK_PF_NV, ControllerService

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not libvirtd_available(),
                                 reason="libvirtd/virsh missing (apt libvirt-daemon-system, scripts/setup)")]

PATTERN_KB = 256          # the disk pattern: small, TCG is slow

# The seed's VFE vDPA block ("Add a virtio-net interface and a virtio-blk
# interface in vm xml"), verbatim.
SEED_COMMANDLINE = """<qemu:commandline> <qemu:arg value='-chardev'/> <qemu:arg value='socket,id=char0,\
path=/tmp/vfe-net0,server=on'/> <qemu:arg value='-netdev'/> <qemu:arg value='type=vhost-user,id=vdpa,\
chardev=char0,queues=4'/> <qemu:arg value='-device'/> <qemu:arg value='virtio-net-pci,netdev=vdpa,\
mac=00:00:00:00:33:00,page-per-vq=on,rx_queue_size=1024,tx_queue_size=1024,mq=on'/> <qemu:arg \
value='-chardev'/> <qemu:arg value='socket,id=char1,path=/tmp/vfe-blk0,server=on'/> <qemu:arg \
value='-device'/> <qemu:arg value='vhost-user-blk-pci,chardev=char1,page-per-vq=on,num-queues=4,\
disable-legacy=on,disable-modern=off'/> </qemu:commandline>"""
BLK_PF_BDF, BLK_VF_BDF = "0000:a0:00.0", "0000:b0:00.0"    # the seed's 0000:af:00.3 / 0000:af:05.1


def seed_qemu_args(net_sock: str, blk_sock: str) -> list[str]:
    """The seed's arguments with docs/libvirt.md's substitutions: the two
    socket paths, and vectors=0 on virtio-net-pci under TCG (facts.md)."""
    args = re.findall(r"<qemu:arg value='([^']*)'/>", SEED_COMMANDLINE)
    assert len(args) == 10, args
    subst = {"/tmp/vfe-net0": net_sock, "/tmp/vfe-blk0": blk_sock}
    args = [re.sub(r"path=([^,]*)", lambda m: "path=" + subst[m[1]], a) for a in args]
    return [a + ",vectors=0" if a.startswith("virtio-net-pci,") else a for a in args]


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
            svc.mlxconfig("s", *BLK_PF_NV)
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
    # b's device is the client of QEMU's socket (client=on; <source mode='server'>)
    ctl = controller([f"net,socket={sa}", f"net,socket={sb},client=on", f"blk,socket={sd},bdev=malloc,size=8"])
    a = domains("lv-a", interfaces=[VhostUserNic(sa, "52:54:00:1f:00:01")], disks=[VhostUserDisk(sd)])
    b = domains("lv-b", interfaces=[VhostUserNic(sb, "52:54:00:1f:00:02", mode="server")])
    a.start()
    b.start()
    for dom, addr in ((a, "10.9.0.1"), (b, "10.9.0.2")):
        dom.wait_booted(120)
        dom.run(f"vfe-netup eth0 {addr}/24", timeout=30, check=True)
    ping(a, "10.9.0.2")
    ping(b, "10.9.0.1")
    write_pattern(a)
    assert "net1: front-end connected" in ctl.log()
    xml = libvirtd.virsh("dumpxml", "lv-a")
    assert "type='vhostuser'" in xml and "<access mode='shared'/>" in xml


def test_seed_vfe_vdpa_commandline_block(libvirtd, domains, short_root):
    """The seed's order: DPU side, vfe-vhostd --client, provisioning
    (`vhostmgmt vf -a ... -v SOCKET` before the socket exists), then
    `virsh start`; QEMU (server=on) starts once vfe-vhostd connected."""
    root, peer = Path(short_root), "10.7.0.100"
    net_sock, blk_sock = str(root / "vfe-net0"), str(root / "vfe-blk0")
    with NetNs() as ns:
        svc = ControllerService(root / "root", ns)
        vhostd = Vhostd(svc, root)
        try:
            svc.mlxconfig("s", *SEED_NV)
            svc.start()
            sriov(svc, "-p", "0", "1")
            rep = svc.virtnet_json("query", "-p", "0", "-v", "0")["devices"][0]["sf_rep_net_device"]
            ns.run("ip", "addr", "add", f"{peer}/24", "dev", rep)
            ns.run("ip", "link", "set", "dev", rep, "up")
            svc.virtnet("modify", "-p", "0", "-v", "0", "device", "-m", SEED_MAC, check=True)
            svc.virtnet("modify", "-p", "0", "-v", "0", "device", "-q", "1024", check=True)
            vfe_rpc(svc, "bdev_null_create", "Null0", "1024", "512")
            vfe_rpc(svc, "controller_virtio_blk_create", "--pf_id", "0", "--bdev_type", "spdk", "mlx5_0",
                    "--bdev", "Null0", "--num_queues", "1", "--admin_q")
            vfe_rpc(svc, "bdev_null_create", "Null1", "64", "512")      # its own bdev (Null0 could serve it too)
            vfe_rpc(svc, "controller_virtio_blk_create", "mlx5_0", "--pf_id", "0", "--vf_id", "0",
                    "--bdev_type", "spdk", "--bdev", "Null1", "--force_in_order", "--num_queues", "4")

            vhostd.start()
            for pf_bdf, vf_bdf, sock in ((PF_BDF, VF_BDF, net_sock), (BLK_PF_BDF, BLK_VF_BDF, blk_sock)):
                assert vhostd.mgmt_result("mgmtpf", "-a", pf_bdf)["errno"] == 0
                assert vhostd.mgmt_result("vf", "-a", vf_bdf, "-v", sock)["errno"] == 0

            dom = domains("lv-seed", qemu_args=seed_qemu_args(net_sock, blk_sock))
            boot(dom, "10.7.0.1")
            assert dom.run("cat /sys/class/net/eth0/address", check=True)[1].strip() == SEED_MAC
            ping(dom, peer)
            assert dom.run("cat /sys/block/vda/size", check=True)[1].strip() == str(64 * 2048)
            zeros = dom.run("dd if=/dev/zero bs=64k count=4 2>/dev/null | md5sum", check=True)[1]
            assert dom.run("dd if=/dev/vda bs=64k count=4 iflag=direct 2>/dev/null | md5sum",
                           timeout=60, check=True)[1] == zeros
            assert "front-end relayed by vfe-vhostd" in svc.log()
        finally:
            vhostd.stop()
            svc.stop()
