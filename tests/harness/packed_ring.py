"""A packed virtqueue's driver side, written field by field into a `Guest`
(tests/harness/engine_rig.py) as a driver -- or a buggy or hostile one --
would (virtio 1.2, 2.8): for the engine's packed-ring unit tests.

`PackedRing.post` makes a chain available the way drivers do (every later
descriptor's flags first, the head's last, each carrying the AVAIL/USED
bits of its own lap); `take_used` follows the device's used descriptors
the way a driver does (the used cursor moves by the slots of the answered
buffer's chain).  Nothing here checks what a test asks it to write.
"""
from __future__ import annotations

import struct

from tests.harness.engine_rig import Guest

F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
F_AVAIL, F_USED = 1 << 7, 1 << 15
EVENT_ENABLE, EVENT_DISABLE, EVENT_DESC = 0, 1, 2
FEAT_RING_PACKED = 1 << 34
FRESH_BASE = 0x8000_8000        # both cursors at slot 0, both wrap counters 1 (QEMU's encoding)
_DESC = struct.Struct("<QIHH")  # addr, len, id, flags


def avail_flags(wrap: int) -> int:
    """AVAIL/USED bits of a descriptor made available in a lap of wrap counter `wrap`."""
    return F_AVAIL if wrap else F_USED


class PackedRing:
    """A packed ring of ``size`` slots at guest addresses ``desc`` (16 *
    size bytes), ``driver`` and ``device`` (the 4-byte event suppression
    areas)."""

    def __init__(self, guest: Guest, size: int, desc: int, driver: int, device: int) -> None:
        self.guest, self.size = guest, size
        self.desc_gpa, self.driver_gpa, self.device_gpa = desc, driver, device
        self.next_avail, self.avail_wrap = 0, 1
        self.next_used, self.used_wrap = 0, 1
        self.slots_of: dict[int, int] = {}      # buffer id -> slots its chain took

    @property
    def addresses(self) -> tuple[int, int, int]:
        """The three areas as the front-end announces them (its virtual addresses)."""
        g = self.guest
        return g.hva(self.desc_gpa), g.hva(self.driver_gpa), g.hva(self.device_gpa)

    def write_desc(self, slot: int, addr: int, length: int, id_: int, flags: int) -> None:
        self.guest.write(self.desc_gpa + 16 * slot, _DESC.pack(addr, length, id_, flags))

    def read_desc(self, slot: int) -> tuple[int, int, int, int]:
        return _DESC.unpack(self.guest.read(self.desc_gpa + 16 * slot, 16))

    def set_flags(self, slot: int, flags: int) -> None:
        self.guest.store16(self.desc_gpa + 16 * slot + 14, flags)

    def post(self, descs: list[tuple[int, int, int]], id_: int, publish: bool = True) -> int:
        """Make the chain ``descs`` [(addr, len, flags)] available as buffer
        ``id_`` (F_NEXT added between them, the AVAIL/USED bits of each
        slot's lap added); the head's flags are written last, and only if
        ``publish``.  Returns the head's slot."""
        head, head_flags = self.next_avail, 0
        for k, (addr, length, flags) in enumerate(descs):
            if k < len(descs) - 1:
                flags |= F_NEXT
            flags |= avail_flags(self.avail_wrap)
            slot = self.next_avail
            self.write_desc(slot, addr, length, id_, flags if k else 0)
            if k:
                self.set_flags(slot, flags)
            else:
                head_flags = flags
            self.next_avail += 1
            if self.next_avail == self.size:
                self.next_avail, self.avail_wrap = 0, self.avail_wrap ^ 1
        self.slots_of[id_] = len(descs)
        if publish:
            self.set_flags(head, head_flags)
        return head

    def is_used(self, slot: int, wrap: int) -> bool:
        flags = self.read_desc(slot)[3]
        bit = 1 if wrap else 0
        return bool(flags & F_AVAIL) == bool(bit) and bool(flags & F_USED) == bool(bit)

    def take_used(self) -> list[tuple[int, int]]:
        """Every used descriptor the device wrote since the last call, as
        (id, len), moving the used cursor by each buffer's chain length."""
        out = []
        while self.is_used(self.next_used, self.used_wrap):
            _, length, id_, _ = self.read_desc(self.next_used)
            out.append((id_, length))
            self.next_used += self.slots_of.get(id_, 1)
            if self.next_used >= self.size:
                self.next_used -= self.size
                self.used_wrap ^= 1
        return out

    def set_driver_event(self, flags: int, off_wrap: int = 0) -> None:
        """When the driver wants interrupts: EVENT_ENABLE/DISABLE/DESC (at off_wrap)."""
        self.guest.write(self.driver_gpa, struct.pack("<HH", off_wrap, flags))

    def device_event(self) -> tuple[int, int]:
        """The device's event suppression area: (off_wrap, flags)."""
        return struct.unpack("<HH", self.guest.read(self.device_gpa, 4))


def packed_table(*descs: tuple[int, int, int]) -> bytes:
    """An indirect table of packed descriptors: (addr, len, flags) each (id 0)."""
    return b"".join(_DESC.pack(addr, length, 0, flags) for addr, length, flags in descs)


def packed_at_ends(guest: Guest, size: int, desc_region: int, driver_region: int,
                   device_region: int) -> PackedRing:
    """A packed ring whose descriptor ring and event areas each end exactly
    at the end of their region (an overrun of any of them faults)."""
    return PackedRing(guest, size, guest.end(desc_region) - 16 * size,
                      guest.end(driver_region) - 4, guest.end(device_region) - 4)


__all__ = ["PackedRing", "packed_at_ends", "packed_table", "avail_flags", "F_AVAIL", "F_USED",
           "EVENT_ENABLE", "EVENT_DISABLE", "EVENT_DESC", "FEAT_RING_PACKED", "FRESH_BASE"]
