"""What each vhost-user request does: one handler per request, named after
it, and ``TABLE``, the row that says how the dispatcher (protocol.py)
checks a request before its handler runs.

A handler gets the device's offer (``DeviceSpec``), the connection's state
(vfe/vhost/protocol_state.py), the message and its decoded payload; it
validates everything before it changes the state (a failed message leaves
no trace), then returns the actions its caller executes.  It raises
``ProtocolError`` for a broken request and ``Refused`` for a well-formed one
we decline.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Callable

from vfe.virtio.constants import MAX_QUEUE_SIZE, VIRTIO_NET_MTU_MAX, VIRTIO_NET_MTU_MIN, F
from vfe.virtio.layouts import PackedBase

from .actions import (
    AddMemRegion,
    CloseFds,
    DeviceSpec,
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
    StopRing,
)
from .inflight import region_size as inflight_region_size
from .messages import (
    Config,
    Empty,
    Inflight,
    Log,
    MemTable,
    Message,
    Payload,
    ProtocolError,
    ProtocolFeature,
    Request,
    SingleMemRegion,
    U64,
    VringAddr,
    VringFile,
    VringState,
)
from .protocol_state import ConnectionState, RegionRecord
from .readiness import forget_kick, quiesce

log = logging.getLogger("vfe.vhost.protocol")

class Refused(Exception):
    """A well-formed request we decline (SET_CONFIG, an invalid MTU): Ack(ok=False)
    when REPLY_ACK is in effect, otherwise logged and ignored.  Never fatal."""


Handler = Callable[[DeviceSpec, ConnectionState, Message, Any], list]


@dataclass(frozen=True)
class Row:
    """How one request is checked and handled."""

    handler: Handler
    payload: type[Payload]              # messages.py payload class (sizes, decode, is_valid)
    fds: tuple[int, int] = (0, 0)       # (min, max) fds accepted
    protocol_feature: ProtocolFeature | None = None   # must be negotiated
    offered_feature: int | None = None  # virtio feature bit the device must offer
    queue_field: str | None = None      # payload attribute holding a ring index
    reply: bool = False                 # reply is mandatory: never an extra REPLY_ACK
    touches_rings: bool = False         # re-run readiness afterwards
    validate: bool = True               # run payload.is_valid() (False: handler decides)

    @property
    def size(self) -> tuple[int, int]:
        return (self.payload.MIN_SIZE, self.payload.MAX_SIZE)


# -- checks shared by handlers ----------------------------------------------------


def _overlaps(ranges: list[tuple[int, int]]) -> bool:
    ranges = sorted(ranges)
    return any(a_start + a_len > b_start
               for (a_start, a_len), (b_start, _b_len) in zip(ranges, ranges[1:]))


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _check_fd_matches(payload: VringFile, fds: tuple[int, ...]) -> int:
    if payload.nofd:
        if fds:
            raise ProtocolError("no-fd bit set but an fd was sent")
        return -1
    if len(fds) != 1:
        raise ProtocolError("no fd sent and the no-fd bit is clear")
    return fds[0]


def _check_new_regions(spec: DeviceSpec, regions: list[MemRegion]) -> None:
    if len(regions) > spec.max_mem_slots:
        raise ProtocolError(f"{len(regions)} memory regions (at most {spec.max_mem_slots})")
    if _overlaps([(r.gpa, r.size) for r in regions]):
        raise ProtocolError("memory regions overlap in guest physical space")
    if _overlaps([(r.uva, r.size) for r in regions]):
        raise ProtocolError("memory regions overlap in front-end address space")


def _check_inflight_shape(spec: DeviceSpec, p: Inflight) -> None:
    limit = min(spec.max_queue_size, MAX_QUEUE_SIZE)
    if not 1 <= p.num_queues <= spec.max_queues:
        raise ProtocolError(f"inflight region for {p.num_queues} queues "
                            f"(the device has {spec.max_queues})")
    if not _is_pow2(p.queue_size) or p.queue_size > limit:
        raise ProtocolError(f"inflight region for queues of {p.queue_size} entries "
                            f"(power of 2 up to {limit})")


def _check_packed_base(index: int, num: int, base: int) -> None:
    """A packed ring's base names slots of the ring (its index bits below
    the size: the engine reads and writes descriptors there)."""
    position = PackedBase.decode(base)
    if num and not position.fits(num):
        raise ProtocolError(f"ring {index}: packed base {base:#x} (avail {position.avail_idx}, "
                            f"used {position.used_idx}) outside a ring of {num}")


def _check_fits_inflight(index: int, num: int, p: Inflight | None) -> None:
    """A ring the inflight region tracks (index < its num_queues) must
    fit its queue regions: the engine writes one entry per head there."""
    if p is not None and index < p.num_queues and num > p.queue_size:
        raise ProtocolError(f"ring {index}: size {num} does not fit the inflight region "
                            f"(queues of {p.queue_size} entries)")


def _reset(s: ConnectionState) -> list:
    """RESET_OWNER / RESET_DEVICE: stop every ring, drop memory, log and
    negotiated virtio features; keep protocol features, ownership and the
    back-end channel (they belong to the connection)."""
    keep = {s.backend_req_fd} - {-1}
    close = tuple(sorted(s.owned_fds - keep))
    s.reset_device()
    actions: list = [ResetDevice()]
    if close:
        actions.append(CloseFds(close))
    return actions


# -- handlers: one per request, named after it --------------------------------------


def get_features(spec: DeviceSpec, s: ConnectionState, msg: Message, p: Empty) -> list:
    return [Reply(msg.request, U64(spec.features).encode())]


def set_features(spec: DeviceSpec, s: ConnectionState, msg: Message, p: U64) -> list:
    features = p.value
    extra = features & ~spec.features
    if extra:
        raise ProtocolError(f"acks features {extra:#x} that were not offered")
    changed = features ^ s.features
    if s.started_rings() and changed & ~(1 << F.VHOST_LOG_ALL):
        raise ProtocolError(f"features {changed:#x} changed while rings run")
    s.features = features
    s.features_set = True
    actions: list = [SetFeatures(features)]
    if s.inflight is not None and s.inflight_packed != s.packed:
        # The region's layout is the other one (a guest's firmware drove the
        # rings split, its OS acks RING_PACKED): it goes, and the front-end
        # gets a new one (QEMU frees its copy at the reset between them and
        # asks GET_INFLIGHT_FD after these features).  No ring runs: the
        # features could not have changed.
        log.info("RING_PACKED %s: the %s inflight region is dropped",
                 "acked" if s.packed else "no longer acked",
                 "packed" if s.inflight_packed else "split")
        s.inflight = None
        actions.append(SetInflight(-1, 0, 0, 0, 0))
    return actions


def set_owner(spec: DeviceSpec, s: ConnectionState, msg: Message, p: Empty) -> list:
    s.session_owned = True          # QEMU sends it once per vhost_dev: idempotent
    return []


def reset_owner(spec: DeviceSpec, s: ConnectionState, msg: Message, p: Empty) -> list:
    return _reset(s)


def reset_device(spec: DeviceSpec, s: ConnectionState, msg: Message, p: Empty) -> list:
    return _reset(s)


def set_mem_table(spec: DeviceSpec, s: ConnectionState, msg: Message, p: MemTable) -> list:
    if len(msg.fds) != len(p.regions):
        raise ProtocolError(f"{len(p.regions)} regions but {len(msg.fds)} fds")
    new = [MemRegion(r.gpa, r.size, r.uva, r.mmap_offset, fd) for r, fd in zip(p.regions, msg.fds)]
    _check_new_regions(spec, new)
    new_keys = sorted((r.gpa, r.size, r.uva, r.mmap_offset) for r in new)
    if s.regions and new_keys == sorted(r.key() for r in s.regions):
        # Unchanged (older QEMUs send one table per queue pair): keep the maps.
        return [CloseFds(msg.fds)]
    s.regions = [RegionRecord(replace(r, fd=-1)) for r in new]
    return quiesce(s, s.started_rings(), [SetMemTable(tuple(new)), CloseFds(msg.fds)])


def add_mem_reg(spec: DeviceSpec, s: ConnectionState, msg: Message, p: SingleMemRegion) -> list:
    r = p.region
    new = MemRegion(r.gpa, r.size, r.uva, r.mmap_offset, msg.fds[0])
    key = (r.gpa, r.size, r.uva, r.mmap_offset)
    for existing in s.regions:
        if existing.key() == key:
            existing.refs += 1
            return [CloseFds(msg.fds)]
    _check_new_regions(spec, [x.region for x in s.regions] + [new])
    s.regions.append(RegionRecord(replace(new, fd=-1)))
    return quiesce(s, s.started_rings(), [AddMemRegion(new), CloseFds(msg.fds)])


def rem_mem_reg(spec: DeviceSpec, s: ConnectionState, msg: Message, p: SingleMemRegion) -> list:
    r = p.region
    # An fd is tolerated (some front-ends send one) and closed unused.
    close = [CloseFds(msg.fds)] if msg.fds else []
    match = [x for x in s.regions
             if (x.region.gpa, x.region.size, x.region.uva) == (r.gpa, r.size, r.uva)]
    if not match:
        raise ProtocolError(f"no region gpa={r.gpa:#x} size={r.size:#x} uva={r.uva:#x}")
    existing = match[0]
    existing.refs -= 1
    if existing.refs > 0:
        return close
    s.regions.remove(existing)
    return close + quiesce(s, s.started_rings(), [RemoveMemRegion(existing.region)])


def set_log_base(spec: DeviceSpec, s: ConnectionState, msg: Message, p: Log) -> list:
    fd = msg.fds[0]
    s.log = p
    # QEMU (LOG_SHMFD) waits for a reply; its content is not checked.
    return [SetLogBase(fd, p.size, p.offset), CloseFds((fd,)),
            Reply(msg.request, U64(0).encode())]


def set_log_fd(spec: DeviceSpec, s: ConnectionState, msg: Message, p: Empty) -> list:
    old, s.log_fd = s.log_fd, msg.fds[0]
    return [CloseFds((old,))] if old >= 0 else []


def set_vring_num(spec: DeviceSpec, s: ConnectionState, msg: Message, p: VringState) -> list:
    limit = min(spec.max_queue_size, MAX_QUEUE_SIZE)
    if not _is_pow2(p.num) or p.num > limit:
        raise ProtocolError(f"ring {p.index}: size {p.num} (power of 2 up to {limit})")
    _check_fits_inflight(p.index, p.num, s.inflight)
    ring = s.ring(p.index)
    if ring.num == p.num:
        return []
    ring.num = p.num
    return quiesce(s, [ring], [])


def set_vring_addr(spec: DeviceSpec, s: ConnectionState, msg: Message, p: VringAddr) -> list:
    ring = s.ring(p.index)
    if ring.addr == p:
        return []
    ring.addr = p
    return quiesce(s, [ring], [])


def set_vring_base(spec: DeviceSpec, s: ConnectionState, msg: Message, p: VringState) -> list:
    ring = s.ring(p.index)
    if s.packed:
        # 32 bits: avail index and wrap counter, used index and wrap counter
        _check_packed_base(p.index, ring.num, p.num)
        base = PackedBase.decode(p.num).encode()
    elif p.num > 0xFFFF:
        raise ProtocolError(f"ring {p.index}: base {p.num} > 65535")
    else:
        base = p.num
    if ring.started:
        raise ProtocolError(f"ring {p.index}: SET_VRING_BASE while the ring runs")
    ring.base = base
    return []


def get_vring_base(spec: DeviceSpec, s: ConnectionState, msg: Message, p: VringState) -> list:
    ring = s.ring(p.index)
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
    return [Reply(msg.request, VringState(p.index, ring.base).encode())] + forget_kick(ring)


def set_vring_kick(spec: DeviceSpec, s: ConnectionState, msg: Message, p: VringFile) -> list:
    fd = _check_fd_matches(p, msg.fds)
    ring = s.ring(p.index)
    old = ring.kick_fd
    ring.kick_fd, ring.kick_set = fd, True
    if ring.started:                            # restart with the new kick
        if old >= 0:
            ring.close_on_stop.append(old)
        return quiesce(s, [ring], [])
    return [CloseFds((old,))] if old >= 0 else []


def set_vring_call(spec: DeviceSpec, s: ConnectionState, msg: Message, p: VringFile) -> list:
    fd = _check_fd_matches(p, msg.fds)
    ring = s.ring(p.index)
    old, ring.call_fd = ring.call_fd, fd
    actions: list = []
    if ring.started:
        actions.append(SetCallFd(p.index, fd))
    if old >= 0:
        actions.append(CloseFds((old,)))
    return actions


def set_vring_err(spec: DeviceSpec, s: ConnectionState, msg: Message, p: VringFile) -> list:
    fd = _check_fd_matches(p, msg.fds)
    ring = s.ring(p.index)
    old, ring.err_fd = ring.err_fd, fd
    return [CloseFds((old,))] if old >= 0 else []


def get_protocol_features(spec: DeviceSpec, s: ConnectionState, msg: Message, p: Empty) -> list:
    return [Reply(msg.request, U64(spec.protocol_features).encode())]


def set_protocol_features(spec: DeviceSpec, s: ConnectionState, msg: Message, p: U64) -> list:
    extra = p.value & ~spec.protocol_features
    if extra:
        raise ProtocolError(f"sets protocol features {extra:#x} that were not offered")
    s.protocol_features = p.value
    return []


def get_queue_num(spec: DeviceSpec, s: ConnectionState, msg: Message, p: Empty) -> list:
    return [Reply(msg.request, U64(spec.queue_num).encode())]


def set_vring_enable(spec: DeviceSpec, s: ConnectionState, msg: Message, p: VringState) -> list:
    if p.num not in (0, 1):
        raise ProtocolError(f"ring {p.index}: enable {p.num}")
    s.ring(p.index).enabled = bool(p.num)
    return []


def send_rarp(spec: DeviceSpec, s: ConnectionState, msg: Message, p: U64) -> list:
    return [SendRarp(bytes(msg.payload[:6]))]


def net_set_mtu(spec: DeviceSpec, s: ConnectionState, msg: Message, p: U64) -> list:
    if not VIRTIO_NET_MTU_MIN <= p.value <= VIRTIO_NET_MTU_MAX:
        raise Refused(f"MTU {p.value} outside {VIRTIO_NET_MTU_MIN}..{VIRTIO_NET_MTU_MAX}")
    return [SetMtu(p.value)]


def set_backend_req_fd(spec: DeviceSpec, s: ConnectionState, msg: Message, p: Empty) -> list:
    # Held for a future back-end channel (config change, host notifiers).
    old, s.backend_req_fd = s.backend_req_fd, msg.fds[0]
    return [CloseFds((old,))] if old >= 0 else []


def get_config(spec: DeviceSpec, s: ConnectionState, msg: Message, p: Config) -> list:
    config = spec.config
    if not p.is_valid() or p.offset + p.size > len(config):
        # "zero length of payload to indicate an error"
        log.warning("GET_CONFIG offset=%d size=%d outside %d bytes of config space",
                    p.offset, p.size, len(config))
        return [Reply(msg.request, b"")]
    data = config[p.offset:p.offset + p.size]
    return [Reply(msg.request, Config(p.offset, p.size, p.flags, data).encode())]


def set_config(spec: DeviceSpec, s: ConnectionState, msg: Message, p: Config) -> list:
    raise Refused(f"config space is read-only (offset={p.offset} size={p.size} flags={p.flags})")


def get_max_mem_slots(spec: DeviceSpec, s: ConnectionState, msg: Message, p: Empty) -> list:
    return [Reply(msg.request, U64(spec.max_mem_slots).encode())]


def set_status(spec: DeviceSpec, s: ConnectionState, msg: Message, p: U64) -> list:
    if p.value > 0xFF:
        raise ProtocolError(f"status {p.value:#x} does not fit a byte")
    s.status = p.value
    return [SetStatus(p.value)]


def get_status(spec: DeviceSpec, s: ConnectionState, msg: Message, p: Empty) -> list:
    return [Reply(msg.request, U64(s.status).encode())]


def get_inflight_fd(spec: DeviceSpec, s: ConnectionState, msg: Message, p: Inflight) -> list:
    # QEMU sends mmap_size/offset 0 and the shape it wants; the reply
    # (with the new region's fd) comes from the caller, which allocates it.
    # The layout follows the acked features: QEMU 7.2 sends SET_FEATURES
    # first (vhost_dev_prepare_inflight).
    _check_inflight_shape(spec, p)
    return [GetInflight(p.num_queues, p.queue_size, s.packed)]


def set_inflight_fd(spec: DeviceSpec, s: ConnectionState, msg: Message, p: Inflight) -> list:
    _check_inflight_shape(spec, p)
    need = inflight_region_size(p.num_queues, p.queue_size, s.packed)
    if p.mmap_size < need:
        layout = "packed " if s.packed else ""
        raise ProtocolError(f"inflight region of {p.mmap_size} bytes, {p.num_queues} {layout}"
                            f"queues of {p.queue_size} need {need}")
    for index, ring in sorted(s.rings.items()):
        if ring.num:
            _check_fits_inflight(index, ring.num, p)
    fd = msg.fds[0]
    s.inflight = p
    s.inflight_packed = s.packed
    # Rings read the region when they start: running ones restart with it.
    return quiesce(s, s.started_rings(), [
        SetInflight(fd, p.mmap_size, p.mmap_offset, p.num_queues, p.queue_size, s.packed),
        CloseFds((fd,))])


# -- the table --------------------------------------------------------------------

PF = ProtocolFeature
_PROTOCOL_FEATURES_BIT = int(F.VHOST_USER_PROTOCOL_FEATURES)   # in log lines: a number

TABLE: dict[Request, Row] = {
    Request.GET_FEATURES: Row(get_features, Empty, reply=True),
    Request.SET_FEATURES: Row(set_features, U64, touches_rings=True),
    Request.SET_OWNER: Row(set_owner, Empty),
    Request.RESET_OWNER: Row(reset_owner, Empty),
    Request.SET_MEM_TABLE: Row(set_mem_table, MemTable, fds=(1, 8), touches_rings=True),
    Request.SET_LOG_BASE: Row(set_log_base, Log, fds=(1, 1), protocol_feature=PF.LOG_SHMFD,
                              reply=True),
    Request.SET_LOG_FD: Row(set_log_fd, Empty, fds=(1, 1)),
    Request.SET_VRING_NUM: Row(set_vring_num, VringState, queue_field="index",
                               touches_rings=True),
    Request.SET_VRING_ADDR: Row(set_vring_addr, VringAddr, queue_field="index",
                                touches_rings=True),
    Request.SET_VRING_BASE: Row(set_vring_base, VringState, queue_field="index"),
    Request.GET_VRING_BASE: Row(get_vring_base, VringState, queue_field="index", reply=True),
    Request.SET_VRING_KICK: Row(set_vring_kick, VringFile, fds=(0, 1), queue_field="index",
                                touches_rings=True),
    Request.SET_VRING_CALL: Row(set_vring_call, VringFile, fds=(0, 1), queue_field="index"),
    Request.SET_VRING_ERR: Row(set_vring_err, VringFile, fds=(0, 1), queue_field="index"),
    Request.GET_PROTOCOL_FEATURES: Row(get_protocol_features, Empty,
                                       offered_feature=_PROTOCOL_FEATURES_BIT,
                                       reply=True),
    Request.SET_PROTOCOL_FEATURES: Row(set_protocol_features, U64,
                                       offered_feature=_PROTOCOL_FEATURES_BIT),
    Request.GET_QUEUE_NUM: Row(get_queue_num, Empty, protocol_feature=PF.MQ, reply=True),
    Request.SET_VRING_ENABLE: Row(set_vring_enable, VringState, queue_field="index",
                                  offered_feature=_PROTOCOL_FEATURES_BIT,
                                  touches_rings=True),
    Request.SEND_RARP: Row(send_rarp, U64, protocol_feature=PF.RARP),
    Request.NET_SET_MTU: Row(net_set_mtu, U64, protocol_feature=PF.MTU),
    Request.SET_BACKEND_REQ_FD: Row(set_backend_req_fd, Empty, fds=(1, 1),
                                    protocol_feature=PF.BACKEND_REQ),
    Request.GET_CONFIG: Row(get_config, Config, protocol_feature=PF.CONFIG, reply=True,
                            validate=False),
    Request.SET_CONFIG: Row(set_config, Config, protocol_feature=PF.CONFIG, validate=False),
    Request.RESET_DEVICE: Row(reset_device, Empty, protocol_feature=PF.RESET_DEVICE),
    Request.GET_MAX_MEM_SLOTS: Row(get_max_mem_slots, Empty,
                                   protocol_feature=PF.CONFIGURE_MEM_SLOTS, reply=True),
    Request.ADD_MEM_REG: Row(add_mem_reg, SingleMemRegion, fds=(1, 1),
                             protocol_feature=PF.CONFIGURE_MEM_SLOTS, touches_rings=True),
    Request.REM_MEM_REG: Row(rem_mem_reg, SingleMemRegion, fds=(0, 1),
                             protocol_feature=PF.CONFIGURE_MEM_SLOTS, touches_rings=True),
    Request.SET_STATUS: Row(set_status, U64, protocol_feature=PF.STATUS),
    Request.GET_STATUS: Row(get_status, Empty, protocol_feature=PF.STATUS, reply=True),
    Request.GET_INFLIGHT_FD: Row(get_inflight_fd, Inflight, protocol_feature=PF.INFLIGHT_SHMFD,
                                 reply=True),
    Request.SET_INFLIGHT_FD: Row(set_inflight_fd, Inflight, fds=(1, 1),
                                 protocol_feature=PF.INFLIGHT_SHMFD, touches_rings=True),
    # Not yet: IOTLB_MSG, SET_VRING_ENDIAN,
    # POSTCOPY_*, VRING_KICK (INBAND_NOTIFICATIONS).  Add a row and a handler.
}

#: Requests whose reply is part of the protocol: never an extra REPLY_ACK,
#: and a failure cannot be reported by one.
MANDATORY_REPLY = frozenset(int(req) for req, row in TABLE.items() if row.reply) | {
    int(Request.IOTLB_MSG), int(Request.POSTCOPY_ADVISE),
    int(Request.POSTCOPY_END), int(Request.CREATE_CRYPTO_SESSION), int(Request.GET_SHARED_OBJECT),
    int(Request.SET_DEVICE_STATE_FD), int(Request.CHECK_DEVICE_STATE),
}

del PF, _PROTOCOL_FEATURES_BIT
