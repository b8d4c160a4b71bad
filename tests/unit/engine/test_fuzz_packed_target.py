"""The packed-ring fuzz targets (tests/fuzz/target_packed_ring.py and
target_packed_blk.py) as regression tests: for each a hand-built input
that reaches the deep path (a frame delivered; a request a previous
process left in the inflight region resubmitted and served), then a few
thousand random inputs, in a forked child (a crash fails the test naming
the signal)."""
from __future__ import annotations

import random
import struct

from tests.harness.guarded import run_forked

FRAME = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00" + bytes(range(46))
NOT_AVAILABLE = 5                      # the target's avail-bits kind: neither bit set


def _desc(where: int, off: int, length: int, flags: int, id_: int, kind: int = 0) -> bytes:
    return bytes([where, off, length, flags, id_, kind])


def delivering_input() -> bytes:
    """a and b VERSION_1, rings of 4 at slot 0 of lap 1: a's slot 0 holds the
    frame (header + 60 bytes at the buffers' start), b's slot 0 a 512-byte
    writable buffer (buffers + 4096); the other slots are not available."""
    idle = _desc(0, 0, 0, 0, 0, NOT_AVAILABLE)
    tx = _desc(0, 0, 12 + len(FRAME), 0, 1) + idle * 3 + bytes([0, 1]) + bytes(4)
    rx = _desc(1 | 2 << 3, 0, 128, 2, 2) + idle * 3 + bytes([0, 1]) + bytes(4)
    return bytes([8, 8, 3]) + tx + rx + bytes([0, 0, 0]) + bytes(12) + FRAME


def _replay(n_random: int) -> dict:
    from tests.fuzz import target_packed_ring as t
    t.setup()
    t.fuzz_one(delivering_input())
    out = {"tx": t._rig.a.ring_state(1)["broken"], "rx": t._rig.b.ring_state(0)["broken"],
           "received": t._rig.b.ring_stats(0)["packets"]}
    rnd = random.Random(13)
    for _ in range(n_random):
        t.fuzz_one(rnd.randbytes(rnd.randrange(700)))
    return out


def test_packed_ring_target_delivers_and_survives_random_inputs():
    seen = run_forked(_replay, 3000, timeout=120)
    assert seen == {"tx": 0, "rx": 0, "received": 1}


def resubmitting_input() -> bytes:
    """A malloc disk, a packed ring of 8 at slot 0 of lap 1 with nothing
    available, and a packed inflight region (version 1) holding one FLUSH
    request left inflight by a previous process: buffer id 3, its header
    (entry 0) at the buffers' start, its status (entry 1) at buffers + 64;
    entries 2.. free."""
    idle = _desc(0, 0, 0, 0, 0, NOT_AVAILABLE)
    ring = idle * 8 + bytes([0, 1]) + bytes(4)
    region = bytes([0, 0, 0x80, 0, 2, 2, 0, 0, 1, 1])
    region += bytes([1, 1, 1, 2, 0]) + bytes([0, 0, 16, 0, 3])       # the header's copy
    region += bytes([0, 2, 0, 0, 0]) + bytes([0, 4, 1, 2, 3])        # the status's copy (WRITE)
    for e in range(2, 8):
        region += bytes([0, e + 1, 0, 0, 0]) + bytes(5)
    flush = struct.pack("<IIQ", 4, 0, 0)
    return bytes([8, 7]) + ring + region + bytes([0, 0, 0]) + flush


def _replay_blk(n_random: int) -> dict:
    from tests.fuzz import target_packed_blk as t
    t.setup()
    t.fuzz_one(resubmitting_input())
    dev = t.last_device
    out = {"broken": dev.ring_state(0)["broken"], "served": dev.ring_stats(0)["packets"],
           "flushes": dev.blk_stats()["flushes"]}
    rnd = random.Random(17)
    for _ in range(n_random):
        t.fuzz_one(rnd.randbytes(rnd.randrange(900)))
    return out


def test_packed_blk_target_resubmits_and_survives_random_inputs():
    seen = run_forked(_replay_blk, 3000, timeout=120)
    assert seen == {"broken": 0, "served": 1, "flushes": 1}
