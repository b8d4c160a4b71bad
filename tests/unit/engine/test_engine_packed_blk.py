"""virtio-blk on packed virtqueues, driven in-process on guarded memory
(tests/harness/engine_rig.py, packed_ring.py), each case in a forked child:
reads, writes, flushes and GET_ID on a RAM disk; a file disk whose
requests finish at the I/O threads (their used descriptors each move the
used cursor by their own chain's slots); a buffer id posted again while
its request is outstanding (E_DUP); the stop's base after a drain; the
packed inflight region (initialised, a new process resubmitting from its
copies, a half-published batch kept or rolled back, garbage refused)."""
from __future__ import annotations

import os
import struct
import time

import pytest

from vfe import _engine
from tests.harness.engine_rig import (
    F_INDIRECT, F_WRITE, FEAT_INDIRECT, FEAT_VERSION_1, PAGE, BlkRig, Guest, RingError, blk_header,
)
from tests.harness.guarded import GuardedArea, run_forked
from tests.harness.packed_ring import F_AVAIL, FEAT_RING_PACKED, FRESH_BASE, packed_at_ends

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


# -- inflight tracking (the packed layout of QueueRegionPacked / DescStatePacked)

PIF_HEADER = struct.Struct("<QHHHHHHBB7x")       # features .. old_used_wrap_counter, padding
PIF_DESC = struct.Struct("<BxHHHQHHIQ")          # inflight, next, last, num, counter, id, flags, len, addr


def test_the_engine_s_packed_inflight_layout():
    c = _engine.inflight_layout(packed=True)
    assert (c["header_size"], c["desc_size"]) == (PIF_HEADER.size + 3, PIF_DESC.size) == (32, 32)
    h = PIF_HEADER.pack(0, 0xA1A2, 0xB1B2, 0xC1C2, 0xC3C4, 0xD1D2, 0xD3D4, 0xE1, 0xE2)
    for field, fmt, value in (("version", "<H", 0xA1A2), ("desc_num", "<H", 0xB1B2),
                              ("free_head", "<H", 0xC1C2), ("old_free_head", "<H", 0xC3C4),
                              ("used_idx", "<H", 0xD1D2), ("old_used_idx", "<H", 0xD3D4),
                              ("used_wrap_counter", "<B", 0xE1),
                              ("old_used_wrap_counter", "<B", 0xE2)):
        assert struct.unpack_from(fmt, h, c[field])[0] == value, field
    d = PIF_DESC.pack(0x11, 0x2122, 0x3132, 0x4142, 0x5152535455565758, 0x6162, 0x7172,
                      0x81828384, 0x9192939495969798)
    for field, fmt, value in (("desc_inflight", "<B", 0x11), ("desc_next", "<H", 0x2122),
                              ("desc_last", "<H", 0x3132), ("desc_num_descs", "<H", 0x4142),
                              ("desc_counter", "<Q", 0x5152535455565758), ("desc_id", "<H", 0x6162),
                              ("desc_flags", "<H", 0x7172), ("desc_len", "<I", 0x81828384),
                              ("desc_addr", "<Q", 0x9192939495969798)):
        assert struct.unpack_from(fmt, d, c[field])[0] == value, field


def _region(b: PBlk, size: int = SIZE):
    """A packed inflight region for queue 0 ending at a guard page."""
    qlen = 32 + 32 * size
    area = GuardedArea(PAGE, name="inflight")
    off = area.end_offset(qlen)
    b.dev.set_inflight(area.addr + off, qlen, 1, size, qlen)
    return area, off, qlen


