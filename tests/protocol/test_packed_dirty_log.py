"""The dirty log is exact with packed rings (test_dirty_log.py does split).

Device a's front-end (packed rings of 1024 entries: a descriptor ring of
four pages) plays QEMU at migration start -- SET_LOG_BASE, SET_FEATURES +
LOG_ALL, SET_VRING_ADDR with the LOG flag and, as QEMU does, the device
event area's guest address as log_guest_addr -- then device b sends known
frames to a and a sends a few to b.  The rings were moved beforehand so
that the used descriptors of the logged traffic cross from the first page
of each descriptor ring into the second.

- ``written``, which must be marked: each consumed RX buffer's first
  ``used.len`` bytes, and the descriptor-ring slots the device wrote used
  descriptors into (packed rings have no used ring: that is where answers
  go).
- ``allowed``: ``written``, the consumed RX buffers in full, and the page
  of the two event suppression areas (the device writes its own one when it
  turns kicks on or off).
- ``untouched``, which must stay clean: a's TX buffers, the descriptor
  ring's other pages, RX buffers the daemon did not consume.
"""
from __future__ import annotations

import time

import pytest

from tests.protocol.daemon_helpers import (
    MiB, close_frontend, daemon_fixtures, frame, new_token, open_frontend, send_one,
)
from tests.protocol.test_dirty_log import LogFile, pages_of, start_logging, wanted_features

from vfe.testing.frontend import Frontend
from vfe.testing.guest_ram import PAGE
from vfe.virtio.constants import F, bit

daemon, daemon_guard = daemon_fixtures({"a": "", "b": ""})

MEM = 16 * MiB
QSIZE = 1024                  # 16 KiB of descriptors: four pages
MOVE = 250                    # slots used before logging: the logged ones cross into page 2
N_FRAMES = 12                 # b -> a while logging
A_TX_FRAMES = 10              # a -> b while logging
RX_POSTED = 300               # RX buffers a keeps posted


def desc_pages(fe: Frontend, index: int, first: int, count: int) -> set[int]:
    """Pages of ``count`` descriptor-ring slots from ``first`` (wrapping)."""
    ring = fe.rings[index]
    out: set[int] = set()
    for k in range(count):
        out |= pages_of(ring.ring_gpa + ring.layout.desc + 16 * ((first + k) % ring.size), 16)
    return out


def take_rx(fe: Frontend, want: int, timeout: float = 3.0) -> list:
    """The next ``want`` used RX buffers of pair 0: [(slot, size, used.len, data)]."""
    ring = fe.rings[0]
    out: list = []
    deadline = time.monotonic() + timeout
    while len(out) < want:
        for u in ring.driver.get_used():
            slot, size = u.token
            out.append((slot, size, u.length, fe.memory.read(ring.slot_gpa(slot), u.length)))
        if len(out) < want:
            assert time.monotonic() < deadline, f"{len(out)} of {want} frames arrived"
            time.sleep(0.001)
    return out


def repost(fe: Frontend, taken: list) -> None:
    ring = fe.rings[0]
    for slot, size, _, _ in taken:
        ring.driver.add_chain([(ring.slot_gpa(slot), size, True)], token=(slot, size),
                              publish=False)
    ring.driver.publish()
    fe.kick(0)


@pytest.fixture
def pair(daemon):
    made: list[Frontend] = []
    logs: list[LogFile] = []

    def open_(mrg: bool):
        a = open_frontend(daemon, "a", 1, post_rx=False, mem_size=MEM, queue_size=QSIZE,
                          features=wanted_features(mrg), packed=True)
        made.append(a)
        b = open_frontend(daemon, "b", 1)
        made.append(b)
        assert a.features & bit(F.RING_PACKED) and bool(a.features & bit(F.NET_MRG_RXBUF)) == mrg
        log = LogFile(MEM)
        logs.append(log)
        return a, b, log

    yield open_
    for fe in made:
        close_frontend(daemon, fe)
    for log in logs:
        log.close()


@pytest.mark.parametrize("size", [64, 1514])
@pytest.mark.parametrize("mrg", [True, False], ids=["mrg_rxbuf", "no_mrg_rxbuf"])
def test_every_page_the_daemon_writes_into_packed_rings_is_marked(pair, mrg, size):
    a, b, log = pair(mrg)
    rx, tx = a.rings[0], a.rings[1]
    a.post_rx_buffers(0, RX_POSTED)
    # move both of a's rings MOVE slots on, without logging
    for _ in range(MOVE):
        send_one(a, 0, b, size=60)
    for _ in range(MOVE // 50):
        for _ in range(50):
            b.send_frame(0, frame(a.mac, b.mac, new_token(), 60))
        repost(a, take_rx(a, 50))
    assert b.wait_tx_done(0, 2.0) and a.wait_tx_done(0, 2.0)
    rx_from, tx_from = rx.driver.position.used_idx, tx.driver.position.used_idx
    assert rx_from == tx_from == MOVE

    start_logging(a, log)
    log.clear()
    for _ in range(A_TX_FRAMES):
        send_one(a, 0, b, size=size)
    sent = [frame(a.mac, b.mac, new_token(), size) for _ in range(N_FRAMES)]
    for f in sent:
        b.send_frame(0, f)
    got = take_rx(a, N_FRAMES)
    assert [data[a.net_hdr_len:] for _, _, _, data in got] == sent
    assert b.wait_tx_done(0, 2.0)

    written = set().union(*(pages_of(rx.slot_gpa(slot), n) for slot, _, n, _ in got))
    written |= desc_pages(a, 0, rx_from, N_FRAMES) | desc_pages(a, 1, tx_from, A_TX_FRAMES)
    assert len(desc_pages(a, 0, rx_from, N_FRAMES)) == 2      # the answers cross a page
    events = pages_of(rx.ring_gpa + rx.layout.avail, 8) | pages_of(tx.ring_gpa + tx.layout.avail, 8)
    allowed = written | events
    allowed |= set().union(*(pages_of(rx.slot_gpa(slot), size_) for slot, size_, _, _ in got))
    untouched = pages_of(tx.buf_gpa, tx.size * tx.buf_size)
    for ring in (rx, tx):
        untouched |= pages_of(ring.ring_gpa + ring.layout.desc, ring.layout.desc_len)
    taken = {slot for slot, _, _, _ in got}
    untouched |= set().union(*(pages_of(rx.slot_gpa(s), rx.buf_size)
                               for s in range(rx.size) if s not in taken))
    untouched -= allowed
    assert untouched

    def check() -> None:
        deadline = time.monotonic() + 1.0
        while True:
            marked = log.marked()
            missing = written - marked
            if not missing or time.monotonic() >= deadline:
                break
            time.sleep(0.005)
        assert not missing, f"pages written but not marked: {sorted(missing)}"
        assert not marked - allowed, f"pages marked without a write: {sorted(marked - allowed)}"
        assert not marked & untouched

    check()
    a.stop()                  # the source's vhost_dev_stop: GET_VRING_BASE, nothing written after
    check()
