"""vhost-user message vocabulary: request ids, flags, and payload layouts.

Names and numbers follow QEMU's docs/interop/vhost-user.rst ("front-end" /
"back-end" spelling).  All numbers are in the machine's native byte order
(little-endian on every host we run on); the layouts below use ``<`` so that
they are exact and padding-free.

Every payload type is a frozen dataclass deriving from ``Payload`` with:

- ``MIN_SIZE``/``MAX_SIZE``: the lengths it may have on the wire (a
  fixed-size type sets ``SIZE``, and both bounds are that);
- ``decode(data) -> instance``: exact-size parse, ``ProtocolError`` otherwise;
- ``encode() -> bytes``;
- ``is_valid() -> bool``: *syntax-only* checks (reserved bits, ranges that
  hold for every device).  Semantic checks (queue index against the device,
  overlap with other regions, ...) live in ``protocol.py``.

Pure data: no I/O here.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

# ---------------------------------------------------------------------------
# Errors


class ProtocolError(Exception):
    """The peer broke the vhost-user protocol.

    This is the only exception a peer can cause in vfe.vhost: anything else
    escaping from framing or protocol code is a bug in vfe.
    """


# ---------------------------------------------------------------------------
# Header


HEADER = struct.Struct("<III")          # request, flags, size
HEADER_SIZE = HEADER.size               # 12

VERSION = 0x1


# Header flags
VERSION_MASK = 0x3
REPLY = 0x4
NEED_REPLY = 0x8
#: Exactly what QEMU accepts on every reply (vhost_user_read_header).
REPLY_FLAGS = VERSION | REPLY


# ---------------------------------------------------------------------------
# Requests


class Request(IntEnum):
    """Front-end -> back-end requests (VHOST_USER_*)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    # vfe-private, between vfe-vhostd and the controller's endpoint (never
    # from QEMU): a relay hands over / takes back the front-end's socket
    VFE_RELAY_HELLO = 0x7F00
    VFE_RELAY_RESUME = 0x7F01


def request_name(request: int) -> str:
    """``"SET_VRING_KICK"`` for 12, ``"request 99"`` for unknown ids (for logs)."""
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"


