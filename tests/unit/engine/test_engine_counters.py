"""The engine's per-queue counters (cython_ext/counters.pxd), driven
in-process (tests/harness/engine_rig.py): each rises by exactly what was
sent, delivered or dropped, each drop under its own reason, on the ring
docs/metrics.md says counts it; blk queues count requests by type, failed
ones, data bytes, and the requests at the I/O threads (inflight)."""
from __future__ import annotations

import os
import time

import pytest

from tests.harness.engine_rig import (
    F_WRITE, FEAT_INDIRECT, FEAT_MRG_RXBUF, FEAT_VERSION_1, Guest, NetRig, ring_at_ends,
)
from tests.unit.engine.test_engine_guarded_blk import BUF, Blk
from tests.unit.engine.test_engine_net_fast_paths import (
    FRAME, OTHER_SRC, REGIONS, RXBUF, SIZE, SRC, TXA, TXD, TXU, Net,
)
from vfe.engine import ENGINE_COUNTERS, Engine

pytestmark = pytest.mark.skipif(not ENGINE_COUNTERS, reason="engine built with VFE_ENGINE_COUNTERS=0")

B_MAC = "02:00:00:00:00:0b"
TO_B = bytes.fromhex("02000000000b") + FRAME[6:]        # unicast to b (its configured MAC)
TX_REASONS = {"short", "spoofed", "no_room", "no_ring", "too_big", "offload", "ring_error", "tap"}
RX_REASONS = {"too_big", "offload", "no_room"}


def drops(stats: dict) -> dict:
    """The non-zero dropped_<reason> counters."""
    return {k[8:]: v for k, v in stats.items() if k.startswith("dropped_") and v}


@pytest.fixture
def net():
    n = Net()
    yield n
    n.rig.close()


def send(n: Net, frames: list[bytes]) -> None:
    for head, f in enumerate(frames):
        n.tx_one_piece(f, head)
    n.rig.a.run_burst(1)


def test_each_direction_has_its_keys(net):
    rx, tx = net.rig.b.ring_stats(0), net.rig.a.ring_stats(1)
    assert {k[8:] for k in rx if k.startswith("dropped_")} == RX_REASONS
    assert {k[8:] for k in tx if k.startswith("dropped_")} == TX_REASONS
    assert {"packets", "bytes", "dropped", "errors", "interrupts", "buffers"} <= set(rx)
    assert {"packets", "bytes", "dropped", "errors", "interrupts", "kicks"} <= set(tx)
    assert all(v == 0 for v in (rx | tx).values())


def test_frames_and_bytes_each_way(net):
    net.post_rx(net.rx, net.g.start(RXBUF), 4, 512)
    send(net, [FRAME, FRAME[:60], FRAME])
    total = 2 * len(FRAME) + 60
    tx, rx = net.rig.a.ring_stats(1), net.rig.b.ring_stats(0)
    assert (tx["packets"], tx["bytes"], tx["dropped"]) == (3, total, 0)
    assert (rx["packets"], rx["bytes"], rx["buffers"], rx["dropped"]) == (3, total, 3, 0)


def test_mergeable_buffers_used_are_counted():
    n = Net(FEAT_VERSION_1 | FEAT_INDIRECT | FEAT_MRG_RXBUF)
    try:
        n.post_rx(n.rx, n.g.start(RXBUF), 8, 48)       # 12 + 114 bytes: three buffers each
        send(n, [FRAME, FRAME])
        rx = n.rig.b.ring_stats(0)
        assert (rx["packets"], rx["buffers"], rx["dropped"]) == (2, 6, 0)
        assert [nb for _, nb in n.received(n.rx, n.g.start(RXBUF), 48)] == [3, 3]
    finally:
        n.rig.close()


def test_too_big_without_mergeable_buffers_counts_on_both_rings(net):
    net.rig.b.set_port_mac(B_MAC)
    net.post_rx(net.rx, net.g.start(RXBUF), 4, 64)     # 12 + 114 bytes do not fit one
    send(net, [TO_B])
    assert drops(net.rig.a.ring_stats(1)) == {"too_big": 1}
    assert drops(net.rig.b.ring_stats(0)) == {"too_big": 1}
    assert net.rig.a.ring_stats(1)["dropped"] == net.rig.b.ring_stats(0)["dropped"] == 1


def test_spoofed_and_short_frames_count_on_the_sender(net):
    net.rig.a.set_port_mac(SRC)
    net.post_rx(net.rx, net.g.start(RXBUF), 4, 512)
    send(net, [OTHER_SRC, FRAME[:13], FRAME])
    tx = net.rig.a.ring_stats(1)
    assert drops(tx) == {"spoofed": 1, "short": 1}
    assert (tx["dropped"], tx["packets"]) == (2, 3)          # packets: frames taken from the ring
    assert net.rig.b.ring_stats(0)["packets"] == 1 and net.rig.b.ring_stats(0)["dropped"] == 0


def test_a_destination_without_a_usable_rx_ring(net):
    net.rig.b.set_paused(True)
    net.rig.b.set_port_mac(B_MAC)
    send(net, [TO_B])
    assert drops(net.rig.a.ring_stats(1)) == {"no_ring": 1}


def test_a_broken_destination_ring(net):
    net.rig.b.set_port_mac(B_MAC)
    net.rx.set_desc(0, 0xdead0000, 512, F_WRITE)       # outside guest memory
    net.rx.post(0)
    send(net, [TO_B])
    assert drops(net.rig.a.ring_stats(1)) == {"ring_error": 1}
    assert net.rig.b.ring_stats(0)["errors"] == 1 and drops(net.rig.b.ring_stats(0)) == {}


