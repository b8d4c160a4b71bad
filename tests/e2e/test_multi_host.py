"""Two hosts on one machine, joined by OVN (tests/harness/ovn.py): each host a
network namespace with its own virtio-net-controller (own VFE_ROOT, so its
representors land in that namespace), its own Open vSwitch (userspace
datapath) and ovn-controller; one ovn-northd with its NB and SB databases;
a veth pair between the namespaces as the underlay, Geneve over it.  Each
function's representor is an OVN logical switch port (``iface-id``); guests
on different hosts, on one logical switch, talk to each other.

The underlay's MTU is 1600 and the guests keep 1500: a full-size guest frame
is 1558 bytes of IP once OVN encapsulates it (docs/multi-host.md, MTU).
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.test_ovs_harness import icmp_echo, is_ip, read_until
from tests.harness.netns import NetNs
from tests.harness.ovn import OvnCentral, OvnHost, missing_binaries, underlay
from tests.harness.service import ControllerService
from vfe.guest.vm import NetDev
from vfe.ports.representor import Representor

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(bool(missing_binaries()),
                                 reason=f"needs ovn-central, ovn-host, openvswitch-switch "
                                        f"(missing: {' '.join(missing_binaries())})")]

SWITCH = "ls0"
STREAM_MB = 16


@dataclass
class Host:
    """One hypervisor of the pair: namespace, OVS + ovn-controller, and (for
    the guest tests) its own virtio-net-controller."""
    name: str
    ns: NetNs
    ovn: OvnHost
    root: Path
    svc: ControllerService | None = None

    def controller(self) -> ControllerService:
        if self.svc is None:
            self.svc = ControllerService(self.root, self.ns).start()
        return self.svc

    def hotplug(self, mac: str) -> dict:
        """The seed's hotplug of a PF with ``mac``; its representor is up."""
        return self.controller().virtnet_json("hotplug", "-i", "mlx5_0", "-f", "0x0", "-m", mac,
                                              "-t", "1500", "-n", "3", "-s", "1024")


class Fabric:
    """The central node and the two hosts, torn down in reverse on exit."""

    def __init__(self, stack: contextlib.ExitStack):
        self.stack = stack
        self.central = stack.enter_context(OvnCentral())
        self.hosts: list[Host] = []
        for i, name in enumerate(("host-a", "host-b")):
            ns = stack.enter_context(NetNs())
            root = Path(tempfile.mkdtemp(prefix=f"vfe-{name[-1]}-", dir="/tmp"))
            stack.callback(shutil.rmtree, root, True)
            ovn = stack.enter_context(OvnHost(name, self.central, ns, f"172.31.0.{i + 1}"))
            host = Host(name, ns, ovn, root)
            stack.callback(self._stop_controller, host)
            self.hosts.append(host)
        underlay(self.ovn(0), self.ovn(1))

    def ovn(self, i: int) -> OvnHost:
        return self.hosts[i].ovn

    @staticmethod
    def _stop_controller(host: Host) -> None:
        if host.svc is not None:
            host.svc.stop()
            print(f"--- {host.name} controller log (tail) ---\n{host.svc.log()[-3000:]}")

    def logical_port(self, lport: str, mac: str, ip: str) -> None:
        """``lsp-add`` on the logical switch (made on first use), "MAC IP" addresses."""
        if SWITCH not in self.central.nbctl("--bare", "--columns=name", "list", "Logical_Switch").split():
            self.central.nbctl("ls-add", SWITCH)
        self.central.nbctl("lsp-add", SWITCH, lport, "--", "lsp-set-addresses", lport,
                           f"{mac.lower()} {ip}")

    def dump(self) -> str:
        """Everything a failure needs: the SB's view and each host's flows and logs."""
        parts = [self.central.sbctl("show"), self.central.logs()]
        for h in self.hosts:
            with contextlib.suppress(Exception):
                parts += [f"=== {h.name}", h.ovn.ovs.appctl("dpctl/dump-flows"), h.ovn.logs()]
        return "\n".join(parts)


@pytest.fixture
def fabric():
    with contextlib.ExitStack() as stack:
        f = Fabric(stack)
        yield f
        print(f.dump())         # shown only when the test failed (captured output)