def test_a_fresh_region_is_initialised_and_the_base_stands():
    def case():
        b = PBlk(start=False)
        area, off, qlen = _region(b)
        base = 5 | 1 << 15 | (5 | 1 << 15) << 16
        assert b.start(base) == -1
        hdr = PIF_HEADER.unpack(area.read(off, PIF_HEADER.size))
        assert hdr[1:] == (1, SIZE, 0, 0, 5, 5, 1, 1)
        nexts = [PIF_DESC.unpack(area.read(off + 32 + 32 * i, 32))[1] for i in range(SIZE)]
        assert nexts == list(range(1, SIZE + 1))
        st = b.dev.ring_state(0)
        assert (st["last_avail_idx"], st["last_used_idx"]) == (5, 5)
    run_forked(case)


def test_a_new_process_resubmits_what_the_old_one_left_inflight(tmp_path):
    """Device A takes three requests (3, 2 and 3 slots) to its I/O threads
    and is never served again (its process "died"); device B starts the
    same ring with the same region and a stale base: it resubmits all
    three in fetch order from the region's copies (their slots now may
    hold anything), answers them, and the ring continues behind them."""
    path = str(tmp_path / "disk.img")
    with open(path, "wb") as f:
        f.write(b"\x77" * 64 * 512)

    def case():
        a = PBlk(backend="file", path=path, start=False)
        area, off, qlen = _region(a)
        assert a.start(FRESH_BASE) == -1
        st5, buf5 = a.request(5, T_IN, 8, in_len=512)
        st6, _ = a.request(6, T_FLUSH)
        st7, buf7 = a.request(7, T_IN, 16, in_len=512)
        a.burst()
        hdr = PIF_HEADER.unpack(area.read(off, PIF_HEADER.size))
        assert hdr[3] == hdr[4] == 8                     # free_head = old_free_head: 8 entries taken
        heads = [e for e in range(SIZE) if area.read(off + 32 + 32 * e, 1) == b"\x01"]
        assert heads == [0, 3, 5]
        # the "crash": A's slots 0-7 get scribbled on; B comes up with the same region
        for slot in range(SIZE):
            a.ring.write_desc(slot, 0xDEAD, 1, 0xFFFF, F_AVAIL)     # neither used nor available in lap 0
        b = PBlk.__new__(PBlk)
        b.g, b.size, b.ring = a.g, SIZE, a.ring
        b.rig = BlkRig(a.g, "malloc", features=PACKED)
        b.dev = b.rig.dev
        b.dev.set_inflight(area.addr + off, qlen, 1, SIZE, qlen)
        assert b.start(FRESH_BASE) == 3
        assert b.dev.inflight_pending(0) == 3
        st = b.dev.ring_state(0)
        assert (st["last_avail_idx"], st["avail_wrap"], st["last_used_idx"], st["used_wrap"]) \
            == (0, 0, 0, 1)
        assert b.burst() == 3
        assert b.ring.take_used() == [(5, 513), (6, 1), (7, 513)]
        assert [b.g.read(x, 1) for x in (st5, st6, st7)] == [bytes([S_OK])] * 3
        hdr = PIF_HEADER.unpack(area.read(off, PIF_HEADER.size))
        assert hdr[5:] == (0, 0, 0, 0)                   # used cursor: a whole lap, wrap 0
        assert all(area.read(off + 32 + 32 * e, 1) == b"\x00" for e in range(SIZE))
        # and the ring goes on
        st, _ = b.request(1, T_FLUSH)
        assert b.burst() == 1
        assert b.ring.take_used() == [(1, 1)]
    run_forked(case)


def _free_list(area, off) -> list[int]:
    """The region's free list from free_head (at most SIZE + 1 entries)."""
    free, e = [], PIF_HEADER.unpack(area.read(off, PIF_HEADER.size))[3]
    while e < SIZE and len(free) <= SIZE:
        free.append(e)
        e = PIF_DESC.unpack(area.read(off + 32 + 32 * e, 32))[1]
    return free


def _write_region(area, off, header, descs):
    """The header, entries `descs` {entry: fields}, and every other entry
    free, linked to the next (entries 2.. after a 2-entry chain)."""
    area.write(off, PIF_HEADER.pack(*header) + b"\0\0\0")
    for e in range(SIZE):
        d = descs.get(e, (0, e + 1, 0, 0, 0, 0, 0, 0, 0))
        area.write(off + 32 + 32 * e, PIF_DESC.pack(*d))


