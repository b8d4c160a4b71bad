"""Requests the daemon must refuse (the table the bad-request and fd-hygiene tests send)."""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Callable

from tests.protocol.daemon_helpers import MiB
from tests.protocol.daemon_protocol.helpers import eventfd, region
from vfe.devices.net import NET_FEATURES
from vfe.vhost.messages import (
    NEED_REPLY, VERSION, Config, MemoryRegion, MemTable, ProtocolFeature, Request,
    SingleMemRegion, U64, VringAddr, VringFile, VringState,
)
from vfe.virtio.constants import F, bit

PF = ProtocolFeature


@dataclass
class Bad:
    """A request the daemon must refuse.  ``make(fe, fds)`` returns
    (request, payload, fds to send); fds it creates go in ``fds`` to be
    closed by the test (the daemon gets its own copies)."""

    make: Callable
    running: bool = False          # send it with the rings running
    flags: int | None = None       # header flags override (NEED_REPLY added in ack mode)


def _fd(fds: list) -> int:
    fd = eventfd()
    fds.append(fd)
    return fd


def _memfd(fds: list, size: int = 1 * MiB) -> int:
    fd = os.memfd_create("vfe-test-bad", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    fds.append(fd)
    return fd


BAD = {
    "payload-too-short": Bad(lambda fe, fds: (Request.SET_VRING_NUM, b"\0" * 4, [])),
    "payload-too-long": Bad(lambda fe, fds: (Request.SET_FEATURES, bytes(16), [])),
    "addr-payload-truncated": Bad(lambda fe, fds: (Request.SET_VRING_ADDR, bytes(32), [])),
    "mem-table-size-vs-count": Bad(lambda fe, fds: (
        Request.SET_MEM_TABLE, struct.pack("<II", 2, 0) + region(0, MiB).encode(),
        [_memfd(fds)])),
    "unknown-request-99": Bad(lambda fe, fds: (99, b"", [])),
    "unknown-request-0": Bad(lambda fe, fds: (0, U64(0).encode(), [])),
    "unsupported-SET_VRING_ENDIAN": Bad(lambda fe, fds: (
        Request.SET_VRING_ENDIAN, VringState(0, 0).encode(), [])),
    "ring-index-too-big": Bad(lambda fe, fds: (Request.SET_VRING_NUM, VringState(4, 256).encode(), [])),
    "kick-ring-index-too-big": Bad(lambda fe, fds: (
        Request.SET_VRING_KICK, VringFile(4, False).encode(), [_fd(fds)])),
    "ring-size-not-power-of-2": Bad(lambda fe, fds: (
        Request.SET_VRING_NUM, VringState(0, 100).encode(), [])),
    "ring-size-above-queue-size": Bad(lambda fe, fds: (
        Request.SET_VRING_NUM, VringState(0, 2048).encode(), [])),
    "ring-addr-misaligned": Bad(lambda fe, fds: (
        Request.SET_VRING_ADDR, VringAddr(0, 0, 0x1008, 0x3000, 0x2000, 0).encode(), [])),
    "vring-base-above-65535": Bad(lambda fe, fds: (
        Request.SET_VRING_BASE, VringState(0, 0x10000).encode(), [])),
    "vring-enable-2": Bad(lambda fe, fds: (Request.SET_VRING_ENABLE, VringState(0, 2).encode(), [])),
    "features-not-offered": Bad(lambda fe, fds: (
        Request.SET_FEATURES, U64(NET_FEATURES | bit(63)).encode(), [])),
    "protocol-features-not-offered": Bad(lambda fe, fds: (
        Request.SET_PROTOCOL_FEATURES, U64(bit(PF.BACKEND_REQ)).encode(), [])),
    "protocol-feature-not-negotiated": Bad(lambda fe, fds: (
        Request.SET_BACKEND_REQ_FD, b"", [_fd(fds)])),
    "set-config-not-negotiated": Bad(lambda fe, fds: (
        Request.SET_CONFIG, Config(0, 4, 0, bytes(4)).encode(), [])),
    "kick-without-fd": Bad(lambda fe, fds: (Request.SET_VRING_KICK, VringFile(0, False).encode(), [])),
    "kick-fd-with-nofd-bit": Bad(lambda fe, fds: (
        Request.SET_VRING_KICK, VringFile(0, True).encode(), [_fd(fds)])),
    "call-with-two-fds": Bad(lambda fe, fds: (
        Request.SET_VRING_CALL, VringFile(0, False).encode(), [_fd(fds), _fd(fds)])),
    "mem-table-fewer-fds-than-regions": Bad(lambda fe, fds: (
        Request.SET_MEM_TABLE, MemTable((region(0, MiB), region(2 * MiB, MiB))).encode(),
        [_memfd(fds)])),
    "mem-table-overlapping-regions": Bad(lambda fe, fds: (
        Request.SET_MEM_TABLE, MemTable((region(0, MiB), region(MiB // 2, MiB))).encode(),
        [_memfd(fds), _memfd(fds)])),
    "mem-table-zero-size-region": Bad(lambda fe, fds: (
        Request.SET_MEM_TABLE, MemTable((region(0, 0),)).encode(), [_memfd(fds)])),
    "mem-table-without-fds": Bad(lambda fe, fds: (
        Request.SET_MEM_TABLE, MemTable((region(0, MiB),)).encode(), [])),
    "add-mem-reg-without-fd": Bad(lambda fe, fds: (
        Request.ADD_MEM_REG, SingleMemRegion(region(0, MiB)).encode(), [])),
    "rem-mem-reg-unknown-region": Bad(lambda fe, fds: (
        Request.REM_MEM_REG, SingleMemRegion(region(1 << 40, MiB)).encode(), [])),
    "status-above-0xff": Bad(lambda fe, fds: (Request.SET_STATUS, U64(0x100).encode(), [])),
    "header-version-2": Bad(lambda fe, fds: (Request.SET_OWNER, b"", []), flags=0x2),
    "reply-flag-on-a-request": Bad(lambda fe, fds: (Request.SET_OWNER, b"", []), flags=0x5),
    "set-vring-base-on-running-ring": Bad(lambda fe, fds: (
        Request.SET_VRING_BASE, VringState(1, 5).encode(), []), running=True),
    "features-changed-while-running": Bad(lambda fe, fds: (
        Request.SET_FEATURES, U64(fe.features & ~bit(F.RING_EVENT_IDX)).encode(), []), running=True),
    "overlapping-region-added-while-running": Bad(lambda fe, fds: (
        Request.ADD_MEM_REG,
        SingleMemRegion(MemoryRegion(4096, MiB, fe.memory.regions[0].uva + (64 << 20), 0)).encode(),
        [_memfd(fds)]), running=True),
}


def send_bad(fe, case: Bad, need_reply: bool):
    fds: list[int] = []
    try:
        request, payload, send_fds = case.make(fe, fds)
        flags = VERSION if case.flags is None else case.flags
        if need_reply:
            flags |= NEED_REPLY
        return fe.send_message(request, payload, send_fds, flags=flags, expect_reply=need_reply)
    finally:
        for fd in fds:
            os.close(fd)