def test_full_size_frames_cross_the_geneve_underlay(fabric):
    """Representor to representor across the hosts, no guests: a 1500-byte IP
    packet (what a guest sends at MTU 1500) arrives whole, and OVN made one
    Geneve tunnel port on each side.  With a 1500-byte underlay the
    encapsulated packet (1558 bytes) would be refused by the veth."""
    a, b = fabric.hosts
    mac_a, mac_b = "52:54:00:31:00:01", "52:54:00:31:00:02"
    fabric.logical_port("rep-a", mac_a, "10.31.0.1")
    fabric.logical_port("rep-b", mac_b, "10.31.0.2")
    reps = []
    try:
        for h in (a, b):
            reps.append(Representor.create("en3f0pf0sf2000", netns=h.ns.path, up=True))
        a.ovn.bind("en3f0pf0sf2000", "rep-a")
        b.ovn.bind("en3f0pf0sf2000", "rep-b")
        fabric.central.wait_hv()
        assert a.ovn.tunnel_ports() == ["ovn-host-b-0"] and b.ovn.tunnel_ports() == ["ovn-host-a-0"]
        chassis = fabric.central.sbctl("--bare", "--columns=chassis", "find", "Port_Binding",
                                       "logical_port=rep-b")
        assert chassis == fabric.central.sbctl("--bare", "--columns=_uuid", "find", "Chassis",
                                               "name=host-b")
        for seq, size in enumerate((64, 1472), 1):      # 1472 + 8 + 20 = 1500 bytes of IP
            frame = icmp_echo(mac_a, mac_b, "10.31.0.1", "10.31.0.2", seq=seq, payload=b"x" * size)
            reps[0].write_frame(frame)
            _, got = read_until(reps[1], is_ip(1, "10.31.0.2"), timeout=5)
            assert got == frame, f"{size}-byte payload: frame changed on the way"
    finally:
        for r in reps:
            r.destroy()


def ping(vm, addr: str, count: int = 3) -> None:
    rc, out = vm.run(f"ping -c {count} -W 3 {addr}", timeout=30)
    assert rc == 0 and f"{count} packets received" in out, out


def test_guests_on_two_hosts_ping_and_stream(fabric, vm_factory):
    """A hot-plugged PF on each host's controller, its representor on that
    host's br-int as a logical port: the guests ping each other and a 16 MiB
    TCP stream crosses the hosts with equal md5."""
    guests = []
    for i, (host, mac) in enumerate(zip(fabric.hosts, ("0C:C4:7A:FF:31:01", "0C:C4:7A:FF:31:02"))):
        dev = host.hotplug(mac)
        lport = f"vm-{host.name}"
        fabric.logical_port(lport, mac, f"10.31.1.{i + 1}")
        host.ovn.bind(dev["sf_rep_net_device"], lport)
        guests.append(vm_factory(f"g{i}", nics=[NetDev(host.svc.socket(dev["vuid"]), mac=mac)]))
    fabric.central.wait_hv()
    a, b = guests
    for i, vm in enumerate(guests):
        vm.wait_booted(120)
        rc, out = vm.run(f"vfe-netup eth0 10.31.1.{i + 1}/24", timeout=30)
        assert rc == 0, out
    ping(a, "10.31.1.2")
    ping(b, "10.31.1.1")

    rc, data_sum = a.run(f"vfe-mkdata /tmp/data {STREAM_MB * 1024}", timeout=300)
    assert rc == 0, data_sum
    recv = b.run_bg("vfe-recv 5001 /tmp/got")
    rc, out = a.run("vfe-send 10.31.1.2 5001 /tmp/data", timeout=600)
    assert rc == 0, out
    assert recv.wait(timeout=120) == 0, recv.output()
    assert recv.output().split() == [data_sum.strip(), str(STREAM_MB << 20)]
    # the stream crossed the underlay: host-a's end of the veth sent it (encapsulated)
    sent = fabric.hosts[0].ns.run("cat", "/sys/class/net/ul-host-b/statistics/tx_bytes").stdout
    assert int(sent) > STREAM_MB << 20, sent
