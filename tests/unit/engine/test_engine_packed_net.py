"""Packed virtqueues (VIRTIO_F_RING_PACKED) on net devices, driven
in-process on guarded memory (tests/harness/engine_rig.py, packed_ring.py):
frames through the switch between two packed devices and between a packed
and a split one, with and without mergeable buffers, wrapping rings of 4
and 5 slots many times, indirect tables, GET/SET_VRING_BASE's encoding
with the wrap counters, event suppression and the dirty log.  Each case
runs in a forked child (run_forked): a crash fails it with its signal."""
from __future__ import annotations

import os
import struct

import pytest

from tests.harness.engine_rig import (
    F_INDIRECT, F_WRITE, FEAT_INDIRECT, FEAT_MRG_RXBUF, FEAT_VERSION_1, PAGE, Guest, NetRig,
    ring_at_ends,
)
from tests.harness.guarded import GuardedArea, run_forked
from tests.harness.packed_ring import (
    EVENT_DISABLE, EVENT_ENABLE, FEAT_RING_PACKED, FRESH_BASE, packed_at_ends, packed_table,
)

TXD, TXA, TXU, RXD, RXA, RXU, BUF, BUF2 = range(8)
REGIONS = [(0x10000, PAGE), (0x20000, PAGE), (0x30000, PAGE), (0x50000, PAGE),
           (0x60000, PAGE), (0x70000, PAGE), (0x100000, 2 * PAGE), (0x102000, PAGE)]
HDR = 12
PACKED = FEAT_VERSION_1 | FEAT_INDIRECT | FEAT_RING_PACKED
SPLIT = FEAT_VERSION_1 | FEAT_INDIRECT
FEAT_LOG_ALL = 1 << 26


def frame(n: int, length: int = 60) -> bytes:
    """A broadcast frame (flooded to the other port) carrying its number."""
    body = struct.pack("<I", n) + bytes((n + i) & 0xFF for i in range(length - 18))
    return b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00" + body


