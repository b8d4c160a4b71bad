"""vhost-user protocol tests against a real virtio-net-controller process:
the Python front-end (vfe.testing.frontend, QEMU's part) over real unix
sockets with real fds (memfds, eventfds).

One daemon serves the whole module (devices a: 2 queue pairs, b: 2 queue
pairs, c: 1 queue pair; net0, net1, net2 in the log).  Every test gets
fresh front-ends on b and c (``peers``); ``daemon_guard`` fails a test
after which the daemon died or logged a traceback.

Acceptance: each handler QEMU uses answers correctly; fd passing works;
wrong sizes, unknown and out-of-order requests get REPLY_ACK failures where
negotiated (else the connection is dropped), never a crash; a front-end
that disconnects at any step leaves the daemon serving the other devices
and the socket ready for a new front-end; fds and mappings do not leak.
"""
from __future__ import annotations

import os
import select
import socket
import struct
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import pytest

from tests.protocol.daemon_helpers import (
    MiB, Cut, Memfd, ack_value, close_frontend, cut_after, daemon_fixtures, exchange,
    expect_dropped, frame, new_token, open_frontend, qemu_start_sequence, recv_token, send_one,
)

from vfe.devices.net import NET_FEATURES, NET_PROTOCOL_FEATURES, rarp_frame
from vfe.testing.channel import DEFAULT_PROTOCOL_FEATURES, NackError
from vfe.testing.guest_ram import GuestRam
from vfe.vhost.actions import DeviceSpec
from vfe.vhost.framing import MAX_PAYLOAD_SIZE
from vfe.vhost.messages import (
    HEADER, NEED_REPLY, REPLY_FLAGS, VERSION, Config, Log, MemoryRegion, MemTable,
    ProtocolFeature, Request, SingleMemRegion, U64, VringAddr, VringFile, VringState,
)
from vfe.virtio.constants import F, bit

PF = ProtocolFeature
NO_REPLY_ACK = DEFAULT_PROTOCOL_FEATURES & ~bit(PF.REPLY_ACK)

daemon, daemon_guard = daemon_fixtures({"a": "queues=2", "b": "queues=2", "c": ""})


@pytest.fixture
def peers(daemon):
    """Running front-ends on devices b (2 pairs) and c (1 pair), RX posted;
    they have talked to each other once (the switch knows their MACs)."""
    b = open_frontend(daemon, "b", 2)
    c = open_frontend(daemon, "c", 1)
    made = [b, c]
    try:
        exchange(b, c)
        yield SimpleNamespace(b=b, c=c)
    finally:
        for fe in made:
            close_frontend(daemon, fe)


@pytest.fixture
def frontends(daemon):
    """open(dev, ...) -> Frontend; every one is closed (and detached) at teardown."""
    made = []

    def open_(dev="a", queue_pairs=2, **kw):
        fe = open_frontend(daemon, dev, queue_pairs, **kw)
        made.append(fe)
        return fe

    yield open_
    for fe in made:
        close_frontend(daemon, fe)


def others_still_served(daemon, peers) -> None:
    """b and c pass frames both ways, and device a's socket takes a new
    front-end that works (frames both ways with b)."""
    exchange(peers.b, peers.c)
    exchange(peers.c, peers.b)
    a = open_frontend(daemon, "a", 2)
    try:
        exchange(a, peers.b)
    finally:
        close_frontend(daemon, a)


def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


# ---------------------------------------------------------------------------
# Handlers


def test_start_sequence_is_the_one_the_cut_tests_replay(daemon, peers, frontends):
    a = frontends("a", 2, start=False)
    a.start(queue_pairs=2, queue_size=256, mem_size=8 * MiB)
    assert [Request(r).name for r, *_ in a.sent] == qemu_start_sequence(2)
    for p in range(2):
        a.post_rx_buffers(p)
    exchange(a, peers.b)


def test_get_features_protocol_features_queue_num_and_mem_slots(daemon, frontends):
    a = frontends("a", start=False)
    assert a.get_features() == NET_FEATURES
    assert a.get_protocol_features() == NET_PROTOCOL_FEATURES
    a.set_protocol_features(NET_PROTOCOL_FEATURES)
    assert a.get_queue_num() == 2                       # queues=2
    assert a.get_max_mem_slots() == DeviceSpec(0, 0, 0, 0).max_mem_slots
    c = frontends("c", start=False)
    c.get_features()
    c.set_protocol_features(c.get_protocol_features())
    assert c.get_queue_num() == 1                       # default queues


def test_every_request_acked_when_asked(daemon, peers, frontends):
    """ack_all: NEED_REPLY on every request without a reply of its own; the
    whole QEMU start, a stop and a restart are acked with 0."""
    a = frontends("a", 2, ack_all=True)
    acked = [r for r, flags, *_ in a.sent if flags & NEED_REPLY]
    assert {Request(r).name for r in acked} >= {
        "SET_VRING_CALL", "SET_FEATURES", "SET_STATUS", "ADD_MEM_REG",
        "SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK", "SET_VRING_ENABLE"}
    assert ack_value(a.send_message(Request.SET_OWNER, need_reply=True)) == 0   # idempotent
    exchange(a, peers.b)
    a.stop()
    for i in range(4):
        a.setup_ring(i, 256)
        a.set_vring_enable(i, True)
    err = eventfd()
    a.set_vring_err(0, err)                 # held by the daemon, acked
    os.close(err)
    exchange(a, peers.b)


def test_get_vring_base_is_exact_after_traffic_and_restart_continues(daemon, peers, frontends):
    a, b = frontends("a", 2), peers.b
    exchange(a, b)                                       # one frame each way per pair
    tokens = []
    for _ in range(10):
        tokens.append(new_token())
        a.send_frame(0, frame(b.mac, a.mac, tokens[-1]))
    got = []
    deadline = time.monotonic() + 3
    while len(got) < 10 and time.monotonic() < deadline:
        got += [f for f in b.recv_frames(0, timeout=0.2) if any(t in f for t in tokens)]
    assert len(got) == 10
    assert a.wait_tx_done(0)
    bases = a.stop()
    assert bases == {0: 1, 1: 11, 2: 1, 3: 1}
    for i, base in bases.items():
        assert base == a.rings[i].driver.used_idx(), f"ring {i}: base {base} != used->idx"
    # restart from those bases (SET_VRING_BASE carries them) and go on
    for i in range(4):
        a.setup_ring(i, 256)
        a.set_vring_enable(i, True)
    a.sync()
    exchange(a, b)
    assert a.stop() == {0: 2, 1: 12, 2: 2, 3: 2}


