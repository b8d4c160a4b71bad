"""Hostile packed rings, driven in-process on guarded memory
(tests/harness/engine_rig.py, packed_ring.py): the descriptor ring and both
event areas end exactly at a guard page, every buffer sits between guards,
and each case runs in a forked child (run_forked), so a read or write out
of bounds fails the case with its signal instead of passing.

TX: chains on device a's packed TX ring, one burst; a good frame is flooded
to device b's packed RX ring.  RX: b's ring is the hostile one, and a's TX
ring goes on.  Checked: the ring stops with the right reason (or, for flags
that do not make a slot available, stays idle and unbroken), nothing is
forwarded or written, and good chains at the very edge of a region work.
"""
from __future__ import annotations

import struct

import pytest

from tests.harness.engine_rig import (
    F_INDIRECT, F_NEXT, F_WRITE, FEAT_INDIRECT, FEAT_MRG_RXBUF, FEAT_VERSION_1, PAGE, Guest, NetRig,
    RingError,
)
from tests.harness import userfault
from tests.harness.guarded import run_forked
from tests.harness.packed_ring import (
    F_AVAIL, F_USED, FEAT_RING_PACKED, FRESH_BASE, PackedRing, avail_flags, packed_at_ends,
    packed_table,
)

SIZE = 8
TXD, TXA, TXU, RXD, RXA, RXU, BUF, BUF2 = range(8)
REGIONS = [(0x10000, PAGE), (0x20000, PAGE), (0x30000, PAGE), (0x50000, PAGE),
           (0x60000, PAGE), (0x70000, PAGE), (0x100000, 2 * PAGE), (0x102000, PAGE)]
HDR = 12
FRAME = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00" + bytes(range(46))
PACKED = FEAT_VERSION_1 | FEAT_INDIRECT | FEAT_RING_PACKED


class Net:
    """a's packed TX ring and b's packed RX ring, started (TX at `tx_base`);
    b has 4 RX buffers of 512 bytes (ids 0-3) unless rx_buffers is False."""

    def __init__(self, features: int = PACKED, tx_base: int = FRESH_BASE,
                 rx_buffers: bool = True, rx_base: int = FRESH_BASE,
                 regions: list[tuple[int, int]] = REGIONS) -> None:
        self.g = Guest(regions)
        self.rig = NetRig(self.g, features)
        self.tx = packed_at_ends(self.g, SIZE, TXD, TXA, TXU)
        self.rx = packed_at_ends(self.g, SIZE, RXD, RXA, RXU)
        for ring, base in ((self.tx, tx_base), (self.rx, rx_base)):
            ring.next_avail, ring.avail_wrap = base & 0x7FFF, (base >> 15) & 1
            ring.next_used, ring.used_wrap = (base >> 16) & 0x7FFF, (base >> 31) & 1
        self.rig.a.start_ring(1, SIZE, *self.tx.addresses, tx_base, -1, -1, True)
        self.rig.b.start_ring(0, SIZE, *self.rx.addresses, rx_base, -1, -1, True)
        self.rx_buf = self.g.start(BUF) + PAGE
        if rx_buffers:
            for i in range(4):
                self.rx.post([(self.rx_buf + 512 * i, 512, F_WRITE)], i)

    def frame_at(self, gpa: int | None = None) -> tuple[int, int]:
        """HDR + FRAME written at gpa (default: the start of BUF)."""
        gpa = self.g.start(BUF) if gpa is None else gpa
        self.g.write(gpa, bytes(HDR) + FRAME)
        return gpa, HDR + len(FRAME)

    def send(self) -> int:
        return self.rig.a.run_burst(1)

    def tx_broken(self) -> int:
        return self.rig.broken(self.rig.a, 1)

    def rx_broken(self) -> int:
        return self.rig.broken(self.rig.b, 0)

    def delivered(self) -> list[bytes]:
        return [self.g.read(self.rx_buf + 512 * i, n)[HDR:] for i, n in self.rx.take_used()]


