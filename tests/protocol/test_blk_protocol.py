"""virtio-blk devices of a real virtio-net-controller process, driven by the
Python vhost-user front-end with a minimal blk request driver
(blk_helpers.py).

What a guest driver could send, good and bad: config space, reads and
writes over split and indirect chains on several queues at once, FLUSH,
GET_ID, DISCARD and WRITE_ZEROES, and the errors -- out-of-range sectors
and lengths that are not whole sectors (IOERR), unknown types (UNSUPP),
writes to a read-only disk (IOERR), chains with no status byte or no full
header (the ring stops, like a bad net chain) -- while a net device of the
same daemon keeps passing frames.

Devices: net a, net b (net0, net1); blk0 malloc 64 MiB, 4 queues, serial
of exactly 20 bytes; blk1 malloc 1 MiB read-only; blk2 null 1 GiB.  Two
workers, so queues of one device run on different threads.
"""
from __future__ import annotations

import os
import struct
import time

import pytest

from tests.protocol.daemon_helpers import (
    Memfd, MiB, close_frontend, exchange, new_mac, open_frontend, serving,
)
from tests.protocol.blk_helpers import (
    BlkDaemon, S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_GET_LIFETIME, T_IN, T_OUT,
    T_WRITE_ZEROES, BlkQueue, ranges,
)

from vfe.testing.channel import NackError
from vfe.testing.frontend import NEVER_ACK, Frontend
from vfe.vhost.messages import ProtocolFeature, Request
from vfe.virtio.constants import F, bit

SERIAL = b"VFE-BLK-SERIAL-00001"          # exactly 20 bytes: no NUL terminator
CAPACITY = 64 * 2048                        # blk0, sectors


@pytest.fixture(scope="module")
def daemon():
    with serving(BlkDaemon({"a": "", "b": ""},
                           {"disk": f"bdev=malloc,size=64,block-size=512,queues=4,serial={SERIAL.decode()}",
                            "ro": "bdev=malloc,size=1,ro=on,serial=ro-disk",
                            "null": "bdev=null,size=1024,block-size=512"})) as d:
        yield d


@pytest.fixture(autouse=True)
def daemon_guard(daemon):
    if not daemon.alive():
        daemon.start()
    mark = daemon.mark()
    yield daemon
    tail = daemon.log_since(mark)
    alive = daemon.alive()
    assert alive, f"the daemon died during the test:\n{tail[-4000:]}"
    assert "Traceback" not in tail, f"the daemon logged a traceback:\n{tail[-4000:]}"


@pytest.fixture
def blk(daemon):
    """open(dev, queues) -> a started front-end with a BlkQueue per ring (fe.q[i])."""
    opened: list[Frontend] = []

    def open_(dev: str, queues: int = 1, queue_size: int = 64, **kw) -> Frontend:
        daemon.wait_detached(dev)
        fe = Frontend.connect(daemon.paths[dev])
        fe.dev = dev
        opened.append(fe)
        kw.setdefault("mem_size", 32 * MiB)
        fe.start(rings=queues, queue_size=queue_size, buf_size=64, **kw)
        fe.q = [BlkQueue(fe, i) for i in range(queues)]
        return fe

    yield open_
    for fe in opened:
        close_frontend(daemon, fe)


# ---------------------------------------------------------------------------
# Tests


def test_offer_config_space_and_queue_num(blk):
    fe = blk("disk", 4)
    feats = fe.backend_features
    for b in (F.BLK_SIZE_MAX, F.BLK_SEG_MAX, F.BLK_BLK_SIZE, F.BLK_TOPOLOGY, F.BLK_FLUSH,
              F.BLK_CONFIG_WCE, F.BLK_DISCARD, F.BLK_WRITE_ZEROES, F.BLK_MQ, F.VERSION_1):
        assert feats & bit(b), b.name
    assert not feats & bit(F.BLK_RO)
    assert fe.backend_protocol_features & bit(ProtocolFeature.CONFIG)
    assert fe.backend_protocol_features & bit(ProtocolFeature.MQ)
    assert fe.queue_num == 4
    cfg = fe.get_config(0, 60)
    capacity, size_max, seg_max = struct.unpack_from("<QII", cfg, 0)
    assert (capacity, size_max, seg_max) == (CAPACITY, 65536, 126)
    assert struct.unpack_from("<I", cfg, 20)[0] == 512             # blk_size
    assert cfg[32] == 1                                             # writeback
    assert struct.unpack_from("<H", cfg, 34)[0] == 4                # num_queues
    assert struct.unpack_from("<IIIIIB", cfg, 36) == (65536, 32, 1, 65536, 32, 1)
    assert fe.get_config(8, 8) == cfg[8:16]
    with pytest.raises(NackError):
        fe.set_config(32, b"\x00")                                  # refused (REPLY_ACK nack)
    assert fe.get_config(32, 1) == b"\x01"


