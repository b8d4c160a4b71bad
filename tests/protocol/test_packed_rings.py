"""Packed virtqueues (VIRTIO_F_RING_PACKED) against a real daemon, driven by
the Python front-end's packed driver (vfe/testing/packed_ring.py):
negotiation, frames between two packed devices (rings wrapping several
times, chained and indirect buffers), a packed device talking to a split
one, the ring position with its wrap counters through GET_VRING_BASE /
SET_VRING_BASE and a reconnect, and blk requests on packed queues.

One daemon serves the module: net devices a and b (2 queue pairs each), a
malloc disk."""
from __future__ import annotations

import os

import pytest

from tests.protocol.blk_helpers import BlkDaemon, BlkQueue
from tests.protocol.daemon_helpers import (
    MiB, close_frontend, exchange, frame, new_token, open_frontend, recv_token, send_one, serving,
)

from vfe.testing.channel import NackError
from vfe.testing.frontend import Frontend
from vfe.testing.packed_ring import PackedDriverRing
from vfe.vhost.inflight import region_size
from vfe.virtio.constants import F, bit
from vfe.virtio.layouts import PACKED_BASE_RESET, PackedBase

QSIZE = 64          # small rings: a few hundred frames wrap them several times


@pytest.fixture(scope="module")
def daemon():
    with serving(BlkDaemon({"a": "queues=2", "b": "queues=2"},
                           {"disk": "bdev=malloc,size=8,queues=2"})) as d:
        yield d


@pytest.fixture
def opened(daemon):
    made: list[Frontend] = []

    def make(dev, pairs=2, **kw):
        kw.setdefault("queue_size", QSIZE)
        fe = open_frontend(daemon, dev, pairs, **kw)
        made.append(fe)
        return fe

    yield make
    for fe in made:
        close_frontend(daemon, fe)


def test_packed_is_offered_and_negotiated(daemon, opened):
    mark = daemon.mark()
    a = opened("a", packed=True)
    assert a.backend_features & bit(F.RING_PACKED)
    assert a.features & bit(F.RING_PACKED)
    assert all(isinstance(r.driver, PackedDriverRing) for r in a.rings.values())
    daemon.wait_log("net0: packed virtqueues (VIRTIO_F_RING_PACKED)", since=mark)
    # without asking, the front-end stays split, as before
    b = opened("b")
    assert not b.features & bit(F.RING_PACKED)


def _stream(src: Frontend, dst: Frontend, n: int, pair: int = 0, **send_kw) -> None:
    """n frames src -> dst on ``pair``, each checked on arrival."""
    for i in range(n):
        token = new_token()
        f = frame(dst.mac, src.mac, token, 60 + (i * 37) % 1400)
        src.send_frame(pair, f, **send_kw)
        got = recv_token(dst, token, 2.0)
        assert got is not None and got[1] == f, f"frame {i} of {n} lost or corrupted"
    assert src.wait_tx_done(pair, 2.0)


def test_frames_between_two_packed_devices_wrap_the_rings(opened):
    a = opened("a", packed=True)
    b = opened("b", packed=True)
    exchange(a, b)                             # both queue pairs, both ways
    n = 3 * QSIZE + 5                          # every ring wraps three times
    _stream(a, b, n, pair=0)
    _stream(b, a, n, pair=1)
    _stream(a, b, 20, pair=1, split_header=True)     # two-descriptor chains
    _stream(b, a, 20, pair=0, indirect=True)         # indirect tables
    for fe in (a, b):
        for ring in fe.rings.values():
            assert ring.driver.position.avail_idx < QSIZE


def test_packed_device_to_split_device(opened):
    a = opened("a", packed=True)
    b = opened("b")
    exchange(a, b)
    _stream(a, b, QSIZE + 3)
    _stream(b, a, QSIZE + 3)


