"""virtio-blk on packed virtqueues, driven in-process on guarded memory
(tests/harness/engine_rig.py, packed_ring.py), each case in a forked child:
reads, writes, flushes and GET_ID on a RAM disk; a file disk whose
requests finish at the I/O threads (their used descriptors each move the
used cursor by their own chain's slots); a buffer id posted again while
its request is outstanding (E_DUP); the stop's base after a drain."""
from __future__ import annotations

import pytest

from tests.harness.engine_rig import (
    F_WRITE, FEAT_INDIRECT, FEAT_VERSION_1, PAGE, BlkRig, Guest, RingError, blk_header,
)
from tests.harness.guarded import GuardedArea, run_forked
from tests.harness.packed_ring import FEAT_RING_PACKED, FRESH_BASE, packed_at_ends

SIZE = 8
DESC, DRV, DEV, BUF, BUF2 = range(5)
REGIONS = [(0x10000, PAGE), (0x20000, PAGE), (0x30000, PAGE), (0x100000, 2 * PAGE),
           (0x102000, PAGE)]
PACKED = FEAT_VERSION_1 | FEAT_INDIRECT | FEAT_RING_PACKED
T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8
S_OK = 0


class PBlk:
    """A blk device with one packed queue of `size` at its regions' ends."""

    def __init__(self, backend: str = "malloc", path: str | None = None, size: int = SIZE,
                 start: bool = True) -> None:
        self.g = Guest(REGIONS)
        kw = {"path": path} if path else {}
        self.rig = BlkRig(self.g, backend, features=PACKED, **kw)
        self.dev = self.rig.dev
        self.size = size
        self.ring = packed_at_ends(self.g, size, DESC, DRV, DEV)
        if start:
            self.start(FRESH_BASE)

    def start(self, base: int):
        return self.dev.start_ring(0, self.size, *self.ring.addresses, base, -1, -1, True)

    def request(self, id_: int, kind: int, sector: int = 0, data: bytes = b"",
                in_len: int = 0, at: int | None = None) -> tuple[int, int]:
        """A request as buffer id_: header and status in BUF2 at 64 * k,
        its data (<= 1 KiB, out or in) in BUF at 1024 * k, k = `at` (default
        id_ % 8).  Returns (status address, data address)."""
        k = id_ % 8 if at is None else at
        base = self.g.start(BUF2) + 64 * k
        buf = self.g.start(BUF) + 1024 * k
        self.g.write(base, blk_header(kind, sector))
        descs = [(base, 16, 0)]
        if data:
            self.g.write(buf, data)
            descs.append((buf, len(data), 0))
        if in_len:
            descs.append((buf, in_len, F_WRITE))
        st = base + 48
        descs.append((st, 1, F_WRITE))
        self.ring.post(descs, id_)
        return st, buf

    def burst(self) -> int:
        return self.dev.run_burst(0)

    def broken(self) -> int:
        return self.rig.broken(self.dev, 0)


def test_write_read_flush_and_get_id_on_a_packed_queue():
    def case():
        b = PBlk()
        st0, _ = b.request(0, T_OUT, 3, b"\xa5" * 1024)
        st1, into = b.request(1, T_IN, 3, in_len=1024)
        assert b.burst() == 2
        assert b.ring.take_used() == [(0, 1), (1, 1025)]
        st2, _ = b.request(2, T_FLUSH)
        st3, ident = b.request(3, T_GET_ID, in_len=20)       # slots 0-2 of the next lap
        assert b.burst() == 2
        assert b.ring.take_used() == [(2, 1), (3, 21)]
        assert b.broken() == 0
        assert [b.g.read(s, 1) for s in (st0, st1, st2, st3)] == [bytes([S_OK])] * 4
        assert b.g.read(into, 1024) == b"\xa5" * 1024
        assert b.g.read(ident, 3) == b"rig"
        st = b.dev.ring_state(0)
        assert (st["last_avail_idx"], st["avail_wrap"], st["last_used_idx"], st["used_wrap"]) \
            == (3, 0, 3, 0)
        assert b.dev.stop_ring(0) == 3 | (3 << 16)         # both wrap counters 0 now
    run_forked(case)


