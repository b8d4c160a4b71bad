"""A pure-Python packed virtqueue, *driver* side (what a guest's virtio
driver does), over a writable memoryview of guest memory: the packed
counterpart of ring.py's ``DriverRing``, with the same methods, so the test
front-end drives either layout.  Virtio 1.2 section 2.8.

One descriptor ring of 16-byte {addr, len, id, flags} both sides write:
the driver makes a chain available in consecutive slots, each carrying the
AVAIL/USED bits of its lap (AVAIL = the driver's wrap counter, USED the
opposite), the chain's first slot's flags written last (one aligned 16-bit
store: the device may read it at any time); the device answers the chain
with one used descriptor over its first slot (AVAIL = USED = the device's
wrap counter) and skips its other slots.  Two 4-byte event suppression
areas ({off_wrap, flags}) say when to interrupt the driver (driver area)
and when to kick the device (device area).  ring.py's notes on shared
memory (aligned stores, the full fence) hold here too.
"""
from __future__ import annotations

import struct
from typing import Any, Iterable

from vfe.virtio.constants import (
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_DESC_SIZE,
    VRING_PACKED_DESC_F_AVAIL,
    VRING_PACKED_DESC_F_USED,
    VRING_PACKED_EVENT_F_WRAP_CTR,
)
from vfe.virtio.layouts import PackedBase, ring_area_sizes

from .ring import RingError, RingLayout, Used, full_fence, need_event

_DESC_NO_FLAGS = struct.Struct("<QIH")     # addr, len, id: a descriptor but its flags
_DESC = struct.Struct("<QIHH")


def packed_ring_layout(size: int) -> RingLayout:
    """Descriptor ring, then the driver and the device event suppression
    areas (``RingLayout``'s avail and used fields hold them)."""
    if size <= 0 or size > 0x8000:
        raise ValueError(f"ring size {size}")
    areas = ring_area_sizes(size, event_idx=True, packed=True)
    return RingLayout(size, 0, areas.desc, areas.desc + areas.avail,
                      areas.desc + areas.avail + areas.used, packed=True)


def avail_bits(wrap: bool) -> int:
    """AVAIL/USED flags of a descriptor made available in a lap of wrap counter ``wrap``."""
    return VRING_PACKED_DESC_F_AVAIL if wrap else VRING_PACKED_DESC_F_USED


