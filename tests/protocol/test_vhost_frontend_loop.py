"""The test front-end (QEMU's part) against BackendProtocol + a dummy executor,
over a real socketpair: the QEMU 7.2 sequence starts every ring with the
right fields, and the front-end's data path round-trips through a loopback."""
import os
import threading

import pytest

from tests.protocol.vhost_backend_loop import DummyBackend

from vfe.testing.channel import NackError
from vfe.testing.frontend import Frontend
from vfe.vhost.actions import (
    AddMemRegion, DeviceSpec, EnableRing, SetFeatures, SetLogBase, SetMemTable, SetStatus,
    StartRing, StopRing,
)
from vfe.vhost.messages import ProtocolFeature, Request, U64
from vfe.vhost.protocol import BackendProtocol
from vfe.vhost.transport import Connection, PeerClosed, connect
from vfe.virtio.constants import F, Status, bit, mask

FEATURES = mask(F.VERSION_1, F.NET_MAC, F.NET_MRG_RXBUF, F.RING_EVENT_IDX, F.RING_INDIRECT_DESC,
                F.VHOST_LOG_ALL, F.VHOST_USER_PROTOCOL_FEATURES)
PF = ProtocolFeature
PROTOCOL_FEATURES = sum(1 << p for p in (PF.MQ, PF.LOG_SHMFD, PF.RARP, PF.REPLY_ACK, PF.MTU,
                                         PF.CONFIG, PF.RESET_DEVICE, PF.CONFIGURE_MEM_SLOTS,
                                         PF.STATUS))

pytestmark = pytest.mark.no_fd_leaks


def make_spec(**kw):
    base = dict(features=FEATURES, protocol_features=PROTOCOL_FEATURES, queue_num=4, max_queues=8,
                max_queue_size=1024, max_mem_slots=32)
    base.update(kw)
    return DeviceSpec(**base)


@pytest.fixture
def session():
    made = []

    def start(spec=None, loopback=True):
        a, b = Connection.pair()
        be = DummyBackend(b, BackendProtocol(spec or make_spec()), loopback=loopback).start()
        fe = Frontend(a, timeout=5)
        made.append((fe, be))
        return fe, be
    yield start
    for fe, be in made:
        fe.close()
        be.join()


def test_qemu_sequence_starts_every_ring_with_the_right_fields(session):
    fe, be = session()
    fe.start(queue_pairs=2, queue_size=256)
    assert fe.queue_num == 4 and fe.max_mem_slots == 32
    assert fe.protocol_features == PROTOCOL_FEATURES
    starts = {a.ring.index: a.ring for a in be.of_type(StartRing)}
    assert sorted(starts) == [0, 1, 2, 3]
    uva = fe.memory.gpa_to_uva
    for i, cfg in starts.items():
        ring = fe.rings[i]
        assert cfg.size == 256 and cfg.base == 0 and not cfg.log_used
        assert cfg.desc_uva == uva(ring.ring_gpa + ring.layout.desc)
        assert cfg.avail_uva == uva(ring.ring_gpa + ring.layout.avail)
        assert cfg.used_uva == uva(ring.ring_gpa + ring.layout.used)
        assert cfg.kick_fd >= 0 and cfg.call_fd >= 0 and cfg.enabled is False
    assert [e.index for e in be.of_type(EnableRing)] == [0, 1, 2, 3]
    acked = FEATURES & ~bit(F.VHOST_LOG_ALL)
    assert be.of_type(SetFeatures) == [SetFeatures(acked)]
    assert [s.status for s in be.of_type(SetStatus)] == [
        Status.FEATURES_OK, Status.FEATURES_OK | Status.ACKNOWLEDGE | Status.DRIVER | Status.DRIVER_OK]
    assert len(be.of_type(AddMemRegion)) == 1 and not be.of_type(SetMemTable)   # QEMU 7.2 way


def test_set_mem_table_without_configure_mem_slots(session):
    fe, be = session(make_spec(protocol_features=PROTOCOL_FEATURES & ~(1 << PF.CONFIGURE_MEM_SLOTS)))
    fe.start(queue_pairs=1, queue_size=64, regions=8, mem_size=32 << 20)
    assert len(be.of_type(SetMemTable)) == 1 and not be.of_type(AddMemRegion)
    assert len(be.memory.regions) == 8
    fe.post_rx_buffers(0)
    fe.send_frame(0, b"eight regions")
    assert fe.recv_frames(0, timeout=3) == [b"eight regions"]


def test_loopback_frames(session):
    fe, be = session()
    fe.start(queue_pairs=1, queue_size=128)
    fe.post_rx_buffers(0, 64)
    frames = [bytes([i]) * (60 + i) for i in range(20)]
    for f in frames[:10]:
        fe.send_frame(0, f)
    for f in frames[10:15]:
        fe.send_frame(0, f, split_header=True)
    for f in frames[15:]:
        fe.send_frame(0, f, indirect=True)
    assert fe.recv_frames(0, timeout=3, count=20) == frames
    assert fe.wait_tx_done(0, timeout=2)
    big = os.urandom(5000)                                    # a chain of 3 slots
    fe.send_frame(0, big)
    [(hdr, got)] = fe.recv_frames(0, timeout=3, count=1, with_header=True)
    assert got == big                                        # merged from 3 RX buffers
    assert int.from_bytes(hdr[10:12], "little") == 3         # num_buffers


