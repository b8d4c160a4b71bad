"""File bdevs served asynchronously (cython_ext/blk_aio.pxd), against a real
daemon driven by the Python front-end:

- a FLUSH that takes a while (fdatasync of 64 MiB of dirty page cache) holds neither its own queue nor another one: reads queued behind
  it are answered first;
- GET_VRING_BASE waits for the ring's I/O in flight: when it answers, the
  FLUSH's used entry is there;
- DISCARD punches a hole in the file, WRITE_ZEROES zeroes a range;
- with direct=on, aligned requests go through O_DIRECT and unaligned ones
  (sector-sized but oddly cut buffers) still read back right.
"""
from __future__ import annotations

import os
import time

import pytest

from tests.protocol.blk_helpers import (
    S_OK, T_DISCARD, T_FLUSH, T_IN, T_OUT, T_WRITE_ZEROES, BlkDaemon, BlkQueue, ranges,
)
from tests.protocol.daemon_helpers import MiB, close_frontend, serving

from vfe.testing.frontend import Frontend

SIZE_MB = 512


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("aio")
    imgs = {"buffered": tmp / "b.img", "direct": tmp / "d.img"}
    for p in imgs.values():
        p.write_bytes(b"")
    d = BlkDaemon({}, {"buffered": f"bdev=file,path={imgs['buffered']},size={SIZE_MB},queues=2",
                       "direct": f"bdev=file,path={imgs['direct']},size=64,queues=1,direct=on"},
                  workers=1)
    d.imgs = imgs
    with serving(d):
        yield d


@pytest.fixture
def blk(disk):
    opened: list[Frontend] = []

    def open_(dev: str, rings: int = 1, mem_mb: int = 16) -> Frontend:
        disk.wait_detached(dev)
        fe = Frontend.connect(disk.paths[dev])
        fe.dev = dev
        opened.append(fe)
        fe.start(rings=rings, queue_size=64, buf_size=64, mem_size=mem_mb * MiB)
        fe.q = [BlkQueue(fe, i) for i in range(rings)]
        return fe

    yield open_
    for fe in opened:
        close_frontend(disk, fe)
    assert disk.alive() and "Traceback" not in disk.log()


