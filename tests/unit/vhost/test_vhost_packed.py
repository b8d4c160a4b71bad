"""BackendProtocol with packed rings (VIRTIO_F_RING_PACKED acked): the
32-bit bases of SET/GET_VRING_BASE, ring areas, the dirty-log address,
the inflight layout, and the hand-over JSON (no sockets, no engine)."""
import os
import struct

import pytest

from tests.unit.vhost.vhost_helpers import (
    ALL_PF, NET_FEATURES, UVA0, Driver, Fds, default_region, mem_table, msg, negotiate, spec, u64,
)

from vfe.vhost.actions import Ack, CloseFds, GetInflight, Reply, SetFeatures, SetInflight, StartRing
from vfe.vhost.inflight import (
    PACKED_DESC_SIZE, PACKED_DESC_STATE, PACKED_HEADER_SIZE, PACKED_QUEUE_HEADER, InflightRegion,
    allocate,
    queue_region_size, region_size,
)
from vfe.vhost.messages import (
    Inflight, ProtocolError, ProtocolFeature, Request, VringAddr, VringFile, VringState,
)
from vfe.vhost.protocol import BackendProtocol
from vfe.virtio.constants import F, bit
from vfe.virtio.layouts import PACKED_BASE_RESET, PackedBase, ring_area_sizes

PACKED = NET_FEATURES | bit(F.RING_PACKED)
SPLIT_ACK = NET_FEATURES & ~bit(F.VHOST_LOG_ALL)
PACKED_ACK = PACKED & ~bit(F.VHOST_LOG_ALL)
INFLIGHT_PF = ALL_PF | bit(ProtocolFeature.INFLIGHT_SHMFD)


@pytest.fixture
def fds():
    f = Fds()
    yield f
    f.cleanup()


def device(features=PACKED_ACK, pf=ALL_PF, fds=None) -> Driver:
    """Negotiated with ``features`` acked, one 64 MiB region at gpa 0."""
    d = Driver(BackendProtocol(spec(features=PACKED, protocol_features=pf)))
    negotiate(d, features=features)
    d.send(mem_table([default_region()], fds.new(1)))
    return d


def packed_addr(index, num=256, log_gpa=0, flags=0, avail_off=None) -> VringAddr:
    """Descriptor ring, then the driver and device event areas, 64 KiB per ring."""
    desc = UVA0 + 0x10000 + index * 0x10000
    avail = desc + 16 * num if avail_off is None else desc + avail_off
    return VringAddr(index, flags, desc, desc + 16 * num + 8, avail, log_gpa)


def setup(d: Driver, fds, index, num=256, base=PACKED_BASE_RESET, **kw) -> list:
    out = d.send(msg(Request.SET_VRING_NUM, VringState(index, num)))
    out += d.send(msg(Request.SET_VRING_BASE, VringState(index, base)))
    out += d.send(msg(Request.SET_VRING_ADDR, packed_addr(index, num, **kw)))
    out += d.send(msg(Request.SET_VRING_KICK, VringFile(index, False), [fds.one()]))
    return out


def starts(actions):
    return [a.ring for a in actions if isinstance(a, StartRing)]


# -- the base: QEMU's 32-bit encoding ----------------------------------------------


def test_packed_base_encoding_is_qemus():
    # bits 0-14 avail, 15 avail wrap, 16-30 used, 31 used wrap
    pos = PackedBase.decode(0x8005_0007)
    assert pos == PackedBase(7, False, 5, True)
    assert pos.encode() == 0x8005_0007
    assert PACKED_BASE_RESET == 0x8000_8000
    # DPDK's virtio_user sends 0x8000 and DPDK answers without the used half:
    # the used position is then the avail one
    assert PackedBase.decode(0x8000) == PackedBase(0, True, 0, True)
    assert PackedBase.decode(0x0003) == PackedBase(3, False, 3, False)


def test_ring_area_sizes_packed():
    assert ring_area_sizes(256, event_idx=True, packed=True) == (4096, 4, 4)
    assert ring_area_sizes(256, event_idx=False, packed=True) == (4096, 4, 4)
    assert ring_area_sizes(256, event_idx=True) == (4096, 4 + 512 + 2, 4 + 2048 + 2)


