"""The vhost-user back-end state machine, sans I/O.

``BackendProtocol.receive(msg)`` validates one message and returns the
actions (vfe/vhost/actions.py) its caller must execute, in order.  It never
touches sockets, memory, the engine, or fds: fds it received are *owned* by
it until it lists them in a ``CloseFds`` action.

The rules, and where each lives: the check order, failures and stops here;
when rings start and how changes reach running ones in readiness.py; what
each request does in handlers.py (one handler per request, and ``TABLE``,
its row: fds, size, features, queue index); the state itself, and its JSON
for a live update, in protocol_state.py (``ConnectionState``, which this
class owns and nothing else changes).

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

Ring readiness (readiness.py, the one place a ring starts): a ring is started
(``StartRing``) when it has SET_VRING_NUM, SET_VRING_ADDR and SET_VRING_KICK
(an fd, or the no-fd bit), a memory table exists and maps the ring's three
areas.  It is enabled if VHOST_USER_F_PROTOCOL_FEATURES was not acked,
otherwise as SET_VRING_ENABLE said (``EnableRing`` on changes while started).
The kick fd is not required to be readable: rings start at once.

Packed rings (VIRTIO_F_RING_PACKED acked): the bases of SET_VRING_BASE and
GET_VRING_BASE carry QEMU's 32-bit encoding (vfe/virtio/layouts.py
``PackedBase``): avail index and wrap counter, used index and wrap counter.
SET_VRING_BASE refuses index bits outside the ring; the ring's areas are
the descriptor ring and the two 4-byte event suppression areas.  The
inflight region's layout (vfe/vhost/inflight.py) follows the acked
features when it is made and set; acking or dropping RING_PACKED drops a
region of the other layout (e.g. a guest's firmware's, split).

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
from typing import Any, Mapping

from .actions import Ack, AddMemRegion, CloseFds, DeviceSpec, MemRegion, Reply, ResetDevice, \
    SetMemTable, VringConfig
from .handlers import MANDATORY_REPLY, TABLE, Refused, Row
from .messages import REPLY, VERSION, VERSION_MASK, Inflight, Log, Message, ProtocolError, \
    ProtocolFeature, Request, VringState
from .protocol_state import ConnectionState, RingState
from .readiness import update_rings, vring_config

log = logging.getLogger("vfe.vhost.protocol")

Action = Any   # one of the dataclasses in actions.py


def _ring_base(s: ConnectionState, engine_base: int) -> int:
    """The base the engine stopped a ring at, as GET_VRING_BASE carries it:
    split 16 bits; packed 32, the wrap counters and the used index with it."""
    return engine_base & (0xFFFFFFFF if s.packed else 0xFFFF)


class BackendProtocol:
    """One vhost-user connection's back-end state machine (see module docstring)."""

    TABLE: Mapping[Request, Row] = TABLE      # handlers.py: how each request is checked

    def __init__(self, spec: DeviceSpec) -> None:
        self.spec = spec
        self._state = ConnectionState()

    # -- read-only state ------------------------------------------------------

    @property
    def features(self) -> int:
        """Virtio features acked by SET_FEATURES (0 before)."""
        return self._state.features

    @property
    def protocol_features(self) -> int:
        """Protocol features set by SET_PROTOCOL_FEATURES (0 before)."""
        return self._state.protocol_features

    @property
    def session_owned(self) -> bool:
        """SET_OWNER received: the front-end claimed this session."""
        return self._state.session_owned

    @property
    def status(self) -> int:
        return self._state.status

    @property
    def regions(self) -> tuple[MemRegion, ...]:
        """The current memory table (fds are -1: closed once mapped)."""
        return tuple(r.region for r in sorted(self._state.regions, key=lambda r: r.region.gpa))

    @property
    def log_base(self) -> Log | None:
        return self._state.log

    @property
    def inflight(self) -> Inflight | None:
        """The inflight region of the last SET_INFLIGHT_FD (None before)."""
        return self._state.inflight

    @property
    def backend_req_fd(self) -> int:
        return self._state.backend_req_fd

    @property
    def rings(self) -> Mapping[int, RingState]:
        return {i: r.snapshot() for i, r in sorted(self._state.rings.items())}

    @property
    def broken(self) -> str | None:
        """Why the connection failed, once a ProtocolError escaped."""
        return self._state.broken

    def held_fds(self) -> frozenset[int]:
        """Every fd received and not yet listed in a returned CloseFds."""
        return frozenset(self._state.owned_fds)

    def has_protocol_feature(self, bit: int) -> bool:
        return self._state.has_protocol_feature(bit)

    # -- entry points ---------------------------------------------------------

    def receive(self, msg: Message) -> list[Action]:
        """Handle one front-end message; return the actions to execute in order."""
        s = self._state
        s.owned_fds.update(msg.fds)
        if s.broken is not None:
            raise ProtocolError(f"{msg.name} after the connection failed ({s.broken})")
        ack = (msg.need_reply and self.has_protocol_feature(ProtocolFeature.REPLY_ACK)
               and msg.request not in MANDATORY_REPLY)
        s.queue_num_last = msg.request == Request.GET_QUEUE_NUM and not s.session_owned
        try:
            row, payload = self._check(msg)
            actions = row.handler(self.spec, s, msg, payload)
            if row.touches_rings:
                actions += update_rings(s)
        except Refused as exc:
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
            s.broken = f"{msg.name}: {exc}"
            log.error("vhost-user protocol error: %s", s.broken)
            raise
        if ack:
            actions.append(Ack(msg.request))
        log.debug("%s -> %s", msg.name, actions)
        return self._account(actions)

    def ring_stopped(self, index: int, last_avail_idx: int) -> list[Action]:
        """The caller finished a ``StopRing(index)``; ``last_avail_idx`` is the
        next avail index the engine would have processed.  Returns the
        GET_VRING_BASE reply and/or the deferred change and restarts."""
        s = self._state
        ring = s.rings.get(index)
        if ring is None or not ring.stopping:
            log.debug("ring_stopped(%d) with no stop pending (reset or disconnect since)", index)
            return []
        ring.stopping = False
        ring.started = False
        ring.base = _ring_base(s, last_avail_idx)
        actions: list[Action] = []
        if ring.reply_on_stop:
            ring.reply_on_stop = False
            actions.append(Reply(Request.GET_VRING_BASE, VringState(index, ring.base).encode()))
        if ring.close_on_stop:
            actions.append(CloseFds(tuple(ring.close_on_stop)))
            ring.close_on_stop = []
        if not any(r.stopping for r in s.rings.values()):
            actions += s.deferred
            s.deferred = []
        actions += update_rings(s)
        return self._account(actions)

    def memory_failed(self, action: SetMemTable | AddMemRegion) -> None:
        """The caller could not map what ``action`` carried (it nacked it):
        forget it, so a retry of the same table is mapped afresh instead of
        being taken for "unchanged"."""
        s = self._state
        if isinstance(action, SetMemTable):
            s.regions = []
        else:
            key = (action.region.gpa, action.region.size, action.region.uva,
                   action.region.mmap_offset)
            s.regions = [r for r in s.regions if r.key() != key]

    def ring_failed(self, index: int) -> None:
        """The caller could not start ring ``index``: it is not running, so
        GET_VRING_BASE answers from our state and a later change retries."""
        ring = self._state.rings.get(index)
        if ring is not None:
            ring.started = False
            ring.told_enabled = False

    def left_after_queue_num(self) -> bool:
        """Whether the front-end's last message was GET_QUEUE_NUM, before
        any SET_OWNER: one that leaves then wanted more queues than we
        offer (QEMU's vhost_user_backend_init checks its num-queues against
        the answer there, before it takes the session)."""
        return self._state.queue_num_last

    def disconnect(self) -> list[Action]:
        """The front-end went away (or the connection was dropped after a
        ProtocolError): stop everything and close every fd held.  The protocol
        is back in its initial state afterwards."""
        actions: list[Action] = [ResetDevice()]
        if self._state.owned_fds:
            actions.append(CloseFds(tuple(sorted(self._state.owned_fds))))
        self._state = ConnectionState()
        return actions

    # -- a live update (vfe/controller/update.py) -------------------------------

    def export_state(self) -> dict:
        """This connection's state as JSON, plus the fds it holds (``"fds"``);
        only between messages (protocol_state.py)."""
        return self._state.to_json()

    @classmethod
    def from_state(cls, spec: DeviceSpec, state: dict, fds: list[int]) -> BackendProtocol:
        """The protocol ``export_state`` described, owning ``fds`` (the
        exporter's ``state["fds"]`` as received here, same order)."""
        self = cls(spec)
        self._state = ConnectionState.from_json(state, fds)
        return self

    def running_rings(self) -> list[VringConfig]:
        """How to start each ring that runs (after ``from_state``, or to
        restart rings paused for a hand-over that failed)."""
        return [vring_config(self._state, r) for r in self._state.started_rings()]

    def rings_paused(self, bases: Mapping[int, int]) -> None:
        """The caller stopped these running rings in the engine outside the
        protocol (a hand-over): record where each resumes.  They stay
        "started" -- the front-end was told nothing."""
        for index, base in bases.items():
            self._state.rings[index].base = _ring_base(self._state, base)

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

    def _account(self, actions: list[Action]) -> list[Action]:
        """Drop from the fds held every fd the caller is now told to close."""
        for a in actions:
            if isinstance(a, CloseFds):
                self._state.owned_fds.difference_update(a.fds)
        return actions
