"""The vhost-user state machine's state as data, for a live update.

A controller handing its connections to a newer build (vfe/controller/
update.py) exports every connection's protocol state as JSON plus the fds it
holds; the new process rebuilds the same state machine from it,
mid-conversation, without a message.  Fds travel as the list
``state["fds"]`` (the exporter's fd numbers); the importer gets the same
fds, in that order, under its own numbers.

A mixin of BackendProtocol (vfe/vhost/protocol.py): it reads and writes the
protocol's own fields, so the two modules change together.
"""
from __future__ import annotations

from typing import Mapping

from .actions import DeviceSpec, MemRegion, VringConfig
from .messages import Inflight, Log, VringAddr


class StateTransfer:
    """export_state / from_state, and the two ring operations a hand-over
    needs (pause at known indexes, restart from them)."""

    STATE_VERSION = 1

    def export_state(self) -> dict:
        """JSON-able state of this connection.  Only between messages: no
        ring half-stopped, nothing deferred, not failed."""
        if self._broken is not None:
            raise RuntimeError(f"connection failed: {self._broken}")
        if self._deferred or any(r.stopping or r.close_on_stop for r in self._rings.values()):
            raise RuntimeError("a ring change is in progress")
        return {
            "version": self.STATE_VERSION,
            "fds": sorted(self._owned),
            "features": self._features, "features_set": self._features_set,
            "protocol_features": self._protocol_features, "owner": self._owner,
            "backend_req_fd": self._backend_req_fd, "status": self._status,
            "log": None if self._log is None else [self._log.size, self._log.offset],
            "log_fd": self._log_fd,
            "inflight": None if self._inflight is None else [
                self._inflight.mmap_size, self._inflight.mmap_offset, self._inflight.num_queues,
                self._inflight.queue_size],
            "regions": [[r.region.gpa, r.region.size, r.region.uva, r.region.mmap_offset, r.refs]
                        for r in self._regions],
            "rings": [{
                "index": r.index, "num": r.num, "base": r.base,
                "addr": None if r.addr is None else [r.addr.index, r.addr.flags, r.addr.desc_uva,
                                                     r.addr.used_uva, r.addr.avail_uva,
                                                     r.addr.log_guest_addr],
                "kick_fd": r.kick_fd, "kick_set": r.kick_set, "call_fd": r.call_fd,
                "err_fd": r.err_fd, "enabled": r.enabled, "started": r.started,
                "told_enabled": r.told_enabled,
            } for _, r in sorted(self._rings.items())],
        }

    @classmethod
    def from_state(cls, spec: DeviceSpec, state: dict, fds: list[int]) -> "StateTransfer":
        """The protocol ``export_state`` described, owning ``fds`` (the
        exporter's ``state["fds"]`` as received here, same order)."""
        if state.get("version") != cls.STATE_VERSION:
            raise ValueError(f"protocol state version {state.get('version')!r} "
                             f"(this build reads {cls.STATE_VERSION})")
        if len(fds) != len(state["fds"]):
            raise ValueError(f"protocol state names {len(state['fds'])} fds, {len(fds)} came")
        ours = dict(zip(state["fds"], fds))

        def fd(old: int) -> int:
            return -1 if old < 0 else ours[old]

        from .protocol import _Region     # the table's record of a region (imports us)
        self = cls(spec)
        self._owned = set(fds)
        self._features = state["features"]
        self._features_set = state["features_set"]
        self._protocol_features = state["protocol_features"]
        self._owner = state["owner"]
        self._backend_req_fd = fd(state["backend_req_fd"])
        self._status = state["status"]
        self._log = None if state["log"] is None else Log(*state["log"])
        self._log_fd = fd(state["log_fd"])
        self._inflight = None if state.get("inflight") is None else Inflight(*state["inflight"])
        self._regions = [_Region(MemRegion(gpa, size, uva, off, -1), refs)
                         for gpa, size, uva, off, refs in state["regions"]]
        for rs in state["rings"]:
            ring = self._ring(rs["index"])
            ring.num, ring.base = rs["num"], rs["base"]
            ring.addr = None if rs["addr"] is None else VringAddr(*rs["addr"])
            ring.kick_fd, ring.kick_set = fd(rs["kick_fd"]), rs["kick_set"]
            ring.call_fd, ring.err_fd = fd(rs["call_fd"]), fd(rs["err_fd"])
            ring.enabled, ring.started = rs["enabled"], rs["started"]
            ring.told_enabled = rs["told_enabled"]
        return self

    def running_rings(self) -> list[VringConfig]:
        """How to start each ring that runs (after ``from_state``, or to
        restart rings paused for a hand-over that failed)."""
        return [self._vring_config(r) for r in self._started_rings()]

    def rings_paused(self, bases: Mapping[int, int]) -> None:
        """The caller stopped these running rings in the engine outside the
        protocol (a hand-over): record where each resumes.  They stay
        "started" -- the front-end was told nothing."""
        for index, base in bases.items():
            self._rings[index].base = base & 0xFFFF