def test_a_batch_the_guest_saw_is_kept_and_one_it_did_not_is_rolled_back():
    """used_idx moved since old_used_idx (a batch was being published when
    the process died): if the ring shows the used descriptor at
    old_used_idx the batch stands (its request is not resubmitted), else
    the region goes back to its old_* state (the request is)."""
    def case(published):
        b = PBlk(start=False)
        area, off, qlen = _region(b)
        base = b.g.start(BUF2)
        b.g.write(base, blk_header(T_FLUSH))
        # one request of 2 slots in entries 0, 1 (inflight), batch 0 -> 2 half published
        descs = {0: (1, 1, 1, 2, 0, 3, 0, 16, base), 1: (0, 2, 0, 0, 0, 3, F_WRITE, 1, base + 48)}
        _write_region(area, off, (0, 1, SIZE, 0, 2, 2, 0, 1, 1), descs)
        if published:
            b.ring.write_desc(0, 0, 1, 3, (1 << 7) | (1 << 15))   # used descriptor, lap 1
        recovered = b.start(FRESH_BASE)
        st = b.dev.ring_state(0)
        if published:
            assert recovered == 0
            assert (st["last_avail_idx"], st["last_used_idx"]) == (2, 2)
        else:
            assert recovered == 1
            assert (st["last_avail_idx"], st["last_used_idx"]) == (2, 0)
            assert b.burst() == 1
            assert b.ring.take_used() == [(3, 1)]
            assert b.g.read(base + 48, 1) == bytes([S_OK])
    run_forked(case, True)
    run_forked(case, False)


@pytest.mark.parametrize("header,descs,message", [
    ((0, 7, SIZE, 0, 0, 0, 0, 1, 1), {}, "version 7"),
    ((0, 1, SIZE * 2, 0, 0, 0, 0, 1, 1), {}, "tracks 16 entries"),
    ((0, 1, SIZE, 0, 0, SIZE, SIZE, 1, 1), {}, "out of range"),            # used cursor
    # the free list empty (free_head = size), inflight chains holding more slots than the ring
    ((0, 1, SIZE, SIZE, SIZE, 0, 0, 1, 1), {2: (1, 0, 0, SIZE + 1, 0, 0, 0, 0, 0)},
     "out of range"),
    ((0, 1, SIZE, SIZE, SIZE, 0, 0, 1, 1), {2: (1, 0, 0, 5, 0, 0, 0, 0, 0),
                                            4: (1, 0, 0, 5, 0, 0, 0, 0, 0)}, "out of range"),
])
def test_region_cursors_and_chains_out_of_range_are_refused(header, descs, message):
    def case():
        b = PBlk(start=False)
        area, off, qlen = _region(b)
        _write_region(area, off, header, descs)
        before = area.read(0, area.size)
        with pytest.raises(ValueError, match=message):
            b.start(FRESH_BASE)
        assert area.read(0, area.size) == before           # refused before anything is written
        assert not b.dev.ring_state(0)["ready"]
    run_forked(case)


def test_a_kept_batch_whose_cursor_is_out_of_range_is_refused():
    def case():
        b = PBlk(start=False)
        area, off, qlen = _region(b)
        _write_region(area, off, (0, 1, SIZE, 0, 0, 0x7FFF, 0, 1, 1), {})
        b.ring.write_desc(0, 0, 1, 3, (1 << 7) | (1 << 15))       # "the guest saw it"
        with pytest.raises(ValueError, match="out of range"):
            b.start(FRESH_BASE)
    run_forked(case)


