"""One vhost-user connection's state, as data.

``BackendProtocol`` (protocol.py) owns one ``ConnectionState``; its
handlers (handlers.py) and the ring readiness rules (readiness.py) change
it, nothing else does.  What the protocol shows of it goes out as
read-only values (``RingState`` snapshots, BackendProtocol's properties).

A live update: a controller handing its connections to a newer build
(vfe/controller/update.py) exports each connection's state with
``to_json()`` -- JSON plus the fds it holds -- and the new process rebuilds
the same state with ``from_json()``, mid-conversation, without a message.
Fds travel as the list ``state["fds"]`` (the exporter's fd numbers); the
importer gets the same fds, in that order, under its own numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from vfe.virtio.constants import F

from .actions import MemRegion
from .messages import Inflight, Log, VringAddr

#: Version of the ``to_json`` format; an importer refuses any other.
STATE_VERSION = 1


@dataclass(frozen=True)
class RingState:
    """Read-only snapshot of one ring as the protocol sees it."""

    index: int
    num: int                      # 0: no SET_VRING_NUM yet
    addr: VringAddr | None
    base: int                     # next start's last_avail_idx (packed: with the wrap
                                  # counters and used index, vfe/virtio/layouts.py PackedBase)
    kick_fd: int                  # -1: none or polling
    kick_set: bool                # SET_VRING_KICK received (fd or no-fd) since last stop
    call_fd: int
    err_fd: int
    enabled: bool                 # as SET_VRING_ENABLE said
    started: bool                 # StartRing emitted and no ring_stopped since
    stopping: bool                # StopRing emitted, ring_stopped not yet called


@dataclass(slots=True)
class RingRecord:
    """One ring's state (``RingState`` is its snapshot), plus what a stop in
    progress must do once the caller reports it (``ring_stopped``)."""

    index: int
    num: int = 0
    addr: VringAddr | None = None
    base: int = 0
    kick_fd: int = -1
    kick_set: bool = False
    call_fd: int = -1
    err_fd: int = -1
    enabled: bool = False
    started: bool = False
    stopping: bool = False
    reply_on_stop: bool = False   # GET_VRING_BASE waits for the stop
    told_enabled: bool = False    # the enable state the caller was last told
    close_on_stop: list[int] = field(default_factory=list)   # fds the engine may use until the stop

    def snapshot(self) -> RingState:
        return RingState(self.index, self.num, self.addr, self.base, self.kick_fd, self.kick_set,
                         self.call_fd, self.err_fd, self.enabled, self.started, self.stopping)


@dataclass
class RegionRecord:
    """One region of the memory table."""

    region: MemRegion            # fd is -1: the fd was closed once mapped
    refs: int = 1                # identical ADD_MEM_REGs (one per vhost_dev in old QEMUs)

    def key(self) -> tuple[int, int, int, int]:
        r = self.region
        return (r.gpa, r.size, r.uva, r.mmap_offset)


class ConnectionState:
    """Everything one connection negotiated and holds.

    Two parts: the connection's (the fds held, a failure, protocol features,
    SET_OWNER, the back-end channel) lasts until the front-end goes; the
    device's (``reset_device``: features, rings, memory, log, inflight,
    status, a change waiting for rings to stop) is what RESET_OWNER and
    RESET_DEVICE forget."""

    def __init__(self) -> None:
        self.owned_fds: set[int] = set()      # received, not yet listed in a returned CloseFds
        self.broken: str | None = None        # why the connection failed (a ProtocolError escaped)
        self.protocol_features = 0
        self.session_owned = False            # SET_OWNER: the front-end claimed the session
        self.queue_num_last = False           # the last message: GET_QUEUE_NUM, before SET_OWNER
        self.backend_req_fd = -1
        self.reset_device()

    def reset_device(self) -> None:
        self.features = 0
        self.features_set = False
        self.rings: dict[int, RingRecord] = {}
        self.regions: list[RegionRecord] = []
        self.log: Log | None = None
        self.log_fd = -1
        self.inflight: Inflight | None = None
        self.inflight_packed = False          # the region has the packed layout
        self.status = 0
        self.deferred: list = []              # actions waiting for every stopping ring

    def ring(self, index: int) -> RingRecord:
        """Ring ``index``, created (empty) on first mention."""
        ring = self.rings.get(index)
        if ring is None:
            ring = self.rings[index] = RingRecord(index)
        return ring

    @property
    def packed(self) -> bool:
        """VIRTIO_F_RING_PACKED acked: every ring of the device is packed."""
        return bool(self.features >> F.RING_PACKED & 1)

    def started_rings(self) -> list[RingRecord]:
        return [r for _, r in sorted(self.rings.items()) if r.started]

    def has_protocol_feature(self, bit: int) -> bool:
        return bool(self.protocol_features >> int(bit) & 1)

    # -- a live update's hand-over

    def to_json(self) -> dict:
        """JSON-able state of this connection.  Only between messages: no
        ring half-stopped, nothing deferred, not failed."""
        if self.broken is not None:
            raise RuntimeError(f"connection failed: {self.broken}")
        if self.deferred or any(r.stopping or r.close_on_stop for r in self.rings.values()):
            raise RuntimeError("a ring change is in progress")
        return {
            "version": STATE_VERSION,
            "fds": sorted(self.owned_fds),
            "features": self.features, "features_set": self.features_set,
            "protocol_features": self.protocol_features, "owner": self.session_owned,
            "backend_req_fd": self.backend_req_fd, "status": self.status,
            "log": None if self.log is None else [self.log.size, self.log.offset],
            "log_fd": self.log_fd,
            "inflight": None if self.inflight is None else [
                self.inflight.mmap_size, self.inflight.mmap_offset, self.inflight.num_queues,
                self.inflight.queue_size],
            "inflight_packed": self.inflight_packed,
            "regions": [[r.region.gpa, r.region.size, r.region.uva, r.region.mmap_offset, r.refs]
                        for r in self.regions],
            "rings": [{
                "index": r.index, "num": r.num, "base": r.base,
                "addr": None if r.addr is None else [r.addr.index, r.addr.flags, r.addr.desc_uva,
                                                     r.addr.used_uva, r.addr.avail_uva,
                                                     r.addr.log_guest_addr],
                "kick_fd": r.kick_fd, "kick_set": r.kick_set, "call_fd": r.call_fd,
                "err_fd": r.err_fd, "enabled": r.enabled, "started": r.started,
                "told_enabled": r.told_enabled,
            } for _, r in sorted(self.rings.items())],
        }

    @classmethod
    def from_json(cls, state: dict, fds: list[int]) -> ConnectionState:
        """The state ``to_json`` described, owning ``fds`` (the exporter's
        ``state["fds"]`` as received here, same order)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"protocol state version {state.get('version')!r} "
                             f"(this build reads {STATE_VERSION})")
        if len(fds) != len(state["fds"]):
            raise ValueError(f"protocol state names {len(state['fds'])} fds, {len(fds)} came")
        ours = dict(zip(state["fds"], fds))

        def fd(old: int) -> int:
            return -1 if old < 0 else ours[old]

        self = cls()
        self.owned_fds = set(fds)
        self.features = state["features"]
        self.features_set = state["features_set"]
        self.protocol_features = state["protocol_features"]
        self.session_owned = state["owner"]
        self.backend_req_fd = fd(state["backend_req_fd"])
        self.status = state["status"]
        self.log = None if state["log"] is None else Log(*state["log"])
        self.log_fd = fd(state["log_fd"])
        self.inflight = None if state.get("inflight") is None else Inflight(*state["inflight"])
        self.inflight_packed = state.get("inflight_packed", False)   # older builds: split only
        self.regions = [RegionRecord(MemRegion(gpa, size, uva, off, -1), refs)
                        for gpa, size, uva, off, refs in state["regions"]]
        for rs in state["rings"]:
            ring = self.ring(rs["index"])
            ring.num, ring.base = rs["num"], rs["base"]
            ring.addr = None if rs["addr"] is None else VringAddr(*rs["addr"])
            ring.kick_fd, ring.kick_set = fd(rs["kick_fd"]), rs["kick_set"]
            ring.call_fd, ring.err_fd = fd(rs["call_fd"]), fd(rs["err_fd"])
            ring.enabled, ring.started = rs["enabled"], rs["started"]
            ring.told_enabled = rs["told_enabled"]
        return self
