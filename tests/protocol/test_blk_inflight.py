"""Inflight I/O tracking (vhost-user INFLIGHT_SHMFD) of blk devices, against
a real daemon driven by the Python front-end playing QEMU's part:

- GET_INFLIGHT_FD answers a region sized for QEMU's split-ring layout, as a
  memfd, initialised; SET_INFLIGHT_FD maps the region we give back and the
  engine keeps it up to date (used_idx follows used->idx, nothing stays
  marked once answered);
- a daemon killed with SIGKILL in the middle of a stream of large writes
  to a file bdev: its successor, given the same region (as QEMU keeps it),
  answers every request exactly once and the file holds every write;
- the region a crash leaves between "used->idx published" and "inflight
  marks cleared": that batch is not served again, while heads really left
  inflight are, in the order they were taken;
- a malformed region (too small, an fd that cannot be mapped, a region
  for another ring size) is refused with a clear error and the daemon goes
  on serving its other disk.
"""
from __future__ import annotations

import os
import re
import signal
import struct
import time

import pytest

from tests.protocol.blk_helpers import S_OK, T_IN, T_OUT, BlkDaemon, BlkQueue
from tests.protocol.daemon_helpers import MiB, close_frontend, serving

from vfe.testing.channel import NackError
from vfe.testing.frontend import Frontend
from vfe.vhost import inflight as layout
from vfe.vhost.messages import Inflight, ProtocolFeature, Request
from vfe.vhost.transport import PeerClosed
from vfe.virtio.constants import bit

SIZE_MB = 256
QSIZE = 64


@pytest.fixture
def disk(tmp_path):
    """A daemon with a file bdev (blk0, 2 queues) and a malloc disk (blk1)."""
    img = tmp_path / "disk.img"
    img.write_bytes(b"")
    d = BlkDaemon({}, {"file": f"bdev=file,path={img},size={SIZE_MB},queues=2",
                       "other": "bdev=malloc,size=8"}, workers=2)
    d.img = img
    frontends: list[Frontend] = []
    d.frontends = frontends
    with serving(d):
        try:
            yield d
        finally:
            for fe in frontends:
                fe.close()


def open_blk(d, dev: str, rings: int = 1, **kw) -> Frontend:
    d.wait_detached(dev)
    fe = Frontend.connect(d.paths[dev])
    d.frontends.append(fe)
    fe.dev = dev
    kw.setdefault("mem_size", 16 * MiB)
    fe.start(rings=rings, queue_size=QSIZE, buf_size=64, **kw)
    fe.q = [BlkQueue(fe, i) for i in range(rings)]
    return fe


def negotiated(d, dev: str = "file", ack_all: bool = False) -> Frontend:
    """A front-end on ``dev`` with its features negotiated and no ring yet
    (the fixture closes it if the test fails before close_frontend)."""
    fe = Frontend.connect(d.paths[dev])
    d.frontends.append(fe)
    fe.dev = dev
    fe.ack_all = ack_all
    fe.negotiate()
    return fe


def region(fe: Frontend) -> layout.InflightRegion:
    """Our own view of the front-end's region (what QEMU holds)."""
    info = fe.inflight
    return layout.InflightRegion(fe.inflight_fd, info.mmap_size, info.mmap_offset,
                                 info.num_queues, info.queue_size)


def used_heads(q: BlkQueue, start: int, end: int) -> list[int]:
    """Heads in the used ring between two used->idx values (reading guest memory)."""
    d = q.ring.driver
    out = []
    i = start
    while i != end:
        out.append(d._used16[2 + 4 * (i % d.size)])      # u32 id, low half (ids < 65536)
        i = (i + 1) & 0xFFFF
    return out


def refused_then_other_disk_serves(d, fe: Frontend) -> None:
    """After a refusal: close ``fe`` (wait for the device to detach) and
    check the daemon's other device still serves I/O."""
    close_frontend(d, fe)
    check_other_disk(d)


def check_other_disk(d) -> None:
    """The daemon's other device serves I/O (after each refusal below)."""
    fe = open_blk(d, "other")
    q = fe.q[0]
    q.write(3, b"\x3c" * 4096)
    assert q.read(3, 4096) == b"\x3c" * 4096
    close_frontend(d, fe)
    d.frontends.remove(fe)