def dirty_the_page_cache(q: BlkQueue, mib: int) -> None:
    """Buffered writes of `mib` MiB, answered once in the page cache."""
    chunk = os.urandom(4 * MiB)
    for k in range(mib // 4):
        q.submit(1, k * 8192, chunk, kick=False, indirect=True)
    os.eventfd_write(q.ring.kick_fd, 1)
    got = q.complete(mib // 4, timeout=60)
    assert all(s == S_OK for s, _, _ in got)


def test_a_slow_flush_holds_no_queue(blk):
    fe = blk("buffered", rings=2, mem_mb=112)
    q0, q1 = fe.q
    q0.write(900_000, b"\x77" * 4096)
    dirty_the_page_cache(q0, 32)
    os.sync()                                   # only what follows is dirty
    dirty_the_page_cache(q0, 64)
    # a FLUSH, then a read on the same queue and one on the other
    t0 = time.monotonic()
    flush = q0.submit(T_FLUSH)
    q0.submit(T_IN, 900_000, in_len=4096)
    q1.submit(T_IN, 900_000, in_len=4096)
    got1 = q1.complete(1, timeout=30)
    t_read = time.monotonic() - t0
    got0 = q0.complete(2, timeout=60)
    t_flush = time.monotonic() - t0
    assert got1[0][0] == S_OK and got1[0][2] == b"\x77" * 4096
    # on queue 0 the read (queued after the FLUSH) was answered first
    assert [g[2] for g in got0] == [b"\x77" * 4096, b""], (t_read, t_flush)
    assert [g[0] for g in got0] == [S_OK, S_OK]
    print(f"read answered after {t_read * 1000:.1f} ms, flush after {t_flush * 1000:.1f} ms")
    assert fe.q[0].ring.driver.outstanding == 0 and flush >= 0


def test_get_vring_base_waits_for_io_in_flight(blk):
    fe = blk("buffered", rings=1, mem_mb=64)
    q = fe.q[0]
    dirty_the_page_cache(q, 32)
    before = q.ring.driver.used_idx()
    q.submit(T_FLUSH)
    base = fe.get_vring_base(0)                 # answered once the FLUSH is done
    assert base == (before + 1) & 0xFFFF
    assert q.ring.driver.used_idx() == base     # its used entry is published
    assert q.complete(1)[0][:2] == (S_OK, 1)


def test_a_head_posted_twice_breaks_only_its_ring(blk, disk):
    """Finding 3: a 4 MiB write, and its head posted again behind it in the
    same batch, while the write is at the I/O threads.  Its request slot
    used to be reused: the request was linked to itself, completed forever,
    and GET_VRING_BASE never returned (the world stayed stopped: every
    worker and the control loop froze).  Now the second copy stops that
    ring, the first is answered, GET_VRING_BASE answers within 1 s, and
    the device's other queue and the other disk go on."""
    fe = blk("buffered", rings=2, mem_mb=32)
    q0, q1 = fe.q
    before = q0.ring.driver.used_idx()
    data = os.urandom(4 * MiB)
    mark = disk.mark()
    head = q0.submit(T_OUT, 4096, data, kick=False, publish=False, indirect=True)
    q0.post_raw(head)
    disk.wait_log("blk0: ring 0 stopped: descriptor head posted again while its request is "
                  "outstanding (the guest must reset the device)", since=mark)
    t0 = time.monotonic()
    base = fe.get_vring_base(0)
    assert time.monotonic() - t0 < 1.0
    assert base == (before + 1) & 0xFFFF                 # the copy was not taken
    assert q0.ring.driver.used_idx() == base             # the write was answered ...
    assert q0.complete(1)[0][:2] == (S_OK, 1)
    assert q1.read(4096, len(data)) == data              # ... and done
    other = blk("direct")
    other.q[0].write(0, b"\x5a" * 4096)
    assert other.q[0].read(0, 4096) == b"\x5a" * 4096
    assert disk.alive() and "Traceback" not in disk.log()


def test_discard_punches_a_hole_and_write_zeroes_zeroes(blk, disk):
    q = blk("buffered").q[0]
    data = os.urandom(1 * MiB)
    q.write(200_000, data)
    q.write(202_048, data)
    assert q.request(T_FLUSH)[0] == S_OK
    img = disk.imgs["buffered"]
    fd = os.open(img, os.O_RDONLY)
    try:
        off = 200_000 * 512
        assert os.lseek(fd, off, os.SEEK_DATA) == off
        assert q.request(T_DISCARD, 0, ranges((200_000, 2048, 0)))[:2] == (S_OK, 1)
        # whole 4 KiB blocks of the range are gone from the file (a hole)
        hole = os.lseek(fd, off, os.SEEK_HOLE)
        assert hole < off + MiB, (hole, off)
        assert os.pread(fd, MiB, off) == bytes(MiB)
        assert q.request(T_WRITE_ZEROES, 0, ranges((202_048, 1024, 0)))[:2] == (S_OK, 1)
        assert os.pread(fd, MiB, 202_048 * 512) == bytes(512 * 1024) + data[512 * 1024:]
    finally:
        os.close(fd)
    assert q.read(200_000, MiB) == bytes(MiB)


def test_direct_io_aligned_and_not(blk, disk):
    q = blk("direct").q[0]
    a = os.urandom(64 * 1024)
    q.write(100, a)                              # 512-aligned buffers: O_DIRECT
    assert q.read(100, len(a)) == a
    b = os.urandom(8192)
    q.write(400, b, pieces=3)                    # 2731-byte pieces: buffered
    assert q.read(400, len(b), pieces=5) == b
    assert q.read(100, len(a), pieces=7) == a
    with open(disk.imgs["direct"], "rb") as f:
        f.seek(100 * 512)
        assert f.read(len(a)) == a
        f.seek(400 * 512)
        assert f.read(len(b)) == b
