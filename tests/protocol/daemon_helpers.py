"""Shared helpers for the tests that drive a real virtio-net-controller
process over real vhost-user sockets (daemon_protocol/, test_daemon_rings.py,
...).

- ``Daemon``: one controller subprocess shared by a test module (it takes
  ~2 s to start), with log marks/waits and /proc counters.
- ``open_frontend`` / ``close_frontend``: a started ``vfe.testing.frontend.Frontend``
  on a device socket, and a close that waits until the daemon has let it go
  (the daemon refuses a second front-end while one is attached).
- ``exchange``: unicast frames both ways between two front-ends through the
  engine's switch, matched by a unique token (floods may land elsewhere).
- ``RawRing``: write descriptors / avail entries straight into a ring's
  guest memory (adversarial tests).
- ``GuardedRam``: guest RAM as two regions with a guest-physical gap, in one
  memfd that keeps guard bytes the front-end never announces.
- ``qemu_start_sequence``: the requests ``Frontend.start`` sends, computed
  without a daemon (the sans-I/O protocol answers them), to parametrize
  "disconnect after message k".
"""
from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import re
import select
import shutil
import signal
import struct
import tempfile
import time
from dataclasses import dataclass

from vfe.devices.net import NET_FEATURES, NET_PROTOCOL_FEATURES
from vfe.guest.controller_process import ControllerProcess
from vfe.testing.frontend import Frontend
from vfe.testing.guest_ram import PAGE, GuestRam, RamRegion
from vfe.vhost.actions import Ack, DeviceSpec, Reply, StopRing
from vfe.vhost.memory import address_of
from vfe.vhost.messages import REPLY_FLAGS, VERSION, Message, ProtocolError, Request, U64
from vfe.vhost.protocol import BackendProtocol
from vfe.vhost.transport import PeerClosed

MiB = 1 << 20
DESC = struct.Struct("<QIHH")
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4

#: Log text the daemon writes when it lets a front-end go (any reason).
_DETACH = ("front-end disconnected", "protocol error, dropping the connection", "connection failed")


# ---------------------------------------------------------------------------
# The daemon