# -- TX chains: build(n) -> None; expected RingError, None (delivered) or "idle"

def chain_into_unavailable_slot(n):
    a, ln = n.frame_at()
    n.tx.post([(a, 20, 0), (a + 20, ln - 20, 0)], 0)
    n.tx.set_flags(1, 0)                              # the second slot never made available


def chain_into_wrong_lap():
    """From slot 7 into slot 0 of the next lap, whose flags still say lap 1."""
    def build(n):
        a, ln = n.frame_at()
        n.tx.post([(a, 20, 0), (a + 20, ln - 20, 0)], 0)
        n.tx.set_flags(0, avail_flags(1))             # should be avail_flags(0)
    return build


def id_is_size(n):
    a, ln = n.frame_at()
    n.tx.post([(a, ln, 0)], SIZE)


def id_ffff(n):
    a, ln = n.frame_at()
    n.tx.post([(a, 20, 0), (a + 20, ln - 20, 0)], 0xFFFF)


def chain_longer_than_ring(n):
    a, _ = n.frame_at()
    for slot in range(SIZE):
        n.tx.write_desc(slot, a, 10, 0, F_NEXT | avail_flags(1))


def head_flags(value):
    def build(n):
        a, ln = n.frame_at()
        n.tx.write_desc(0, a, ln, 0, value)
    build.__name__ = f"head_flags_{value:#06x}"
    return build


def garbage_bits_are_ignored(n):
    a, ln = n.frame_at()
    n.tx.post([(a, ln, 0x7F08 & ~F_USED)], 0)         # reserved bits: the AVAIL/USED pair decides


def writable_in_tx(n):
    a, ln = n.frame_at()
    n.tx.post([(a, ln, F_WRITE)], 0)


def zero_length(n):
    n.tx.post([(n.g.start(BUF), 0, 0)], 0)


def header_only(n):
    a, _ = n.frame_at()
    n.tx.post([(a, HDR, 0)], 0)


def ends_at_region_end(n):
    a, ln = n.frame_at(n.g.end(BUF2) - HDR - len(FRAME))
    n.tx.post([(a, ln, 0)], 0)


def one_past_region_end(n):
    a, ln = n.frame_at(n.g.end(BUF2) - HDR - len(FRAME))
    n.tx.post([(a + 1, ln, 0)], 0)


def address_wraps(n):
    n.tx.post([(0xFFFF_FFFF_FFFF_FFF0, 0x40, 0)], 0)


def indirect(table: bytes, length: int | None = None, flags: int = F_INDIRECT,
             where: str = "start", shift: int = 0, prefix: bool = False):
    """A chain ending in an indirect descriptor to `table` (written at the
    start of BUF2, or ending at its end), `length` bytes long."""
    def build(n):
        a, ln = n.frame_at()
        tgpa = (n.g.start(BUF2) if where == "start" else n.g.end(BUF2) - len(table)) + shift
        n.g.write(tgpa - shift, table)
        descs = [(a, HDR, 0)] if prefix else []
        n.tx.post(descs + [(tgpa, len(table) if length is None else length, flags)], 0)
    return build


def table_case(make):
    """An indirect case whose table points at the frame written by frame_at."""
    def build(n):
        a, ln = n.frame_at()
        make(packed_table((a, 20, 0), (a + 20, ln - 20, 0)))(n)
    return build


def direct_then_table(n):
    """Direct descriptors may precede the indirect one that ends a chain."""
    a, ln = n.frame_at()
    n.g.write(n.g.start(BUF2), packed_table((a + HDR, ln - HDR, 0)))
    n.tx.post([(a, HDR, 0), (n.g.start(BUF2), 16, F_INDIRECT)], 0)


def nested_table(n):
    a, ln = n.frame_at()
    inner = n.g.start(BUF2) + 256
    n.g.write(inner, packed_table((a, ln, 0)))
    n.g.write(n.g.start(BUF2), packed_table((a, 20, 0), (inner, 16, F_INDIRECT)))
    n.tx.post([(n.g.start(BUF2), 32, F_INDIRECT)], 0)


