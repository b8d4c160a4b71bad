"""Each request handler QEMU uses answers correctly; fds passed are the ones used."""
from __future__ import annotations

import os
import select
import time

import pytest

from tests.protocol.daemon_helpers import (
    MiB, Memfd, ack_value, close_frontend, exchange, frame, new_token, qemu_start_sequence,
    recv_token, send_one,
)
from tests.protocol.daemon_protocol.helpers import eventfd
from vfe.devices.net import NET_FEATURES, NET_PROTOCOL_FEATURES, rarp_frame
from vfe.testing.channel import NackError
from vfe.vhost.actions import DeviceSpec
from vfe.vhost.messages import NEED_REPLY, Log, Request, U64
from vfe.virtio.constants import F, bit


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