def test_write_read_split_and_indirect_chains(blk):
    fe = blk("disk", 1)
    q = fe.q[0]
    data = os.urandom(64 * 1024)
    q.write(100, data, pieces=5)
    assert q.read(100, len(data)) == data
    assert q.read(100, len(data), pieces=7, indirect=True) == data
    q.write(300, data[:4096], indirect=True, pieces=3)
    assert q.read(299, 4608)[512:] == data[:4096]
    # the last sector of the disk
    q.write(CAPACITY - 1, b"\x5a" * 512)
    assert q.read(CAPACITY - 2, 1024) == bytes(512) + b"\x5a" * 512
    assert q.request(T_FLUSH)[:2] == (S_OK, 1)


def test_four_queues_in_parallel(blk, daemon):
    fe = blk("disk", 4, queue_size=64)
    blobs = {}
    for i, q in enumerate(fe.q):
        for k in range(16):
            blobs[i, k] = os.urandom(8192)
            q.submit(T_OUT, 4096 + (i * 16 + k) * 16, blobs[i, k], kick=False)
    for q in fe.q:
        os.eventfd_write(q.ring.kick_fd, 1)
    for q in fe.q:
        assert [c[:2] for c in q.complete(16)] == [(S_OK, 1)] * 16
    for i, q in enumerate(fe.q):
        for k in range(16):
            q.submit(T_IN, 4096 + (i * 16 + k) * 16, in_len=8192)
    for i, q in enumerate(fe.q):
        got = q.complete(16)
        assert [g[2] for g in got] == [blobs[i, k] for k in range(16)]


def test_out_of_range_and_partial_sectors_are_ioerr(blk):
    q = blk("disk", 1).q[0]
    assert q.request(T_IN, CAPACITY, in_len=512)[:2] == (S_IOERR, 1)
    assert q.request(T_IN, CAPACITY - 1, in_len=1024)[:2] == (S_IOERR, 1)
    assert q.request(T_OUT, CAPACITY - 1, b"x" * 1024)[:2] == (S_IOERR, 1)
    assert q.request(T_IN, 2**64 - 1, in_len=512)[:2] == (S_IOERR, 1)       # wraps
    assert q.request(T_OUT, 2**63, b"x" * 512)[:2] == (S_IOERR, 1)
    assert q.request(T_IN, 0, in_len=100)[:2] == (S_IOERR, 1)               # not whole sectors
    assert q.request(T_OUT, 0, b"y" * 513)[:2] == (S_IOERR, 1)
    q.write(0, b"z" * 512)                                                  # still serving
    assert q.read(0, 512) == b"z" * 512


def test_unknown_types_are_unsupp(blk):
    q = blk("disk", 1).q[0]
    for kind in (2, 3, T_GET_LIFETIME, 14, 99, 0xFFFFFFFF):
        assert q.request(kind, 0, in_len=512)[:2] == (S_UNSUPP, 1), kind


def test_get_id_returns_the_serial(blk):
    q = blk("disk", 1).q[0]
    status, length, data = q.request(T_GET_ID, in_len=20)
    assert (status, length, data) == (S_OK, 21, SERIAL)
    status, length, data = q.request(T_GET_ID, in_len=8)                     # short buffer
    assert (status, length, data) == (S_OK, 9, SERIAL[:8])


def test_get_id_pads_a_short_serial(blk):
    q = blk("ro", 1).q[0]
    assert q.request(T_GET_ID, in_len=20) == (S_OK, 21, b"ro-disk".ljust(20, b"\0"))


def test_discard_and_write_zeroes(blk):
    q = blk("disk", 1).q[0]
    q.write(2000, b"\xff" * 8192)
    assert q.request(T_DISCARD, 0, ranges((2000, 4, 0)))[:2] == (S_OK, 1)
    assert q.request(T_WRITE_ZEROES, 0, ranges((2008, 2, 1), (2012, 1, 0)))[:2] == (S_OK, 1)
    got = q.read(2000, 8192)
    want = bytes(2048) + b"\xff" * 2048 + bytes(1024) + b"\xff" * 1024 + bytes(512) + b"\xff" * 1536
    assert got == want
    # unmap is not valid for discard; reserved flags; bad ranges; bad lengths
    assert q.request(T_DISCARD, 0, ranges((2000, 1, 1)))[:2] == (S_UNSUPP, 1)
    assert q.request(T_WRITE_ZEROES, 0, ranges((2000, 1, 2)))[:2] == (S_UNSUPP, 1)
    assert q.request(T_DISCARD, 0, ranges((CAPACITY - 1, 2, 0)))[:2] == (S_IOERR, 1)
    assert q.request(T_DISCARD, 0, ranges((0, 65537, 0)))[:2] == (S_IOERR, 1)
    assert q.request(T_DISCARD, 0, ranges(*[(i, 1, 0) for i in range(33)]))[:2] == (S_IOERR, 1)
    assert q.request(T_DISCARD, 0, b"\0" * 15)[:2] == (S_IOERR, 1)
    assert q.request(T_WRITE_ZEROES, 0, b"")[:2] == (S_IOERR, 1)
    # nothing of a refused request was applied
    assert q.read(2012, 512)[:1] == b"\0" and q.read(2013, 512) == b"\xff" * 512