class PackedDriverRing:
    """The driver side of one packed ring.

    ``mem`` is a writable memoryview; the descriptor ring and the driver
    and device event areas sit at ``desc_off``/``driver_off``/``device_off``
    in it.  ``gpa_base`` is the guest-physical address of ``mem[0]``, for
    indirect tables (carved from ``indirect_off``: one table of
    ``max_indirect`` descriptors per buffer id).
    """

    def __init__(self, mem: memoryview, size: int, desc_off: int, driver_off: int,
                 device_off: int, *, event_idx: bool = False, gpa_base: int = 0,
                 indirect_off: int | None = None, max_indirect: int = 16,
                 init: bool = True) -> None:
        if desc_off % 16 or driver_off % 4 or device_off % 4:
            raise ValueError("misaligned ring areas")
        self.size = size
        self.event_idx = event_idx
        self.gpa_base = gpa_base
        self._mem = mem
        self._desc_off = desc_off
        self._desc16 = mem[desc_off:desc_off + VRING_DESC_SIZE * size].cast("H")
        self._driver16 = mem[driver_off:driver_off + 4].cast("H")   # off_wrap, flags
        self._device16 = mem[device_off:device_off + 4].cast("H")
        self._indirect_off = indirect_off
        self._max_indirect = max_indirect
        if init:
            mem[desc_off:desc_off + VRING_DESC_SIZE * size] = bytes(VRING_DESC_SIZE * size)
            mem[driver_off:driver_off + 4] = bytes(4)
            mem[device_off:device_off + 4] = bytes(4)
        self._next_avail, self._avail_wrap = 0, True
        self._next_used, self._used_wrap = 0, True
        self._kicked = (0, True)                    # avail position at the last kick check
        self._free_ids = list(range(size - 1, -1, -1))
        self._free_slots = size
        self._chains: dict[int, tuple[int, Any]] = {}   # id -> (slots, token)
        self._unpublished: list[tuple[int, int]] = []   # (head slot, its flags)

    # -- state ----------------------------------------------------------------

    @property
    def position(self) -> PackedBase:
        """Where the driver is: its next avail slot and the next used one,
        with their wrap counters (a fresh device starts at both)."""
        return PackedBase(self._next_avail, self._avail_wrap, self._next_used, self._used_wrap)

    @property
    def num_free(self) -> int:
        return self._free_slots

    @property
    def outstanding(self) -> int:
        """Chains given to the device and not returned yet."""
        return len(self._chains)

    def _flags(self, slot: int) -> int:
        return self._desc16[slot * 8 + 7]

    def has_used(self) -> bool:
        flags = self._flags(self._next_used)
        bit = VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED
        return flags & bit == (bit if self._used_wrap else 0)

    # -- adding buffers -------------------------------------------------------

    def _advance_avail(self) -> None:
        self._next_avail += 1
        if self._next_avail == self.size:
            self._next_avail, self._avail_wrap = 0, not self._avail_wrap

    def add_chain(self, bufs: Iterable[tuple[int, int, bool]], indirect: bool = False,
                  token: Any = None, publish: bool = True) -> int:
        """Add one chain of ``(gpa, len, device_writes)`` buffers; return its
        buffer id.  ``publish=False`` writes everything but the head's flags,
        which a later ``publish()`` stores (batching)."""
        bufs = list(bufs)
        if not bufs:
            raise ValueError("empty chain")
        slots = 1 if indirect else len(bufs)
        if slots > self._free_slots or not self._free_ids:
            raise RingError(f"ring full ({self._free_slots} free, chain of {slots})")
        buf_id = self._free_ids.pop()
        head = self._next_avail
        if indirect:
            if self._indirect_off is None:
                raise RingError("no indirect table area")
            if len(bufs) > self._max_indirect:
                raise RingError(f"{len(bufs)} buffers > {self._max_indirect} per indirect table")
            table = self._indirect_off + buf_id * self._max_indirect * VRING_DESC_SIZE
            for i, (addr, length, write) in enumerate(bufs):
                # a packed indirect table is consecutive: no NEXT (2.8.19)
                _DESC.pack_into(self._mem, table + i * VRING_DESC_SIZE, addr, length, 0,
                                VRING_DESC_F_WRITE if write else 0)
            head_flags = VRING_DESC_F_INDIRECT | avail_bits(self._avail_wrap)
            _DESC_NO_FLAGS.pack_into(self._mem, self._desc_off + head * VRING_DESC_SIZE,
                                     self.gpa_base + table, len(bufs) * VRING_DESC_SIZE, buf_id)
            self._advance_avail()
        else:
            head_flags = 0
            for i, (addr, length, write) in enumerate(bufs):
                slot = self._next_avail
                flags = ((VRING_DESC_F_WRITE if write else 0)
                         | (VRING_DESC_F_NEXT if i + 1 < len(bufs) else 0)
                         | avail_bits(self._avail_wrap))
                _DESC_NO_FLAGS.pack_into(self._mem, self._desc_off + slot * VRING_DESC_SIZE,
                                         addr, length, buf_id)
                if i == 0:
                    head_flags = flags
                else:
                    self._desc16[slot * 8 + 7] = flags      # before the head's: device reads it later
                self._advance_avail()
        self._free_slots -= slots
        self._chains[buf_id] = (slots, token)
        self._unpublished.append((head, head_flags))
        if publish:
            self.publish()
        return buf_id

    def publish(self) -> None:
        """Make every added chain available: one aligned 16-bit store of
        each head's flags, in ring order."""
        for slot, flags in self._unpublished:
            self._desc16[slot * 8 + 7] = flags
        self._unpublished = []

    def kick_needed(self) -> bool:
        """Should the driver notify the device about chains published since
        the last call?  Honours the device's event suppression area."""
        old_slot, old_wrap = self._kicked
        new = self._next_avail
        self._kicked = (new, self._avail_wrap)
        if (old_slot, old_wrap) == self._kicked:
            return False
        full_fence()           # publish the heads before reading the device's hints
        flags = self._device16[1]
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags != RING_EVENT_FLAGS_DESC or not self.event_idx:
            return True
        off_wrap = self._device16[0]
        # both positions onto one line: the old one a lap back if it was in
        # the previous lap, the event offset likewise
        old = old_slot - (self.size if old_wrap != self._avail_wrap else 0)
        off = (off_wrap & 0x7FFF) - (self.size if bool(off_wrap >> 15) != self._avail_wrap else 0)
        return need_event(off & 0xFFFF, new, old & 0xFFFF)

    # -- interrupts -----------------------------------------------------------

    def disable_interrupts(self) -> None:
        self._driver16[1] = RING_EVENT_FLAGS_DISABLE

    def enable_interrupts(self) -> None:
        """Ask for a call at the next used descriptor; check ``has_used()``
        afterwards to close the race."""
        if self.event_idx:
            self._driver16[0] = self._next_used | self._used_wrap << VRING_PACKED_EVENT_F_WRAP_CTR
            self._driver16[1] = RING_EVENT_FLAGS_DESC
        else:
            self._driver16[1] = RING_EVENT_FLAGS_ENABLE
        full_fence()

    # -- used -----------------------------------------------------------------

    def get_used(self, limit: int | None = None) -> list[Used]:
        """Take the chains the device returned (in ring order) and free
        their slots and ids.  ``Used.head`` is the buffer id."""
        out: list[Used] = []
        while self.has_used() and (limit is None or len(out) < limit):
            _addr, length, buf_id, _flags = _DESC.unpack_from(
                self._mem, self._desc_off + self._next_used * VRING_DESC_SIZE)
            chain = self._chains.pop(buf_id, None)
            if chain is None:
                raise RingError(f"device returned id {buf_id}, which is not outstanding")
            slots, token = chain
            self._free_ids.append(buf_id)
            self._free_slots += slots
            self._next_used += slots
            if self._next_used >= self.size:
                self._next_used -= self.size
                self._used_wrap = not self._used_wrap
            out.append(Used(buf_id, length, token))
        if self.event_idx and self._driver16[1] == RING_EVENT_FLAGS_DESC:
            self._driver16[0] = self._next_used | self._used_wrap << VRING_PACKED_EVENT_F_WRAP_CTR
        return out

    def release(self) -> None:
        """Release every view this ring holds, ``mem`` included."""
        self._desc16.release()
        self._driver16.release()
        self._device16.release()
        self._mem.release()
