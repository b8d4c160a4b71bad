"""How many bytes a ring's three areas take (virtio 1.2, 2.7 split and 2.8
packed), and how a packed ring's position travels in one 32-bit number.

Pure arithmetic, the one place it is done in Python: the protocol checks
that a ring's areas lie inside one memory region with these sizes
(vfe/vhost), and the test driver lays rings out with them
(vfe/testing/ring.py, vfe/testing/packed_ring.py).  The engine maps the
same areas from C (cython_ext/virtio.pxd repeats the arithmetic as inline
functions, which vfe._engine.ring_area_sizes exposes; tests/unit/virtio
checks that the two agree).
"""
from __future__ import annotations

from typing import NamedTuple

from .constants import (
    VRING_AVAIL_ELEM_SIZE,
    VRING_DESC_SIZE,
    VRING_EVENT_SIZE,
    VRING_HEADER_SIZE,
    VRING_PACKED_EVENT_SIZE,
    VRING_USED_ELEM_SIZE,
)


class RingAreaSizes(NamedTuple):
    """Bytes of a ring's three areas.  Split: descriptor table, avail ring,
    used ring.  Packed: descriptor ring, driver event suppression, device
    event suppression (vhost-user carries them in the same three address
    fields, desc/avail/used)."""

    desc: int
    avail: int
    used: int


def ring_area_sizes(size: int, event_idx: bool, packed: bool = False) -> RingAreaSizes:
    """The areas of a ring of ``size`` entries.  Split: the avail ring's
    used_event and the used ring's avail_event exist only with
    VIRTIO_F_EVENT_IDX (2.7.10): a driver that did not negotiate it may end
    the areas there.  Packed: the two event suppression structures are 4
    bytes whatever was negotiated (2.8.10)."""
    if packed:
        return RingAreaSizes(desc=VRING_DESC_SIZE * size, avail=VRING_PACKED_EVENT_SIZE,
                             used=VRING_PACKED_EVENT_SIZE)
    event = VRING_EVENT_SIZE if event_idx else 0
    return RingAreaSizes(
        desc=VRING_DESC_SIZE * size,
        avail=VRING_HEADER_SIZE + VRING_AVAIL_ELEM_SIZE * size + event,
        used=VRING_HEADER_SIZE + VRING_USED_ELEM_SIZE * size + event,
    )


# -- a packed ring's position in SET_VRING_BASE / GET_VRING_BASE --------------
#
# QEMU's encoding (hw/virtio/virtio.c virtio_queue_packed_get/set_last_avail_idx,
# docs/interop/vhost-user.rst): bits 0-14 last_avail_idx, bit 15 the avail
# wrap counter, bits 16-30 the used index, bit 31 the used wrap counter.


class PackedBase(NamedTuple):
    """A packed ring's position: where the device reads the next available
    descriptor and writes the next used one, each with its wrap counter."""

    avail_idx: int
    avail_wrap: bool
    used_idx: int
    used_wrap: bool

    @classmethod
    def decode(cls, num: int) -> "PackedBase":
        """The position a 32-bit base names.  A base whose upper half is 0
        names no used position (DPDK's virtio_user sends 0x8000 at start,
        DPDK's back-end ignores those bits and answers without them): the
        used position is then the avail one, as DPDK's back-end takes it --
        at a stop the device has answered every descriptor it read."""
        if num >> 16 == 0:
            num |= (num & 0xFFFF) << 16
        return cls(num & 0x7FFF, bool(num >> 15 & 1), num >> 16 & 0x7FFF, bool(num >> 31 & 1))

    def encode(self) -> int:
        return (self.avail_idx | self.avail_wrap << 15 | self.used_idx << 16
                | self.used_wrap << 31)

    def fits(self, size: int) -> bool:
        """Both indexes name a slot of a ring of ``size`` entries."""
        return self.avail_idx < size and self.used_idx < size


#: The position of a packed ring after a reset (2.8.1: both wrap counters
#: start at 1): what QEMU sends at a first start.
PACKED_BASE_RESET = PackedBase(0, True, 0, True).encode()
