"""The net data path's chain walks, driven in-process on guarded memory
(tests/harness/engine_rig.py): every ring area and buffer region sits between
PROT_NONE pages, with the structure under test ending exactly at a guard,
so a read or write one byte out of bounds kills the case (SIGSEGV) instead
of passing.  Each case runs in a forked child (run_forked): a crash fails
the test with the signal's name and pytest goes on.

TX: guest chains on device a's TX ring, one burst in the calling thread;
a good frame is flooded to device b's RX ring.  RX: b's RX ring is the
hostile one.  Checked: the ring stops with the right reason, nothing is
forwarded or written, and good chains at the very edge of a region work.
"""
from __future__ import annotations

import pytest

from tests.harness.engine_rig import (
    F_INDIRECT, F_NEXT, F_WRITE, FEAT_EVENT_IDX, FEAT_INDIRECT, FEAT_VERSION_1, PAGE, Guest,
    NetRig, RingError, ring_at_ends, table_bytes,
)
from tests.harness.guarded import run_forked

SIZE = 8
# regions: TX ring of a (desc, avail, used), RX ring of b (desc, avail,
# used), buffers: two pages, then one more page adjacent in guest-physical
# space but mapped on its own (a chain may cross, a table may not)
TXD, TXA, TXU, RXD, RXA, RXU, BUF, BUF2 = range(8)
REGIONS = [(0x10000, PAGE), (0x20000, PAGE), (0x30000, PAGE), (0x50000, PAGE),
           (0x60000, PAGE), (0x70000, PAGE), (0x100000, 2 * PAGE), (0x102000, PAGE)]
HDR = 12
FRAME = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00" + bytes(range(46))


class Net:
    """One case's world: the rig, a's TX ring and b's RX ring (started),
    RX buffers posted on b (2 KiB each, in BUF)."""

    def __init__(self, features: int = FEAT_VERSION_1 | FEAT_INDIRECT, rx_buffers: bool = True,
                 size: int = SIZE) -> None:
        self.g = Guest(REGIONS)
        self.rig = NetRig(self.g, features)
        event_idx = bool(features & FEAT_EVENT_IDX)
        self.tx = ring_at_ends(self.g, size, TXD, TXA, TXU, event_idx)
        self.rx = ring_at_ends(self.g, size, RXD, RXA, RXU, event_idx)
        self.rig.start(self.rig.a, 1, self.tx)
        self.rig.start(self.rig.b, 0, self.rx)
        self.rx_buf = self.g.start(BUF) + PAGE          # b's RX buffers: 4 of 512 bytes
        if rx_buffers:
            for i in range(4):
                self.rx.set_desc(i, self.rx_buf + 512 * i, 512, F_WRITE)
            self.rx.post(0, 1, 2, 3)

    def send(self) -> int:
        return self.rig.a.run_burst(1)

    def tx_broken(self) -> int:
        return self.rig.broken(self.rig.a, 1)

    def delivered(self) -> list[bytes]:
        """Frames b's RX ring got (without their virtio-net header)."""
        out = []
        for i in range(self.rx.used_idx()):
            head, length = self.rx.used(i)
            out.append(self.g.read(self.rx_buf + 512 * head, length)[HDR:])
        return out


def put(g: Guest, gpa: int, data: bytes) -> tuple[int, int]:
    g.write(gpa, data)
    return gpa, len(data)


# -- TX chains: (build(net) -> None, expected RingError or None for "delivered")

def tx_head_is_size(n):
    n.tx.post(SIZE)


def tx_head_ffff(n):
    n.tx.post(0xFFFF)


def tx_next_out_of_range(n):
    a, ln = put(n.g, n.g.start(BUF), bytes(HDR) + FRAME)
    n.tx.set_desc(0, a, 20, F_NEXT, SIZE)
    n.tx.post(0)


def tx_loop(n):
    a, _ = put(n.g, n.g.start(BUF), bytes(HDR) + FRAME)
    n.tx.set_desc(0, a, 30, F_NEXT, 1)
    n.tx.set_desc(1, a + 30, 30, F_NEXT, 0)
    n.tx.post(0)


def tx_self_loop(n):
    a, _ = put(n.g, n.g.start(BUF), bytes(HDR) + FRAME)
    n.tx.set_desc(3, a, 30, F_NEXT, 3)
    n.tx.post(3)


def tx_zero_length(n):
    n.tx.set_desc(0, n.g.start(BUF), 0)
    n.tx.post(0)


