"""A pure-Python split virtqueue, *driver* side (what a guest's virtio driver
does), over a writable memoryview of guest memory.  Used by the test
front-end and as a reference in ring tests.  Virtio 1.2 section 2.7.

Shared-memory rules that matter here:

- An index the device reads concurrently (``avail->idx``, ``used_event``) is
  published with ONE aligned 16-bit store: ``memoryview.cast("H")[i] = v``.
  Never ``struct.pack_into`` (CPython zeroes the target before packing, so
  the device can see 0 and process ~65 000 stale entries).
- x86 keeps stores in order and loads in order, but may move a load before
  an earlier store.  Publishing ``avail->idx`` and then reading the device's
  ``avail_event`` / ``used->flags`` needs a full fence; CPython has no fence
  primitive, so ``full_fence()`` takes and releases a lock (a LOCK-prefixed
  instruction, a full barrier on x86).
"""
from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple

from vfe.virtio.constants import (
    MAX_QUEUE_SIZE,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_DESC_SIZE,
    VRING_USED_ELEM_SIZE,
    VRING_USED_F_NO_NOTIFY,
)
from vfe.virtio.layouts import ring_area_sizes

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")
_fence_lock = threading.Lock()


def full_fence() -> None:
    with _fence_lock:
        pass


class RingError(Exception):
    """The ring is full, or the device returned something impossible."""


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """vring_need_event(): did [old, new) pass ``event_idx``?  (wrap-safe)"""
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old_idx) & 0xFFFF


