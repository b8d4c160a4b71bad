"""A vhost-user *front-end* in Python: it plays QEMU's part for tests.

It connects to a back-end's socket (or listens for a client-mode back-end),
negotiates, shares guest memory made with ``memfd_create``, sets up split
rings with real kick/call eventfds, and moves virtio-net frames:

    fe = Frontend.connect("/run/vfe/vm1.sock")
    fe.start(queue_pairs=1, queue_size=256)
    fe.post_rx_buffers(0, 64)
    fe.send_frame(0, frame)                 # queue pair 0 -> TX ring 1
    frames = fe.recv_frames(0, timeout=2)   # queue pair 0 -> RX ring 0
    base = fe.get_vring_base(1)
    fe.close()

``start()`` sends the messages in the order QEMU 7.2 does for a vhost-user
net device.  Every request also has a method of its own (``set_vring_num``
...), and ``send_message()`` sends anything at all, for adversarial tests.

Net helpers take a *queue pair* number: pair ``k`` is RX ring ``2k`` and TX
ring ``2k+1``.  Protocol helpers take ring indices.

Replies are checked the way QEMU checks them: flags exactly 0x5, request id
equal to the request's, and a non-zero REPLY_ACK raises ``NackError``.
"""
from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import select
import struct
import time
from dataclasses import dataclass, field
from typing import Iterable

from vfe.vhost.messages import (
    MEM_TABLE_MAX_REGIONS,
    NEED_REPLY,
    REPLY_FLAGS,
    VERSION,
    Config,
    Inflight,
    Log,
    MemoryRegion,
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
from vfe.vhost.transport import Connection, Listener, close_fds
from vfe.vhost.transport import connect as _connect
from vfe.vhost.transport import listen as _listen
from vfe.virtio.constants import F, Status, bit, net_hdr_len

from .ring import DriverRing, RingLayout, split_ring_layout

PAGE = 4096
MiB = 1 << 20

#: Protocol features the front-end asks for by default (QEMU 7.2 net asks
#: for all it knows; these are the ones this front-end implements).
DEFAULT_PROTOCOL_FEATURES = (
    bit(ProtocolFeature.MQ) | bit(ProtocolFeature.LOG_SHMFD) | bit(ProtocolFeature.RARP)
    | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.MTU) | bit(ProtocolFeature.CONFIG)
    | bit(ProtocolFeature.RESET_DEVICE) | bit(ProtocolFeature.CONFIGURE_MEM_SLOTS)
    | bit(ProtocolFeature.STATUS) | bit(ProtocolFeature.INFLIGHT_SHMFD)
)
#: Virtio features never acked by default (split rings only, no IOMMU, and
#: LOG_ALL only while migrating).
NEVER_ACK = bit(F.VHOST_LOG_ALL) | bit(F.RING_PACKED) | bit(F.ACCESS_PLATFORM) | bit(F.IN_ORDER)

#: Requests QEMU 7.2 sends with NEED_REPLY when REPLY_ACK is negotiated
#: (SET_FEATURES and SET_VRING_ADDR also, while logging; see their methods).
QEMU_NEED_REPLY = {
    Request.SET_MEM_TABLE, Request.ADD_MEM_REG, Request.REM_MEM_REG, Request.NET_SET_MTU,
    Request.SET_CONFIG, Request.SET_BACKEND_REQ_FD,
}

_MANDATORY_REPLY = {
    Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_VRING_BASE,
    Request.GET_QUEUE_NUM, Request.GET_CONFIG, Request.GET_MAX_MEM_SLOTS, Request.GET_STATUS,
    Request.GET_INFLIGHT_FD,
}


class NackError(Exception):
    """The back-end answered a REPLY_ACK with a non-zero value."""


def _address_of(mm: mmap.mmap) -> int:
    anchor = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


# ---------------------------------------------------------------------------
# Guest memory


@dataclass
class RamRegion:
    gpa: int
    size: int
    uva: int               # our (the front-end's) address of the region's first byte
    mmap_offset: int       # offset of the region in its memfd
    fd: int
    view: memoryview = field(repr=False)    # exactly the region
    used: int = 0          # bump allocator

    def to_message(self) -> MemoryRegion:
        return MemoryRegion(self.gpa, self.size, self.uva, self.mmap_offset)


