"""The dirty log is exact (live migration of a vhost-user net device).

Acceptance: a test front-end that has the daemon write N known buffers
while logging is on finds every page the daemon wrote marked in the log,
for split rings, with and without mergeable buffers.

How: device a's front-end plays QEMU at migration start (SET_LOG_BASE with
a fresh memfd sized for its guest memory, SET_FEATURES + VHOST_F_LOG_ALL,
SET_VRING_ADDR with the LOG flag and the used ring's guest address), clears
the log (QEMU's first bitmap sync), then device b sends N known frames to
a (and a sends a few to b).  From its own knowledge -- the buffers it
posted and the used elements the daemon returned -- a's front-end computes
two page sets:

- ``written``: every page the daemon must have written: each consumed RX
  chain's first ``used.len`` bytes (virtio-net header + frame), and the
  used-ring elements and ``used->idx`` of every ring that moved.  Each one
  must be marked -- a missing mark is the bug (the destination would run
  with a stale page).
- ``allowed``: ``written`` plus what the engine marks wholesale: every
  iovec of a consumed RX chain in full (it marks per iovec after the copy,
  not just the bytes filled) and each logged ring's whole used ring (it
  logs flags, idx, all elements and avail_event at every used->idx
  publish).  This over-marking is allowed (it only costs a re-send);
  anything marked outside ``allowed`` -- a's TX buffers, descriptor
  tables, RX buffers the daemon did not consume -- is a wrong mark.

RX buffers are laid out to catch page-boundary slips: 1536-byte buffers
5 KiB apart from 700 bytes before a page boundary, so some straddle a page
boundary with no other buffer on the next page (a logger that dropped a
range's last page would leave that page unmarked), and for the
non-mergeable large frame, multi-descriptor chains whose descriptors are
scattered across the pool (a logger that assumed one contiguous range per
chain would miss pages).  The used rings have 1024 entries (three pages)
and start where the used elements cross from one page of the ring to the
next.

Then the migration ends without completing -- cancelled while the device
runs, or failed after the source stopped the device and restarted it -- so
logging is off: no new marks anywhere.  A second migration (new log memfd)
marks exactly again, in the new log only.
"""
from __future__ import annotations

import math
import os
import struct
import time

import pytest

from tests.protocol.daemon_helpers import (
    MiB, close_frontend, daemon_fixtures, frame, new_token, open_frontend, send_one,
)

from vfe.testing.frontend import NEVER_ACK, Frontend
from vfe.testing.guest_ram import PAGE
from vfe.vhost.messages import ProtocolFeature
from vfe.virtio.constants import F, Status, bit

daemon, daemon_guard = daemon_fixtures({"a": "", "b": ""})

LOG_ALL = bit(F.VHOST_LOG_ALL)
MRG = bit(F.NET_MRG_RXBUF)
EVENT_IDX = bit(F.RING_EVENT_IDX)
ALL = (1 << 64) - 1
MEM = 8 * MiB                 # a's guest memory
N_FRAMES = 8                  # frames b -> a per phase
A_TX_FRAMES = 3               # frames a -> b per phase (a's TX used ring moves)
SPARE_CHAINS = 6              # RX chains posted beyond what N_FRAMES need (never consumed)
RX_BUF = 1536                 # RX descriptor length
RX_STRIDE = PAGE + 1024       # RX buffer i starts at RX_START + i * RX_STRIDE in a's RX pool
RX_START = PAGE - 700         # ... so buffer 0 straddles a page boundary, and others now and then
LARGE = 9000                  # a jumbo frame: several mergeable buffers / a 6-descriptor chain


