"""A bdev's storage (vfe.engine.BlkBackend) served by several blk devices,
and --force_in_order, driven in-process (tests/harness/engine_rig.py), each
case in a forked child:

- two devices on one malloc or file storage: what one writes the other
  reads back; the storage lives while any device holds it;
- a device larger than its storage, or writable on read-only storage, is
  refused; a file that shrank since the storage opened it is refused;
- in order: a request answered within the burst (GET_ID) waits behind one
  at the I/O threads, and is answered right behind it; without in_order
  it overtakes it; a stop that gives up on a request stuck at the I/O
  threads still answers (out of order) the ones that finished behind it.
"""
from __future__ import annotations

import gc
import os
import threading
import time

import pytest

from tests.harness import userfault
from tests.harness.engine_rig import (
    F_NEXT, F_WRITE, PAGE, BlkRig, Guest, RingError, blk_header, ring_at_ends,
)
from tests.harness.guarded import run_forked
from vfe.engine import BlkBackend

SIZE = 8
DESC, AVAIL, USED, BUF, BUF2 = range(5)
REGIONS = [(0x10000, PAGE), (0x20000, PAGE), (0x30000, PAGE), (0x100000, 2 * PAGE),
           (0x102000, 2 * PAGE)]
T_IN, T_OUT, T_GET_ID = 0, 1, 8
S_OK = 0
MiB = 1 << 20


class Disk:
    """One blk device (one queue of SIZE) on ``backend`` in a guest of its own."""

    def __init__(self, backend, capacity: int = MiB, **kw) -> None:
        self.g = Guest(REGIONS)
        self.rig = BlkRig(self.g, backend, capacity=capacity, **kw)
        self.dev = self.rig.dev
        self.ring = ring_at_ends(self.g, SIZE, DESC, AVAIL, USED)
        self.rig.start(self.dev, 0, self.ring)

    def request(self, head: int, kind: int, sector: int = 0, data: bytes = b"", in_len: int = 0) -> int:
        """A request chain at descriptors head.. with its buffers at BUF + 1 KiB *
        head (header, data, status) and BUF2 + 1 KiB * head (data in);
        posted.  Returns the data-in address."""
        base, din = self.g.start(BUF) + 1024 * head, self.g.start(BUF2) + 1024 * head
        self.g.write(base, blk_header(kind, sector))
        descs = [(base, 16, 0)]
        if data:
            self.g.write(base + 16, data)
            descs.append((base + 16, len(data), 0))
        if in_len:
            descs.append((din, in_len, F_WRITE))
        descs.append((base + 1000, 1, F_WRITE))
        i = head
        for k, (a, ln, fl) in enumerate(descs):
            last = k == len(descs) - 1
            self.ring.set_desc(i, a, ln, fl | (0 if last else F_NEXT), i + 1)
            i += 1
        self.ring.post(head)
        return din

    def answered(self, n: int) -> list[int]:
        """Bursts until ``n`` requests are answered; their heads in used order."""
        deadline = time.monotonic() + 10
        while self.ring.used_idx() < n:
            assert time.monotonic() < deadline, f"{self.ring.used_idx()} of {n} answered"
            self.dev.run_burst(0)
        return [self.ring.used(i)[0] for i in range(n)]

    def write(self, head: int, sector: int, data: bytes) -> None:
        self.request(head, T_OUT, sector, data)

    def read(self, head: int, sector: int, n: int) -> bytes:
        din = self.request(head, T_IN, sector, in_len=n)
        return din


def _image(tmp_path, size: int = MiB) -> str:
    path = str(tmp_path / "disk.img")
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.mark.parametrize("kind", ["malloc", "file"])
def test_two_devices_on_one_storage_see_the_same_data(tmp_path, kind):
    path = _image(tmp_path) if kind == "file" else None

    def case():
        storage = BlkBackend(kind, MiB, path)
        pf, vf = Disk(storage), Disk(storage)
        assert pf.dev.storage is storage and vf.dev.storage is storage
        pf.write(0, 8, b"\x5a" * 512)
        assert pf.answered(1) == [0]
        din = vf.read(0, 8, 512)
        assert vf.answered(1) == [0] and vf.g.read(din, 512) == b"\x5a" * 512
        vf.write(4, 16, b"\xa5" * 512)                 # and the other way
        assert vf.answered(2) == [0, 4]
        din = pf.read(4, 16, 512)
        assert pf.answered(2) == [0, 4] and pf.g.read(din, 512) == b"\xa5" * 512
        # the storage lives while a device holds it: drop ours, close one device
        del storage
        pf.rig.close()
        del pf
        gc.collect()
        din = vf.read(0, 8, 512)
        assert vf.answered(3)[-1] == 0 and vf.g.read(din, 512) == b"\x5a" * 512
        vf.rig.close()
    run_forked(case)