def test_ten_regions_through_add_mem_reg(session):
    fe, be = session()
    fe.start(queue_pairs=1, queue_size=64, mem_size=40 << 20, regions=10, gpa_gap=1 << 20)
    adds = be.of_type(AddMemRegion)
    assert len(adds) == 10 and not be.of_type(SetMemTable)
    assert sorted(r.mmap_offset for r in (a.region for a in adds)) == [k * (4 << 20) for k in range(10)]
    assert len(be.memory.regions) == 10
    fe.post_rx_buffers(0)
    fe.send_frame(0, b"across regions")
    assert fe.recv_frames(0, timeout=3) == [b"across regions"]


def test_stop_and_restart_continue_from_the_stopped_index(session):
    fe, be = session()
    fe.start(queue_pairs=1, queue_size=64)
    fe.post_rx_buffers(0, 16)
    for i in range(5):
        fe.send_frame(0, b"frame%d" % i)
    assert len(fe.recv_frames(0, timeout=3, count=5, repost=False)) == 5
    bases = fe.stop()                                         # SET_STATUS 0, GET_VRING_BASE x2
    assert bases == {0: 5, 1: 5}                              # 11 RX buffers still posted
    assert be.of_type(SetStatus)[-1] == SetStatus(0)
    assert len(be.of_type(StopRing)) == 2 and be.rings == {}
    for i in (0, 1):
        fe.setup_ring(i, 64)
    fe.sync()
    assert {a.ring.index: a.ring.base for a in be.of_type(StartRing)[2:]} == bases
    fe.send_frame(0, b"after restart")                       # lands in a buffer posted before
    assert fe.recv_frames(0, timeout=3) == [b"after restart"]


def test_reply_ack_failure_is_reported_and_the_connection_survives(session):
    fe, be = session()
    fe.start(queue_pairs=1, queue_size=64)
    fe.ack_all = True
    with pytest.raises(NackError):
        fe.set_vring_num(0, 100)
    with pytest.raises(NackError):
        fe.set_config(0, b"\x01")
    fe.net_set_mtu(1500)
    assert fe.get_features() == FEATURES


def test_a_fatal_error_drops_the_connection_and_closes_fds(session):
    fe, be = session()
    fe.start(queue_pairs=1, queue_size=64)
    fe.send_message(99)                                     # unknown id, no REPLY_ACK asked
    with pytest.raises(PeerClosed):
        fe.get_features()
    be.join()
    assert "unknown request id" in str(be.protocol_error)
    assert be.p.held_fds() == frozenset()


def test_migration_messages(session):
    fe, be = session()
    fe.start(queue_pairs=1, queue_size=64)
    log_fd = os.memfd_create("log", os.MFD_CLOEXEC)
    os.ftruncate(log_fd, 8192)
    fe.set_log_base(log_fd, 8192)                            # waits for the u64 reply
    os.close(log_fd)
    fe.set_features(fe.features | bit(F.VHOST_LOG_ALL))      # NEED_REPLY when logging
    ring = fe.rings[1]
    uva = fe.memory.gpa_to_uva
    fe.set_vring_addr(1, uva(ring.ring_gpa + ring.layout.desc), uva(ring.ring_gpa + ring.layout.used),
                      uva(ring.ring_gpa + ring.layout.avail), ring.ring_gpa + ring.layout.used, log=True)
    assert be.of_type(SetLogBase)[0].size == 8192 and be.log is not None
    assert be.of_type(SetFeatures)[-1].features & bit(F.VHOST_LOG_ALL)
    last = be.of_type(StartRing)[-1].ring
    assert last.index == 1 and last.log_used and last.log_guest_addr == ring.ring_gpa + ring.layout.used


def test_gets_and_misc(session):
    fe, be = session(make_spec(config=bytes(range(32))))
    fe.negotiate()
    assert fe.get_config(4, 4) == bytes([4, 5, 6, 7])
    assert fe.get_config(30, 8) == b""                        # past the end: error reply
    fe.send_rarp(bytes.fromhex("525400000001"))
    fe.set_status(Status.ACKNOWLEDGE)
    assert fe.get_status() == Status.ACKNOWLEDGE
    reply = fe.send_message(Request.GET_QUEUE_NUM, need_reply=True)
    assert U64.decode(reply.payload).value == 4              # no extra ack after it
    fe.reset_device()
    assert fe.get_features() == FEATURES


def test_client_mode_backend(tmp_path):
    path = str(tmp_path / "qemu.sock")
    lst = Frontend.listen(path)
    holder = {}

    def backend():
        conn = connect(path, retry_interval=0.01, timeout=3)
        holder["be"] = DummyBackend(conn, BackendProtocol(make_spec())).start()

    t = threading.Thread(target=backend)
    t.start()
    fe = Frontend.accept(lst, timeout=3)
    t.join()
    fe.start(queue_pairs=1, queue_size=64)
    fe.post_rx_buffers(0, 4)
    fe.send_frame(0, b"client mode")
    assert fe.recv_frames(0, timeout=3) == [b"client mode"]
    fe.close()
    holder["be"].join()
    lst.close()