def table_with_flag_garbage(n):
    """In a table only WRITE counts (2.8.19): NEXT and the AVAIL/USED bits are ignored."""
    a, ln = n.frame_at()
    n.g.write(n.g.start(BUF2), packed_table((a, 20, F_NEXT | F_AVAIL | F_USED), (a + 20, ln - 20, F_NEXT)))
    n.tx.post([(n.g.start(BUF2), 32, F_INDIRECT)], 0)


TX_CASES = [
    (chain_into_unavailable_slot, RingError.PACKED_CHAIN),
    (id_is_size, RingError.PACKED_ID),
    (id_ffff, RingError.PACKED_ID),
    (chain_longer_than_ring, RingError.LOOP),
    (head_flags(F_AVAIL | F_USED), "idle"),          # a used descriptor of lap 1
    (head_flags(0), "idle"),                          # a used descriptor of lap 0
    (head_flags(F_USED), "idle"),                     # made available in lap 0
    (head_flags(0xFFFF), "idle"),
    (garbage_bits_are_ignored, None),
    (writable_in_tx, RingError.DIR),
    (zero_length, RingError.LEN),
    (header_only, RingError.LEN),
    (ends_at_region_end, None),
    (one_past_region_end, RingError.ADDR),
    (address_wraps, RingError.ADDR),
    (table_case(lambda t: indirect(t)), None),
    (direct_then_table, None),
    (table_case(lambda t: indirect(t, where="end")), None),
    (table_case(lambda t: indirect(t, where="end", length=len(t) + 16)), RingError.INDIRECT),
    (table_case(lambda t: indirect(t, length=20)), RingError.INDIRECT),
    (table_case(lambda t: indirect(t, length=0)), RingError.INDIRECT),
    (table_case(lambda t: indirect(t, shift=8)), RingError.INDIRECT),
    (table_case(lambda t: indirect(t, flags=F_INDIRECT | F_NEXT)), RingError.INDIRECT),
    (nested_table, RingError.NESTED),
    (table_with_flag_garbage, None),
]


@pytest.mark.parametrize("build,expected", TX_CASES,
                         ids=[f"{i}-{getattr(b, '__name__', 'case')}" for i, (b, _) in enumerate(TX_CASES)])
def test_tx_chain(build, expected):
    def case():
        n = Net()
        build(n)
        before = n.tx.read_desc(0)
        n.send()
        if expected is None:
            assert n.tx_broken() == 0, RingError(n.tx_broken())
            assert n.delivered() == [FRAME]
            assert n.tx.take_used() == [(0, 0)]
        elif expected == "idle":
            assert n.tx_broken() == 0 and n.delivered() == []
            st = n.rig.a.ring_state(1)
            assert (st["last_avail_idx"], st["last_used_idx"]) == (0, 0)
            assert n.tx.read_desc(0) == before                # nothing written over it
        else:
            assert n.tx_broken() == expected, n.rig.a.ring_state(1)
            assert n.delivered() == [] and n.tx.take_used() == []
        assert n.rx_broken() == 0
    run_forked(case)


def test_a_chain_wrapping_into_the_wrong_lap_stops_the_ring():
    def case():
        n = Net(tx_base=7 | 1 << 15 | (7 | 1 << 15) << 16)
        chain_into_wrong_lap()(n)
        n.send()
        assert n.tx_broken() == RingError.PACKED_CHAIN
        assert n.delivered() == []
    run_forked(case)


def test_a_chain_wrapping_into_the_next_lap_is_taken():
    def case():
        n = Net(tx_base=7 | 1 << 15 | (7 | 1 << 15) << 16)
        a, ln = n.frame_at()
        n.tx.post([(a, 20, 0), (a + 20, ln - 20, 0)], 3)
        n.send()
        assert n.tx_broken() == 0 and n.delivered() == [FRAME]
        st = n.rig.a.ring_state(1)
        assert (st["last_avail_idx"], st["avail_wrap"]) == (1, 0)
    run_forked(case)