def tx_writable(n):
    a, ln = put(n.g, n.g.start(BUF), bytes(HDR) + FRAME)
    n.tx.set_desc(0, a, ln, F_WRITE)
    n.tx.post(0)


def tx_ends_at_region_end(n):
    a, ln = put(n.g, n.g.end(BUF2) - len(FRAME) - HDR, bytes(HDR) + FRAME)
    n.tx.set_desc(0, a, ln)
    n.tx.post(0)


def tx_one_past_region_end(n):
    a, ln = put(n.g, n.g.end(BUF2) - len(FRAME) - HDR, bytes(HDR) + FRAME)
    n.tx.set_desc(0, a + 1, ln)
    n.tx.post(0)


def tx_starts_past_last_region(n):
    n.tx.set_desc(0, n.g.end(BUF2), 64)
    n.tx.post(0)


def tx_address_wraps(n):
    n.tx.set_desc(0, 0xFFFF_FFFF_FFFF_FFF0, 0x40)
    n.tx.post(0)


def tx_crosses_adjacent_regions(n):
    a, ln = put(n.g, n.g.end(BUF) - 20, bytes(HDR) + FRAME)     # 20 bytes in BUF, rest in BUF2
    n.tx.set_desc(0, a, ln)
    n.tx.post(0)


def _indirect(n, table_gpa, descs, length=None, flags=F_INDIRECT):
    t = table_bytes(*descs)
    n.g.write(table_gpa, t)
    n.tx.set_desc(0, table_gpa, len(t) if length is None else length, flags)
    n.tx.post(0)


def _frame_at(n):
    return put(n.g, n.g.start(BUF), bytes(HDR) + FRAME)


def tx_indirect_ok(n):
    a, ln = _frame_at(n)
    _indirect(n, n.g.start(BUF) + 1024, [(a, 20, F_NEXT, 1), (a + 20, ln - 20, 0, 0)])


def tx_indirect_table_ends_at_region_end(n):
    a, ln = _frame_at(n)
    _indirect(n, n.g.end(BUF2) - 32, [(a, 20, F_NEXT, 1), (a + 20, ln - 20, 0, 0)])


def tx_indirect_table_crosses_region_end(n):
    a, ln = _frame_at(n)
    _indirect(n, n.g.end(BUF) - 16, [(a, 20, F_NEXT, 1), (a + 20, ln - 20, 0, 0)])


def tx_indirect_table_past_last_region(n):
    a, ln = _frame_at(n)
    n.g.write(n.g.end(BUF2) - 16, table_bytes((a, ln, 0, 0)))
    n.tx.set_desc(0, n.g.end(BUF2) - 16, 32, F_INDIRECT)
    n.tx.post(0)


def tx_indirect_misaligned(n):
    a, ln = _frame_at(n)
    _indirect(n, n.g.start(BUF) + 1032, [(a, ln, 0, 0)])


def tx_indirect_len_not_whole(n):
    a, ln = _frame_at(n)
    _indirect(n, n.g.start(BUF) + 1024, [(a, ln, 0, 0)], length=24)


def tx_indirect_len_zero(n):
    a, ln = _frame_at(n)
    _indirect(n, n.g.start(BUF) + 1024, [(a, ln, 0, 0)], length=0)


def tx_indirect_oversized(n):
    a, ln = _frame_at(n)
    _indirect(n, n.g.start(BUF) + 1024, [(a, ln, 0, 0)], length=16 * 32769)


def tx_indirect_huge_len(n):
    a, ln = _frame_at(n)
    _indirect(n, n.g.start(BUF) + 1024, [(a, ln, 0, 0)], length=0xFFFFFFF0)


def tx_indirect_with_next(n):
    a, ln = _frame_at(n)
    _indirect(n, n.g.start(BUF) + 1024, [(a, ln, 0, 0)], flags=F_INDIRECT | F_NEXT)


def tx_indirect_nested(n):
    a, ln = _frame_at(n)
    inner = n.g.start(BUF) + 2048
    n.g.write(inner, table_bytes((a, ln, 0, 0)))
    _indirect(n, n.g.start(BUF) + 1024, [(inner, 16, F_INDIRECT, 0)])


def tx_indirect_next_out_of_range(n):
    a, ln = _frame_at(n)
    _indirect(n, n.g.start(BUF) + 1024, [(a, 20, F_NEXT, 2), (a + 20, ln - 20, 0, 0)])


def tx_indirect_loop(n):
    a, ln = _frame_at(n)
    _indirect(n, n.g.start(BUF) + 1024, [(a, 20, F_NEXT, 1), (a + 20, 20, F_NEXT, 0)])


