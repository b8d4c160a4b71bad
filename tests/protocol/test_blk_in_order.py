"""--force_in_order (`--device blk,...,in-order=on`; the controller's
controller_virtio_blk_create --force_in_order) on a file bdev, against a
real daemon driven by the Python front-end.

A file bdev's I/O threads finish requests in any order: a FLUSH behind 64
MiB of dirty page cache takes a while, a read of cached data does not.  On
the same queue, FLUSH then READ then GET_ID (answered within the burst):

- without in-order the read and GET_ID are answered first (what
  test_blk_aio.py's slow-flush test relies on; checked here too, so the
  in-order check cannot pass by luck of timing);
- with in-order the used entries come in the order the requests were
  taken, and GET_VRING_BASE (a stop) waits for the ones held back.
"""
from __future__ import annotations

import os

import pytest

from tests.protocol.blk_helpers import S_OK, T_FLUSH, T_GET_ID, T_IN, BlkDaemon, BlkQueue
from tests.protocol.daemon_helpers import MiB, close_frontend, serving

from vfe.testing.frontend import Frontend


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inorder")
    imgs = {"any_order": tmp / "a.img", "in_order": tmp / "o.img"}
    for p in imgs.values():
        p.write_bytes(b"")
    d = BlkDaemon({}, {"any_order": f"bdev=file,path={imgs['any_order']},size=128,serial=ANY",
                       "in_order": f"bdev=file,path={imgs['in_order']},size=128,serial=ORD,in-order=on"},
                  workers=1)
    with serving(d):
        yield d


@pytest.fixture
def blk(disk):
    opened: list[Frontend] = []

    def open_(dev: str) -> BlkQueue:
        disk.wait_detached(dev)
        fe = Frontend.connect(disk.paths[dev])
        fe.dev = dev
        opened.append(fe)
        fe.start(rings=1, queue_size=64, buf_size=64, mem_size=96 * MiB)
        return BlkQueue(fe, 0)

    yield open_
    for fe in opened:
        close_frontend(disk, fe)
    assert disk.alive() and "Traceback" not in disk.log()


def slow_flush_then_fast_requests(q: BlkQueue) -> int:
    """64 MiB of dirty page cache, then FLUSH, READ (cached), GET_ID;
    used->idx before these three."""
    q.write(200_000, b"\x5a" * 4096)           # past the 64 MiB written next
    chunk = os.urandom(4 * MiB)
    for k in range(16):
        q.submit(1, k * 8192, chunk, kick=False, indirect=True)
    os.eventfd_write(q.ring.kick_fd, 1)
    assert all(s == S_OK for s, _, _ in q.complete(16, timeout=60))
    before = q.ring.driver.used_idx()
    q.submit(T_FLUSH, kick=False)
    q.submit(T_IN, 200_000, in_len=4096, kick=False)
    q.submit(T_GET_ID, in_len=20)
    return before


def test_without_in_order_the_fast_ones_overtake_the_flush(blk):
    q = blk("any_order")
    slow_flush_then_fast_requests(q)
    got = q.complete(3, timeout=60)
    assert got[-1][1:] == (1, b""), got           # the FLUSH last


def test_in_order_answers_in_the_order_taken(blk):
    q = blk("in_order")
    slow_flush_then_fast_requests(q)
    got = q.complete(3, timeout=60)
    assert [g[0] for g in got] == [S_OK] * 3
    assert [g[2] for g in got] == [b"", b"\x5a" * 4096, b"ORD".ljust(20, b"\0")]


def test_a_stop_waits_for_the_requests_held_back(blk):
    q = blk("in_order")
    before = slow_flush_then_fast_requests(q)
    base = q.fe.get_vring_base(0)            # answered once all three are
    assert base == (before + 3) & 0xFFFF
    assert q.ring.driver.used_idx() == base
    got = q.complete(3)
    assert [g[2][:3] for g in got] == [b"", b"\x5a" * 3, b"ORD"]