def test_indirect_without_the_feature_stops_the_ring():
    def case():
        n = Net(features=FEAT_VERSION_1 | FEAT_RING_PACKED)
        table_case(lambda t: indirect(t))(n)
        n.send()
        assert n.tx_broken() == RingError.INDIRECT and n.delivered() == []
    run_forked(case)


def test_a_descriptor_is_read_once_after_its_flags():
    """The length and address come from the same read as the decision: a
    descriptor whose fields the driver rewrites after the burst changes
    nothing already delivered, and a later burst sees only the new values
    (here: a used slot, so nothing)."""
    def case():
        n = Net()
        a, ln = n.frame_at()
        n.tx.post([(a, ln, 0)], 0)
        n.send()
        n.tx.write_desc(0, a, 0xFFFF_FFFF, 0, F_AVAIL)        # rewritten, but not for lap 0
        n.send()
        assert n.tx_broken() == 0 and n.delivered() == [FRAME]
    run_forked(case)


# -- the RX ring is the hostile one: it stops, the sender does not

def rx_case(build, expected):
    def case():
        n = Net(rx_buffers=False)
        build(n)
        a, ln = n.frame_at()
        n.tx.post([(a, ln, 0)], 0)
        n.send()
        assert n.rx_broken() == expected, n.rig.b.ring_state(0)
        assert n.rx.take_used() == []
        assert n.tx_broken() == 0 and n.tx.take_used() == [(0, 0)]
        assert n.rig.a.ring_state(1)["ready"]
    run_forked(case)


def test_rx_buffer_id_out_of_range():
    rx_case(lambda n: n.rx.post([(n.rx_buf, 512, F_WRITE)], SIZE), RingError.PACKED_ID)


def test_rx_readable_buffer():
    rx_case(lambda n: n.rx.post([(n.rx_buf, 512, 0)], 0), RingError.DIR)


def test_rx_chain_into_unavailable_slot():
    def build(n):
        n.rx.post([(n.rx_buf, 8, F_WRITE), (n.rx_buf + 8, 504, F_WRITE)], 0)
        n.rx.set_flags(1, 0)
    rx_case(build, RingError.PACKED_CHAIN)


def test_rx_buffer_past_region_end():
    rx_case(lambda n: n.rx.post([(n.g.end(BUF2) - 100, 512, F_WRITE)], 0), RingError.ADDR)


def test_rx_buffer_ending_at_region_end_is_filled():
    def case():
        n = Net(rx_buffers=False)
        at = n.g.end(BUF2) - HDR - len(FRAME)
        n.rx.post([(at, HDR + len(FRAME), F_WRITE)], 2)
        a, ln = n.frame_at()
        n.tx.post([(a, ln, 0)], 0)
        n.send()
        assert n.rx.take_used() == [(2, HDR + len(FRAME))]
        assert n.g.read(at + HDR, len(FRAME)) == FRAME
    run_forked(case)


# -- ring areas

@pytest.mark.parametrize("shift", [("desc", 16), ("desc", 8), ("driver", 2), ("driver", 4),
                                   ("device", 4), ("device", 1)])
def test_ring_areas_outside_memory_or_misaligned_are_refused(shift):
    area, by = shift

    def case():
        g = Guest(REGIONS)
        rig = NetRig(g, PACKED)
        r = packed_at_ends(g, SIZE, TXD, TXA, TXU)
        d, drv, dev = r.addresses
        if area == "desc":
            d += by
        elif area == "driver":
            drv += by
        else:
            dev += by
        with pytest.raises(ValueError, match="not inside guest memory"):
            rig.a.start_ring(1, SIZE, d, drv, dev, FRESH_BASE, -1, -1, True)
    run_forked(case)