def test_get_vring_base_is_exact_with_frames_in_flight(daemon, frontends):
    """Stop a TX ring in the middle of 200 frames (the receiver has room for
    8, so the sender's ring stalls with chains still available): the base
    equals used->idx, the engine does not touch the ring afterwards, and
    after the restart every chain not consumed before the stop is delivered
    exactly once, in order (none twice, none lost)."""
    a = frontends("a", 2)
    b = frontends("b", 2, post_rx=False)
    b.post_rx_buffers(0, 8)
    b.post_rx_buffers(1)
    exchange(a, b)                                   # a's TX ring 1: 1 chain used
    tokens = [new_token() for _ in range(200)]
    for t in tokens:
        a.send_frame(0, frame(b.mac, a.mac, t))
    ring = a.rings[1]
    # the worker may be asleep when the frames go in (it sleeps when idle):
    # let it take the 8 the receiver has room for, then stop mid-stream
    deadline = time.monotonic() + 5
    while ring.driver.used_idx() < 9 and time.monotonic() < deadline:
        time.sleep(0.005)
    base = a.get_vring_base(1)
    assert base == ring.driver.used_idx(), "GET_VRING_BASE != used->idx of the stopped ring"
    assert 9 <= base < 201, f"base {base}: the ring was not stopped mid-stream"
    time.sleep(0.1)
    assert ring.driver.used_idx() == base, "the engine used the ring after GET_VRING_BASE"
    got = b.recv_frames(0, timeout=0.2, count=8)     # room for the rest (reposted)
    b.post_rx_buffers(0)
    a.setup_ring(1, 256)
    a.set_vring_enable(1, True)
    a.sync()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        got += b.recv_frames(0, timeout=0.2, count=200)
        if any(tokens[-1] in f for f in got):
            break
    seen = [next(i for i, t in enumerate(tokens) if t in f) for f in got
            if any(t in f for t in tokens)]
    assert seen == sorted(set(seen)), "frames duplicated or reordered"
    consumed_before_stop = base - 1                  # chains 1 .. base-1 were frames 0 .. base-2
    assert set(range(consumed_before_stop, 200)) <= set(seen), "chains lost across the stop"
    assert set(range(8)) <= set(seen)
    assert a.wait_tx_done(0)
    assert a.get_vring_base(1) == 201


def test_set_log_base_is_answered_and_the_log_is_mapped(daemon, peers, frontends):
    a = frontends("a", 2)
    log = Memfd(64 * 1024)
    try:
        reply = a.send_message(Request.SET_LOG_BASE, Log(64 * 1024, 0).encode(), [log.fd])
        assert reply is not None and U64.decode(reply.payload).value == 0
        assert any("memfd:vfe-test-aux" in m for m in daemon.maps())
        efd = eventfd()
        assert ack_value(a.send_message(Request.SET_LOG_FD, b"", [efd], need_reply=True)) == 0
        os.close(efd)
        exchange(a, peers.b)
    finally:
        log.close()
    close_frontend(daemon, a)
    assert not any("memfd:vfe-test-aux" in m for m in daemon.maps()), "log stays mapped"


def test_set_status_then_get_status(daemon, frontends):
    a = frontends("a", start=False)
    a.negotiate()
    for status in (0x0B, 0x0F, 0):
        a.set_status(status)
        assert a.get_status() == status


def test_send_rarp_reaches_the_other_devices_only(daemon, peers, frontends):
    a = frontends("a", 2)
    mac = bytes.fromhex("52540012abcd")
    assert ack_value(a.send_message(Request.SEND_RARP, mac + b"\0\0", need_reply=True)) == 0
    want = rarp_frame(mac)
    for fe in (peers.b, peers.c):
        got = recv_token(fe, want, timeout=2)
        assert got is not None, f"{fe.dev} did not get the RARP"
        assert got[1] == want
    assert recv_token(a, want, timeout=0.2) is None, "the RARP came back to its sender"
    # the switch learnt the MAC on a's port: unicast to it reaches a
    token = new_token()
    peers.b.send_frame(0, frame(mac, peers.b.mac, token))
    assert recv_token(a, token, timeout=2) is not None


def test_net_set_mtu_acked_and_out_of_range_refused(daemon, peers, frontends):
    a = frontends("a", 2)
    for mtu in (9000, 68, 65535, 1500):
        a.net_set_mtu(mtu)
    for mtu in (67, 65536, 0):
        with pytest.raises(NackError):
            a.net_set_mtu(mtu)
    exchange(a, peers.b)


def test_vring_enable_steers_rx(daemon, peers, frontends):
    """SET_VRING_ENABLE 0 on RX ring 0: b's pair-0 traffic lands on pair 1."""
    a, b = frontends("a", 2), peers.b
    exchange(a, b)
    a.set_vring_enable(0, False)
    a.sync()
    assert send_one(b, 0, a) == 1
    a.set_vring_enable(0, True)
    a.sync()
    assert send_one(b, 0, a) == 0


def test_kick_and_call_eventfds_are_the_ones_passed(daemon, peers, frontends):
    """fd passing: the daemon signals our call eventfd, and our kick wakes
    the sleeping adaptive worker (no kick: up to 1 s of latency)."""
    a, b = frontends("a", 2), peers.b
    exchange(a, b)
    rx = a.rings[0]
    for _ in range(3):
        time.sleep(0.05)                       # the worker goes to sleep on the kick fds
        try:
            os.eventfd_read(rx.call_fd)
        except BlockingIOError:
            pass
        rx.driver.enable_interrupts()
        token = new_token()
        t0 = time.monotonic()
        b.send_frame(0, frame(a.mac, b.mac, token))       # b's kick wakes the worker
        ready, _, _ = select.select([rx.call_fd], [], [], 2)
        assert ready, "no interrupt on the call eventfd"
        assert time.monotonic() - t0 < 0.5
        assert recv_token(a, token, 1, [0]) is not None
        time.sleep(0.05)
        t0 = time.monotonic()
        send_one(a, 1, b, timeout=0.5)                    # a's kick
        assert time.monotonic() - t0 < 0.5