class World:
    """Device a's TX ring (1) and device b's RX ring (0), each packed or
    split as its features say, started; b's RX buffers are `rx_len` bytes
    at BUF + PAGE + rx_len * id."""

    def __init__(self, a_features: int = PACKED, b_features: int = PACKED, size: int = 8,
                 rx_len: int = 512, call_fd: int = -1, log_used: bool = False) -> None:
        self.g = Guest(REGIONS)
        self.rig = NetRig(self.g, a_features)
        self.rig.b.set_features(b_features)
        self.size, self.rx_len = size, rx_len
        self.tx = self._ring(a_features, TXD, TXA, TXU)
        self.rx = self._ring(b_features, RXD, RXA, RXU)
        self.tx_buf = self.g.start(BUF)
        self.rx_buf = self.g.start(BUF) + PAGE
        self.rig.a.start_ring(1, size, *self.tx.addresses, self._base(a_features), -1, -1, True,
                              log_used)
        self.rig.b.start_ring(0, size, *self.rx.addresses, self._base(b_features), -1, call_fd,
                              True, log_used)

    def _ring(self, features, d, a, u):
        if features & FEAT_RING_PACKED:
            return packed_at_ends(self.g, self.size, d, a, u)
        return ring_at_ends(self.g, self.size, d, a, u)

    @staticmethod
    def _base(features):
        return FRESH_BASE if features & FEAT_RING_PACKED else 0

    def post_rx(self, id_: int) -> None:
        addr = self.rx_buf + self.rx_len * id_
        if hasattr(self.rx, "take_used"):
            self.rx.post([(addr, self.rx_len, F_WRITE)], id_)
        else:
            self.rx.set_desc(id_, addr, self.rx_len, F_WRITE)
            self.rx.post(id_)

    def send(self, data: bytes, id_: int = 0, pieces: int = 1) -> int:
        """Frame `data` (with a zero header) as TX buffer id_, in `pieces`
        descriptors, then one TX burst."""
        blob = bytes(HDR) + data
        addr = self.tx_buf + 256 * id_
        self.g.write(addr, blob)
        cut = [len(blob) * k // pieces for k in range(pieces + 1)]
        descs = [(addr + cut[k], cut[k + 1] - cut[k], 0) for k in range(pieces)]
        if hasattr(self.tx, "take_used"):
            self.tx.post(descs, id_)
        else:
            self.tx.set_desc(id_, addr, len(blob))
            self.tx.post(id_)
        return self.rig.a.run_burst(1)

    def received(self) -> list[tuple[int, bytes]]:
        """(id, bytes incl. header) of each RX buffer used since the last call."""
        out = []
        for id_, length in self.rx.take_used():
            out.append((id_, self.g.read(self.rx_buf + self.rx_len * id_, length)))
        return out


def test_frames_cross_the_switch_between_two_packed_devices():
    def case():
        w = World()
        for i in range(4):
            w.post_rx(i)
        for i in range(3):
            assert w.send(frame(i), id_=i, pieces=1 + i) == 1
        got = w.received()
        assert [i for i, _ in got] == [0, 1, 2]
        assert [data[HDR:] for _, data in got] == [frame(i) for i in range(3)]
        assert w.tx.take_used() == [(0, 0), (1, 0), (2, 0)]
        st = w.rig.b.ring_state(0)
        assert st["packed"] and st["broken"] == 0 and st["last_avail_idx"] == 3
        assert w.rig.a.ring_state(1)["last_used_idx"] == 6      # 1 + 2 + 3 slots
    run_forked(case)


def test_mergeable_buffers_spread_a_frame_and_count_them():
    def case():
        w = World(a_features=PACKED | FEAT_MRG_RXBUF, b_features=PACKED | FEAT_MRG_RXBUF,
                  rx_len=64)
        for i in range(4):
            w.post_rx(i)
        f = frame(7, 150)
        assert w.send(f) == 1
        got = w.received()
        assert [i for i, _ in got] == [0, 1, 2]
        assert [len(d) for _, d in got] == [64, 64, HDR + 150 - 128]
        joined = b"".join(d for _, d in got)
        assert struct.unpack_from("<H", joined, 10)[0] == 3          # num_buffers
        assert joined[HDR:] == f
    run_forked(case)


def test_without_mergeable_buffers_a_frame_too_big_is_dropped():
    def case():
        w = World(rx_len=128)
        for i in range(4):
            w.post_rx(i)
        assert w.send(frame(1, 150)) == 1
        assert w.received() == []
        st = w.rig.b.ring_state(0)
        assert st["broken"] == 0 and st["last_avail_idx"] == 0
        assert w.tx.take_used() == [(0, 0)]
        assert w.send(frame(2), id_=1) == 1                  # the buffers are still there
        assert [d[HDR:] for _, d in w.received()] == [frame(2)]
    run_forked(case)


@pytest.mark.parametrize("size", [4, 5])
def test_rings_wrap_many_times(size):
    """Rings of 4 and 5 slots (packed sizes need not be powers of two),
    TX chains of 1..3 descriptors so the used cursor skips slots, 60 frames:
    every frame arrives intact, the wrap counters keep flipping."""
    def case():
        w = World(size=size)
        seen_wraps = set()
        for n in range(60):
            w.post_rx(n % size)
            assert w.send(frame(n), id_=n % size, pieces=1 + n % 3) == 1
            got = w.received()
            assert [(i, d[HDR:]) for i, d in got] == [(n % size, frame(n))], n
            assert w.tx.take_used() == [(n % size, 0)]
            st = w.rig.a.ring_state(1)
            assert st["broken"] == 0
            seen_wraps.add(st["avail_wrap"])
        assert seen_wraps == {0, 1}
        assert w.rig.b.ring_state(0)["broken"] == 0
    run_forked(case)


@pytest.mark.parametrize("a,b", [(PACKED, SPLIT), (SPLIT, PACKED)])
def test_a_packed_device_talks_to_a_split_one(a, b):
    def case():
        w = World(a_features=a, b_features=b)
        for i in range(4):
            w.post_rx(i)
        for i in range(3):
            assert w.send(frame(i), id_=i) == 1
        if hasattr(w.rx, "take_used"):
            assert [d[HDR:] for _, d in w.received()] == [frame(i) for i in range(3)]
        else:
            assert w.rx.used_idx() == 3
            for i in range(3):
                head, length = w.rx.used(i)
                assert w.g.read(w.rx_buf + 512 * head, length)[HDR:] == frame(i)
    run_forked(case)


def test_indirect_tables_on_a_packed_ring():
    """A TX frame and an RX buffer each in an indirect table of two."""
    def case():
        w = World()
        rx_table = w.g.start(BUF2)
        w.g.write(rx_table, packed_table((w.rx_buf, 40, F_WRITE), (w.rx_buf + 40, 472, F_WRITE)))
        w.rx.post([(rx_table, 32, F_INDIRECT)], 0)
        blob = bytes(HDR) + frame(3)
        w.g.write(w.tx_buf, blob)
        tx_table = w.g.start(BUF2) + 64
        w.g.write(tx_table, packed_table((w.tx_buf, 20, 0), (w.tx_buf + 20, len(blob) - 20, 0)))
        w.tx.post([(tx_table, 32, F_INDIRECT)], 0)
        assert w.rig.a.run_burst(1) == 1
        got = w.received()
        assert [(i, d[HDR:]) for i, d in got] == [(0, frame(3))]
        assert w.tx.take_used() == [(0, 0)]
    run_forked(case)


def test_vring_base_round_trip_keeps_cursors_and_wrap_counters():
    """After 11 frames on a ring of 4 (the cursors 3 slots on, the wrap
    counters flipped twice), stop_ring answers in QEMU's
    encoding, and a start with that answer carries on where it stopped."""
    def case():
        w = World(size=4)
        for n in range(11):
            w.post_rx(n % 4)
            w.send(frame(n), id_=n % 4)
            w.received()
            w.tx.take_used()
        base = w.rig.a.stop_ring(1)
        # 11 slots on a ring of 4: slot 3, the wrap counters flipped twice (back to 1)
        assert base == (3 | 1 << 15) | ((3 | 1 << 15) << 16)
        assert w.rig.b.stop_ring(0) == base
        w.rig.a.start_ring(1, 4, *w.tx.addresses, base, -1, -1, True)
        w.rig.b.start_ring(0, 4, *w.rx.addresses, base, -1, -1, True)
        st = w.rig.a.ring_state(1)
        assert (st["last_avail_idx"], st["avail_wrap"], st["last_used_idx"], st["used_wrap"]) \
            == (3, 1, 3, 1)
        for n in range(11, 14):
            w.post_rx(n % 4)
            assert w.send(frame(n), id_=n % 4) == 1
            assert [d[HDR:] for _, d in w.received()] == [frame(n)]
        # a front-end that sends only the avail half (DPDK's reading): used = avail
        w.rig.a.stop_ring(1)
        w.rig.a.start_ring(1, 4, *w.tx.addresses, 2 | 1 << 15, -1, -1, True)
        st = w.rig.a.ring_state(1)
        assert (st["last_avail_idx"], st["avail_wrap"], st["last_used_idx"], st["used_wrap"]) \
            == (2, 1, 2, 1)
    run_forked(case)


@pytest.mark.parametrize("size,base", [
    (4, 4), (4, 0x8004), (4, 4 << 16), (4, (0x8000 | 5) << 16), (4, 1 << 32),
    (0, FRESH_BASE), (32769, FRESH_BASE),
])
def test_start_refuses_sizes_and_bases_outside_the_ring(size, base):
    def case():
        w = World()
        w.rig.a.stop_ring(1)
        with pytest.raises(ValueError):
            w.rig.a.start_ring(1, size, *w.tx.addresses, base, -1, -1, True)
        assert not w.rig.a.ring_state(1)["ready"]
    run_forked(case)


def test_sizes_need_not_be_powers_of_two():
    def case():
        g = Guest([(0x10000, 2 * PAGE), (0x20000, PAGE), (0x30000, PAGE)])
        rig = NetRig(g, PACKED)
        for size in (1, 3, 200):
            r = packed_at_ends(g, size, 0, 1, 2)
            rig.a.start_ring(1, size, *r.addresses, FRESH_BASE, -1, -1, True)
            assert rig.a.ring_state(1)["size"] == size
            rig.a.stop_ring(1)
        # a split ring still wants a power of two
        rig.b.set_features(SPLIT)
        r = ring_at_ends(g, 3, 0, 1, 2)
        with pytest.raises(ValueError, match="power of two"):
            rig.b.start_ring(1, 3, *r.addresses, 0, -1, -1, True)
    run_forked(case)


def test_event_suppression():
    """Kicks are off while the engine polls (the device area says
    DISABLE); the driver's area decides each interrupt."""
    def case():
        efd = os.eventfd(0, os.EFD_NONBLOCK)
        w = World(call_fd=efd)
        assert w.rx.device_event()[1] == EVENT_DISABLE
        for i in range(4):
            w.post_rx(i)
        w.rx.set_driver_event(EVENT_DISABLE)
        w.send(frame(0), id_=0)
        with pytest.raises(BlockingIOError):
            os.eventfd_read(efd)
        w.rx.set_driver_event(EVENT_ENABLE)
        w.send(frame(1), id_=1)
        assert os.eventfd_read(efd) == 1
        assert len(w.received()) == 2
    run_forked(case)


def test_event_index_interrupts_only_past_the_driver_s_offset():
    """With EVENT_IDX the driver names the used slot (and its lap) after
    which it wants an interrupt."""
    from tests.harness.packed_ring import EVENT_DESC
    feat = PACKED | (1 << 29)

    def case():
        efd = os.eventfd(0, os.EFD_NONBLOCK)
        w = World(a_features=feat, b_features=feat, call_fd=efd)
        for i in range(8):
            w.post_rx(i)
        w.rx.set_driver_event(EVENT_DESC, 2 | 1 << 15)   # interrupt once slot 2 of lap 1 is used
        for n in range(2):
            w.send(frame(n), id_=n)
        with pytest.raises(BlockingIOError):
            os.eventfd_read(efd)
        w.send(frame(2), id_=2)
        assert os.eventfd_read(efd) == 1
        w.send(frame(3), id_=3)
        with pytest.raises(BlockingIOError):
            os.eventfd_read(efd)
        w.rx.set_driver_event(EVENT_DESC, 0)             # slot 0 of lap 0: the next lap
        for n in range(4, 8):
            w.send(frame(n), id_=n)
        with pytest.raises(BlockingIOError):
            os.eventfd_read(efd)
        w.post_rx(0)
        w.send(frame(8), id_=0)                          # slot 0 of lap 0 used
        assert os.eventfd_read(efd) == 1
    run_forked(case)


def test_dirty_log_covers_used_descriptors_and_written_buffers():
    def case():
        log = GuardedArea(PAGE, name="log")
        w = World(a_features=PACKED | FEAT_LOG_ALL, b_features=PACKED | FEAT_LOG_ALL,
                  log_used=True)
        for dev in (w.rig.a, w.rig.b):
            dev.set_log(log.addr, log.size)
        w.post_rx(0)
        w.send(frame(0))
        bits = log.read(0, log.size)

        def logged(gpa):
            page = gpa // 4096
            return bool(bits[page >> 3] & (1 << (page & 7)))
        assert logged(w.tx.desc_gpa) and logged(w.rx.desc_gpa)    # the used descriptors
        assert logged(w.rx_buf)                                   # the frame
        assert not logged(w.tx_buf)                               # read, not written
        assert not logged(w.g.start(RXA))                         # the driver's area
    run_forked(case)


def _until(cond, what: str, limit: float = 20.0) -> None:
    """Wait for a condition a worker thread brings about (a bound against
    hangs, not a measurement)."""
    import time
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.001)


