"""When a ring starts, and how a change reaches a running ring.

The one place a ring starts: ``update_rings`` runs after every message that
touches rings (and after every reported stop) and starts each ring that
became ready -- SET_VRING_NUM, SET_VRING_ADDR and SET_VRING_KICK (an fd, or
the no-fd bit) received, a memory table that maps the ring's three areas
(vfe/virtio/layouts.py) -- and tells enable changes of running ones.  A
ring is enabled if VHOST_USER_F_PROTOCOL_FEATURES was not acked, otherwise
as SET_VRING_ENABLE said.

Changing a running ring (size, addresses, kick fd), the memory table or the
inflight region is stop -> change -> start: ``quiesce`` emits the stops and
holds the change in ``ConnectionState.deferred`` until the caller reported
every stop (``BackendProtocol.ring_stopped``); nothing starts meanwhile.

Pure functions of a ``ConnectionState`` (vfe/vhost/protocol_state.py).
"""
from __future__ import annotations

import logging

from vfe.virtio.constants import F
from vfe.virtio.layouts import PackedBase, ring_area_sizes

from .actions import CloseFds, EnableRing, StartRing, StopRing, VringConfig
from .protocol_state import ConnectionState, RingRecord

log = logging.getLogger("vfe.vhost.protocol")


def effective_enabled(s: ConnectionState, ring: RingRecord) -> bool:
    if s.features >> F.VHOST_USER_PROTOCOL_FEATURES & 1:
        return ring.enabled
    return True


def _region_for_uva(s: ConnectionState, uva: int, length: int) -> bool:
    for r in s.regions:
        reg = r.region
        if reg.uva <= uva and uva + length <= reg.uva + reg.size:
            return True
    return False


def areas_mapped(s: ConnectionState, ring: RingRecord) -> bool:
    """Each of the ring's three areas lies inside one memory region."""
    assert ring.addr is not None
    areas = ring_area_sizes(ring.num, event_idx=bool(s.features >> F.RING_EVENT_IDX & 1),
                            packed=s.packed)
    return (_region_for_uva(s, ring.addr.desc_uva, areas.desc)
            and _region_for_uva(s, ring.addr.avail_uva, areas.avail)
            and _region_for_uva(s, ring.addr.used_uva, areas.used))


def _packed_fits(ring: RingRecord) -> bool:
    """A packed ring's event suppression areas are 4-aligned (2.8.10;
    SET_VRING_ADDR's syntax check allows a split avail ring at 2), and its
    base names slots of the ring (a SET_VRING_NUM may have shrunk it)."""
    assert ring.addr is not None
    if ring.addr.avail_uva % 4:
        log.warning("ring %d: packed driver event area %#x is not 4-aligned; not starting it",
                    ring.index, ring.addr.avail_uva)
        return False
    position = PackedBase.decode(ring.base)
    if not position.fits(ring.num):
        log.warning("ring %d: packed base %#x is outside a ring of %d; not starting it",
                    ring.index, ring.base, ring.num)
        return False
    return True


def _ready(s: ConnectionState, ring: RingRecord) -> bool:
    if not (ring.num and ring.addr is not None and ring.kick_set and s.regions):
        return False
    if not areas_mapped(s, ring):
        log.warning("ring %d: descriptor/avail/used areas are not inside one memory region; "
                    "not starting it", ring.index)
        return False
    if s.packed and not _packed_fits(ring):
        return False
    return True



def vring_config(s: ConnectionState, ring: RingRecord) -> VringConfig:
    """What the engine needs to run ``ring``."""
    addr = ring.addr
    assert addr is not None
    return VringConfig(
        index=ring.index, size=ring.num,
        desc_uva=addr.desc_uva, avail_uva=addr.avail_uva, used_uva=addr.used_uva,
        log_guest_addr=addr.log_guest_addr, log_used=addr.log,
        base=PackedBase.decode(ring.base).encode() if s.packed else ring.base & 0xFFFF,
        kick_fd=ring.kick_fd, call_fd=ring.call_fd,
        enabled=effective_enabled(s, ring),
    )


def update_rings(s: ConnectionState) -> list:
    """Readiness pass: start rings that became ready, tell enable changes.
    Nothing starts while a deferred change waits for rings to stop."""
    if s.deferred:
        return []
    actions: list = []
    for index in sorted(s.rings):
        ring = s.rings[index]
        if ring.stopping:
            continue
        if ring.started:
            enabled = effective_enabled(s, ring)
            if enabled != ring.told_enabled:
                ring.told_enabled = enabled
                actions.append(EnableRing(index, enabled))
        elif _ready(s, ring):
            config = vring_config(s, ring)
            ring.started = True
            ring.told_enabled = config.enabled
            actions.append(StartRing(config))
    return actions


def quiesce(s: ConnectionState, rings: list[RingRecord], then: list) -> list:
    """Stop the started ``rings``; ``then`` runs once no ring is stopping
    (from ``ring_stopped``), followed by the readiness pass (restarts)."""
    stops = []
    for ring in rings:
        if ring.started and not ring.stopping:
            ring.stopping = True
            stops.append(StopRing(ring.index))
    if any(r.stopping for r in s.rings.values()):
        s.deferred += then
        return stops
    return stops + then


def forget_kick(ring: RingRecord) -> list:
    """The ring needs a new SET_VRING_KICK to start again; close the old fd."""
    fd, ring.kick_fd, ring.kick_set = ring.kick_fd, -1, False
    return [CloseFds((fd,))] if fd >= 0 else []
