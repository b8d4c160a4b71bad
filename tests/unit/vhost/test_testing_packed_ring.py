"""vfe.testing.packed_ring: the Python driver side of a packed ring, against
a device played by hand on the same memory (virtio 1.2, 2.8)."""
import struct

import pytest

from vfe.testing.packed_ring import PackedDriverRing, packed_ring_layout
from vfe.testing.ring import RingError
from vfe.virtio.constants import (
    RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE, VRING_PACKED_DESC_F_AVAIL as AVAIL, VRING_PACKED_DESC_F_USED as USED,
)
from vfe.virtio.layouts import PackedBase

DESC = struct.Struct("<QIHH")
SIZE = 4


def ring(event_idx=False):
    lay = packed_ring_layout(SIZE)
    mem = memoryview(bytearray(lay.total + 16 * 16 * SIZE))
    return mem, PackedDriverRing(mem, SIZE, lay.desc, lay.avail, lay.used, event_idx=event_idx,
                                 gpa_base=0x10000, indirect_off=lay.total)


def desc(mem, slot):
    return DESC.unpack_from(mem, 16 * slot)


def device_uses(mem, slot, buf_id, length, wrap):
    bits = AVAIL | USED if wrap else 0
    DESC.pack_into(mem, 16 * slot, 0, length, buf_id, bits)


def test_layout():
    lay = packed_ring_layout(256)
    assert (lay.desc, lay.avail, lay.used, lay.total) == (0, 4096, 4100, 4104)
    assert (lay.desc_len, lay.avail_len, lay.used_len) == (4096, 4, 4)


def test_chain_is_made_available_head_last_with_its_laps_bits():
    mem, r = ring()
    i = r.add_chain([(0x1000, 10, False), (0x2000, 20, True)], token="a", publish=False)
    assert desc(mem, 0) == (0x1000, 10, i, 0)          # head's flags not yet written
    assert desc(mem, 1) == (0x2000, 20, i, VRING_DESC_F_WRITE | AVAIL)
    r.publish()
    assert desc(mem, 0)[3] == VRING_DESC_F_NEXT | AVAIL
    device_uses(mem, 0, i, 20, wrap=True)
    assert [u.token for u in r.get_used()] == ["a"]
    # a chain across the end of the ring: its second slot is in the next lap
    r.add_chain([(0x3000, 30, False)], token="b")
    r.add_chain([(0x4000, 40, False), (0x5000, 50, False)], token="c")
    assert desc(mem, 3)[3] == VRING_DESC_F_NEXT | AVAIL
    assert desc(mem, 0)[3] == USED                       # wrap counter 0: AVAIL 0, USED 1
    assert r.position == PackedBase(1, False, 2, True)
    with pytest.raises(RingError, match="ring full"):
        r.add_chain([(0, 1, False), (0, 1, False)])


def test_used_descriptors_free_their_chains_slots():
    mem, r = ring()
    a = r.add_chain([(0x1000, 10, False), (0x2000, 20, True)], token="a")
    b = r.add_chain([(0x3000, 30, True)], token="b")
    assert not r.has_used()
    device_uses(mem, 0, a, 20, wrap=True)
    device_uses(mem, 2, b, 30, wrap=True)
    got = r.get_used()
    assert [(u.head, u.length, u.token) for u in got] == [(a, 20, "a"), (b, 30, "b")]
    assert r.num_free == SIZE and r.outstanding == 0
    assert r.position == PackedBase(3, True, 3, True)
    device_uses(mem, 3, 7, 0, wrap=True)                # an id that is not outstanding
    with pytest.raises(RingError, match="not outstanding"):
        r.get_used()


def test_indirect_chain_takes_one_slot():
    mem, r = ring()
    buf_id = r.add_chain([(0x1000, 10, False), (0x2000, 20, True)], indirect=True)
    addr, length, got_id, flags = desc(mem, 0)
    assert flags == VRING_DESC_F_INDIRECT | AVAIL and got_id == buf_id and length == 32
    table = addr - 0x10000
    # a packed indirect table is consecutive: no NEXT
    assert DESC.unpack_from(mem, table) == (0x1000, 10, 0, 0)
    assert DESC.unpack_from(mem, table + 16) == (0x2000, 20, 0, VRING_DESC_F_WRITE)
    assert r.num_free == SIZE - 1


def test_kicks_follow_the_device_event_area():
    mem, r = ring(event_idx=True)
    dev = packed_ring_layout(SIZE).used
    r.add_chain([(0x1000, 1, False)])
    assert r.kick_needed()                              # ENABLE (0)
    assert not r.kick_needed()                          # nothing new
    struct.pack_into("<HH", mem, dev, 0, RING_EVENT_FLAGS_DISABLE)
    r.add_chain([(0x1000, 1, False)])
    assert not r.kick_needed()
    # DESC: kick once the driver passes slot 3 of this lap
    struct.pack_into("<HH", mem, dev, 3 | 1 << 15, RING_EVENT_FLAGS_DESC)
    r.add_chain([(0x1000, 1, False)])                   # slot 2
    assert not r.kick_needed()
    r.add_chain([(0x1000, 1, False)])                   # slot 3: passes it
    assert r.kick_needed()


def test_interrupt_requests_in_the_driver_event_area():
    mem, r = ring(event_idx=True)
    drv = packed_ring_layout(SIZE).avail
    r.enable_interrupts()
    assert struct.unpack_from("<HH", mem, drv) == (0 | 1 << 15, RING_EVENT_FLAGS_DESC)
    r.disable_interrupts()
    assert struct.unpack_from("<HH", mem, drv)[1] == RING_EVENT_FLAGS_DISABLE