@pytest.mark.parametrize("event_idx", [False, True])
def test_an_idle_worker_asks_for_kicks_and_a_kick_wakes_it(event_idx):
    """Adaptive mode on a packed TX ring: before sleeping the worker asks
    for a kick in the device area (ENABLE, or DESC naming the next slot
    and its wrap counter with EVENT_IDX); a frame and a kick wake it, and
    the frame arrives."""
    from tests.harness.packed_ring import EVENT_DESC
    from vfe.engine import Engine
    feat = PACKED | ((1 << 29) if event_idx else 0)

    def case():
        g = Guest(REGIONS)
        rig = NetRig.__new__(NetRig)
        rig.guest, rig.engine = g, Engine(workers=1, mode="adaptive", spin_us=0)
        rig.a, rig.b = rig.engine.new_net_device(2), rig.engine.new_net_device(2)
        for d in (rig.a, rig.b):
            d.set_memory(g.table())
            d.set_features(feat)
        tx = packed_at_ends(g, 8, TXD, TXA, TXU)
        rx = packed_at_ends(g, 8, RXD, RXA, RXU)
        kick = os.eventfd(0, os.EFD_NONBLOCK)
        rig.a.start_ring(1, 8, *tx.addresses, FRESH_BASE, kick, -1, True)
        rig.b.start_ring(0, 8, *rx.addresses, FRESH_BASE, -1, -1, True)
        rx_buf = g.start(BUF) + PAGE
        rx.post([(rx_buf, 512, F_WRITE)], 0)
        rig.engine.start()
        try:
            armed = (0 | 1 << 15, EVENT_DESC) if event_idx else (0, EVENT_ENABLE)
            _until(lambda: tx.device_event() == armed, f"device area {armed}")
            blob = bytes(HDR) + frame(5)
            g.write(g.start(BUF), blob)
            tx.post([(g.start(BUF), len(blob), 0)], 0)
            os.eventfd_write(kick, 1)
            _until(lambda: rx.is_used(0, 1), "the frame delivered")
            assert g.read(rx_buf + HDR, 60) == frame(5)
            armed = (1 | 1 << 15, EVENT_DESC) if event_idx else (0, EVENT_ENABLE)
            _until(lambda: tx.device_event() == armed, f"re-armed at {armed}")
        finally:
            rig.engine.stop()
        assert rig.a.ring_state(1)["broken"] == 0
    run_forked(case)


