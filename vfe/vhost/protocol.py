"""The vhost-user back-end state machine, sans I/O.

``BackendProtocol.receive(msg)`` validates one message and returns the
actions (vfe/vhost/actions.py) its caller must execute, in order.  It never
touches sockets, memory, the engine, or fds: fds it received are *owned* by
it until it lists them in a ``CloseFds`` action.

Rules of this module (all of them live here):

Checks run in this order for every message: header (version 1, not a reply)
-> request id known and in ``TABLE`` -> fd count within the row's range ->
payload size -> decode -> syntax (``is_valid``) -> required protocol feature
-> queue index (< ``spec.max_queues``) -> handler -> ring readiness changes
-> REPLY_ACK.

Failures: a handler or a check raises ``ProtocolError``.  When REPLY_ACK is
in effect for the message (negotiated, NEED_REPLY set, and the request has no
mandatory reply of its own) the failure becomes ``[CloseFds(msg fds),
Ack(ok=False)]`` and nothing else changed.  Otherwise ``ProtocolError``
escapes; the caller drops the connection and calls ``disconnect()``, and the
protocol refuses further messages until then.  Handlers validate everything
before they change state, so a failed message leaves no trace.

Ring readiness (the one place a ring starts): a ring is started
(``StartRing``) when it has SET_VRING_NUM, SET_VRING_ADDR and SET_VRING_KICK
(an fd, or the no-fd bit), a memory table exists and maps the ring's three
areas.  It is enabled if VHOST_USER_F_PROTOCOL_FEATURES was not acked,
otherwise as SET_VRING_ENABLE said (``EnableRing`` on changes while started).
The kick fd is not required to be readable: rings start at once.

Stopping: GET_VRING_BASE on a started ring emits ``StopRing``; the caller
stops it, then calls ``ring_stopped(index, last_avail_idx)`` and executes what
that returns (the reply, and ``CloseFds`` of the kick fd) *before* the rest of
the batch.  The ring keeps its size and addresses; a later SET_VRING_KICK
restarts it from the stopped index (or from a newer SET_VRING_BASE).

Changing a started ring (new size, addresses (e.g. the LOG flag toggled at
migration), or kick fd) and changing the memory table while rings run are
done as stop -> change -> start: the protocol emits ``StopRing`` and the
change and the restart come out of ``ring_stopped``.  SET_VRING_CALL on a
started ring is just ``SetCallFd``; SET_FEATURES is ``SetFeatures``.

SET_STATUS only records the status (QEMU 7.2 sends SET_STATUS 0 right before
the GET_VRING_BASEs of a stop; it resets nothing here).

Inflight tracking (INFLIGHT_SHMFD, offered by blk devices): GET_INFLIGHT_FD
is checked here and answered by the caller (``GetInflight``: it allocates
the region and replies with its fd); SET_INFLIGHT_FD is ``SetInflight``,
applied like a memory table change (running rings stop, then restart and
read the region: that start is where a new process resubmits what a dead
one left inflight).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

from .actions import (
    Ack,
    AddMemRegion,
    CloseFds,
    DeviceSpec,
    EnableRing,
    GetInflight,
    MemRegion,
    RemoveMemRegion,
    Reply,
    ResetDevice,
    SendRarp,
    SetCallFd,
    SetFeatures,
    SetInflight,
    SetLogBase,
    SetMemTable,
    SetMtu,
    SetStatus,
    StartRing,
    StopRing,
    VringConfig,
)
from .protocol_state import StateTransfer
from .messages import (
    F_LOG_ALL,
    F_PROTOCOL_FEATURES,
    REPLY,
    VERSION,
    VERSION_MASK,
    Config,
    Empty,
    Inflight,
    Log,
    MemTable,
    Message,
    ProtocolError,
    ProtocolFeature,
    Request,
    SingleMemRegion,
    U64,
    VringAddr,
    VringFile,
    VringState,
)
from .inflight import region_size as inflight_region_size

log = logging.getLogger("vfe.vhost.protocol")

Action = Any   # one of the dataclasses in actions.py

_F_RING_EVENT_IDX = 29
_MAX_QUEUE_SIZE = 32768
_MTU_MIN, _MTU_MAX = 68, 65535


class _Refused(Exception):
    """A well-formed request we decline (SET_CONFIG, an invalid MTU): Ack(ok=False)
    when REPLY_ACK is in effect, otherwise logged and ignored.  Never fatal."""


# ---------------------------------------------------------------------------
# State visible to tests


@dataclass(frozen=True)
class RingState:
    """Read-only snapshot of one ring as the protocol sees it."""

    index: int
    num: int                      # 0: no SET_VRING_NUM yet
    addr: VringAddr | None
    base: int                     # next start's last_avail_idx
    kick_fd: int                  # -1: none or polling
    kick_set: bool                # SET_VRING_KICK received (fd or no-fd) since last stop
    call_fd: int
    err_fd: int
    enabled: bool                 # as SET_VRING_ENABLE said
    started: bool                 # StartRing emitted and no ring_stopped since
    stopping: bool                # StopRing emitted, ring_stopped not yet called


class _Ring:
    __slots__ = ("index", "num", "addr", "base", "kick_fd", "kick_set", "call_fd", "err_fd",
                 "enabled", "started", "stopping", "reply_on_stop", "told_enabled",
                 "close_on_stop")

    def __init__(self, index: int) -> None:
        self.index = index
        self.num = 0
        self.addr: VringAddr | None = None
        self.base = 0
        self.kick_fd = -1
        self.kick_set = False
        self.call_fd = -1
        self.err_fd = -1
        self.enabled = False
        self.started = False
        self.stopping = False
        self.reply_on_stop = False
        self.told_enabled = False
        self.close_on_stop: list[int] = []   # fds the engine may use until the stop

    def snapshot(self) -> RingState:
        return RingState(self.index, self.num, self.addr, self.base, self.kick_fd, self.kick_set,
                         self.call_fd, self.err_fd, self.enabled, self.started, self.stopping)


@dataclass
class _Region:
    region: MemRegion            # fd is -1: the fd was closed once mapped
    refs: int = 1                # identical ADD_MEM_REGs (one per vhost_dev in old QEMUs)

    def key(self) -> tuple[int, int, int, int]:
        r = self.region
        return (r.gpa, r.size, r.uva, r.mmap_offset)


# ---------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class Row:
    """How one request is checked and handled."""

    handler: Callable[["BackendProtocol", Message, Any], list]
    payload: type                       # messages.py payload class (decode/is_valid)
    fds: tuple[int, int] = (0, 0)       # (min, max) fds accepted
    protocol_feature: ProtocolFeature | None = None   # must be negotiated
    offered_feature: int | None = None  # virtio feature bit the device must offer
    queue_field: str | None = None      # payload attribute holding a ring index
    reply: bool = False                 # reply is mandatory: never an extra REPLY_ACK
    touches_rings: bool = False         # re-run readiness afterwards
    validate: bool = True               # run payload.is_valid() (False: handler decides)

    @property
    def size(self) -> tuple[int, int]:
        p = self.payload
        if hasattr(p, "MIN_SIZE"):
            return (p.MIN_SIZE, p.MAX_SIZE)
        return (p.SIZE, p.SIZE)


def _overlaps(ranges: list[tuple[int, int]]) -> bool:
    ranges = sorted(ranges)
    return any(a_start + a_len > b_start
               for (a_start, a_len), (b_start, _b_len) in zip(ranges, ranges[1:]))


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# ---------------------------------------------------------------------------


class BackendProtocol(StateTransfer):
    """One vhost-user connection's back-end state machine (see module docstring)."""

    TABLE: dict[Request, Row] = {}      # filled in below the class

    def __init__(self, spec: DeviceSpec) -> None:
        self.spec = spec
        self._owned: set[int] = set()
        self._broken: str | None = None
        self._protocol_features = 0
        self._owner = False
        self._backend_req_fd = -1
        self._reset_device_state()

    def _reset_device_state(self) -> None:
        self._features = 0
        self._features_set = False
        self._rings: dict[int, _Ring] = {}
        self._regions: list[_Region] = []
        self._log: Log | None = None
        self._log_fd = -1
        self._inflight: Inflight | None = None
        self._status = 0
        self._deferred: list[Action] = []

    # -- read-only state ------------------------------------------------------

    @property
    def features(self) -> int:
        """Virtio features acked by SET_FEATURES (0 before)."""
        return self._features

    @property
    def protocol_features(self) -> int:
        """Protocol features set by SET_PROTOCOL_FEATURES (0 before)."""
        return self._protocol_features

    @property
    def owner(self) -> bool:
        return self._owner

    @property
    def status(self) -> int:
        return self._status

    @property
    def regions(self) -> tuple[MemRegion, ...]:
        """The current memory table (fds are -1: closed once mapped)."""
        return tuple(r.region for r in sorted(self._regions, key=lambda r: r.region.gpa))

    @property
    def log_base(self) -> Log | None:
        return self._log

    @property
    def inflight(self) -> Inflight | None:
        """The inflight region of the last SET_INFLIGHT_FD (None before)."""
        return self._inflight

    @property
    def backend_req_fd(self) -> int:
        return self._backend_req_fd

    @property
    def rings(self) -> Mapping[int, RingState]:
        return {i: r.snapshot() for i, r in sorted(self._rings.items())}

    @property
    def broken(self) -> str | None:
        """Why the connection failed, once a ProtocolError escaped."""
        return self._broken

    def held_fds(self) -> frozenset[int]:
        """Every fd received and not yet listed in a returned CloseFds."""
        return frozenset(self._owned)

    def has_protocol_feature(self, bit: int) -> bool:
        return bool(self._protocol_features >> int(bit) & 1)

    # -- entry points ---------------------------------------------------------

    def receive(self, msg: Message) -> list[Action]:
        """Handle one front-end message; return the actions to execute in order."""
        self._owned.update(msg.fds)
        if self._broken is not None:
            raise ProtocolError(f"{msg.name} after the connection failed ({self._broken})")
        ack = (msg.need_reply and self.has_protocol_feature(ProtocolFeature.REPLY_ACK)
               and msg.request not in _MANDATORY_REPLY)
        try:
            row, payload = self._check(msg)
            actions = row.handler(self, msg, payload)
            if row.touches_rings:
                actions += self._update_rings()
        except _Refused as exc:
            log.warning("%s refused: %s", msg.name, exc)
            actions = [CloseFds(msg.fds)] if msg.fds else []
            if ack:
                actions.append(Ack(msg.request, ok=False))
            return self._account(actions)
        except ProtocolError as exc:
            if ack:
                log.warning("%s failed (REPLY_ACK 1): %s", msg.name, exc)
                actions = [CloseFds(msg.fds)] if msg.fds else []
                actions.append(Ack(msg.request, ok=False))
                return self._account(actions)
            self._broken = f"{msg.name}: {exc}"
            log.error("vhost-user protocol error: %s", self._broken)
            raise
        if ack:
            actions.append(Ack(msg.request))
        log.debug("%s -> %s", msg.name, actions)
        return self._account(actions)

    def ring_stopped(self, index: int, last_avail_idx: int) -> list[Action]:
        """The caller finished a ``StopRing(index)``; ``last_avail_idx`` is the
        next avail index the engine would have processed.  Returns the
        GET_VRING_BASE reply and/or the deferred change and restarts."""
        ring = self._rings.get(index)
        if ring is None or not ring.stopping:
            log.debug("ring_stopped(%d) with no stop pending (reset or disconnect since)", index)
            return []
        ring.stopping = False
        ring.started = False
        ring.base = last_avail_idx & 0xFFFF
        actions: list[Action] = []
        if ring.reply_on_stop:
            ring.reply_on_stop = False
            actions.append(Reply(Request.GET_VRING_BASE, VringState(index, ring.base).encode()))
        if ring.close_on_stop:
            actions.append(CloseFds(tuple(ring.close_on_stop)))
            ring.close_on_stop = []
        if not any(r.stopping for r in self._rings.values()):
            actions += self._deferred
            self._deferred = []
        actions += self._update_rings()
        return self._account(actions)

    def memory_failed(self, action: SetMemTable | AddMemRegion) -> None:
        """The caller could not map what ``action`` carried (it nacked it):
        forget it, so a retry of the same table is mapped afresh instead of
        being taken for "unchanged"."""
        if isinstance(action, SetMemTable):
            self._regions = []
        else:
            key = (action.region.gpa, action.region.size, action.region.uva,
                   action.region.mmap_offset)
            self._regions = [r for r in self._regions if r.key() != key]

    def ring_failed(self, index: int) -> None:
        """The caller could not start ring ``index``: it is not running, so
        GET_VRING_BASE answers from our state and a later change retries."""
        ring = self._rings.get(index)
        if ring is not None:
            ring.started = False
            ring.told_enabled = False

    def disconnect(self) -> list[Action]:
        """The front-end went away (or the connection was dropped after a
        ProtocolError): stop everything and close every fd held.  The protocol
        is back in its initial state afterwards."""
        actions: list[Action] = [ResetDevice()]
        if self._owned:
            actions.append(CloseFds(tuple(sorted(self._owned))))
        self._protocol_features = 0
        self._owner = False
        self._backend_req_fd = -1
        self._broken = None
        self._reset_device_state()
        return self._account(actions)

    # -- checks ---------------------------------------------------------------

    def _check(self, msg: Message) -> tuple[Row, Any]:
        if msg.flags & VERSION_MASK != VERSION:
            raise ProtocolError(f"header version {msg.flags & VERSION_MASK} (flags {msg.flags:#x})")
        if msg.flags & REPLY:
            raise ProtocolError("request carries the REPLY flag")
        try:
            request = Request(msg.request)
        except ValueError:
            raise ProtocolError(f"unknown request id {msg.request}") from None
        row = self.TABLE.get(request)
        if row is None:
            raise ProtocolError(f"{request.name} is not supported")
        lo, hi = row.fds
        if not lo <= len(msg.fds) <= hi:
            raise ProtocolError(f"{len(msg.fds)} fds (accepts {lo}..{hi})")
        lo, hi = row.size
        if not lo <= len(msg.payload) <= hi:
            want = f"{lo}" if lo == hi else f"{lo}..{hi}"
            raise ProtocolError(f"payload is {len(msg.payload)} bytes (expected {want})")
        payload = row.payload.decode(msg.payload)
        if row.validate and not payload.is_valid():
            raise ProtocolError(f"invalid payload {payload}")
        if row.offered_feature is not None and not self.spec.features >> row.offered_feature & 1:
            raise ProtocolError(f"needs virtio feature bit {row.offered_feature}, not offered")
        if row.protocol_feature is not None and not self.has_protocol_feature(row.protocol_feature):
            raise ProtocolError(f"needs protocol feature {row.protocol_feature.name}, not negotiated")
        if row.queue_field is not None:
            index = getattr(payload, row.queue_field)
            if index >= self.spec.max_queues:
                raise ProtocolError(f"vring index {index} >= max_queues {self.spec.max_queues}")
        return row, payload

    # -- helpers --------------------------------------------------------------

    def _account(self, actions: list[Action]) -> list[Action]:
        """Drop from ``_owned`` every fd the caller is now told to close."""
        for a in actions:
            if isinstance(a, CloseFds):
                self._owned.difference_update(a.fds)
        return actions

    def _ring(self, index: int) -> _Ring:
        ring = self._rings.get(index)
        if ring is None:
            ring = self._rings[index] = _Ring(index)
        return ring

    def _effective_enabled(self, ring: _Ring) -> bool:
        if self._features >> F_PROTOCOL_FEATURES & 1:
            return ring.enabled
        return True

    def _region_for_uva(self, uva: int, length: int) -> bool:
        for r in self._regions:
            reg = r.region
            if reg.uva <= uva and uva + length <= reg.uva + reg.size:
                return True
        return False

    def _areas_mapped(self, ring: _Ring) -> bool:
        assert ring.addr is not None
        extra = 2 if self._features >> _F_RING_EVENT_IDX & 1 else 0
        num = ring.num
        return (self._region_for_uva(ring.addr.desc_uva, 16 * num)
                and self._region_for_uva(ring.addr.avail_uva, 4 + 2 * num + extra)
                and self._region_for_uva(ring.addr.used_uva, 4 + 8 * num + extra))

    def _ready(self, ring: _Ring) -> bool:
        if not (ring.num and ring.addr is not None and ring.kick_set and self._regions):
            return False
        if not self._areas_mapped(ring):
            log.warning("ring %d: descriptor/avail/used areas are not inside one memory region; "
                        "not starting it", ring.index)
            return False
        return True

    def _vring_config(self, ring: _Ring) -> VringConfig:
        addr = ring.addr
        assert addr is not None
        return VringConfig(
            index=ring.index, size=ring.num,
            desc_uva=addr.desc_uva, avail_uva=addr.avail_uva, used_uva=addr.used_uva,
            log_guest_addr=addr.log_guest_addr, log_used=addr.log,
            base=ring.base, kick_fd=ring.kick_fd, call_fd=ring.call_fd,
            enabled=self._effective_enabled(ring),
        )

    def _update_rings(self) -> list[Action]:
        """Readiness pass: start rings that became ready, tell enable changes.
        Nothing starts while a deferred change waits for rings to stop."""
        if self._deferred:
            return []
        actions: list[Action] = []
        for index in sorted(self._rings):
            ring = self._rings[index]
            if ring.stopping:
                continue
            if ring.started:
                enabled = self._effective_enabled(ring)
                if enabled != ring.told_enabled:
                    ring.told_enabled = enabled
                    actions.append(EnableRing(index, enabled))
            elif self._ready(ring):
                config = self._vring_config(ring)
                ring.started = True
                ring.told_enabled = config.enabled
                actions.append(StartRing(config))
        return actions

    def _quiesce(self, rings: list[_Ring], then: list[Action]) -> list[Action]:
        """Stop the started ``rings``; ``then`` runs once no ring is stopping
        (from ``ring_stopped``), followed by the readiness pass (restarts)."""
        stops = []
        for ring in rings:
            if ring.started and not ring.stopping:
                ring.stopping = True
                stops.append(StopRing(ring.index))
        if any(r.stopping for r in self._rings.values()):
            self._deferred += then
            return stops
        return stops + then

    def _started_rings(self) -> list[_Ring]:
        return [r for _, r in sorted(self._rings.items()) if r.started]

    def _forget_kick(self, ring: _Ring) -> list[Action]:
        fd, ring.kick_fd, ring.kick_set = ring.kick_fd, -1, False
        return [CloseFds((fd,))] if fd >= 0 else []

    def _reset(self) -> list[Action]:
        """RESET_OWNER / RESET_DEVICE: stop every ring, drop memory, log and
        negotiated virtio features; keep protocol features, ownership and the
        back-end channel (they belong to the connection)."""
        keep = {self._backend_req_fd} - {-1}
        close = tuple(sorted(self._owned - keep))
        self._reset_device_state()
        actions: list[Action] = [ResetDevice()]
        if close:
            actions.append(CloseFds(close))
        return actions

    @staticmethod
    def _check_fd_matches(payload: VringFile, fds: tuple[int, ...]) -> int:
        if payload.nofd:
            if fds:
                raise ProtocolError("no-fd bit set but an fd was sent")
            return -1
        if len(fds) != 1:
            raise ProtocolError("no fd sent and the no-fd bit is clear")
        return fds[0]

    # -- handlers: one per request, named after it ------------------------------

    def _get_features(self, msg: Message, p: Empty) -> list[Action]:
        return [Reply(msg.request, U64(self.spec.features).encode())]

    def _set_features(self, msg: Message, p: U64) -> list[Action]:
        features = p.value
        extra = features & ~self.spec.features
        if extra:
            raise ProtocolError(f"acks features {extra:#x} that were not offered")
        changed = features ^ self._features
        if self._started_rings() and changed & ~(1 << F_LOG_ALL):
            raise ProtocolError(f"features {changed:#x} changed while rings run")
        self._features = features
        self._features_set = True
        return [SetFeatures(features)]

    def _set_owner(self, msg: Message, p: Empty) -> list[Action]:
        self._owner = True          # QEMU sends it once per vhost_dev: idempotent
        return []

    def _reset_owner(self, msg: Message, p: Empty) -> list[Action]:
        return self._reset()

    def _reset_device(self, msg: Message, p: Empty) -> list[Action]:
        return self._reset()

    def _check_new_regions(self, regions: list[MemRegion]) -> None:
        if len(regions) > self.spec.max_mem_slots:
            raise ProtocolError(f"{len(regions)} memory regions (at most {self.spec.max_mem_slots})")
        if _overlaps([(r.gpa, r.size) for r in regions]):
            raise ProtocolError("memory regions overlap in guest physical space")
        if _overlaps([(r.uva, r.size) for r in regions]):
            raise ProtocolError("memory regions overlap in front-end address space")

    def _set_mem_table(self, msg: Message, p: MemTable) -> list[Action]:
        if len(msg.fds) != len(p.regions):
            raise ProtocolError(f"{len(p.regions)} regions but {len(msg.fds)} fds")
        new = [MemRegion(r.gpa, r.size, r.uva, r.mmap_offset, fd) for r, fd in zip(p.regions, msg.fds)]
        self._check_new_regions(new)
        new_keys = sorted((r.gpa, r.size, r.uva, r.mmap_offset) for r in new)
        if self._regions and new_keys == sorted(r.key() for r in self._regions):
            # Unchanged (older QEMUs send one table per queue pair): keep the maps.
            return [CloseFds(msg.fds)]
        self._regions = [_Region(replace(r, fd=-1)) for r in new]
        return self._quiesce(self._started_rings(), [SetMemTable(tuple(new)), CloseFds(msg.fds)])

    def _add_mem_reg(self, msg: Message, p: SingleMemRegion) -> list[Action]:
        r = p.region
        new = MemRegion(r.gpa, r.size, r.uva, r.mmap_offset, msg.fds[0])
        key = (r.gpa, r.size, r.uva, r.mmap_offset)
        for existing in self._regions:
            if existing.key() == key:
                existing.refs += 1
                return [CloseFds(msg.fds)]
        self._check_new_regions([x.region for x in self._regions] + [new])
        self._regions.append(_Region(replace(new, fd=-1)))
        return self._quiesce(self._started_rings(), [AddMemRegion(new), CloseFds(msg.fds)])

    def _rem_mem_reg(self, msg: Message, p: SingleMemRegion) -> list[Action]:
        r = p.region
        # An fd is tolerated (some front-ends send one) and closed unused.
        close = [CloseFds(msg.fds)] if msg.fds else []
        match = [x for x in self._regions
                 if (x.region.gpa, x.region.size, x.region.uva) == (r.gpa, r.size, r.uva)]
        if not match:
            raise ProtocolError(f"no region gpa={r.gpa:#x} size={r.size:#x} uva={r.uva:#x}")
        existing = match[0]
        existing.refs -= 1
        if existing.refs > 0:
            return close
        self._regions.remove(existing)
        return close + self._quiesce(self._started_rings(), [RemoveMemRegion(existing.region)])

    def _set_log_base(self, msg: Message, p: Log) -> list[Action]:
        fd = msg.fds[0]
        self._log = p
        # QEMU (LOG_SHMFD) waits for a reply; its content is not checked.
        return [SetLogBase(fd, p.size, p.offset), CloseFds((fd,)),
                Reply(msg.request, U64(0).encode())]

    def _set_log_fd(self, msg: Message, p: Empty) -> list[Action]:
        old, self._log_fd = self._log_fd, msg.fds[0]
        return [CloseFds((old,))] if old >= 0 else []

    def _set_vring_num(self, msg: Message, p: VringState) -> list[Action]:
        limit = min(self.spec.max_queue_size, _MAX_QUEUE_SIZE)
        if not _is_pow2(p.num) or p.num > limit:
            raise ProtocolError(f"ring {p.index}: size {p.num} (power of 2 up to {limit})")
        self._check_fits_inflight(p.index, p.num, self._inflight)
        ring = self._ring(p.index)
        if ring.num == p.num:
            return []
        ring.num = p.num
        return self._quiesce([ring], [])

    def _set_vring_addr(self, msg: Message, p: VringAddr) -> list[Action]:
        ring = self._ring(p.index)
        if ring.addr == p:
            return []
        ring.addr = p
        return self._quiesce([ring], [])

    def _set_vring_base(self, msg: Message, p: VringState) -> list[Action]:
        if p.num > 0xFFFF:
            raise ProtocolError(f"ring {p.index}: base {p.num} > 65535")
        ring = self._ring(p.index)
        if ring.started:
            raise ProtocolError(f"ring {p.index}: SET_VRING_BASE while the ring runs")
        ring.base = p.num
        return []

    def _get_vring_base(self, msg: Message, p: VringState) -> list[Action]:
        ring = self._ring(p.index)
        if ring.started:
            # The ring needs a new kick to start again; the engine may use the
            # old one until it has stopped.
            if ring.kick_fd >= 0:
                ring.close_on_stop.append(ring.kick_fd)
            ring.kick_fd, ring.kick_set = -1, False
            ring.reply_on_stop = True
            if ring.stopping:
                return []                      # a pending stop answers it
            ring.stopping = True
            return [StopRing(p.index)]
        # Never started (or already stopped): answer at once; the ring still
        # needs a new kick to start.
        log.debug("GET_VRING_BASE for ring %d, which is not running", p.index)
        return [Reply(msg.request, VringState(p.index, ring.base).encode())] + self._forget_kick(ring)

    def _set_vring_kick(self, msg: Message, p: VringFile) -> list[Action]:
        fd = self._check_fd_matches(p, msg.fds)
        ring = self._ring(p.index)
        old = ring.kick_fd
        ring.kick_fd, ring.kick_set = fd, True
        if ring.started:                            # restart with the new kick
            if old >= 0:
                ring.close_on_stop.append(old)
            return self._quiesce([ring], [])
        return [CloseFds((old,))] if old >= 0 else []

    def _set_vring_call(self, msg: Message, p: VringFile) -> list[Action]:
        fd = self._check_fd_matches(p, msg.fds)
        ring = self._ring(p.index)
        old, ring.call_fd = ring.call_fd, fd
        actions: list[Action] = []
        if ring.started:
            actions.append(SetCallFd(p.index, fd))
        if old >= 0:
            actions.append(CloseFds((old,)))
        return actions

    def _set_vring_err(self, msg: Message, p: VringFile) -> list[Action]:
        fd = self._check_fd_matches(p, msg.fds)
        ring = self._ring(p.index)
        old, ring.err_fd = ring.err_fd, fd
        return [CloseFds((old,))] if old >= 0 else []

    def _get_protocol_features(self, msg: Message, p: Empty) -> list[Action]:
        return [Reply(msg.request, U64(self.spec.protocol_features).encode())]

    def _set_protocol_features(self, msg: Message, p: U64) -> list[Action]:
        extra = p.value & ~self.spec.protocol_features
        if extra:
            raise ProtocolError(f"sets protocol features {extra:#x} that were not offered")
        self._protocol_features = p.value
        return []

    def _get_queue_num(self, msg: Message, p: Empty) -> list[Action]:
        return [Reply(msg.request, U64(self.spec.queue_num).encode())]

    def _set_vring_enable(self, msg: Message, p: VringState) -> list[Action]:
        if p.num not in (0, 1):
            raise ProtocolError(f"ring {p.index}: enable {p.num}")
        self._ring(p.index).enabled = bool(p.num)
        return []

    def _send_rarp(self, msg: Message, p: U64) -> list[Action]:
        return [SendRarp(bytes(msg.payload[:6]))]

    def _net_set_mtu(self, msg: Message, p: U64) -> list[Action]:
        if not _MTU_MIN <= p.value <= _MTU_MAX:
            raise _Refused(f"MTU {p.value} outside {_MTU_MIN}..{_MTU_MAX}")
        return [SetMtu(p.value)]

    def _set_backend_req_fd(self, msg: Message, p: Empty) -> list[Action]:
        # Held for a future back-end channel (config change, host notifiers).
        old, self._backend_req_fd = self._backend_req_fd, msg.fds[0]
        return [CloseFds((old,))] if old >= 0 else []

    def _get_config(self, msg: Message, p: Config) -> list[Action]:
        config = self.spec.config
        if not p.is_valid() or p.offset + p.size > len(config):
            # "zero length of payload to indicate an error"
            log.warning("GET_CONFIG offset=%d size=%d outside %d bytes of config space",
                        p.offset, p.size, len(config))
            return [Reply(msg.request, b"")]
        data = config[p.offset:p.offset + p.size]
        return [Reply(msg.request, Config(p.offset, p.size, p.flags, data).encode())]

    def _set_config(self, msg: Message, p: Config) -> list[Action]:
        raise _Refused(f"config space is read-only (offset={p.offset} size={p.size} flags={p.flags})")

    def _get_max_mem_slots(self, msg: Message, p: Empty) -> list[Action]:
        return [Reply(msg.request, U64(self.spec.max_mem_slots).encode())]

    def _set_status(self, msg: Message, p: U64) -> list[Action]:
        if p.value > 0xFF:
            raise ProtocolError(f"status {p.value:#x} does not fit a byte")
        self._status = p.value
        return [SetStatus(p.value)]

    def _get_status(self, msg: Message, p: Empty) -> list[Action]:
        return [Reply(msg.request, U64(self._status).encode())]

    def _check_inflight_shape(self, p: Inflight) -> None:
        limit = min(self.spec.max_queue_size, _MAX_QUEUE_SIZE)
        if not 1 <= p.num_queues <= self.spec.max_queues:
            raise ProtocolError(f"inflight region for {p.num_queues} queues "
                                f"(the device has {self.spec.max_queues})")
        if not _is_pow2(p.queue_size) or p.queue_size > limit:
            raise ProtocolError(f"inflight region for queues of {p.queue_size} entries "
                                f"(power of 2 up to {limit})")

    @staticmethod
    def _check_fits_inflight(index: int, num: int, p: Inflight | None) -> None:
        """A ring the inflight region tracks (index < its num_queues) must
        fit its queue regions: the engine writes one entry per head there."""
        if p is not None and index < p.num_queues and num > p.queue_size:
            raise ProtocolError(f"ring {index}: size {num} does not fit the inflight region "
                                f"(queues of {p.queue_size} entries)")

    def _get_inflight_fd(self, msg: Message, p: Inflight) -> list[Action]:
        # QEMU sends mmap_size/offset 0 and the shape it wants; the reply
        # (with the new region's fd) comes from the caller, which allocates it.
        self._check_inflight_shape(p)
        return [GetInflight(p.num_queues, p.queue_size)]

    def _set_inflight_fd(self, msg: Message, p: Inflight) -> list[Action]:
        self._check_inflight_shape(p)
        need = inflight_region_size(p.num_queues, p.queue_size)
        if p.mmap_size < need:
            raise ProtocolError(f"inflight region of {p.mmap_size} bytes, {p.num_queues} queues "
                                f"of {p.queue_size} need {need}")
        for index, ring in sorted(self._rings.items()):
            if ring.num:
                self._check_fits_inflight(index, ring.num, p)
        fd = msg.fds[0]
        self._inflight = p
        # Rings read the region when they start: running ones restart with it.
        return self._quiesce(self._started_rings(), [
            SetInflight(fd, p.mmap_size, p.mmap_offset, p.num_queues, p.queue_size),
            CloseFds((fd,))])


