"""BackendProtocol: handlers, checks, readiness, REPLY_ACK and fd ownership (no sockets)."""
import itertools
import os

import pytest

from tests.unit.vhost.vhost_helpers import (
    ALL_PF, MiB, NET_FEATURES, UVA0, Driver, Fds, default_region, mem_table, msg, negotiate,
    ring_addr, setup_ring, spec, u64,
)

from vfe.vhost.actions import (
    Ack, AddMemRegion, CloseFds, EnableRing, MemRegion, Reply, ResetDevice, SendRarp,
    SetCallFd, SetFeatures, SetLogBase, SetMtu, SetStatus, StartRing, StopRing,
)
from vfe.vhost.messages import (
    Config, Log, MemoryRegion, MemTable, ProtocolError, ProtocolFeature, Request, SingleMemRegion, U64,
    VringFile, VringState,
)
from vfe.vhost.protocol import BackendProtocol
from vfe.virtio.constants import F, bit

PF = ProtocolFeature


@pytest.fixture
def fds():
    f = Fds()
    yield f
    f.cleanup()


@pytest.fixture
def drv():
    return Driver(BackendProtocol(spec()))


@pytest.fixture
def ready(drv, fds):
    """Negotiated (all protocol features), one region mapped."""
    negotiate(drv)
    drv.send(mem_table([default_region()], fds.new(1)))
    return drv


def kinds(actions):
    return [type(a).__name__ for a in actions]


def starts(actions):
    return [a.ring for a in actions if isinstance(a, StartRing)]


# -- negotiation ----------------------------------------------------------------


def test_get_features_and_protocol_features(drv):
    (r,) = drv.send(msg(Request.GET_FEATURES))
    assert r == Reply(Request.GET_FEATURES, U64(NET_FEATURES).encode())
    (r,) = drv.send(msg(Request.GET_PROTOCOL_FEATURES))
    assert U64.decode(r.payload).value == ALL_PF


def test_protocol_features_need_the_offered_bit():
    drv = Driver(BackendProtocol(spec(features=bit(F.VERSION_1))))
    with pytest.raises(ProtocolError, match="not offered"):
        drv.send(msg(Request.GET_PROTOCOL_FEATURES))


def test_set_features_must_be_offered(drv):
    with pytest.raises(ProtocolError, match="not offered"):
        drv.send(u64(Request.SET_FEATURES, NET_FEATURES | bit(F.RING_PACKED)))


def test_set_features_emits_set_features(drv):
    assert drv.send(u64(Request.SET_FEATURES, bit(F.VERSION_1))) == [SetFeatures(bit(F.VERSION_1))]
    assert drv.p.features == bit(F.VERSION_1)


def test_set_protocol_features_must_be_offered(drv):
    with pytest.raises(ProtocolError):
        drv.send(u64(Request.SET_PROTOCOL_FEATURES, 1 << 14))


def test_set_owner_is_idempotent(drv):
    assert drv.send(msg(Request.SET_OWNER)) == []
    assert drv.send(msg(Request.SET_OWNER)) == []
    assert drv.p.session_owned


def test_replies_for_gets(ready):
    assert ready.send(msg(Request.GET_QUEUE_NUM)) == [Reply(Request.GET_QUEUE_NUM, U64(2).encode())]
    assert ready.send(msg(Request.GET_MAX_MEM_SLOTS)) == [
        Reply(Request.GET_MAX_MEM_SLOTS, U64(32).encode())]
    assert ready.send(u64(Request.SET_STATUS, 0xF)) == [SetStatus(0xF)]
    assert ready.send(msg(Request.GET_STATUS)) == [Reply(Request.GET_STATUS, U64(0xF).encode())]


# -- generic checks ---------------------------------------------------------------


def test_unknown_request_id(drv):
    with pytest.raises(ProtocolError, match="unknown request id 99"):
        drv.send(msg(99))


def test_unsupported_known_request(drv):
    with pytest.raises(ProtocolError, match="IOTLB_MSG is not supported"):
        drv.send(msg(Request.IOTLB_MSG, bytes(24)))


@pytest.mark.parametrize("flags", [0x0, 0x2, 0x3, 0x5])
def test_bad_header_flags(drv, flags):
    with pytest.raises(ProtocolError):
        drv.send(msg(Request.GET_FEATURES, flags=flags))


@pytest.mark.parametrize("req", sorted(BackendProtocol.TABLE), ids=lambda r: r.name)
def test_wrong_payload_size(req):
    row = BackendProtocol.TABLE[req]
    lo, hi = row.size
    p = BackendProtocol(spec())          # the size is checked before any feature gate
    fds = list(range(1000, 1000 + row.fds[0]))
    with pytest.raises(ProtocolError, match="payload is"):
        p.receive(msg(req, bytes(hi + 1), fds))
    if lo > 0:
        p = BackendProtocol(spec())
        with pytest.raises(ProtocolError, match="payload is"):
            p.receive(msg(req, bytes(lo - 1), fds))


