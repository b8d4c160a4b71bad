"""A front-end that shrinks its guest memory file under running rings
(finding 8 of issue 11) against a real virtio-net-controller process.

Guest memory is a memfd the front-end shares.  Unsealed, the front-end can
ftruncate it after SET_MEM_TABLE; the daemon's next access to a vanished
page raises SIGBUS, which used to kill the daemon and every VM it served.
Now the engine catches it and breaks only the device whose memory it was:

- frames flowing from b into a and c when a's memory vanishes: a's ring
  stops ("guest memory vanished (SIGBUS at ...)"), the daemon lives, b and
  c go on passing frames; a's RX ring lock, held by the worker when it
  faulted, is released (GET_VRING_BASE on that ring answers);
- a's TX rings kicked after the truncation: every ring of a stops;
- the control thread's touches: a ring started on vanished memory is
  refused with a clear error (REPLY_ACK nack), and a SEND_RARP flooded into
  a vanished RX ring still reaches the other devices;
- a virtio-blk device (file bdev) whose memory vanishes with requests in
  flight: its queue stops, GET_VRING_BASE answers, another blk device
  serves on;
- a front-end that reconnects with new memory gets a working device back;
- sealed memory (what QEMU's memory-backend-memfd does) is recognised.

After the truncation the test never touches a's memory itself (its own
mapping would SIGBUS the test).
"""
from __future__ import annotations

import fcntl
import os
import re
import threading
import time

import pytest

from tests.protocol.blk_helpers import S_OK, T_FLUSH, T_IN, BlkDaemon, BlkQueue
from tests.protocol.daemon_helpers import (
    MiB, close_frontend, daemon_fixtures, exchange, frame, new_token, open_frontend, recv_token,
    serving,
)

from vfe.testing.channel import NackError
from vfe.testing.frontend import Frontend
from vfe.testing.guest_ram import PAGE, GuestRam

daemon, daemon_guard = daemon_fixtures({"a": "queues=2", "b": "", "c": ""})

VANISHED = re.compile(r"net0: ring (\d+) stopped: guest memory vanished \(SIGBUS at 0x[0-9a-f]+, "
                      r"guest-physical 0x[0-9a-f]+: the front-end shrank the file it shared\)")


def stopped_rings(text: str) -> set[int]:
    return {int(m) for m in VANISHED.findall(text)}