def test_set_vring_base_keeps_the_wrap_counters_and_get_returns_them(fds):
    d = device(fds=fds)
    out = setup(d, fds, 0, base=0x8003_0005)
    (ring,) = starts(out)
    assert ring.base == 0x8003_0005
    d.avail[0] = 0x0007_8009          # the engine stopped here: avail 9 wrap 1, used 7 wrap 0
    out = d.send(msg(Request.GET_VRING_BASE, VringState(0, 0)))
    assert Reply(Request.GET_VRING_BASE, VringState(0, 0x0007_8009).encode()) in out
    assert d.p.rings[0].base == 0x0007_8009
    # the next start takes it back as it was
    out = d.send(msg(Request.SET_VRING_BASE, VringState(0, 0x0007_8009)))
    out = d.send(msg(Request.SET_VRING_KICK, VringFile(0, False), [fds.one()]))
    assert starts(out)[0].base == 0x0007_8009
    d.disconnect()


def test_dpdk_style_base_starts_with_used_at_avail(fds):
    d = device(fds=fds)
    (ring,) = starts(setup(d, fds, 0, base=0x8000))
    assert ring.base == PACKED_BASE_RESET
    d.disconnect()


@pytest.mark.parametrize("base", [256, 0x8000 | 300, (256 << 16) | 0x8000 | 1, 0x7FFF])
def test_set_vring_base_refuses_indexes_outside_the_ring(fds, base):
    d = device(fds=fds)
    d.send(msg(Request.SET_VRING_NUM, VringState(0, 256)))
    with pytest.raises(ProtocolError, match="outside a ring of 256"):
        d.send(msg(Request.SET_VRING_BASE, VringState(0, base)))
    d.disconnect()


def test_set_vring_base_refusal_is_a_nack_with_reply_ack(fds):
    d = device(fds=fds)
    d.send(msg(Request.SET_VRING_NUM, VringState(0, 256)))
    d.send(msg(Request.SET_VRING_BASE, VringState(0, 0x8000_8010)))
    out = d.send(msg(Request.SET_VRING_BASE, VringState(0, 0x8000_8100), need_reply=True))
    assert out == [Ack(Request.SET_VRING_BASE, ok=False)]
    assert d.p.rings[0].base == 0x8000_8010       # unchanged
    d.disconnect()


def test_a_ring_shrunk_under_its_base_does_not_start(fds, caplog):
    """SET_VRING_BASE before a smaller SET_VRING_NUM: the start checks again."""
    d = device(fds=fds)
    d.send(msg(Request.SET_VRING_BASE, VringState(0, 0x8000_8000 | 200)))
    out = d.send(msg(Request.SET_VRING_NUM, VringState(0, 128)))
    out += d.send(msg(Request.SET_VRING_ADDR, packed_addr(0, 128)))
    out += d.send(msg(Request.SET_VRING_KICK, VringFile(0, False), [fds.one()]))
    assert starts(out) == []
    assert "outside a ring of 128" in caplog.text
    d.disconnect()


def test_split_bases_are_unchanged(fds):
    """Without RING_PACKED a base above 16 bits is refused as before, and
    GET_VRING_BASE answers 16 bits."""
    d = device(features=SPLIT_ACK, fds=fds)
    with pytest.raises(ProtocolError, match="base 65536 > 65535"):
        d.send(msg(Request.SET_VRING_BASE, VringState(0, 0x10000)))
    d = device(features=SPLIT_ACK, fds=fds)
    d.send(msg(Request.SET_VRING_BASE, VringState(0, 0x8000)))
    assert d.p.rings[0].base == 0x8000
    d.avail[0] = 0x1_0005                  # whatever the engine says, 16 bits go out
    from tests.unit.vhost.vhost_helpers import setup_ring
    setup_ring(d, fds, 1)
    out = d.send(msg(Request.GET_VRING_BASE, VringState(1, 0)))
    assert Reply(Request.GET_VRING_BASE, VringState(1, 0).encode()) in out
    d.disconnect()


