"""Adversarial rings against a real virtio-net-controller process.

The front-end writes what a buggy or hostile guest driver would straight
into one ring's memory (descriptor loops, chains longer than the queue,
addresses in no region or straddling a region's end, nested or broken
indirect tables, zero and huge lengths, an avail index that jumps by more
than the queue size, RX buffers the device may not write ...), kicks, and
checks that:

- the daemon logs "net0: ring N stopped: <reason> (the guest must reset the
  device)" with the engine's reason for exactly that error, and nothing else
  stops;
- the daemon is alive, the ring's used index did not move past the good
  chains, the bad chain was not forwarded;
- the other queue pair of the same device (queues=2) and another device
  still pass frames both ways;
- nothing outside the announced regions changed: guest memory is one memfd
  [guard][region 0][guard][region 1][guard] with a guest-physical gap
  between the regions (GuardedRam); the guards are random bytes the daemon
  has mapped (it maps each region from file offset 0) but must never touch.

One daemon serves the module: device a (net0, 2 queue pairs) and b (net1,
2 queue pairs).
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Callable

import pytest

from tests.protocol.daemon_helpers import (
    F_INDIRECT, F_NEXT, F_WRITE, MiB, GuardedRam, RawRing, close_frontend, daemon_fixtures,
    exchange, frame, new_token, open_frontend, recv_token, send_one, write_table,
)

from vfe.engine import ERROR_NAMES
from vfe.testing.frontend import FrontRing
from vfe.testing.guest_ram import GuestRam
from vfe.testing.ring import DriverRing, RingLayout
from vfe.virtio.constants import F, bit

HEAD, NEXT, LOOP, ADDR, INDIRECT, NESTED, DIR, IOV, LEN, AVAIL = range(1, 11)
QSIZE = 256

daemon, daemon_guard = daemon_fixtures({"a": "queues=2", "b": "queues=2"})


def stopped_line(ring: int, code: int, dev: str = "net0") -> str:
    return f"{dev}: ring {ring} stopped: {ERROR_NAMES[code]} (the guest must reset the device)"


@pytest.fixture
def b(daemon):
    fe = open_frontend(daemon, "b", 2)
    yield fe
    close_frontend(daemon, fe)


@pytest.fixture
def guarded(daemon):
    """Device a on GuardedRam (rings and slot buffers in region 0; region 1
    is scratch for the tests), 2 queue pairs of 256."""
    made = []

    def make(post_rx=(0, 1), **start_kw):
        a = open_frontend(daemon, "a", 2, start=False)
        made.append(a)
        a.memory = GuardedRam()
        a.start(queue_pairs=2, queue_size=QSIZE, **start_kw)
        for p in post_rx:
            a.post_rx_buffers(p)
        return a

    yield make
    for a in made:
        close_frontend(daemon, a)


@dataclass
class Ctx:
    a: object
    b: object
    ram: GuardedRam
    raw: RawRing
    token: bytes
    good: int           # gpa of a valid TX buffer (header + a frame to b carrying `token`)
    good_len: int
    watch: list         # (gpa, bytes) ranges the device must not have written
    extra: list = None  # (gpa, token) of valid TX buffers for chains before the bad one
    buf: int = 0        # RX cases: gpa of an 8 KiB scratch buffer (random bytes)


def _tx_payload(c: Ctx) -> bytes:
    return bytes(c.a.net_hdr_len) + frame(c.b.mac, c.a.mac, c.token, 128)


def _put_frame(c: Ctx, gpa: int) -> None:
    """A valid header + frame at gpa, clipped at its region's end (so a
    device that read past the end would forward a frame with our token)."""
    r, off = c.ram.region_of(gpa)
    data = _tx_payload(c)[:r.size - off]
    c.ram.write(gpa, data)


def _table(c: Ctx, entries, align: int = 16, misalign: int = 0) -> int:
    gpa = c.ram.scratch(16 * max(len(entries), 1) + misalign, align) + misalign
    write_table(c.a, gpa, entries)
    return gpa


# -- TX cases: build the bad chain, return the heads to publish (None: the case
# publishes itself) -----------------------------------------------------------

def tx_loop_self(c):
    c.raw.desc(0, c.good, 64, F_NEXT, 0)
    return [0]


def tx_loop_two(c):
    c.raw.desc(0, c.good, 64, F_NEXT, 1)
    c.raw.desc(1, c.good + 64, 64, F_NEXT, 0)
    return [0]


def tx_chain_longer_than_queue(c):
    for i in range(QSIZE):
        c.raw.desc(i, c.good + i % 64, 1, F_NEXT, (i + 1) % QSIZE)
    return [0]


def tx_next_out_of_range(c):
    c.raw.desc(0, c.good, 64, F_NEXT, QSIZE + 3)
    return [0]


def tx_head_out_of_range(c):
    return [QSIZE + 7]


def tx_head_0xffff(c):
    return [0xFFFF]


def tx_addr_in_gap(c):
    c.raw.desc(0, c.ram.gap_gpa, 200)
    return [0]


def tx_addr_beyond_memory(c):
    c.raw.desc(0, 1 << 40, 200)
    return [0]


def tx_addr_wraps_around(c):
    c.raw.desc(0, (1 << 64) - 64, 200)
    return [0]


def tx_straddles_region0_end(c):
    gpa = c.ram.r0_end - 64
    _put_frame(c, gpa)
    c.raw.desc(0, gpa, 200)
    return [0]


def tx_straddles_region1_end(c):
    gpa = c.ram.r1_end - 64
    _put_frame(c, gpa)
    c.raw.desc(0, gpa, 200)
    return [0]


def tx_second_piece_in_gap(c):
    c.raw.desc(0, c.good, 64, F_NEXT, 1)
    c.raw.desc(1, c.ram.gap_gpa, 200)
    return [0]


def tx_region_gap_between_pieces(c):
    """Header at region 0's end, frame at region 1's start: legal pieces,
    but the one in between (the gap) is not."""
    c.raw.desc(0, c.ram.r0_end - 16, (1 << 20) + 32)
    return [0]


def tx_nested_indirect(c):
    inner = _table(c, [(c.good, c.good_len, 0, 0)])
    outer = _table(c, [(inner, 16, F_INDIRECT, 0)])
    c.raw.desc(0, outer, 16, F_INDIRECT)
    return [0]


def tx_nested_indirect_after_a_piece(c):
    inner = _table(c, [(c.good, c.good_len, 0, 0)])
    outer = _table(c, [(c.good, 12, F_NEXT, 1), (inner, 16, F_INDIRECT, 0)])
    c.raw.desc(0, outer, 32, F_INDIRECT)
    return [0]


def tx_indirect_table_in_gap(c):
    c.raw.desc(0, c.ram.gap_gpa & ~15, 64, F_INDIRECT)
    return [0]


def tx_indirect_table_straddles_region_end(c):
    c.raw.desc(0, c.ram.r0_end - 32, 64, F_INDIRECT)
    return [0]


def tx_indirect_table_beyond_memory(c):
    c.raw.desc(0, 1 << 44, 64, F_INDIRECT)
    return [0]


def tx_indirect_with_next(c):
    t = _table(c, [(c.good, c.good_len, 0, 0)])
    c.raw.desc(0, t, 16, F_INDIRECT | F_NEXT, 1)
    c.raw.desc(1, c.good, 64)
    return [0]


def tx_indirect_length_not_multiple_of_16(c):
    t = _table(c, [(c.good, c.good_len, 0, 0), (0, 0, 0, 0)])
    c.raw.desc(0, t, 24, F_INDIRECT)
    return [0]


def tx_indirect_length_zero(c):
    t = _table(c, [(c.good, c.good_len, 0, 0)])
    c.raw.desc(0, t, 0, F_INDIRECT)
    return [0]


def tx_indirect_table_huge(c):
    c.raw.desc(0, c.ram.r1.gpa, 0xFFFFFFF0, F_INDIRECT)
    return [0]


def tx_indirect_table_misaligned(c):
    t = _table(c, [(c.good, c.good_len, 0, 0)], misalign=8)
    c.raw.desc(0, t, 16, F_INDIRECT)
    return [0]


def tx_indirect_loop(c):
    t = _table(c, [(c.good, 16, F_NEXT, 1), (c.good, 16, F_NEXT, 2),
                   (c.good, 16, F_NEXT, 3), (c.good, 16, F_NEXT, 0)])
    c.raw.desc(0, t, 64, F_INDIRECT)
    return [0]


def tx_indirect_next_out_of_range(c):
    t = _table(c, [(c.good, 16, F_NEXT, 5), (c.good, 16, 0, 0)])
    c.raw.desc(0, t, 32, F_INDIRECT)
    return [0]


def tx_zero_length(c):
    c.raw.desc(0, c.good, 0)
    return [0]


def tx_zero_length_chain(c):
    c.raw.desc(0, c.good, 0, F_NEXT, 1)
    c.raw.desc(1, c.good, 0, F_NEXT, 2)
    c.raw.desc(2, c.good, 0)
    return [0]


def tx_header_only(c):
    c.raw.desc(0, c.good, c.a.net_hdr_len)
    return [0]


def tx_huge_length_inside_memory(c):
    c.raw.desc(0, c.ram.r1.gpa, 2 * MiB)          # > the engine's 256 KiB chain limit
    return [0]


def tx_huge_length_past_memory(c):
    c.raw.desc(0, c.good, 0xFFFFFFFF)
    return [0]


def tx_chain_over_the_byte_limit(c):
    base = c.ram.r1.gpa
    for i in range(5):
        c.raw.desc(i, base + i * 65536, 65536, F_NEXT if i < 4 else 0, i + 1)
    return [0]


def tx_too_many_pieces(c):
    n = 1100
    t = _table(c, [(c.good + (i % 8) * 16, 16, F_NEXT if i < n - 1 else 0, i + 1) for i in range(n)])
    c.raw.desc(0, t, 16 * n, F_INDIRECT)
    return [0]


def tx_device_writable(c):
    c.raw.desc(0, c.good, c.good_len, F_WRITE)
    return [0]


def tx_writable_piece_after_readable(c):
    c.raw.desc(0, c.good, 64, F_NEXT, 1)
    c.raw.desc(1, c.good + 64, 64, F_WRITE)
    return [0]


def tx_avail_jump(c):
    c.raw.set_avail_idx(c.raw.avail_idx + QSIZE + 1)
    return None


def tx_avail_backwards(c):
    c.raw.set_avail_idx(c.raw.avail_idx - 1)
    return None


@dataclass
class TxCase:
    build: Callable
    error: int
    good_before: int = 0      # valid chains published (and forwarded) before the bad one


def tx_loop_after_good_chains(c):
    for i, (gpa, _token) in enumerate(c.extra):
        c.raw.desc(10 + i, gpa, c.good_len)
    c.raw.desc(0, c.good, 64, F_NEXT, 0)
    return [10, 11, 12, 0]


TX_CASES = {
    "loop-self": TxCase(tx_loop_self, LOOP),
    "loop-two-descriptors": TxCase(tx_loop_two, LOOP),
    "chain-longer-than-the-queue": TxCase(tx_chain_longer_than_queue, LOOP),
    "loop-after-3-good-chains": TxCase(tx_loop_after_good_chains, LOOP, good_before=3),
    "next-index-out-of-range": TxCase(tx_next_out_of_range, NEXT),
    "head-index-out-of-range": TxCase(tx_head_out_of_range, HEAD),
    "head-index-0xffff": TxCase(tx_head_0xffff, HEAD),
    "address-in-the-gap": TxCase(tx_addr_in_gap, ADDR),
    "address-beyond-memory": TxCase(tx_addr_beyond_memory, ADDR),
    "address-wraps-around": TxCase(tx_addr_wraps_around, ADDR),
    "straddles-region-0-end": TxCase(tx_straddles_region0_end, ADDR),
    "straddles-region-1-end": TxCase(tx_straddles_region1_end, ADDR),
    "second-piece-in-the-gap": TxCase(tx_second_piece_in_gap, ADDR),
    "spans-the-gap-into-region-1": TxCase(tx_region_gap_between_pieces, ADDR),
    "nested-indirect": TxCase(tx_nested_indirect, NESTED),
    "nested-indirect-after-a-piece": TxCase(tx_nested_indirect_after_a_piece, NESTED),
    "indirect-table-in-the-gap": TxCase(tx_indirect_table_in_gap, INDIRECT),
    "indirect-table-straddles-region-end": TxCase(tx_indirect_table_straddles_region_end, INDIRECT),
    "indirect-table-beyond-memory": TxCase(tx_indirect_table_beyond_memory, INDIRECT),
    "indirect-with-next-flag": TxCase(tx_indirect_with_next, INDIRECT),
    "indirect-length-not-multiple-of-16": TxCase(tx_indirect_length_not_multiple_of_16, INDIRECT),
    "indirect-length-zero": TxCase(tx_indirect_length_zero, INDIRECT),
    "indirect-table-huge": TxCase(tx_indirect_table_huge, INDIRECT),
    "indirect-table-misaligned": TxCase(tx_indirect_table_misaligned, INDIRECT),
    "indirect-chain-loops": TxCase(tx_indirect_loop, LOOP),
    "indirect-next-out-of-range": TxCase(tx_indirect_next_out_of_range, NEXT),
    "zero-length": TxCase(tx_zero_length, LEN),
    "zero-length-chain": TxCase(tx_zero_length_chain, LEN),
    "virtio-header-only": TxCase(tx_header_only, LEN),
    "huge-length-inside-memory": TxCase(tx_huge_length_inside_memory, LEN),
    "huge-length-past-memory": TxCase(tx_huge_length_past_memory, ADDR),
    "chain-over-the-byte-limit": TxCase(tx_chain_over_the_byte_limit, LEN),
    "too-many-pieces": TxCase(tx_too_many_pieces, IOV),
    "device-writable-tx-buffer": TxCase(tx_device_writable, DIR),
    "writable-piece-in-tx-chain": TxCase(tx_writable_piece_after_readable, DIR),
    "avail-index-jumps-past-the-queue-size": TxCase(tx_avail_jump, AVAIL),
    "avail-index-goes-backwards": TxCase(tx_avail_backwards, AVAIL),
}


def _others_pass_frames(a, b, broken_ring: int) -> None:
    """Every other ring of a, and device b, still pass frames."""
    if broken_ring != 1:
        send_one(a, 0, b)                     # a TX ring 1
    send_one(a, 1, b)                         # a TX ring 3
    # b -> a: b's pair k lands on a's pair k, or on pair 1 if a's RX ring 0 is gone
    want0 = 1 if broken_ring == 0 else 0
    assert send_one(b, 0, a) == want0
    assert send_one(b, 1, a) == 1


def _check_aftermath(daemon, mark, a, b, c: Ctx, ring: int, code: int, used_before: int,
                     good_before: int = 0) -> None:
    log = daemon.wait_log(stopped_line(ring, code), mark)
    time.sleep(0.02)
    log = daemon.log_since(mark)
    assert daemon.alive()
    stops = re.findall(r"net\d+: ring \d+ stopped: .*", log)
    assert stops == [stopped_line(ring, code)], f"unexpected ring stops: {stops}"
    assert c.raw.used_idx() == (used_before + good_before) & 0xFFFF, "the bad chain was completed"
    _others_pass_frames(a, b, ring)
    assert c.ram.guards_intact(), "bytes outside the announced regions changed"
    for gpa, data in c.watch:
        assert c.ram.read(gpa, len(data)) == data, f"the device wrote guest memory at {gpa:#x}"


@pytest.mark.parametrize("case", list(TX_CASES.values()), ids=list(TX_CASES))
def test_bad_tx_chain_stops_only_that_ring(daemon, guarded, b, case):
    a = guarded()
    exchange(a, b)                               # both pairs, both ways
    assert a.wait_tx_done(0)
    raw = RawRing(a, 1)
    c = Ctx(a, b, a.memory, raw, new_token(), 0, 0, [])
    payload = _tx_payload(c)
    c.good, c.good_len = a.memory.scratch(4096), len(payload)
    a.memory.write(c.good, payload)
    c.extra = []
    for _ in range(3):
        tok = new_token()
        gpa = a.memory.scratch(4096)
        a.memory.write(gpa, bytes(a.net_hdr_len) + frame(b.mac, a.mac, tok, 128))
        c.extra.append((gpa, tok))
    used_before = raw.used_idx()
    assert used_before == raw.avail_idx
    mark = daemon.mark()
    heads = case.build(c)
    if heads is not None:
        raw.publish(heads)
    raw.kick()
    _check_aftermath(daemon, mark, a, b, c, 1, case.error, used_before, case.good_before)
    if case.good_before:
        for _gpa, tok in c.extra[:case.good_before]:
            assert recv_token(b, tok, 1) is not None, "a good chain before the bad one was lost"
    assert recv_token(b, c.token, 0.05) is None, "a bad chain was forwarded"


# -- RX cases: bad buffers posted on a's RX ring 0; b sends to a's pair 0 ------

def rx_device_readable(c):
    c.raw.desc(0, c.buf, 2048)
    return [0]


def rx_in_the_gap(c):
    c.raw.desc(0, c.ram.gap_gpa, 2048, F_WRITE)
    return [0]


def rx_straddles_region0_end(c):
    gpa = c.ram.r0_end - 100
    c.watch.append((gpa, bytes(c.ram.read(gpa, 100))))
    c.raw.desc(0, gpa, 2048, F_WRITE)
    return [0]


def rx_straddles_region1_end(c):
    gpa = c.ram.r1_end - 100
    c.watch.append((gpa, bytes(c.ram.read(gpa, 100))))
    c.raw.desc(0, gpa, 2048, F_WRITE)
    return [0]


def rx_second_piece_beyond_memory(c):
    c.raw.desc(0, c.buf, 64, F_WRITE | F_NEXT, 1)
    c.raw.desc(1, 1 << 40, 2048, F_WRITE)
    return [0]


def rx_loop(c):
    c.raw.desc(0, c.buf, 64, F_WRITE | F_NEXT, 0)
    return [0]


def rx_chain_longer_than_queue(c):
    for i in range(QSIZE):
        c.raw.desc(i, c.buf + (i % 32) * 64, 64, F_WRITE | F_NEXT, (i + 1) % QSIZE)
    return [0]


def rx_head_out_of_range(c):
    return [QSIZE + 1]


def rx_next_out_of_range(c):
    c.raw.desc(0, c.buf, 64, F_WRITE | F_NEXT, 4000)
    return [0]


def rx_nested_indirect(c):
    inner = _table(c, [(c.buf, 2048, F_WRITE, 0)])
    outer = _table(c, [(inner, 16, F_INDIRECT, 0)])
    c.raw.desc(0, outer, 16, F_INDIRECT)
    return [0]


def rx_indirect_table_in_the_gap(c):
    c.raw.desc(0, c.ram.gap_gpa & ~15, 64, F_INDIRECT)
    return [0]


def rx_zero_length(c):
    c.raw.desc(0, c.buf, 0, F_WRITE)
    return [0]


def rx_second_buffer_bad(c):
    """Mergeable buffers: a good 64-byte buffer, then a bad one; the frame
    needs both, and the good one must not be written either."""
    c.raw.desc(0, c.buf, 64, F_WRITE)
    c.raw.desc(1, c.buf + 4096, 2048)                 # device-readable
    return [0, 1]


def rx_avail_jump(c):
    c.raw.set_avail_idx(c.raw.avail_idx + QSIZE + 1)
    return None


RX_CASES = {
    "device-readable-rx-buffer": (rx_device_readable, DIR),
    "buffer-in-the-gap": (rx_in_the_gap, ADDR),
    "buffer-straddles-region-0-end": (rx_straddles_region0_end, ADDR),
    "buffer-straddles-region-1-end": (rx_straddles_region1_end, ADDR),
    "second-piece-beyond-memory": (rx_second_piece_beyond_memory, ADDR),
    "loop": (rx_loop, LOOP),
    "chain-longer-than-the-queue": (rx_chain_longer_than_queue, LOOP),
    "head-index-out-of-range": (rx_head_out_of_range, HEAD),
    "next-index-out-of-range": (rx_next_out_of_range, NEXT),
    "nested-indirect": (rx_nested_indirect, NESTED),
    "indirect-table-in-the-gap": (rx_indirect_table_in_the_gap, INDIRECT),
    "zero-length": (rx_zero_length, LEN),
    "second-mergeable-buffer-bad": (rx_second_buffer_bad, DIR),
    "avail-index-jumps-past-the-queue-size": (rx_avail_jump, AVAIL),
}


@pytest.mark.parametrize("case", list(RX_CASES.values()), ids=list(RX_CASES))
def test_bad_rx_buffers_stop_only_that_ring(daemon, guarded, b, case):
    build, code = case
    a = guarded(post_rx=(1,))                   # RX ring 0 gets only the bad buffers
    exchange(a, b, a_pairs=[0, 1], b_pairs=[1])
    raw = RawRing(a, 0)
    c = Ctx(a, b, a.memory, raw, new_token(), 0, 0, [])
    c.buf = a.memory.scratch(8192, 4096)
    pattern = os.urandom(8192)
    a.memory.write(c.buf, pattern)
    c.watch.append((c.buf, pattern))
    used_before = raw.used_idx()
    mark = daemon.mark()
    heads = build(c)
    if heads is not None:
        raw.publish(heads)
    raw.kick()
    token = new_token()
    b.send_frame(0, frame(a.mac, b.mac, token, 1000))   # to a's pair 0: RX ring 0
    _check_aftermath(daemon, mark, a, b, c, 0, code, used_before)
    assert recv_token(a, token, 0.05) is None


# -- after a ring stopped --------------------------------------------------------


def test_a_reset_device_gets_its_stopped_ring_back(daemon, guarded, b):
    """The guest resets the device (stop, fresh rings from index 0): the
    ring that was stopped passes frames again.  And a new front-end on the
    same socket gets a fully working device."""
    a = guarded()
    exchange(a, b)
    raw = RawRing(a, 1)
    mark = daemon.mark()
    raw.desc(0, 1 << 40, 100)
    raw.publish([0])
    raw.kick()
    daemon.wait_log(stopped_line(1, ADDR), mark)
    raw.release()
    a.raw_rings.remove(raw)
    a.stop()
    for i in range(4):                 # what a guest reset does: new rings at index 0
        a.rings.pop(i).driver.release()
        a.setup_ring(i, QSIZE)
        a.set_vring_enable(i, True)
    a.sync()
    for p in range(2):
        a.post_rx_buffers(p)
    exchange(a, b)
    close_frontend(daemon, a)
    a2 = open_frontend(daemon, "a", 2)
    try:
        exchange(a2, b)
    finally:
        close_frontend(daemon, a2)


def test_both_devices_with_broken_rings_at_once(daemon, guarded, b):
    """A TX ring of a (ring 3) and an RX ring of b (ring 2) broken at once:
    each is logged for its own device, and the remaining rings still join
    the two devices both ways."""
    a = guarded()
    exchange(a, b)
    mark = daemon.mark()
    ra = RawRing(a, 3)
    ra.desc(0, a.memory.gap_gpa, 100)
    ra.publish([0])
    ra.kick()
    rb = RawRing(b, 2)
    rb.set_avail_idx(rb.avail_idx + 2 * QSIZE)
    # b's RX ring 2 is used by traffic from pair 1 (a's is dead) or when ring 0
    # is disabled: disable ring 0 so a's pair-0 frame goes to ring 2
    b.set_vring_enable(0, False)
    b.sync()
    a.send_frame(0, frame(b.mac, a.mac, new_token()))
    log = daemon.wait_log(stopped_line(2, AVAIL, "net1"), mark)
    daemon.wait_log(stopped_line(3, ADDR), mark)
    b.set_vring_enable(0, True)
    b.sync()
    assert send_one(a, 0, b) == 0
    assert send_one(b, 0, a) == 0
    assert send_one(b, 1, a) == 1
    log = daemon.log_since(mark)
    assert sorted(re.findall(r"net\d+: ring \d+ stopped: .*", log)) == sorted(
        [stopped_line(3, ADDR), stopped_line(2, AVAIL, "net1")])
    assert a.memory.guards_intact()


# -- ring addresses ---------------------------------------------------------------


@pytest.mark.parametrize("where", ["desc-in-gap", "avail-in-gap", "used-in-gap",
                                   "desc-straddles-region-end", "used-straddles-region-end"])
def test_ring_areas_outside_memory_are_not_started(daemon, guarded, b, where):
    """SET_VRING_ADDR with an area outside the regions (or across a
    region's end): the ring is not started (logged), the rest works."""
    a = guarded()
    exchange(a, b)
    a.get_vring_base(3)                          # stop TX ring 3, then move its areas
    ram = a.memory
    ring = a.rings[3]
    uva = ram.gpa_to_uva
    desc, avail, used = (uva(ring.ring_gpa + ring.layout.desc), uva(ring.ring_gpa + ring.layout.avail),
                         uva(ring.ring_gpa + ring.layout.used))
    gap_uva = ram.regions[0].uva + ram.regions[0].size + 16      # a guard byte: not announced
    r0_end_uva = ram.regions[0].uva + ram.regions[0].size
    if where == "desc-in-gap":
        desc = gap_uva & ~15
    elif where == "avail-in-gap":
        avail = gap_uva & ~1
    elif where == "used-in-gap":
        used = gap_uva & ~3
    elif where == "desc-straddles-region-end":
        desc = (r0_end_uva - 16 * QSIZE // 2) & ~15
    else:
        used = (r0_end_uva - 100) & ~3
    mark = daemon.mark()
    a.set_vring_addr(3, desc, used, avail)
    a.set_vring_kick(3, ring.kick_fd)
    a.sync()
    daemon.wait_log("ring 3: descriptor/avail/used areas are not inside one memory region", mark)
    assert a.get_vring_base(3) == ring.base            # never started: answered at once
    send_one(a, 0, b)
    send_one(b, 0, a)
    send_one(b, 1, a)
    assert a.memory.guards_intact()


@pytest.mark.parametrize("slack", [2, 0], ids=["2-bytes-before-the-end", "exactly-at-the-end"])
def test_ring_ending_at_a_region_end_without_event_idx(daemon, b, slack):
    """Without EVENT_IDX the avail ring is 4 + 2*size bytes and the used
    ring 4 + 8*size (no used_event/avail_event words).  A TX ring whose
    avail ring ends exactly at the end of guest memory is legal (the
    protocol accepts it and starts it): the daemon must run it.  (slack=2
    is the control: the same ring 2 bytes lower.)"""
    a = open_frontend(daemon, "a", 2, start=False)
    try:
        a.memory = GuestRam(8 * MiB, 1)
        region = a.memory.regions[0]
        a.negotiate()
        a.start(queue_pairs=2, queue_size=QSIZE,
                features=a.backend_features & ~(bit(F.RING_EVENT_IDX) | bit(F.VHOST_LOG_ALL)
                                                | bit(F.RING_PACKED)))
        for p in range(2):
            a.post_rx_buffers(p)
        exchange(a, b)
        # rebuild TX ring 1 with its avail ring in the last 4 + 2*size bytes of the region
        old = a.rings[1]
        a.get_vring_base(1)
        size = QSIZE
        avail_off = region.size - (4 + 2 * size) - slack
        desc_off = region.size - 64 * 1024
        used_off = desc_off + 16 * size
        region.view[desc_off:] = bytes(region.size - desc_off)    # zero desc, used, avail
        driver = DriverRing(region.view[0:region.size], size, desc_off, avail_off, used_off,
                            event_idx=False, init=False)   # (init writes a used_event word)
        lay = RingLayout(size, desc_off, avail_off, used_off, region.size)
        ring = FrontRing(1, size, lay, 0, driver, old.kick_fd, old.call_fd, old.buf_gpa,
                         old.buf_size, list(range(size - 1, -1, -1)))
        old.driver.release()
        a.rings[1] = ring
        uva = region.uva
        a.set_vring_num(1, size)
        a.set_vring_base(1, 0)
        a.set_vring_addr(1, uva + desc_off, uva + used_off, uva + avail_off)
        a.set_vring_kick(1, ring.kick_fd)
        a.sync()
        send_one(a, 0, b)
    finally:
        close_frontend(daemon, a)
