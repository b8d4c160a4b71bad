"""Helpers for the vhost unit tests (imported by file name: keep it unique)."""
from __future__ import annotations

import os

from vfe.vhost.actions import CloseFds, DeviceSpec, StopRing
from vfe.vhost.messages import (
    NEED_REPLY, VERSION, Message, ProtocolFeature, Request, U64, VringAddr, VringFile,
    VringState, MemoryRegion, MemTable,
)
from vfe.vhost.protocol import BackendProtocol
from vfe.virtio.constants import F, bit, mask

NET_FEATURES = mask(F.VERSION_1, F.NET_MAC, F.NET_MRG_RXBUF, F.RING_EVENT_IDX,
                    F.RING_INDIRECT_DESC, F.VHOST_LOG_ALL, F.VHOST_USER_PROTOCOL_FEATURES)
ALL_PF = sum(1 << int(p) for p in (
    ProtocolFeature.MQ, ProtocolFeature.LOG_SHMFD, ProtocolFeature.RARP, ProtocolFeature.REPLY_ACK,
    ProtocolFeature.MTU, ProtocolFeature.CONFIG, ProtocolFeature.RESET_DEVICE,
    ProtocolFeature.CONFIGURE_MEM_SLOTS, ProtocolFeature.STATUS, ProtocolFeature.BACKEND_REQ))

GiB = 1 << 30
MiB = 1 << 20
# A fake front-end address space: guest RAM at gpa 0 is at uva 0x7f00_0000_0000.
UVA0 = 0x7F00_0000_0000


def spec(**kw) -> DeviceSpec:
    base = dict(features=NET_FEATURES, protocol_features=ALL_PF, queue_num=2, max_queues=4,
                max_queue_size=1024, max_mem_slots=32, config=bytes(range(60)))
    base.update(kw)
    return DeviceSpec(**base)


def msg(request, payload=b"", fds=(), need_reply=False, flags=None) -> Message:
    if flags is None:
        flags = VERSION | (NEED_REPLY if need_reply else 0)
    if hasattr(payload, "encode"):
        payload = payload.encode()
    return Message(int(request), flags, bytes(payload), tuple(fds))


def u64(request, value, **kw) -> Message:
    return msg(request, U64(value), **kw)


def ring_addr(index, num=256, base_uva=UVA0 + 0x10000, flags=0, log_gpa=0) -> VringAddr:
    """Ring areas for ring ``index``: 64 KiB apart, desc/avail/used packed."""
    start = base_uva + index * 0x10000
    desc = start
    avail = desc + 16 * num
    used = (avail + 6 + 2 * num + 3) & ~3
    return VringAddr(index, flags, desc, used, avail, log_gpa)


class Fds:
    """Real fds (pipe ends) for ownership tests; checks what is still open."""

    def __init__(self) -> None:
        self.made: list[int] = []

    def new(self, n: int = 1) -> list[int]:
        out = []
        while len(out) < n:
            r, w = os.pipe()
            out += [r, w]
        extra = out[n:]
        for fd in extra:
            os.close(fd)
        out = out[:n]
        self.made += out
        return out

    def one(self) -> int:
        return self.new(1)[0]

    def open(self) -> set[int]:
        alive = set()
        for fd in self.made:
            try:
                os.fstat(fd)
                alive.add(fd)
            except OSError:
                pass
        return alive

    def cleanup(self) -> None:
        for fd in self.open():
            os.close(fd)


class Driver:
    """Feeds a BackendProtocol and executes just enough of its actions: StopRing
    is answered by ring_stopped (with ``avail``), CloseFds really closes."""

    def __init__(self, protocol: BackendProtocol, close: bool = True) -> None:
        self.p = protocol
        self.close = close
        self.avail: dict[int, int] = {}
        self.log: list = []

    def run(self, actions: list) -> list:
        out = self._run(actions)
        self.log += out
        return out

    def _run(self, actions: list) -> list:
        """Execute in order; a StopRing's ring_stopped actions run right after it."""
        out = []
        for a in actions:
            out.append(a)
            if isinstance(a, StopRing):
                out += self._run(self.p.ring_stopped(a.index, self.avail.get(a.index, 0)))
            elif isinstance(a, CloseFds) and self.close:
                for fd in a.fds:
                    os.close(fd)
        return out

    def send(self, m: Message) -> list:
        return self.run(self.p.receive(m))

    def disconnect(self) -> list:
        return self.run(self.p.disconnect())


def mem_table(regions, fds) -> Message:
    return msg(Request.SET_MEM_TABLE, MemTable(tuple(regions)), fds)


def default_region(size=64 * MiB) -> MemoryRegion:
    return MemoryRegion(gpa=0, size=size, uva=UVA0, mmap_offset=0)


def setup_ring(drv: Driver, fds: Fds, index: int, num: int = 256, kick=True, call=True):
    """NUM, BASE, ADDR, KICK, CALL for one ring; returns the actions."""
    out = []
    out += drv.send(msg(Request.SET_VRING_NUM, VringState(index, num)))
    out += drv.send(msg(Request.SET_VRING_BASE, VringState(index, 0)))
    out += drv.send(msg(Request.SET_VRING_ADDR, ring_addr(index, num)))
    if kick:
        out += drv.send(msg(Request.SET_VRING_KICK, VringFile(index, False), [fds.one()]))
    if call:
        out += drv.send(msg(Request.SET_VRING_CALL, VringFile(index, False), [fds.one()]))
    return out


def negotiate(drv: Driver, features=None, pf=None) -> None:
    p = drv.p
    drv.send(msg(Request.GET_FEATURES))
    drv.send(msg(Request.GET_PROTOCOL_FEATURES))
    drv.send(u64(Request.SET_PROTOCOL_FEATURES, p.spec.protocol_features if pf is None else pf))
    drv.send(msg(Request.SET_OWNER))
    drv.send(u64(Request.SET_FEATURES,
                 (p.spec.features & ~bit(F.VHOST_LOG_ALL)) if features is None else features))