def test_a_region_whose_free_list_is_broken_leaves_requests_untracked():
    """free_head 0xFFFF: nothing can be recorded, so nothing is; the
    request is served all the same and the region is as it was."""
    def case():
        b = PBlk(start=False)
        area, off, qlen = _region(b)
        _write_region(area, off, (0, 1, SIZE, 0xFFFF, 0xFFFF, 0, 0, 1, 1), {})
        assert b.start(FRESH_BASE) == 0
        before = area.read(0, area.size)
        st, _ = b.request(2, T_FLUSH)
        assert b.burst() == 1
        assert b.ring.take_used() == [(2, 1)] and b.g.read(st, 1) == bytes([S_OK])
        changed = [i for i, (x, y) in enumerate(zip(before, area.read(0, area.size))) if x != y]
        assert all(off + 16 <= i < off + 22 for i in changed), changed    # the cursors only
    run_forked(case)


def test_a_request_whose_region_entry_was_scribbled_on_is_answered(tmp_path):
    """The front-end rewrites the `last` link of an outstanding request's
    entry: the completion does not follow it (out of range), the request
    is answered, nothing outside the region is touched."""
    path = str(tmp_path / "disk.img")
    open(path, "wb").close()

    def case():
        b = PBlk(backend="file", path=path, start=False)
        area, off, qlen = _region(b)
        assert b.start(FRESH_BASE) == -1
        st, _ = b.request(1, T_OUT, 8, b"\x42" * 512)
        b.burst()
        area.write(off + 32 + 4, struct.pack("<H", 0xFFFF))           # entry 0's `last`
        b.dev.stop_ring(0)
        assert b.ring.take_used() == [(1, 1)] and b.g.read(st, 1) == bytes([S_OK])
        assert area.read(off + 32, 1) == b"\x00"                       # not inflight any more
        b.rig.close()
    run_forked(case)


@pytest.mark.parametrize("entry,expected", [
    ((1, 0xFFFF, 0, 2, 0, 3, 0, 16, None), RingError.NEXT),       # chain link out of the region
    ((1, 1, 1, 2, 0, 3, F_INDIRECT, 16, None), RingError.INDIRECT),  # indirect, not last
    ((1, 1, 1, 2, 0, 3, 0, 16, 0xFFFF_0000), RingError.ADDR),
    ((1, 1, 1, 1, 0, SIZE, 0, 16, None), RingError.PACKED_ID),   # id of its (only) entry
])
def test_garbage_resubmitted_chains_stop_the_ring(entry, expected):
    """An inflight entry whose copies are garbage is checked like a ring
    chain when resubmitted: the ring stops, nothing outside the region or
    guest memory is touched."""
    def case():
        b = PBlk(start=False)
        area, off, qlen = _region(b)
        base = b.g.start(BUF2)
        b.g.write(base, blk_header(T_FLUSH))
        e = list(entry)
        e[8] = base if e[8] is None else e[8]
        descs = {0: tuple(e), 1: (0, 2, 0, 0, 0, 3, F_WRITE, 1, base + 48)}
        _write_region(area, off, (0, 1, SIZE, 2, 2, 0, 0, 1, 1), descs)
        assert b.start(FRESH_BASE) == 1
        b.burst()
        assert b.broken() == expected, b.dev.ring_state(0)
        assert b.ring.take_used() == []
    run_forked(case)


def test_set_inflight_sizes_packed_queue_regions_by_the_packed_layout():
    def case():
        b = PBlk(start=False)
        a = GuardedArea(PAGE)
        with pytest.raises(ValueError, match="cannot hold 8 entries"):
            b.dev.set_inflight(a.addr, 16 + 16 * SIZE, 1, SIZE, PAGE)     # a split queue's size
        b.dev.set_inflight(a.addr, 32 + 32 * SIZE, 1, SIZE, PAGE)
    run_forked(case)