def test_get_inflight_fd_reply_and_the_region_in_use(disk):
    fe = negotiated(disk)
    assert fe.backend_protocol_features & bit(ProtocolFeature.INFLIGHT_SHMFD)
    info, fd = fe.get_inflight_fd(2, QSIZE)
    try:
        # 16-byte header + 16 bytes per descriptor, per queue, 64-byte aligned
        assert info == Inflight(2 * ((16 + 16 * QSIZE + 63) & ~63), 0, 2, QSIZE)
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:vfe-inflight")
        assert os.fstat(fd).st_size == info.mmap_size
        r = layout.InflightRegion(fd, info.mmap_size, 0, 2, QSIZE)
        assert [r.queue_header(q) for q in (0, 1)] == [(0, 1, QSIZE, 0, 0)] * 2
        assert r.inflight_heads(0) == {} and r.inflight_heads(1) == {}
        r.close()
    finally:
        os.close(fd)

    # start as QEMU does (its own GET, then SET), and use the disk
    fe.start(rings=2, queue_size=QSIZE, buf_size=64, mem_size=16 * MiB)
    fe.q = [BlkQueue(fe, i) for i in range(2)]
    data = os.urandom(64 << 10)
    for i in range(5):
        fe.q[0].write(i * 128, data)
    fe.q[1].write(4096, data)
    assert fe.q[1].read(0, len(data)) == data
    r = region(fe)
    try:
        # the engine writes into the region we gave it: used_idx follows
        # used->idx, and nothing answered stays marked
        assert r.queue_header(0)[4] == fe.q[0].ring.driver.used_idx() == 5
        assert r.queue_header(1)[4] == fe.q[1].ring.driver.used_idx() == 2
        assert r.inflight_heads(0) == {} and r.inflight_heads(1) == {}
    finally:
        r.close()