def wait_stopped(daemon, mark: int, rings: set[int], timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        tail = daemon.log_since(mark)
        if stopped_rings(tail) >= rings:
            return tail
        assert daemon.alive(), f"the daemon died ({daemon.exit_status()}):\n{tail[-3000:]}"
        assert time.monotonic() < deadline, f"rings {rings} of net0 never stopped:\n{tail[-3000:]}"
        time.sleep(0.01)


def shrink(fe: Frontend, size: int = 0) -> None:
    """What a hostile front-end does: cut its guest memory file."""
    for fd in fe.memory.fds:
        os.ftruncate(fd, size)


@pytest.fixture
def peers(daemon):
    """b and c, started, one queue pair each."""
    b = open_frontend(daemon, "b")
    c = open_frontend(daemon, "c")
    yield b, c
    close_frontend(daemon, b)
    close_frontend(daemon, c)


@pytest.fixture
def victim(daemon):
    """Opens device a (closed afterwards, and a new front-end proves the
    device works again once it has new memory)."""
    made = []

    def make(**start_kw) -> Frontend:
        start_kw.setdefault("queue_pairs", 2)
        fe = open_frontend(daemon, "a", **start_kw)
        made.append(fe)
        return fe

    yield make
    for fe in made:
        close_frontend(daemon, fe)


def works_again(daemon, b: Frontend) -> None:
    """A new front-end on a, with new memory: the device serves again."""
    a2 = open_frontend(daemon, "a", 2)
    try:
        exchange(a2, b, a_pairs=[0], b_pairs=[0])
    finally:
        close_frontend(daemon, a2)


def test_memory_vanishing_under_running_frames_breaks_only_that_device(daemon, peers, victim):
    """b sends to a and to c non-stop; a's memory file is cut to nothing.
    a has only its RX ring (no TX ring for the worker to poll), so the
    worker faults while filling it -- holding its lock."""
    b, c = peers
    start = daemon.mark()
    a = victim(queue_pairs=1, rings=1)
    exchange(b, c)
    token = new_token()
    b.send_frame(0, frame(a.mac, b.mac, token))
    assert recv_token(a, token) is not None           # a is served, b's MAC learnt

    stop = threading.Event()
    got_by_c = []

    def flow():                                       # touches b's and c's memory only
        k = 0
        while not stop.is_set():
            k += 1
            for dst in (a, c):
                try:
                    b.send_frame(0, frame(dst.mac, b.mac, b"flow-%d-" % k + new_token()))
                except BlockingIOError:               # TX ring full for a moment
                    b.wait_tx_done(0, 0.05)
            got_by_c.extend(c.recv_frames(0, timeout=0.0))

    t = threading.Thread(target=flow, daemon=True)
    t.start()
    try:
        time.sleep(0.3)
        mark = daemon.mark()
        shrink(a)
        tail = wait_stopped(daemon, mark, {0})
        seen = len(got_by_c)
        time.sleep(0.3)
        assert len(got_by_c) > seen, "c stopped receiving once a's memory vanished"
    finally:
        stop.set()
        t.join(10)
    assert daemon.alive()
    assert "Traceback" not in tail
    b.wait_tx_done(0, 2)
    exchange(b, c)
    # the worker held a's RX ring lock when it faulted: stopping that ring
    # takes the lock, so an answer means it was released
    assert a.get_vring_base(0) >= 0
    close_frontend(daemon, a)
    works_again(daemon, b)
    assert "net0: guest memory (1 region(s), 8 MiB) is not sealed against shrinking" in \
        daemon.log_since(start)


def test_kicked_tx_rings_on_vanished_memory_stop_the_whole_device(daemon, peers, victim):
    """The worker reads a's TX avail rings after a kick: every ring of a
    (two queue pairs) stops, once, with the fault; b and c are untouched."""
    b, c = peers
    a = victim()
    exchange(a, b, a_pairs=[0, 1], b_pairs=[0])
    mark = daemon.mark()
    shrink(a, PAGE)
    for ring in (1, 3):
        os.eventfd_write(a.rings[ring].kick_fd, 1)
    tail = wait_stopped(daemon, mark, {0, 1, 2, 3})
    time.sleep(0.2)
    tail = daemon.log_since(mark)
    assert len(VANISHED.findall(tail)) == 4, tail     # each ring once
    exchange(b, c)
    assert set(a.stop()) == {0, 1, 2, 3}              # GET_VRING_BASE of every ring answers
    close_frontend(daemon, a)
    works_again(daemon, b)


def test_ring_started_on_vanished_memory_is_refused(daemon, peers, victim):
    """The ring start itself reads the used ring (on the control thread):
    the front-end gets a nack, the log says why, and the device stays
    refused until a new memory table replaces the vanished one."""
    b, c = peers
    a = victim(queue_pairs=1, rings=1, ack_all=True)
    a.setup_ring(1, 256, kick=False)                  # its memory laid out before the cut
    mark = daemon.mark()
    shrink(a)
    with pytest.raises(NackError):
        a.set_vring_kick(1, a.rings[1].kick_fd)       # the start: SET_VRING_KICK
    tail = daemon.wait_log("StartRing failed", mark)
    assert re.search(r"net0: StartRing failed: ring 1: guest memory vanished \(SIGBUS at 0x[0-9a-f]+",
                     tail), tail
    wait_stopped(daemon, mark, {0})                   # its running RX ring went with it
    with pytest.raises(NackError):                    # and no ring starts on it any more
        a.set_vring_kick(1, a.rings[1].kick_fd)
    assert "it needs a new memory table" in daemon.wait_log("new memory table", mark)
    exchange(b, c)
    close_frontend(daemon, a)
    works_again(daemon, b)


def test_rarp_flooded_into_vanished_memory_still_reaches_the_others(daemon, peers, victim):
    """SEND_RARP is switched on the control thread (frame injection); the
    flood faults on a's RX ring, breaks a, and reaches c all the same."""
    b, c = peers
    a = victim(queue_pairs=1, rings=1)
    mark = daemon.mark()
    shrink(a)
    b.send_rarp(b.mac)
    wait_stopped(daemon, mark, {0})
    rarps = [f for f in c.recv_frames(0, timeout=2.0, count=1) if f[12:14] == b"\x80\x35"]
    assert rarps and rarps[0][6:12] == b.mac
    assert a.get_vring_base(0) >= 0                   # the RX lock held by the injection is free
    exchange(b, c)
    close_frontend(daemon, a)
    works_again(daemon, b)


def test_sealed_memory_is_recognised(daemon, peers, victim):
    """QEMU seals its memfds against shrinking and growing: the daemon says
    so, and the front-end itself cannot cut the file any more."""
    b, _ = peers
    a = open_frontend(daemon, "a", 2, start=False)
    try:
        a.memory = GuestRam(8 * MiB, seals=fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        mark = daemon.mark()
        a.start(queue_pairs=2)
        for p in (0, 1):
            a.post_rx_buffers(p)
        assert "net0: guest memory (1 region(s), 8 MiB) is sealed against shrinking" in \
            daemon.wait_log("net0: guest memory", mark)
        with pytest.raises(PermissionError):
            shrink(a)
        exchange(a, b, a_pairs=[0, 1], b_pairs=[0])
    finally:
        close_frontend(daemon, a)


# ---------------------------------------------------------------------------
# virtio-blk: the worker's request path, its I/O threads and the quiesce of
# GET_VRING_BASE


@pytest.fixture(scope="module")
def disks(tmp_path_factory):
    img = tmp_path_factory.mktemp("sigbus") / "disk.img"
    img.write_bytes(b"")
    d = BlkDaemon({}, {"d": f"bdev=file,path={img},size=128,queues=1",
                       "e": "bdev=null,size=16,queues=1"}, workers=1)
    d.img = img
    with serving(d):
        yield d


def open_blk(daemon, dev: str) -> Frontend:
    daemon.wait_detached(dev)
    fe = Frontend.connect(daemon.paths[dev])
    fe.dev = dev
    fe.start(rings=1, queue_size=64, buf_size=64, mem_size=16 * MiB)
    fe.q = [BlkQueue(fe, 0)]
    return fe


def test_blk_memory_vanishing_with_requests_in_flight(disks):
    """Reads go to the I/O threads, then d's memory is cut.  Wherever that
    catches the device -- a thread moving data (EFAULT), the worker writing
    a status byte with more answers queued, the worker reading the avail
    ring -- its queue stops, GET_VRING_BASE answers (every request taken is
    accounted for, none answered), and e serves on.  The timing differs
    from round to round; each round is a new front-end."""
    e = open_blk(disks, "e")
    try:
        for _ in range(4):
            d = open_blk(disks, "d")
            try:
                assert len(d.q[0].read(0, 4096)) == 4096
                mark = disks.mark()
                for k in range(16):                   # 16 x 256 KiB reads, then the cut
                    d.q[0].submit(T_IN, 512 * k, in_len=256 * 1024)
                shrink(d)
                os.eventfd_write(d.rings[0].kick_fd, 1)
                tail = disks.wait_log("blk0: ring 0 stopped: guest memory vanished (SIGBUS at", mark)
                assert d.get_vring_base(0) >= 0
                assert disks.alive() and "Traceback" not in tail
            finally:
                close_frontend(disks, d)
            status, length, data = e.q[0].request(T_IN, 0, in_len=4096)
            assert (status, length, data) == (S_OK, 4097, bytes(4096))
    finally:
        close_frontend(disks, e)
    d2 = open_blk(disks, "d")                         # new memory: the disk serves again
    try:
        assert len(d2.q[0].read(0, 4096)) == 4096
    finally:
        close_frontend(disks, d2)


def test_blk_answers_cut_short_by_the_fault_are_accounted_for(disks):
    """The worker answers the I/O threads' finished requests in a batch.  If
    writing one's status byte faults, the rest of the batch must still be
    counted off, or GET_VRING_BASE (which waits until none is outstanding)
    never answers.  Four FLUSHes of 64 MiB the test left dirty in the image
    keep the I/O threads busy, eight reads wait behind them; the memory is
    cut meanwhile, so they all finish into vanished memory together."""
    e = open_blk(disks, "e")
    d = open_blk(disks, "d")
    try:
        with open(disks.img, "r+b") as f:
            f.write(os.urandom(1 << 20) * 64)         # dirty page cache: slow fdatasyncs
        mark = disks.mark()
        for _ in range(4):
            d.q[0].submit(T_FLUSH, kick=False)
        for k in range(8):
            d.q[0].submit(T_IN, 512 * k, in_len=64 * 1024, kick=False)
        os.eventfd_write(d.rings[0].kick_fd, 1)
        time.sleep(0.005)                             # the worker hands them to the I/O threads
        shrink(d)
        disks.wait_log("blk0: ring 0 stopped: guest memory vanished (SIGBUS at", mark, timeout=30)
        assert d.get_vring_base(0) >= 0
        status, length, data = e.q[0].request(T_IN, 0, in_len=4096)
        assert (status, length, data) == (S_OK, 4097, bytes(4096))
    finally:
        close_frontend(disks, d)
        close_frontend(disks, e)
