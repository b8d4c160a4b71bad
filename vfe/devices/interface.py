"""What the vhost adapter may call on a device: the contract between
adapter.py and the device models (net.py, blk.py).

``VhostDevice`` is a device model as the adapter sees it; ``EngineRings``
is the ring control of its engine device (cython_ext/ring_device.pxi
``RingDevice``, which the engine's NetDevice and BlkDevice extend).  The
adapter calls nothing else, and every model implements all of it: a call a
kind has nothing to do for is a no-op there, with a comment saying why.
tests/unit/devices/test_device_interface.py checks both models.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from vfe.vhost.actions import DeviceSpec


@runtime_checkable
class EngineRings(Protocol):
    """A device's rings in the engine, as the adapter drives them."""

    def set_features(self, features: int) -> None:
        """The acked virtio features (ring features, header length, LOG_ALL)."""

    def set_memory(self, regions: list[tuple[int, int, int, int]]) -> None:
        """The memory table: (gpa, size, uva, hva) per region ([] for none)."""

    def set_log(self, hva: int, size: int) -> None:
        """The dirty log (0, 0: none)."""

    def start_ring(self, index: int, size: int, desc_uva: int, avail_uva: int, used_uva: int,
                   base: int, kick_fd: int, call_fd: int, enabled: bool, log_used: bool = False,
                   log_guest_addr: int = 0) -> int | None:
        """Start a ring at avail index ``base``; how many requests the inflight
        region had it resubmit (None: the ring is not tracked)."""

    def stop_ring(self, index: int) -> int:
        """Stop a ring; the next avail index it would have processed."""

    def enable_ring(self, index: int, enabled: bool) -> None: ...

    def set_call_fd(self, index: int, fd: int) -> None: ...

    def ring_state(self, index: int) -> dict:
        """At least ``last_avail_idx`` and ``last_used_idx``."""


@runtime_checkable
class VhostDevice(Protocol):
    """A device model as the vhost adapter uses it."""

    rings: EngineRings
    #: The adapter Session that drives ``rings`` (None: none).  A device may
    #: have two front-ends during a live migration; only this one's memory
    #: table, features and dirty log are the engine's.
    driving_session: object | None
    status: int                   # as the front-end last set it (SET_STATUS)
    mtu: int                      # as the front-end last set it (NET_SET_MTU)

    def spec(self) -> DeviceSpec:
        """What the device offers through vhost-user."""

    def rearm_notices(self) -> None:
        """A new front-end connected: log its security events anew."""

    def forget_learned(self) -> None:
        """The guest went away or reset the device: forget what it taught
        the device (the MACs it sent from)."""

    def set_inflight(self, hva: int, stride: int, num_queues: int, queue_size: int,
                     length: int) -> None:
        """Track the rings in the inflight region at ``hva`` (0: none) from
        their next start (vfe/vhost/inflight.py: the region's shape)."""

    def send_rarp(self, mac: bytes) -> None:
        """Announce ``mac`` (SEND_RARP, after a migration) as the guest would."""