def test_requests_left_by_a_killed_daemon_complete_exactly_once(disk):
    """SIGKILL while the daemon works through 24 writes of 4 MiB each."""
    n, chunk = 24, 4 * MiB
    fe = open_blk(disk, "file", rings=2, mem_size=(n * 4 + 16) * MiB)
    q = fe.q[0]
    base0 = q.ring.driver.used_idx()
    pats = [bytes([0x40 + k]) * 512 * (chunk // 512) for k in range(n)]
    heads = {}
    for k in range(n):
        heads[q.submit(T_OUT, k * (chunk // 512), pats[k], kick=False, indirect=True)] = k
    r = region(fe)
    try:
        flags = range(layout.HEADER_SIZE, layout.HEADER_SIZE + layout.DESC_SIZE * QSIZE,
                      layout.DESC_SIZE)
        os.eventfd_write(q.ring.kick_fd, 1)
        # kill as soon as the engine has taken a request (marked it inflight)
        deadline = time.monotonic() + 10
        while not any(r.mmap[i] for i in flags):
            assert time.monotonic() < deadline, "the daemon never took a request"
        disk.proc.kill()                                   # SIGKILL, waits for it
        done = (q.ring.driver.used_idx() - base0) & 0xFFFF
        assert done < n, "the daemon finished everything before it was killed"
        answered = set(used_heads(q, base0, q.ring.driver.used_idx()))
        left = set(r.inflight_heads(0)) - answered          # taken, not answered
    finally:
        r.close()

    disk.start()                                           # same socket, same file
    mark = disk.mark()
    fe.reconnect(disk.paths["file"])
    fe.start(rings=2, queue_size=QSIZE, buf_size=64)
    # every request answered once: the driver ring raises on a head returned twice
    got = q.complete(n, timeout=60)
    assert [s for s, _, _ in got] == [S_OK] * n
    assert sorted(heads[h] for h in used_heads(q, base0, q.ring.driver.used_idx())) == list(range(n))
    log = disk.wait_log("left inflight resubmitted", since=mark)
    m = re.search(r"blk0: ring 0: (\d+) request\(s\) left inflight resubmitted", log)
    assert m and int(m.group(1)) == len(left), (left, log)
    time.sleep(0.2)
    assert not q.ring.driver.has_used()                    # and nothing more
    # the file holds every write (FLUSH first: the daemon's page cache is the file's)
    assert q.request(4)[0] == S_OK
    with open(disk.img, "rb") as f:
        for k in range(n):
            f.seek(k * chunk)
            assert f.read(chunk) == pats[k], k


def test_a_batch_published_but_not_cleared_is_not_served_again(disk):
    """The dead daemon's region, written by hand at the worst moments: one
    batch published (used->idx moved) with its marks not yet cleared, and
    two heads taken and never answered."""
    fe = open_blk(disk, "file", rings=1)
    q = fe.q[0]
    for k in range(4):
        q.write(k * 8, bytes([k + 1]) * 4096)
    disk.proc.kill()                       # idle: nothing inflight
    r = region(fe)
    try:
        drv = q.ring.driver
        used = drv.used_idx()
        last = used_heads(q, used - 1, used)[0]            # the last answered request
        assert r.queue_header(0)[4] == used and r.inflight_heads(0) == {}
        # (1) crash between used->idx and the clear: `last` still marked,
        #     on the last-batch list, the region's used_idx one behind
        qoff = r.offset
        struct.pack_into("<B", r.mmap, qoff + 16 + 16 * last, 1)
        struct.pack_into("<Q", r.mmap, qoff + 16 + 16 * last + 8, 100)
        struct.pack_into("<H", r.mmap, qoff + 12, last)    # last_batch_head
        struct.pack_into("<H", r.mmap, qoff + 14, (used - 1) & 0xFFFF)
        # (2) two requests the dead daemon took (avail moved past them) and
        #     never answered, taken in the order b then a
        a = q.submit(T_OUT, 1000, b"\xaa" * 4096, kick=False)
        b = q.submit(T_OUT, 1000, b"\xbb" * 4096, kick=False)
        for head, counter in ((b, 101), (a, 102)):
            struct.pack_into("<Q", r.mmap, qoff + 16 + 16 * head + 8, counter)
            struct.pack_into("<B", r.mmap, qoff + 16 + 16 * head, 1)
    finally:
        r.close()

    disk.start()
    mark = disk.mark()
    fe.reconnect(disk.paths["file"])
    fe.start(rings=1, queue_size=QSIZE, buf_size=64)
    got = q.complete(2)                    # a second answer for `last` would raise here
    assert [s for s, _, _ in got] == [S_OK, S_OK]
    assert used_heads(q, used, used + 2) == [b, a]           # counter order
    assert "2 request(s) left inflight resubmitted" in disk.wait_log("resubmitted", since=mark)
    # sector 1000 holds what `a` wrote: it was served last
    assert q.read(1000, 4096) == b"\xaa" * 4096
    # and the ring goes on after them (no avail entry taken twice or skipped)
    assert q.read(0, 4096) == b"\x01" * 4096
    time.sleep(0.2)
    assert not q.ring.driver.has_used()


def test_malformed_inflight_regions_are_refused(disk):
    mark = disk.mark()
    # (1) too small for what it claims: REPLY_ACK nack, the connection stays
    fe = negotiated(disk)
    info, fd = fe.get_inflight_fd(1, QSIZE)
    with pytest.raises(NackError):
        fe._request(Request.SET_INFLIGHT_FD, Inflight(64, 0, 1, QSIZE).encode(), [fd], ack=True)
    assert "SET_INFLIGHT_FD failed (REPLY_ACK 1): inflight region of 64 bytes" in disk.log_since(mark)
    assert fe.get_queue_num() == 2                     # still served
    # (2) an fd shorter than the region it is said to hold: the mapping is
    #     refused (no SIGBUS later), and without an ack to say so the
    #     connection is dropped
    short = os.memfd_create("short")
    os.ftruncate(short, 100)
    fe.set_inflight_fd(info, short)
    disk.wait_log("blk0: protocol error, dropping the connection: SET_INFLIGHT_FD: "
                  "fd ", since=mark)
    assert "file is 100 bytes, mapping needs" in disk.log_since(mark)
    os.close(short)
    os.close(fd)
    refused_then_other_disk_serves(disk, fe)

    # (3) an fd that cannot be mapped at all (an eventfd)
    mark = disk.mark()
    fe = negotiated(disk)
    efd = os.eventfd(0)
    fe.set_inflight_fd(Inflight(layout.region_size(1, QSIZE), 0, 1, QSIZE), efd)
    os.close(efd)
    tail = disk.wait_log("dropping the connection: SET_INFLIGHT_FD", since=mark)
    assert "mmap of" in tail and "failed" in tail, tail
    refused_then_other_disk_serves(disk, fe)

    # (4) a region for rings of 32 entries, rings of 64: SET_VRING_NUM is
    #     refused (without an ack to say so, the connection goes)
    mark = disk.mark()
    fe = negotiated(disk)
    fe.inflight, fe.inflight_fd = fe.get_inflight_fd(1, 32)
    fe.inflight_map = None
    with pytest.raises(PeerClosed):
        fe.start(rings=1, queue_size=QSIZE, buf_size=64)
    assert ("blk0: protocol error, dropping the connection: ring 0: size 64 does not fit the "
            "inflight region (queues of 32 entries)") in disk.wait_log("dropping", since=mark)
    refused_then_other_disk_serves(disk, fe)

    # (4b) the region's own header says 32 entries, the message 64: the
    #      ring does not start (the engine reads desc_num, and trusts it no
    #      further than that)
    mark = disk.mark()
    fe = negotiated(disk)
    info, fd = fe.get_inflight_fd(1, QSIZE)
    os.pwrite(fd, struct.pack("<H", 32), 10)               # desc_num
    fe.inflight, fe.inflight_fd, fe.inflight_map = info, fd, None
    fe.start(rings=1, queue_size=QSIZE, buf_size=64)
    assert ("blk0: StartRing failed: ring 0: the inflight region tracks 32 entries, "
            "the ring has 64") in disk.wait_log("StartRing failed", since=mark)
    refused_then_other_disk_serves(disk, fe)

    # (5) GET_INFLIGHT_FD for more queues than the device has (a mandatory
    #     reply cannot carry a refusal: the connection is dropped)
    mark = disk.mark()
    fe = negotiated(disk)
    fe.send_message(Request.GET_INFLIGHT_FD, Inflight(0, 0, 3, QSIZE).encode(), expect_reply=False)
    assert "inflight region for 3 queues (the device has 2)" in disk.wait_log(
        "dropping the connection", since=mark)
    refused_then_other_disk_serves(disk, fe)
    assert disk.alive() and "Traceback" not in disk.log()


def test_head_out_of_range_with_an_inflight_region_stops_the_ring(disk):
    """Finding 1: head 0x1000 on a queue whose inflight region holds 64
    entries.  The head used to be marked in the region before anything
    checked it: a write 64 KiB past it (the daemon died of SIGSEGV).  Now
    the ring stops with the reason logged, nothing in the region changes,
    and the device's other queue and the other disk keep working."""
    fe = open_blk(disk, "file", rings=2)
    q0, q1 = fe.q
    q0.write(8, b"\x11" * 4096)
    r = region(fe)
    try:
        before = bytes(r.mmap)
        mark = disk.mark()
        q0.post_raw(0x1000)
        disk.wait_log("blk0: ring 0 stopped: descriptor head index out of range "
                      "(the guest must reset the device)", since=mark)
        assert bytes(r.mmap) == before
    finally:
        r.close()
    assert fe.get_vring_base(0) == 1                  # the bad entry was not taken
    assert q1.read(8, 4096) == b"\x11" * 4096
    check_other_disk(disk)
    assert disk.alive() and "Traceback" not in disk.log()


def test_own_inflight_region_smaller_than_the_ring_is_refused(disk):
    """Finding 2: the front-end's own region (not one from GET_INFLIGHT_FD):
    64 bytes, declared for one queue of 2 entries -- consistent in itself
    -- and then a ring of 256.  The ring used to be tracked in it as if it
    held 256 entries (4 KiB written into a 64-byte file's page and past
    it).  Now SET_VRING_NUM is refused: the connection goes when the
    front-end asked for no ack (QEMU's start), REPLY_ACK says no when it
    did, and the daemon serves the other disk."""
    own = os.memfd_create("own-inflight")
    os.ftruncate(own, 64)
    try:
        mark = disk.mark()
        fe = negotiated(disk)
        fe.inflight, fe.inflight_fd, fe.inflight_map = Inflight(64, 0, 1, 2), os.dup(own), None
        with pytest.raises(PeerClosed):
            fe.start(rings=1, queue_size=256, buf_size=64, mem_size=16 * MiB)
        assert ("blk0: protocol error, dropping the connection: ring 0: size 256 does not fit "
                "the inflight region (queues of 2 entries)") in disk.wait_log("dropping", since=mark)
        assert os.pread(own, 64, 0) == bytes(64)       # never written
        refused_then_other_disk_serves(disk, fe)

        # the same with REPLY_ACK asked for: a nack, the connection stays;
        # and the other order (ring first, then the region) is refused too
        mark = disk.mark()
        fe = negotiated(disk, ack_all=True)
        fe.set_inflight_fd(Inflight(64, 0, 1, 2), own)
        with pytest.raises(NackError):
            fe.set_vring_num(0, 256)
        assert ("SET_VRING_NUM failed (REPLY_ACK 1): ring 0: size 256 does not fit the "
                "inflight region (queues of 2 entries)") in disk.log_since(mark)
        fe.set_vring_num(1, 256)                        # not tracked by the region: fine
        with pytest.raises(NackError):
            fe.set_inflight_fd(Inflight(layout.region_size(2, 2), 0, 2, 2), own)
        assert ("SET_INFLIGHT_FD failed (REPLY_ACK 1): ring 1: size 256 does not fit the "
                "inflight region (queues of 2 entries)") in disk.log_since(mark)
        assert fe.get_queue_num() == 2                  # still served
        assert os.pread(own, 64, 0) == bytes(64)
        close_frontend(disk, fe)
    finally:
        os.close(own)
    check_other_disk(disk)
    assert disk.alive() and "Traceback" not in disk.log()


def _usage(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/maps") as f:
        return len(os.listdir(f"/proc/{pid}/fd")), sum(1 for _ in f)


def _quiet_usage(pid: int, quiet: float = 0.5, timeout: float = 10.0) -> tuple[int, int]:
    """The daemon closes a dropped peer's fds when it notices: wait until the
    counts stop moving."""
    deadline = time.monotonic() + timeout
    last, since = _usage(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = _usage(pid)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return last


def test_repeated_and_overloaded_inflight_requests_leak_nothing(disk):
    """The DPDK CVE classes around INFLIGHT_SHMFD: a region leaked by every
    GET_INFLIGHT_FD (CVE-2020-10725), fds attached to GET/SET_INFLIGHT_FD
    never closed (CVE-2020-10726, CVE-2022-0669), a num_queues/queue_size
    the region does not hold (CVE-2021-3839, test above).  A front-end that
    asks 100 times, and one that sends its messages with extra fds, leave
    the daemon's fds and mappings where they were."""
    pid = disk.proc.proc.pid
    fe = negotiated(disk)
    info, fd = fe.get_inflight_fd(2, QSIZE)
    os.close(fd)
    before = _quiet_usage(pid)
    for _ in range(100):
        info, fd = fe.get_inflight_fd(2, QSIZE)
        os.close(fd)
    assert _quiet_usage(pid) == before

    # extra fds on GET (takes none) and on SET (takes one): refused, and
    # every fd sent is closed by the daemon when it drops the connection
    spare = [os.memfd_create("spare") for _ in range(4)]
    try:
        for request, fds in ((Request.GET_INFLIGHT_FD, spare[:3]), (Request.SET_INFLIGHT_FD, spare)):
            other = Frontend.connect(disk.paths["other"])
            other.negotiate()
            payload = Inflight(info.mmap_size, 0, 2, QSIZE).encode()
            try:
                other.send_message(request, payload, fds, expect_reply=False)
                other.get_features()
            except (PeerClosed, OSError):
                pass
            other.close()
    finally:
        for s in spare:
            os.close(s)
    disk.wait_detached("other")
    assert _quiet_usage(pid) == before
    check_other_disk(disk)