def tx_avail_jumps(n):
    n.tx.publish(SIZE + 1)


# The virtio-net header may be cut anywhere (CVE-2022-2132: a back-end that
# assumed it spans at most two descriptors read past the second one).

def tx_header_in_three_pieces(n):
    a, ln = _frame_at(n)
    n.tx.set_desc(0, a, 4, F_NEXT, 1)
    n.tx.set_desc(1, a + 4, 4, F_NEXT, 2)
    n.tx.set_desc(2, a + 8, 4, F_NEXT, 3)
    n.tx.set_desc(3, a + 12, ln - 12)
    n.tx.post(0)


def tx_header_in_one_byte_pieces(n):
    a, ln = _frame_at(n)
    descs = [(a + i, 1, F_NEXT, i + 1) for i in range(HDR)] + [(a + HDR, ln - HDR, 0, 0)]
    _indirect(n, n.g.start(BUF) + 1024, descs)


def tx_header_ends_at_a_guard_page(n):
    """The header's last byte is the last byte of a region mapped on its
    own: reading one byte more would fault."""
    hdr_gpa = n.g.end(BUF2) - HDR
    n.g.write(hdr_gpa, bytes(HDR))
    fa, fl = put(n.g, n.g.start(BUF), FRAME)
    n.tx.set_desc(0, hdr_gpa, HDR, F_NEXT, 1)
    n.tx.set_desc(1, fa, fl)
    n.tx.post(0)


def tx_shorter_than_its_header(n):
    a, _ = _frame_at(n)
    n.tx.set_desc(0, a, 4, F_NEXT, 1)
    n.tx.set_desc(1, a + 4, 4, F_NEXT, 2)
    n.tx.set_desc(2, n.g.end(BUF2) - 3, 3)
    n.tx.post(0)


TX_CASES = [
    (tx_head_is_size, RingError.HEAD),
    (tx_head_ffff, RingError.HEAD),
    (tx_next_out_of_range, RingError.NEXT),
    (tx_loop, RingError.LOOP),
    (tx_self_loop, RingError.LOOP),
    (tx_zero_length, RingError.LEN),
    (tx_writable, RingError.DIR),
    (tx_ends_at_region_end, None),
    (tx_one_past_region_end, RingError.ADDR),
    (tx_starts_past_last_region, RingError.ADDR),
    (tx_address_wraps, RingError.ADDR),
    (tx_crosses_adjacent_regions, None),
    (tx_indirect_ok, None),
    (tx_indirect_table_ends_at_region_end, None),
    (tx_indirect_table_crosses_region_end, RingError.INDIRECT),
    (tx_indirect_table_past_last_region, RingError.INDIRECT),
    (tx_indirect_misaligned, RingError.INDIRECT),
    (tx_indirect_len_not_whole, RingError.INDIRECT),
    (tx_indirect_len_zero, RingError.INDIRECT),
    (tx_indirect_oversized, RingError.INDIRECT),
    (tx_indirect_huge_len, RingError.INDIRECT),
    (tx_indirect_with_next, RingError.INDIRECT),
    (tx_indirect_nested, RingError.NESTED),
    (tx_indirect_next_out_of_range, RingError.NEXT),
    (tx_indirect_loop, RingError.LOOP),
    (tx_avail_jumps, RingError.AVAIL),
    (tx_header_in_three_pieces, None),
    (tx_header_in_one_byte_pieces, None),
    (tx_header_ends_at_a_guard_page, None),
    (tx_shorter_than_its_header, RingError.LEN),
]


def _run_tx_case(build, expected):
    n = Net()
    build(n)
    n.send()
    if expected is None:
        assert n.tx_broken() == 0, RingError(n.tx_broken())
        assert n.delivered() == [FRAME]
        assert n.tx.used_idx() == 1 and n.tx.used(0) == (0, 0)
    else:
        assert n.tx_broken() == expected, n.rig.a.ring_state(1)
        assert n.delivered() == [] and n.tx.used_idx() == 0
        assert n.rig.b.ring_state(0)["broken"] == 0
    n.rig.close()


@pytest.mark.parametrize("build,expected", TX_CASES, ids=[c[0].__name__ for c in TX_CASES])
def test_tx_chain(build, expected):
    run_forked(_run_tx_case, build, expected)


def test_tx_indirect_not_negotiated():
    def case():
        n = Net(features=FEAT_VERSION_1)
        tx_indirect_ok(n)
        n.send()
        assert n.tx_broken() == RingError.INDIRECT and n.delivered() == []
    run_forked(case)