def test_discard_not_negotiated_is_unsupp(blk):
    fe = blk("disk", 1, features=(2**64 - 1) & ~NEVER_ACK & ~(bit(F.BLK_DISCARD) | bit(F.BLK_WRITE_ZEROES)))
    assert not fe.features & bit(F.BLK_DISCARD)
    q = fe.q[0]
    assert q.request(T_DISCARD, 0, ranges((0, 1, 0)))[:2] == (S_UNSUPP, 1)
    assert q.request(T_WRITE_ZEROES, 0, ranges((0, 1, 0)))[:2] == (S_UNSUPP, 1)


def test_read_only_disk_refuses_writes(blk):
    fe = blk("ro", 1)
    assert fe.backend_features & bit(F.BLK_RO)
    q = fe.q[0]
    assert q.request(T_OUT, 0, b"w" * 512)[:2] == (S_IOERR, 1)
    assert q.request(T_WRITE_ZEROES, 0, ranges((0, 1, 0)))[:2] == (S_IOERR, 1)
    assert q.request(T_DISCARD, 0, ranges((0, 1, 0)))[:2] == (S_IOERR, 1)
    assert q.read(0, 4096) == bytes(4096)
    assert q.request(T_FLUSH)[:2] == (S_OK, 1)


def test_null_bdev_reads_zeros_and_drops_writes(blk):
    fe = blk("null", 1)
    assert struct.unpack_from("<Q", fe.get_config(0, 8))[0] == 1024 * 2048
    q = fe.q[0]
    q.write(5, b"\x11" * 4096)
    assert q.read(5, 4096) == bytes(4096)
    assert q.read(1024 * 2048 - 8, 4096) == bytes(4096)
    assert q.request(T_IN, 1024 * 2048, in_len=512)[:2] == (S_IOERR, 1)


@pytest.mark.parametrize("case", ["no status", "short header"])
def test_unanswerable_chains_stop_the_ring(blk, daemon, case):
    """A chain without a device-writable byte (nowhere to put the status)
    or with fewer than 16 readable bytes (no request header) cannot be
    answered: the ring stops like a bad net chain ("the guest must reset
    the device"); the device's other queues keep serving."""
    fe = blk("disk", 2)
    q0, q1 = fe.q
    q0.write(0, b"a" * 512)
    mark = daemon.mark()
    if case == "no status":
        q0.submit(T_IN, 0, in_len=0, status=False)
        reason = "block request has no device-writable status byte"
    else:
        q0.submit(T_IN, 0, in_len=512, header=b"\0" * 8)
        reason = "block request shorter than its 16-byte header"
    daemon.wait_log(f"blk0: ring 0 stopped: {reason}", since=mark)
    used = q0.ring.driver.used_idx()
    q0.submit(T_IN, 0, in_len=512)
    time.sleep(0.1)
    assert q0.ring.driver.used_idx() == used            # stopped: nothing more is served
    assert q1.read(0, 512) == b"a" * 512
    assert fe.get_vring_base(0) == 1                     # the good write only


def test_dirty_log_marks_data_in_and_status(blk):
    fe = blk("disk", 1, mem_size=8 * MiB)
    q = fe.q[0]
    pages = (8 * MiB) // 4096
    log = Memfd(4096)
    try:
        fe.set_log_base(log.fd, pages // 8)
        fe.set_features(fe.features | bit(F.VHOST_LOG_ALL))
        fe.sync()
        q.write(0, os.urandom(8192))
        with open(f"/proc/self/fd/{log.fd}", "r+b") as f:
            f.write(bytes(pages // 8))
        q.submit(T_IN, 0, in_len=8192, pieces=2)
        ins, st = q.last
        assert q.complete()[0][:2] == (S_OK, 8193)
        with open(f"/proc/self/fd/{log.fd}", "rb") as f:
            bitmap = f.read(pages // 8)

        def dirty(gpa):
            page = gpa // 4096
            return bool(bitmap[page // 8] >> (page % 8) & 1)
        for gpa, n, _ in ins:
            assert dirty(gpa) and dirty(gpa + n - 1)
        assert dirty(st[0])
    finally:
        log.close()


def test_net_keeps_passing_traffic_while_blk_is_busy(blk, daemon):
    a = open_frontend(daemon, "a")
    b = open_frontend(daemon, "b")
    try:
        fe = blk("disk", 4)
        exchange(a, b)
        data = os.urandom(32768)
        for rnd in range(20):
            for i, q in enumerate(fe.q):
                q.submit(T_OUT, 8192 + 64 * (rnd * 4 + i), data)
            exchange(a, b)
            for q in fe.q:
                assert q.complete()[0][:2] == (S_OK, 1)
        assert fe.q[3].read(8192 + 64 * (19 * 4 + 3), 32768) == data
    finally:
        close_frontend(daemon, a)
        close_frontend(daemon, b)


def test_get_vring_base_is_exact_and_restart_continues(blk):
    fe = blk("disk", 1)
    q = fe.q[0]
    for k in range(10):
        q.write(k, bytes([k]) * 512)
    assert fe.get_vring_base(0) == 10
    fe.setup_ring(0, 64)
    fe.set_vring_enable(0, True)
    fe.sync()
    assert q.read(3, 512) == b"\x03" * 512
