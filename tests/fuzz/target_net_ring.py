"""Fuzz target: the net data path's chain walks (TX and RX) in-process.

Each input is a whole guest: device a's TX ring and device b's RX ring
(descriptor tables, avail entries and indices, used index), the buffer
memory they point into (frames, indirect tables), and both devices'
features (indirect, event index, mergeable RX buffers, header length,
offloads -- frames b did not negotiate offloads for go through the
software checksum/GSO kernels).  One TX burst runs in the calling thread
(`run_burst`); frames a sends reach b's RX ring through the engine's
switch.  Every ring area and buffer region lies between PROT_NONE pages
(tests/harness/engine_rig.py), with the rings ending exactly at the guards:
an out-of-bounds access is a crash.  A ring stopping on a bad chain is a
normal outcome; a crash or any Python exception is a finding.

Interface for scripts/fuzz: ``setup()`` once, then ``fuzz_one(data)``.

Input layout (ring_input.py has the encoders; zeros once it runs out):
  u8 a's features, u8 b's features (bits: INDIRECT, EVENT_IDX, MRG_RXBUF,
  VERSION_1, then CSUM, GUEST_CSUM, GUEST_TSO4, GUEST_TSO6), u8 size
  (2/4/8/16); a's TX ring, then b's RX ring, each: size compact
  descriptors, u16 base, u8 avail count (> size: an impossible avail
  index), the heads, u16 used index, with EVENT_IDX u16 used_event; u8
  indirect table length (mod 9), u16 its offset in the buffers, its
  compact descriptors; the rest: the buffers' bytes (3 pages at most).
"""
from __future__ import annotations

from tests.fuzz.ring_input import Cursor, Places, avail_heads, compact_desc, write_buffers
from tests.harness.engine_rig import (
    FEAT_EVENT_IDX, FEAT_INDIRECT, FEAT_MRG_RXBUF, FEAT_VERSION_1, PAGE, Guest, NetRig,
    ring_at_ends,
)

TXD, TXA, TXU, RXD, RXA, RXU, BUF, BUF2 = range(8)
REGIONS = [(0x10000, PAGE), (0x20000, PAGE), (0x30000, PAGE), (0x50000, PAGE),
           (0x60000, PAGE), (0x70000, PAGE), (0x100000, 2 * PAGE), (0x102000, PAGE)]
SIZES = (2, 4, 8, 16)
B_MAC = b"\x02\x00\x00\x00\x00\x0b"
# offload features a receiver may or may not have (CSUM, GUEST_CSUM,
# GUEST_TSO4, GUEST_TSO6): a frame needing one it lacks is finished in
# software
OFFLOADS = (1 << 0, 1 << 1, 1 << 7, 1 << 8)

_g: Guest | None = None
_rig: NetRig | None = None
_places: Places | None = None


def setup() -> None:
    """The guest memory and the engine (no worker threads); the Numba
    kernels for the software offload path."""
    global _g, _rig, _places
    try:
        from vfe.engine import install_kernels
        install_kernels()
    except ImportError:                    # no numba: the slow path drops instead
        pass
    _g = Guest(REGIONS)
    _rig = NetRig(_g)
    # The sender leaves the switch's port table (a closed device keeps its
    # rings and memory table, and its rings start again): the switch then
    # floods its frames to b and learns no MAC from them, so no input's
    # outcome depends on an earlier one's.  (Detaching a fresh sender per
    # input instead costs a scan of the whole MAC table, twice.)
    _rig.a.close()
    # b's MAC, learned once (b never sends): frames to it take the switch's
    # unicast path, any other destination floods
    _rig.b.inject(B_MAC + B_MAC + b"\x08\x06" + bytes(46))
    _places = Places(_g.start(BUF), _g.end(BUF), _g.end(BUF2), _g.start(TXD))


def _features(b: int) -> int:
    """Bits 0-3: INDIRECT, EVENT_IDX, MRG_RXBUF, VERSION_1; 4-7: OFFLOADS."""
    f = 0
    if b & 1:
        f |= FEAT_INDIRECT
    if b & 2:
        f |= FEAT_EVENT_IDX
    if b & 4:
        f |= FEAT_MRG_RXBUF
    if b & 8:
        f |= FEAT_VERSION_1
    for k, bit in enumerate(OFFLOADS):
        if b >> (4 + k) & 1:
            f |= bit
    return f


def _ring(c: Cursor, size: int, regions: tuple[int, int, int], event_idx: bool):
    ring = ring_at_ends(_g, size, *regions, event_idx=event_idx)
    table = b"".join(compact_desc(c, _places, size) for _ in range(size))
    _g.write(ring.desc_gpa, table)
    base = c.u16()
    count = c.u8() % (size + 3)            # > size sometimes: E_AVAIL
    ring.avail_idx = base
    ring.post(*avail_heads(c, min(count, size), size), publish=False)
    ring.publish((base + count) & 0xFFFF)
    _g.store16(ring.used_gpa + 2, c.u16())
    if event_idx:
        _g.store16(ring.avail_gpa + 4 + 2 * size, c.u16())   # used_event
    return ring, base


def fuzz_one(data: bytes) -> None:
    if _rig is None:
        setup()
    c = Cursor(data)
    fa, fb = _features(c.u8()), _features(c.u8())
    size = SIZES[c.u8() % len(SIZES)]
    _g.clear()
    # a fresh sender each time: the switch forgets what it learned from it
    a, b = _rig.a, _rig.b
    try:
        a.set_features(fa)
        b.set_features(fb)
        tx, tx_base = _ring(c, size, (TXD, TXA, TXU), bool(fa & FEAT_EVENT_IDX))
        rx, rx_base = _ring(c, size, (RXD, RXA, RXU), bool(fb & FEAT_EVENT_IDX))
        write_buffers(c, _places, size, _g, _g.start(BUF), PAGE)
        _rig.start(b, 0, rx, rx_base)
        _rig.start(a, 1, tx, tx_base)
        a.run_burst(1)
        a.run_burst(1)
    finally:
        b.stop_ring(0)
        a.stop_ring(1)

