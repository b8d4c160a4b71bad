"""A back-end for protocol tests: Connection + BackendProtocol + a dummy
executor (no engine).  It maps memory with GuestMemory, records every
action, and runs a tiny pure-Python loopback "device" so the test
front-end's data path can be exercised: frames sent on TX ring 2k+1 come
back on RX ring 2k.

Imported by file name from tests/protocol (keep the name unique).
"""
from __future__ import annotations

import os
import select
import struct
import threading

from vfe.vhost.actions import (
    Ack, AddMemRegion, CloseFds, EnableRing, RemoveMemRegion, Reply, ResetDevice, SetCallFd,
    SetFeatures, SetLogBase, SetMemTable, StartRing, StopRing, VringConfig,
)
from vfe.vhost.memory import GuestMemory, LogRegion
from vfe.vhost.messages import ProtocolError
from vfe.vhost.protocol import BackendProtocol
from vfe.vhost.transport import Connection, PeerClosed
from vfe.virtio.constants import (
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, F, bit, net_hdr_len,
)

_DESC = struct.Struct("<QIHH")


class _DevRing:
    """Device side of one started ring (pure Python, slow, for tests)."""

    def __init__(self, mem: GuestMemory, cfg: VringConfig) -> None:
        self.cfg = cfg
        self.mem = mem
        self.size = cfg.size
        self.last_avail = cfg.base
        self.enabled = cfg.enabled
        self.call_fd = cfg.call_fd
        self._views = []
        self.desc = self._view(cfg.desc_uva, 16 * cfg.size)
        self.avail16 = self._view(cfg.avail_uva, 6 + 2 * cfg.size).cast("H")
        self.used = self._view(cfg.used_uva, 6 + 8 * cfg.size)
        self.used16 = self.used.cast("H")
        self._views += [self.avail16, self.used16]
        self.used_idx = self.used16[1]

    def _view(self, uva: int, length: int) -> memoryview:
        r = self.mem.find_uva(uva)
        assert r is not None and uva + length <= r.uva + r.size
        off = r.mmap_offset + (uva - r.uva)
        v = memoryview(r.mmap)[off:off + length]
        self._views.append(v)
        return v

    def release(self) -> None:
        for v in reversed(self._views):
            v.release()
        self._views = []

    def pending(self) -> bool:
        return self.avail16[1] != self.last_avail

    def pop(self) -> tuple[int, list[tuple[int, int, int]]] | None:
        """Next chain: (head, [(gpa, len, flags)]) or None."""
        if self.avail16[1] == self.last_avail:
            return None
        head = self.avail16[2 + self.last_avail % self.size]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        bufs = []
        table, idx, count = self.desc, head, self.size
        for _ in range(64):
            addr, length, flags, nxt = _DESC.unpack_from(table, 16 * idx)
            if flags & VRING_DESC_F_INDIRECT:
                table = self.mem.read(addr, length)
                idx, count = 0, length // 16
                continue
            bufs.append((addr, length, flags))
            if not flags & VRING_DESC_F_NEXT:
                break
            idx = nxt
            assert idx < count
        return head, bufs

    def push(self, head: int, written: int) -> None:
        slot = self.used_idx % self.size
        struct.pack_into("<II", self.used, 4 + 8 * slot, head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF

    def flush(self) -> None:
        self.used16[1] = self.used_idx                    # one 16-bit store
        self.used16[2 + 4 * self.size] = self.last_avail  # avail_event
        if self.call_fd >= 0:
            os.eventfd_write(self.call_fd, 1)


class DummyBackend:
    """Serve one Connection in a thread until the front-end goes away."""

    def __init__(self, conn: Connection, protocol: BackendProtocol, loopback: bool = True) -> None:
        self.conn = conn
        self.p = protocol
        self.loopback = loopback
        self.memory = GuestMemory()
        self.log: LogRegion | None = None
        self.rings: dict[int, _DevRing] = {}
        self.actions: list = []
        self.features = 0
        self.error: BaseException | None = None
        self.protocol_error: ProtocolError | None = None
        self.dropped = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> "DummyBackend":
        self._thread.start()
        return self

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "backend thread did not finish"
        if self.error is not None:
            raise self.error

    def of_type(self, kind: type) -> list:
        return [a for a in self.actions if isinstance(a, kind)]

    # -- executing actions ------------------------------------------------------

    def execute(self, actions: list) -> None:
        for a in actions:
            self.actions.append(a)
            if isinstance(a, (Reply, Ack)):
                self.conn.send_reply(a)
            elif isinstance(a, SetMemTable):
                self._stop_all_views()
                self.memory.replace(a.regions)
            elif isinstance(a, AddMemRegion):
                self.memory.add(a.region)
            elif isinstance(a, RemoveMemRegion):
                self.memory.remove(a.region.gpa, a.region.size, a.region.uva)
            elif isinstance(a, SetLogBase):
                if self.log is not None:
                    self.log.close()
                self.log = LogRegion(a.fd, a.size, a.offset)
            elif isinstance(a, SetFeatures):
                self.features = a.features
            elif isinstance(a, StartRing):
                assert a.ring.index not in self.rings
                self.rings[a.ring.index] = _DevRing(self.memory, a.ring)
            elif isinstance(a, StopRing):
                ring = self.rings.pop(a.index)
                ring.release()
                self.execute(self.p.ring_stopped(a.index, ring.last_avail))
            elif isinstance(a, EnableRing):
                self.rings[a.index].enabled = a.enabled
            elif isinstance(a, SetCallFd):
                self.rings[a.index].call_fd = a.fd
            elif isinstance(a, CloseFds):
                for fd in a.fds:
                    os.close(fd)
            elif isinstance(a, ResetDevice):
                self._stop_all_views()
                self.rings.clear()
                self.memory.close()
                if self.log is not None:
                    self.log.close()
                    self.log = None

    def _stop_all_views(self) -> None:
        # The protocol stops rings before memory changes; nothing may be left.
        for ring in self.rings.values():
            ring.release()

    # -- loop -------------------------------------------------------------------

    def _serve(self) -> None:
        try:
            while True:
                kicks = {r.cfg.kick_fd: i for i, r in self.rings.items() if r.cfg.kick_fd >= 0}
                ready, _, _ = select.select([self.conn.sock, *kicks], [], [], 0.005)
                for fd in ready:
                    if fd in kicks:
                        try:
                            os.eventfd_read(fd)
                        except BlockingIOError:
                            pass
                if self.conn.sock in ready:
                    try:
                        msgs = self.conn.recv_messages()
                    except ProtocolError as exc:
                        if not isinstance(exc, PeerClosed):
                            self.protocol_error = exc
                        break
                    try:
                        for m in msgs:
                            self.execute(self.p.receive(m))
                    except ProtocolError as exc:
                        self.protocol_error = exc
                        for m in msgs:      # fds of messages not yet handed over
                            if m.fds and not set(m.fds) <= self.p.held_fds():
                                for fd in m.fds:
                                    if fd not in self.p.held_fds():
                                        os.close(fd)
                        break
                if self.loopback:
                    self._poll()
        except BaseException as exc:   # surfaces in join()
            self.error = exc
        finally:
            try:
                self.execute(self.p.disconnect())
            except BaseException as exc:
                self.error = self.error or exc
            self.conn.close()

    def _poll(self) -> None:
        hdr_len = net_hdr_len(self.features)
        mrg = bool(self.features & bit(F.NET_MRG_RXBUF))
        for index, tx in list(self.rings.items()):
            if index % 2 == 0 or not tx.pending():
                continue
            rx = self.rings.get(index - 1)
            while (chain := tx.pop()) is not None:
                head, bufs = chain
                data = b"".join(self.memory.read(g, n) for g, n, f in bufs
                                if not f & VRING_DESC_F_WRITE)
                tx.push(head, 0)
                if tx.enabled and rx is not None and rx.enabled:
                    self._deliver(rx, data[hdr_len:], hdr_len, mrg)
                else:
                    self.dropped += 1
            tx.flush()

    def _deliver(self, rx: _DevRing, frame: bytes, hdr_len: int, mrg: bool) -> None:
        """Into one RX chain, or with MRG_RXBUF across as many as needed."""
        saved = rx.last_avail
        out = bytearray(hdr_len) + frame
        chains = []
        room = 0
        while room < len(out):
            got = rx.pop()
            if got is None or (chains and not mrg):
                break
            head, bufs = got
            gpa, size, flags = bufs[0]
            assert flags & VRING_DESC_F_WRITE
            chains.append((head, gpa, size))
            room += size
        if not chains or (room < len(out) and mrg):
            rx.last_avail = saved              # nothing written: give them back
            self.dropped += 1
            return
        if hdr_len >= 12:
            struct.pack_into("<H", out, 10, len(chains))      # num_buffers
        off = 0
        for head, gpa, size in chains:
            n = min(size, len(out) - off)
            self.memory.write(gpa, bytes(out[off:off + n]))
            rx.push(head, n)
            off += n
        rx.flush()