def _align_up(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


@dataclass(frozen=True)
class RingLayout:
    """Offsets (from the ring area's start) of a ring's three parts (a
    packed ring's: descriptor ring, driver and device event areas)."""

    size: int
    desc: int
    avail: int
    used: int
    total: int
    packed: bool = False

    @property
    def desc_len(self) -> int:
        return ring_area_sizes(self.size, event_idx=True, packed=self.packed).desc

    @property
    def avail_len(self) -> int:          # split: flags, idx, ring[size], used_event
        return ring_area_sizes(self.size, event_idx=True, packed=self.packed).avail

    @property
    def used_len(self) -> int:           # split: flags, idx, ring[size], avail_event
        return ring_area_sizes(self.size, event_idx=True, packed=self.packed).used


def split_ring_layout(size: int, used_align: int = 4) -> RingLayout:
    """The layout of the legacy/modern split ring: descriptors, then the
    available ring, then the used ring aligned to ``used_align`` (4 for
    virtio 1.x drivers, 4096 for legacy ones)."""
    if size <= 0 or size & (size - 1) or size > MAX_QUEUE_SIZE:
        raise ValueError(f"ring size {size}")
    areas = ring_area_sizes(size, event_idx=True)
    desc = 0
    avail = areas.desc
    used = _align_up(avail + areas.avail, used_align)
    total = used + areas.used
    return RingLayout(size, desc, avail, used, total)


class Used(NamedTuple):
    head: int
    length: int           # bytes the device wrote
    token: Any            # what add_chain was given


class DriverRing:
    """The driver side of one split ring.

    ``mem`` is a writable memoryview; the descriptor table, available ring
    and used ring sit at ``desc_off``/``avail_off``/``used_off`` in it.
    ``gpa_base`` is the guest-physical address of ``mem[0]``, needed only for
    indirect tables (carved from ``indirect_off``: one table of
    ``max_indirect`` descriptors per head).
    """

    def __init__(self, mem: memoryview, size: int, desc_off: int, avail_off: int, used_off: int,
                 *, event_idx: bool = False, gpa_base: int = 0, indirect_off: int | None = None,
                 max_indirect: int = 16, start_idx: int = 0, init: bool = True) -> None:
        if size <= 0 or size & (size - 1):
            raise ValueError(f"ring size {size}")
        if desc_off % 16 or avail_off % 2 or used_off % 4:
            raise ValueError("misaligned ring areas")
        self.size = size
        self.event_idx = event_idx
        self.gpa_base = gpa_base
        self._mem = mem
        self._desc_off = desc_off
        self._avail_off = avail_off
        self._used_off = used_off
        # 16-bit views for single aligned stores/loads of shared indices.
        areas = ring_area_sizes(size, event_idx=True)    # the event fields are always laid out
        self._avail16 = mem[avail_off:avail_off + areas.avail].cast("H")
        self._used16 = mem[used_off:used_off + areas.used].cast("H")
        self._indirect_off = indirect_off
        self._max_indirect = max_indirect
        if init:
            mem[desc_off:desc_off + areas.desc] = bytes(areas.desc)
            mem[avail_off:avail_off + areas.avail] = bytes(areas.avail)
            mem[used_off:used_off + areas.used] = bytes(areas.used)
        self._avail_idx = start_idx & 0xFFFF
        self._last_used = start_idx & 0xFFFF
        self._kicked_idx = self._avail_idx
        if init:
            self._avail16[1] = self._avail_idx
            self._used16[1] = self._last_used
        self._free = list(range(size))
        self._chains: dict[int, tuple[list[int], Any]] = {}

    @classmethod
    def from_layout(cls, mem: memoryview, layout: RingLayout, base_off: int = 0, **kw: Any) -> "DriverRing":
        return cls(mem, layout.size, base_off + layout.desc, base_off + layout.avail,
                   base_off + layout.used, **kw)

    # -- state ----------------------------------------------------------------

    @property
    def avail_idx(self) -> int:
        """Our next avail index (what we published)."""
        return self._avail_idx

    @property
    def last_used_idx(self) -> int:
        return self._last_used

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def outstanding(self) -> int:
        """Chains given to the device and not returned yet."""
        return len(self._chains)

    def used_idx(self) -> int:
        """The device's used->idx (one 16-bit load)."""
        return self._used16[1]

    def has_used(self) -> bool:
        return self._used16[1] != self._last_used

    # -- adding buffers -------------------------------------------------------

    def _write_desc(self, off: int, addr: int, length: int, flags: int, nxt: int) -> None:
        # Descriptors are not read by the device before avail->idx covers
        # them, so a multi-field pack is fine here (unlike the indices).
        _DESC.pack_into(self._mem, off, addr, length, flags, nxt)

    def add_chain(self, bufs: Iterable[tuple[int, int, bool]], indirect: bool = False,
                  token: Any = None, publish: bool = True) -> int:
        """Add one chain of ``(gpa, len, device_writes)`` buffers; return its head.

        Device-readable buffers must come before device-writable ones (the
        ring does not reorder).  ``publish=False`` writes the avail entry but
        leaves avail->idx for a later ``publish()`` (batching).
        """
        bufs = list(bufs)
        if not bufs:
            raise ValueError("empty chain")
        if indirect:
            if self._indirect_off is None:
                raise RingError("no indirect table area")
            if len(bufs) > self._max_indirect:
                raise RingError(f"{len(bufs)} buffers > {self._max_indirect} per indirect table")
            if not self._free:
                raise RingError("ring full")
            head = self._free.pop()
            table_off = self._indirect_off + head * self._max_indirect * VRING_DESC_SIZE
            for i, (addr, length, write) in enumerate(bufs):
                flags = (VRING_DESC_F_WRITE if write else 0)
                nxt = 0
                if i + 1 < len(bufs):
                    flags |= VRING_DESC_F_NEXT
                    nxt = i + 1
                self._write_desc(table_off + i * VRING_DESC_SIZE, addr, length, flags, nxt)
            self._write_desc(self._desc_off + head * VRING_DESC_SIZE, self.gpa_base + table_off,
                             len(bufs) * VRING_DESC_SIZE, VRING_DESC_F_INDIRECT, 0)
            descs = [head]
        else:
            if len(bufs) > len(self._free):
                raise RingError(f"ring full ({len(self._free)} free, chain of {len(bufs)})")
            descs = [self._free.pop() for _ in bufs]
            head = descs[0]
            for i, (addr, length, write) in enumerate(bufs):
                flags = (VRING_DESC_F_WRITE if write else 0)
                nxt = 0
                if i + 1 < len(descs):
                    flags |= VRING_DESC_F_NEXT
                    nxt = descs[i + 1]
                self._write_desc(self._desc_off + descs[i] * VRING_DESC_SIZE, addr, length, flags, nxt)
        self._chains[head] = (descs, token)
        slot = self._avail_idx % self.size
        self._avail16[2 + slot] = head
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        if publish:
            self.publish()
        return head

    def publish(self) -> None:
        """Make every added chain visible: one aligned 16-bit store of avail->idx."""
        self._avail16[1] = self._avail_idx

    def kick_needed(self) -> bool:
        """Should the driver notify the device about chains published since
        the last call?  Honours EVENT_IDX (avail_event) or used->flags."""
        new, old = self._avail_idx, self._kicked_idx
        self._kicked_idx = new
        if new == old:
            return False
        full_fence()           # publish avail->idx before reading the device's hints
        if self.event_idx:
            avail_event = self._used16[2 + 4 * self.size]
            return need_event(avail_event, new, old)
        return not self._used16[0] & VRING_USED_F_NO_NOTIFY

    # -- interrupts -----------------------------------------------------------

    def disable_interrupts(self) -> None:
        if not self.event_idx:
            self._avail16[0] = VRING_AVAIL_F_NO_INTERRUPT

    def enable_interrupts(self) -> None:
        """Ask for a call at the next used entry; True-ish check with has_used()
        afterwards to close the race."""
        if self.event_idx:
            self._avail16[2 + self.size] = self._last_used
        else:
            self._avail16[0] = 0
        full_fence()

    # -- used -----------------------------------------------------------------

    def get_used(self, limit: int | None = None) -> list[Used]:
        """Take the chains the device returned (in used-ring order) and free
        their descriptors."""
        used_idx = self._used16[1]         # acquire: element reads follow this load
        out: list[Used] = []
        base = self._used_off + 4
        while self._last_used != used_idx and (limit is None or len(out) < limit):
            slot = self._last_used % self.size
            head, length = _USED_ELEM.unpack_from(self._mem, base + slot * VRING_USED_ELEM_SIZE)
            chain = self._chains.pop(head, None)
            if chain is None:
                raise RingError(f"device returned head {head}, which is not outstanding")
            descs, token = chain
            self._free.extend(descs)
            out.append(Used(head, length, token))
            self._last_used = (self._last_used + 1) & 0xFFFF
        if self.event_idx:
            self._avail16[2 + self.size] = self._last_used     # used_event
        return out

    def release(self) -> None:
        """Release every view this ring holds, ``mem`` included (so the
        underlying mmap can be closed).  The ring is unusable afterwards."""
        self._avail16.release()
        self._used16.release()
        self._mem.release()
