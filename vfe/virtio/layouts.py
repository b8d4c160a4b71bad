"""How many bytes a split ring's three areas take (virtio 1.2, 2.7).

Pure arithmetic, the one place it is done in Python: the protocol checks
that a ring's areas lie inside one memory region with these sizes
(vfe/vhost), and the test driver lays rings out with them
(vfe/testing/ring.py).  The engine maps the same areas from C
(cython_ext/virtio.pxd repeats the arithmetic as inline functions, which
vfe._engine.ring_area_sizes exposes; tests/unit/virtio checks that the two
agree).
"""
from __future__ import annotations

from typing import NamedTuple

from .constants import (
    VRING_AVAIL_ELEM_SIZE,
    VRING_DESC_SIZE,
    VRING_EVENT_SIZE,
    VRING_HEADER_SIZE,
    VRING_USED_ELEM_SIZE,
)


class RingAreaSizes(NamedTuple):
    """Bytes of a split ring's descriptor table, avail ring and used ring."""

    desc: int
    avail: int
    used: int


def ring_area_sizes(size: int, event_idx: bool) -> RingAreaSizes:
    """The areas of a ring of ``size`` entries.  The avail ring's used_event
    and the used ring's avail_event exist only with VIRTIO_F_EVENT_IDX
    (2.7.10): a driver that did not negotiate it may end the areas there."""
    event = VRING_EVENT_SIZE if event_idx else 0
    return RingAreaSizes(
        desc=VRING_DESC_SIZE * size,
        avail=VRING_HEADER_SIZE + VRING_AVAIL_ELEM_SIZE * size + event,
        used=VRING_HEADER_SIZE + VRING_USED_ELEM_SIZE * size + event,
    )