def test_fd_on_a_request_that_takes_none(drv, fds):
    fd = fds.one()
    with pytest.raises(ProtocolError, match="1 fds"):
        drv.send(msg(Request.SET_VRING_NUM, VringState(0, 256), [fd]))
    assert drv.p.held_fds() == {fd}          # kept until disconnect
    drv.disconnect()
    assert fds.open() == set()


def test_protocol_refuses_messages_after_a_fatal_error(drv):
    with pytest.raises(ProtocolError):
        drv.send(msg(99))
    assert drv.p.broken
    with pytest.raises(ProtocolError, match="after the connection failed"):
        drv.send(msg(Request.GET_FEATURES))
    assert kinds(drv.disconnect()) == ["ResetDevice"]
    assert drv.p.broken is None
    assert drv.send(msg(Request.GET_FEATURES))


@pytest.mark.parametrize("req,payload,feature", [
    (Request.GET_QUEUE_NUM, b"", PF.MQ),
    (Request.SEND_RARP, bytes(8), PF.RARP),
    (Request.NET_SET_MTU, U64(1500).encode(), PF.MTU),
    (Request.GET_CONFIG, Config(0, 4, 0, bytes(4)).encode(), PF.CONFIG),
    (Request.GET_MAX_MEM_SLOTS, b"", PF.CONFIGURE_MEM_SLOTS),
    (Request.SET_STATUS, U64(1).encode(), PF.STATUS),
    (Request.GET_STATUS, b"", PF.STATUS),
    (Request.RESET_DEVICE, b"", PF.RESET_DEVICE),
])
def test_feature_gates(drv, req, payload, feature):
    drv.send(u64(Request.SET_PROTOCOL_FEATURES, ALL_PF & ~(1 << feature)))
    with pytest.raises(ProtocolError, match=feature.name):
        drv.send(msg(req, payload))


def test_set_log_base_needs_log_shmfd(drv, fds):
    drv.send(u64(Request.SET_PROTOCOL_FEATURES, 0))
    with pytest.raises(ProtocolError, match="LOG_SHMFD"):
        drv.send(msg(Request.SET_LOG_BASE, Log(8192, 0), [fds.one()]))


@pytest.mark.parametrize("req,payload", [
    (Request.SET_VRING_NUM, VringState(4, 256)),
    (Request.SET_VRING_BASE, VringState(4, 0)),
    (Request.GET_VRING_BASE, VringState(4, 0)),
    (Request.SET_VRING_ADDR, ring_addr(4)),
    (Request.SET_VRING_ENABLE, VringState(4, 1)),
    (Request.SET_VRING_CALL, VringFile(4, True)),
    (Request.SET_VRING_KICK, VringFile(255, True)),
])
def test_queue_index_is_checked(ready, req, payload):
    with pytest.raises(ProtocolError, match="max_queues"):
        ready.send(msg(req, payload))


def test_kick_for_index_beyond_max_queues_closes_its_fd_with_reply_ack(ready, fds):
    fd = fds.one()
    out = ready.send(msg(Request.SET_VRING_KICK, VringFile(4, False), [fd], need_reply=True))
    assert out == [CloseFds((fd,)), Ack(Request.SET_VRING_KICK, ok=False)]
    assert fds.open() == set() and ready.p.held_fds() == frozenset()


# -- vring messages ------------------------------------------------------------------


@pytest.mark.parametrize("num", [0, 3, 100, 2048, 65536])
def test_bad_ring_sizes(ready, num):
    with pytest.raises(ProtocolError, match="size"):
        ready.send(msg(Request.SET_VRING_NUM, VringState(0, num)))


def test_ring_size_limit_is_the_spec_and_32768():
    p = BackendProtocol(spec(max_queue_size=65536))
    p.receive(msg(Request.SET_VRING_NUM, VringState(0, 32768)))
    with pytest.raises(ProtocolError):
        BackendProtocol(spec(max_queue_size=65536)).receive(
            msg(Request.SET_VRING_NUM, VringState(0, 65536)))


@pytest.mark.parametrize("desc,used,avail,flags", [
    (0, 0x3000, 0x2000, 0), (0x1008, 0x3000, 0x2000, 0), (0x1000, 0x3002, 0x2000, 0),
    (0x1000, 0x3000, 0x2001, 0), (0x1000, 0x3000, 0x2000, 2),
])
def test_bad_ring_addresses(drv, desc, used, avail, flags):
    from vfe.vhost.messages import VringAddr
    with pytest.raises(ProtocolError, match="invalid payload"):
        drv.send(msg(Request.SET_VRING_ADDR, VringAddr(0, flags, desc, used, avail, 0)))


def test_set_vring_base_range(ready):
    with pytest.raises(ProtocolError, match="65535"):
        ready.send(msg(Request.SET_VRING_BASE, VringState(0, 65536)))


def test_kick_fd_must_match_the_nofd_bit(ready, fds):
    with pytest.raises(ProtocolError, match="no-fd bit set"):
        ready.send(msg(Request.SET_VRING_KICK, VringFile(0, True), [fds.one()]))


def test_kick_without_fd_and_without_nofd_bit(ready):
    with pytest.raises(ProtocolError, match="no fd sent"):
        ready.send(msg(Request.SET_VRING_KICK, VringFile(0, False)))