def test_a_broken_packed_ring_leaves_the_others_running():
    """a's TX ring stops; b's TX ring (in regions of its own) still reaches
    a's RX ring."""
    more = [(0x200000 + 0x10000 * k, PAGE) for k in range(6)]

    def case():
        n = Net.__new__(Net)
        n.g = Guest(REGIONS + more)
        n.rig = NetRig(n.g, PACKED)
        n.tx = packed_at_ends(n.g, SIZE, TXD, TXA, TXU)
        n.rig.a.start_ring(1, SIZE, *n.tx.addresses, FRESH_BASE, -1, -1, True)
        b_tx = packed_at_ends(n.g, SIZE, 8, 9, 10)
        a_rx = packed_at_ends(n.g, SIZE, 11, 12, 13)
        n.rig.b.start_ring(1, SIZE, *b_tx.addresses, FRESH_BASE, -1, -1, True)
        n.rig.a.start_ring(0, SIZE, *a_rx.addresses, FRESH_BASE, -1, -1, True)
        id_is_size(n)
        n.send()
        assert n.tx_broken() == RingError.PACKED_ID
        assert "packed buffer id" in n.rig.a.ring_state(1)["error"]
        rx_buf = n.g.start(BUF) + PAGE
        a_rx.post([(rx_buf, 512, F_WRITE)], 0)
        a, ln = n.frame_at()
        b_tx.post([(a, ln, 0)], 1)
        assert n.rig.b.run_burst(1) == 1
        assert a_rx.take_used() == [(0, HDR + len(FRAME))]
        assert n.g.read(rx_buf + HDR, len(FRAME)) == FRAME
        assert n.tx_broken() == RingError.PACKED_ID
    run_forked(case)


def test_a_running_ring_s_layout_cannot_change():
    """SET_FEATURES flipping RING_PACKED under running rings is refused
    (nothing applied): they would read one layout as the other.  The
    rings go on; once stopped, the layout may change."""
    def case():
        n = Net()
        with pytest.raises(RuntimeError, match="layout"):
            n.rig.a.set_features(FEAT_VERSION_1 | FEAT_INDIRECT)
        assert n.rig.a.ring_state(1)["packed"] and n.tx_broken() == 0
        a, ln = n.frame_at()
        n.tx.post([(a, ln, 0)], 0)
        assert n.send() == 1
        assert n.delivered() == [FRAME] and n.rx_broken() == 0
        n.rig.a.stop_ring(1)
        n.rig.a.set_features(FEAT_VERSION_1 | FEAT_INDIRECT)
        assert not n.rig.a.ring_state(1)["packed"]
    run_forked(case)


@pytest.mark.skipif(not userfault.available(), reason="needs userfaultfd")
def test_an_rx_frame_that_would_take_more_slots_than_the_ring_stops_it():
    """Mergeable buffers, a ring of 8 whose slot 0 ends one page and slots
    1-7 fill the next, eight 16-byte buffers and a frame needing nine.
    While the engine reads slot 1 (the page's first touch, userfaultfd)
    the driver makes slot 0 available again, for the next lap: the walk
    would take slot 0 twice for one frame (nine chains in a ring of 8).
    E_LOOP, nothing used."""
    def case():
        regions = list(REGIONS)
        regions[RXD] = (0x50000, 2 * PAGE)
        g = Guest(regions)
        rig = NetRig(g, PACKED | FEAT_MRG_RXBUF)
        tx = packed_at_ends(g, SIZE, TXD, TXA, TXU)
        rx = PackedRing(g, SIZE, g.start(RXD) + PAGE - 16, g.end(RXA) - 4, g.end(RXU) - 4)
        rig.a.start_ring(1, SIZE, *tx.addresses, FRESH_BASE, -1, -1, True)
        rig.b.start_ring(0, SIZE, *rx.addresses, FRESH_BASE, -1, -1, True)
        rx_buf = g.start(BUF) + PAGE
        for i in range(SIZE):
            rx.post([(rx_buf + 16 * i, 16, F_WRITE)], i)
        a = g.start(BUF)
        body = FRAME + bytes(SIZE * 16 + 4 - len(FRAME))       # 12 + 132 bytes: 9 buffers
        g.write(a, bytes(HDR) + body)
        tx.post([(a, HDR + len(body), 0)], 0)
        area = g.areas[RXD][1]
        touch = userfault.FirstTouch(area, 1, area.read(PAGE, PAGE),
                                     lambda: rx.set_flags(0, F_USED | F_WRITE))
        rig.a.run_burst(1)
        touch.close()
        assert rig.b.ring_state(0)["broken"] == RingError.LOOP
        assert rx.take_used() == [] and rx.read_desc(0)[3] == F_USED | F_WRITE
    run_forked(case)