# ---------------------------------------------------------------------------
# Memory tables


def _write_span(ram: GuestRam, gpa: int, data: bytes) -> None:
    """Write across region ends (regions are contiguous in gpa)."""
    while data:
        r, off = ram.region_of(gpa)
        n = min(len(data), r.size - off)
        r.view[off:off + n] = data[:n]
        gpa, data = gpa + n, data[n:]


def _read_span(ram: GuestRam, gpa: int, length: int) -> bytes:
    out = b""
    while length:
        r, off = ram.region_of(gpa)
        n = min(length, r.size - off)
        out += bytes(r.view[off:off + n])
        gpa, length = gpa + n, length - n
    return out


def _ram_for_crossing(size: int, regions: int, shared_fd: bool) -> GuestRam:
    """Regions contiguous in gpa; rings and slot buffers go to the last two
    regions; the first ones are free for buffers that straddle region ends."""
    ram = GuestRam(size, regions, shared_fd=shared_fd)
    for r in ram.regions[:-2]:
        r.used = r.size
    return ram


def _cross_region_traffic(a, b, ram: GuestRam) -> None:
    """A TX chain whose pieces straddle the ends of regions 0, 1 and 2, and
    an RX buffer across the end of region 3 (a's RX ring 0 has no other
    buffers): both frames arrive intact."""
    starts = [r.gpa for r in ram.regions]
    token = new_token()
    f = frame(b.mac, a.mac, token, 1400)
    data = bytes(a.net_hdr_len) + f
    cuts = [(starts[1] - 10, 40), (starts[2] - 300, 700), (starts[3] - 1, len(data) - 740)]
    bufs, pos = [], 0
    for gpa, n in cuts:
        _write_span(ram, gpa, data[pos:pos + n])
        bufs.append((gpa, n, False))
        pos += n
    assert pos == len(data)
    tx = a.rings[1]
    tx.driver.add_chain(bufs, token=[])
    os.eventfd_write(tx.kick_fd, 1)
    got = recv_token(b, token, 2)
    assert got is not None and got[1] == f, "TX chain across regions"
    assert a.wait_tx_done(0)

    rx = a.rings[0]
    buf_gpa = starts[4] - 1000
    _write_span(ram, buf_gpa, bytes(2048))
    rx.driver.add_chain([(buf_gpa, 2048, True)], token=("cross", 2048))
    os.eventfd_write(rx.kick_fd, 1)
    token = new_token()
    f = frame(a.mac, b.mac, token, 1200)
    b.send_frame(0, f)
    deadline = time.monotonic() + 2
    used = []
    while not used and time.monotonic() < deadline:
        used = rx.driver.get_used()
        time.sleep(0.005)
    assert len(used) == 1 and used[0].token == ("cross", 2048), used
    assert used[0].length == a.net_hdr_len + len(f)
    got = _read_span(ram, buf_gpa, used[0].length)
    assert got[a.net_hdr_len:] == f, "RX buffer across regions"


def test_set_mem_table_with_8_regions_and_buffers_across_regions(daemon, peers, frontends):
    a = frontends("a", 2, start=False)
    a.memory = _ram_for_crossing(32 * MiB, 8, shared_fd=True)
    a.start(queue_pairs=2, queue_size=256, use_add_mem_reg=False)
    assert Request.SET_MEM_TABLE in [r for r, *_ in a.sent]
    assert Request.ADD_MEM_REG not in [r for r, *_ in a.sent]
    a.post_rx_buffers(1)
    exchange(a, peers.b, a_pairs=[0, 1], b_pairs=[1])
    _cross_region_traffic(a, peers.b, a.memory)
    # the same table again (older QEMUs send one per queue pair): a no-op
    a.set_mem_table(a.memory.regions)
    exchange(a, peers.b, a_pairs=[0, 1], b_pairs=[1])


def test_ten_regions_with_add_mem_reg_and_rem_mem_reg(daemon, peers, frontends):
    a = frontends("a", 2, start=False)
    a.memory = _ram_for_crossing(40 * MiB, 10, shared_fd=False)
    a.start(queue_pairs=2, queue_size=256)
    assert [r for r, *_ in a.sent].count(Request.ADD_MEM_REG) == 10
    assert len(daemon.guest_maps()) >= 10
    a.post_rx_buffers(1)
    exchange(a, peers.b, a_pairs=[0, 1], b_pairs=[1])
    _cross_region_traffic(a, peers.b, a.memory)
    # remove an unused region under running rings, then add it back
    spare = a.memory.regions[5]
    a.rem_mem_reg(spare)
    exchange(a, peers.b, a_pairs=[0, 1], b_pairs=[1])
    a.add_mem_reg(spare)
    exchange(a, peers.b, a_pairs=[0, 1], b_pairs=[1])


def test_rings_set_up_before_the_memory_table_start_once_it_arrives(daemon, peers, frontends):
    """Out of QEMU's order but legal: NUM/BASE/ADDR/KICK first, memory last."""
    a = frontends("a", 2, start=False)
    a.negotiate()
    a.memory = GuestRam(8 * MiB, 1)
    a.set_features(a.backend_features & ~(bit(F.VHOST_LOG_ALL) | bit(F.RING_PACKED)))
    for i in range(4):
        a.setup_ring(i, 256)
    a.sync()
    assert a.get_vring_base(0) == 0           # not running yet: answered at once
    a.setup_ring(0, 256)
    for r in a.memory.regions:
        a.add_mem_reg(r)
    for i in range(4):
        a.set_vring_enable(i, True)
    a.sync()
    for p in range(2):
        a.post_rx_buffers(p)
    exchange(a, peers.b)