# -- areas and the dirty log ------------------------------------------------------


def test_packed_areas_are_the_descriptor_ring_and_two_event_areas(fds):
    d = device(fds=fds)
    # at the very end of the 64 MiB region: 4 KiB of descriptors, the driver
    # event area, and the device event area ending with the region
    end = 64 << 20
    desc = UVA0 + end - 4096 - 16
    d.send(msg(Request.SET_VRING_NUM, VringState(0, 256)))
    d.send(msg(Request.SET_VRING_BASE, VringState(0, PACKED_BASE_RESET)))
    d.send(msg(Request.SET_VRING_ADDR, VringAddr(0, 0, desc, desc + 4096 + 12, desc + 4096, 0)))
    out = d.send(msg(Request.SET_VRING_KICK, VringFile(0, False), [fds.one()]))
    assert len(starts(out)) == 1           # a split ring of 256 would not fit there
    # 4 bytes further and the device event area leaves the region
    d.send(msg(Request.SET_VRING_ADDR, VringAddr(0, 0, desc, desc + 4096 + 16, desc + 4096, 0)))
    assert d.p.rings[0].started is False
    d.disconnect()


def test_packed_driver_event_area_must_be_4_aligned(fds, caplog):
    d = device(fds=fds)
    out = setup(d, fds, 0, avail_off=4096 + 2)
    assert starts(out) == []
    assert "not 4-aligned" in caplog.text
    d.disconnect()


def test_packed_log_address_is_passed_on(fds):
    """QEMU sends the device event area's address as log_guest_addr; the
    engine logs what it writes (descriptor ring, device event area) from
    the memory table itself, so the address goes on as it came."""
    d = device(fds=fds)
    addr = packed_addr(1)
    (ring,) = starts(setup(d, fds, 1, flags=1, log_gpa=addr.used_uva - UVA0))
    assert ring.log_used and ring.log_guest_addr == addr.used_uva - UVA0
    d.disconnect()


# -- inflight -------------------------------------------------------------------------


def test_inflight_layout_follows_the_acked_features(fds):
    d = device(pf=INFLIGHT_PF, fds=fds)
    assert d.send(msg(Request.GET_INFLIGHT_FD, Inflight(0, 0, 2, 128))) == [
        GetInflight(2, 128, True)]
    split = device(features=SPLIT_ACK, pf=INFLIGHT_PF, fds=fds)
    assert split.send(msg(Request.GET_INFLIGHT_FD, Inflight(0, 0, 2, 128))) == [
        GetInflight(2, 128, False)]
    # per queue: a 32-byte header and 32-byte entries, 64-aligned (DPDK's
    # get_pervq_shm_size_packed gives the same)
    assert queue_region_size(128, packed=True) == 4160
    assert queue_region_size(3, packed=True) == 128
    assert queue_region_size(128) == 2112
    d.disconnect()
    split.disconnect()


def _offsets(fmt: str) -> list[int]:
    """Each field's offset in a little-endian struct format (pad bytes "x" skipped)."""
    codes = [c for c in fmt.lstrip("<").replace("7x", "") if c != "x"]
    out, prefix = [], "<"
    for c in fmt.lstrip("<"):
        if c.isdigit():
            break
        if c != "x":
            out.append(struct.calcsize(prefix))
        prefix += c
    assert len(out) == len(codes)
    return out


def test_packed_inflight_structs_are_the_engines():
    from vfe import _engine
    lay = _engine.inflight_layout(packed=True)
    assert (lay["header_size"], lay["desc_size"]) == (PACKED_HEADER_SIZE, PACKED_DESC_SIZE)
    assert PACKED_QUEUE_HEADER.size <= PACKED_HEADER_SIZE
    header = ["version", "desc_num", "free_head", "old_free_head", "used_idx", "old_used_idx",
              "used_wrap_counter", "old_used_wrap_counter"]            # after u64 features
    assert [lay[k] for k in header] == _offsets(PACKED_QUEUE_HEADER.format)[1:]
    desc = ["desc_inflight", "desc_next", "desc_last", "desc_num_descs", "desc_counter",
            "desc_id", "desc_flags", "desc_len", "desc_addr"]
    assert [lay[k] for k in desc] == _offsets(PACKED_DESC_STATE.format)


