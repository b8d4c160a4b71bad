"""The engine's ring code driven in-process on guarded memory, for the
engine's unit tests (tests/unit/engine) and the ring fuzz targets
(tests/fuzz):

- `Guest`: guest memory as regions at guest-physical addresses, each its
  own `GuardedArea` (PROT_NONE pages either side), so the engine faults
  on any byte it reads or writes outside them;
- `RawRing`: a split ring at chosen guest addresses, written field by
  field as a buggy or hostile driver would (nothing checked here);
- `NetRig` / `BlkRig`: an `Engine` (no worker threads) with net devices
  on its switch, or a blk device, over a `Guest`; rings run one burst at a
  time in the calling thread (`RingDevice.run_burst`).

Run cases that may crash through `tests.harness.guarded.run_forked`.
"""
from __future__ import annotations

import struct
from enum import IntEnum

from tests.harness.guarded import PAGE, GuardedArea
from vfe.engine import Engine

F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
FEAT_MRG_RXBUF = 1 << 15
FEAT_INDIRECT = 1 << 28
FEAT_EVENT_IDX = 1 << 29
FEAT_VERSION_1 = 1 << 32
_DESC = struct.Struct("<QIHH")


class RingError(IntEnum):
    """What ``ring_state(i)["broken"]`` holds once a ring stopped (the
    engine's -E_* codes, cython_ext/vring.pxd, blk.pxd and fault.pxd)."""
    HEAD = 1
    NEXT = 2
    LOOP = 3
    ADDR = 4
    INDIRECT = 5
    NESTED = 6
    DIR = 7
    IOV = 8
    LEN = 9
    AVAIL = 10
    RING = 11
    BLK_HDR = 12
    BLK_STATUS = 13
    DUP = 14
    FAULT = 16                 # the guest memory vanished (SIGBUS caught)
    PACKED_CHAIN = 20          # packed rings (cython_ext/packed.pxd)
    PACKED_ID = 21


class Guest:
    """Guest memory: ``regions`` is [(gpa, size)], each mapped on its own
    between guard pages (sizes round up to pages; the front-end's virtual
    address of a byte is our address of it)."""

    def __init__(self, regions: list[tuple[int, int]]) -> None:
        self.areas: list[tuple[int, GuardedArea]] = []
        try:
            for gpa, size in regions:
                self.areas.append((gpa, GuardedArea(size, name=f"guest-{gpa:#x}")))
        except BaseException:
            self.close()
            raise

    def table(self) -> list[tuple[int, int, int, int]]:
        """The engine's memory table: (gpa, size, uva, hva) per region."""
        return [(gpa, a.size, a.addr, a.addr) for gpa, a in self.areas]

    def start(self, i: int) -> int:
        return self.areas[i][0]

    def end(self, i: int) -> int:
        """Guest-physical address one past region i."""
        gpa, a = self.areas[i]
        return gpa + a.size

    def locate(self, gpa: int, length: int = 1) -> tuple[GuardedArea, int]:
        for start, a in self.areas:
            if start <= gpa and gpa + length <= start + a.size:
                return a, gpa - start
        raise ValueError(f"[{gpa:#x}, +{length}) is not inside one region")

    def hva(self, gpa: int) -> int:
        a, off = self.locate(gpa)
        return a.addr + off

    def _pieces(self, gpa: int, length: int):
        """(area, offset, n) covering [gpa, gpa+length), across regions
        adjacent in guest-physical space."""
        while length > 0:
            a, off = self.locate(gpa)
            n = min(length, a.size - off)
            yield a, off, n
            gpa += n
            length -= n

    def write(self, gpa: int, data: bytes) -> None:
        done = 0
        for a, off, n in self._pieces(gpa, len(data)):
            a.write(off, data[done:done + n])
            done += n

    def read(self, gpa: int, length: int) -> bytes:
        return b"".join(a.read(off, n) for a, off, n in self._pieces(gpa, length))

    def store16(self, gpa: int, value: int) -> None:
        """One aligned 16-bit store (a ring index the engine may be reading)."""
        a, off = self.locate(gpa, 2)
        a.view[off:off + 2].cast("H")[0] = value & 0xFFFF

    def load16(self, gpa: int) -> int:
        a, off = self.locate(gpa, 2)
        return a.view[off:off + 2].cast("H")[0]

    def clear(self) -> None:
        for _, a in self.areas:
            a.fill(0)

    def close(self) -> None:
        for _, a in self.areas:
            a.close()
        self.areas = []


