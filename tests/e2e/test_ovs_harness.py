"""Representors on a private userspace Open vSwitch, all inside throw-away netns.

Topology (everything in namespace `ns` except the peer's end of the veth):

    fd A -- en3f0pf0sf1001 --+
    fd B -- en3f0pf0sf1002 --+-- br0 (datapath_type=netdev, NORMAL) -- vb0 ==veth== vp0 [peer ns, 10.9.0.2/24]

The test writes frames into representor fds the way the engine does (12-byte
virtio-net header, zeros) and reads what OVS hands back.  Checksums: ARP,
ICMP and UDP frames are built complete in Python; the peer's veth has tx
checksum offload off so its UDP arrives complete (facts.md); the
userspace_tso test shows the other approach (partial checksum + NEEDS_CSUM).
"""
import os
import select
import shutil
import socket
import struct
import sys
import time

import pytest

from tests.harness.netns import NetNs
from tests.harness.ovs import Ovs, OvsError
from vfe.ports.representor import Representor

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                       reason="needs root and /dev/net/tun"),
    pytest.mark.skipif(not all(shutil.which(b) for b in ("ovsdb-tool", "ovsdb-server",
                                                         "ovs-vswitchd", "ovs-vsctl", "ip")),
                       reason="needs openvswitch-switch and iproute2"),
]

A_NAME, B_NAME = "en3f0pf0sf1001", "en3f0pf0sf1002"
A_MAC, A_IP = "52:54:00:00:0a:01", "10.9.0.1"   # the guests behind the representors
B_MAC, B_IP = "52:54:00:00:0b:01", "10.9.0.3"
PEER_MAC, PEER_IP = "02:00:00:00:09:02", "10.9.0.2"


# --- frames -------------------------------------------------------------------------
def _mac(s):
    return bytes.fromhex(s.replace(":", ""))


def inet_csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def arp(op, smac, sip, tip, tmac="00:00:00:00:00:00", dst="ff:ff:ff:ff:ff:ff"):
    return (_mac(dst) + _mac(smac) + b"\x08\x06"
            + struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, _mac(smac),
                          socket.inet_aton(sip), _mac(tmac), socket.inet_aton(tip)))


def ipv4(smac, dmac, sip, dip, proto, l4):
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 7, 0x4000, 64, proto, 0,
                     socket.inet_aton(sip), socket.inet_aton(dip))
    ip = ip[:10] + struct.pack("!H", inet_csum(ip)) + ip[12:]
    return _mac(dmac) + _mac(smac) + b"\x08\x00" + ip + l4