def test_packed_inflight_region_is_left_for_the_engine_to_initialise():
    fd, size = allocate(2, 8, packed=True)
    try:
        assert size == 2 * queue_region_size(8, packed=True)
        assert os.pread(fd, size, 0) == bytes(size)        # version 0: the engine initialises it
        region = InflightRegion(fd, size, 0, 2, 8, packed=True)
        assert region.stride == queue_region_size(8, packed=True)
        assert region.queue_header(1)[1] == 0 and region.inflight_heads(1) == {}
        region.close()
        with pytest.raises(Exception, match="too small"):
            InflightRegion(fd, region_size(2, 8), 0, 2, 8, packed=True)
    finally:
        os.close(fd)


def test_set_inflight_fd_packed_needs_the_packed_size(fds):
    d = device(pf=INFLIGHT_PF, fds=fds)
    fd = fds.one()
    small = Inflight(region_size(2, 256), 0, 2, 256)          # a split-sized region
    out = d.send(msg(Request.SET_INFLIGHT_FD, small, [fd], need_reply=True))
    assert out == [CloseFds((fd,)), Ack(Request.SET_INFLIGHT_FD, ok=False)]
    fd = fds.one()
    info = Inflight(region_size(2, 256, packed=True), 0, 2, 256)
    out = d.send(msg(Request.SET_INFLIGHT_FD, info, [fd]))
    assert SetInflight(fd, info.mmap_size, 0, 2, 256, True) in out
    assert len(starts(setup(d, fds, 0))) == 1
    d.disconnect()


@pytest.mark.parametrize("first,then", [(SPLIT_ACK, PACKED_ACK), (PACKED_ACK, SPLIT_ACK)])
def test_a_region_of_the_other_layout_is_dropped(fds, first, then):
    """A guest's firmware drove the rings split with a region, its OS acks
    RING_PACKED (or the other way): the region goes, and the next one
    comes in the new layout."""
    d = device(features=first, pf=INFLIGHT_PF, fds=fds)
    old_packed = bool(first & bit(F.RING_PACKED))
    d.send(msg(Request.SET_INFLIGHT_FD, Inflight(region_size(2, 256, old_packed), 0, 2, 256),
               [fds.one()]))
    assert d.p.inflight is not None
    assert d.send(u64(Request.SET_FEATURES, first)) == [SetFeatures(first)]   # same: kept
    out = d.send(u64(Request.SET_FEATURES, then))
    assert SetInflight(-1, 0, 0, 0, 0) in out and d.p.inflight is None
    assert d.send(msg(Request.GET_INFLIGHT_FD, Inflight(0, 0, 2, 256))) == [
        GetInflight(2, 256, not old_packed)]
    d.disconnect()


# -- a live update's hand-over ------------------------------------------------------------


def test_hand_over_keeps_packed_bases_and_the_inflight_layout(fds):
    d = device(pf=INFLIGHT_PF, fds=fds)
    d.send(msg(Request.SET_INFLIGHT_FD, Inflight(region_size(2, 256, True), 0, 2, 256),
               [fds.one()]))
    setup(d, fds, 0, base=0x8002_0002)
    d.p.rings_paused({0: 0x0009_800B})
    state = d.p.export_state()
    assert state["inflight_packed"] is True
    assert state["rings"][0]["base"] == 0x0009_800B
    q = BackendProtocol.from_state(d.p.spec, state, list(state["fds"]))
    (ring,) = q.running_rings()
    assert ring.base == 0x0009_800B
    q.disconnect()
    # a state from a build before packed rings has no "inflight_packed"
    del state["inflight_packed"]
    old = BackendProtocol.from_state(d.p.spec, state, list(state["fds"]))
    assert old.export_state()["inflight_packed"] is False