def test_a_copy_posted_while_outstanding_is_never_marked_inflight(tmp_path):
    """E_DUP with a region: the copy stops the ring before it is marked,
    so after the stop nothing is left for a next process to resubmit."""
    path = str(tmp_path / "disk.img")
    open(path, "wb").close()

    def case():
        b = PBlk(backend="file", path=path, start=False)
        area, off, qlen = _region(b)
        assert b.start(FRESH_BASE) == -1
        b.request(4, T_OUT, 8, b"\x5a" * 1024)
        b.request(4, T_OUT, 16, b"\x66" * 1024, at=5)
        b.burst()
        assert b.broken() == RingError.DUP
        b.dev.stop_ring(0)
        assert b.ring.take_used() == [(4, 1)]
        assert [e for e in range(SIZE) if area.read(off + 32 + 32 * e, 1) != b"\x00"] == []
        assert sorted(_free_list(area, off)) == list(range(SIZE))     # the copy's entries too
        b.rig.close()
    run_forked(case)


# -- found by review: crash windows, region layouts, reposted ids

def _flush_chain(b: PBlk, k: int, region: int = BUF2) -> tuple[int, int]:
    """A FLUSH request's header (and status at +48) in `region` at 64 * k."""
    base = b.g.start(region) + 64 * k
    b.g.write(base, blk_header(T_FLUSH))
    return base, base + 48


def _inflight_flushes(b: PBlk, area, off, bases, used=(0, 1), free_head=None):
    """The region after a process took FLUSH requests ids 0.. (2 entries,
    2 slots each: entries 2k, 2k+1) whose headers are at `bases`, answered
    none, and died: used cursor `used` (idx, wrap), the rest free."""
    descs = {}
    for k, base in enumerate(bases):
        descs[2 * k] = (1, 2 * k + 1, 2 * k + 1, 2, k, k, 0, 16, base)
        descs[2 * k + 1] = (0, 2 * k + 2, 0, 0, 0, k, F_WRITE, 1, base + 48)
    fh = 2 * len(bases) if free_head is None else free_head
    _write_region(area, off, (0, 1, SIZE, fh, fh, used[0], used[0], used[1], used[1]), descs)


def test_flipping_the_layout_of_a_running_queue_is_refused(tmp_path):
    """SET_FEATURES without RING_PACKED while the packed queue runs with
    requests at the I/O threads: refused, the queue stays packed, and its
    stop answers the requests in the packed layout."""
    path = str(tmp_path / "disk.img")
    open(path, "wb").close()

    def case():
        b = PBlk(backend="file", path=path)
        b.request(5, T_OUT, 8, b"\x11" * 1024)
        b.request(6, T_FLUSH)
        b.burst()
        with pytest.raises(RuntimeError, match="layout"):
            b.dev.set_features(FEAT_VERSION_1 | FEAT_INDIRECT)
        assert b.dev.ring_state(0)["packed"] and b.broken() == 0
        base = b.dev.stop_ring(0)
        assert sorted(b.ring.take_used()) == [(5, 1), (6, 1)]
        assert base == 5 | 1 << 15 | (5 | 1 << 15) << 16
        b.dev.set_features(FEAT_VERSION_1 | FEAT_INDIRECT)         # stopped: allowed
        assert not b.dev.ring_state(0)["packed"]
        b.rig.close()
    run_forked(case)


def test_a_batch_cut_short_shows_the_driver_no_used_descriptor():
    """Three resubmitted requests; the third's memory vanishes (SIGBUS,
    caught) after the first two were answered but before their batch was
    published.  Neither of their slots may show a used descriptor: a
    process killed there would otherwise leave the guest a used descriptor
    it never published, which the next process answers again."""
    def case():
        b = PBlk(start=False)
        area, off, qlen = _region(b)
        bases = [_flush_chain(b, 0)[0], _flush_chain(b, 1)[0], _flush_chain(b, 0, region=BUF)[0]]
        _inflight_flushes(b, area, off, bases)
        for slot in range(6):
            b.ring.write_desc(slot, 0, 0, 0, F_AVAIL)            # what the driver left: lap 1, available
        assert b.start(FRESH_BASE) == 3
        os.ftruncate(b.g.areas[BUF][1].fd, 0)                    # BUF's pages are gone
        b.dev.stop_ring(0)
        assert b.broken() == RingError.FAULT
        assert [b.ring.read_desc(s)[3] for s in range(6)] == [F_AVAIL] * 6
    run_forked(case)