def test_vring_enable_values(ready):
    with pytest.raises(ProtocolError, match="enable 2"):
        ready.send(msg(Request.SET_VRING_ENABLE, VringState(0, 2)))


# -- readiness ---------------------------------------------------------------------


def test_ring_starts_with_the_right_fields(ready, fds):
    out = setup_ring(ready, fds, 1, num=512)
    (cfg,) = starts(out)
    addr = ring_addr(1, 512)
    assert (cfg.index, cfg.size, cfg.desc_uva, cfg.avail_uva, cfg.used_uva) == (
        1, 512, addr.desc_uva, addr.avail_uva, addr.used_uva)
    assert cfg.base == 0 and cfg.kick_fd >= 0 and cfg.call_fd == -1   # call came after kick
    assert cfg.enabled is False          # PROTOCOL_FEATURES acked: wait for SET_VRING_ENABLE
    assert out[-1] == SetCallFd(1, ready.p.rings[1].call_fd)


STEPS = ["num", "addr", "kick", "mem"]


@pytest.mark.parametrize("order", list(itertools.permutations(STEPS)), ids="-".join)
def test_ring_starts_exactly_when_the_last_piece_arrives(order):
    fds = Fds()
    try:
        drv = Driver(BackendProtocol(spec()))
        negotiate(drv)
        all_out = []
        for i, step in enumerate(order):
            if step == "num":
                out = drv.send(msg(Request.SET_VRING_NUM, VringState(0, 256)))
            elif step == "addr":
                out = drv.send(msg(Request.SET_VRING_ADDR, ring_addr(0)))
            elif step == "kick":
                out = drv.send(msg(Request.SET_VRING_KICK, VringFile(0, False), [fds.one()]))
            else:
                out = drv.send(mem_table([default_region()], fds.new(1)))
            all_out += out
            assert bool(starts(out)) == (i == len(order) - 1), (step, out)
        assert len(starts(all_out)) == 1
        drv.disconnect()
        assert fds.open() == set()
    finally:
        fds.cleanup()


def test_kick_with_nofd_bit_starts_a_polled_ring(ready):
    ready.send(msg(Request.SET_VRING_NUM, VringState(0, 256)))
    ready.send(msg(Request.SET_VRING_ADDR, ring_addr(0)))
    (cfg,) = starts(ready.send(msg(Request.SET_VRING_KICK, VringFile(0, True))))
    assert cfg.kick_fd == -1


def test_no_start_when_ring_areas_are_outside_the_memory_table(ready, fds):
    ready.send(msg(Request.SET_VRING_NUM, VringState(0, 256)))
    addr = ring_addr(0, base_uva=UVA0 + 64 * MiB)                 # beyond the 64 MiB region
    ready.send(msg(Request.SET_VRING_ADDR, addr))
    assert starts(ready.send(msg(Request.SET_VRING_KICK, VringFile(0, True)))) == []


def test_enabled_without_protocol_features():
    drv = Driver(BackendProtocol(spec()))
    fds = Fds()
    try:
        negotiate(drv, features=bit(F.VERSION_1))                 # bit 30 not acked
        drv.send(mem_table([default_region()], fds.new(1)))
        (cfg,) = starts(setup_ring(drv, fds, 0))
        assert cfg.enabled is True
        drv.disconnect()
    finally:
        fds.cleanup()


def test_set_vring_enable_on_a_started_ring(ready, fds):
    setup_ring(ready, fds, 0)
    assert ready.send(msg(Request.SET_VRING_ENABLE, VringState(0, 1))) == [EnableRing(0, True)]
    assert ready.send(msg(Request.SET_VRING_ENABLE, VringState(0, 1))) == []
    assert ready.send(msg(Request.SET_VRING_ENABLE, VringState(0, 0))) == [EnableRing(0, False)]


def test_enable_before_start_is_remembered(ready, fds):
    ready.send(msg(Request.SET_VRING_ENABLE, VringState(2, 1)))
    (cfg,) = starts(setup_ring(ready, fds, 2))
    assert cfg.enabled is True


def test_set_vring_addr_before_set_mem_table_is_fine(drv, fds):
    negotiate(drv)
    assert drv.send(msg(Request.SET_VRING_ADDR, ring_addr(0))) == []
    drv.send(msg(Request.SET_VRING_NUM, VringState(0, 256)))
    drv.send(msg(Request.SET_VRING_KICK, VringFile(0, True)))
    out = drv.send(mem_table([default_region()], fds.new(1)))
    assert kinds(out) == ["SetMemTable", "CloseFds", "StartRing"]


# -- stop / restart ------------------------------------------------------------------


def test_get_vring_base_stops_and_replies_from_ring_stopped(ready, fds):
    setup_ring(ready, fds, 0)
    kick = ready.p.rings[0].kick_fd
    out = ready.p.receive(msg(Request.GET_VRING_BASE, VringState(0, 0)))
    assert out == [StopRing(0)]
    assert kick in ready.p.held_fds()             # the engine may still use it
    out = ready.p.ring_stopped(0, 0x1234)
    assert out == [Reply(Request.GET_VRING_BASE, VringState(0, 0x1234).encode()), CloseFds((kick,))]
    os.close(kick)
    state = ready.p.rings[0]
    assert not state.started and not state.kick_set and state.base == 0x1234