def test_requests_wrap_the_ring_many_times():
    """A ring of 5 slots, requests of 3: the chains themselves wrap."""
    def case():
        b = PBlk(size=5)
        for n in range(40):
            b.request(n % 5, T_OUT, n, bytes([n]) * 512)
            assert b.burst() == 1
            assert b.ring.take_used() == [(n % 5, 1)]
            st, into = b.request((n + 1) % 5, T_IN, n, in_len=512)
            assert b.burst() == 1
            assert b.ring.take_used() == [((n + 1) % 5, 513)]
            assert b.g.read(into, 512) == bytes([n]) * 512
        assert b.broken() == 0
    run_forked(case)


def test_a_file_disk_answers_at_the_io_threads(tmp_path):
    """Requests of 3, 2 and 3 slots at the I/O threads; the stop drains
    them, and the driver follows the used descriptors by their slots."""
    path = str(tmp_path / "disk.img")
    open(path, "wb").close()

    def case():
        b = PBlk(backend="file", path=path)
        b.request(5, T_OUT, 8, b"\x11" * 1024)
        b.request(6, T_FLUSH)
        b.request(7, T_OUT, 16, b"\x22" * 512)
        b.burst()
        base = b.dev.stop_ring(0)
        assert base == 0               # 8 slots: one whole lap, both wrap counters now 0
        assert sorted(b.ring.take_used()) == [(5, 1), (6, 1), (7, 1)]
        assert b.dev.read_backend(8 * 512, 1024) == b"\x11" * 1024
        assert b.dev.read_backend(16 * 512, 512) == b"\x22" * 512
        assert b.broken() == 0
        assert b.start(base) is None
        st, into = b.request(0, T_IN, 8, in_len=512)
        b.burst()
        b.dev.stop_ring(0)
        assert b.ring.take_used() == [(0, 513)]
        assert b.g.read(into, 512) == b"\x11" * 512
        b.rig.close()
    run_forked(case)


def test_an_id_posted_again_while_outstanding_stops_the_ring(tmp_path):
    path = str(tmp_path / "disk.img")
    open(path, "wb").close()

    def case():
        b = PBlk(backend="file", path=path)
        st, _ = b.request(4, T_OUT, 8, b"\x5a" * 1024)
        b.request(4, T_OUT, 16, b"\x66" * 1024, at=5)
        b.burst()
        assert b.broken() == RingError.DUP
        b.dev.stop_ring(0)
        assert b.ring.take_used() == [(4, 1)]               # the first one is answered
        assert b.g.read(st, 1) == bytes([S_OK])
        assert b.dev.read_backend(16 * 512, 1024) == bytes(1024)
        b.rig.close()
    run_forked(case)


@pytest.mark.parametrize("bad_id", [SIZE, 0xFFFF])
def test_an_id_outside_the_ring_stops_it(bad_id):
    def case():
        b = PBlk()
        b.request(bad_id, T_FLUSH)
        b.burst()
        assert b.broken() == RingError.PACKED_ID
        assert b.ring.take_used() == []
    run_forked(case)


def test_a_request_without_header_or_status_stops_the_ring():
    def case():
        b = PBlk()
        base = b.g.start(BUF)
        b.ring.post([(base, 8, 0), (base + 100, 1, F_WRITE)], 0)
        b.burst()
        assert b.broken() == RingError.BLK_HDR
        c = PBlk()
        c.g.write(base, blk_header(T_FLUSH))
        c.ring.post([(base, 16, 0)], 0)
        c.burst()
        assert c.broken() == RingError.BLK_STATUS
    run_forked(case)


def test_inflight_tracking_is_refused_on_a_packed_queue():
    """Until the packed inflight layout is served, a packed queue with an
    inflight region does not start (rather than write the split layout)."""
    def case():
        b = PBlk(start=False)
        area = GuardedArea(PAGE, name="inflight")
        b.rig.inflight(area, 0, SIZE, 16 + 16 * SIZE)
        with pytest.raises(ValueError, match="inflight"):
            b.start(FRESH_BASE)
    run_forked(case)