# -- the RX copy's fast path (header + frame into one one-piece buffer, the
# frame from one source piece: cython_ext/rx_copy.pxd) and the fallbacks a
# guest forces with pieces; each piece under test ends at a guard page

def _rx_bytes(n, pieces):
    return b"".join(n.g.read(a, ln) for a, ln in pieces)


def test_rx_fast_path_buffer_exactly_the_frame_at_a_guard_page():
    def case():
        n = Net(rx_buffers=False)
        at = n.g.end(BUF2) - HDR - len(FRAME)
        n.rx.post([(at, HDR + len(FRAME), F_WRITE)], 1)
        a, ln = n.frame_at()
        n.tx.post([(a, ln, 0)], 0)
        assert n.send() == 1
        got = n.g.read(at, HDR + len(FRAME))
        assert got[HDR:] == FRAME and got[10:12] == b"\x01\x00"     # num_buffers 1
        assert n.rx.take_used() == [(1, HDR + len(FRAME))]
    run_forked(case)


def test_rx_buffer_of_two_pieces_cutting_the_header():
    """Fallback: one RX buffer as two descriptors, the first 8 bytes (part
    of the header), the second ending at a guard page."""
    def case():
        n = Net(rx_buffers=False)
        first, rest_len = n.rx_buf, HDR + len(FRAME) - 8
        rest = n.g.end(BUF2) - rest_len
        n.rx.post([(first, 8, F_WRITE), (rest, rest_len, F_WRITE)], 0)
        a, ln = n.frame_at()
        n.tx.post([(a, ln, 0)], 0)
        assert n.send() == 1
        got = _rx_bytes(n, [(first, 8), (rest, rest_len)])
        assert got[HDR:] == FRAME and got[10:12] == b"\x01\x00"
        assert n.rx.take_used() == [(0, HDR + len(FRAME))]
    run_forked(case)


def test_tx_frame_in_two_pieces_into_one_buffer():
    """Fallback on the source side: the frame's second half in its own TX
    descriptor, ending at a guard page; the RX buffer is one piece."""
    def case():
        n = Net()
        blob = bytes(HDR) + FRAME
        cut = HDR + 20
        head = n.g.start(BUF)
        tail = n.g.end(BUF2) - (len(blob) - cut)
        n.g.write(head, blob[:cut])
        n.g.write(tail, blob[cut:])
        n.tx.post([(head, cut, 0), (tail, len(blob) - cut, 0)], 0)
        assert n.send() == 1
        assert n.delivered() == [FRAME]
    run_forked(case)