def test_kick_after_stop_restarts_from_the_stopped_index(ready, fds):
    setup_ring(ready, fds, 0)
    ready.avail[0] = 77
    ready.send(msg(Request.GET_VRING_BASE, VringState(0, 0)))
    (cfg,) = starts(ready.send(msg(Request.SET_VRING_KICK, VringFile(0, False), [fds.one()])))
    assert cfg.base == 77


def test_set_vring_base_overrides_the_stopped_index(ready, fds):
    setup_ring(ready, fds, 0)
    ready.avail[0] = 77
    ready.send(msg(Request.GET_VRING_BASE, VringState(0, 0)))
    ready.send(msg(Request.SET_VRING_BASE, VringState(0, 5)))
    (cfg,) = starts(ready.send(msg(Request.SET_VRING_KICK, VringFile(0, True))))
    assert cfg.base == 5


def test_get_vring_base_on_a_never_started_ring(ready):
    ready.send(msg(Request.SET_VRING_BASE, VringState(3, 9)))
    assert ready.send(msg(Request.GET_VRING_BASE, VringState(3, 0))) == [
        Reply(Request.GET_VRING_BASE, VringState(3, 9).encode())]
    assert ready.send(msg(Request.GET_VRING_BASE, VringState(2, 0))) == [
        Reply(Request.GET_VRING_BASE, VringState(2, 0).encode())]


def test_get_vring_base_with_need_reply_gets_no_extra_ack(ready, fds):
    setup_ring(ready, fds, 0)
    out = ready.send(msg(Request.GET_VRING_BASE, VringState(0, 0), need_reply=True))
    assert not any(isinstance(a, Ack) for a in out)


def test_qemu_72_stop_sequence_set_status_0_then_get_vring_base(ready, fds):
    setup_ring(ready, fds, 0)
    setup_ring(ready, fds, 1)
    ready.avail.update({0: 3, 1: 4})
    assert ready.send(u64(Request.SET_STATUS, 0)) == [SetStatus(0)]
    for i in (0, 1):
        out = ready.send(msg(Request.GET_VRING_BASE, VringState(i, 0)))
        assert out[0] == StopRing(i)
        assert out[1] == Reply(Request.GET_VRING_BASE, VringState(i, 3 + i).encode())


def test_set_vring_base_while_running_is_an_error(ready, fds):
    setup_ring(ready, fds, 0)
    with pytest.raises(ProtocolError, match="runs"):
        ready.send(msg(Request.SET_VRING_BASE, VringState(0, 1)))


def test_ring_stopped_without_a_pending_stop_is_ignored(ready):
    assert ready.p.ring_stopped(0, 5) == []
    assert ready.p.ring_stopped(3, 5) == []


def test_set_vring_call_on_started_and_stopped_rings(ready, fds):
    setup_ring(ready, fds, 0, call=False)
    c1, c2, c3 = fds.new(3)
    assert ready.send(msg(Request.SET_VRING_CALL, VringFile(0, False), [c1])) == [SetCallFd(0, c1)]
    assert ready.send(msg(Request.SET_VRING_CALL, VringFile(0, False), [c2])) == [
        SetCallFd(0, c2), CloseFds((c1,))]
    assert ready.send(msg(Request.SET_VRING_CALL, VringFile(0, True))) == [
        SetCallFd(0, -1), CloseFds((c2,))]
    # not started: just replaced
    assert ready.send(msg(Request.SET_VRING_CALL, VringFile(1, False), [c3])) == []
    assert ready.p.rings[1].call_fd == c3


def test_new_kick_on_a_running_ring_restarts_it(ready, fds):
    setup_ring(ready, fds, 0)
    old = ready.p.rings[0].kick_fd
    new = fds.one()
    ready.avail[0] = 12
    out = ready.send(msg(Request.SET_VRING_KICK, VringFile(0, False), [new]))
    assert kinds(out) == ["StopRing", "CloseFds", "StartRing"]
    assert out[1] == CloseFds((old,))
    assert out[2].ring.kick_fd == new and out[2].ring.base == 12


def test_log_flag_on_a_running_ring_restarts_it_then_acks(ready, fds):
    setup_ring(ready, fds, 0)
    ready.avail[0] = 40
    addr = ring_addr(0, flags=1, log_gpa=0x5000)
    out = ready.send(msg(Request.SET_VRING_ADDR, addr, need_reply=True))
    assert kinds(out) == ["StopRing", "StartRing", "Ack"]
    cfg = out[1].ring
    assert cfg.log_used and cfg.log_guest_addr == 0x5000 and cfg.base == 40
    assert out[2] == Ack(Request.SET_VRING_ADDR, ok=True)
    assert ready.send(msg(Request.SET_VRING_ADDR, addr)) == []            # unchanged


