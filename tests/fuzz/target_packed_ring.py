"""Fuzz target: packed virtqueues (VIRTIO_F_RING_PACKED) on the net data
path, in-process: device a's packed TX ring and device b's packed RX ring.

Each input is a whole guest: both rings' descriptors (addresses, lengths,
buffer ids, NEXT/WRITE/INDIRECT and the AVAIL/USED bits of either lap,
garbage included), where each ring's cursors start and their wrap
counters, the driver's event suppression area, the buffer memory (frames,
indirect tables of packed descriptors), and both devices' features.  Two
TX bursts run in the calling thread (`run_burst`); frames a sends reach b
through the engine's switch.  The descriptor rings and event areas end
exactly at PROT_NONE guard pages (tests/harness/engine_rig.py): an
out-of-bounds access is a crash.  A ring stopping on a bad chain is a
normal outcome; a crash or any Python exception is a finding.

Interface for scripts/fuzz: ``setup()`` once, then ``fuzz_one(data)``.

Input layout (zeros once it runs out):
  u8 a's features, u8 b's features (bits: INDIRECT, EVENT_IDX, MRG_RXBUF,
  VERSION_1), u8 size (1 + value % 16: any size, not only powers of two);
  a's TX ring, then b's RX ring, each: size packed descriptors (a compact
  descriptor of ring_input.py -- its `next` byte is the buffer id, mod
  2 * size -- then u8 avail bits: value % 6 in 0, 1, 2 available in the
  cursor's lap, 3 in the other lap, 4 both bits, 5 neither), u8 start
  slot (mod size), u8 wrap counter (bit 0), u16 off_wrap and u16 flags of
  the driver's event area; then the buffers and an indirect table as
  ring_input.write_buffers has them (its descriptors in split layout: the
  engine reads flags where a packed descriptor has them, so WRITE and
  INDIRECT still come from the input).
"""
from __future__ import annotations

import struct

from tests.fuzz.ring_input import Cursor, Places, compact_desc, write_buffers
from tests.harness.engine_rig import (
    FEAT_EVENT_IDX, FEAT_INDIRECT, FEAT_MRG_RXBUF, FEAT_VERSION_1, PAGE, Guest, NetRig,
)
from tests.harness.packed_ring import F_AVAIL, F_USED, FEAT_RING_PACKED, packed_at_ends

TXD, TXA, TXU, RXD, RXA, RXU, BUF, BUF2 = range(8)
REGIONS = [(0x10000, PAGE), (0x20000, PAGE), (0x30000, PAGE), (0x50000, PAGE),
           (0x60000, PAGE), (0x70000, PAGE), (0x100000, 2 * PAGE), (0x102000, PAGE)]
_SPLIT = struct.Struct("<QIHH")
_PACKED = struct.Struct("<QIHH")        # addr, len, id, flags

_g: Guest | None = None
_rig: NetRig | None = None
_places: Places | None = None


def setup() -> None:
    global _g, _rig, _places
    _g = Guest(REGIONS)
    _rig = NetRig(_g, FEAT_VERSION_1 | FEAT_RING_PACKED)
    _rig.a.close()            # off the switch: its frames flood to b, nothing is learned
    _places = Places(_g.start(BUF), _g.end(BUF), _g.end(BUF2), _g.start(TXD))


def _features(b: int) -> int:
    f = FEAT_RING_PACKED
    for bit, feat in enumerate((FEAT_INDIRECT, FEAT_EVENT_IDX, FEAT_MRG_RXBUF, FEAT_VERSION_1)):
        if b >> bit & 1:
            f |= feat
    return f


def _avail_bits(kind: int, wrap: int) -> int:
    mine = F_AVAIL if wrap else F_USED
    other = F_USED if wrap else F_AVAIL
    return (mine, mine, mine, other, F_AVAIL | F_USED, 0)[kind % 6]


def packed_ring_from(c: Cursor, g: Guest, places: Places, size: int,
                     regions: tuple[int, int, int]):
    """A packed ring of `size` at the ends of `regions` (descriptors,
    driver area, device area) from the input (the layout above: size
    descriptors with their avail bits, start slot, wrap counter, the
    driver's event area).  Returns it and its base in QEMU's encoding."""
    ring = packed_at_ends(g, size, *regions)
    descs = []
    for _ in range(size):
        addr, length, flags, nxt = _SPLIT.unpack(compact_desc(c, places, size))
        descs.append((addr, length, nxt, flags, c.u8()))
    start, wrap = c.u8() % size, c.u8() & 1
    for slot, (addr, length, id_, flags, kind) in enumerate(descs):
        lap = wrap if slot >= start else wrap ^ 1        # the slots behind the cursor are next lap's
        g.write(ring.desc_gpa + 16 * slot,
                _PACKED.pack(addr, length, id_, (flags & ~(F_AVAIL | F_USED)) | _avail_bits(kind, lap)))
    g.write(ring.driver_gpa, struct.pack("<HH", c.u16(), c.u16()))
    return ring, start | wrap << 15 | (start | wrap << 15) << 16


def fuzz_one(data: bytes) -> None:
    if _rig is None:
        setup()
    c = Cursor(data)
    fa, fb = _features(c.u8()), _features(c.u8())
    size = 1 + c.u8() % 16
    _g.clear()
    a, b = _rig.a, _rig.b
    try:
        a.set_features(fa)
        b.set_features(fb)
        tx, tx_base = packed_ring_from(c, _g, _places, size, (TXD, TXA, TXU))
        rx, rx_base = packed_ring_from(c, _g, _places, size, (RXD, RXA, RXU))
        write_buffers(c, _places, size, _g, _g.start(BUF), PAGE)
        b.start_ring(0, size, *rx.addresses, rx_base, -1, -1, True)
        a.start_ring(1, size, *tx.addresses, tx_base, -1, -1, True)
        a.run_burst(1)
        a.run_burst(1)
    finally:
        b.stop_ring(0)
        a.stop_ring(1)
