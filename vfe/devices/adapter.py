"""The one place that knows both sides: it executes the vhost-user
protocol's actions (vfe/vhost/actions.py) against a device model and the
engine, through the device interface (vfe/devices/interface.py).  One
`Session` per connected front-end."""
from __future__ import annotations

import logging
import os

from vfe.devices.interface import VhostDevice
from vfe.vhost import actions as A
from vfe.vhost.actions import MemRegion
from vfe.vhost import inflight
from vfe.vhost.memory import GuestMemory, LogRegion
from vfe.vhost.messages import Inflight, ProtocolError, Request
from vfe.vhost.protocol import BackendProtocol
from vfe.vhost.transport import PeerClosed
from vfe.virtio.constants import F

log = logging.getLogger("vfe.device")


def engine_table(memory: GuestMemory, without=None) -> list[tuple[int, int, int, int]]:
    """The engine's view of a memory table: (gpa, size, uva, hva) per region."""
    return [(m.gpa, m.size, m.uva, m.hva) for m in memory.regions
            if without is None or not m.matches(without.gpa, without.size, without.uva)]


class Session:
    """A front-end connected to one device: protocol state, guest memory,
    and the translation of actions into engine calls."""

    def __init__(self, device: VhostDevice, name: str, send):
        self.device = device
        self.name = name
        self._send = send                 # send(Reply | Ack-as-Reply) -> None
        self.protocol = BackendProtocol(device.spec())
        self.memory = GuestMemory()
        self.log_region: LogRegion | None = None
        self.inflight: inflight.InflightRegion | None = None
        self.started: set[int] = set()
        self.features = 0                 # as acked by this front-end
        # whether the front-end can shrink the memory it shared under us
        # (its files are not sealed with F_SEAL_SHRINK); None before any
        self.memory_can_shrink: bool | None = None
        device.rearm_notices()            # a new front-end: its security events are logged anew

    # -- entry points from the transport

    def handle(self, msg) -> None:
        self.execute(self.protocol.receive(msg))

    def disconnect(self) -> None:
        """The front-end went away: stop everything, unmap, close fds."""
        spec = self.protocol.spec
        if spec.queues_hint and self.protocol.left_after_queue_num():
            # QEMU says only "The maximum number of queues supported by the
            # backend is N" on its side: say here what to change
            log.error("%s: the front-end closed the connection right after GET_QUEUE_NUM answered %d: "
                      "QEMU does that when its num-queues is larger; %s", self.name, spec.queue_num,
                      spec.queues_hint)
        try:
            self.execute(self.protocol.disconnect())
        finally:
            self._reset()

    # -- live update (vfe/controller/update.py)
    #
    # The old controller pauses every session (its rings stop in the engine
    # at exact indexes, the front-end is told nothing), exports it, and the
    # new controller restores it and starts the rings where they stopped.
    # Should the new one fail, ``resume`` restarts them here.  Fds travel in
    # one list shared by everything being handed over; the state names them
    # by index in it.

    def pause(self) -> None:
        bases = {i: self.device.rings.stop_ring(i) for i in sorted(self.started)}
        self.protocol.rings_paused(bases)

    def resume(self) -> None:
        """Run the paused rings again here (the hand-over failed).  The new
        process may have moved them on before it failed, so each resumes at
        the used index in guest memory: between bursts a split ring has
        answered every chain it took, so that is the next avail index.  A
        packed ring keeps no index in guest memory: it resumes where it was
        paused (should the new process have answered descriptors since, the
        ring finds them used and waits there; it does not answer them twice)."""
        bases = {}
        packed = self.features >> F.RING_PACKED & 1
        for r in self.protocol.running_rings():
            if r.index in self.started and not packed:
                gpa = self.memory.uva_to_gpa(r.used_uva) + 2        # struct vring_used.idx
                bases[r.index] = int.from_bytes(self.memory.read(gpa, 2), "little")
        self.protocol.rings_paused(bases)
        self._start_rings(self.started)

    def _start_rings(self, which) -> None:
        for r in self.protocol.running_rings():
            if r.index in which:
                self._start_ring(r)

    def _start_ring(self, r):
        """Start ring `r` (a VringConfig) in the engine; returns how many
        requests the inflight region had it resubmit (None: no region)."""
        recovered = self.device.rings.start_ring(r.index, r.size, r.desc_uva, r.avail_uva, r.used_uva,
                                                 r.base, r.kick_fd, r.call_fd, r.enabled,
                                                 r.log_used, r.log_guest_addr)
        self.started.add(r.index)
        return recovered

    def export(self, fds: list[int]) -> dict:
        def keep(fd: int) -> int:
            fds.append(fd)
            return len(fds) - 1
        proto = self.protocol.export_state()
        lr = self.log_region
        return {
            "protocol": proto,
            "protocol_fds": [keep(fd) for fd in proto["fds"]],
            "memory": [[m.gpa, m.size, m.uva, m.mmap_offset, keep(m.fd)] for m in self.memory.regions],
            "log": None if lr is None else [keep(lr.fd), lr.size, lr.offset],
            "inflight": None if self.inflight is None else [
                keep(self.inflight.fd), self.inflight.size, self.inflight.offset,
                self.inflight.num_queues, self.inflight.queue_size],
            # a key of its own: a build before packed rings reads "inflight" as 5 values
            "inflight_packed": self.inflight is not None and self.inflight.packed,
            "started": sorted(self.started),
            "features": self.features,
            "owner": self.drives_device(),
        }

    @classmethod
    def restore(cls, device: VhostDevice, name: str, send, state: dict,
                fds: list[int]) -> "Session":
        """The session ``export`` described, over the fds received (``fds``).
        Takes the protocol's fds; the memory and log fds stay the caller's
        (they are mapped and dup'ed here)."""
        self = cls(device, name, send)
        self.protocol = BackendProtocol.from_state(device.spec(), state["protocol"],
                                                   [fds[i] for i in state["protocol_fds"]])
        try:
            self.memory = GuestMemory([MemRegion(gpa, size, uva, off, fds[i])
                                       for gpa, size, uva, off, i in state["memory"]])
            self.memory_can_shrink = self.memory.can_shrink if len(self.memory) else None
            if state["log"] is not None:
                i, size, offset = state["log"]
                self.log_region = LogRegion(fds[i], size, offset)
            if state.get("inflight") is not None:
                i, size, offset, nq, qs = state["inflight"]
                self.inflight = inflight.InflightRegion(fds[i], size, offset, nq, qs,
                                                        state.get("inflight_packed", False))
            self.features = state["features"]
            if state["owner"]:
                self._start_driving()
                self._start_rings(set(state["started"]))
        except BaseException:
            self.disconnect()             # closes the protocol's fds, unmaps
            raise
        return self

    # -- action execution

    def execute(self, actions) -> bool:
        """Run the actions in order; False if any of them failed."""
        failed = False
        fatal = None
        for act in actions:
            try:
                if isinstance(act, A.Ack):
                    ok = act.ok and not failed
                    fatal = None          # reported by the nack
                    self._send(A.Reply(act.request, (0 if ok else 1).to_bytes(8, "little")))
                elif self._apply(act) is False:
                    failed = True         # a StopRing's deferred change failed: nack it
            except PeerClosed:
                raise                     # the connection is gone: the endpoint detaches
            except (OSError, ValueError, RuntimeError, IndexError) as exc:
                failed = True
                log.error("%s: %s failed: %s", self.name, type(act).__name__, exc)
                if isinstance(act, (A.SetMemTable, A.AddMemRegion)):
                    self.protocol.memory_failed(act)
                    if isinstance(act, A.SetMemTable):
                        self._unmap_memory()
                elif isinstance(act, A.StartRing):
                    self.protocol.ring_failed(act.ring.index)
                elif isinstance(act, A.SetInflight):
                    # Running without the region the front-end asked for would
                    # silently lose its crash guarantee: without a nack to say
                    # so, the connection goes (the rest of the batch runs first:
                    # it closes the fds).
                    fatal = f"SET_INFLIGHT_FD: {exc}"
        if fatal is not None:
            raise ProtocolError(fatal)
        return not failed

    # -- which session drives the engine's device
    #
    # A device may have two front-ends at once: during live migration the
    # destination QEMU connects (on the function's second socket) while the
    # source still runs.  Only one session -- the device's driving_session --
    # drives the engine's rings, memory table, features and dirty log; the
    # other only records what it is told.  The destination takes over when
    # it starts a ring, which QEMU does after the source stopped all of its
    # rings.

    def drives_device(self) -> bool:
        return self.device.driving_session is self

    def _engine_free(self) -> bool:
        driver = self.device.driving_session
        return driver is None or driver is self or not driver.started

    def _note_memory(self) -> None:
        """Log, when it changes, whether the guest memory can shrink under us:
        sealed, a truncation is impossible; unsealed, one would stop this
        device (the engine catches the SIGBUS) and leave the others running."""
        if not len(self.memory):
            return
        shrink = self.memory.can_shrink
        if shrink == self.memory_can_shrink:
            return
        self.memory_can_shrink = shrink
        regions = len(self.memory)
        size = f"{regions} region(s), {self.memory.size >> 20} MiB"
        if shrink:
            log.info("%s: guest memory (%s) is not sealed against shrinking (a truncation "
                     "would stop this device)", self.name, size)
        else:
            log.info("%s: guest memory (%s) is sealed against shrinking", self.name, size)

    def _start_driving(self) -> None:
        """Become the device's driving session: the engine gets our features,
        memory table, dirty log and inflight region."""
        if self.drives_device():
            return
        if not self._engine_free():
            raise RuntimeError("another front-end is running this device")
        rings = self.device.rings
        self.device.driving_session = self
        rings.set_features(self.features)
        rings.set_memory(engine_table(self.memory))
        lr = self.log_region
        rings.set_log(lr.hva if lr else 0, lr.size if lr else 0)
        self._engine_inflight(self.inflight)

    def _engine_inflight(self, ir: inflight.InflightRegion | None) -> None:
        """Hand the engine a region (None: none) with its shape and length:
        the engine checks every ring against them again at its start."""
        if ir is None:
            self.device.set_inflight(0, 0, 0, 0, 0)
        else:
            self.device.set_inflight(ir.hva, ir.stride, ir.num_queues, ir.queue_size, ir.size)

    def _apply(self, act) -> bool | None:
        """Execute one action (False: a StopRing whose deferred actions failed)."""
        rings = self.device.rings
        match act:
            case A.Reply():
                self._send(act)
            case A.SetFeatures(features=f):
                if (f & ~self.features) >> F.RING_PACKED & 1:
                    log.info("%s: packed virtqueues (VIRTIO_F_RING_PACKED)", self.name)
                self.features = f
                if self.drives_device() or self.device.driving_session is None:
                    rings.set_features(f)
                log.debug("%s: features %#x", self.name, f)
            case A.SetMemTable(regions=regions):
                # map the new table, switch the engine to it, then unmap the old:
                # a worker never sees an address that is not mapped
                new = GuestMemory(regions)
                if self._engine_free() and not self.drives_device():
                    self.memory, old = new, self.memory
                    old.close()
                    self._note_memory()
                    self._start_driving()
                    return
                if self.drives_device():
                    rings.set_memory(engine_table(new))
                self.memory, old = new, self.memory
                old.close()
                self._note_memory()
            case A.AddMemRegion(region=r):
                self.memory.add(r)
                self._note_memory()
                if self._engine_free():
                    self._start_driving()
                    rings.set_memory(engine_table(self.memory))
            case A.RemoveMemRegion(region=r):
                if self.drives_device():
                    rings.set_memory(engine_table(self.memory, without=r))
                self.memory.remove(r.gpa, r.size, r.uva)
            case A.StartRing(ring=r):
                self._start_driving()
                recovered = self._start_ring(r)
                state = rings.ring_state(r.index)
                if recovered is not None and recovered >= 0:
                    # the inflight region decided where the ring goes on
                    (log.info if recovered or state["last_avail_idx"] != r.base else log.debug)(
                        "%s: ring %d: %d request(s) left inflight resubmitted; continuing at "
                        "avail %d (used %d; the front-end said %d)", self.name, r.index,
                        recovered, state["last_avail_idx"], state["last_used_idx"], r.base)
                log.debug("%s: ring %d started (size %d, base %d)", self.name, r.index, r.size,
                          state["last_avail_idx"])
            case A.StopRing(index=i):
                if i in self.started:
                    base = rings.stop_ring(i)
                    self.started.discard(i)
                else:                     # never ran here: answer from the protocol's state
                    base = self.protocol.rings[i].base if i in self.protocol.rings else 0
                # the change the stop made way for runs here: its failure is
                # the message's failure (REPLY_ACK must nack it)
                return self.execute(self.protocol.ring_stopped(i, base))
            case A.EnableRing(index=i, enabled=e):
                if i in self.started:
                    rings.enable_ring(i, e)
            case A.SetCallFd(index=i, fd=fd):
                if i in self.started:
                    rings.set_call_fd(i, fd)
            case A.SetLogBase(fd=fd, size=size, offset=offset):
                new = LogRegion(fd, size, offset)
                if self.drives_device():
                    rings.set_log(new.hva, new.size)
                self.log_region, old = new, self.log_region
                if old is not None:
                    old.close()
            case A.GetInflight(num_queues=nq, queue_size=qs, packed=packed):
                try:
                    fd, size = inflight.allocate(nq, qs, packed)
                except OSError as exc:
                    # the reply is mandatory: size 0 tells QEMU there is no region
                    log.error("%s: cannot allocate an inflight region: %s", self.name, exc)
                    self._send(A.Reply(Request.GET_INFLIGHT_FD, Inflight(0, 0, nq, qs).encode()))
                    return
                try:
                    self._send(A.Reply(Request.GET_INFLIGHT_FD, Inflight(size, 0, nq, qs).encode(),
                                       fds=(fd,)))
                finally:
                    os.close(fd)          # the front-end keeps the region; it sends it back
                log.debug("%s: inflight region of %d bytes for %d %s queues of %d", self.name,
                          size, nq, "packed" if packed else "split", qs)
            case A.SetInflight(fd=-1):
                # dropped (its layout is not the rings'): the engine tracks none until
                # the next SET_INFLIGHT_FD
                if self.drives_device():
                    self._engine_inflight(None)
                if self.inflight is not None:
                    self.inflight.close()
                    self.inflight = None
            case A.SetInflight(fd=fd, mmap_size=size, mmap_offset=off, num_queues=nq,
                               queue_size=qs, packed=packed):
                new = inflight.InflightRegion(fd, size, off, nq, qs, packed)
                if self.drives_device():
                    try:
                        self._engine_inflight(new)
                    except BaseException:
                        new.close()
                        raise
                self.inflight, old = new, self.inflight
                if old is not None:
                    old.close()
            case A.SetStatus(status=s):
                self.device.status = s
            case A.SetMtu(mtu=m):
                self.device.mtu = m
            case A.SendRarp(mac=mac):
                self.device.send_rarp(mac)
            case A.ResetDevice():
                self._reset()
            case A.CloseFds(fds=fds):
                for fd in fds:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            case _:
                raise RuntimeError(f"unknown action {act!r}")

    def _unmap_memory(self) -> None:
        """A new memory table failed to map and the protocol forgot its table
        (``memory_failed``): unmap the old one too.  Kept, it would stay in
        the engine, and a ring the protocol restarts after the change would
        run on memory the protocol no longer has.  The protocol stopped every
        ring before the change, so none uses it."""
        if self.drives_device():
            self.device.rings.set_memory([])
        self.memory.close()
        self.memory = GuestMemory()

    def _reset(self) -> None:
        rings = self.device.rings
        for i in list(self.started):
            rings.stop_ring(i)
        self.started.clear()
        if self.drives_device():
            rings.set_memory([])
            rings.set_log(0, 0)
            self.device.forget_learned()  # the guest's MACs left with it
            self._engine_inflight(None)
            self.device.driving_session = None
        self.memory.close()
        self.memory = GuestMemory()
        if self.log_region is not None:
            self.log_region.close()
            self.log_region = None
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None