@pytest.mark.parametrize("first_slot_flags,kept", [
    (F_AVAIL | (1 << 15), True),      # the used descriptor of lap 1
    (1 << 15, True),                  # the driver took it and made the slot available in lap 0
    (F_AVAIL, False),                 # still the driver's available descriptor of lap 1
])
def test_a_half_published_batch_is_decided_by_the_used_bit(first_slot_flags, kept):
    """used_idx moved 0 -> 2 (wrap 1): the batch was published iff slot 0's
    USED bit is the batch's wrap counter, even once the driver reposted it."""
    def case():
        b = PBlk(start=False)
        area, off, qlen = _region(b)
        base, st = _flush_chain(b, 0)
        descs = {0: (1, 1, 1, 2, 0, 3, 0, 16, base), 1: (0, 2, 0, 0, 0, 3, F_WRITE, 1, st)}
        _write_region(area, off, (0, 1, SIZE, 0, 2, 2, 0, 1, 1), descs)
        b.ring.write_desc(0, 0, 1, 3, first_slot_flags)
        assert b.start(FRESH_BASE) == (0 if kept else 1)
        assert b.dev.ring_state(0)["last_used_idx"] == (2 if kept else 0)
    run_forked(case)


def test_a_half_published_batch_of_exactly_the_ring_is_kept():
    """A batch of SIZE slots moves the used cursor a whole lap: only its
    wrap counter changes.  The guest saw it, so nothing is resubmitted."""
    def case():
        b = PBlk(start=False)
        area, off, qlen = _region(b)
        descs = {}
        for k in range(4):
            base, st = _flush_chain(b, k)
            descs[2 * k] = (1, 2 * k + 1, 2 * k + 1, 2, k, k, 0, 16, base)
            descs[2 * k + 1] = (0, SIZE, 0, 0, 0, k, F_WRITE, 1, st)
        # returned to the free list (0 -> 1 -> ... -> 7), used cursor 0/1 -> 0/0; not committed
        for k in range(4):
            descs[2 * k + 1] = descs[2 * k + 1][:1] + (2 * k + 2,) + descs[2 * k + 1][2:]
        _write_region(area, off, (0, 1, SIZE, 0, SIZE, 0, 0, 0, 1), descs)
        b.ring.write_desc(0, 0, 1, 0, F_AVAIL | (1 << 15))       # slot 0: used, lap 1
        assert b.start(FRESH_BASE) == 0
        st = b.dev.ring_state(0)
        assert (st["last_used_idx"], st["used_wrap"], st["last_avail_idx"], st["avail_wrap"]) \
            == (0, 0, 0, 0)
    run_forked(case)


def test_a_region_sized_for_split_rings_is_refused_once_packed_is_negotiated():
    """set_inflight before SET_FEATURES: the stride was checked for the
    split layout; a packed ring must not start with it (its 32-byte
    entries would run past the region)."""
    def case():
        b = PBlk(start=False)
        b.dev.set_features(FEAT_VERSION_1 | FEAT_INDIRECT)
        qlen = 16 + 16 * SIZE
        area = GuardedArea(PAGE, name="inflight")
        off = area.end_offset(qlen)
        b.dev.set_inflight(area.addr + off, qlen, 1, SIZE, qlen)
        b.dev.set_features(PACKED)
        before = area.read(0, area.size)
        with pytest.raises(ValueError, match="room for"):
            b.start(FRESH_BASE)
        assert area.read(0, area.size) == before
        assert not b.dev.ring_state(0)["ready"]
    run_forked(case)


