"""What the sans-I/O protocol asks its caller to do.

``BackendProtocol.receive(msg)`` returns a list of these; the caller (the
device adapter in vfe/devices/) executes them *in order*.  The protocol never
touches sockets, memory or the engine itself.

File descriptors: the protocol owns every fd it received for as long as it
holds it in its state.  Actions only *borrow* fd numbers; when the protocol no
longer needs an fd (replaced, ring stopped for good, reset, mapped memory) it
emits ``CloseFds`` after the actions that used it, and the caller closes them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from vfe.virtio.constants import MAX_QUEUE_SIZE


@dataclass(frozen=True)
class MemRegion:
    """One region of the front-end's memory as SET_MEM_TABLE/ADD_MEM_REG carry it."""

    gpa: int          # guest physical address of the region's start
    size: int         # bytes
    uva: int          # the front-end's (QEMU's) virtual address of the start
    mmap_offset: int  # offset of the region's start in the fd
    fd: int           # borrowed: see module docstring


@dataclass(frozen=True)
class VringConfig:
    """Everything the engine needs to run one ring (split or packed: the
    acked features say which, SetFeatures told the engine)."""

    index: int
    size: int
    desc_uva: int
    avail_uva: int
    used_uva: int
    log_guest_addr: int   # the used ring's guest-physical address (packed rings: unused, the
                          # engine logs the descriptor ring and the device event area)
    log_used: bool        # VHOST_VRING_F_LOG in SET_VRING_ADDR flags
    base: int             # next avail index to process (SET_VRING_BASE; packed: QEMU's
                          # 32-bit encoding, vfe/virtio/layouts.py PackedBase)
    kick_fd: int          # -1: no kick fd (poll only)
    call_fd: int          # -1: no interrupts
    enabled: bool


@dataclass(frozen=True)
class Reply:
    """Send a reply for ``request`` (header flags: version 1 | REPLY)."""

    request: int
    payload: bytes
    fds: tuple[int, ...] = ()


@dataclass(frozen=True)
class Ack:
    """REPLY_ACK: u64 0 on success.  The caller sends 1 instead if any action
    before it in the same batch raised."""

    request: int
    ok: bool = True


@dataclass(frozen=True)
class SetFeatures:
    features: int         # acked virtio feature bits, VHOST_F_LOG_ALL included


@dataclass(frozen=True)
class SetMemTable:
    regions: tuple[MemRegion, ...]   # replaces the whole table


@dataclass(frozen=True)
class AddMemRegion:
    region: MemRegion


@dataclass(frozen=True)
class RemoveMemRegion:
    region: MemRegion     # fd is -1: match by gpa/size/uva


@dataclass(frozen=True)
class StartRing:
    ring: VringConfig


@dataclass(frozen=True)
class StopRing:
    """Stop the ring; then call ``protocol.ring_stopped(index, last_avail_idx)``
    and execute the actions it returns (the GET_VRING_BASE reply)."""

    index: int


@dataclass(frozen=True)
class EnableRing:
    index: int
    enabled: bool


@dataclass(frozen=True)
class SetCallFd:
    index: int
    fd: int               # -1 to stop signalling


@dataclass(frozen=True)
class SetLogBase:
    fd: int
    size: int
    offset: int


@dataclass(frozen=True)
class GetInflight:
    """GET_INFLIGHT_FD: allocate a new inflight region for ``num_queues``
    rings of ``queue_size`` entries and reply with its description and fd
    (vfe/vhost/inflight.py; ``packed``: the packed layout)."""

    num_queues: int
    queue_size: int
    packed: bool = False


@dataclass(frozen=True)
class SetInflight:
    """SET_INFLIGHT_FD: map the front-end's inflight region (borrowed fd) and
    track the rings in it from their next start.  ``fd`` -1: drop the region.
    ``packed``: the region has the packed layout."""

    fd: int
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    packed: bool = False


@dataclass(frozen=True)
class SetStatus:
    status: int


@dataclass(frozen=True)
class SendRarp:
    mac: bytes            # 6 bytes


@dataclass(frozen=True)
class SetMtu:
    mtu: int


@dataclass(frozen=True)
class ResetDevice:
    """Stop every ring and forget negotiated state (RESET_OWNER/RESET_DEVICE,
    or the front-end went away)."""


@dataclass(frozen=True)
class CloseFds:
    fds: tuple[int, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class DeviceSpec:
    """What a device offers through vhost-user; given to BackendProtocol."""

    features: int                 # virtio feature bits offered (incl. PROTOCOL_FEATURES, LOG_ALL)
    protocol_features: int        # vhost-user protocol feature bits offered
    queue_num: int                # GET_QUEUE_NUM answer (net: queue pairs; blk: queues)
    max_queues: int               # highest vring index + 1 accepted
    max_queue_size: int = MAX_QUEUE_SIZE
    max_mem_slots: int = 32
    config: bytes = b""           # GET_CONFIG space (blk)
    # how to offer more queues, for the log when a front-end leaves right
    # after GET_QUEUE_NUM (QEMU's vhost-user-blk does when its num-queues is larger)
    queues_hint: str = ""