# -- RX: b's ring is the hostile one; a sends a good frame

def _rx_case(build, expected, check=None):
    n = Net(rx_buffers=False)
    a, ln = _frame_at(n)
    n.tx.set_desc(0, a, ln)
    n.tx.post(0, publish=False)
    build(n)
    n.tx.publish()
    n.send()
    assert n.tx_broken() == 0 and n.tx.used_idx() == 1      # the sender goes on
    assert n.rig.broken(n.rig.b, 0) == (expected or 0), n.rig.b.ring_state(0)
    if check:
        check(n)
    n.rig.close()


def rx_head_out_of_range(n):
    n.rx.post(SIZE)


def rx_buffer_ends_at_region_end(n):
    n.rx.set_desc(0, n.g.end(BUF2) - HDR - len(FRAME), HDR + len(FRAME), F_WRITE)
    n.rx.post(0)


def rx_buffer_one_past_region_end(n):
    n.g.write(n.g.end(BUF2) - 256, b"\xaa" * 256)
    n.rx.set_desc(0, n.g.end(BUF2) - HDR - len(FRAME) + 1, HDR + len(FRAME), F_WRITE)
    n.rx.post(0)


def rx_readable_buffer(n):
    n.rx.set_desc(0, n.g.start(BUF) + PAGE, 512)
    n.rx.post(0)


def rx_next_out_of_range(n):
    n.rx.set_desc(0, n.g.start(BUF) + PAGE, 20, F_WRITE | F_NEXT, 0x7FFF)
    n.rx.post(0)


def rx_indirect_crosses_region_end(n):
    t = n.g.end(BUF) - 16
    n.g.write(t, table_bytes((n.g.start(BUF) + PAGE, 512, F_WRITE, 0), (0, 0, 0, 0)))
    n.rx.set_desc(0, t, 32, F_INDIRECT)
    n.rx.post(0)


RX_CASES = [
    (rx_head_out_of_range, RingError.HEAD, None),
    (rx_buffer_ends_at_region_end, None,
     lambda n: n.g.read(n.g.end(BUF2) - len(FRAME), len(FRAME)) == FRAME or pytest.fail("data")),
    (rx_buffer_one_past_region_end, RingError.ADDR,
     lambda n: n.g.read(n.g.end(BUF2) - 256, 256) == b"\xaa" * 256 or pytest.fail("written")),
    (rx_readable_buffer, RingError.DIR, None),
    (rx_next_out_of_range, RingError.NEXT, None),
    (rx_indirect_crosses_region_end, RingError.INDIRECT, None),
]


@pytest.mark.parametrize("build,expected,check", RX_CASES, ids=[c[0].__name__ for c in RX_CASES])
def test_rx_chain(build, expected, check):
    run_forked(_rx_case, build, expected, check)


# -- the used ring

def test_used_ring_at_the_region_end_wraps():
    """The used ring ends exactly at its region's end; 3 * SIZE frames
    (bursts of SIZE - 1) fill every slot, the last one included, twice."""
    def case():
        n = Net(rx_buffers=False)
        a, ln = _frame_at(n)
        for i in range(SIZE):
            n.tx.set_desc(i, a, ln)
        sent = 0
        while sent < 3 * SIZE:
            n.tx.post(*[(sent + k) % SIZE for k in range(SIZE - 1)])
            sent += SIZE - 1
            assert n.send() == SIZE - 1
        assert n.tx_broken() == 0 and n.tx.used_idx() == sent
        assert {n.tx.used(i)[0] for i in range(SIZE)} == set(range(SIZE))
    run_forked(case)


def test_event_idx_acked_under_a_running_ring_that_has_no_room_for_it():
    """The TX ring was started without EVENT_IDX, its avail and used rings
    ending exactly at their regions' ends (no used_event/avail_event: they
    exist only with EVENT_IDX).  EVENT_IDX acked while it runs (the
    protocol refuses this; the engine must not rely on it): the ring stops
    (its areas no longer fit) instead of reading used_event past the
    avail ring's end on the next publish."""
    def case():
        n = Net()
        a, ln = _frame_at(n)
        n.tx.set_desc(0, a, ln)
        n.rig.a.set_features(FEAT_VERSION_1 | FEAT_INDIRECT | FEAT_EVENT_IDX)
        n.tx.post(0)
        n.send()
        assert n.tx_broken() == RingError.RING
    run_forked(case)


def test_the_rig_knows_every_ring_error():
    from vfe.engine import ERROR_NAMES
    assert {e.value for e in RingError} == set(ERROR_NAMES)