def test_a_device_must_fit_its_storage(tmp_path):
    path = _image(tmp_path)

    def case():
        g = Guest(REGIONS)
        with pytest.raises(ValueError, match="larger than its malloc storage"):
            BlkRig(g, BlkBackend("malloc", MiB), capacity=2 * MiB)
        with pytest.raises(ValueError, match="open read-only: the device must be read-only too"):
            BlkRig(g, BlkBackend("file", MiB, path, read_only=True))
        storage = BlkBackend("file", MiB, path)
        os.truncate(path, MiB // 2)                     # shrank after the bdev opened it
        with pytest.raises(OSError, match="smaller than the 1048576 bytes the disk serves"):
            BlkRig(g, storage)
        assert os.stat(path).st_size == MiB // 2        # and is not grown back
        with pytest.raises(ValueError, match="use null, malloc or file"):
            BlkBackend("nvme", MiB)
        with pytest.raises(ValueError, match="positive multiple of 512"):
            BlkBackend("malloc", 1000)
    run_forked(case)


@pytest.mark.parametrize("in_order", [False, True])
def test_in_order_holds_back_what_would_overtake(tmp_path, in_order):
    """A write goes to the I/O threads, a GET_ID behind it is answered
    within the same burst: without in_order its used entry comes first;
    with it nothing is answered until the write is, then both in order."""
    path = _image(tmp_path)

    def case():
        d = Disk("file", path=path, in_order=in_order)
        d.write(0, 8, b"\x11" * 512)
        din = d.request(4, T_GET_ID, in_len=20)
        d.dev.run_burst(0)                 # the write is queued, never reaped in this burst
        if in_order:
            assert d.ring.used_idx() == 0
            assert d.answered(2) == [0, 4]
        else:
            assert d.ring.used_idx() == 1 and d.ring.used(0)[0] == 4
            assert d.answered(2) == [4, 0]
        assert d.g.read(din, 3) == b"rig" and d.dev.read_backend(8 * 512, 512) == b"\x11" * 512
        assert d.dev.stop_ring(0) == 2
        d.rig.close()
    run_forked(case)


def test_a_stop_answers_what_in_order_held_back(tmp_path):
    path = _image(tmp_path)

    def case():
        d = Disk("file", path=path, in_order=True)
        d.write(0, 8, b"\x22" * 512)
        d.request(4, T_GET_ID, in_len=20)
        d.dev.run_burst(0)
        assert d.dev.stop_ring(0) == 2               # waits for both, answers both
        assert d.ring.used_idx() == 2 and [d.ring.used(i)[0] for i in range(2)] == [0, 4]
        # the slots are free again: the ring restarts and serves the same heads
        assert d.dev.start_ring(0, SIZE, *d.ring.addresses, 2, -1, -1, True) is None
        d.request(0, T_GET_ID, in_len=20)
        assert d.answered(3)[-1] == 0
        d.rig.close()
    run_forked(case)


@pytest.mark.skipif(not userfault.available(), reason="needs userfaultfd (root or "
                    "vm.unprivileged_userfaultfd) to hold a read at the I/O threads")
def test_a_stop_that_gives_up_answers_what_finished_behind_the_stuck_request(tmp_path):
    """In order, a READ whose data page is missing (userfaultfd) stays at
    the I/O threads for as long as the test wants; a GET_ID behind it is
    answered within the burst and held back.  A bad head breaks the ring,
    so the stop waits QUIESCE_BROKEN_MS (0.5 s), not 10 s, before giving up
    on the READ: the GET_ID is answered then, out of order, and the stop
    index counts it; the READ never is.  Before, the GET_ID was dropped
    with the READ: consumed by the stop index, never in the used ring."""
    path = _image(tmp_path)
    with open(path, "r+b") as f:
        f.write(b"\x33" * 4096)                        # what the stuck READ will read

    def case():
        d = Disk("file", path=path, in_order=True)
        release = threading.Event()
        read_status, id_status = d.g.start(BUF) + 1000, d.g.start(BUF) + 4096 + 1000
        d.g.write(read_status, b"\xff")
        area, off = d.g.locate(d.g.start(BUF2), PAGE)   # head 0's data-in page
        stuck = userfault.FirstTouch(area, off // PAGE, bytes(PAGE),
                                     lambda: release.wait(20))
        din = d.read(0, 0, 4096)
        id_in = d.request(4, T_GET_ID, in_len=20)
        d.ring.post(SIZE)                              # a bad head: the ring breaks
        d.dev.run_burst(0)
        assert d.dev.ring_state(0)["broken"] == RingError.HEAD
        assert d.ring.used_idx() == 0                  # the GET_ID waits behind the READ
        assert d.dev.stop_ring(0) == 2                 # gives up on the READ
        assert d.ring.used_idx() == 1 and d.ring.used(0) == (4, 21)
        assert d.g.read(id_in, 3) == b"rig" and d.g.read(id_status, 1) == bytes([S_OK])
        assert d.g.read(read_status, 1) == b"\xff"
        # the ring restarts and serves head 4 again while the READ is still stuck
        assert d.dev.start_ring(0, SIZE, *d.ring.addresses, 2, -1, -1, True) is None
        d.g.write(id_in, bytes(20))
        d.ring.publish(2)                              # the bad head's avail entry is reused
        d.request(4, T_GET_ID, in_len=20)
        assert d.answered(2) == [4, 4] and d.g.read(id_in, 3) == b"rig"
        # the READ ends: its data lands, nothing answers it; the device closes
        release.set()
        assert stuck.touched.wait(10)
        stuck.close()
        deadline = time.monotonic() + 10
        while d.g.read(din, 4096) != b"\x33" * 4096:
            assert time.monotonic() < deadline, "the released READ never finished"
            time.sleep(0.01)
        d.dev.run_burst(0)
        d.rig.close()                                  # joins the I/O threads
        assert d.ring.used_idx() == 2 and d.g.read(read_status, 1) == b"\xff"
    run_forked(case)
