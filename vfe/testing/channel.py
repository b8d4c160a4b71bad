"""The front-end's end of a vhost-user connection: one method per request
(``set_vring_num`` ...), ``send_message()`` for anything at all, and
``negotiate()`` as QEMU 7.2 runs it.  Replies are checked the way QEMU
checks them: flags exactly 0x5, request id equal to the request's, and a
non-zero REPLY_ACK raises ``NackError``.  REPLY_ACK is asked for where
QEMU asks (``QEMU_NEED_REPLY``), or on every request with ``ack_all``.

Frontend (frontend.py) adds guest memory, rings and the net data path.
"""
from __future__ import annotations

from typing import Iterable, Self

from vfe.vhost.messages import (
    NEED_REPLY,
    REPLY_FLAGS,
    VERSION,
    Config,
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
from vfe.vhost.transport import Connection, Listener, close_fds
from vfe.vhost.transport import connect as _connect
from vfe.vhost.transport import listen as _listen
from vfe.virtio.constants import F, bit

from .guest_ram import RamRegion

#: Protocol features the front-end asks for by default (QEMU 7.2 net asks
#: for all it knows; these are the ones this front-end implements).
DEFAULT_PROTOCOL_FEATURES = (
    bit(ProtocolFeature.MQ) | bit(ProtocolFeature.LOG_SHMFD) | bit(ProtocolFeature.RARP)
    | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.MTU) | bit(ProtocolFeature.CONFIG)
    | bit(ProtocolFeature.RESET_DEVICE) | bit(ProtocolFeature.CONFIGURE_MEM_SLOTS)
    | bit(ProtocolFeature.STATUS) | bit(ProtocolFeature.INFLIGHT_SHMFD)
)

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


class FrontendChannel:
    """Requests and replies over one Connection (see module docstring)."""

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
        self.sent: list[tuple[int, int, int, int]] = []   # (request, flags, size, nfds)

    # -- connecting ------------------------------------------------------------

    @classmethod
    def connect(cls, path: str, timeout: float = 5.0) -> Self:
        """Connect to a back-end that listens on ``path`` (waiting for it to appear)."""
        conn = _connect(path, retry_interval=0.05, timeout=timeout, blocking=True)
        return cls(conn, timeout)

    def reconnect(self, path: str, timeout: float = 5.0) -> None:
        """The back-end went away (a crash): connect to its successor on
        ``path``; negotiation starts over."""
        self.conn.close()
        self.conn = _connect(path, retry_interval=0.05, timeout=timeout, blocking=True)
        self.backend_features = self.backend_protocol_features = 0
        self.features = self.protocol_features = 0

    @staticmethod
    def listen(path: str) -> Listener:
        """Listen on ``path`` for a client-mode back-end; then ``Frontend.accept``."""
        return _listen(path)

    @classmethod
    def accept(cls, listener: Listener, timeout: float = 5.0) -> Self:
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
        """GET_INFLIGHT_FD: (the back-end's description, the region's fd -- ours
        to close).  Size 0 without an fd is "no region" (QEMU 7.2 then runs
        without one): fd -1."""
        reply = self.send_message(Request.GET_INFLIGHT_FD,
                                  Inflight(0, 0, num_queues, queue_size).encode(), keep_fds=True)
        assert reply is not None
        info = Inflight.decode(reply.payload)
        if info.mmap_size == 0 and not reply.fds:
            return info, -1
        if len(reply.fds) != 1:
            close_fds(reply.fds)
            raise ProtocolError(f"GET_INFLIGHT_FD reply carries {len(reply.fds)} fds")
        return info, reply.fds[0]

    def set_inflight_fd(self, info: Inflight, fd: int) -> None:
        self._request(Request.SET_INFLIGHT_FD, info.encode(), [fd])

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

    def sync(self) -> None:
        """A round trip (GET_FEATURES): every message sent before has been
        handled by the back-end when this returns.  (QEMU has no such step;
        tests need it because SET_VRING_ENABLE has no reply.)"""
        self.send_message(Request.GET_FEATURES)

    def close(self) -> None:
        """Close the socket: the back-end sees the front-end go away."""
        self.conn.close()
