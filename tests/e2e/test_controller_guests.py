"""The controller as the seed describes it, end to end: two static PFs and a
hot-plugged PF, a QEMU guest on each function's socket, their SF
representors on an Open vSwitch bridge (a private ovs-vswitchd in a network
namespace made by the test, like the controller itself), and a peer address
in another namespace on the bridge.  Then the controller is killed with
SIGKILL under traffic and restarted: the functions come back from their
recovery files and the guests ping again without a reboot."""
from __future__ import annotations

import shutil
import tempfile
import time

import pytest

from tests.harness.netns import NetNs
from tests.harness.ovs import Ovs
from tests.harness.service import ControllerService
from vfe.guest.vm import NetDev

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(shutil.which("ovs-vswitchd") is None, reason="openvswitch-switch missing")]

PEER_IP = "10.1.0.100"


@pytest.fixture
def short_root():
    d = tempfile.mkdtemp(prefix="vfe-r-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def ping(vm, addr, count=2, timeout=20):
    rc, out = vm.run(f"ping -c {count} -W 3 {addr}", timeout=timeout)
    assert rc == 0 and f"{count} packets received" in out, out


def test_static_and_hotplug_pfs_on_ovs_then_kill_and_recover(short_root, vm_factory):
    with NetNs() as ns, NetNs() as peer:
        svc = ControllerService(short_root, ns)
        try:
            svc.start()
            hp = svc.virtnet_json("hotplug", "-i", "mlx5_0", "-f", "0x0", "-m", "0C:C4:7A:FF:22:93",
                                  "-t", "1500", "-n", "3", "-s", "1024")
            devices = svc.virtnet_json("list")["devices"]
            assert [d["function_type"] for d in devices] == ["static PF", "static PF", "hotplug PF"]
            assert devices[2]["vuid"] == hp["vuid"] and devices[2]["sf_rep_net_device"] == hp["sf_rep_net_device"]

            with Ovs(netns=ns) as ovs:
                ovs.add_bridge("br0")
                for d in devices:
                    ovs.add_port("br0", d["sf_rep_net_device"])
                    ns.run("ip", "link", "set", "dev", d["sf_rep_net_device"], "up")
                    # the ifindex `virtnet list` shows is the real netdev's
                    idx = ns.run("cat", f"/sys/class/net/{d['sf_rep_net_device']}/ifindex").stdout.strip()
                    assert int(idx) == d["sf_rep_net_ifindex"]
                ns.veth_pair("vpeer0", "vpeer1", peer=peer, peer_addr=f"{PEER_IP}/24", up=True,
                             peer_tx_csum=False)
                ovs.add_port("br0", "vpeer0")

                vms = []
                for i, d in enumerate(devices):
                    vm = vm_factory(f"g{i}", nics=[NetDev(svc.socket(d["vuid"]), mac=d["net_mac"], reconnect=1)])
                    vms.append(vm)
                for i, vm in enumerate(vms):
                    vm.wait_booted(90)
                    rc, out = vm.run(f"vfe-netup eth0 10.1.0.{i + 1}/24", timeout=30)
                    assert rc == 0, out
                a, b, c = vms
                ping(a, "10.1.0.2")
                ping(a, "10.1.0.3")
                ping(c, PEER_IP)
                ping(b, PEER_IP)

                # a TCP stream through the representors and the bridge
                rc, data_sum = a.run("vfe-mkdata /tmp/data 4096", timeout=120)
                recv = c.run_bg("vfe-recv 5001 /tmp/got")
                rc, out = a.run("vfe-send 10.1.0.3 5001 /tmp/data", timeout=300)
                assert rc == 0, out
                assert recv.wait(timeout=60) == 0
                assert recv.output().split() == [data_sum.strip(), str(4 << 20)]

                # SIGKILL under traffic, then restart: recovery brings every
                # function back (same VUID, BDF, SF, MAC, representor) and the
                # guests' links come back without a reboot
                flood = a.run_bg("ping -i 0.2 -c 1000 10.1.0.2")
                time.sleep(1)
                svc.kill()
                svc.start()
                t0 = time.monotonic()
                after = svc.virtnet_json("list")["devices"]
                keys = ("vuid", "bdf", "sf_num", "net_mac", "sf_rep_net_device", "sf_rep_net_ifindex")
                assert [{k: d[k] for k in keys} for d in after] == [{k: d[k] for k in keys} for d in devices]
                for vm, dst in ((a, "10.1.0.2"), (c, PEER_IP), (b, "10.1.0.3")):
                    while True:
                        rc, _ = vm.run(f"ping -c 1 -W 1 {dst}", timeout=10)
                        if rc == 0:
                            break
                        assert time.monotonic() - t0 < 30, f"{vm.name} cannot reach {dst} after recovery"
                recovered_in = time.monotonic() - t0
                print(f"guests pinged again {recovered_in:.1f} s after the restart")
                assert recovered_in < 5.0
                flood.kill()
                assert "recovered" in svc.log()
        finally:
            svc.stop()


def test_transitional_hotplug_pf_serves_a_legacy_guest(short_root, vm_factory):
    """`hotplug -l` (with the NV config allowing transitional devices) serves
    a guest whose driver is forced into legacy mode (virtio 0.95: no
    VERSION_1), and it passes traffic through its representor."""
    mac = "0c:c4:7a:ff:22:a0"
    with NetNs() as ns:
        svc = ControllerService(short_root, ns)
        try:
            svc.mlxconfig("s", "VIRTIO_NET_EMULATION_PF_PCI_LAYOUT=1", "VIRTIO_EMULATION_HOTPLUG_TRANS=1")
            svc.start()
            hp = svc.virtnet_json("hotplug", "-i", "mlx5_0", "-f", "0x0", "-m", mac, "-t", "1500",
                                  "-n", "2", "-s", "256", "-l")
            assert hp["transitional"] == 1
            rep = hp["sf_rep_net_device"]
            ns.run("ip", "addr", "add", "10.3.0.100/24", "dev", rep)
            ns.run("ip", "link", "set", "dev", rep, "up")
            vm = vm_factory("legacy", kernel_args="virtio_pci.force_legacy=1",
                            nics=[NetDev(svc.socket(hp["vuid"]), mac=mac, extra="disable-legacy=off")])
            vm.wait_booted(90)
            rc, feats = vm.run("cat /sys/bus/virtio/devices/virtio0/features")
            assert rc == 0 and feats.strip()[32] == "0", feats      # VERSION_1 not negotiated
            rc, out = vm.run("vfe-netup eth0 10.3.0.1/24", timeout=30)
            assert rc == 0, out
            ping(vm, "10.3.0.100", count=3)
        finally:
            svc.stop()


def test_switch_datapath_joins_functions_without_representors(short_root, vm_factory):
    """`--datapath switch`: the in-engine L2 switch joins the functions
    directly (no representor netdevs), as the issue keeps available."""
    with NetNs() as ns:
        svc = ControllerService(short_root, ns, extra=["--datapath", "switch"])
        try:
            svc.start()
            devices = svc.virtnet_json("list")["devices"]
            assert svc.virtnet_json("list")["controller"]["datapath"] == "switch"
            assert all(d["sf_rep_net_device"] not in ns.run("ip", "-br", "link").stdout for d in devices)
            a, b = (vm_factory(f"s{i}", nics=[NetDev(svc.socket(d["vuid"]), mac=d["net_mac"])])
                    for i, d in enumerate(devices[:2]))
            for i, vm in enumerate((a, b)):
                vm.wait_booted(90)
                assert vm.run(f"vfe-netup eth0 10.6.0.{i + 1}/24", timeout=30)[0] == 0
            ping(a, "10.6.0.2")
            ping(b, "10.6.0.1")
        finally:
            svc.stop()