class Daemon:
    """A virtio-net-controller subprocess with named devices.

    ``devices`` maps a short name to extra device options; device names in
    the log are net0, net1, ... in that order.
    """

    def __init__(self, devices: dict[str, str], mode: str = "adaptive", workers: int = 1) -> None:
        self.dir = tempfile.mkdtemp(prefix="vfe-d-", dir="/tmp")
        self.paths: dict[str, str] = {}
        self.names: dict[str, str] = {}
        specs = []
        for i, (name, opts) in enumerate(devices.items()):
            path = os.path.join(self.dir, f"{name}.sock")
            self.paths[name] = path
            self.names[name] = f"net{i}"
            specs.append(f"net,socket={path}" + (f",{opts}" if opts else ""))
        self.proc = ControllerProcess(specs, self.dir, mode=mode, workers=workers, name="daemon")

    def start(self) -> "Daemon":
        self.proc.start(timeout=60)
        return self

    def stop(self) -> int | None:
        return self.proc.stop()

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def pid(self) -> int:
        assert self.proc.proc is not None
        return self.proc.proc.pid

    def alive(self) -> bool:
        return self.proc.running()

    def exit_status(self) -> str:
        """How the process ended, for messages ("killed by SIGBUS", "exit 1")."""
        p = self.proc.proc
        rc = None if p is None else p.poll()
        if rc is None:
            return "running"
        return f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit {rc}"

    # -- log -------------------------------------------------------------------

    def log(self) -> str:
        return self.proc.log()

    def mark(self) -> int:
        return len(self.log())

    def log_since(self, mark: int) -> str:
        return self.log()[mark:]

    def wait_log(self, text: str | re.Pattern, since: int = 0, timeout: float = 5.0) -> str:
        """Wait until ``text`` (a substring or a compiled regex) appears after
        ``since``; returns the log from ``since``."""
        deadline = time.monotonic() + timeout
        while True:
            tail = self.log_since(since)
            if (text.search(tail) if isinstance(text, re.Pattern) else text in tail):
                return tail
            if not self.alive():
                raise AssertionError(f"daemon died ({self.exit_status()}) waiting for {text!r}:\n"
                                     f"{tail[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon log never showed {text!r}; log since mark:\n{tail[-3000:]}")
            time.sleep(0.01)

    def attached(self, dev: str) -> bool:
        """Does the daemon hold a front-end on ``dev`` (by its log)?"""
        name = self.names[dev]
        text = self.log()
        text = text[text.rfind("--- start "):]        # this process's (a dead one let go of all)
        connects = text.count(f"{name}: front-end connected")
        detaches = sum(text.count(f"{name}: {d}") for d in _DETACH)
        return connects > detaches

    def wait_detached(self, dev: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.attached(dev):
            if not self.alive():
                raise AssertionError(f"daemon died:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon never let go of {dev}:\n{self.log()[-3000:]}")
            time.sleep(0.005)

    # -- /proc -------------------------------------------------------------------

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def fds(self) -> dict[str, str]:
        out = {}
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                out[fd] = os.readlink(f"/proc/{self.pid}/fd/{fd}")
            except OSError:
                pass
        return out

    def maps(self) -> list[str]:
        with open(f"/proc/{self.pid}/maps") as f:
            return f.read().splitlines()

    def guest_maps(self) -> list[str]:
        """Mappings of front-end memory (memfds) in the daemon."""
        return [m for m in self.maps() if "memfd:vfe" in m]


# ---------------------------------------------------------------------------
# Front-ends

_mac_counter = itertools.count(1)
_token_counter = itertools.count(1)


def new_mac(tag: int = 0) -> bytes:
    """A unique locally administered unicast MAC (02:..)."""
    n = next(_mac_counter)
    return bytes([0x02, tag & 0xFF, (os.getpid() >> 8) & 0xFF, os.getpid() & 0xFF,
                  (n >> 8) & 0xFF, n & 0xFF])


def new_token() -> bytes:
    return b"vfe-token-%08d-" % next(_token_counter) + os.urandom(4).hex().encode()


def open_frontend(daemon: Daemon, dev: str, queue_pairs: int = 1, *, queue_size: int = 256,
                  post_rx: bool = True, start: bool = True, ack_all: bool = False,
                  timeout: float = 5.0, **start_kw) -> Frontend:
    """A front-end on device ``dev``: connected, started (unless ``start`` is
    False), RX buffers posted on every pair.  It gets a ``mac`` attribute."""
    daemon.wait_detached(dev)
    if start:
        start_kw.setdefault("mem_size", 8 * MiB)
    fe = Frontend.connect(daemon.paths[dev], timeout=timeout)
    fe.ack_all = ack_all
    fe.mac = new_mac(list(daemon.paths).index(dev))
    fe.dev = dev
    try:
        if start:
            fe.start(queue_pairs=queue_pairs, queue_size=queue_size, **start_kw)
            if post_rx:
                for p in range(queue_pairs):
                    fe.post_rx_buffers(p)
    except BaseException:
        fe.close()
        raise
    return fe


def close_frontend(daemon: Daemon, fe: Frontend | None) -> None:
    """Close ``fe`` and wait until the daemon has detached it."""
    if fe is None:
        return
    for raw in fe.__dict__.pop("raw_rings", []):
        raw.release()
    fe.close()
    dev = getattr(fe, "dev", None)
    if dev is not None and daemon.alive():
        daemon.wait_detached(dev)


def rx_pairs(fe: Frontend) -> list[int]:
    return sorted(i // 2 for i, r in fe.rings.items() if i % 2 == 0 and r.started)


def frame(dst: bytes, src: bytes, token: bytes, size: int = 128) -> bytes:
    body = token + bytes(max(0, size - 14 - len(token)))
    return dst + src + b"\x88\xb5" + body


def recv_token(fe: Frontend, token: bytes, timeout: float = 2.0,
               pairs: list[int] | None = None) -> tuple[int, bytes] | None:
    """Wait for a frame containing ``token`` on any (or the given) RX pair;
    returns (pair, frame) or None."""
    pairs = rx_pairs(fe) if pairs is None else pairs
    stash = fe.__dict__.setdefault("stash", [])       # frames that matched no token yet
    for i, (p, f) in enumerate(stash):
        if p in pairs and token in f:
            del stash[i]
            return p, f
    deadline = time.monotonic() + timeout
    while True:
        found = None
        for p in pairs:
            for f in fe.recv_frames(p, timeout=0.0):
                if found is None and token in f:
                    found = p, f
                else:
                    stash.append((p, f))
        del stash[:-256]
        if found is not None:
            return found
        if time.monotonic() >= deadline:
            return None
        waits = [fe.rings[2 * p].call_fd for p in pairs]
        select.select(waits, [], [], 0.01)
        for fd in waits:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass


def send_one(src: Frontend, src_pair: int, dst: Frontend, *, timeout: float = 2.0,
             size: int = 128, dst_pairs: list[int] | None = None) -> int:
    """One unicast frame src -> dst (through the switch); returns the RX pair
    it arrived on.  Asserts arrival and content."""
    token = new_token()
    f = frame(dst.mac, src.mac, token, size)
    src.send_frame(src_pair, f)
    got = recv_token(dst, token, timeout, dst_pairs)
    assert got is not None, (f"{src.dev} pair {src_pair} -> {dst.dev}: frame did not arrive "
                             f"within {timeout}s")
    assert got[1] == f, f"{src.dev} -> {dst.dev}: frame corrupted"
    assert src.wait_tx_done(src_pair, timeout), f"{src.dev} pair {src_pair}: TX not completed"
    return got[0]


def exchange(a: Frontend, b: Frontend, a_pairs: list[int] | None = None,
             b_pairs: list[int] | None = None, timeout: float = 2.0) -> None:
    """Frames both ways: from every given TX pair of ``a`` to ``b``, then
    from every given TX pair of ``b`` to ``a`` (``a`` speaks first, so the
    switch has learnt both MACs when ``b`` answers)."""
    a_pairs = sorted({i // 2 for i in a.rings if i % 2}) if a_pairs is None else a_pairs
    b_pairs = sorted({i // 2 for i in b.rings if i % 2}) if b_pairs is None else b_pairs
    for p in a_pairs:
        send_one(a, p, b, timeout=timeout)
    for p in b_pairs:
        send_one(b, p, a, timeout=timeout)


def expect_dropped(fe: Frontend, timeout: float = 3.0) -> None:
    """The daemon closed this connection (EOF or reset on our side)."""
    try:
        msg = fe.conn.recv_message(timeout)
    except PeerClosed:
        return
    except TimeoutError:
        raise AssertionError("the daemon kept the connection open") from None
    raise AssertionError(f"expected the connection to be dropped, got {msg!r}")


def ack_value(reply: Message | None) -> int:
    assert reply is not None, "no reply"
    assert reply.flags == REPLY_FLAGS
    assert len(reply.payload) == 8, f"ack payload {reply.payload!r}"
    return U64.decode(reply.payload).value


# ---------------------------------------------------------------------------
# Raw ring access


class RawRing:
    """Direct access to one ring's descriptor table, avail and used rings in
    the front-end's memory (for writing what a buggy or hostile driver
    would).  Indices are published with single aligned 16-bit stores.
    ``release()`` before the front-end closes its memory."""

    def __init__(self, fe: Frontend, index: int) -> None:
        ring = fe.rings[index]
        assert fe.memory is not None
        region, off = fe.memory.region_of(ring.ring_gpa)
        lay = ring.layout
        self.fe = fe
        self.index = index
        self.size = ring.size
        self.ring = ring
        self.mem = region.view[off:off + lay.total]
        self.avail16 = self.mem[lay.avail:lay.avail + 6 + 2 * ring.size].cast("H")
        self.used16 = self.mem[lay.used:lay.used + 6 + 8 * ring.size].cast("H")
        self._lay = lay
        fe.__dict__.setdefault("raw_rings", []).append(self)

    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        DESC.pack_into(self.mem, self._lay.desc + 16 * i, addr, length, flags, nxt)

    @property
    def avail_idx(self) -> int:
        return self.avail16[1]

    def used_idx(self) -> int:
        return self.used16[1]

    def publish(self, heads: list[int]) -> None:
        """Append ``heads`` to the avail ring and publish the new avail->idx."""
        idx = self.avail16[1]
        for k, h in enumerate(heads):
            self.avail16[2 + (idx + k) % self.size] = h & 0xFFFF
        self.avail16[1] = (idx + len(heads)) & 0xFFFF

    def set_avail_idx(self, value: int) -> None:
        self.avail16[1] = value & 0xFFFF

    def kick(self) -> None:
        os.eventfd_write(self.ring.kick_fd, 1)

    def release(self) -> None:
        for v in (self.avail16, self.used16, self.mem):
            v.release()


def write_table(fe: Frontend, gpa: int, entries: list[tuple[int, int, int, int]]) -> None:
    """Write an (indirect) descriptor table of (addr, len, flags, next) at gpa."""
    assert fe.memory is not None
    fe.memory.write(gpa, b"".join(DESC.pack(*e) for e in entries))


# ---------------------------------------------------------------------------
# Guest memory with a gap and guard bytes


class GuardedRam(GuestRam):
    """Two regions in one memfd, with ``guard`` bytes before, between and
    after them that are never announced, and a ``gpa_gap`` between them in
    guest-physical space:

        memfd:  [guard][region 0][guard][region 1][guard]
        gpa:    region 0 at 0, region 1 at size0 + gpa_gap

    The daemon maps each region from file offset 0 (so the guards before a
    region are inside its mapping): ``guards_intact()`` says whether any of
    those bytes changed.
    """

    def __init__(self, size0: int = 8 * MiB, size1: int = 4 * MiB, *, gpa_gap: int = 1 * MiB,
                 guard: int = 4 * PAGE) -> None:
        self.region_size = size0
        self.regions: list[RamRegion] = []
        self._maps: list[mmap.mmap] = []
        self._fds: list[int] = []
        self.guard = guard
        total = guard + size0 + guard + size1 + guard
        fd = os.memfd_create("vfe-guest-ram-guarded", os.MFD_CLOEXEC)
        self._fds.append(fd)
        os.ftruncate(fd, total)
        mm = mmap.mmap(fd, total, flags=mmap.MAP_SHARED)
        self._maps.append(mm)
        self._mm = mm
        base = address_of(mm)
        whole = memoryview(mm)
        off0 = guard
        off1 = guard + size0 + guard
        self.regions.append(RamRegion(gpa=0, size=size0, uva=base + off0, mmap_offset=off0, fd=fd,
                                      view=whole[off0:off0 + size0]))
        self.regions.append(RamRegion(gpa=size0 + gpa_gap, size=size1, uva=base + off1,
                                      mmap_offset=off1, fd=fd, view=whole[off1:off1 + size1]))
        whole.release()
        self.guard_spans = [(0, guard), (guard + size0, guard), (off1 + size1, guard)]
        self.pattern = {}
        for start, length in self.guard_spans:
            data = (os.urandom(64) * (length // 64 + 1))[:length]
            mm[start:start + length] = data
            self.pattern[start] = data
        self.gap_gpa = size0 + gpa_gap // 2          # a guest-physical address in no region
        self.r0_end = size0                          # first gpa after region 0
        self.r1 = self.regions[1]
        self.r1_end = self.r1.gpa + size1

    def guards_intact(self) -> bool:
        return all(self._mm[s:s + n] == self.pattern[s] for s, n in self.guard_spans)

    def scratch(self, size: int, align: int = 64) -> int:
        """A gpa in region 1 (rings and buffers live in region 0)."""
        r = self.r1
        start = (r.used + align - 1) & ~(align - 1)
        assert start + size <= r.size
        r.used = start + size
        return r.gpa + start

    def alloc(self, size: int, align: int = 64) -> int:
        """Rings and slot buffers: region 0 only (region 1 is the tests')."""
        r = self.regions[0]
        start = (r.used + align - 1) & ~(align - 1)
        if start + size > r.size:
            raise MemoryError(f"region 0 exhausted ({size} bytes wanted)")
        r.used = start + size
        return r.gpa + start


# ---------------------------------------------------------------------------
# The QEMU start sequence, computed without a daemon


def daemon_spec(queues: int, queue_size: int = 1024) -> DeviceSpec:
    """What vfe/devices/net.py's NetDeviceModel.spec() gives a device."""
    return DeviceSpec(features=NET_FEATURES, protocol_features=NET_PROTOCOL_FEATURES,
                      queue_num=queues, max_queues=2 * queues, max_queue_size=queue_size)


class _ScriptedConn:
    """Stands in for a Connection: the sans-I/O protocol answers at once."""

    def __init__(self, spec: DeviceSpec) -> None:
        self.protocol = BackendProtocol(spec)
        self.replies: list[Message] = []

    def _run(self, actions: list) -> None:
        for a in actions:
            if isinstance(a, Reply):
                self.replies.append(Message(a.request, REPLY_FLAGS, a.payload))
            elif isinstance(a, Ack):
                self.replies.append(Message(a.request, REPLY_FLAGS, U64(0 if a.ok else 1).encode()))
            elif isinstance(a, StopRing):
                self._run(self.protocol.ring_stopped(a.index, 0))

    def send_message(self, request: int, payload: bytes = b"", fds=(), flags: int = VERSION) -> None:
        self._run(self.protocol.receive(Message(int(request), flags, bytes(payload), tuple(fds))))

    def recv_message(self, timeout: float | None = None) -> Message:
        if not self.replies:
            raise ProtocolError("no reply due")
        return self.replies.pop(0)

    def close(self) -> None:
        pass


def qemu_start_sequence(queue_pairs: int, queue_size: int = 256, queues: int | None = None,
                        **start_kw) -> list[str]:
    """Names of the requests ``Frontend.start`` sends to a daemon device
    with ``queues`` queue pairs."""
    fe = Frontend(_ScriptedConn(daemon_spec(queues or queue_pairs)))  # type: ignore[arg-type]
    try:
        fe.start(queue_pairs=queue_pairs, queue_size=queue_size, mem_size=8 * MiB, **start_kw)
        return [Request(r).name for r, _flags, _size, _nfds in fe.sent]
    finally:
        fe.close()


class Cut(Exception):
    """Raised instead of sending message number k+1 (see ``cut_after``)."""


def cut_after(fe: Frontend, k: int) -> None:
    """Make ``fe`` raise ``Cut`` instead of sending any message after its
    k-th one from now (replies to the k-th are still read)."""
    sent = [0]
    orig = fe.conn.send_message

    def limited(*args, **kw):
        if sent[0] >= k:
            raise Cut()
        sent[0] += 1
        return orig(*args, **kw)

    fe.conn.send_message = limited  # type: ignore[method-assign]


@dataclass
class Memfd:
    """A memfd of ``size`` bytes (for SET_LOG_BASE or adversarial regions)."""

    size: int

    def __post_init__(self) -> None:
        self.fd = os.memfd_create("vfe-test-aux", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)

    def close(self) -> None:
        os.close(self.fd)


# ---------------------------------------------------------------------------
# Fixtures (a test module, or a package's conftest.py, does
# ``daemon, daemon_guard = daemon_fixtures({...})``)


@contextlib.contextmanager
def serving(d):
    """Start daemon `d` for a module's tests; stop it, print its log (pytest
    shows it for a failed module) and remove its files afterwards."""
    d.start()
    try:
        yield d
    finally:
        rc = d.stop()
        print(f"--- daemon log (exit {rc}) ---")
        print(d.log()[-6000:])
        d.cleanup()


def daemon_fixtures(devices: dict[str, str], scope: str = "module"):
    """A ``daemon`` fixture (one daemon per module, or per package with
    ``scope="package"`` in a package's conftest.py) and an autouse
    ``daemon_guard`` that fails a test after which the daemon died or logged
    a traceback (and restarts it for the next test)."""
    import pytest

    @pytest.fixture(scope=scope)
    def daemon():
        with serving(Daemon(devices)) as d:
            yield d

    @pytest.fixture(autouse=True)
    def daemon_guard(daemon):
        if not daemon.alive():
            daemon.start()
        mark = daemon.mark()
        yield daemon
        alive = daemon.alive()
        status = daemon.exit_status()
        tail = daemon.log_since(mark)
        if not alive:
            daemon.start()
        assert alive, f"the daemon died during the test ({status}):\n{tail[-4000:]}"
        assert "Traceback" not in tail, f"the daemon logged a traceback:\n{tail[-4000:]}"

    return daemon, daemon_guard