def icmp_echo(smac, dmac, sip, dip, seq=1, payload=b"through-ovs"):
    icmp = struct.pack("!BBHHH", 8, 0, 0, 0x77, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", inet_csum(icmp)) + icmp[4:]
    return ipv4(smac, dmac, sip, dip, 1, icmp)


def udp_ok(f):
    """Full UDP/IPv4 checksum check of an Ethernet frame."""
    udp = f[34:]
    pseudo = f[26:34] + struct.pack("!BBH", 0, 17, len(udp))
    return inet_csum(pseudo + udp) == 0


def is_arp(op):
    return lambda f: f[12:14] == b"\x08\x06" and f[20:22] == struct.pack("!H", op)


def is_ip(proto, dst=None):
    return lambda f: (f[12:14] == b"\x08\x00" and f[23] == proto
                      and (dst is None or f[30:34] == socket.inet_aton(dst)))


def read_until(rep, pred, timeout=3.0):
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        r = rep.read_frame()
        if r is None:
            select.select([rep.fd], [], [], 0.05)
            continue
        if pred(r[1]):
            return r
        seen.append(r[1][:42].hex())
    pytest.fail(f"no matching frame on {rep.name} within {timeout}s; saw {seen}")


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def drain(rep):
    while rep.read_frame() is not None:
        pass


# --- the topology -------------------------------------------------------------------
class Topo:
    def __init__(self, userspace_tso=False, peer_tx_csum=False):
        self.userspace_tso = userspace_tso
        self.peer_tx_csum = peer_tx_csum
        self.reps = []

    def __enter__(self):
        self.ns = NetNs().create()
        try:
            self.peer = NetNs().create()
            self.ovs = Ovs(netns=self.ns, userspace_tso=self.userspace_tso).start()
            self.ovs.add_bridge("br0")
            self.a = self._rep(A_NAME)
            self.b = self._rep(B_NAME)
            self.ns.veth_pair("vb0", "vp0", peer=self.peer, peer_addr=f"{PEER_IP}/24",
                              peer_mac=PEER_MAC, peer_tx_csum=self.peer_tx_csum)
            self.ofports = {p: self.ovs.add_port("br0", p) for p in (A_NAME, B_NAME, "vb0")}
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def _rep(self, name):
        r = Representor.create(name, netns=self.ns.path, up=True)
        self.reps.append(r)
        return r

    def __exit__(self, exc_type, exc, tb):
        ovs = getattr(self, "ovs", None)
        if exc_type is not None and ovs is not None:
            print("ovs-vswitchd.log:\n" + ovs.log()[-4000:])
        for r in self.reps:
            try:
                r.destroy()
            except Exception:
                r.close()
        if ovs is not None:
            ovs.stop()
        for n in (getattr(self, "peer", None), self.ns):
            if n is not None:
                n.delete()


# --- tests ----------------------------------------------------------------------------
def test_representor_to_namespace_and_between_representors():
    with Topo() as t:
        ovs, a, b = t.ovs, t.a, t.b
        assert sorted(ovs.ports("br0")) == sorted([A_NAME, B_NAME, "vb0"])
        assert all(p > 0 for p in t.ofports.values())

        # A's guest ARPs for the peer: the broadcast reaches B too, the reply comes back to A
        a.write_frame(arp(1, A_MAC, A_IP, PEER_IP))
        hdr, f = read_until(a, is_arp(2))
        assert hdr == (0, 0, 0, 0, 0, 0, 0)
        assert f[0:6] == _mac(A_MAC) and f[22:28] == _mac(PEER_MAC)
        assert f[28:32] == socket.inet_aton(PEER_IP)
        _, f = read_until(b, is_arp(1))
        assert f[6:12] == _mac(A_MAC)

        # ICMP echo A -> peer, reply back into A's fd with complete checksums
        a.write_frame(icmp_echo(A_MAC, PEER_MAC, A_IP, PEER_IP, seq=1))
        hdr, f = read_until(a, is_ip(1, A_IP))
        assert hdr.flags == 0 and hdr.gso_type == 0
        assert inet_csum(f[14:34]) == 0 and inet_csum(f[34:]) == 0
        assert f[34] == 0 and f[42:] == b"through-ovs"

        # peer -> A's guest: UDP with tx checksum offload off on the peer's veth arrives complete
        t.peer.run(sys.executable, "-c", "import socket; socket.socket(2, 2).sendto("
                   f"b'u' * 200, ({A_IP!r}, 7777))")
        hdr, f = read_until(a, is_ip(17, A_IP))
        assert hdr.flags == 0 and udp_ok(f)

        # A <-> B: ARP from A for B's guest, B answers by unicast, then ICMP A -> B
        drain(b)
        a.write_frame(arp(1, A_MAC, A_IP, B_IP))
        _, f = read_until(b, is_arp(1))
        assert f[38:42] == socket.inet_aton(B_IP)
        b.write_frame(arp(2, B_MAC, B_IP, A_IP, tmac=A_MAC, dst=A_MAC))
        _, f = read_until(a, is_arp(2))
        assert f[6:12] == _mac(B_MAC) and f[28:32] == socket.inet_aton(B_IP)
        frame = icmp_echo(A_MAC, B_MAC, A_IP, B_IP, seq=9, payload=b"a-to-b")
        a.write_frame(frame)
        hdr, f = read_until(b, is_ip(1, B_IP))
        assert hdr == (0, 0, 0, 0, 0, 0, 0) and f == frame

        # controller restart: close A's fd, re-attach; same netdev, same OVS port, traffic flows
        ifindex, ofport = a.ifindex, t.ofports[A_NAME]
        a.close()
        a2 = Representor.attach(A_NAME, netns=t.ns.path)
        t.reps.append(a2)
        assert a2.ifindex == ifindex and ovs.ofport(A_NAME) == ofport
        a2.write_frame(icmp_echo(A_MAC, PEER_MAC, A_IP, PEER_IP, seq=2))
        _, f = read_until(a2, is_ip(1, A_IP))
        assert f[34] == 0 and inet_csum(f[34:]) == 0


def test_userspace_tso_passes_partial_checksums():
    """userspace-tso-enable=true: the peer's partial UDP checksum reaches the
    representor fd as NEEDS_CSUM + csum_start/offset, and finishing it gives a
    valid checksum (without it the frame would arrive unfinished and unflagged)."""
    with Topo(userspace_tso=True, peer_tx_csum=True) as t:
        assert t.ovs.vsctl("get", "Open_vSwitch", ".",
                           "other_config:userspace-tso-enable").strip('"') == "true"
        a = t.a
        a.write_frame(arp(1, A_MAC, A_IP, PEER_IP))
        read_until(a, is_arp(2))
        t.peer.run(sys.executable, "-c", "import socket; socket.socket(2, 2).sendto("
                   f"b'v' * 300, ({A_IP!r}, 7777))")
        hdr, f = read_until(a, is_ip(17, A_IP))
        assert hdr.flags & 1 and (hdr.csum_start, hdr.csum_offset) == (34, 6)
        assert not udp_ok(f)
        udp = bytearray(f[34:])
        udp[6:8] = struct.pack("!H", inet_csum(bytes(udp)))
        assert udp_ok(f[:34] + bytes(udp))


def test_ovs_reports_failures_and_cleans_up():
    with NetNs() as ns:
        with Ovs(netns=ns) as ovs:
            pids = dict(ovs.pids)
            workdir = ovs.dir
            ovs.add_bridge("br0")
            with pytest.raises(OvsError, match="ofport"):
                ovs.add_port("br0", "nosuchdev0")   # add-port exits 0; ofport is -1
            ovs.del_port("br0", "nosuchdev0")
            # the kernel datapath does not exist here: add-br "succeeds", the check does not
            if not os.path.exists("/sys/module/openvswitch"):
                t0 = time.monotonic()
                with pytest.raises(OvsError, match="never assigned") as ei:
                    ovs.add_bridge("brk", datapath_type="system")
                assert "failed to create bridge brk" in str(ei.value)
                assert time.monotonic() - t0 < 3
            assert "bridge br0" in ovs.log()
            assert "br0" in ovs.vsctl("list-br").split()
            assert "actions=NORMAL" in ovs.ofctl("dump-flows", "br0")
        for pid in pids.values():
            assert not alive(pid)
        assert not workdir.exists()
        assert ns.pids() == []
