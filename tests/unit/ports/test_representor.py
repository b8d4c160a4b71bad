"""vfe.ports.representor: persistent TAP representors, each test in its own netns.

Nothing here touches the host's network namespace: every representor is
created inside a throw-away NetNs (``netns=`` or a child run with ``ip netns
exec``), and traffic is exchanged with that namespace's own stack.
"""
import errno
import fcntl
import os
import select
import shutil
import signal
import socket
import struct
import sys
import textwrap
import time

import pytest

from tests.harness.netns import NetNs
from vfe.ports import representor as rep_mod
from vfe.ports.representor import (IFF_MULTI_QUEUE, IFF_NO_PI, IFF_PERSIST, IFF_TAP,
                                   IFF_VNET_HDR, MAX_READ, TUNGETIFF, TUNGETVNETHDRSZ,
                                   Representor, RepresentorError, exists,
                                   list_representors, pack_vnet_hdr, parse_representor_name,
                                   representor_name, unpack_vnet_hdr, validate_name)
from vfe.virtio.constants import VIRTIO_NET_HDR_MRG_LEN

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or not shutil.which("ip"),
    reason="needs root, /dev/net/tun and iproute2 (network namespaces)")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(rep_mod.__file__))))
REP = "en3f0pf0sf1001"
GUEST_MAC = "52:54:00:00:00:02"
GUEST_IP = "10.8.0.2"
REP_MAC = "02:00:00:00:10:01"
REP_IP = "10.8.0.1"


# --- frames (plain struct, independent of the code under test) ---------------------------
def _mac(s):
    return bytes.fromhex(s.replace(":", ""))


def inet_csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def arp_request(smac, sip, tip):
    return (b"\xff" * 6 + _mac(smac) + b"\x08\x06"
            + struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, _mac(smac),
                          socket.inet_aton(sip), b"\0" * 6, socket.inet_aton(tip)))


def icmp_echo(smac, dmac, sip, dip, ident=0x4242, seq=1, payload=b"vfe-representor"):
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", inet_csum(icmp)) + icmp[4:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 1, 0x4000, 64, 1, 0,
                     socket.inet_aton(sip), socket.inet_aton(dip))
    ip = ip[:10] + struct.pack("!H", inet_csum(ip)) + ip[12:]
    return _mac(dmac) + _mac(smac) + b"\x08\x00" + ip + icmp


def is_arp(f):
    return f[12:14] == b"\x08\x06"


def is_ipv4(f, proto):
    return f[12:14] == b"\x08\x00" and f[23] == proto


def read_until(rep, pred, timeout=3.0):
    """The first (header, frame) from rep.fd that satisfies pred."""
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


# --- fixtures ---------------------------------------------------------------------
@pytest.fixture
def ns():
    with NetNs() as n:
        yield n


@pytest.fixture
def rep(ns):
    r = Representor.create(REP, netns=ns.path, mac=REP_MAC)
    yield r
    r.destroy()


def tun_getiff(fd):
    buf = bytearray(40)
    fcntl.ioctl(fd, TUNGETIFF, buf)
    name, flags = struct.unpack("16sH22x", buf)
    return name.rstrip(b"\0").decode(), flags


# --- names ------------------------------------------------------------------------
def test_name_rules():
    assert validate_name("en3f0pf0sf1001") == "en3f0pf0sf1001"
    assert validate_name("a" * 15) == "a" * 15
    for bad in ["", "a" * 16, ".", "..", "a/b", "a:b", "a b", "tap%d", "a\tb", "é" * 8]:
        with pytest.raises(ValueError):
            validate_name(bad)
    assert representor_name("en3f0pf", 0, 1001) == "en3f0pf0sf1001"
    assert parse_representor_name("en3f0pf0sf1001", "en3f0pf") == (0, 1001)
    assert parse_representor_name("en3f0pf0sfx", "en3f0pf") is None
    assert parse_representor_name("eth0", "en3f0pf") is None
    with pytest.raises(ValueError):
        representor_name("en3f0pf", 0, 10 ** 9)  # 18 characters