def test_base_with_wrap_counters_round_trips_and_survives_a_reconnect(daemon, opened):
    a = opened("a", 1, packed=True)
    b = opened("b", 1)
    _stream(a, b, QSIZE + 7)                   # TX ring in its second lap: wrap counter 0
    _stream(b, a, 2 * QSIZE + 3)               # RX ring in its third lap
    bases = a.stop()
    tx = PackedBase.decode(bases[1])
    # the TX ring answered every frame: both device positions are the
    # driver's, the used half spelled out in bits 16-31
    assert bases[1] == a.rings[1].driver.position.encode()
    assert tx.avail_wrap is False and tx.used_wrap is False, hex(bases[1])
    rx = PackedBase.decode(bases[0])
    assert (rx.used_idx, rx.used_wrap) == (a.rings[0].driver.position.used_idx,
                                           a.rings[0].driver.position.used_wrap)
    assert bases[0] != PACKED_BASE_RESET
    # restart on the same connection: SET_VRING_BASE with what GET_VRING_BASE said
    for i in (0, 1):
        a.setup_ring(i, QSIZE)
    assert a.rings[1].base == bases[1]
    send_one(a, 0, b)
    send_one(b, 0, a)
    # stop again, then a new connection (QEMU's reconnect): the positions carry over
    bases = a.stop()
    a.reconnect(daemon.paths["a"])
    a.start(queue_pairs=1, queue_size=QSIZE, packed=True)
    assert {i: r.base for i, r in a.rings.items()} == bases
    _stream(a, b, QSIZE)
    _stream(b, a, QSIZE)


def test_set_vring_base_refuses_an_index_outside_the_ring(daemon, opened):
    a = opened("a", 1, packed=True)
    a.stop()
    a.ack_all = True
    a.set_vring_num(1, QSIZE)
    for bad in (PackedBase(QSIZE, True, 0, True), PackedBase(0, True, QSIZE + 1, False)):
        with pytest.raises(NackError):
            a.set_vring_base(1, bad.encode())
    # the ring restarts where it stopped, and passes frames
    a.set_vring_base(1, a.rings[1].base)
    a.setup_ring(1, QSIZE)
    send_one(a, 0, opened("b", 1))


def test_blk_requests_on_packed_queues(daemon):
    daemon.wait_detached("disk")
    fe = Frontend.connect(daemon.paths["disk"])
    fe.dev = "disk"
    try:
        fe.start(rings=2, queue_size=16, buf_size=64, mem_size=32 * MiB, packed=True)
        assert fe.features & bit(F.RING_PACKED)
        # QEMU's order: features, then the region, in the packed layout
        assert fe.inflight is not None
        assert fe.inflight.mmap_size == region_size(2, 16, packed=True)
        queues = [BlkQueue(fe, i) for i in range(2)]
        # more requests than a ring holds: both queues wrap
        for k in range(40):
            q = queues[k % 2]
            data = bytes((k + j) & 0xFF for j in range(4096))
            q.write(8 * k, data, pieces=1 + k % 3, indirect=k % 4 == 3)
            assert q.read(8 * k, 4096, pieces=1 + k % 2) == data
    finally:
        close_frontend(daemon, fe)


def test_blk_from_split_to_packed_swaps_the_inflight_region(daemon):
    """A guest's firmware drives the disk split (with a split inflight
    region), then its OS acks RING_PACKED: the daemon drops the split region
    at SET_FEATURES, takes a packed one, and serves the packed queues."""
    daemon.wait_detached("disk")
    fe = Frontend.connect(daemon.paths["disk"])
    fe.dev = "disk"
    try:
        fe.start(rings=2, queue_size=16, buf_size=64, mem_size=32 * MiB)
        assert fe.inflight.mmap_size == region_size(2, 16)
        BlkQueue(fe, 0).write(0, b"\x11" * 4096)
        fe.stop()
        # the reset: QEMU frees its region; the OS's start acks RING_PACKED first
        fe.inflight_map.close()
        os.close(fe.inflight_fd)
        fe.inflight, fe.inflight_fd, fe.inflight_map = None, -1, None
        mark = daemon.mark()
        fe.set_features(fe.features | bit(F.RING_PACKED))
        fe.sync()
        daemon.wait_log("RING_PACKED acked: the split inflight region is dropped", since=mark)
        fe.setup_inflight(2, 16)
        assert fe.inflight.mmap_size == region_size(2, 16, packed=True)
        for i in (0, 1):
            fe.setup_ring(i, 16, buf_size=64)
        fe.sync()
        q = BlkQueue(fe, 1)
        assert isinstance(q.ring.driver, PackedDriverRing)
        assert q.read(0, 4096) == b"\x11" * 4096
        q.write(8, b"\x22" * 4096)
        assert BlkQueue(fe, 0).read(8, 4096) == b"\x22" * 4096
    finally:
        close_frontend(daemon, fe)
