"""Fuzz target: the virtio-blk request path and the inflight region code
in-process.

Each input is a whole guest for one blk queue: the descriptor table, avail
entries and indices, used index, the buffer memory (request headers, data,
discard ranges, indirect tables), the negotiated features, the backend
(malloc, or a file served by the I/O threads), and an inflight region --
its declared queue size and length, and every field of its header and
entries.  The ring starts (which may refuse the region: a normal outcome),
runs two bursts in the calling thread (`run_burst`) and stops (which
serves resubmissions and drains the I/O threads).  Guest memory and the
inflight region lie between PROT_NONE pages, the ring areas and the region
ending exactly at the guards: an out-of-bounds access is a crash.  A ring
stopping on a bad chain is a normal outcome; a crash or any Python
exception is a finding.

Interface for scripts/fuzz: ``setup()`` once, then ``fuzz_one(data)``.

Input layout (ring_input.py has the encoders; zeros once it runs out):
  u8 mode (bit 0 file bdev, 1 INDIRECT, 2 EVENT_IDX, 3 an inflight region,
  4-5 size 2/4/8/16, 6 DISCARD and WRITE_ZEROES); the ring: size compact
  descriptors, u16 base, u8 avail count, the heads, u16 used index, with
  EVENT_IDX u16 used_event; with an inflight region: u8 queue size (below
  0xC0 the ring's, else 1..64), u8 length (below 0xC0 exactly the queue's,
  else 16 + 16 * (1..63) bytes), u8 version (below 0x80: 0, 0xF0: 1, else
  a u16 follows), u8 desc_num (below 0xE0 the ring size, else a u16
  follows), u16 last_batch_head, u8 used_idx behind used->idx, then per
  entry u8 flag, u8 next, u8 counter; u8 indirect table length (mod 9),
  u16 its offset, its compact descriptors; the rest: the buffers' bytes.
"""
from __future__ import annotations

import os
import tempfile

from tests.fuzz.ring_input import Cursor, Places, avail_heads, compact_desc, write_buffers
from tests.harness.engine_rig import (
    FEAT_EVENT_IDX, FEAT_INDIRECT, FEAT_VERSION_1, PAGE, BlkRig, Guest, ring_at_ends,
)
from tests.harness.guarded import GuardedArea
from vfe.vhost.inflight import DESC_STATE, QUEUE_HEADER

DESC, AVAIL, USED, BUF, BUF2 = range(5)
REGIONS = [(0x10000, PAGE), (0x20000, PAGE), (0x30000, PAGE), (0x100000, 2 * PAGE),
           (0x102000, PAGE)]
SIZES = (2, 4, 8, 16)
FEAT_DISCARD_WZ = (1 << 13) | (1 << 14)
CAPACITY = 1 << 20

_g: Guest | None = None
_rigs: dict[str, BlkRig] = {}
_inflight: GuardedArea | None = None
_places: Places | None = None
last_device = None          # the last input's device (its ring state, for corpus statistics)


def setup() -> None:
    """Guest memory, a malloc and a file blk device (each in its own engine,
    no worker threads; the file's I/O threads run), the inflight area."""
    global _g, _inflight, _places
    _g = Guest(REGIONS)
    _places = Places(_g.start(BUF), _g.end(BUF), _g.end(BUF2), _g.start(DESC))
    _rigs["malloc"] = BlkRig(_g, "malloc", CAPACITY)
    fd, path = tempfile.mkstemp(prefix="vfe-fuzz-blk-", dir="/dev/shm" if os.path.isdir("/dev/shm")
                                else None)
    os.close(fd)
    try:
        _rigs["file"] = BlkRig(_g, "file", CAPACITY, path=path, aio_threads=1)
    finally:
        os.unlink(path)          # the device keeps its fds; nothing is left behind on any exit
    _inflight = GuardedArea(PAGE, name="fuzz-inflight")


def _inflight_region(c: Cursor, size: int, used_base: int, rig: BlkRig) -> None:
    """The region's shape (declared queue size, length) and contents."""
    qsel, lsel = c.u8(), c.u8()
    qs = size if qsel < 0xC0 else (qsel & 0x3F) + 1
    length = 16 + 16 * qs if lsel < 0xC0 else 16 + 16 * (lsel & 0x3F)
    vsel, dsel = c.u8(), c.u8()
    version = 0 if vsel < 0x80 else (1 if vsel < 0xF0 else c.u16())
    desc_num = size if dsel < 0xE0 else c.u16()
    last_batch = c.u16()
    used_idx = (used_base - c.u8()) & 0xFFFF
    entries = b"".join(DESC_STATE.pack(c.u8(), c.u8() % (2 * size), c.u8())
                       for _ in range(min(qs, (length - 16) // 16 if length > 16 else 0)))
    q = QUEUE_HEADER.pack(0, version, desc_num, last_batch, used_idx) + entries
    length = min(length, PAGE)
    off = PAGE - length                      # the region ends at the guard page
    _inflight.fill(0)
    _inflight.write(off, q[:length])
    try:
        rig.inflight(_inflight, off, qs, length)
    except ValueError:
        pass                                 # a shape its length cannot hold: refused


def fuzz_one(data: bytes) -> None:
    if not _rigs:
        setup()
    c = Cursor(data)
    mode = c.u8()
    global last_device
    rig = _rigs["file" if mode & 1 else "malloc"]
    dev = last_device = rig.dev
    size = SIZES[(mode >> 4) & 3]
    event_idx = bool(mode & 4)
    features = FEAT_VERSION_1 | (FEAT_INDIRECT if mode & 2 else 0) \
        | (FEAT_EVENT_IDX if event_idx else 0) | (FEAT_DISCARD_WZ if mode & 0x40 else 0)
    _g.clear()
    dev.set_features(features)
    ring = ring_at_ends(_g, size, DESC, AVAIL, USED, event_idx=event_idx)
    _g.write(ring.desc_gpa, b"".join(compact_desc(c, _places, size) for _ in range(size)))
    base = c.u16()
    count = c.u8() % (size + 3)
    ring.avail_idx = base
    ring.post(*avail_heads(c, min(count, size), size), publish=False)
    ring.publish((base + count) & 0xFFFF)
    used_base = c.u16()
    _g.store16(ring.used_gpa + 2, used_base)
    if event_idx:
        _g.store16(ring.avail_gpa + 4 + 2 * size, c.u16())
    if mode & 8:
        _inflight_region(c, size, used_base, rig)
    write_buffers(c, _places, size, _g, _g.start(BUF), PAGE)
    try:
        try:
            rig.start(dev, 0, ring, base)
        except ValueError:
            return                           # the inflight region refused the ring
        dev.run_burst(0)
        dev.run_burst(0)
    finally:
        dev.stop_ring(0)
        dev.set_inflight(0, 0, 0, 0, 0)

