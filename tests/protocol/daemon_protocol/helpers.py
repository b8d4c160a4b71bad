"""What the daemon protocol tests share: the devices a, b and c still serve, waits, eventfds."""
from __future__ import annotations

import os
import time

from tests.protocol.daemon_helpers import close_frontend, exchange, open_frontend
from vfe.testing.channel import DEFAULT_PROTOCOL_FEATURES
from vfe.vhost.messages import MemoryRegion, ProtocolFeature
from vfe.virtio.constants import bit

PF = ProtocolFeature
NO_REPLY_ACK = DEFAULT_PROTOCOL_FEATURES & ~bit(PF.REPLY_ACK)


def others_still_served(daemon, peers) -> None:
    """b and c pass frames both ways, and device a's socket takes a new
    front-end that works (frames both ways with b)."""
    exchange(peers.b, peers.c)
    exchange(peers.c, peers.b)
    a = open_frontend(daemon, "a", 2)
    try:
        exchange(a, peers.b)
    finally:
        close_frontend(daemon, a)


def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def wait_equal(get, want, what, timeout=2.0):
    deadline = time.monotonic() + timeout
    while True:
        got = get()
        if got == want:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: {got}, baseline {want}")
        time.sleep(0.02)


def region(gpa: int, size: int, uva: int = 0x7F0000000000, off: int = 0) -> MemoryRegion:
    return MemoryRegion(gpa, size, uva + gpa, off)