def test_bad_names_create_nothing(ns):
    for bad in ["x" * 16, "a/b", "tap%d"]:
        with pytest.raises(ValueError):
            Representor.create(bad, netns=ns.path)
    assert list_representors(netns=ns.path) == []


# --- create / attributes -------------------------------------------------------------
def test_create_attributes(ns, rep):
    assert rep.name == REP and rep.mac == REP_MAC and rep.ifindex > 1
    assert rep.fileno() == rep.fd >= 0
    assert fcntl.fcntl(rep.fd, fcntl.F_GETFL) & os.O_NONBLOCK
    assert fcntl.fcntl(rep.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    name, flags = tun_getiff(rep.fd)
    assert name == REP
    assert flags & (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_PERSIST) == \
        IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_PERSIST
    assert not flags & IFF_MULTI_QUEUE
    sz = bytearray(4)
    fcntl.ioctl(rep.fd, TUNGETVNETHDRSZ, sz)
    assert struct.unpack("i", sz)[0] == VIRTIO_NET_HDR_MRG_LEN == 12
    info = rep.info()
    assert info["mtu"] == 1500 and info["persist"] and not info["up"]
    assert info["ifindex"] == rep.ifindex and info["name"] == REP
    # the kernel's view: a TAP with vnet_hdr, persistent, offloads on
    detail = ns.ip("-d", "link", "show", REP)
    assert "tun type tap" in detail and "vnet_hdr on" in detail and "persist on" in detail
    features = ns.run("ethtool", "-k", REP, check=False).stdout
    if features:
        assert "tcp-segmentation-offload: on" in features
    assert exists(REP, netns=ns.path) and Representor.exists(REP, netns=ns.path)
    assert not exists("en3f0pf0sf9999", netns=ns.path)
    assert rep_mod.is_tap(REP, netns=ns.path) and not rep_mod.is_tap("lo", netns=ns.path)


def test_mtu_up_rename(ns):
    r = Representor.create("en3f0pf0sf1005", netns=ns.path, mtu=9000)
    try:
        assert r.mtu == 9000
        r.set_mtu(1400)
        assert r.info()["mtu"] == 1400
        r.rename("en3f0pf0sf1006")
        assert r.name == "en3f0pf0sf1006" and r.info()["name"] == "en3f0pf0sf1006"
        assert not exists("en3f0pf0sf1005", netns=ns.path)
        r.set_up()
        assert r.info()["up"]
        r.set_down()
        r.set_mac("02:00:00:00:aa:bb")
        assert r.mac == "02:00:00:00:aa:bb"
    finally:
        r.destroy()
    assert list_representors(netns=ns.path) == []


def test_failed_create_leaves_nothing(ns):
    with pytest.raises(RepresentorError) as ei:
        Representor.create("en3f0pf0sf1007", netns=ns.path, mtu=10)  # below the minimum 68
    assert ei.value.errno == errno.EINVAL
    assert not exists("en3f0pf0sf1007", netns=ns.path)


def test_create_existing_name_fails(ns, rep):
    with pytest.raises(RepresentorError) as ei:
        Representor.create(REP, netns=ns.path)
    assert ei.value.errno == errno.EEXIST
    ns.ip("link", "add", "vx0", "type", "veth", "peer", "name", "vx1")
    with pytest.raises(RepresentorError) as ei:
        Representor.create("vx0", netns=ns.path)
    assert ei.value.errno == errno.EEXIST
    assert tun_getiff(rep.fd)[0] == REP  # still ours, unharmed


def test_missing_netns():
    with pytest.raises(RepresentorError) as ei:
        Representor.create(REP, netns="vfe-no-such-netns-xyz")
    assert ei.value.errno == errno.ENOENT


# --- persistence, attach, destroy -------------------------------------------------------
def test_persists_across_close_and_reattaches(ns, rep):
    ifindex, mac = rep.ifindex, rep.mac
    with pytest.raises(RepresentorError) as ei:  # single queue: held by rep
        Representor.attach(REP, netns=ns.path)
    assert ei.value.errno == errno.EBUSY
    rep.close()
    rep.close()  # idempotent
    assert rep.closed and exists(REP, netns=ns.path)
    assert list_representors("en3f0pf", netns=ns.path) == [REP]
    again = Representor.attach(REP, netns=ns.path)
    try:
        assert (again.ifindex, again.mac, again.name) == (ifindex, mac, REP)
        name, flags = tun_getiff(again.fd)
        assert name == REP and flags & IFF_VNET_HDR and flags & IFF_PERSIST
        sz = bytearray(4)
        fcntl.ioctl(again.fd, TUNGETVNETHDRSZ, sz)
        assert struct.unpack("i", sz)[0] == 12
        assert fcntl.fcntl(again.fd, fcntl.F_GETFL) & os.O_NONBLOCK
    finally:
        again.destroy()
    assert not exists(REP, netns=ns.path)
    again.destroy()  # idempotent
    rep.destroy()    # the closed original: already gone, fine


def test_destroy_after_close_and_name_reuse(ns):
    r = Representor.create("en3f0pf0sf1010", netns=ns.path)
    r.close()
    r.destroy()
    assert not exists("en3f0pf0sf1010", netns=ns.path)
    # a stale object must not delete a newer netdev that reuses the name
    old = Representor.create("en3f0pf0sf1011", netns=ns.path)
    old.close()
    ns.ip("link", "del", "en3f0pf0sf1011")
    new = Representor.create("en3f0pf0sf1011", netns=ns.path)
    try:
        assert new.ifindex != old.ifindex
        old.destroy()
        assert exists("en3f0pf0sf1011", netns=ns.path)
    finally:
        new.destroy()


def test_attach_errors(ns):
    with pytest.raises(RepresentorError) as ei:
        Representor.attach("en3f0pf0sf4242", netns=ns.path)
    assert ei.value.errno == errno.ENODEV and "does not exist" in str(ei.value)
    ns.ip("link", "add", "vx0", "type", "veth", "peer", "name", "vx1")
    ns.ip("tuntap", "add", "dev", "tn0", "mode", "tun")
    for name in ("vx0", "tn0", "lo"):
        with pytest.raises(RepresentorError) as ei:
            Representor.attach(name, netns=ns.path)
        assert ei.value.errno == errno.EINVAL and "not a TAP" in str(ei.value)
    # attach never creates a device
    assert not exists("en3f0pf0sf4242", netns=ns.path)
    assert list_representors(netns=ns.path) == []


def test_attach_precreated_multiqueue_tap(ns):
    ns.ip("tuntap", "add", "dev", "en3f0pf0sf1003", "mode", "tap", "multi_queue")
    r = Representor.attach("en3f0pf0sf1003", netns=ns.path)
    try:
        assert r.multi_queue and tun_getiff(r.fd)[1] & IFF_MULTI_QUEUE
        assert "vnet_hdr on" in ns.ip("-d", "link", "show", "en3f0pf0sf1003")
    finally:
        r.destroy()
    assert not exists("en3f0pf0sf1003", netns=ns.path)


def test_list_representors(ns):
    reps = [Representor.create(n, netns=ns.path)
            for n in ("en3f0pf0sf1002", "en3f0pf0sf1001", "en3f1pf1sf1000", "en3f0pfX")]
    ns.ip("link", "add", "en3f0pf0sf1009", "type", "veth", "peer", "name", "vx1")
    try:
        assert list_representors("en3f0pf", netns=ns.path) == \
            ["en3f0pf0sf1001", "en3f0pf0sf1002", "en3f0pfX"]
        assert list_representors("en3f0pf", netns=ns.path, strict=True) == \
            ["en3f0pf0sf1001", "en3f0pf0sf1002"]
        assert len(list_representors(netns=ns.path)) == 4
    finally:
        for r in reps:
            r.destroy()


def test_survives_a_crash_in_the_current_netns(ns):
    """A controller started with `ip netns exec NS` (no netns= argument)
    creates the representor, then dies by SIGKILL; the netdev and its ifindex
    survive and a new process re-attaches."""
    child = textwrap.dedent(f"""
        import os, signal
        from vfe.ports.representor import Representor
        r = Representor.create({REP!r}, mtu=1400)
        print(r.ifindex, r.mac, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    path = os.pathsep.join(d for d in (ROOT, os.environ.get("PYTHONPATH")) if d)
    p = ns.run(sys.executable, "-c", child, check=False, env=dict(os.environ, PYTHONPATH=path))
    assert p.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), p.stderr
    ifindex, mac = p.stdout.split()
    r = Representor.attach(REP, netns=ns.path)
    try:
        assert r.ifindex == int(ifindex) and r.mac == mac and r.mtu == 1400
    finally:
        r.destroy()


# --- the fd: frames with a 12-byte virtio-net header ---------------------------------------
def test_vnet_header_round_trip_arp_and_icmp(ns, rep):
    rep.set_up()
    ns.addr_add(REP, f"{REP_IP}/24")
    # ARP: who has 10.8.0.1? -> the kernel answers through the fd
    rep.write_frame(arp_request(GUEST_MAC, GUEST_IP, REP_IP), hdr=bytes(12))
    hdr, f = read_until(rep, lambda f: is_arp(f) and f[20:22] == b"\x00\x02")
    assert hdr == (0, 0, 0, 0, 0, 0, 0)
    assert f[0:6] == _mac(GUEST_MAC) and f[6:12] == _mac(REP_MAC)
    assert f[22:28] == _mac(REP_MAC) and f[28:32] == socket.inet_aton(REP_IP)
    assert f[32:38] == _mac(GUEST_MAC) and f[38:42] == socket.inet_aton(GUEST_IP)
    # ICMP echo -> echo reply, complete checksums, zero header
    rep.write_frame(icmp_echo(GUEST_MAC, REP_MAC, GUEST_IP, REP_IP))
    hdr, f = read_until(rep, lambda f: is_ipv4(f, 1))
    assert hdr.flags == 0 and hdr.gso_type == 0 and hdr.num_buffers == 0
    ip, icmp = f[14:34], f[34:]
    assert ip[12:16] == socket.inet_aton(REP_IP) and ip[16:20] == socket.inet_aton(GUEST_IP)
    assert inet_csum(ip) == 0 and inet_csum(icmp) == 0
    assert icmp[0] == 0 and icmp[4:8] == struct.pack("!HH", 0x4242, 1)
    assert icmp[8:] == b"vfe-representor"


def test_partial_checksum_header_from_kernel(ns, rep):
    """TUN_F_CSUM is on: a local UDP send reaches the fd with NEEDS_CSUM,
    csum_start/csum_offset set and only the pseudo-header sum in the field;
    finishing it the way the engine does gives a valid checksum."""
    rep.set_up()
    ns.addr_add(REP, f"{REP_IP}/24")
    ns.ip("neigh", "replace", GUEST_IP, "lladdr", GUEST_MAC, "dev", REP)
    ns.run(sys.executable, "-c",
           f"import socket; socket.socket(2, 2).sendto(b'p' * 100, ({GUEST_IP!r}, 9999))")
    hdr, f = read_until(rep, lambda f: is_ipv4(f, 17))
    assert hdr.flags & 1 and hdr.gso_type == 0
    assert (hdr.csum_start, hdr.csum_offset) == (34, 6)
    udp = bytearray(f[34:])
    pseudo = f[26:34] + struct.pack("!BBH", 0, 17, len(udp))
    assert inet_csum(pseudo + bytes(udp)) != 0  # unfinished
    udp[6:8] = struct.pack("!H", inet_csum(bytes(udp)))  # csum over [csum_start, end)
    assert inet_csum(pseudo + bytes(udp)) == 0


def test_header_is_required_and_reads_are_whole_frames(ns, rep):
    rep.set_up()
    with pytest.raises(OSError) as ei:
        os.write(rep.fd, bytes(12) + b"\0" * 10)  # shorter than an Ethernet header
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(BlockingIOError):  # non-blocking, nothing queued
        os.read(rep.fd, MAX_READ)
    assert rep.read_frame() is None
    assert len(pack_vnet_hdr(1, 0, 0, 0, 34, 6)) == 12
    assert unpack_vnet_hdr(pack_vnet_hdr(1, 4, 54, 1448, 54, 16, 3)) == (1, 4, 54, 1448, 54, 16, 3)