def test_failed_mem_table_mapping_is_not_remembered(daemon, peers, frontends):
    """SET_MEM_TABLE whose fd cannot be mapped (file shorter than the
    region) is refused (REPLY_ACK 1).  QEMU then retries with the same
    table and a good fd: that must map it, and rings must run."""
    a = frontends("a", 2, start=False)
    a.negotiate()
    a.memory = GuestRam(8 * MiB, 1)
    region = a.memory.regions[0]
    short = Memfd(4096)
    try:
        with pytest.raises(NackError):
            a._request(Request.SET_MEM_TABLE, MemTable((region.to_message(),)).encode(),
                       [short.fd], ack=True)
    finally:
        short.close()
    a.start(queue_pairs=2, queue_size=256, use_add_mem_reg=False)   # same table, good fd
    for p in range(2):
        a.post_rx_buffers(p)
    exchange(a, peers.b)


def test_failed_add_mem_reg_mapping_is_not_remembered(daemon, peers, frontends):
    a = frontends("a", 2, start=False)
    a.negotiate()
    a.memory = GuestRam(8 * MiB, 1)
    region = a.memory.regions[0]
    short = Memfd(4096)
    try:
        with pytest.raises(NackError):
            a._request(Request.ADD_MEM_REG, SingleMemRegion(region.to_message()).encode(),
                       [short.fd], ack=True)
    finally:
        short.close()
    a.start(queue_pairs=2, queue_size=256)                           # same region, good fd
    for p in range(2):
        a.post_rx_buffers(p)
    exchange(a, peers.b)


# ---------------------------------------------------------------------------
# Bad requests


@dataclass
class Bad:
    """A request the daemon must refuse.  ``make(fe, fds)`` returns
    (request, payload, fds to send); fds it creates go in ``fds`` to be
    closed by the test (the daemon gets its own copies)."""

    make: Callable
    running: bool = False          # send it with the rings running
    flags: int | None = None       # header flags override (NEED_REPLY added in ack mode)


def _fd(fds: list) -> int:
    fd = eventfd()
    fds.append(fd)
    return fd