def test_a_region_initialised_for_a_split_ring_is_refused_by_a_packed_one():
    """Version 1 and desc_num written, everything else zero (a split
    ring's fresh region): as a packed region its free list loops on entry
    0, so it is refused, untouched, instead of starting on garbage."""
    def case():
        b = PBlk(start=False)
        area, off, qlen = _region(b)
        area.write(off, PIF_HEADER.pack(0, 1, SIZE, 0, 0, 0, 0, 0, 0) + b"\0\0\0")
        before = area.read(0, area.size)
        with pytest.raises(ValueError, match="out of range|corrupt"):
            b.start(FRESH_BASE)
        assert area.read(0, area.size) == before
    run_forked(case)


def test_a_cyclic_free_list_is_refused():
    def case():
        b = PBlk(start=False)
        area, off, qlen = _region(b)
        descs = {e: (0, (e + 1) % 3, 0, 0, 0, 0, 0, 0, 0) for e in range(3)}   # 0 -> 1 -> 2 -> 0
        _write_region(area, off, (0, 1, SIZE, 0, 0, 0, 0, 1, 1), descs)
        before = area.read(0, area.size)
        with pytest.raises(ValueError, match="out of range|corrupt"):
            b.start(FRESH_BASE)
        assert area.read(0, area.size) == before
    run_forked(case)


@pytest.mark.parametrize("num", [0, 1, SIZE + 1, 0xFFFF])
def test_a_resubmitted_chain_keeps_the_length_recovery_saw(num):
    """The front-end rewrites an inflight entry's `num` after the start:
    the resubmission still walks the chain recovery counted."""
    def case():
        b = PBlk(start=False)
        area, off, qlen = _region(b)
        base, st = _flush_chain(b, 0)
        _inflight_flushes(b, area, off, [base])
        assert b.start(FRESH_BASE) == 1
        area.write(off + 32 + 6, struct.pack("<H", num))          # entry 0's num
        assert b.burst() == 1
        assert b.broken() == 0
        assert b.ring.take_used() == [(0, 1)] and b.g.read(st, 1) == bytes([S_OK])
        assert (b.dev.ring_state(0)["last_used_idx"]) == 2
    run_forked(case)


def test_region_entries_past_the_ring_are_never_used():
    """A region with room for 16 entries per queue, a ring of 8, and a
    free list the front-end pointed at entry 12: requests go untracked,
    entry 12 is left alone."""
    def case():
        b = PBlk(start=False)
        qlen = 32 + 32 * 16
        area = GuardedArea(PAGE, name="inflight")
        off = area.end_offset(qlen)
        b.dev.set_inflight(area.addr + off, qlen, 1, 16, qlen)
        _write_region(area, off, (0, 1, SIZE, SIZE, SIZE, 0, 0, 1, 1), {})
        assert b.start(FRESH_BASE) == 0
        area.write(off + 12, struct.pack("<HH", 12, 12))           # free_head, old_free_head
        entry12 = area.read(off + 32 + 32 * 12, 32)
        st, _ = b.request(2, T_FLUSH)
        assert b.burst() == 1
        assert b.ring.take_used() == [(2, 1)]
        assert area.read(off + 32 + 32 * 12, 32) == entry12
    run_forked(case)


@pytest.mark.parametrize("backend", ["malloc", "null"])
def test_an_id_posted_twice_in_one_burst_stops_the_ring_on_any_backend(backend):
    """The copy comes before the first one's used descriptor is published:
    E_DUP, and the region stays consistent (nothing inflight, every entry
    back on the free list once the first one is answered)."""
    def case():
        b = PBlk(backend=backend, start=False)
        area, off, qlen = _region(b)
        assert b.start(FRESH_BASE) == -1
        st, _ = b.request(4, T_FLUSH)
        b.request(4, T_FLUSH, at=5)
        b.burst()
        assert b.broken() == RingError.DUP
        assert b.ring.take_used() == [(4, 1)] and b.g.read(st, 1) == bytes([S_OK])
        assert [e for e in range(SIZE) if area.read(off + 32 + 32 * e, 1) != b"\x00"] == []
        assert sorted(_free_list(area, off)) == list(range(SIZE))
    run_forked(case)