PF = ProtocolFeature
B = BackendProtocol

BackendProtocol.TABLE = {
    Request.GET_FEATURES: Row(B._get_features, Empty, reply=True),
    Request.SET_FEATURES: Row(B._set_features, U64, touches_rings=True),
    Request.SET_OWNER: Row(B._set_owner, Empty),
    Request.RESET_OWNER: Row(B._reset_owner, Empty),
    Request.SET_MEM_TABLE: Row(B._set_mem_table, MemTable, fds=(1, 8), touches_rings=True),
    Request.SET_LOG_BASE: Row(B._set_log_base, Log, fds=(1, 1), protocol_feature=PF.LOG_SHMFD,
                              reply=True),
    Request.SET_LOG_FD: Row(B._set_log_fd, Empty, fds=(1, 1)),
    Request.SET_VRING_NUM: Row(B._set_vring_num, VringState, queue_field="index",
                               touches_rings=True),
    Request.SET_VRING_ADDR: Row(B._set_vring_addr, VringAddr, queue_field="index",
                                touches_rings=True),
    Request.SET_VRING_BASE: Row(B._set_vring_base, VringState, queue_field="index"),
    Request.GET_VRING_BASE: Row(B._get_vring_base, VringState, queue_field="index", reply=True),
    Request.SET_VRING_KICK: Row(B._set_vring_kick, VringFile, fds=(0, 1), queue_field="index",
                                touches_rings=True),
    Request.SET_VRING_CALL: Row(B._set_vring_call, VringFile, fds=(0, 1), queue_field="index"),
    Request.SET_VRING_ERR: Row(B._set_vring_err, VringFile, fds=(0, 1), queue_field="index"),
    Request.GET_PROTOCOL_FEATURES: Row(B._get_protocol_features, Empty,
                                       offered_feature=F_PROTOCOL_FEATURES, reply=True),
    Request.SET_PROTOCOL_FEATURES: Row(B._set_protocol_features, U64,
                                       offered_feature=F_PROTOCOL_FEATURES),
    Request.GET_QUEUE_NUM: Row(B._get_queue_num, Empty, protocol_feature=PF.MQ, reply=True),
    Request.SET_VRING_ENABLE: Row(B._set_vring_enable, VringState, queue_field="index",
                                  offered_feature=F_PROTOCOL_FEATURES, touches_rings=True),
    Request.SEND_RARP: Row(B._send_rarp, U64, protocol_feature=PF.RARP),
    Request.NET_SET_MTU: Row(B._net_set_mtu, U64, protocol_feature=PF.MTU),
    Request.SET_BACKEND_REQ_FD: Row(B._set_backend_req_fd, Empty, fds=(1, 1),
                                    protocol_feature=PF.BACKEND_REQ),
    Request.GET_CONFIG: Row(B._get_config, Config, protocol_feature=PF.CONFIG, reply=True,
                            validate=False),
    Request.SET_CONFIG: Row(B._set_config, Config, protocol_feature=PF.CONFIG, validate=False),
    Request.RESET_DEVICE: Row(B._reset_device, Empty, protocol_feature=PF.RESET_DEVICE),
    Request.GET_MAX_MEM_SLOTS: Row(B._get_max_mem_slots, Empty,
                                   protocol_feature=PF.CONFIGURE_MEM_SLOTS, reply=True),
    Request.ADD_MEM_REG: Row(B._add_mem_reg, SingleMemRegion, fds=(1, 1),
                             protocol_feature=PF.CONFIGURE_MEM_SLOTS, touches_rings=True),
    Request.REM_MEM_REG: Row(B._rem_mem_reg, SingleMemRegion, fds=(0, 1),
                             protocol_feature=PF.CONFIGURE_MEM_SLOTS, touches_rings=True),
    Request.SET_STATUS: Row(B._set_status, U64, protocol_feature=PF.STATUS),
    Request.GET_STATUS: Row(B._get_status, Empty, protocol_feature=PF.STATUS, reply=True),
    Request.GET_INFLIGHT_FD: Row(B._get_inflight_fd, Inflight, protocol_feature=PF.INFLIGHT_SHMFD,
                                 reply=True),
    Request.SET_INFLIGHT_FD: Row(B._set_inflight_fd, Inflight, fds=(1, 1),
                                 protocol_feature=PF.INFLIGHT_SHMFD, touches_rings=True),
    # Not yet: IOTLB_MSG, SET_VRING_ENDIAN,
    # POSTCOPY_*, VRING_KICK (INBAND_NOTIFICATIONS).  Add a row and a handler.
}

#: Requests whose reply is part of the protocol: never an extra REPLY_ACK,
#: and a failure cannot be reported by one.
_MANDATORY_REPLY = frozenset(int(req) for req, row in BackendProtocol.TABLE.items() if row.reply) | {
    int(Request.IOTLB_MSG), int(Request.POSTCOPY_ADVISE),
    int(Request.POSTCOPY_END), int(Request.CREATE_CRYPTO_SESSION), int(Request.GET_SHARED_OBJECT),
    int(Request.SET_DEVICE_STATE_FD), int(Request.CHECK_DEVICE_STATE),
}

del PF, B