def test_a_flooded_frame_finding_no_room_is_dropped_on_the_rx_ring(net):
    send(net, [FRAME])                                  # broadcast, b posted no buffer
    assert drops(net.rig.b.ring_stats(0)) == {"no_room": 1}
    assert drops(net.rig.a.ring_stats(1)) == {}         # a flood waits for no one


def test_a_unicast_frame_waits_for_room_then_counts_as_no_room(net):
    net.rig.b.set_port_mac(B_MAC)
    net.tx_one_piece(TO_B, 0)
    assert net.rig.a.run_burst(1) == 0                  # held in the ring: b may still make room
    assert drops(net.rig.a.ring_stats(1)) == {}
    time.sleep(0.06)                                    # past the engine's 50 ms stall limit
    assert net.rig.a.run_burst(1) == 1
    assert drops(net.rig.a.ring_stats(1)) == {"no_room": 1}
    assert drops(net.rig.b.ring_stats(0)) == {}


def test_interrupts_sent(net):
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        net.rig.b.set_call_fd(0, fd)
        net.post_rx(net.rx, net.g.start(RXBUF), 4, 512)
        send(net, [FRAME, FRAME])                       # one burst: one publish, one interrupt
        assert net.rig.b.ring_stats(0)["interrupts"] == 1 == os.eventfd_read(fd)
        send(net, [FRAME])
        assert net.rig.b.ring_stats(0)["interrupts"] == 2
    finally:
        net.rig.b.set_call_fd(0, -1)
        os.close(fd)


def test_counters_survive_a_ring_restart(net):
    """A reconnect stops and starts the rings of the same device: its
    counters go on from where they were."""
    net.post_rx(net.rx, net.g.start(RXBUF), 4, 512)
    send(net, [FRAME])
    base = net.rig.a.stop_ring(1)
    net.rig.start(net.rig.a, 1, net.tx, base=base)
    net.tx_one_piece(FRAME, 1)
    net.rig.a.run_burst(1)
    assert net.rig.a.ring_stats(1)["packets"] == 2 and net.rig.b.ring_stats(0)["packets"] == 2


def test_kicks_read_by_a_sleeping_worker():
    """Adaptive mode: kicks the guest writes while the worker sleeps, or
    polls, are read by its next sleep and counted on the ring, each one."""
    g = Guest(REGIONS)
    rig = NetRig.__new__(NetRig)
    rig.guest, rig.engine = g, Engine(workers=1, mode="adaptive", spin_us=0)
    rig.a, rig.b = rig.engine.new_net_device(2), rig.engine.new_net_device(2)
    rig.a.set_memory(g.table())
    rig.a.set_features(FEAT_VERSION_1)
    tx = ring_at_ends(g, SIZE, TXD, TXA, TXU)
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    rig.a.start_ring(1, SIZE, *tx.addresses, 0, kick, -1, True)
    rig.engine.start()
    try:
        sent = 0
        for n in (1, 3):
            for _ in range(n):
                os.eventfd_write(kick, 1)
            sent += n
            deadline = time.monotonic() + 10
            while rig.a.ring_stats(1)["kicks"] < sent and time.monotonic() < deadline:
                time.sleep(0.01)
            assert rig.a.ring_stats(1)["kicks"] == sent
    finally:
        rig.engine.stop()
        rig.close()
        os.close(kick)
        g.close()


# -- blk

T_IN, T_OUT, T_FLUSH, T_GET_ID, T_BOGUS = 0, 1, 4, 8, 99


def test_blk_requests_by_type_bytes_and_failures():
    b = Blk()
    try:
        base = b.g.start(BUF)
        b.request(0, T_IN, 0, in_len=512)                    # 3 descriptors
        b.request(3, T_FLUSH)                                # 2
        b.request(5, T_GET_ID, in_len=20)                    # 3
        b.ring.post(0, 3, 5)
        assert b.burst() == 3
        b.request(0, T_BOGUS)
        b.request(2, T_OUT, 1, data=b"\x55" * 512, status_gpa=base + 1800)
        b.ring.post(0, 2)
        assert b.burst() == 2
        q = b.dev.ring_stats(0)
        assert {k: v for k, v in q.items() if k.startswith("requests_") and v} == {
            "requests_in": 1, "requests_out": 1, "requests_flush": 1, "requests_get_id": 1,
            "requests_unsupported": 1}
        assert (q["packets"], q["dropped"], q["bytes"], q["errors"]) == (5, 1, 512 + 20 + 512, 0)
        assert q["inflight"] == 0
    finally:
        b.rig.close()


@pytest.mark.parametrize("in_order", [False, True])
def test_blk_inflight_is_the_requests_taken_and_not_answered(tmp_path, in_order):
    """A file bdev: a read goes to the I/O threads and counts as inflight
    until the worker answers it; in order, a GET_ID answered within the
    burst waits behind it, inflight too."""
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    b = Blk("file", path=str(img), in_order=in_order)
    try:
        b.request(0, T_IN, 0, in_len=512)
        b.request(3, T_GET_ID, in_len=20)
        b.ring.post(0, 3)
        b.burst()
        waiting = 2 if in_order else 1
        assert b.dev.ring_stats(0)["inflight"] == waiting       # answered at a later burst
        assert b.dev.ring_stats(0)["packets"] == 2 - waiting
        deadline = time.monotonic() + 10
        while b.dev.ring_stats(0)["packets"] < 2 and time.monotonic() < deadline:
            b.burst()
            time.sleep(0.01)
        q = b.dev.ring_stats(0)
        assert (q["packets"], q["inflight"], q["requests_in"], q["requests_get_id"], q["bytes"]) == \
            (2, 0, 1, 1, 512 + 20)
    finally:
        b.rig.close()