def pages_of(gpa: int, length: int) -> set[int]:
    if length <= 0:
        return set()
    return set(range(gpa // PAGE, (gpa + length - 1) // PAGE + 1))


# ---------------------------------------------------------------------------
# The log


class LogFile:
    """A dirty log as QEMU makes one (vhost_dev_log_resize): a fresh memfd,
    one bit per 4 KiB page of guest memory, offset 0."""

    def __init__(self, mem_size: int) -> None:
        self.pages = mem_size // PAGE
        self.size = self.pages // 8
        self.fd = os.memfd_create("vfe-test-dirty-log", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)

    def clear(self) -> None:
        """QEMU's bitmap sync (call only while the device writes nothing)."""
        os.pwrite(self.fd, bytes(self.size), 0)

    def marked(self) -> set[int]:
        data = os.pread(self.fd, self.size, 0)
        return {8 * i + b for i, byte in enumerate(data) if byte for b in range(8) if byte >> b & 1}

    def close(self) -> None:
        os.close(self.fd)


def start_logging(fe: Frontend, log: LogFile) -> None:
    """vhost_migration_log(true): SET_LOG_BASE, then vhost_dev_set_log:
    SET_FEATURES with LOG_ALL, SET_VRING_ADDR with the LOG flag per ring."""
    assert fe.has_protocol_feature(ProtocolFeature.LOG_SHMFD)
    assert fe.backend_features & LOG_ALL, "the daemon does not offer VHOST_F_LOG_ALL"
    fe.set_log_base(log.fd, log.size)
    fe.set_features(fe.features | LOG_ALL)
    _set_addrs(fe, log=True)
    fe.sync()


def stop_logging_features(fe: Frontend) -> None:
    """First half of vhost_dev_set_log(false): SET_FEATURES without LOG_ALL."""
    fe.set_features(fe.features & ~LOG_ALL)
    fe.sync()


def stop_logging_addrs(fe: Frontend) -> None:
    """Second half: SET_VRING_ADDR without the LOG flag per ring."""
    _set_addrs(fe, log=False)
    fe.sync()


def _set_addrs(fe: Frontend, log: bool) -> None:
    assert fe.memory is not None
    uva = fe.memory.gpa_to_uva
    for i, ring in sorted(fe.rings.items()):
        lay = ring.layout
        fe.set_vring_addr(i, uva(ring.ring_gpa + lay.desc), uva(ring.ring_gpa + lay.used),
                          uva(ring.ring_gpa + lay.avail),
                          log_guest_addr=ring.ring_gpa + lay.used if log else 0, log=log)


def stop_and_restart(fe: Frontend) -> None:
    """The source stopped the device for the final copy (vhost_dev_stop:
    SET_STATUS 0, GET_VRING_BASE per ring), then the migration failed and
    the VM runs again (vhost_dev_start with logging off: SET_FEATURES
    without LOG_ALL, NUM/BASE/ADDR(no LOG)/KICK/CALL per ring, enable)."""
    fe.stop()
    fe.set_features(fe.features & ~LOG_ALL)
    for i, ring in sorted(fe.rings.items()):
        fe.setup_ring(i, ring.size, buf_size=ring.buf_size)
    if fe.has_protocol_feature(ProtocolFeature.STATUS):
        fe.add_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.DRIVER_OK)
    for i in sorted(fe.rings):
        fe.set_vring_enable(i, True)
    fe.sync()


# ---------------------------------------------------------------------------
# a's RX ring, driven by hand (known buffers, known pages)


class RxPool:
    """Device a's RX ring 0 with buffers this test lays out: RX_BUF-byte
    descriptors every RX_STRIDE bytes from RX_START in the ring's buffer pool, ``per_chain``
    descriptors per chain, a chain's descriptors scattered (chain c of a
    batch of n takes buffers c, c+n, c+2n, ...)."""

    def __init__(self, fe: Frontend, per_chain: int) -> None:
        self.fe = fe
        self.ring = fe.rings[0]
        self.per_chain = per_chain
        self.next_buf = 0
        self.posted: list[tuple[tuple[int, int], ...]] = []     # chains not yet returned

    def _buf(self, i: int) -> tuple[int, int]:
        off = RX_START + i * RX_STRIDE
        assert off + RX_BUF <= self.ring.size * self.ring.buf_size, "RX pool exhausted"
        return self.ring.buf_gpa + off, RX_BUF

    def post(self, nchains: int) -> None:
        first = self.next_buf
        self.next_buf += nchains * self.per_chain
        for c in range(nchains):
            pieces = tuple(self._buf(first + c + j * nchains) for j in range(self.per_chain))
            self.ring.driver.add_chain([(g, n, True) for g, n in pieces], token=pieces,
                                       publish=False)
            self.posted.append(pieces)
        self.ring.driver.publish()
        self.fe.kick(0)

    def repost(self, chains: list[tuple[tuple[int, int], ...]]) -> None:
        for pieces in chains:
            self.ring.driver.add_chain([(g, n, True) for g, n in pieces], token=pieces,
                                       publish=False)
            self.posted.append(pieces)
        self.ring.driver.publish()
        self.fe.kick(0)

    def receive(self, count: int, mrg: bool, timeout: float = 3.0) -> "Delivery":
        """Poll the used ring until ``count`` frames arrived; returns them
        with the used elements (positions, heads, lengths, buffers)."""
        hdr_len = self.fe.net_hdr_len
        mem = self.fe.memory
        assert mem is not None
        d = Delivery(used_from=self.ring.driver.last_used_idx)
        pending: list[bytes] = []
        remaining = 0
        deadline = time.monotonic() + timeout
        while len(d.frames) < count or remaining:
            used = self.ring.driver.get_used()
            if not used:
                assert time.monotonic() < deadline, (
                    f"{len(d.frames)} of {count} frames arrived on a's RX ring within {timeout}s")
                time.sleep(0.001)
                continue
            for u in used:
                pieces = u.token
                self.posted.remove(pieces)
                assert u.length <= sum(n for _, n in pieces), "used.len > the chain's capacity"
                data, left = b"", u.length
                for gpa, n in pieces:
                    take = min(n, left)
                    if take:
                        d.written.append((gpa, take))
                        data += mem.read(gpa, take)
                    left -= take
                d.chains.append(pieces)
                if remaining == 0:
                    nbufs = struct.unpack_from("<H", data, 10)[0] if hdr_len == 12 else 1
                    if not mrg:
                        assert nbufs == 1, f"num_buffers {nbufs} without MRG_RXBUF"
                    remaining, pending = nbufs, []
                    d.num_buffers.append(nbufs)
                pending.append(data)
                remaining -= 1
                if remaining == 0:
                    d.frames.append(b"".join(pending)[hdr_len:])
        d.used_to = self.ring.driver.last_used_idx
        return d


class Delivery:
    def __init__(self, used_from: int) -> None:
        self.used_from = used_from
        self.used_to = used_from
        self.frames: list[bytes] = []
        self.num_buffers: list[int] = []
        self.written: list[tuple[int, int]] = []                 # (gpa, len) the device filled
        self.chains: list[tuple[tuple[int, int], ...]] = []      # consumed chains, in full


def used_ring_writes(fe: Frontend, index: int, first: int, last: int) -> set[int]:
    """Pages of the used elements [first, last) and of used->idx."""
    ring = fe.rings[index]
    used = ring.ring_gpa + ring.layout.used
    pages = pages_of(used + 2, 2) if first != last else set()
    k = first
    while k != last:
        pages |= pages_of(used + 4 + 8 * (k % ring.size), 8)
        k = (k + 1) & 0xFFFF
    return pages


def whole_used_ring(fe: Frontend, index: int) -> set[int]:
    ring = fe.rings[index]
    return pages_of(ring.ring_gpa + ring.layout.used, 6 + 8 * ring.size)


def chains_pages(chains) -> set[int]:
    return set().union(*(pages_of(g, n) for pieces in chains for g, n in pieces))


def describe(fe: Frontend, pages: set[int], rx: RxPool) -> str:
    """What lives on each page (for failure messages)."""
    out = []
    for p in sorted(pages)[:12]:
        what = []
        for i, ring in sorted(fe.rings.items()):
            lay = ring.layout
            kind = "RX" if i % 2 == 0 else "TX"
            for name, off, length in (("desc table", lay.desc, lay.desc_len),
                                      ("avail ring", lay.avail, lay.avail_len),
                                      ("used ring", lay.used, lay.used_len)):
                if p in pages_of(ring.ring_gpa + off, length):
                    what.append(f"ring {i} ({kind}) {name}")
            if p in pages_of(ring.buf_gpa, ring.size * ring.buf_size):
                what.append(f"ring {i} ({kind}) buffer pool")
        if p in chains_pages(rx.posted):
            what.append("an RX chain the daemon has not consumed")
        out.append(f"page {p} (gpa {p * PAGE:#x}): {', '.join(what) or 'nothing of the rings'}")
    more = f" (+{len(pages) - 12} more)" if len(pages) > 12 else ""
    return "; ".join(out) + more


# ---------------------------------------------------------------------------
# One phase of traffic and its page sets


class Phase:
    """b sends N_FRAMES known frames to a, a sends A_TX_FRAMES to b; then
    ``written`` (must be marked) and ``allowed`` (may be marked)."""

    def __init__(self, a: Frontend, b: Frontend, rx: RxPool, size: int, mrg: bool) -> None:
        tx = a.rings[1]
        assert a.wait_tx_done(0, 2.0)
        tx_from = tx.driver.last_used_idx
        for _ in range(A_TX_FRAMES):
            send_one(a, 0, b, size=size)
        tx_to = tx.driver.last_used_idx
        sent = []
        for _ in range(N_FRAMES):
            f = frame(a.mac, b.mac, new_token(), size)
            b.send_frame(0, f)
            sent.append(f)
        self.delivery = d = rx.receive(N_FRAMES, mrg)
        assert b.wait_tx_done(0, 2.0)
        assert d.frames == sent, "a received other frames than b sent (or corrupted ones)"
        if mrg:
            want = math.ceil((a.net_hdr_len + size) / RX_BUF)
            assert d.num_buffers == [want] * N_FRAMES, d.num_buffers
        self.written = set().union(*(pages_of(g, n) for g, n in d.written))
        self.written |= used_ring_writes(a, 0, d.used_from, d.used_to)
        self.written |= used_ring_writes(a, 1, tx_from, tx_to)
        self.allowed = self.written | chains_pages(d.chains)
        self.allowed |= whole_used_ring(a, 0) | whole_used_ring(a, 1)
        # pages the daemon had no reason to write: a's TX buffers, the
        # descriptor tables, RX chains still posted
        self.untouched = set()
        for ring in a.rings.values():
            self.untouched |= pages_of(ring.ring_gpa + ring.layout.desc, ring.layout.desc_len)
        self.untouched |= pages_of(tx.buf_gpa, tx.size * tx.buf_size)
        self.untouched |= chains_pages(rx.posted)
        self.untouched -= self.allowed

    def check(self, a: Frontend, rx: RxPool, log: LogFile, *, settle: float = 1.0) -> None:
        """Every written page marked; nothing marked outside ``allowed``.
        Marks follow the device's writes by nanoseconds: poll briefly."""
        deadline = time.monotonic() + settle
        while True:
            marked = log.marked()
            missing = self.written - marked
            if not missing or time.monotonic() >= deadline:
                break
            time.sleep(0.005)
        assert not missing, (
            f"{len(missing)} page(s) the daemon wrote are not marked in the dirty log: "
            f"{describe(a, missing, rx)}")
        wrong = marked - self.allowed
        assert not wrong, (
            f"{len(wrong)} page(s) marked that the daemon had no reason to write: "
            f"{describe(a, wrong, rx)}")
        assert self.untouched, "the test has no page it expects to stay clean"
        assert not marked & self.untouched


# ---------------------------------------------------------------------------
# Set-up


def wanted_features(mrg: bool) -> int:
    return ALL & ~NEVER_ACK & ~(0 if mrg else MRG)


def chains_per_frame(fe: Frontend, size: int, mrg: bool) -> tuple[int, int]:
    """(descriptors per chain, chains per frame) for frames of ``size``."""
    need = math.ceil((fe.net_hdr_len + size) / RX_BUF)
    return (1, need) if mrg else (need, 1)


@pytest.fixture
def pair(daemon):
    """Front-ends on a (RX buffers left to the test) and b (RX posted)."""
    made: list[Frontend] = []
    logs: list[LogFile] = []

    def open_(mrg: bool = True, features: int | None = None, **kw):
        kw.setdefault("queue_size", 1024)   # a 2 MiB buffer pool per ring; used rings span pages
        a = open_frontend(daemon, "a", 1, post_rx=False, mem_size=MEM,
                          features=wanted_features(mrg) if features is None else features, **kw)
        made.append(a)
        b = open_frontend(daemon, "b", 1)
        made.append(b)
        assert bool(a.features & MRG) == mrg
        return a, b

    def new_log() -> LogFile:
        log = LogFile(MEM)
        logs.append(log)
        return log

    open_.new_log = new_log
    yield open_
    for fe in made:
        close_frontend(daemon, fe)
    for log in logs:
        log.close()


# ---------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("size", [64, 1514, LARGE])
@pytest.mark.parametrize("mrg", [True, False], ids=["mrg_rxbuf", "no_mrg_rxbuf"])
def test_every_page_the_daemon_writes_is_marked(pair, mrg, size):
    """N known frames into a while logging: each page of header+frame per
    used.len, and each used element / used->idx page, is marked; the final
    read follows the source's vhost_dev_stop (GET_VRING_BASE), after which
    the daemon writes nothing.

    The rings have 1024 entries, so a used ring spans three pages, and start
    where the used elements cross from one page of it to another (and, with
    mergeable buffers, where the 16-bit index wraps): a logger that marked
    only used->idx's page, or only the first page, would miss one."""
    # mrg: slots 1020..1023 (the used ring's last page), then 0.. (its first) as idx wraps;
    # no mrg: slots 250.. cross from the used ring's first page to its second
    start_idx = 0x10000 - 4 if mrg else 250
    a, b = pair(mrg, start_idx=start_idx)
    per_chain, per_frame = chains_per_frame(a, size, mrg)
    rx = RxPool(a, per_chain)
    rx.post(N_FRAMES * per_frame)           # what the N frames take...
    rx.post(SPARE_CHAINS)                   # ...and chains that stay posted
    send_one(a, 0, b)                       # the switch learns a's MAC, before logging
    log = pair.new_log()
    start_logging(a, log)
    log.clear()                             # QEMU's first sync: only what follows counts
    phase = Phase(a, b, rx, size, mrg)
    a.stop()                                # stop-and-copy: the device is quiet now
    phase.check(a, rx, log, settle=0.0)
    d = phase.delivery
    assert phase.untouched & chains_pages(rx.posted), "no unconsumed RX buffer page to check"
    assert len(used_ring_writes(a, 0, d.used_from, d.used_to)) >= 2, \
        "the RX used elements did not cross a page (the layout this test relies on changed)"
    if not mrg and size == LARGE:
        assert all(len(c) == per_chain > 1 for c in phase.delivery.chains)


@pytest.mark.parametrize("end", ["cancelled", "failed_after_stop"])
def test_logging_off_then_on_again(pair, end):
    """Migration 1 marks exactly in log 1.  It ends without completing:
    cancelled (QEMU: SET_FEATURES without LOG_ALL, then SET_VRING_ADDR
    without LOG, device running) or failed after the source stopped the
    device (GET_VRING_BASE) and restarted it without logging.  Then traffic
    marks nothing.  Migration 2 (a new log memfd: QEMU freed the first)
    marks exactly again, in log 2 only."""
    a, b = pair(True)
    rx = RxPool(a, 1)
    per_frame = chains_per_frame(a, LARGE, True)[1]
    rx.post(4 * N_FRAMES * per_frame + SPARE_CHAINS)     # up to 4 phases
    send_one(a, 0, b)

    log1 = pair.new_log()
    start_logging(a, log1)
    log1.clear()
    Phase(a, b, rx, LARGE, True).check(a, rx, log1)
    log1.clear()

    if end == "cancelled":
        stop_logging_features(a)
        off = Phase(a, b, rx, LARGE, True)
        time.sleep(0.05)
        assert not log1.marked(), (
            "marks after SET_FEATURES without VHOST_F_LOG_ALL: "
            f"{describe(a, log1.marked(), rx)}")
        assert off.written, "no traffic while logging was off"
        stop_logging_addrs(a)
    else:
        stop_and_restart(a)
    off = Phase(a, b, rx, LARGE, True)
    time.sleep(0.05)
    assert not log1.marked(), (
        f"marks after logging was turned off ({end}): {describe(a, log1.marked(), rx)}")

    log2 = pair.new_log()
    start_logging(a, log2)
    log2.clear()
    again = Phase(a, b, rx, LARGE, True)
    again.check(a, rx, log2)
    assert not log1.marked(), "the daemon still writes into the first migration's log"
    assert off.written and again.written


def test_a_new_log_base_moves_the_marks(pair):
    """QEMU resizes the log during a migration (memory hot-plug:
    vhost_dev_log_resize sends SET_LOG_BASE with a new memfd while LOG_ALL
    stays on): marks go to the new log, none to the old one."""
    a, b = pair(False)
    rx = RxPool(a, chains_per_frame(a, 1514, False)[0])
    rx.post(2 * N_FRAMES + SPARE_CHAINS)
    send_one(a, 0, b)
    log1 = pair.new_log()
    start_logging(a, log1)
    log1.clear()
    Phase(a, b, rx, 1514, False).check(a, rx, log1)
    log1.clear()
    log2 = pair.new_log()
    a.set_log_base(log2.fd, log2.size)
    a.sync()
    Phase(a, b, rx, 1514, False).check(a, rx, log2)
    time.sleep(0.05)
    assert not log1.marked(), "the daemon still marks the log it was told to drop"


@pytest.mark.parametrize("event_idx", [True, False], ids=["avail_event", "used_flags"])
def test_notification_hint_writes_are_marked(pair, event_idx):
    """The engine also writes the used ring when it turns guest kicks on or
    off (avail_event with EVENT_IDX, used->flags without), from the worker's
    idle loop, some 50 us after the last used->idx publish logged the page.
    A bitmap sync in between loses the write.  Deterministic probe: after
    the sync, the driver puts a value there the device will overwrite, and
    kicks; once the device has rewritten it, the page must be marked."""
    a, b = pair(True, wanted_features(True) & ~(0 if event_idx else EVENT_IDX))
    assert bool(a.features & EVENT_IDX) == event_idx
    send_one(a, 0, b)
    log = pair.new_log()
    start_logging(a, log)
    send_one(a, 0, b)
    time.sleep(0.05)                        # the worker is idle (kicks enabled)
    log.clear()
    tx = a.rings[1]
    used = tx.ring_gpa + tx.layout.used
    hint = used + 4 + 8 * tx.size if event_idx else used
    probe = 0x7FFF if event_idx else 0x0100          # the device stores last_avail_idx / 0 or 1
    a.memory.write(hint, struct.pack("<H", probe))
    a.kick(1)
    deadline = time.monotonic() + 3.0
    while struct.unpack("<H", a.memory.read(hint, 2))[0] == probe:
        assert time.monotonic() < deadline, "the device never rewrote the hint"
        time.sleep(0.002)
    time.sleep(0.02)
    assert hint // PAGE in log.marked(), (
        f"the device rewrote {'avail_event' if event_idx else 'used->flags'} of a's TX ring "
        f"(page {hint // PAGE}) without marking the page")