class RawRing:
    """A split ring of ``size`` entries at guest addresses ``desc``,
    ``avail``, ``used`` (no alignment or bounds enforced: the engine's job).
    ``post`` is the driver's side; nothing here keeps chains or free lists."""

    def __init__(self, guest: Guest, size: int, desc: int, avail: int, used: int) -> None:
        self.guest, self.size = guest, size
        self.desc_gpa, self.avail_gpa, self.used_gpa = desc, avail, used
        self.avail_idx = 0

    # areas as the front-end announces them (its virtual addresses)
    @property
    def addresses(self) -> tuple[int, int, int]:
        g = self.guest
        return g.hva(self.desc_gpa), g.hva(self.avail_gpa), g.hva(self.used_gpa)

    def set_desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        self.guest.write(self.desc_gpa + 16 * i, _DESC.pack(addr, length, flags, nxt))

    def post(self, *heads: int, publish: bool = True) -> None:
        """Avail entries for ``heads`` (raw values), then avail->idx."""
        for h in heads:
            self.guest.store16(self.avail_gpa + 4 + 2 * (self.avail_idx % self.size), h)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if publish:
            self.publish()

    def publish(self, idx: int | None = None) -> None:
        if idx is not None:
            self.avail_idx = idx & 0xFFFF
        self.guest.store16(self.avail_gpa + 2, self.avail_idx)

    def used_idx(self) -> int:
        return self.guest.load16(self.used_gpa + 2)

    def used(self, i: int) -> tuple[int, int]:
        """Used element i (mod size): (id, len)."""
        return struct.unpack("<II", self.guest.read(self.used_gpa + 4 + 8 * (i % self.size), 8))


def table_bytes(*descs: tuple[int, int, int, int]) -> bytes:
    """An indirect table: (addr, len, flags, next) per descriptor."""
    return b"".join(_DESC.pack(*d) for d in descs)


def ring_at_ends(guest: Guest, size: int, desc_region: int, avail_region: int,
                 used_region: int, event_idx: bool = False) -> RawRing:
    """A ring whose three areas each end exactly at the end of their
    region (an overrun of any of them faults)."""
    extra = 2 if event_idx else 0
    desc = guest.end(desc_region) - 16 * size
    avail = guest.end(avail_region) - (4 + 2 * size + extra)
    used_len = 4 + 8 * size + extra
    used = (guest.end(used_region) - used_len) & ~3     # used->ring wants 4-byte alignment
    return RawRing(guest, size, desc, avail, used)


class _Rig:
    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        self.engine = Engine(workers=1, mode="poll")

    @staticmethod
    def start(dev, index: int, ring: RawRing, base: int = 0, enabled: bool = True):
        d, a, u = ring.addresses
        return dev.start_ring(index, ring.size, d, a, u, base, -1, -1, enabled)

    @staticmethod
    def broken(dev, index: int) -> int:
        """0, or the RingError that stopped ring `index`."""
        return dev.ring_state(index)["broken"]


class NetRig(_Rig):
    """Two net devices (one queue pair each) on the engine's switch:
    frames the guest puts on ``a``'s TX ring (1) are flooded to ``b``'s RX
    ring (0) when their destination is broadcast."""

    def __init__(self, guest: Guest, features: int = FEAT_VERSION_1 | FEAT_INDIRECT) -> None:
        super().__init__(guest)
        self.a = self.engine.new_net_device(2)
        self.b = self.engine.new_net_device(2)
        for d in (self.a, self.b):
            d.set_memory(guest.table())
            d.set_features(features)

    def close(self) -> None:
        self.a.close()
        self.b.close()


class BlkRig(_Rig):
    """One blk device (one queue) over ``backend`` ("malloc", "null", or
    "file" with ``path``)."""

    def __init__(self, guest: Guest, backend: str = "malloc", capacity: int = 1 << 20,
                 features: int = FEAT_VERSION_1 | FEAT_INDIRECT, **kw) -> None:
        super().__init__(guest)
        if backend == "file":
            kw.setdefault("grow", True)        # a test's fresh (empty) image becomes the disk
        self.dev = self.engine.new_blk_device(1, capacity, backend=backend, serial="rig", **kw)
        self.dev.set_memory(guest.table())
        self.dev.set_features(features)

    def inflight(self, area: GuardedArea, offset: int, queue_size: int, length: int,
                 stride: int | None = None) -> None:
        """Track queue 0 in ``area`` from ``offset``: ``length`` bytes
        holding queues of ``queue_size`` entries (the stride defaults to
        exactly that: header + entries, no padding)."""
        if stride is None:
            stride = 16 + 16 * queue_size
        self.dev.set_inflight(area.addr + offset, stride, 1, queue_size, length)

    def close(self) -> None:
        self.dev.close()


def blk_header(kind: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", kind, 0, sector)


__all__ = ["Guest", "RawRing", "NetRig", "BlkRig", "RingError", "ring_at_ends", "table_bytes",
           "blk_header", "F_NEXT", "F_WRITE", "F_INDIRECT", "FEAT_MRG_RXBUF", "FEAT_INDIRECT",
           "FEAT_EVENT_IDX", "FEAT_VERSION_1", "PAGE"]