class GuestRam:
    """Guest RAM from memfd_create, split into regions.

    ``shared_fd=True`` keeps all regions in one memfd at increasing offsets
    (as QEMU does for RAM below and above 4 GiB), so ``mmap_offset`` is
    non-zero for every region but the first.  ``gpa_gap`` leaves holes
    between regions in guest-physical space.  ``seals`` (e.g.
    ``fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW``, what QEMU's
    memory-backend-memfd adds) seals the memfds once sized; without them a
    test may shrink the memory under the back-end (``fds``).
    """

    def __init__(self, size: int = 32 * MiB, regions: int = 1, *, shared_fd: bool = True,
                 gpa_base: int = 0, gpa_gap: int = 0, fd_offset: int = 0, seals: int = 0) -> None:
        if regions < 1 or size % (regions * PAGE):
            raise ValueError(f"{size} bytes do not split into {regions} page-multiple regions")
        self.region_size = size // regions
        self.regions: list[RamRegion] = []
        self._maps: list[mmap.mmap] = []
        self._fds: list[int] = []
        mfd_flags = os.MFD_ALLOW_SEALING if seals else 0
        try:
            if shared_fd:
                fd = os.memfd_create("vfe-guest-ram", os.MFD_CLOEXEC | mfd_flags)
                self._fds.append(fd)
                os.ftruncate(fd, fd_offset + size)
                self._seal(fd, seals)
                mm = mmap.mmap(fd, fd_offset + size, flags=mmap.MAP_SHARED)
                self._maps.append(mm)
                base = _address_of(mm)
                whole = memoryview(mm)
                for k in range(regions):
                    off = fd_offset + k * self.region_size
                    self.regions.append(RamRegion(
                        gpa=gpa_base + k * (self.region_size + gpa_gap), size=self.region_size,
                        uva=base + off, mmap_offset=off, fd=fd,
                        view=whole[off:off + self.region_size]))
                whole.release()
            else:
                for k in range(regions):
                    fd = os.memfd_create(f"vfe-guest-ram{k}", os.MFD_CLOEXEC | mfd_flags)
                    self._fds.append(fd)
                    os.ftruncate(fd, fd_offset + self.region_size)
                    self._seal(fd, seals)
                    mm = mmap.mmap(fd, fd_offset + self.region_size, flags=mmap.MAP_SHARED)
                    self._maps.append(mm)
                    self.regions.append(RamRegion(
                        gpa=gpa_base + k * (self.region_size + gpa_gap), size=self.region_size,
                        uva=_address_of(mm) + fd_offset, mmap_offset=fd_offset, fd=fd,
                        view=memoryview(mm)[fd_offset:fd_offset + self.region_size]))
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _seal(fd: int, seals: int) -> None:
        if seals:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)

    @property
    def fds(self) -> list[int]:
        """The memfds behind the regions (tests shrink or inspect them)."""
        return list(self._fds)

    def region_of(self, gpa: int) -> tuple[RamRegion, int]:
        for r in self.regions:
            if r.gpa <= gpa < r.gpa + r.size:
                return r, gpa - r.gpa
        raise ValueError(f"gpa {gpa:#x} is not guest RAM")

    def gpa_to_uva(self, gpa: int) -> int:
        r, off = self.region_of(gpa)
        return r.uva + off

    def alloc(self, size: int, align: int = 64) -> int:
        """Carve ``size`` bytes (never crossing a region); returns the gpa."""
        for r in self.regions:
            start = (r.used + align - 1) & ~(align - 1)
            if start + size <= r.size:
                r.used = start + size
                return r.gpa + start
        raise MemoryError(f"guest RAM exhausted ({size} bytes wanted)")

    def read(self, gpa: int, length: int) -> bytes:
        r, off = self.region_of(gpa)
        if off + length > r.size:
            raise ValueError("read crosses a region end")
        return bytes(r.view[off:off + length])

    def write(self, gpa: int, data: bytes) -> None:
        r, off = self.region_of(gpa)
        if off + len(data) > r.size:
            raise ValueError("write crosses a region end")
        r.view[off:off + len(data)] = data

    def close(self) -> None:
        for r in self.regions:
            r.view.release()
        self.regions = []
        for mm in self._maps:
            mm.close()
        self._maps = []
        close_fds(self._fds)
        self._fds = []


# ---------------------------------------------------------------------------
# Rings


@dataclass
class FrontRing:
    index: int
    size: int
    layout: RingLayout
    ring_gpa: int
    driver: DriverRing
    kick_fd: int
    call_fd: int
    buf_gpa: int            # buffer pool: ``size`` slots of ``buf_size`` bytes
    buf_size: int
    free_slots: list[int]
    base: int = 0           # SET_VRING_BASE at the next start (GET_VRING_BASE's answer)
    started: bool = True

    def slot_gpa(self, slot: int) -> int:
        return self.buf_gpa + slot * self.buf_size


