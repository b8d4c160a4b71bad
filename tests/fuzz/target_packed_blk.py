"""Fuzz target: virtio-blk on a packed virtqueue with the packed inflight
region (QueueRegionPacked), in-process.

Each input is a whole guest for one packed blk queue: its descriptors
(addresses, lengths, buffer ids, NEXT/WRITE/INDIRECT and the AVAIL/USED
bits of either lap), where its cursors start and their wrap counter, the
driver's event area, the buffer memory (request headers, data, indirect
tables), the backend (malloc, or a file served by the I/O threads), and
an inflight region: its declared queue size and stride (packed-sized,
split-sized, or anything), whether it is handed over while the device is
still split (SET_FEATURES negotiating RING_PACKED afterwards), and every
field of its header and entries, the copies of descriptors included.  The
ring starts (which may refuse the region: a normal outcome), runs two
bursts in the calling thread (`run_burst`) and stops (which serves
resubmissions and drains the I/O threads).  The descriptor ring, event
areas and the region end exactly at PROT_NONE guard pages: an
out-of-bounds access is a crash.  A ring stopping on a bad chain is a
normal outcome; a crash or any Python exception is a finding.

Interface for scripts/fuzz: ``setup()`` once, then ``fuzz_one(data)``.

Input layout (zeros once it runs out):
  u8 mode (bit 0 file bdev, 1 INDIRECT, 2 EVENT_IDX, 3 an inflight region,
  4 the region handed over before RING_PACKED is negotiated), u8 size (1 +
  value % 16); the ring: size packed descriptors as target_packed_ring.py
  has them (compact descriptor, u8 avail bits), u8 start slot, u8 wrap
  counter, u16 off_wrap, u16 flags; with a region: u8 queue size (below
  0xC0 the ring's, else 1..64), u8 stride (below 0xA0 packed-sized,
  below 0xC0 split-sized, else 32 + 32 * (value % 32)), u8 version (below
  0x80: 0, else 1), u8 desc_num (below 0xE0 the ring size, else the
  byte), u8 free_head, old_free_head, used_idx, old_used_idx (each mod 2 *
  size), u8 used_wrap_counter, old_used_wrap_counter (below 0xF0 bit 0,
  else as is), then per entry u8 inflight (bit 0), next, last (mod 2 *
  size), num (mod size + 2), counter, and a compact descriptor (its
  `next` byte the id); then the buffers and an indirect table as
  ring_input.write_buffers has them.
"""
from __future__ import annotations

import os
import struct
import tempfile

from tests.fuzz.ring_input import Cursor, Places, compact_desc, write_buffers
from tests.fuzz.target_packed_ring import packed_ring_from
from tests.harness.engine_rig import FEAT_EVENT_IDX, FEAT_INDIRECT, FEAT_VERSION_1, PAGE, BlkRig, Guest
from tests.harness.guarded import GuardedArea
from tests.harness.packed_ring import FEAT_RING_PACKED

DESC, DRV, DEV, BUF, BUF2 = range(5)
REGIONS = [(0x10000, PAGE), (0x20000, PAGE), (0x30000, PAGE), (0x100000, 2 * PAGE),
           (0x102000, PAGE)]
CAPACITY = 1 << 20
_SPLIT = struct.Struct("<QIHH")
_HEADER = struct.Struct("<QHHHHHHBB7x")         # QueueRegionPacked: features .. old_used_wrap_counter
_ENTRY = struct.Struct("<BxHHHQHHIQ")           # DescStatePacked: inflight, next, last, num, counter, id, flags, len, addr

_g: Guest | None = None
_rigs: dict[str, BlkRig] = {}
_inflight: GuardedArea | None = None
_places: Places | None = None
last_device = None          # the last input's device (its ring state, for the regression test)


def setup() -> None:
    """Guest memory, a malloc and a file blk device (no worker threads; the
    file's I/O thread runs), the inflight area."""
    global _g, _inflight, _places
    _g = Guest(REGIONS)
    _places = Places(_g.start(BUF), _g.end(BUF), _g.end(BUF2), _g.start(DESC))
    _rigs["malloc"] = BlkRig(_g, "malloc", CAPACITY)
    fd, path = tempfile.mkstemp(prefix="vfe-fuzz-pblk-", dir="/dev/shm" if os.path.isdir("/dev/shm")
                                else None)
    os.close(fd)
    try:
        _rigs["file"] = BlkRig(_g, "file", CAPACITY, path=path, aio_threads=1)
    finally:
        os.unlink(path)          # the device keeps its fds; nothing is left behind on any exit
    _inflight = GuardedArea(PAGE, name="fuzz-pinflight")


def _wrap(b: int) -> int:
    return b & 1 if b < 0xF0 else b


def _region(c: Cursor, size: int) -> tuple[int, int, int, bytes]:
    """(queue size, stride, its offset in the area, its bytes)."""
    qsel, ssel = c.u8(), c.u8()
    qs = size if qsel < 0xC0 else (qsel & 0x3F) + 1
    if ssel < 0xA0:
        stride = 32 + 32 * qs
    elif ssel < 0xC0:
        stride = 16 + 16 * qs
    else:
        stride = 32 + 32 * (ssel % 32)
    stride = min(stride, PAGE)
    version = 0 if c.u8() < 0x80 else 1
    dsel = c.u8()
    desc_num = size if dsel < 0xE0 else dsel
    cursors = [c.u8() % (2 * size) for _ in range(4)]
    header = _HEADER.pack(0, version, desc_num, *cursors, _wrap(c.u8()), _wrap(c.u8())) + bytes(3)
    entries = []
    for _ in range((stride - 32) // 32 if stride > 32 else 0):
        inflight, nxt, last, num, counter = (c.u8() & 1, c.u8() % (2 * size), c.u8() % (2 * size),
                                             c.u8() % (size + 2), c.u8())
        addr, length, flags, id_ = _SPLIT.unpack(compact_desc(c, _places, size))
        entries.append(_ENTRY.pack(inflight, nxt, last, num, counter, id_, flags, length, addr))
    data = (header + b"".join(entries))[:stride]
    return qs, stride, PAGE - stride, data


def fuzz_one(data: bytes) -> None:
    if not _rigs:
        setup()
    c = Cursor(data)
    mode = c.u8()
    size = 1 + c.u8() % 16
    global last_device
    rig = _rigs["file" if mode & 1 else "malloc"]
    dev = last_device = rig.dev
    features = FEAT_VERSION_1 | FEAT_RING_PACKED | (FEAT_INDIRECT if mode & 2 else 0) \
        | (FEAT_EVENT_IDX if mode & 4 else 0)
    _g.clear()
    ring, base = packed_ring_from(c, _g, _places, size, (DESC, DRV, DEV))
    region = _region(c, size) if mode & 8 else None
    write_buffers(c, _places, size, _g, _g.start(BUF), PAGE)
    try:
        dev.set_features(features & ~FEAT_RING_PACKED if mode & 16 else features)
        if region is not None:
            qs, stride, off, blob = region
            _inflight.fill(0)
            _inflight.write(off, blob)
            try:
                dev.set_inflight(_inflight.addr + off, stride, 1, qs, stride)
            except ValueError:
                pass                         # a shape its stride cannot hold: refused
        dev.set_features(features)
        try:
            dev.start_ring(0, size, *ring.addresses, base, -1, -1, True)
        except ValueError:
            return                           # the inflight region refused the ring
        dev.run_burst(0)
        dev.run_burst(0)
    finally:
        dev.stop_ring(0)
        dev.set_inflight(0, 0, 0, 0, 0)
