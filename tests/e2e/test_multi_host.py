"""Two hosts on one machine, joined by OVN (tests/harness/ovn.py): each host a
network namespace with its own virtio-net-controller (own VFE_ROOT, so its
representors land in that namespace), its own Open vSwitch (userspace
datapath) and ovn-controller; one ovn-northd with its NB and SB databases;
a veth pair between the namespaces as the underlay, Geneve over it.  Each
function's representor is an OVN logical switch port (``iface-id``); guests
on different hosts, on one logical switch, talk to each other.  Then a VM
moves between the hosts, five round trips under a TCP stream and 10 Hz
pings: once on a PF hot-plugged with `virtnet`, once on a VF provisioned
with `vhostmgmt vf -a` (VFE vDPA); OVN moves its port binding
(requested-chassis on both, activation-strategy=rarp, then the new one).

The underlay's MTU is 1600 and the guests keep 1500: a full-size guest frame
is 1558 bytes of IP once OVN encapsulates it (docs/multi-host.md, MTU).
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from tests.e2e.test_migration import free_port, migrate
from tests.e2e.test_ovs_harness import icmp_echo, is_ip, read_until
from tests.e2e.test_vfe_vdpa import PF_BDF, SEED_NV, VF_BDF, Vhostd, sriov
from tests.harness.netns import NetNs
from tests.harness.ovn import OvnCentral, OvnHost, missing_binaries, underlay
from tests.harness.service import ControllerService
from vfe.guest.vm import VM, BgJob, NetDev
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

    def controller(self, nv: tuple[str, ...] = ()) -> ControllerService:
        """The host's controller, started on first use (with NV settings ``nv``)."""
        if self.svc is None:
            svc = ControllerService(self.root, self.ns)
            if nv:
                svc.mlxconfig("s", *nv)
            self.svc = svc.start()
        return self.svc

    def hotplug(self, mac: str) -> dict:
        """The seed's hotplug of a PF with ``mac`` -> virtnet's JSON reply."""
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
        self.central.nbctl("--may-exist", "ls-add", SWITCH)
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


# -- live migration between the hosts -----------------------------------------------

MIG_PORT, MIG_MAC, MIG_IP = "vm-m", "0C:C4:7A:FF:32:01", "10.31.2.1"
PEER_PORT, PEER_MAC, PEER_IP = "vm-p", "0C:C4:7A:FF:32:02", "10.31.2.2"
ROUND_TRIPS = 5
# QEMU asks the back-end for a RARP after a migration (VHOST_USER_SEND_RARP)
# only when the guest did not negotiate GUEST_ANNOUNCE; OVN's
# activation-strategy=rarp waits for exactly that RARP on the new chassis.
NO_ANNOUNCE = "guest_announce=off"
# The stream is paced, a MiB every PACE_S, so that it flows through the
# migrations (3-4 s each here under TCG; on a slower machine the first
# several: each result says whether it ran under the stream).
PACE_S = 2.5
PACED_SEND = (f"sleep 1; i=0; while [ $i -lt {STREAM_MB} ]; do "
              f"dd if=/tmp/data bs=1048576 skip=$i count=1 2>/dev/null; sleep {PACE_S}; "
              f"i=$((i + 1)); done | nc {PEER_IP} 5001")


@dataclass
class Placement:
    """Where the migrating VM's function is on one host."""
    host: Host
    socket: str
    rep: str
    release: Callable[[], None]     # gives the function back on that host


def set_chassis(fabric: Fabric, *chassis: str) -> None:
    """The logical port's binding: one chassis, or during a move both with
    the new one held back until the VM's RARP arrives there."""
    opts = [f"requested-chassis={','.join(chassis)}"]
    if len(chassis) > 1:
        opts.append("activation-strategy=rarp")
    fabric.central.nbctl("lsp-set-options", MIG_PORT, *opts)
    fabric.central.wait_hv()


def wait_activated(fabric: Fabric, chassis: str, timeout: float = 20.0) -> None:
    """Until the new chassis saw the RARP (ovn-controller marks the binding
    activated there: options:additional-chassis-activated)."""
    deadline = time.monotonic() + timeout
    while True:
        out = fabric.central.sbctl("--bare", "--columns=options", "find", "Port_Binding",
                                   f"logical_port={MIG_PORT}")
        if f"additional-chassis-activated={chassis}" in out:
            return
        assert time.monotonic() < deadline, f"{chassis} never activated {MIG_PORT}: {out}"
        time.sleep(0.05)