class ProtocolFeature(IntEnum):
    """VHOST_USER_PROTOCOL_F_* bit numbers (not masks)."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


# The vhost-user bits of the virtio feature word (VHOST_USER_F_PROTOCOL_FEATURES,
# VHOST_F_LOG_ALL) are vfe.virtio.constants.F.VHOST_USER_PROTOCOL_FEATURES and
# F.VHOST_LOG_ALL.
#: SET_VRING_ADDR flags: VHOST_VRING_F_LOG.
VRING_F_LOG = 0x1
#: SET_VRING_KICK/CALL/ERR u64: vring index and "no fd" flag.
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 0x100
#: VHOST_MEMORY_BASELINE_NREGIONS: regions in one SET_MEM_TABLE.
MEM_TABLE_MAX_REGIONS = 8
#: VHOST_LOG_PAGE: one dirty-log bit covers this many bytes.
LOG_PAGE = 0x1000
#: Largest config space we read or write in one GET/SET_CONFIG (QEMU uses 256).
CONFIG_MAX_SIZE = 4096

_U64_MAX = (1 << 64) - 1


def _check_size(cls_name: str, data: bytes, size: int) -> None:
    if len(data) != size:
        raise ProtocolError(f"{cls_name}: payload is {len(data)} bytes, expected {size}")


def _end_fits(start: int, length: int) -> bool:
    """True if [start, start + length) does not wrap the 64-bit space."""
    return start + length <= _U64_MAX + 1


# ---------------------------------------------------------------------------
# Payloads


class Payload:
    """The base of every payload type: the dispatcher checks a message's
    length against ``MIN_SIZE``..``MAX_SIZE`` before it decodes it.  A
    fixed-size type sets ``SIZE`` instead, which gives both."""

    __slots__ = ()
    MIN_SIZE: ClassVar[int]
    MAX_SIZE: ClassVar[int]

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        size = cls.__dict__.get("SIZE")
        if size is not None:
            cls.MIN_SIZE = cls.MAX_SIZE = size


@dataclass(frozen=True, slots=True)
class U64(Payload):
    """A single 64-bit integer."""

    value: int

    _S: ClassVar[struct.Struct] = struct.Struct("<Q")
    SIZE: ClassVar[int] = 8

    @classmethod
    def decode(cls, data: bytes) -> "U64":
        _check_size("u64", data, cls.SIZE)
        return cls(*cls._S.unpack(data))

    def encode(self) -> bytes:
        return self._S.pack(self.value)

    def is_valid(self) -> bool:
        return 0 <= self.value <= _U64_MAX


@dataclass(frozen=True, slots=True)
class VringState(Payload):
    """struct vhost_vring_state: a 32-bit index and a 32-bit number."""

    index: int
    num: int

    _S: ClassVar[struct.Struct] = struct.Struct("<II")
    SIZE: ClassVar[int] = 8

    @classmethod
    def decode(cls, data: bytes) -> "VringState":
        _check_size("vring state", data, cls.SIZE)
        return cls(*cls._S.unpack(data))

    def encode(self) -> bytes:
        return self._S.pack(self.index, self.num)

    def is_valid(self) -> bool:
        return 0 <= self.index <= 0xFFFFFFFF and 0 <= self.num <= 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class VringFile(Payload):
    """The u64 of SET_VRING_KICK/CALL/ERR: index in bits 0-7, bit 8 = no fd."""

    index: int
    nofd: bool

    SIZE: ClassVar[int] = 8

    @classmethod
    def decode(cls, data: bytes) -> "VringFile":
        value = U64.decode(data).value
        if value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
            raise ProtocolError(f"vring file: reserved bits set in {value:#x}")
        return cls(value & VRING_IDX_MASK, bool(value & VRING_NOFD_MASK))

    def encode(self) -> bytes:
        return U64(self.value).encode()

    @property
    def value(self) -> int:
        return (self.index & VRING_IDX_MASK) | (VRING_NOFD_MASK if self.nofd else 0)

    def is_valid(self) -> bool:
        return 0 <= self.index <= VRING_IDX_MASK


@dataclass(frozen=True, slots=True)
class VringAddr(Payload):
    """struct vhost_vring_addr.  Ring addresses are the front-end's user
    addresses (``_uva``); ``log_guest_addr`` is guest-physical."""

    index: int
    flags: int
    desc_uva: int
    used_uva: int
    avail_uva: int
    log_guest_addr: int

    _S: ClassVar[struct.Struct] = struct.Struct("<IIQQQQ")
    SIZE: ClassVar[int] = 40

    @classmethod
    def decode(cls, data: bytes) -> "VringAddr":
        _check_size("vring address", data, cls.SIZE)
        return cls(*cls._S.unpack(data))

    def encode(self) -> bytes:
        return self._S.pack(self.index, self.flags, self.desc_uva, self.used_uva,
                            self.avail_uva, self.log_guest_addr)

    @property
    def log(self) -> bool:
        return bool(self.flags & VRING_F_LOG)

    def is_valid(self) -> bool:
        """Only VHOST_VRING_F_LOG may be set; areas are non-zero and aligned as
        the split ring requires (descriptors 16, available 2, used 4)."""
        return (
            self.flags & ~VRING_F_LOG == 0
            and self.desc_uva != 0 and self.desc_uva % 16 == 0
            and self.avail_uva != 0 and self.avail_uva % 2 == 0
            and self.used_uva != 0 and self.used_uva % 4 == 0
        )


@dataclass(frozen=True, slots=True)
class MemoryRegion(Payload):
    """One region: guest address, size, user address, mmap offset."""

    gpa: int
    size: int
    uva: int
    mmap_offset: int

    _S: ClassVar[struct.Struct] = struct.Struct("<QQQQ")
    SIZE: ClassVar[int] = 32

    @classmethod
    def decode(cls, data: bytes) -> "MemoryRegion":
        _check_size("memory region", data, cls.SIZE)
        return cls(*cls._S.unpack(data))

    def encode(self) -> bytes:
        return self._S.pack(self.gpa, self.size, self.uva, self.mmap_offset)

    def is_valid(self) -> bool:
        return (
            self.size > 0
            and _end_fits(self.gpa, self.size)
            and _end_fits(self.uva, self.size)
            and _end_fits(self.mmap_offset, self.size)
        )


@dataclass(frozen=True, slots=True)
class MemTable(Payload):
    """Memory regions description: u32 count, u32 padding, up to 8 regions.

    QEMU sends ``8 + n * 32`` bytes; some front-ends send the whole
    8-region array.  Both are accepted.
    """

    regions: tuple[MemoryRegion, ...]

    _HEAD: ClassVar[struct.Struct] = struct.Struct("<II")
    HEAD_SIZE: ClassVar[int] = 8
    MIN_SIZE: ClassVar[int] = 8
    MAX_SIZE: ClassVar[int] = 8 + MEM_TABLE_MAX_REGIONS * 32

    @classmethod
    def decode(cls, data: bytes) -> "MemTable":
        if len(data) < cls.HEAD_SIZE:
            raise ProtocolError(f"memory table: payload is {len(data)} bytes")
        count, _padding = cls._HEAD.unpack_from(data)
        if count > MEM_TABLE_MAX_REGIONS:
            raise ProtocolError(f"memory table: {count} regions (at most {MEM_TABLE_MAX_REGIONS})")
        exact = cls.HEAD_SIZE + count * MemoryRegion.SIZE
        if len(data) not in (exact, cls.MAX_SIZE):
            raise ProtocolError(
                f"memory table: payload is {len(data)} bytes for {count} regions "
                f"(expected {exact} or {cls.MAX_SIZE})")
        regions = tuple(
            MemoryRegion.decode(data[off:off + MemoryRegion.SIZE])
            for off in range(cls.HEAD_SIZE, exact, MemoryRegion.SIZE)
        )
        return cls(regions)

    def encode(self) -> bytes:
        return self._HEAD.pack(len(self.regions), 0) + b"".join(r.encode() for r in self.regions)

    def is_valid(self) -> bool:
        return (
            1 <= len(self.regions) <= MEM_TABLE_MAX_REGIONS
            and all(r.is_valid() for r in self.regions)
        )


@dataclass(frozen=True, slots=True)
class SingleMemRegion(Payload):
    """ADD_MEM_REG / REM_MEM_REG payload: u64 padding then one region."""

    region: MemoryRegion

    SIZE: ClassVar[int] = 8 + MemoryRegion.SIZE

    @classmethod
    def decode(cls, data: bytes) -> "SingleMemRegion":
        _check_size("single memory region", data, cls.SIZE)
        return cls(MemoryRegion.decode(data[8:]))

    def encode(self) -> bytes:
        return bytes(8) + self.region.encode()

    def is_valid(self) -> bool:
        return self.region.is_valid()


@dataclass(frozen=True, slots=True)
class Log(Payload):
    """Log description: mmap size and offset of the dirty log in its fd."""

    size: int
    offset: int

    _S: ClassVar[struct.Struct] = struct.Struct("<QQ")
    SIZE: ClassVar[int] = 16

    @classmethod
    def decode(cls, data: bytes) -> "Log":
        _check_size("log", data, cls.SIZE)
        return cls(*cls._S.unpack(data))

    def encode(self) -> bytes:
        return self._S.pack(self.size, self.offset)

    def is_valid(self) -> bool:
        # A signed 64-bit off_t must hold offset + size.
        return self.size > 0 and self.offset + self.size < (1 << 63)


@dataclass(frozen=True, slots=True)
class Inflight(Payload):
    """Inflight description (GET/SET_INFLIGHT_FD).  The C struct is 8-byte
    aligned, so QEMU sends 24 bytes: 20 of fields and 4 of tail padding."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int

    _S: ClassVar[struct.Struct] = struct.Struct("<QQHH4x")
    SIZE: ClassVar[int] = 24

    @classmethod
    def decode(cls, data: bytes) -> "Inflight":
        _check_size("inflight", data, cls.SIZE)
        return cls(*cls._S.unpack(data))

    def encode(self) -> bytes:
        return self._S.pack(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)

    def is_valid(self) -> bool:
        return self.num_queues > 0 and self.queue_size > 0 and self.mmap_offset + self.mmap_size < (1 << 63)


