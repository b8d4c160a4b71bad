"""vfe.testing.ring: the reference driver-side split ring."""
import struct

import pytest

from vfe.testing.ring import DriverRing, RingError, need_event, split_ring_layout
from vfe.virtio.constants import (
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
)

GPA = 0x100000


class Device:
    """Just enough of a device to read chains and return them."""

    def __init__(self, mem, layout, base=0):
        self.mem, self.l, self.last_avail, self.used_idx = mem, layout, base, base

    def avail_idx(self):
        return struct.unpack_from("<H", self.mem, self.l.avail + 2)[0]

    def pop(self):
        if self.avail_idx() == self.last_avail:
            return None
        head = struct.unpack_from("<H", self.mem, self.l.avail + 4 + 2 * (self.last_avail % self.l.size))[0]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        out, table, i = [], self.l.desc, head
        while True:
            addr, n, flags, nxt = struct.unpack_from("<QIHH", self.mem, table + 16 * i)
            if flags & VRING_DESC_F_INDIRECT:
                table, i = addr - GPA, 0
                continue
            out.append((addr, n, bool(flags & VRING_DESC_F_WRITE)))
            if not flags & VRING_DESC_F_NEXT:
                return head, out
            i = nxt

    def push(self, head, n):
        struct.pack_into("<II", self.mem, self.l.used + 4 + 8 * (self.used_idx % self.l.size), head, n)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        struct.pack_into("<H", self.mem, self.l.used + 2, self.used_idx)

    def set_avail_event(self, v):
        struct.pack_into("<H", self.mem, self.l.used + 4 + 8 * self.l.size, v)

    def used_event(self):
        return struct.unpack_from("<H", self.mem, self.l.avail + 4 + 2 * self.l.size)[0]


def make(size=8, event_idx=False, start_idx=0):
    layout = split_ring_layout(size)
    mem = bytearray(layout.total + size * 16 * 16)
    ring = DriverRing(memoryview(mem), size, layout.desc, layout.avail, layout.used,
                      event_idx=event_idx, gpa_base=GPA, indirect_off=layout.total,
                      start_idx=start_idx)
    return ring, Device(mem, layout, start_idx)


def test_layout():
    l = split_ring_layout(256)
    assert (l.desc, l.avail, l.used % 4) == (0, 4096, 0)
    assert l.used >= l.avail + l.avail_len and l.total == l.used + l.used_len
    assert split_ring_layout(256, 4096).used == 8192
    with pytest.raises(ValueError):
        split_ring_layout(100)


def test_chain_round_trip():
    ring, dev = make()
    head = ring.add_chain([(0x1000, 12, False), (0x2000, 100, False), (0x3000, 50, True)], token="t")
    assert ring.num_free == 5 and ring.outstanding == 1
    assert dev.pop() == (head, [(0x1000, 12, False), (0x2000, 100, False), (0x3000, 50, True)])
    assert ring.get_used() == []
    dev.push(head, 50)
    (u,) = ring.get_used()
    assert (u.head, u.length, u.token) == (head, 50, "t")
    assert ring.num_free == 8 and ring.outstanding == 0


def test_indirect_chain():
    ring, dev = make()
    head = ring.add_chain([(0x1000, 10, False), (0x2000, 20, True)], indirect=True)
    assert ring.num_free == 7
    assert dev.pop() == (head, [(0x1000, 10, False), (0x2000, 20, True)])


def test_ring_full():
    ring, _ = make(size=4)
    ring.add_chain([(0, 1, False)] * 3)
    with pytest.raises(RingError):
        ring.add_chain([(0, 1, False)] * 2)


def test_wrap_around_the_16_bit_index():
    ring, dev = make(size=4, start_idx=65533)
    for i in range(20):
        head = ring.add_chain([(0x1000 + i, 1, False)], token=i)
        h, bufs = dev.pop()
        assert h == head and bufs[0][0] == 0x1000 + i
        dev.push(h, 0)
        assert [u.token for u in ring.get_used()] == [i]
    assert ring.avail_idx == (65533 + 20) & 0xFFFF


def test_batched_publish():
    ring, dev = make()
    ring.add_chain([(1, 1, False)], publish=False)
    ring.add_chain([(2, 1, False)], publish=False)
    assert dev.pop() is None
    ring.publish()
    assert dev.pop() and dev.pop() and dev.pop() is None


def test_kick_needed_without_event_idx():
    ring, dev = make()
    assert not ring.kick_needed()                 # nothing new
    ring.add_chain([(1, 1, False)])
    assert ring.kick_needed()
    struct.pack_into("<H", dev.mem, dev.l.used, VRING_USED_F_NO_NOTIFY)
    ring.add_chain([(1, 1, False)])
    assert not ring.kick_needed()


def test_kick_needed_with_event_idx():
    ring, dev = make(event_idx=True)
    ring.add_chain([(1, 1, False)])
    assert ring.kick_needed()                     # avail_event 0 is passed by 0 -> 1
    dev.set_avail_event(5)
    ring.add_chain([(1, 1, False)])               # 1 -> 2: event 5 not reached
    assert not ring.kick_needed()
    for _ in range(4):
        ring.add_chain([(1, 1, False)])           # 2 -> 6 passes 5
    assert ring.kick_needed()


def test_used_event_follows_get_used():
    ring, dev = make(event_idx=True)
    for _ in range(3):
        ring.add_chain([(1, 1, True)])
    for _ in range(3):
        h, _ = dev.pop()
        dev.push(h, 1)
    assert len(ring.get_used()) == 3
    assert dev.used_event() == 3


def test_need_event_is_wrap_safe():
    assert need_event(0xFFFF, 0, 0xFFFE)
    assert not need_event(2, 2, 1)
    assert need_event(1, 2, 1)


def test_device_returning_an_unknown_head_is_an_error():
    ring, dev = make()
    dev.push(3, 0)
    with pytest.raises(RingError):
        ring.get_used()


def test_release_frees_the_buffer():
    layout = split_ring_layout(8)
    buf = bytearray(layout.total)
    view = memoryview(buf)
    ring = DriverRing(view, 8, layout.desc, layout.avail, layout.used)
    ring.release()
    buf.extend(b"x")                              # resizable again: no exports left