def round_trips(fabric, vm_factory, guest_image, tmp_path, place, server: bool = False,
                connect=None) -> list[dict]:
    """The migrating VM starts on host-a and streams to a peer VM on host-b,
    which pings it at 10 Hz; it moves a -> b -> a ... ROUND_TRIPS times.
    ``place(host)`` provisions the function on a host -> Placement;
    ``connect(placement)`` (server-mode sockets) attaches the back-end once
    QEMU listens.  Returns per migration: QEMU's downtime, pings lost."""
    a, b = fabric.hosts
    peer_dev = b.hotplug(PEER_MAC)
    fabric.logical_port(PEER_PORT, PEER_MAC, PEER_IP)
    b.ovn.bind(peer_dev["sf_rep_net_device"], PEER_PORT)
    fabric.logical_port(MIG_PORT, MIG_MAC, MIG_IP)
    cur_place = place(a)
    a.ovn.bind(cur_place.rep, MIG_PORT)
    set_chassis(fabric, a.name)
    peer = vm_factory("peer", nics=[NetDev(b.svc.socket(peer_dev["vuid"]), mac=PEER_MAC)])
    nic = lambda p: NetDev(p.socket, mac=MIG_MAC, server=server, extra=NO_ANNOUNCE)  # noqa: E731
    cur = vm_factory("m0", qmp=True, nics=[nic(cur_place)])
    if connect:
        connect(cur_place)
    peer.wait_booted(120)
    cur.wait_booted(120)
    assert peer.run(f"vfe-netup eth0 {PEER_IP}/24", timeout=30)[0] == 0
    assert cur.run(f"vfe-netup eth0 {MIG_IP}/24", timeout=30)[0] == 0
    rc, out = peer.run(f"ping -c 2 -W 3 {MIG_IP}", timeout=20)
    assert rc == 0, out

    rc, data_sum = cur.run(f"vfe-mkdata /tmp/data {STREAM_MB * 1024}", timeout=300)
    assert rc == 0, data_sum
    recv = peer.run_bg("vfe-recv 5001 /tmp/got")
    send = cur.run_bg(PACED_SEND)        # connects after 1 s: the receiver listens by then
    pings = peer.run_bg(f"ping -i 0.1 -w 600 {MIG_IP}")
    time.sleep(2.5)
    assert send.running(), "the stream ended before the first migration"

    results = []
    hosts = [a, b]
    for i in range(2 * ROUND_TRIPS):
        src, dst_host = hosts[i % 2], hosts[(i + 1) % 2]
        seq0 = ping_seqs(pings)
        under_stream = send.running()
        t0 = time.monotonic()
        dst_place = place(dst_host)
        dst_host.ovn.bind(dst_place.rep, MIG_PORT)
        set_chassis(fabric, src.name, dst_host.name)
        port = free_port()
        dst = VM(f"m{i + 1}", tmp_path, image=guest_image, qmp=True,
                 incoming=f"tcp:127.0.0.1:{port}", nics=[nic(dst_place)])
        try:
            dst.start()
            if connect:
                connect(dst_place)
            info = migrate(cur, dst, port)
            wait_activated(fabric, dst_host.name)
        except BaseException:
            dst.shutdown()
            raise
        cur.shutdown()
        set_chassis(fabric, dst_host.name)
        src.ovn.unbind(cur_place.rep)
        cur_place.release()
        cur, cur_place = dst, dst_place
        send = BgJob(cur, send.id, send.pid, send.cmd)      # the sender now lives in the destination
        time.sleep(1.0)                                      # pings answered from the new host
        seq1 = ping_seqs(pings)
        results.append({"to": dst_host.name, "downtime_ms": info.get("downtime", -1),
                        "pings_lost": lost_between(seq0, seq1), "under_stream": under_stream,
                        "move_s": round(time.monotonic() - t0, 1)})
    assert results[0]["under_stream"]
    assert send.wait(timeout=600) == 0, send.output()
    assert recv.wait(timeout=120) == 0, recv.output()
    assert recv.output().split() == [data_sum.strip(), str(STREAM_MB << 20)]
    pings.kill()
    print(f"\nmigrations across hosts: {results}")
    return results