def test_mergeable_frame_over_several_buffers():
    """Several buffers (the used descriptors pushed one per buffer, lengths
    up to what each holds): 16-byte buffers, the last at a guard page;
    num_buffers says how many and the bytes join up to the frame."""
    def case():
        n = Net(features=PACKED | FEAT_MRG_RXBUF, rx_buffers=False)
        length = 16
        need = -(-(HDR + len(FRAME)) // length)
        assert need <= SIZE
        base = n.g.end(BUF2) - length * need
        for i in range(need):
            n.rx.post([(base + length * i, length, F_WRITE)], i)
        a, ln = n.frame_at()
        n.tx.post([(a, ln, 0)], 0)
        assert n.send() == 1
        used = n.rx.take_used()
        total = HDR + len(FRAME)
        assert used == [(i, min(length, total - length * i)) for i in range(need)]
        got = n.g.read(base, total)
        assert got[HDR:] == FRAME and got[10:12] == bytes([need, 0])
        assert n.rx_broken() == 0
    run_forked(case)


# -- the one-descriptor fast path (cython_ext/packed.pxd packed_take_one)
# and the chain walk it leaves everything else to: chains, indirect tables,
# a descriptor running from one memory region into the next, lengths past
# the byte limit.  The mixed bursts alternate the two ways across the
# ring's wrap, so a cursor, wrap counter, buffer id or length they
# disagreed on would show in what is delivered and used.

NET_MAX_CHAIN = 262144           # netdata.pxd: bytes in one TX chain or RX buffer
BIG = len(REGIONS)               # a region past the byte limit, for the limit cases
BIG_REGIONS = REGIONS + [(0x400000, NET_MAX_CHAIN + PAGE)]


def _at(slot: int) -> int:
    """A base (packed_set_base's encoding) with both cursors at `slot`, wrap counters 1."""
    half = slot | 1 << 15
    return half | half << 16


def _used_last_lap(ring: PackedRing, slot: int) -> None:
    """Slot `slot` as the previous lap (wrap counter 1) left it: used.  The
    driver's take_used then stops there, as at a slot the device has not
    answered yet (an untouched slot of zeros would read as used in lap 0)."""
    ring.write_desc(slot, 0, 0, 0, F_AVAIL | F_USED)


def _numbered(k: int) -> bytes:
    return FRAME[:-1] + bytes([k])


def test_a_tx_burst_mixing_one_descriptor_buffers_with_chains_and_tables():
    """Slots 5..7, then 0..2 of the next lap: one descriptor, a chain of
    two, one descriptor (first of the new lap), an indirect table, one
    descriptor, one descriptor across the BUF/BUF2 boundary (regions
    adjacent in guest-physical space: mapped as two pieces)."""
    def case():
        n = Net(tx_base=_at(5), rx_buffers=False)
        for i in range(6):
            n.rx.post([(n.rx_buf + 512 * i, 512, F_WRITE)], i)
        frames = [_numbered(k) for k in range(6)]
        at = [n.g.start(BUF) + 128 * k for k in range(5)]
        for k in range(5):
            n.g.write(at[k], bytes(HDR) + frames[k])
        whole = HDR + len(FRAME)
        table = n.g.start(BUF2) + 512
        n.g.write(table, packed_table((at[3], 20, 0), (at[3] + 20, whole - 20, 0)))
        across = n.g.end(BUF) - 30
        blob = bytes(HDR) + frames[5]
        n.g.write(across, blob[:30])
        n.g.write(n.g.start(BUF2), blob[30:])
        n.tx.post([(at[0], whole, 0)], 7)
        n.tx.post([(at[1], 20, 0), (at[1] + 20, whole - 20, 0)], 1)
        n.tx.post([(at[2], whole, 0)], 0)
        n.tx.post([(table, 32, F_INDIRECT)], 5)
        n.tx.post([(at[4], whole, 0)], 2)
        n.tx.post([(across, whole, 0)], 3)
        _used_last_lap(n.tx, 4)
        assert n.send() == 6
        assert n.tx_broken() == 0 and n.rx_broken() == 0
        assert n.tx.take_used() == [(7, 0), (1, 0), (0, 0), (5, 0), (2, 0), (3, 0)]
        assert n.delivered() == frames
        st = n.rig.a.ring_state(1)
        assert (st["last_avail_idx"], st["avail_wrap"]) == (4, 0)
        assert (st["last_used_idx"], st["used_wrap"]) == (4, 0)
    run_forked(case)


def test_an_rx_ring_mixing_one_descriptor_buffers_with_chains_and_tables():
    """b's buffers from slot 6: one descriptor, a chain of two across the
    wrap (slots 7 and 0), one descriptor (slot 1, the new lap), one across
    the BUF/BUF2 boundary, an indirect table, one descriptor ending at a
    guard page; six frames fill them in order."""
    def case():
        n = Net(rx_base=_at(6), rx_buffers=False)
        whole = HDR + len(FRAME)
        rx = [n.rx_buf + 512 * k for k in range(4)]
        across = n.g.end(BUF) - 40
        table = n.g.start(BUF2) + 1024
        n.g.write(table, packed_table((rx[3], 8, F_WRITE), (rx[3] + 8, 504, F_WRITE)))
        edge = n.g.end(BUF2) - whole
        n.rx.post([(rx[0], 512, F_WRITE)], 4)
        n.rx.post([(rx[1], 8, F_WRITE), (rx[1] + 8, 504, F_WRITE)], 0)
        n.rx.post([(rx[2], 512, F_WRITE)], 7)
        n.rx.post([(across, 512, F_WRITE)], 1)
        n.rx.post([(table, 32, F_INDIRECT)], 2)
        n.rx.post([(edge, whole, F_WRITE)], 3)
        _used_last_lap(n.rx, 5)
        frames = [_numbered(k) for k in range(6)]
        at = [n.g.start(BUF) + 128 * k for k in range(6)]
        for k in range(6):
            n.g.write(at[k], bytes(HDR) + frames[k])
            n.tx.post([(at[k], whole, 0)], k)
        assert n.send() == 6
        assert n.tx_broken() == 0 and n.rx_broken() == 0
        assert n.rx.take_used() == [(i, whole) for i in (4, 0, 7, 1, 2, 3)]
        got = [n.g.read(a, whole) for a in rx[:3]]
        got.append(n.g.read(across, 40) + n.g.read(n.g.start(BUF2), whole - 40))
        got += [n.g.read(rx[3], whole), n.g.read(edge, whole)]
        assert [g[HDR:] for g in got] == frames
        assert all(g[10:12] == b"\x01\x00" for g in got)            # num_buffers 1
        st = n.rig.b.ring_state(0)
        assert (st["last_avail_idx"], st["avail_wrap"]) == (5, 0)
    run_forked(case)


@pytest.mark.parametrize("length,expected", [(NET_MAX_CHAIN, None),
                                             (NET_MAX_CHAIN + 1, RingError.LEN)])
def test_one_tx_descriptor_at_and_past_the_byte_limit(length, expected):
    """Taken (and dropped: b's 512-byte buffers cannot hold it) at the
    limit, E_LEN one byte past it, as for a chain."""
    def case():
        n = Net(regions=BIG_REGIONS)
        n.tx.post([(n.g.start(BIG), length, 0)], 0)
        n.send()
        assert n.tx_broken() == (expected or 0), n.rig.a.ring_state(1)
        assert n.tx.take_used() == ([(0, 0)] if expected is None else [])
        assert n.delivered() == [] and n.rx_broken() == 0
    run_forked(case)


@pytest.mark.parametrize("length,expected", [(NET_MAX_CHAIN, None),
                                             (NET_MAX_CHAIN + 1, RingError.LEN)])
def test_one_rx_descriptor_at_and_past_the_byte_limit(length, expected):
    def case():
        n = Net(rx_buffers=False, regions=BIG_REGIONS)
        n.rx.post([(n.g.start(BIG), length, F_WRITE)], 0)
        a, ln = n.frame_at()
        n.tx.post([(a, ln, 0)], 0)
        n.send()
        assert n.rx_broken() == (expected or 0), n.rig.b.ring_state(0)
        if expected is None:
            assert n.rx.take_used() == [(0, ln)]
            assert n.g.read(n.g.start(BIG) + HDR, len(FRAME)) == FRAME
        else:
            assert n.rx.take_used() == []
        assert n.tx_broken() == 0 and n.tx.take_used() == [(0, 0)]
    run_forked(case)