@pytest.mark.parametrize("flags", [2, 3, 0xFFFF])
def test_driver_event_flags_the_device_cannot_honour_interrupt(flags):
    """DESC without EVENT_IDX, or a value the spec does not define: the
    driver gets its interrupt (missing one could hang it)."""
    def case():
        efd = os.eventfd(0, os.EFD_NONBLOCK)
        w = World(call_fd=efd)
        w.post_rx(0)
        w.rx.set_driver_event(flags, 0xFFFF)
        w.send(frame(0))
        assert os.eventfd_read(efd) == 1
    run_forked(case)


@pytest.mark.parametrize("frames", [2, 4])
def test_dirty_log_of_a_batch_that_wraps_the_ring(frames):
    """A ring of 4 straddling a page boundary (slots 0-2 on one page, slot
    3 on the next), the batch starting at slot 3: the used descriptors'
    pages on both sides of the wrap are logged (2 frames: slots 3 and 0;
    4 frames: the whole ring), and nothing past the ring."""
    from tests.harness.packed_ring import PackedRing

    def case():
        g = Guest([(0x10000, 3 * PAGE), (0x20000, PAGE), (0x30000, PAGE), (0x50000, PAGE),
                   (0x60000, PAGE), (0x70000, PAGE), (0x100000, 2 * PAGE)])
        log = GuardedArea(PAGE, name="log")
        feat = PACKED | FEAT_LOG_ALL
        rig = NetRig(g, feat)
        desc = 0x10000 + PAGE - 48
        tx = PackedRing(g, 4, desc, 0x20000, 0x30000)
        rx = packed_at_ends(g, 8, 3, 4, 5)
        base = 3 | 1 << 15 | (3 | 1 << 15) << 16
        tx.next_avail = tx.next_used = 3
        rig.a.start_ring(1, 4, *tx.addresses, base, -1, -1, True, True)
        rig.b.start_ring(0, 8, *rx.addresses, FRESH_BASE, -1, -1, True, True)
        rig.a.set_log(log.addr, log.size)
        buf = g.start(6)
        for i in range(frames):
            rx.post([(buf + PAGE + 512 * i, 512, F_WRITE)], i)
            blob = bytes(HDR) + frame(i)
            g.write(buf + 128 * i, blob)
            tx.post([(buf + 128 * i, len(blob), 0)], i)
        assert rig.a.run_burst(1) == frames
        bits = log.read(0, log.size)

        def logged(gpa):
            page = gpa // PAGE
            return bool(bits[page >> 3] & (1 << (page & 7)))
        assert logged(desc) and logged(desc + 48)            # slot 0's page and slot 3's
        assert not logged(0x10000 + 2 * PAGE)                # past the ring
        assert tx.take_used()[:frames] == [(i, 0) for i in range(frames)]   # (zeroed slots look used)
    run_forked(case)
