"""A back-end connection with real fds and real mappings, minus the socket
and the engine, that checks its own consistency after every message.

Shared by the protocol fuzz target (tests/fuzz/target_protocol.py) and the
Hypothesis state machine (tests/unit/vhost/test_vhost_state_machine.py).

What is real: the bytes go through ``FrameAssembler`` exactly as the
transport feeds one ``recvmsg`` (vfe/vhost/transport.py), messages through
the daemon's ``Session`` (vfe/devices/adapter.py: ``BackendProtocol`` plus
the code that maps guest memory, the dirty log and the inflight region and
closes fds), and every fd is a real one (memfd, eventfd or pipe end) made
here.  What stands in: the engine's device (``EngineRings``), which records
what it was told, checks that each call is safe for a real engine to act
on, and can be told to fail.

Checked after every message (``InvariantViolation`` otherwise):

- fds: each fd handed over is open and held by the protocol (or waits in
  the framer for its message), or was closed exactly once by the back-end;
  the back-end never closes an fd it does not hold; every fd the engine
  uses (kick, call) is one the protocol holds;
- memory: the mapped table is the protocol's memory table, and the engine
  sees exactly the mapped table, dirty log and inflight region;
- rings: the engine runs exactly the rings the protocol started, each with
  a size, addresses inside the mapped table and a kick (an fd or the no-fd
  bit), with the kick and call fds the protocol holds for it; a ring stopped
  by GET_VRING_BASE holds no kick; GET_VRING_BASE answers the ring it was
  asked about, with the index the engine stopped at (or the last
  SET_VRING_BASE for a ring not running).

When the session ends (EOF, or a ``ProtocolError`` drops the connection):
no fd it was given is open, nothing it mapped is mapped, and the process has
as many fds as before the connection; ``check_process`` also counts the
memfd mappings in /proc/self/maps.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import IntEnum

from vfe.devices.adapter import Session, engine_table
from vfe.devices.blk import BLK_FEATURES, BLK_PROTOCOL_FEATURES
from vfe.devices.net import NET_FEATURES, NET_PROTOCOL_FEATURES
from vfe.vhost import actions as A
from vfe.vhost.framing import FrameAssembler
from vfe.vhost.messages import Message, ProtocolError, Request, VringState
from vfe.virtio.constants import F
from vfe.virtio.layouts import PackedBase, ring_area_sizes

__all__ = ["FdKind", "InvariantViolation", "Connection", "EngineRings", "device_spec"]


class InvariantViolation(AssertionError):
    """The back-end broke one of the rules in the module docstring."""


class FdKind(IntEnum):
    MEMFD_4K = 0          # too small for most tables: mapping must fail cleanly
    MEMFD_64K = 1
    MEMFD_16M = 2         # sparse: costs nothing
    EVENTFD = 3
    PIPE_READ = 4
    PIPE_WRITE = 5


_MEMFD_SIZES = {FdKind.MEMFD_4K: 4096, FdKind.MEMFD_64K: 65536, FdKind.MEMFD_16M: 16 << 20}
MEMFD_NAME = "vfe-harness"


class HandedFds:
    """Fds made here (the front-end's) and handed to the back-end, and what
    became of each."""

    def __init__(self) -> None:
        self.unsent: set[int] = set()    # made, still the front-end's
        self.live: set[int] = set()      # handed over, not closed by the back-end yet
        self.made = 0

    def make(self, kind: FdKind) -> int:
        kind = FdKind(kind)
        if kind in _MEMFD_SIZES:
            fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
            os.ftruncate(fd, _MEMFD_SIZES[kind])
        elif kind == FdKind.EVENTFD:
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        else:
            r, w = os.pipe2(os.O_CLOEXEC)
            fd, other = (r, w) if kind == FdKind.PIPE_READ else (w, r)
            os.close(other)
        self.unsent.add(fd)
        self.made += 1
        return fd

    def hand_over(self, fds) -> None:
        for fd in fds:
            if fd in self.unsent:
                self.unsent.remove(fd)
                self.live.add(fd)

    def closed_by_backend(self, fd: int) -> None:
        if fd not in self.live:
            raise InvariantViolation(f"the back-end closes fd {fd}, which it does not hold "
                                     "(closed before, or never handed over)")
        self.live.remove(fd)
        os.close(fd)

    def take_back(self, fds) -> None:
        """Fds made for a chunk that was never delivered: ours to close."""
        for fd in fds:
            self.unsent.remove(fd)
            os.close(fd)

    def close_all(self) -> None:
        for fd in sorted(self.live | self.unsent):
            try:
                os.close(fd)
            except OSError:
                pass
        self.live.clear()
        self.unsent.clear()


def device_spec(blk: bool, packed: bool = False) -> A.DeviceSpec:
    """The specs the daemon's net and blk devices offer (2 queue pairs / 2
    queues); RING_PACKED only with ``packed`` (the state machines model
    split rings' 16-bit bases)."""
    ring = 0 if packed else 1 << F.RING_PACKED
    if blk:
        return A.DeviceSpec(features=BLK_FEATURES & ~ring, protocol_features=BLK_PROTOCOL_FEATURES,
                            queue_num=2, max_queues=2, max_queue_size=256, config=bytes(range(60)))
    return A.DeviceSpec(features=NET_FEATURES & ~ring, protocol_features=NET_PROTOCOL_FEATURES,
                        queue_num=2, max_queues=4, max_queue_size=1024)


@dataclass
class EngineRing:
    size: int
    desc: int
    avail: int
    used: int
    base: int
    kick: int
    call: int
    enabled: bool
    hvas: tuple[int, int, int]     # where desc/avail/used were at start


@dataclass
class EngineRings:
    """Stands in for vfe._engine's device: records, checks, fails on request."""

    conn: "Connection"
    num_rings: int
    blk: bool
    started: dict[int, EngineRing] = field(default_factory=dict)
    table: list[tuple[int, int, int, int]] = field(default_factory=list)
    log: tuple[int, int] = (0, 0)
    inflight: tuple[int, int, int] = (0, 0, 0)
    features: int = 0
    fail_next_start: bool = False
    stop_bases: dict[int, int] = field(default_factory=dict)   # what the last stop returned
    stop_log: list[tuple[int, int]] = field(default_factory=list)   # every stop: (ring, base)
    stop_step: int = 1                                         # how far a ring moves while running

    # -- checks

    def _translate(self, uva: int, length: int, table=None) -> int:
        for gpa, size, r_uva, hva in (self.table if table is None else table):
            if r_uva <= uva and uva + length <= r_uva + size:
                return hva + (uva - r_uva)
        # what the real engine does (its own last check): refuse the start
        raise ValueError(f"engine: uva {uva:#x}+{length} is not inside the memory table")

    @property
    def packed(self) -> bool:
        return bool(self.features >> F.RING_PACKED & 1)

    def _areas(self, r_size: int, desc: int, avail: int, used: int, table=None):
        sizes = ring_area_sizes(r_size, event_idx=False, packed=self.packed)
        return (self._translate(desc, sizes.desc, table),
                self._translate(avail, sizes.avail, table),
                self._translate(used, sizes.used, table))

    def _check_fd(self, what: str, fd: int) -> None:
        if fd == -1:
            return
        if fd not in self.conn.fds.live or fd not in self.conn.session.protocol.held_fds():
            raise InvariantViolation(f"engine: {what} fd {fd} is not an fd the protocol holds")

    # -- the engine device's interface (what Session calls)

    def set_features(self, features: int) -> None:
        self.features = features

    def set_memory(self, table) -> None:
        table = [tuple(t) for t in table]
        # (that the new entries stay mapped is checked after the message:
        # the table must then be the Session's open mappings)
        for index, ring in self.started.items():
            # a running ring keeps its pointers: they must stay valid
            try:
                same = self._areas(ring.size, ring.desc, ring.avail, ring.used, table) == ring.hvas
            except ValueError:
                same = False
            if not same:
                raise InvariantViolation(f"engine: memory table changed under running ring {index}")
        self.table = table

    def set_log(self, hva: int, size: int) -> None:
        self.log = (hva, size)

    def set_inflight(self, hva: int, stride: int, num_queues: int, *shape) -> None:
        if self.started and (hva, stride, num_queues) != self.inflight:
            raise InvariantViolation("engine: inflight region changed while rings run")
        self.inflight = (hva, stride, num_queues)

    def start_ring(self, index, size, desc, avail, used, base, kick, call, enabled,
                   log_used=False, log_gpa=0):
        if not 0 <= index < self.num_rings:
            raise InvariantViolation(f"engine: start of ring {index} (device has {self.num_rings})")
        if index in self.started:
            raise InvariantViolation(f"engine: ring {index} started twice")
        if (size <= 0 or size & (size - 1)
                or not (PackedBase.decode(base).fits(size) if self.packed else 0 <= base <= 0xFFFF)):
            raise InvariantViolation(f"engine: ring {index} size {size} base {base}")
        if desc % 16 or avail % (4 if self.packed else 2) or used % 4:
            raise InvariantViolation(f"engine: ring {index} areas misaligned")
        hvas = self._areas(size, desc, avail, used)
        self._check_fd("kick", kick)
        self._check_fd("call", call)
        if self.fail_next_start:
            self.fail_next_start = False
            raise RuntimeError(f"ring {index}: start failed (injected)")
        self.started[index] = EngineRing(size, desc, avail, used, base, kick, call, enabled, hvas)
        return 0 if self.blk and self.inflight[0] else None

    def stop_ring(self, index: int) -> int:
        ring = self.started.pop(index, None)
        if ring is None:
            raise InvariantViolation(f"engine: stop of ring {index}, which does not run")
        if self.packed:       # both positions move on, a wrap flips their counters
            pos = PackedBase.decode(ring.base)
            avail, used = pos.avail_idx + self.stop_step, pos.used_idx + self.stop_step
            base = PackedBase(avail % ring.size, pos.avail_wrap ^ (avail >= ring.size),
                              used % ring.size, pos.used_wrap ^ (used >= ring.size)).encode()
        else:
            base = (ring.base + self.stop_step) & 0xFFFF
        self.stop_bases[index] = base
        self.stop_log.append((index, base))
        return base

    def enable_ring(self, index: int, enabled: bool) -> None:
        if index not in self.started:
            raise InvariantViolation(f"engine: enable of ring {index}, which does not run")
        self.started[index].enabled = enabled

    def set_call_fd(self, index: int, fd: int) -> None:
        if index not in self.started:
            raise InvariantViolation(f"engine: call fd for ring {index}, which does not run")
        self._check_fd("call", fd)
        self.started[index].call = fd

    def ring_state(self, index: int) -> dict:
        ring = self.started.get(index)
        base = ring.base if ring else 0
        return {"last_avail_idx": base, "last_used_idx": base}



class _Device:
    """What Session needs of a device (vfe/devices/interface.py VhostDevice)."""

    def __init__(self, spec: A.DeviceSpec, rings: EngineRings) -> None:
        self._spec = spec
        self.rings = rings
        self.driving_session = None
        self.status = 0
        self.mtu = 0

    def spec(self) -> A.DeviceSpec:
        return self._spec

    def rearm_notices(self) -> None:
        """No switch here: no security notices."""

    def forget_learned(self) -> None:
        """No switch here: nothing learned."""

    def set_inflight(self, hva: int, stride: int, num_queues: int, queue_size: int,
                     length: int) -> None:
        self.rings.set_inflight(hva, stride, num_queues, queue_size, length)

    def send_rarp(self, mac: bytes) -> None:
        """No switch here: nothing to announce to."""


class _CheckedSession(Session):
    """The daemon's Session, with every close checked against what it holds."""

    def __init__(self, conn: "Connection", device) -> None:
        super().__init__(device, "harness", conn.replies.append)
        self._conn = conn

    def _apply(self, act) -> bool | None:
        if isinstance(act, A.CloseFds):
            for fd in act.fds:
                self._conn.fds.closed_by_backend(fd)
            return
        return super()._apply(act)


def memfd_maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if "/memfd:" in line)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Connection:
    """One front-end connection after another, on one device.  ``deliver``
    is one ``recvmsg`` worth of bytes and fds; ``end`` is EOF."""

    def __init__(self, blk: bool = False, maps_now: int | None = None) -> None:
        """``maps_now``: how many memfd mappings the process has now, if the
        caller knows (saves reading /proc/self/maps)."""
        self.blk = blk
        self.spec = device_spec(blk)
        self.fds = HandedFds()
        self.replies: list[A.Reply] = []
        self.rings = EngineRings(self, self.spec.max_queues, blk)
        self.device = _Device(self.spec, self.rings)
        self.sessions = 0
        self._process_baseline = (self._backend_fds(),
                                  memfd_maps() if maps_now is None else maps_now)
        self._fresh()

    def _fresh(self) -> None:
        self.framer = FrameAssembler()
        self.session = _CheckedSession(self, self.device)
        self.stopped_by_get_base: set[int] = set()
        self._queued: list[Message] = []
        self.sessions += 1
        self._baseline = self._backend_fds()

    # -- driving

    def deliver(self, data: bytes, fds=()) -> bool:
        """Feed one received chunk; False if the back-end dropped the connection
        (the session then ended and a new one starts)."""
        fds = list(fds)
        if not data:
            self.fds.take_back(fds)       # a stream socket delivers no empty chunk
            return True
        self.fds.hand_over(fds)
        try:
            msgs = self.framer.feed(data, fds)
        except ProtocolError:
            self.end()
            return False
        self._queued = msgs               # framed, not handled yet: their fds wait
        while msgs:
            msg = msgs.pop(0)
            try:
                self.handle(msg)
            except ProtocolError:
                for later in msgs:        # never handled: the daemon closes their fds
                    for fd in later.fds:
                        self.fds.closed_by_backend(fd)
                self.end()
                return False
        return True

    def handle(self, msg: Message) -> None:
        """One message into the session, with the checks around it."""
        index = None
        if msg.request == Request.GET_VRING_BASE and len(msg.payload) == VringState.SIZE:
            index = VringState.decode(msg.payload).index
            running = index in self.rings.started
            before = self.session.protocol.rings.get(index)
            expect = (None if running else (before.base if before else 0))
        self.fds.hand_over(msg.fds)       # when called directly (no deliver)
        self.replies.clear()
        self.session.handle(msg)
        if index is not None:
            got = [r for r in self.replies if r.request == Request.GET_VRING_BASE]
            if got:
                self._check_vring_base(index, got, running, expect)
        if msg.request == Request.SET_VRING_KICK:
            self.stopped_by_get_base.difference_update(
                {i for i, r in self.session.protocol.rings.items() if r.kick_set})
        self.check()

    def _check_vring_base(self, index: int, got, running: bool, expect) -> None:
        if len(got) != 1:
            raise InvariantViolation(f"GET_VRING_BASE {index}: {len(got)} replies")
        state = VringState.decode(got[0].payload)
        if running:
            expect = self.rings.stop_bases.get(index)
        if state.index != index or state.num != expect:
            raise InvariantViolation(f"GET_VRING_BASE {index} answered {state}, expected "
                                     f"index {index} num {expect}")
        self.stopped_by_get_base.add(index)

    def end(self) -> None:
        """EOF (or a dropped connection): what transport and daemon do, then
        the end-of-session checks; a new session starts."""
        for fd in self.framer.take_pending_fds():
            self.fds.closed_by_backend(fd)
        self.session.disconnect()
        self.check_released()
        self._fresh()

    def close(self) -> None:
        """Tear down (also after a failed check): closes whatever is left."""
        try:
            self.session.disconnect()
        except Exception:
            pass
        self.fds.close_all()

    # -- checks

    def check(self) -> None:
        p = self.session.protocol
        held = set(p.held_fds())
        waiting = set(self.framer.pending_fds).union(*(m.fds for m in self._queued))
        live = self.fds.live
        if held - live:
            raise InvariantViolation(f"the protocol holds fds {sorted(held - live)} that were "
                                     "closed")
        if live - held - waiting:
            raise InvariantViolation(f"fds {sorted(live - held - waiting)} were handed over and "
                                     "are neither held nor closed (leak)")
        keys = sorted((r.gpa, r.size, r.uva, r.mmap_offset) for r in p.regions)
        mapped = sorted((m.gpa, m.size, m.uva, m.mmap_offset) for m in self.session.memory.regions)
        if keys != mapped:
            raise InvariantViolation(f"mapped {mapped} but the memory table is {keys}")
        self._check_engine_view()
        self._check_rings(p, held)

    def _check_engine_view(self) -> None:
        s, rings = self.session, self.rings
        if self.device.driving_session is not s:
            if rings.started:
                raise InvariantViolation("engine runs rings of no session")
            return
        if sorted(rings.table) != sorted(engine_table(s.memory)):
            raise InvariantViolation(f"engine table {rings.table} is not the mapped table")
        if any(m.mmap.closed for m in s.memory.regions):
            raise InvariantViolation("the memory table holds a region that was unmapped")
        lr = s.log_region
        if rings.log != ((lr.hva, lr.size) if lr else (0, 0)):
            raise InvariantViolation("engine dirty log is not the mapped one")
        ir = s.inflight
        if self.blk and rings.inflight != ((ir.hva, ir.stride, ir.num_queues) if ir else (0, 0, 0)):
            raise InvariantViolation("engine inflight region is not the mapped one")

    def _check_rings(self, p, held: set[int]) -> None:
        states = p.rings
        started = {i for i, r in states.items() if r.started}
        if started != set(self.rings.started):
            raise InvariantViolation(f"protocol started rings {sorted(started)}, engine runs "
                                     f"{sorted(self.rings.started)}")
        for i, ring in self.rings.started.items():
            r = states[i]
            if not (r.num and r.addr is not None and r.kick_set):
                raise InvariantViolation(f"ring {i} runs without size/addresses/kick: {r}")
            if (ring.kick, ring.call) != (r.kick_fd, r.call_fd):
                raise InvariantViolation(f"ring {i}: engine uses kick {ring.kick} call {ring.call}, "
                                         f"the protocol holds kick {r.kick_fd} call {r.call_fd}")
            if (ring.size, ring.desc, ring.avail, ring.used) != (
                    r.num, r.addr.desc_uva, r.addr.avail_uva, r.addr.used_uva):
                raise InvariantViolation(f"ring {i}: engine runs a stale size/addresses")
        for i in self.stopped_by_get_base:
            r = states.get(i)
            if r is not None and (r.kick_fd != -1 or r.kick_set):
                raise InvariantViolation(f"ring {i} was stopped by GET_VRING_BASE and still "
                                         f"holds a kick ({r.kick_fd})")

    def check_released(self) -> None:
        s, p = self.session, self.session.protocol
        if self.fds.live:
            raise InvariantViolation(f"session ended with fds {sorted(self.fds.live)} still open")
        if p.held_fds():
            raise InvariantViolation(f"session ended, the protocol holds {sorted(p.held_fds())}")
        if len(s.memory) or s.log_region is not None or s.inflight is not None:
            raise InvariantViolation("session ended with guest memory, log or inflight mapped")
        if self.rings.started or self.device.driving_session is not None:
            raise InvariantViolation("session ended with rings running in the engine")
        if self._backend_fds() != self._baseline:
            raise InvariantViolation(f"session ended with {self._backend_fds()} fds open in the "
                                     f"process, {self._baseline} before it (the front-end's not "
                                     "counted)")

    def _backend_fds(self) -> int:
        return _open_fds() - len(self.fds.unsent)

    def check_process(self) -> None:
        """Between sessions: the process has the fds and memfd mappings it had
        before the first one (reads /proc/self/maps: once per run, not per
        session)."""
        now = (self._backend_fds(), memfd_maps())
        if now != self._process_baseline:
            raise InvariantViolation(f"(fds, memfd mappings) {now} after the sessions, "
                                     f"{self._process_baseline} before them")