class ConfigFlag(IntEnum):
    """VhostUserConfig flags."""

    WRITABLE = 0       # front-end message for a writable field
    MIGRATION = 1      # front-end message for live migration


@dataclass(frozen=True, slots=True)
class Config(Payload):
    """Virtio device config space: offset, size, flags, then ``size`` bytes."""

    offset: int
    size: int
    flags: int
    payload: bytes

    _HEAD: ClassVar[struct.Struct] = struct.Struct("<III")
    HEAD_SIZE: ClassVar[int] = 12
    MIN_SIZE: ClassVar[int] = 12
    MAX_SIZE: ClassVar[int] = 12 + CONFIG_MAX_SIZE

    @classmethod
    def decode(cls, data: bytes) -> "Config":
        if not cls.MIN_SIZE <= len(data) <= cls.MAX_SIZE:
            raise ProtocolError(f"config: payload is {len(data)} bytes")
        offset, size, flags = cls._HEAD.unpack_from(data)
        payload = bytes(data[cls.HEAD_SIZE:])
        if size != len(payload):
            raise ProtocolError(f"config: size field {size} but {len(payload)} bytes follow")
        return cls(offset, size, flags, payload)

    def encode(self) -> bytes:
        return self._HEAD.pack(self.offset, self.size, self.flags) + bytes(self.payload)

    def is_valid(self) -> bool:
        return (
            self.size == len(self.payload)
            and 0 < self.size <= CONFIG_MAX_SIZE
            and self.flags in (ConfigFlag.WRITABLE, ConfigFlag.MIGRATION)
            and self.offset + self.size <= 0xFFFFFFFF
        )


@dataclass(frozen=True, slots=True)
class Empty(Payload):
    """No payload (GET_FEATURES, SET_OWNER, ...)."""

    SIZE: ClassVar[int] = 0

    @classmethod
    def decode(cls, data: bytes) -> "Empty":
        _check_size("empty", data, 0)
        return cls()

    def encode(self) -> bytes:
        return b""

    def is_valid(self) -> bool:
        return True


# ---------------------------------------------------------------------------
# A whole message


@dataclass(frozen=True, slots=True)
class Message:
    """One framed vhost-user message, with the fds that arrived with it.

    ``fds`` are owned by whoever holds the message: ``BackendProtocol.receive``
    takes ownership of them.
    """

    request: int
    flags: int
    payload: bytes = b""
    fds: tuple[int, ...] = ()

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & REPLY)

    @property
    def name(self) -> str:
        return request_name(self.request)

    def __repr__(self) -> str:  # short, for logs and test failures
        return (f"Message({self.name}, flags={self.flags:#x}, "
                f"payload={len(self.payload)}B, fds={list(self.fds)})")