def ping_seqs(pings) -> set[int]:
    return {int(x) for x in re.findall(r"seq=(\d+)", pings.output())}


def lost_between(before: set[int], after: set[int]) -> int:
    """Echo requests sent after the last reply seen in ``before`` and up to the
    last reply in ``after`` that got no reply."""
    lo = max(before, default=-1) + 1
    hi = max(after, default=-1)
    return sum(1 for s in range(lo, hi + 1) if s not in after)


def report(kind: str, results: list[dict]) -> None:
    with open(os.environ.get("VFE_MIGRATION_REPORT", os.devnull), "a") as f:
        f.write(f"across-hosts {kind}: downtimes_ms={[r['downtime_ms'] for r in results]} "
                f"pings_lost={[r['pings_lost'] for r in results]} "
                f"under_stream={sum(r['under_stream'] for r in results)} "
                f"move_s={[r['move_s'] for r in results]}\n")


def test_virtnet_function_migrates_between_hosts(fabric, vm_factory, guest_image, tmp_path):
    """A hot-plugged PF (virtnet): the destination host hot-plugs the same
    function (same MAC, same options), the source unplugs its own after."""

    def place(host: Host) -> Placement:
        dev = host.hotplug(MIG_MAC)
        return Placement(host, host.svc.socket(dev["vuid"]), dev["sf_rep_net_device"],
                         lambda: host.svc.virtnet("unplug", "-u", dev["vuid"], check=True))

    results = round_trips(fabric, vm_factory, guest_image, tmp_path, place)
    report("virtnet", results)
    assert len(results) == 2 * ROUND_TRIPS


def test_vhostmgmt_vf_migrates_between_hosts(fabric, vm_factory, guest_image, tmp_path):
    """A VF provisioned with ``vhostmgmt vf -a`` (VFE vDPA: vfe-vhostd relays
    QEMU's server socket to the VF on the host's controller): the
    destination host sets the VF's MAC (``virtnet modify``) and provisions
    it onto the destination QEMU's socket; the source releases it
    (``vhostmgmt vf -r``).  QEMU listens (server=on, as in the seed), so the
    back-end attaches once QEMU runs."""
    # the seed's NV settings, plus a hot-plug port for the peer's PF
    nv = SEED_NV + ("PCI_SWITCH_EMULATION_ENABLE=1", "PCI_SWITCH_EMULATION_NUM_PORT=2")
    vhostds: dict[str, Vhostd] = {}
    sockets = iter(range(100))

    def vhostd(host: Host) -> Vhostd:
        if host.name not in vhostds:
            svc = host.controller(nv)
            sriov(svc, "-p", "0", "1")                     # the host's VF at VF_BDF
            v = vhostds[host.name] = Vhostd(svc, host.root)
            fabric.stack.callback(v.stop)
            v.start()
            assert v.mgmt_result("mgmtpf", "-a", PF_BDF)["errno"] == 0
        return vhostds[host.name]

    def place(host: Host) -> Placement:
        v = vhostd(host)
        svc = host.svc
        svc.virtnet("modify", "-p", "0", "-v", "0", "device", "-m", MIG_MAC, check=True)
        rep = svc.virtnet_json("query", "-p", "0", "-v", "0")["devices"][0]["sf_rep_net_device"]
        return Placement(host, str(host.root / f"vfe-net{next(sockets)}"), rep,
                         lambda: release(v))

    def connect(p: Placement) -> None:
        r = vhostds[p.host.name].mgmt_result("vf", "-a", VF_BDF, "-v", p.socket)
        assert r == {"errno": 0, "errstr": "Success"}, r

    def release(v: Vhostd) -> None:
        assert v.mgmt_result("vf", "-r", VF_BDF)["errno"] == 0

    for h in fabric.hosts:
        vhostd(h)
    results = round_trips(fabric, vm_factory, guest_image, tmp_path, place, server=True,
                          connect=connect)
    report("vhostmgmt", results)
    assert len(results) == 2 * ROUND_TRIPS