class Frontend:
    """A vhost-user front-end over one Connection (see module docstring)."""

    def __init__(self, conn: Connection, timeout: float = 5.0, ack_all: bool = False) -> None:
        self.conn = conn
        self.timeout = timeout
        #: With REPLY_ACK negotiated, ask for an ack on every request that has
        #: no reply of its own (QEMU asks only for QEMU_NEED_REPLY).
        self.ack_all = ack_all
        self.backend_features = 0
        self.backend_protocol_features = 0
        self.features = 0               # acked (SET_FEATURES)
        self.protocol_features = 0      # set (SET_PROTOCOL_FEATURES)
        self.queue_num: int | None = None
        self.max_mem_slots: int | None = None
        self.memory: GuestRam | None = None
        self.rings: dict[int, FrontRing] = {}
        self._call_fds: dict[int, int] = {}
        self._eventfds: list[int] = []
        self._log_fd = -1
        #: The inflight region (GET_INFLIGHT_FD), kept across reconnects as
        #: QEMU keeps it: (description, fd, our shared mapping).
        self.inflight: Inflight | None = None
        self.inflight_fd = -1
        self.inflight_map: mmap.mmap | None = None
        self.sent: list[tuple[int, int, int, int]] = []   # (request, flags, size, nfds)
        self._closed = False

    # -- connecting ------------------------------------------------------------

    @classmethod
    def connect(cls, path: str, timeout: float = 5.0) -> "Frontend":
        """Connect to a back-end that listens on ``path`` (waiting for it to appear)."""
        conn = _connect(path, retry_interval=0.05, timeout=timeout, blocking=True)
        return cls(conn, timeout)

    def reconnect(self, path: str, timeout: float = 5.0) -> None:
        """The back-end went away (a crash): connect to its successor on
        ``path`` as QEMU's ``reconnect=`` does.  Guest memory, rings, call
        and kick fds and the inflight region stay; negotiation starts over
        (call ``start`` again); every ring restarts from the guest's
        used->idx, which is where QEMU 7.2 puts last_avail_idx when
        GET_VRING_BASE cannot reach the back-end."""
        self.conn.close()
        self.conn = _connect(path, retry_interval=0.05, timeout=timeout, blocking=True)
        self.backend_features = self.backend_protocol_features = 0
        self.features = self.protocol_features = 0
        for ring in self.rings.values():
            ring.base = ring.driver.used_idx()
            ring.started = False

    @staticmethod
    def listen(path: str) -> Listener:
        """Listen on ``path`` for a client-mode back-end; then ``Frontend.accept``."""
        return _listen(path)

    @classmethod
    def accept(cls, listener: Listener, timeout: float = 5.0) -> "Frontend":
        conn = listener.accept(timeout=timeout, blocking=True)
        if conn is None:
            raise TimeoutError(f"no back-end connected to {listener.path}")
        return cls(conn, timeout)

    # -- raw messages ------------------------------------------------------------

    def send_message(self, request: int, payload: bytes = b"", fds: Iterable[int] = (),
                     need_reply: bool = False, *, flags: int | None = None,
                     expect_reply: bool | None = None, keep_fds: bool = False) -> Message | None:
        """Send any message.  Waits for and returns the reply when one is due
        (mandatory for the request, or ``need_reply``), else returns None.
        ``flags`` overrides the header flags entirely (adversarial tests)."""
        fds = list(fds)
        if flags is None:
            flags = VERSION | (NEED_REPLY if need_reply else 0)
        self.conn.send_message(request, payload, fds, flags)
        self.sent.append((int(request), flags, len(payload), len(fds)))
        if expect_reply is None:
            expect_reply = (need_reply or request in _MANDATORY_REPLY
                            or (request == Request.SET_LOG_BASE
                                and self.has_protocol_feature(ProtocolFeature.LOG_SHMFD)))
        if not expect_reply:
            return None
        return self.recv_reply(request, keep_fds=keep_fds)

    def recv_reply(self, request: int, timeout: float | None = None,
                   keep_fds: bool = False) -> Message:
        """The next reply; its fds are closed unless ``keep_fds`` (then the caller's)."""
        msg = self.conn.recv_message(self.timeout if timeout is None else timeout)
        if not keep_fds:
            close_fds(msg.fds)
        if msg.flags != REPLY_FLAGS:
            raise ProtocolError(f"reply flags {msg.flags:#x}, QEMU accepts only {REPLY_FLAGS:#x}")
        if msg.request != request:
            raise ProtocolError(f"reply to {msg.request} while waiting for {int(request)}")
        return msg

    def _request(self, request: Request, payload: bytes = b"", fds: Iterable[int] = (),
                 ack: bool | None = None) -> Message | None:
        """Send with NEED_REPLY where QEMU would (or ``ack``, or ``ack_all``); check the ack."""
        if ack is None:
            ack = (self.has_protocol_feature(ProtocolFeature.REPLY_ACK)
                   and request not in _MANDATORY_REPLY
                   and (self.ack_all or request in QEMU_NEED_REPLY))
        reply = self.send_message(request, payload, fds, need_reply=ack)
        if ack and request not in _MANDATORY_REPLY and reply is not None:
            value = U64.decode(reply.payload).value if len(reply.payload) == 8 else -1
            if value != 0:
                raise NackError(f"{request.name}: back-end answered {value}")
        return reply

    def has_protocol_feature(self, feature: int) -> bool:
        return bool(self.protocol_features >> int(feature) & 1)

    # -- one method per request ---------------------------------------------------

    def get_features(self) -> int:
        reply = self.send_message(Request.GET_FEATURES)
        assert reply is not None
        self.backend_features = U64.decode(reply.payload).value
        return self.backend_features

    def set_features(self, features: int) -> None:
        self.features = features
        self._request(Request.SET_FEATURES, U64(features).encode(),
                      ack=self.has_protocol_feature(ProtocolFeature.REPLY_ACK)
                      and (self.ack_all or bool(features & bit(F.VHOST_LOG_ALL))))

    def get_protocol_features(self) -> int:
        reply = self.send_message(Request.GET_PROTOCOL_FEATURES)
        assert reply is not None
        self.backend_protocol_features = U64.decode(reply.payload).value
        return self.backend_protocol_features

    def set_protocol_features(self, features: int) -> None:
        self.send_message(Request.SET_PROTOCOL_FEATURES, U64(features).encode())
        self.protocol_features = features

    def set_owner(self) -> None:
        self.send_message(Request.SET_OWNER)

    def reset_owner(self) -> None:
        self.send_message(Request.RESET_OWNER)

    def reset_device(self) -> None:
        self.send_message(Request.RESET_DEVICE)

    def get_queue_num(self) -> int:
        reply = self.send_message(Request.GET_QUEUE_NUM)
        assert reply is not None
        self.queue_num = U64.decode(reply.payload).value
        return self.queue_num

    def get_max_mem_slots(self) -> int:
        reply = self.send_message(Request.GET_MAX_MEM_SLOTS)
        assert reply is not None
        self.max_mem_slots = U64.decode(reply.payload).value
        return self.max_mem_slots

    def set_mem_table(self, regions: list[RamRegion]) -> None:
        table = MemTable(tuple(r.to_message() for r in regions))
        self._request(Request.SET_MEM_TABLE, table.encode(), [r.fd for r in regions])

    def add_mem_reg(self, region: RamRegion) -> None:
        self._request(Request.ADD_MEM_REG, SingleMemRegion(region.to_message()).encode(), [region.fd])

    def rem_mem_reg(self, region: RamRegion) -> None:
        self._request(Request.REM_MEM_REG, SingleMemRegion(region.to_message()).encode())

    def set_vring_num(self, index: int, num: int) -> None:
        self._request(Request.SET_VRING_NUM, VringState(index, num).encode())

    def set_vring_base(self, index: int, base: int) -> None:
        self._request(Request.SET_VRING_BASE, VringState(index, base).encode())

    def set_vring_addr(self, index: int, desc_uva: int, used_uva: int, avail_uva: int,
                       log_guest_addr: int = 0, log: bool = False) -> None:
        addr = VringAddr(index, 1 if log else 0, desc_uva, used_uva, avail_uva, log_guest_addr)
        self._request(Request.SET_VRING_ADDR, addr.encode(),
                      ack=self.has_protocol_feature(ProtocolFeature.REPLY_ACK)
                      and (self.ack_all or log))

    def get_vring_base(self, index: int) -> int:
        """GET_VRING_BASE: stops ring ``index`` and returns its last avail index."""
        reply = self.send_message(Request.GET_VRING_BASE, VringState(index, 0).encode())
        assert reply is not None
        state = VringState.decode(reply.payload)
        if state.index != index:
            raise ProtocolError(f"GET_VRING_BASE reply for ring {state.index}, asked {index}")
        if index in self.rings:
            self.rings[index].started = False
            self.rings[index].base = state.num
        return state.num

    def _vring_fd(self, request: Request, index: int, fd: int | None) -> None:
        payload = VringFile(index, fd is None).encode()
        self._request(request, payload, [] if fd is None else [fd])

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self._vring_fd(Request.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._vring_fd(Request.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self._vring_fd(Request.SET_VRING_ERR, index, fd)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self._request(Request.SET_VRING_ENABLE, VringState(index, int(enable)).encode())

    def send_rarp(self, mac: bytes) -> None:
        self._request(Request.SEND_RARP, bytes(mac).ljust(8, b"\0"))

    def net_set_mtu(self, mtu: int) -> None:
        self._request(Request.NET_SET_MTU, U64(mtu).encode())

    def get_config(self, offset: int, size: int) -> bytes:
        """GET_CONFIG; returns the config bytes (b"" if the back-end refused)."""
        reply = self.send_message(Request.GET_CONFIG, Config(offset, size, 0, bytes(size)).encode())
        assert reply is not None
        if not reply.payload:
            return b""
        return Config.decode(reply.payload).payload

    def set_config(self, offset: int, data: bytes, flags: int = 0) -> None:
        self._request(Request.SET_CONFIG, Config(offset, len(data), flags, bytes(data)).encode())

    def set_status(self, status: int) -> None:
        self._request(Request.SET_STATUS, U64(status).encode())

    def get_status(self) -> int:
        reply = self.send_message(Request.GET_STATUS)
        assert reply is not None
        return U64.decode(reply.payload).value

    def add_status(self, status: int) -> None:
        """What QEMU 7.2 does: GET_STATUS, then SET_STATUS with the bits ORed in."""
        current = self.get_status()
        if current & status != status:
            self.set_status(current | status)

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[Inflight, int]:
        """GET_INFLIGHT_FD: (the back-end's description, the region's fd -- ours to close)."""
        reply = self.send_message(Request.GET_INFLIGHT_FD,
                                  Inflight(0, 0, num_queues, queue_size).encode(), keep_fds=True)
        assert reply is not None
        info = Inflight.decode(reply.payload)
        if len(reply.fds) != 1:
            close_fds(reply.fds)
            raise ProtocolError(f"GET_INFLIGHT_FD reply carries {len(reply.fds)} fds")
        return info, reply.fds[0]

    def set_inflight_fd(self, info: Inflight, fd: int) -> None:
        self._request(Request.SET_INFLIGHT_FD, info.encode(), [fd])

    def setup_inflight(self, num_queues: int, queue_size: int) -> None:
        """What QEMU's vhost-user-blk does at each start: get a region once
        (it keeps it, also across reconnects), then hand it over."""
        if self.inflight is None:
            info, fd = self.get_inflight_fd(num_queues, queue_size)
            self.inflight, self.inflight_fd = info, fd
            self.inflight_map = mmap.mmap(fd, info.mmap_offset + info.mmap_size,
                                          flags=mmap.MAP_SHARED)
        self.set_inflight_fd(self.inflight, self.inflight_fd)

    def adopt_inflight(self, other: "Frontend") -> None:
        """Take over another front-end's region (a reconnect: QEMU keeps it)."""
        self.inflight, self.inflight_fd, self.inflight_map = (
            other.inflight, other.inflight_fd, other.inflight_map)
        other.inflight, other.inflight_fd, other.inflight_map = None, -1, None

    def set_log_base(self, fd: int, size: int, offset: int = 0) -> None:
        self.send_message(Request.SET_LOG_BASE, Log(size, offset).encode(), [fd])

    # -- the QEMU sequence ---------------------------------------------------------

    def negotiate(self, protocol_features: int | None = None) -> None:
        """vhost_user_backend_init + vhost_dev_init, as QEMU 7.2 runs them."""
        self.get_features()
        if self.backend_features & bit(F.VHOST_USER_PROTOCOL_FEATURES):
            offered = self.get_protocol_features()
            wanted = DEFAULT_PROTOCOL_FEATURES if protocol_features is None else protocol_features
            self.set_protocol_features(offered & wanted)
            if self.has_protocol_feature(ProtocolFeature.MQ):
                self.get_queue_num()
            if self.has_protocol_feature(ProtocolFeature.CONFIGURE_MEM_SLOTS):
                self.get_max_mem_slots()
        self.set_owner()
        self.get_features()

    def start(self, queue_pairs: int = 1, queue_size: int = 256, *, rings: int | None = None,
              mem_size: int = 32 * MiB, regions: int = 1, shared_fd: bool = True,
              gpa_gap: int = 0, use_add_mem_reg: bool | None = None, features: int | None = None,
              protocol_features: int | None = None, buf_size: int = 2048,
              enable: bool = True, start_idx: int = 0, used_align: int = 4,
              call_after_kick: bool = False, sync: bool = True,
              inflight: bool | None = None) -> None:
        """Bring rings up the way QEMU 7.2 starts a vhost-user net device.

        ``rings`` defaults to ``2 * queue_pairs``.  ``features`` are the
        virtio features wanted (acked: offered & wanted); by default all the
        offered ones except ``NEVER_ACK``.  Memory goes as one ADD_MEM_REG
        per region when CONFIGURE_MEM_SLOTS is negotiated (as QEMU 7.2
        does; needed for more than 8 regions), else as SET_MEM_TABLE;
        ``use_add_mem_reg`` forces either.  Call fds are sent before the
        rings start (QEMU's guest notifiers); ``call_after_kick`` sends them
        again after each kick (devices without notifier masking).  With ``sync`` it ends
        with a GET_FEATURES round trip, so the back-end has handled
        everything (rings enabled) when ``start`` returns.  ``inflight``
        (default: when INFLIGHT_SHMFD is negotiated, as QEMU's vhost-user-blk
        does) gets/sets the inflight region before the features.
        """
        nrings = 2 * queue_pairs if rings is None else rings
        if not self.backend_features:
            self.negotiate(protocol_features)
        if self.memory is None:
            self.memory = GuestRam(mem_size, regions, shared_fd=shared_fd, gpa_gap=gpa_gap)
        # vhost_virtqueue_init, then set_guest_notifiers: a call fd per ring
        # before anything else of the start.
        for i in range(nrings):
            if i not in self._call_fds:
                self._call_fds[i] = self._eventfd()
            self.set_vring_call(i, self._call_fds[i])
        if inflight is None:
            inflight = self.has_protocol_feature(ProtocolFeature.INFLIGHT_SHMFD)
        if inflight:
            self.setup_inflight(nrings, queue_size)
        wanted = (self.backend_features & ~NEVER_ACK) if features is None else features
        self.set_features(self.backend_features & wanted)
        if self.has_protocol_feature(ProtocolFeature.STATUS):
            self.add_status(Status.FEATURES_OK)
        self._send_memory(use_add_mem_reg)
        for i in range(nrings):
            self.setup_ring(i, queue_size, buf_size=buf_size, start_idx=start_idx,
                            used_align=used_align, call=call_after_kick)
        if self.has_protocol_feature(ProtocolFeature.STATUS):
            self.add_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.DRIVER_OK)
        if self.features & bit(F.VHOST_USER_PROTOCOL_FEATURES):
            for i in range(nrings):
                self.set_vring_enable(i, enable)
        if sync:
            self.sync()

    def sync(self) -> None:
        """A round trip (GET_FEATURES): every message sent before has been
        handled by the back-end when this returns.  (QEMU has no such step;
        tests need it because SET_VRING_ENABLE has no reply.)"""
        self.send_message(Request.GET_FEATURES)

    def _send_memory(self, use_add_mem_reg: bool | None) -> None:
        assert self.memory is not None
        regions = self.memory.regions
        slots = self.has_protocol_feature(ProtocolFeature.CONFIGURE_MEM_SLOTS)
        if use_add_mem_reg is None:
            use_add_mem_reg = slots          # what QEMU 7.2 does

        if use_add_mem_reg:
            if not slots:
                raise ValueError("ADD_MEM_REG needs CONFIGURE_MEM_SLOTS")
            for r in regions:
                self.add_mem_reg(r)
        else:
            if len(regions) > MEM_TABLE_MAX_REGIONS:
                raise ValueError(f"{len(regions)} regions need CONFIGURE_MEM_SLOTS")
            self.set_mem_table(regions)

    def setup_ring(self, index: int, size: int, *, buf_size: int = 2048, start_idx: int = 0,
                   used_align: int = 4, kick: bool = True, call: bool = True) -> FrontRing:
        """vhost_virtqueue_start: NUM, BASE, ADDR, KICK, CALL for one ring.

        A ring set up before (and stopped with ``get_vring_base``) keeps its
        memory and the guest's state; like QEMU, SET_VRING_BASE then carries
        the index the back-end returned from GET_VRING_BASE.
        """
        assert self.memory is not None
        ring = self.rings.get(index)
        event_idx = bool(self.features & bit(F.RING_EVENT_IDX))
        if ring is None or ring.size != size:
            if ring is not None:
                ring.driver.release()
            layout = split_ring_layout(size, used_align)
            max_indirect = 16
            # indirect tables start 16-byte aligned, as a driver's kmalloc'd ones do
            indirect_off = (layout.total + 15) & ~15
            area = indirect_off + size * max_indirect * 16
            ring_gpa = self.memory.alloc(area, align=PAGE)
            buf_gpa = self.memory.alloc(size * buf_size, align=PAGE)
            region, off = self.memory.region_of(ring_gpa)
            driver = DriverRing(region.view[off:off + area], size, layout.desc, layout.avail,
                                layout.used, event_idx=event_idx, gpa_base=ring_gpa,
                                indirect_off=indirect_off, max_indirect=max_indirect,
                                start_idx=start_idx)
            ring = FrontRing(index, size, layout, ring_gpa, driver, -1, -1, buf_gpa, buf_size,
                             list(range(size - 1, -1, -1)), base=start_idx & 0xFFFF)
            self.rings[index] = ring
        if ring.kick_fd < 0:
            ring.kick_fd = self._eventfd()
        if index not in self._call_fds:
            self._call_fds[index] = self._eventfd()
        ring.call_fd = self._call_fds[index]
        self.set_vring_num(index, size)
        self.set_vring_base(index, ring.base)
        uva = self.memory.gpa_to_uva
        self.set_vring_addr(index, uva(ring.ring_gpa + ring.layout.desc),
                            uva(ring.ring_gpa + ring.layout.used),
                            uva(ring.ring_gpa + ring.layout.avail))
        if kick:
            self.set_vring_kick(index, ring.kick_fd)
        if call:
            self.set_vring_call(index, ring.call_fd)
        ring.started = True
        return ring

    def stop(self) -> dict[int, int]:
        """vhost_dev_stop as QEMU 7.2 does it: SET_STATUS 0, then
        GET_VRING_BASE for every started ring.  Returns {ring: base}."""
        if self.has_protocol_feature(ProtocolFeature.STATUS):
            self.set_status(0)
        return {i: self.get_vring_base(i) for i, r in sorted(self.rings.items()) if r.started}

    def _eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._eventfds.append(fd)
        return fd

    # -- data path (virtio-net) ----------------------------------------------------

    @property
    def net_hdr_len(self) -> int:
        return net_hdr_len(self.features)

    def kick(self, index: int) -> None:
        os.eventfd_write(self.rings[index].kick_fd, 1)

    def _maybe_kick(self, ring: FrontRing) -> None:
        if ring.driver.kick_needed():
            os.eventfd_write(ring.kick_fd, 1)

    def reclaim_tx(self, queue: int) -> int:
        """Take back TX buffers the back-end has consumed; returns how many."""
        ring = self.rings[2 * queue + 1]
        done = ring.driver.get_used()
        for u in done:
            ring.free_slots.extend(u.token)
        return len(done)

    def send_frame(self, queue: int, frame: bytes, *, header: bytes | None = None,
                   split_header: bool = False, indirect: bool = False, kick: bool = True) -> int:
        """Queue one frame on queue pair ``queue``'s TX ring (virtio-net header
        first; zeros unless ``header``).  A frame bigger than a buffer slot
        becomes a chain of slots.  Returns the chain's head."""
        ring = self.rings[2 * queue + 1]
        self.reclaim_tx(queue)
        hdr = bytes(self.net_hdr_len) if header is None else bytes(header)
        pieces: list[bytes] = []
        if split_header:
            pieces.append(hdr)
            data = bytes(frame)
        else:
            data = hdr + bytes(frame)
        pieces += [data[i:i + ring.buf_size] for i in range(0, len(data), ring.buf_size)] or [b""]
        if len(pieces) > len(ring.free_slots):
            raise BlockingIOError(f"TX ring {ring.index}: no free buffers")
        slots = [ring.free_slots.pop() for _ in pieces]
        bufs = []
        for slot, piece in zip(slots, pieces):
            gpa = ring.slot_gpa(slot)
            self.memory.write(gpa, piece)  # type: ignore[union-attr]
            bufs.append((gpa, len(piece), False))
        try:
            head = ring.driver.add_chain(bufs, indirect=indirect, token=slots)
        except Exception:
            ring.free_slots.extend(slots)
            raise
        if kick:
            self._maybe_kick(ring)
        return head

    def wait_tx_done(self, queue: int, timeout: float | None = None) -> bool:
        """Wait until the back-end consumed every TX chain of pair ``queue``."""
        ring = self.rings[2 * queue + 1]
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            self.reclaim_tx(queue)
            if ring.driver.outstanding == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            self._wait_call(ring, min(0.05, max(0.0, deadline - time.monotonic())))

    def post_rx_buffers(self, queue: int, n: int | None = None, size: int | None = None,
                        kick: bool = True) -> int:
        """Give ``n`` (default: all free) device-writable buffers of ``size``
        bytes (default: the slot size) to pair ``queue``'s RX ring."""
        ring = self.rings[2 * queue]
        size = ring.buf_size if size is None else size
        if size > ring.buf_size:
            raise ValueError(f"RX buffer {size} > slot size {ring.buf_size}")
        n = len(ring.free_slots) if n is None else min(n, len(ring.free_slots))
        for _ in range(n):
            slot = ring.free_slots.pop()
            ring.driver.add_chain([(ring.slot_gpa(slot), size, True)], token=(slot, size),
                                  publish=False)
        ring.driver.publish()
        if kick and n:
            self._maybe_kick(ring)
        return n

    def _wait_call(self, ring: FrontRing, timeout: float) -> None:
        ready, _, _ = select.select([ring.call_fd], [], [], timeout)
        if ready:
            try:
                os.eventfd_read(ring.call_fd)
            except BlockingIOError:
                pass

    def recv_frames(self, queue: int, timeout: float = 1.0, count: int | None = None, *,
                    with_header: bool = False, repost: bool = True) -> list:
        """Frames the back-end delivered on pair ``queue``'s RX ring.

        Waits (call eventfd, and polling used->idx) until at least one frame
        (or ``count`` frames) arrived or ``timeout`` passed.  Mergeable
        buffers (num_buffers > 1) are joined.  Returns frames without the
        virtio-net header, or ``(header, frame)`` pairs with ``with_header``.
        Consumed buffers are posted again unless ``repost`` is False.
        """
        ring = self.rings[2 * queue]
        hdr_len = self.net_hdr_len
        mrg = bool(self.features & bit(F.NET_MRG_RXBUF))
        want = 1 if count is None else count
        frames: list = []
        pending: list[bytes] = []
        remaining = 0
        deadline = time.monotonic() + timeout
        while True:
            consumed = []
            for used in ring.driver.get_used():
                slot, size = used.token
                consumed.append((slot, size))
                if used.length > size:
                    raise ProtocolError(f"RX used length {used.length} > buffer {size}")
                data = self.memory.read(ring.slot_gpa(slot), used.length)  # type: ignore[union-attr]
                if remaining == 0:
                    pending = [data]
                    nbufs = struct.unpack_from("<H", data, 10)[0] if mrg and len(data) >= 12 else 1
                    remaining = max(nbufs, 1) - 1
                else:
                    pending.append(data)
                    remaining -= 1
                if remaining == 0:
                    whole = b"".join(pending)
                    hdr, frame = whole[:hdr_len], whole[hdr_len:]
                    frames.append((hdr, frame) if with_header else frame)
            if consumed and repost:
                for slot, size in consumed:
                    ring.driver.add_chain([(ring.slot_gpa(slot), size, True)], token=(slot, size),
                                          publish=False)
                ring.driver.publish()
                self._maybe_kick(ring)
            else:
                ring.free_slots.extend(slot for slot, _ in consumed)
            if (len(frames) >= want and remaining == 0) or time.monotonic() >= deadline:
                return frames
            ring.driver.enable_interrupts()
            if ring.driver.has_used():
                continue
            self._wait_call(ring, min(0.05, max(0.0, deadline - time.monotonic())))

    # -- lifetime --------------------------------------------------------------

    def close(self) -> None:
        """Close the socket (the back-end sees the front-end go away), then
        free rings, memory and eventfds."""
        if self._closed:
            return
        self._closed = True
        self.conn.close()
        for ring in self.rings.values():
            ring.driver.release()
        self.rings = {}
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        close_fds(self._eventfds)
        self._eventfds = []
        if self.inflight_map is not None:
            self.inflight_map.close()
            self.inflight_map = None
        if self.inflight_fd >= 0:
            close_fds([self.inflight_fd])
            self.inflight_fd = -1

    def __enter__(self) -> "Frontend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