@pytest.mark.parametrize("base", [0x1_0000, 0x8000_8000])
def test_a_split_ring_refuses_a_base_above_16_bits(base):
    def case():
        b = PBlk(start=False)
        b.dev.set_features(FEAT_VERSION_1 | FEAT_INDIRECT)
        split = [b.g.hva(b.g.start(r)) for r in (DESC, DRV, DEV)]
        assert b.dev.start_ring(0, SIZE, *split, 0, -1, -1, True) is None
        b.dev.stop_ring(0)
        with pytest.raises(ValueError, match="base"):
            b.dev.start_ring(0, SIZE, *split, base, -1, -1, True)
        assert not b.dev.ring_state(0)["ready"]
    run_forked(case)


def test_dirty_log_of_a_packed_queue():
    """Migrating (LOG_ALL, log_used): the used descriptors' page, the data
    a read wrote, every status byte and the device event area (written at
    the start: no kicks wanted) are logged; the data a write only read,
    and the driver's event area, are not."""
    def case():
        b = PBlk(start=False)
        b.dev.set_features(PACKED | (1 << 26))
        log = GuardedArea(PAGE, name="log")
        b.dev.set_log(log.addr, log.size)
        b.dev.start_ring(0, SIZE, *b.ring.addresses, FRESH_BASE, -1, -1, True, True)
        st_in, into = b.request(1, T_IN, 8, in_len=512)              # data page 0x100000
        st_out, _ = b.request(4, T_OUT, 8, b"\x33" * 512)           # data page 0x101000
        assert b.burst() == 2
        bits = log.read(0, log.size)

        def logged(gpa):
            page = gpa // 4096
            return bool(bits[page >> 3] & (1 << (page & 7)))
        assert logged(b.ring.desc_gpa) and logged(into) and logged(st_in) and logged(st_out)
        assert logged(b.ring.device_gpa)
        assert not logged(b.g.start(BUF) + PAGE) and not logged(b.ring.driver_gpa)
    run_forked(case)


def test_the_region_is_committed_before_the_guest_is_interrupted():
    """The call fd is a full pipe, so the interrupt's write blocks: seen
    from another thread while it does, the answered request is no longer
    inflight in the region and the used cursor is committed (a process
    killed after telling the guest must not have it answered again)."""
    def case():
        import fcntl
        import threading
        b = PBlk(start=False)
        area, off, qlen = _region(b)
        r, w = os.pipe()
        fcntl.fcntl(w, fcntl.F_SETFL, os.O_NONBLOCK)
        try:
            while True:
                os.write(w, bytes(65536))
        except BlockingIOError:
            pass
        fcntl.fcntl(w, fcntl.F_SETFL, 0)
        assert b.dev.start_ring(0, SIZE, *b.ring.addresses, FRESH_BASE, -1, w, True) == -1
        b.request(2, T_FLUSH)
        burst_tid, seen = threading.get_native_id(), {}

        def watch():
            deadline = time.monotonic() + 20                  # a bound, not a measurement
            try:
                while time.monotonic() < deadline:
                    with open(f"/proc/self/task/{burst_tid}/syscall") as f:
                        call = f.read().split()
                    if call[:2] == ["1", hex(w)]:              # blocked in write(call fd)
                        hdr = PIF_HEADER.unpack(area.read(off, PIF_HEADER.size))
                        seen["inflight"] = area.read(off + 32, 1)[0]
                        seen["used"] = (hdr[5], hdr[7])
                        seen["committed"] = (hdr[6], hdr[8])
                        break
            finally:
                os.read(r, 65536)                              # room: the write goes through
        t = threading.Thread(target=watch)
        t.start()
        assert b.burst() == 1
        t.join()
        assert seen and seen["inflight"] == 0 and seen["used"] == seen["committed"] == (2, 1), seen
    run_forked(case)