def test_log_all_toggle_while_running(ready, fds):
    setup_ring(ready, fds, 0)
    f = ready.p.features
    assert ready.send(u64(Request.SET_FEATURES, f | bit(F.VHOST_LOG_ALL), need_reply=True)) == [
        SetFeatures(f | bit(F.VHOST_LOG_ALL)), Ack(Request.SET_FEATURES)]
    with pytest.raises(ProtocolError, match="changed while rings run"):
        ready.send(u64(Request.SET_FEATURES, f & ~bit(F.NET_MRG_RXBUF)))


# -- memory ------------------------------------------------------------------------


def test_mem_table_fd_count_must_match(drv, fds):
    negotiate(drv)
    regions = [MemoryRegion(0, MiB, UVA0, 0), MemoryRegion(MiB, MiB, UVA0 + MiB, 0)]
    with pytest.raises(ProtocolError, match="2 regions but 1 fds"):
        drv.send(mem_table(regions, fds.new(1)))


@pytest.mark.parametrize("second", [
    MemoryRegion(MiB // 2, MiB, UVA0 + 8 * MiB, 0),       # gpa overlap
    MemoryRegion(8 * MiB, MiB, UVA0 + MiB // 2, 0),       # uva overlap
])
def test_mem_table_overlap(drv, fds, second):
    negotiate(drv)
    with pytest.raises(ProtocolError, match="overlap"):
        drv.send(mem_table([MemoryRegion(0, MiB, UVA0, 0), second], fds.new(2)))


def test_mem_table_zero_size_region(drv, fds):
    with pytest.raises(ProtocolError, match="invalid payload"):
        drv.send(mem_table([MemoryRegion(0, 0, UVA0, 0)], fds.new(1)))


def test_mem_table_more_regions_than_slots(fds):
    drv = Driver(BackendProtocol(spec(max_mem_slots=2)))
    regions = [MemoryRegion(i * MiB, MiB, UVA0 + i * MiB, 0) for i in range(3)]
    with pytest.raises(ProtocolError, match="at most 2"):
        drv.send(mem_table(regions, fds.new(3)))


def test_mem_table_change_while_running_stops_changes_restarts_then_acks(ready, fds):
    setup_ring(ready, fds, 0)
    setup_ring(ready, fds, 1)
    ready.avail.update({0: 5, 1: 6})
    new = fds.new(2)
    regions = [MemoryRegion(0, 32 * MiB, UVA0, 0), MemoryRegion(32 * MiB, 32 * MiB, UVA0 + 32 * MiB, 0)]
    out = ready.send(msg(Request.SET_MEM_TABLE, MemTable(tuple(regions)), new, need_reply=True))
    assert kinds(out) == ["StopRing", "StopRing", "SetMemTable", "CloseFds", "StartRing",
                          "StartRing", "Ack"]
    assert out[3] == CloseFds(tuple(new))
    assert [a.ring.base for a in out if isinstance(a, StartRing)] == [5, 6]


def test_identical_mem_table_is_a_no_op(ready, fds):
    setup_ring(ready, fds, 0)
    fd = fds.one()
    assert ready.send(mem_table([default_region()], [fd])) == [CloseFds((fd,))]


def test_add_and_remove_mem_regions(ready, fds):
    regions = [MemoryRegion((64 + 2 * i) * MiB, MiB, UVA0 + (64 + 2 * i) * MiB, 0) for i in range(10)]
    for r in regions:
        fd = fds.one()
        out = ready.send(msg(Request.ADD_MEM_REG, SingleMemRegion(r), [fd], need_reply=True))
        assert out == [AddMemRegion(MemRegion(r.gpa, r.size, r.uva, r.mmap_offset, fd)),
                       CloseFds((fd,)), Ack(Request.ADD_MEM_REG)]
    assert len(ready.p.regions) == 11
    out = ready.send(msg(Request.REM_MEM_REG, SingleMemRegion(regions[3]), need_reply=True))
    assert kinds(out) == ["RemoveMemRegion", "Ack"]
    assert out[0].region.gpa == regions[3].gpa and out[0].region.fd == -1
    assert len(ready.p.regions) == 10


def test_add_mem_reg_duplicate_is_refcounted(ready, fds):
    r = MemoryRegion(64 * MiB, MiB, UVA0 + 64 * MiB, 0)
    ready.send(msg(Request.ADD_MEM_REG, SingleMemRegion(r), [fds.one()]))
    fd = fds.one()
    assert ready.send(msg(Request.ADD_MEM_REG, SingleMemRegion(r), [fd])) == [CloseFds((fd,))]
    assert ready.send(msg(Request.REM_MEM_REG, SingleMemRegion(r))) == []
    assert kinds(ready.send(msg(Request.REM_MEM_REG, SingleMemRegion(r)))) == ["RemoveMemRegion"]
    with pytest.raises(ProtocolError, match="no region"):
        ready.send(msg(Request.REM_MEM_REG, SingleMemRegion(r)))


def test_add_mem_reg_overlap_and_slots(fds):
    drv = Driver(BackendProtocol(spec(max_mem_slots=2)))
    negotiate(drv)
    drv.send(msg(Request.ADD_MEM_REG, SingleMemRegion(MemoryRegion(0, MiB, UVA0, 0)), [fds.one()]))
    fd = fds.one()
    out = drv.send(msg(Request.ADD_MEM_REG, SingleMemRegion(MemoryRegion(MiB // 2, MiB, UVA0 + 4 * MiB, 0)),
                       [fd], need_reply=True))
    assert out == [CloseFds((fd,)), Ack(Request.ADD_MEM_REG, ok=False)]
    drv.send(msg(Request.ADD_MEM_REG, SingleMemRegion(MemoryRegion(MiB, MiB, UVA0 + MiB, 0)), [fds.one()]))
    with pytest.raises(ProtocolError, match="at most 2"):
        drv.send(msg(Request.ADD_MEM_REG, SingleMemRegion(MemoryRegion(2 * MiB, MiB, UVA0 + 2 * MiB, 0)),
                     [fds.one()]))


def test_rem_mem_reg_with_an_fd_closes_it(ready, fds):
    fd = fds.one()
    out = ready.send(msg(Request.REM_MEM_REG, SingleMemRegion(default_region()), [fd]))
    assert out[0] == CloseFds((fd,)) and kinds(out) == ["CloseFds", "RemoveMemRegion"]
    assert fds.open() == set()


def test_removing_memory_under_a_running_ring_stops_it_for_good(ready, fds):
    setup_ring(ready, fds, 0)
    out = ready.send(msg(Request.REM_MEM_REG, SingleMemRegion(default_region())))
    assert kinds(out) == ["StopRing", "RemoveMemRegion"]          # not restarted: unmapped
    assert not ready.p.rings[0].started


def test_set_log_base(ready, fds):
    fd = fds.one()
    out = ready.send(msg(Request.SET_LOG_BASE, Log(8192, 0), [fd], need_reply=True))
    assert out == [SetLogBase(fd, 8192, 0), CloseFds((fd,)),
                   Reply(Request.SET_LOG_BASE, U64(0).encode())]
    assert ready.p.log_base == Log(8192, 0)


def test_set_log_base_needs_its_fd(ready):
    with pytest.raises(ProtocolError, match="0 fds"):
        ready.send(msg(Request.SET_LOG_BASE, Log(8192, 0)))


# -- REPLY_ACK -------------------------------------------------------------------------


def test_ack_is_last_and_only_when_asked(ready, fds):
    assert ready.send(msg(Request.SET_VRING_NUM, VringState(0, 256))) == []
    assert ready.send(msg(Request.SET_VRING_NUM, VringState(1, 256), need_reply=True)) == [
        Ack(Request.SET_VRING_NUM)]


def test_no_ack_without_reply_ack_negotiated(drv):
    drv.send(u64(Request.SET_PROTOCOL_FEATURES, 0))
    assert drv.send(msg(Request.SET_VRING_NUM, VringState(0, 256), need_reply=True)) == []
    with pytest.raises(ProtocolError):
        drv.send(msg(Request.SET_VRING_NUM, VringState(0, 3), need_reply=True))


def test_failure_with_reply_ack_changes_nothing(ready):
    before = ready.p.rings
    assert ready.send(msg(Request.SET_VRING_NUM, VringState(0, 3), need_reply=True)) == [
        Ack(Request.SET_VRING_NUM, ok=False)]
    assert ready.p.rings == before and ready.p.broken is None
    assert ready.send(msg(99, need_reply=True)) == [Ack(99, ok=False)]


def test_failure_with_reply_ack_but_no_need_reply_is_fatal(ready):
    with pytest.raises(ProtocolError):
        ready.send(msg(Request.SET_VRING_NUM, VringState(0, 3)))


def test_set_config_is_refused_without_dropping_the_connection(ready):
    cfg = Config(0, 4, 0, b"abcd")
    assert ready.send(msg(Request.SET_CONFIG, cfg, need_reply=True)) == [
        Ack(Request.SET_CONFIG, ok=False)]
    assert ready.send(msg(Request.SET_CONFIG, cfg)) == []
    assert ready.p.broken is None


def test_get_config(ready):
    (r,) = ready.send(msg(Request.GET_CONFIG, Config(4, 8, 0, bytes(8))))
    assert Config.decode(r.payload) == Config(4, 8, 0, bytes(range(4, 12)))
    (r,) = ready.send(msg(Request.GET_CONFIG, Config(56, 8, 0, bytes(8))))    # past the end
    assert r == Reply(Request.GET_CONFIG, b"")


def test_net_set_mtu(ready):
    assert ready.send(u64(Request.NET_SET_MTU, 9000, need_reply=True)) == [
        SetMtu(9000), Ack(Request.NET_SET_MTU)]
    assert ready.send(u64(Request.NET_SET_MTU, 20, need_reply=True)) == [
        Ack(Request.NET_SET_MTU, ok=False)]


def test_send_rarp(ready):
    mac = bytes.fromhex("525400123456")
    assert ready.send(msg(Request.SEND_RARP, mac + b"\0\0")) == [SendRarp(mac)]


def test_backend_req_fd_is_held_until_disconnect(ready, fds):
    fd = fds.one()
    assert ready.send(msg(Request.SET_BACKEND_REQ_FD, b"", [fd], need_reply=True)) == [
        Ack(Request.SET_BACKEND_REQ_FD)]
    assert ready.p.backend_req_fd == fd
    ready.disconnect()
    assert fds.open() == set()


# -- reset / disconnect / fd ownership ------------------------------------------------


@pytest.mark.parametrize("req", [Request.RESET_DEVICE, Request.RESET_OWNER])
def test_reset(ready, fds, req):
    setup_ring(ready, fds, 0)
    setup_ring(ready, fds, 1)
    backend = fds.one()
    ready.send(msg(Request.SET_BACKEND_REQ_FD, b"", [backend]))
    out = ready.send(msg(req))
    assert kinds(out) == ["ResetDevice", "CloseFds"]
    assert fds.open() == {backend}
    assert ready.p.rings == {} and ready.p.regions == () and ready.p.features == 0
    assert ready.p.protocol_features == ALL_PF            # the connection's, kept
    ready.send(u64(Request.SET_FEATURES, NET_FEATURES & ~bit(F.VHOST_LOG_ALL)))
    ready.send(mem_table([default_region()], fds.new(1)))
    assert starts(setup_ring(ready, fds, 0))


def test_disconnect_closes_everything(ready, fds):
    setup_ring(ready, fds, 0)
    setup_ring(ready, fds, 1)
    ready.send(msg(Request.SET_VRING_ERR, VringFile(0, False), [fds.one()]))
    ready.send(msg(Request.SET_LOG_FD, b"", [fds.one()]))
    ready.send(msg(Request.SET_BACKEND_REQ_FD, b"", [fds.one()]))
    held = ready.p.held_fds()
    assert held and held <= fds.open()
    out = ready.disconnect()
    assert out == [ResetDevice(), CloseFds(tuple(sorted(held)))]
    assert fds.open() == set() and ready.p.held_fds() == frozenset()
    assert ready.p.protocol_features == 0 and not ready.p.session_owned


def test_disconnect_while_a_stop_is_pending(ready, fds):
    setup_ring(ready, fds, 0)
    assert ready.p.receive(msg(Request.GET_VRING_BASE, VringState(0, 0))) == [StopRing(0)]
    ready.disconnect()
    assert ready.p.ring_stopped(0, 3) == []
    assert fds.open() == set()


class FakeFds(Fds):
    """Never-reused fd numbers (the protocol never touches fds), so 'closed
    exactly once' is checkable."""

    def __init__(self) -> None:
        super().__init__()
        self._next = 10_000

    def new(self, n: int = 1) -> list[int]:
        out = list(range(self._next, self._next + n))
        self._next += n
        self.made += out
        return out

    def cleanup(self) -> None:
        pass


def _session(drv, fds):
    negotiate(drv)
    for i in range(4):
        drv.send(msg(Request.SET_VRING_CALL, VringFile(i, False), [fds.one()]))
    drv.send(mem_table([default_region()], fds.new(1)))
    for i in range(4):
        setup_ring(drv, fds, i)
        drv.send(msg(Request.SET_VRING_ENABLE, VringState(i, 1)))
    drv.send(msg(Request.SET_LOG_BASE, Log(8192, 0), [fds.one()]))
    drv.send(mem_table([MemoryRegion(0, 32 * MiB, UVA0, 0)], fds.new(1)))   # restarts all
    drv.send(msg(Request.SET_VRING_KICK, VringFile(3, False), [fds.one()]))  # restarts 3
    for i in range(4):
        drv.send(msg(Request.GET_VRING_BASE, VringState(i, 0)))
    for i in range(2):
        setup_ring(drv, fds, i)
    drv.send(msg(Request.SET_VRING_NUM, VringState(0, 128), need_reply=True))  # restarts 0
    drv.send(msg(Request.SET_VRING_NUM, VringState(0, 3), need_reply=True))    # acked failure
    drv.send(msg(Request.SET_VRING_KICK, VringFile(9, False), [fds.one()], need_reply=True))


def test_every_fd_is_closed_exactly_once_or_held():
    fds = FakeFds()
    p = BackendProtocol(spec())
    drv = Driver(p, close=False)
    _session(drv, fds)
    closed = [fd for a in drv.log if isinstance(a, CloseFds) for fd in a.fds]
    assert len(closed) == len(set(closed))
    assert set(closed).isdisjoint(p.held_fds())
    assert set(closed) | set(p.held_fds()) == set(fds.made)
    drv.disconnect()
    closed = [fd for a in drv.log if isinstance(a, CloseFds) for fd in a.fds]
    assert sorted(closed) == sorted(fds.made) and p.held_fds() == frozenset()


def test_no_real_fd_leaks_after_disconnect(fds):
    p = BackendProtocol(spec())
    drv = Driver(p)
    _session(drv, fds)
    assert fds.open() == set(p.held_fds())
    drv.disconnect()
    assert fds.open() == set()


# -- inflight region (INFLIGHT_SHMFD) ---------------------------------------------


INFLIGHT_PF = ALL_PF | bit(PF.INFLIGHT_SHMFD)


@pytest.fixture
def iready(fds):
    """`ready` for a device offering INFLIGHT_SHMFD (blk devices do)."""
    d = Driver(BackendProtocol(spec(protocol_features=INFLIGHT_PF)))
    negotiate(d)
    d.send(mem_table([default_region()], fds.new(1)))
    return d


def test_get_inflight_fd_asks_the_caller_for_a_region(iready):
    from vfe.vhost.actions import GetInflight
    from vfe.vhost.messages import Inflight
    assert iready.send(msg(Request.GET_INFLIGHT_FD, Inflight(0, 0, 2, 128))) == [GetInflight(2, 128)]
    for bad, why in ((Inflight(0, 0, 5, 128), "for 5 queues"), (Inflight(0, 0, 2, 100), "of 100 entries"),
                     (Inflight(0, 0, 2, 2048), "of 2048 entries")):
        p = BackendProtocol(spec(protocol_features=INFLIGHT_PF))
        d = Driver(p)
        negotiate(d)
        with pytest.raises(ProtocolError, match=why):    # a mandatory reply: no nack
            d.send(msg(Request.GET_INFLIGHT_FD, bad))


def test_set_inflight_fd_is_applied_like_a_memory_change(iready, fds):
    ready = iready
    from vfe.vhost.actions import SetInflight
    from vfe.vhost.inflight import region_size
    from vfe.vhost.messages import Inflight
    setup_ring(ready, fds, 0)
    ready.avail[0] = 7
    info = Inflight(region_size(2, 256), 0, 2, 256)
    fd = fds.one()
    out = ready.send(msg(Request.SET_INFLIGHT_FD, info, [fd]))
    # running rings stop, the region is set, they start again from the stop
    assert kinds(out) == ["StopRing", "SetInflight", "CloseFds", "StartRing"]
    assert out[1] == SetInflight(fd, info.mmap_size, 0, 2, 256)
    assert out[2] == CloseFds((fd,)) and starts(out)[0].base == 7
    assert ready.p.inflight == info
    assert fd not in ready.p.held_fds()


def test_set_inflight_fd_too_small_is_refused_with_reply_ack(iready, fds):
    ready = iready
    from vfe.vhost.inflight import region_size
    from vfe.vhost.messages import Inflight
    fd = fds.one()
    out = ready.send(msg(Request.SET_INFLIGHT_FD, Inflight(region_size(2, 256) - 1, 0, 2, 256), [fd],
                         need_reply=True))
    assert out == [CloseFds((fd,)), Ack(Request.SET_INFLIGHT_FD, ok=False)]
    assert ready.p.inflight is None


def test_inflight_needs_the_protocol_feature(fds):
    from vfe.vhost.messages import Inflight
    drv = Driver(BackendProtocol(spec(protocol_features=INFLIGHT_PF)))
    negotiate(drv, pf=ALL_PF)
    with pytest.raises(ProtocolError, match="INFLIGHT_SHMFD"):
        drv.send(msg(Request.GET_INFLIGHT_FD, Inflight(0, 0, 1, 128)))


def test_ring_larger_than_the_inflight_region_is_refused_in_either_order(iready, fds):
    """Finding 2: a region for queues of 2 entries (the front-end's own:
    64 bytes, consistent in itself) and rings of 256.  SET_VRING_NUM after
    it is refused (REPLY_ACK: a nack, nothing changed; without: fatal), so
    is the region after such a ring; a ring the region does not cover
    (index >= its num_queues) is not its business."""
    from vfe.vhost.messages import Inflight
    ready = iready
    own = Inflight(64, 0, 1, 2)
    assert ready.send(msg(Request.SET_INFLIGHT_FD, own, [fds.one()]))[0].__class__.__name__ == "SetInflight"
    out = ready.send(msg(Request.SET_VRING_NUM, VringState(0, 256), need_reply=True))
    assert out == [Ack(Request.SET_VRING_NUM, ok=False)]
    assert 0 not in ready.p.rings or ready.p.rings[0].num == 0
    assert ready.send(msg(Request.SET_VRING_NUM, VringState(0, 2), need_reply=True)) == [
        Ack(Request.SET_VRING_NUM)]
    assert ready.send(msg(Request.SET_VRING_NUM, VringState(1, 256), need_reply=True)) == [
        Ack(Request.SET_VRING_NUM)]
    fd = fds.one()
    out = ready.send(msg(Request.SET_INFLIGHT_FD, Inflight(128, 0, 2, 2), [fd], need_reply=True))
    assert out == [CloseFds((fd,)), Ack(Request.SET_INFLIGHT_FD, ok=False)]
    assert ready.p.inflight == own
    with pytest.raises(ProtocolError, match=r"ring 0: size 256 does not fit the inflight region "
                                            r"\(queues of 2 entries\)"):
        ready.send(msg(Request.SET_VRING_NUM, VringState(0, 256)))