def _memfd(fds: list, size: int = 1 * MiB) -> int:
    fd = os.memfd_create("vfe-test-bad", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    fds.append(fd)
    return fd


def _region(gpa: int, size: int, uva: int = 0x7F0000000000, off: int = 0) -> MemoryRegion:
    return MemoryRegion(gpa, size, uva + gpa, off)


BAD = {
    "payload-too-short": Bad(lambda fe, fds: (Request.SET_VRING_NUM, b"\0" * 4, [])),
    "payload-too-long": Bad(lambda fe, fds: (Request.SET_FEATURES, bytes(16), [])),
    "addr-payload-truncated": Bad(lambda fe, fds: (Request.SET_VRING_ADDR, bytes(32), [])),
    "mem-table-size-vs-count": Bad(lambda fe, fds: (
        Request.SET_MEM_TABLE, struct.pack("<II", 2, 0) + _region(0, MiB).encode(),
        [_memfd(fds)])),
    "unknown-request-99": Bad(lambda fe, fds: (99, b"", [])),
    "unknown-request-0": Bad(lambda fe, fds: (0, U64(0).encode(), [])),
    "unsupported-SET_VRING_ENDIAN": Bad(lambda fe, fds: (
        Request.SET_VRING_ENDIAN, VringState(0, 0).encode(), [])),
    "ring-index-too-big": Bad(lambda fe, fds: (Request.SET_VRING_NUM, VringState(4, 256).encode(), [])),
    "kick-ring-index-too-big": Bad(lambda fe, fds: (
        Request.SET_VRING_KICK, VringFile(4, False).encode(), [_fd(fds)])),
    "ring-size-not-power-of-2": Bad(lambda fe, fds: (
        Request.SET_VRING_NUM, VringState(0, 100).encode(), [])),
    "ring-size-above-queue-size": Bad(lambda fe, fds: (
        Request.SET_VRING_NUM, VringState(0, 2048).encode(), [])),
    "ring-addr-misaligned": Bad(lambda fe, fds: (
        Request.SET_VRING_ADDR, VringAddr(0, 0, 0x1008, 0x3000, 0x2000, 0).encode(), [])),
    "vring-base-above-65535": Bad(lambda fe, fds: (
        Request.SET_VRING_BASE, VringState(0, 0x10000).encode(), [])),
    "vring-enable-2": Bad(lambda fe, fds: (Request.SET_VRING_ENABLE, VringState(0, 2).encode(), [])),
    "features-not-offered": Bad(lambda fe, fds: (
        Request.SET_FEATURES, U64(NET_FEATURES | bit(63)).encode(), [])),
    "protocol-features-not-offered": Bad(lambda fe, fds: (
        Request.SET_PROTOCOL_FEATURES, U64(bit(PF.BACKEND_REQ)).encode(), [])),
    "protocol-feature-not-negotiated": Bad(lambda fe, fds: (
        Request.SET_BACKEND_REQ_FD, b"", [_fd(fds)])),
    "set-config-not-negotiated": Bad(lambda fe, fds: (
        Request.SET_CONFIG, Config(0, 4, 0, bytes(4)).encode(), [])),
    "kick-without-fd": Bad(lambda fe, fds: (Request.SET_VRING_KICK, VringFile(0, False).encode(), [])),
    "kick-fd-with-nofd-bit": Bad(lambda fe, fds: (
        Request.SET_VRING_KICK, VringFile(0, True).encode(), [_fd(fds)])),
    "call-with-two-fds": Bad(lambda fe, fds: (
        Request.SET_VRING_CALL, VringFile(0, False).encode(), [_fd(fds), _fd(fds)])),
    "mem-table-fewer-fds-than-regions": Bad(lambda fe, fds: (
        Request.SET_MEM_TABLE, MemTable((_region(0, MiB), _region(2 * MiB, MiB))).encode(),
        [_memfd(fds)])),
    "mem-table-overlapping-regions": Bad(lambda fe, fds: (
        Request.SET_MEM_TABLE, MemTable((_region(0, MiB), _region(MiB // 2, MiB))).encode(),
        [_memfd(fds), _memfd(fds)])),
    "mem-table-zero-size-region": Bad(lambda fe, fds: (
        Request.SET_MEM_TABLE, MemTable((_region(0, 0),)).encode(), [_memfd(fds)])),
    "mem-table-without-fds": Bad(lambda fe, fds: (
        Request.SET_MEM_TABLE, MemTable((_region(0, MiB),)).encode(), [])),
    "add-mem-reg-without-fd": Bad(lambda fe, fds: (
        Request.ADD_MEM_REG, SingleMemRegion(_region(0, MiB)).encode(), [])),
    "rem-mem-reg-unknown-region": Bad(lambda fe, fds: (
        Request.REM_MEM_REG, SingleMemRegion(_region(1 << 40, MiB)).encode(), [])),
    "status-above-0xff": Bad(lambda fe, fds: (Request.SET_STATUS, U64(0x100).encode(), [])),
    "header-version-2": Bad(lambda fe, fds: (Request.SET_OWNER, b"", []), flags=0x2),
    "reply-flag-on-a-request": Bad(lambda fe, fds: (Request.SET_OWNER, b"", []), flags=0x5),
    "set-vring-base-on-running-ring": Bad(lambda fe, fds: (
        Request.SET_VRING_BASE, VringState(1, 5).encode(), []), running=True),
    "features-changed-while-running": Bad(lambda fe, fds: (
        Request.SET_FEATURES, U64(fe.features & ~bit(F.RING_EVENT_IDX)).encode(), []), running=True),
    "overlapping-region-added-while-running": Bad(lambda fe, fds: (
        Request.ADD_MEM_REG,
        SingleMemRegion(MemoryRegion(4096, MiB, fe.memory.regions[0].uva + (64 << 20), 0)).encode(),
        [_memfd(fds)]), running=True),
}


def _send_bad(fe, case: Bad, need_reply: bool):
    fds: list[int] = []
    try:
        request, payload, send_fds = case.make(fe, fds)
        flags = VERSION if case.flags is None else case.flags
        if need_reply:
            flags |= NEED_REPLY
        return fe.send_message(request, payload, send_fds, flags=flags, expect_reply=need_reply)
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("case", list(BAD.values()), ids=list(BAD))
def test_bad_request_with_reply_ack_is_nacked_and_the_connection_stays_usable(
        daemon, peers, frontends, case):
    a = frontends("a", 2, start=False)
    a.negotiate()
    assert a.has_protocol_feature(PF.REPLY_ACK)
    if case.running:
        a.start(queue_pairs=2, queue_size=256, mem_size=8 * MiB)
        for p in range(2):
            a.post_rx_buffers(p)
        exchange(a, peers.b)
    mark = daemon.mark()
    assert ack_value(_send_bad(a, case, need_reply=True)) == 1
    assert "dropping the connection" not in daemon.log_since(mark)
    if not case.running:
        a.start(queue_pairs=2, queue_size=256, mem_size=8 * MiB)
        for p in range(2):
            a.post_rx_buffers(p)
    exchange(a, peers.b)
    assert daemon.attached("a")


@pytest.mark.parametrize("case", list(BAD.values()), ids=list(BAD))
def test_bad_request_without_reply_ack_drops_only_that_connection(daemon, peers, frontends, case):
    a = frontends("a", 2, start=False)
    a.negotiate(protocol_features=NO_REPLY_ACK)
    assert not a.has_protocol_feature(PF.REPLY_ACK)
    if case.running:
        a.start(queue_pairs=2, queue_size=256, mem_size=8 * MiB)
        for p in range(2):
            a.post_rx_buffers(p)
        exchange(a, peers.b)
    mark = daemon.mark()
    _send_bad(a, case, need_reply=False)
    expect_dropped(a)
    daemon.wait_log("net0: protocol error, dropping the connection", mark)
    daemon.wait_detached("a")
    others_still_served(daemon, peers)


@pytest.mark.parametrize("name", ["payload-too-short", "unknown-request-99", "kick-without-fd",
                                  "set-vring-base-on-running-ring"])
def test_bad_request_with_reply_ack_but_no_need_reply_drops_the_connection(
        daemon, peers, frontends, name):
    case = BAD[name]
    a = frontends("a", 2, start=False)
    a.negotiate()
    if case.running:
        a.start(queue_pairs=2, queue_size=256, mem_size=8 * MiB)
    mark = daemon.mark()
    _send_bad(a, case, need_reply=False)
    expect_dropped(a)
    daemon.wait_log("net0: protocol error, dropping the connection", mark)
    others_still_served(daemon, peers)


MANDATORY = {
    # A request whose reply is part of the protocol cannot be nacked (QEMU
    # would read the ack as the reply): the connection is dropped.
    "get-vring-base-ring-index-too-big": (Request.GET_VRING_BASE, VringState(4, 0).encode(), None),
    "get-vring-base-short-payload": (Request.GET_VRING_BASE, bytes(4), None),
    "get-config-not-negotiated": (Request.GET_CONFIG, Config(0, 4, 0, bytes(4)).encode(), None),
    "get-queue-num-without-mq": (Request.GET_QUEUE_NUM, b"", DEFAULT_PROTOCOL_FEATURES & ~bit(PF.MQ)),
    "get-inflight-fd-unsupported": (Request.GET_INFLIGHT_FD, bytes(24), None),
}


@pytest.mark.parametrize("name", list(MANDATORY))
def test_failing_request_with_a_mandatory_reply_drops_the_connection(daemon, peers, frontends, name):
    request, payload, pfeatures = MANDATORY[name]
    a = frontends("a", 2, start=False)
    a.negotiate(protocol_features=pfeatures)
    mark = daemon.mark()
    a.send_message(request, payload, expect_reply=False)
    expect_dropped(a)
    daemon.wait_log("net0: protocol error, dropping the connection", mark)
    others_still_served(daemon, peers)


def test_get_vring_base_on_a_never_started_ring_is_answered(daemon, peers, frontends):
    """Out of order but answerable: the spec's reply (the ring's base), and
    the connection goes on."""
    a = frontends("a", 2, start=False)
    a.negotiate()
    assert a.get_vring_base(3) == 0
    a.set_vring_base(2, 17)
    assert a.get_vring_base(2) == 17
    a.start(queue_pairs=2, queue_size=256, mem_size=8 * MiB)
    for p in range(2):
        a.post_rx_buffers(p)
    exchange(a, peers.b)


def test_unmappable_region_is_nacked_not_fatal(daemon, peers, frontends):
    """The fd is valid but cannot be mapped (an eventfd): REPLY_ACK 1."""
    a = frontends("a", 2, start=False)
    a.negotiate()
    efd = eventfd()
    try:
        with pytest.raises(NackError):
            a._request(Request.ADD_MEM_REG, SingleMemRegion(_region(1 << 32, MiB)).encode(),
                       [efd], ack=True)
    finally:
        os.close(efd)
    a.start(queue_pairs=2, queue_size=256, mem_size=8 * MiB)
    for p in range(2):
        a.post_rx_buffers(p)
    exchange(a, peers.b)


# ---------------------------------------------------------------------------
# Disconnects at every step

SEQUENCE = qemu_start_sequence(2)
CUTS = [pytest.param(k, id=f"after-{k:02d}-{SEQUENCE[k - 1] if k else 'connect'}")
        for k in range(len(SEQUENCE) + 1)]


@pytest.mark.parametrize("k", CUTS)
def test_disconnect_during_the_start_sequence(daemon, peers, k):
    fds0 = daemon.fd_count()
    a = open_frontend(daemon, "a", 2, start=False)
    cut_after(a, k)
    try:
        a.start(queue_pairs=2, queue_size=256, mem_size=8 * MiB)
    except Cut:
        pass
    else:
        assert k == len(SEQUENCE)
        a.post_rx_buffers(0)
        a.send_frame(0, frame(peers.b.mac, a.mac, new_token()))
    close_frontend(daemon, a)
    others_still_served(daemon, peers)
    _wait_equal(daemon.fd_count, fds0, "daemon fds")


def _wait_equal(get, want, what, timeout=2.0):
    deadline = time.monotonic() + timeout
    while True:
        got = get()
        if got == want:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: {got}, baseline {want}")
        time.sleep(0.02)


def _running(daemon, peers, post_rx=True):
    a = open_frontend(daemon, "a", 2, post_rx=post_rx)
    if post_rx:
        exchange(a, peers.b)
    return a


def _flood(src, dst, n, pairs=(0, 1)):
    for i in range(n):
        try:
            src.send_frame(pairs[i % len(pairs)], frame(dst.mac, src.mac, new_token()))
        except BlockingIOError:
            break


def _scenario_traffic_in_flight(daemon, peers):
    a = _running(daemon, peers)
    _flood(a, peers.b, 200)
    _flood(peers.b, a, 200)
    return a


def _scenario_peer_stalled_on_our_full_rx(daemon, peers):
    a = open_frontend(daemon, "a", 2, post_rx=False)
    a.post_rx_buffers(0, 4)
    a.post_rx_buffers(1, 4)
    send_one(a, 0, peers.b)                   # the switch learns a's MAC
    _flood(peers.b, a, 60)                    # b's TX stalls on a's full RX
    time.sleep(0.1)
    return a


def _scenario_after_set_status_0(daemon, peers):
    a = _running(daemon, peers)
    _flood(a, peers.b, 50)
    a.set_status(0)
    return a


def _scenario_after_first_get_vring_base(daemon, peers):
    a = _running(daemon, peers)
    _flood(a, peers.b, 50)
    a.set_status(0)
    a.get_vring_base(0)
    a.get_vring_base(1)
    return a


def _scenario_stopped(daemon, peers):
    a = _running(daemon, peers)
    a.stop()
    return a


def _scenario_half_restarted(daemon, peers):
    a = _running(daemon, peers)
    a.stop()
    a.setup_ring(0, 256)
    a.setup_ring(1, 256, kick=False)
    return a


def _scenario_after_reset_owner(daemon, peers):
    a = _running(daemon, peers)
    _flood(a, peers.b, 50)
    a.reset_owner()
    a.sync()
    return a


def _scenario_after_log_base(daemon, peers):
    a = _running(daemon, peers)
    log = Memfd(4096)
    a.set_log_base(log.fd, 4096)
    log.close()
    a.set_features(a.features | bit(F.VHOST_LOG_ALL))
    _flood(a, peers.b, 20)
    return a


def _scenario_half_header(daemon, peers):
    a = open_frontend(daemon, "a", 2, start=False)
    a.get_features()
    a.conn.send_bytes(HEADER.pack(Request.SET_OWNER, VERSION, 0)[:6])
    return a


def _scenario_header_without_payload(daemon, peers):
    a = _running(daemon, peers)
    a.conn.send_bytes(HEADER.pack(Request.SET_MEM_TABLE, VERSION, 40))
    return a


def _scenario_partial_payload_with_fd(daemon, peers):
    a = _running(daemon, peers)
    msg = HEADER.pack(Request.ADD_MEM_REG, VERSION, 40) + SingleMemRegion(_region(1 << 32, MiB)).encode()
    fd = os.memfd_create("vfe-test-partial", os.MFD_CLOEXEC)
    os.ftruncate(fd, MiB)
    a.conn.send_bytes(msg[:30], [fd])
    os.close(fd)
    return a


RUNNING_CUTS = {
    "traffic-in-flight": _scenario_traffic_in_flight,
    "peer-stalled-on-our-full-rx": _scenario_peer_stalled_on_our_full_rx,
    "after-SET_STATUS-0": _scenario_after_set_status_0,
    "after-first-GET_VRING_BASEs": _scenario_after_first_get_vring_base,
    "after-stop": _scenario_stopped,
    "half-restarted": _scenario_half_restarted,
    "after-RESET_OWNER": _scenario_after_reset_owner,
    "logging-dirty-pages": _scenario_after_log_base,
    "half-a-header": _scenario_half_header,
    "header-without-its-payload": _scenario_header_without_payload,
    "partial-payload-with-an-fd": _scenario_partial_payload_with_fd,
}


@pytest.mark.parametrize("scenario", list(RUNNING_CUTS))
def test_disconnect_while_running(daemon, peers, scenario):
    fds0 = daemon.fd_count()
    maps0 = len(daemon.guest_maps())
    a = RUNNING_CUTS[scenario](daemon, peers)
    close_frontend(daemon, a)
    others_still_served(daemon, peers)
    _wait_equal(daemon.fd_count, fds0, "daemon fds")
    _wait_equal(lambda: len(daemon.guest_maps()), maps0, "guest memory mappings")


def test_second_front_end_on_a_busy_socket_is_refused(daemon, peers, frontends):
    a = frontends("a", 2)
    exchange(a, peers.b)
    mark = daemon.mark()
    intruder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        intruder.connect(daemon.paths["a"])
        intruder.settimeout(3)
        assert intruder.recv(1) == b""                     # closed by the daemon
    finally:
        intruder.close()
    assert "refusing a second front-end" in daemon.wait_log("refusing", mark)
    exchange(a, peers.b)


# ---------------------------------------------------------------------------
# fd and mapping hygiene


def _cycle_plain(daemon, peers):
    a = open_frontend(daemon, "a", 2)
    exchange(a, peers.b)
    close_frontend(daemon, a)


def _cycle_mem_table_and_log(daemon, peers):
    a = open_frontend(daemon, "a", 2, regions=4, use_add_mem_reg=False)
    log = Memfd(8192)
    a.set_log_base(log.fd, 8192)
    log.close()
    efd = eventfd()
    a.send_message(Request.SET_LOG_FD, b"", [efd])
    os.close(efd)
    exchange(a, peers.b)
    close_frontend(daemon, a)


def _cycle_stop_restart(daemon, peers):
    a = open_frontend(daemon, "a", 2)
    exchange(a, peers.b)
    a.stop()
    for i in range(4):
        a.setup_ring(i, 256, call=True)
        a.set_vring_enable(i, True)
    err = eventfd()
    a.set_vring_err(1, err)
    os.close(err)
    a.sync()
    exchange(a, peers.b)
    a.rem_mem_reg(a.memory.regions[0])       # rings stop: their memory is gone
    close_frontend(daemon, a)


def _cycle_nacks_with_fds(daemon, peers):
    a = open_frontend(daemon, "a", 2)
    for name in ("mem-table-fewer-fds-than-regions", "call-with-two-fds", "kick-fd-with-nofd-bit",
                 "overlapping-region-added-while-running"):
        assert ack_value(_send_bad(a, BAD[name], need_reply=True)) == 1
    exchange(a, peers.b)
    close_frontend(daemon, a)


def _cycle_dropped_with_fds(daemon, peers):
    a = open_frontend(daemon, "a", 2)
    _send_bad(a, BAD["mem-table-overlapping-regions"], need_reply=False)   # no NEED_REPLY: drop
    expect_dropped(a)
    close_frontend(daemon, a)


def _cycle_too_many_fds(daemon, peers):
    a = open_frontend(daemon, "a", 2)
    fds = [eventfd() for _ in range(40)]
    try:
        a.conn.send_message(Request.SET_VRING_CALL, VringFile(0, False).encode(), fds)
    finally:
        for fd in fds:
            os.close(fd)
    expect_dropped(a)
    close_frontend(daemon, a)


def _cycle_cut_mid_start(daemon, peers):
    a = open_frontend(daemon, "a", 2, start=False)
    cut_after(a, 20)
    with pytest.raises(Cut):
        a.start(queue_pairs=2, queue_size=256, mem_size=8 * MiB)
    close_frontend(daemon, a)


CYCLES = [_cycle_plain, _cycle_mem_table_and_log, _cycle_stop_restart, _cycle_nacks_with_fds,
          _cycle_dropped_with_fds, _cycle_too_many_fds, _cycle_cut_mid_start]


def test_fds_and_mappings_return_to_baseline_after_20_cycles(daemon, peers):
    for cycle in CYCLES:                       # warm-up: every path once
        cycle(daemon, peers)
    fds0, fdmap0 = daemon.fd_count(), daemon.fds()
    maps0, guest0 = len(daemon.maps()), len(daemon.guest_maps())
    for i in range(20):
        CYCLES[i % len(CYCLES)](daemon, peers)
    exchange(peers.b, peers.c)

    def leaked():
        now = daemon.fds()
        return {fd: now[fd] for fd in set(now) - set(fdmap0)}
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        if (daemon.fd_count(), len(daemon.maps()), len(daemon.guest_maps())) == (fds0, maps0, guest0):
            break
        time.sleep(0.05)
    assert daemon.fd_count() == fds0, f"fds leaked: {leaked()}"
    assert len(daemon.guest_maps()) == guest0, "guest memory stays mapped:\n" + "\n".join(
        daemon.guest_maps())
    assert len(daemon.maps()) == maps0, "mappings leaked"


# ---------------------------------------------------------------------------
# Garbage on the socket


GARBAGE = {
    "deadbeef": b"\xde\xad\xbe\xef" * 256,
    "http-request": b"GET / HTTP/1.1\r\nHost: vfe\r\n\r\n",
    "zeros": bytes(64),
    "all-ones": b"\xff" * 4096,
    "random": bytes((i * 7919 + 13) % 251 for i in range(8192)),
}


@pytest.mark.parametrize("kind", list(GARBAGE))
def test_garbage_bytes_drop_the_connection_only(daemon, peers, kind):
    fds0 = daemon.fd_count()
    a = open_frontend(daemon, "a", 2)
    exchange(a, peers.b)
    mark = daemon.mark()
    try:
        a.conn.send_bytes(GARBAGE[kind])
    except OSError:
        pass
    expect_dropped(a)
    daemon.wait_log("net0: protocol error, dropping the connection", mark)
    close_frontend(daemon, a)
    others_still_served(daemon, peers)
    _wait_equal(daemon.fd_count, fds0, "daemon fds")


@pytest.mark.parametrize("size", [MAX_PAYLOAD_SIZE + 1, 1 << 20, 0xFFFFFFFF])
def test_header_announcing_a_huge_payload_is_refused(daemon, peers, size):
    a = open_frontend(daemon, "a", 2)
    exchange(a, peers.b)
    mark = daemon.mark()
    a.conn.send_bytes(HEADER.pack(Request.SET_MEM_TABLE, VERSION, size) + bytes(100))
    expect_dropped(a)
    log = daemon.wait_log("net0: protocol error, dropping the connection", mark)
    assert f"payload size {size}" in log
    close_frontend(daemon, a)
    others_still_served(daemon, peers)


def test_a_peer_stuck_in_the_middle_of_a_message_does_not_block_others(daemon, peers):
    """A header announcing the largest payload allowed, then silence: the
    daemon waits for the rest without blocking other devices, and lets go
    when the peer closes."""
    a = open_frontend(daemon, "a", 2)
    exchange(a, peers.b)
    a.conn.send_bytes(HEADER.pack(Request.SET_CONFIG, VERSION, MAX_PAYLOAD_SIZE) + bytes(100))
    time.sleep(0.1)
    assert daemon.attached("a")
    exchange(peers.b, peers.c)
    assert peers.b.get_features() == NET_FEATURES           # control plane answers too
    send_one(peers.b, 0, a)                                 # a's rings still run
    mark = daemon.mark()
    close_frontend(daemon, a)
    assert "in the middle of a message" in daemon.wait_log("net0: front-end disconnected", mark)
    others_still_served(daemon, peers)


def test_every_request_id_with_random_payloads_never_kills_the_daemon(daemon, peers):
    """A small fuzz over the real socket: request ids 0..47, payload sizes
    0..4096 of random bytes (and some with a small first u64), with and
    without an fd, NEED_REPLY set and REPLY_ACK negotiated.  Each gets a
    reply/ack or drops the connection; nothing else happens."""
    import random
    rng = random.Random(20240611)
    fds0 = daemon.fd_count()
    a = None
    answered = dropped = 0
    for rid in range(48):
        for size in (0, 1, 8, 12, 16, 24, 40, 264, 4096):
            for with_fd in (False, True):
                if a is None:
                    a = open_frontend(daemon, "a", 2, start=False)
                    a.negotiate()
                payload = bytearray(rng.getrandbits(8) for _ in range(size))
                if size >= 8 and rng.random() < 0.5:
                    payload[:8] = struct.pack("<Q", rng.choice([0, 1, 3, 4, 255, 256, 257, 1 << 32]))
                fds = []
                if with_fd:
                    fds.append(os.memfd_create("vfe-test-fuzz", os.MFD_CLOEXEC))
                    os.ftruncate(fds[0], MiB)
                try:
                    a.send_message(rid, bytes(payload), fds, flags=VERSION | NEED_REPLY,
                                   expect_reply=False)
                    reply = a.conn.recv_message(3)
                    assert (reply.request, reply.flags) == (rid, REPLY_FLAGS), reply
                    answered += 1
                except TimeoutError:
                    raise AssertionError(f"request {rid} ({size} bytes): no reply, no drop") from None
                except OSError:                     # PeerClosed: dropped
                    dropped += 1
                    close_frontend(daemon, a)
                    a = None
                finally:
                    for fd in fds:
                        os.close(fd)
                assert daemon.alive(), f"request {rid} with {size} bytes killed the daemon"
    close_frontend(daemon, a)
    assert answered and dropped
    others_still_served(daemon, peers)
    _wait_equal(daemon.fd_count, fds0, "daemon fds")


def test_a_front_end_that_never_reads_its_replies_does_not_stall_the_others(daemon, peers):
    """A front-end that sends requests with replies and never reads them
    fills its socket.  The daemon must not block on it: another device's
    control requests are answered meanwhile (QEMU waits for every reply)."""
    from vfe.vhost.framing import encode_message
    a = open_frontend(daemon, "a", 2, start=False)
    try:
        a.conn.send_bytes(encode_message(Request.GET_FEATURES) * 3000)
        time.sleep(0.3)
        peers.b.timeout = 1.0
        t0 = time.monotonic()
        try:
            features = peers.b.get_features()
        except TimeoutError:
            features = None
        took = time.monotonic() - t0
        assert features == NET_FEATURES, (
            f"device b's GET_FEATURES was not answered within 1 s ({took:.1f} s) while device a's "
            f"front-end did not read its replies")
    finally:
        close_frontend(daemon, a)
    peers.b.timeout = 5.0
    others_still_served(daemon, peers)


def test_dirty_log_marks_the_pages_the_device_writes(daemon, peers, frontends):
    """Live migration: with VHOST_F_LOG_ALL acked and a log from
    SET_LOG_BASE (both offered by the daemon), every guest page the device
    writes (RX buffers, used rings) must be marked in the log, or the
    migrated guest sees stale memory."""
    a, b = frontends("a", 2), peers.b
    exchange(a, b)
    pages = (8 * MiB) // 4096
    log = Memfd(4096)
    try:
        a.set_log_base(log.fd, pages // 8)
        a.set_features(a.features | bit(F.VHOST_LOG_ALL))
        uva = a.memory.gpa_to_uva
        for i, ring in sorted(a.rings.items()):           # what QEMU does at migration start
            lay = ring.layout
            a.set_vring_addr(i, uva(ring.ring_gpa + lay.desc), uva(ring.ring_gpa + lay.used),
                             uva(ring.ring_gpa + lay.avail), log_guest_addr=ring.ring_gpa + lay.used,
                             log=True)
        a.sync()
        with open(f"/proc/self/fd/{log.fd}", "r+b") as f:
            f.write(bytes(pages // 8))                    # clear the log
        token = new_token()
        b.send_frame(0, frame(a.mac, b.mac, token))
        rx = a.rings[0]
        got = recv_token(a, token, 2, [0])
        assert got is not None
        with open(f"/proc/self/fd/{log.fd}", "rb") as f:
            bitmap = f.read(pages // 8)

        def dirty(gpa):
            page = gpa // 4096
            return bool(bitmap[page // 8] >> (page % 8) & 1)
        used_gpa = rx.ring_gpa + rx.layout.used
        assert dirty(used_gpa), "the RX used ring's page is not marked dirty"
        assert any(dirty(rx.slot_gpa(s)) for s in range(rx.size)), \
            "no RX buffer page is marked dirty"
    finally:
        log.close()
