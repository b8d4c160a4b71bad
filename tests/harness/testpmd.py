"""A small harness around DPDK's ``dpdk-testpmd`` (DPDK 22.11).

testpmd runs in interactive mode (``-i``) on a pseudo-terminal: with a pipe
its stdout is block-buffered and, without a terminal, it leaves at EOF on
stdin.  A reader thread drains the pty into a buffer all the time (so the
process never blocks on a full pty while forwarding), and :meth:`TestPmd.cmd`
types one command and waits for the next ``testpmd> `` prompt.

Typical use::

    from tests.harness import testpmd as tp
    from tests.harness.pmd_backends import dpdk_vhost_backend
    from tests.harness.pmd_measure import check_forward_counts, measure_loop

    with dpdk_vhost_backend(sock0, sock1):             # testpmd B: net_vhost, io fwd
        with tp.TestPmd([tp.virtio_user(sock0), tp.virtio_user(sock1)],
                        cores=[0, 1], main_lcore=0) as a:   # A: forwards on core 1
            a.wait_link_up()
            r = measure_loop(a, seconds=5, frame_size=64, burst_first=4)
            print(r.mpps, r.gbps)

    check_forward_counts(sock0, sock1, frame_size=1518)     # any back-end on sock0/1

(The back-ends are in tests/harness/pmd_backends.py, the measurements in
tests/harness/pmd_measure.py; both build on this module.)

Every instance gets its own EAL ``--file-prefix``; :meth:`TestPmd.close`
quits testpmd (``quit``; then SIGTERM; then SIGKILL, all by PID) and
removes the EAL runtime directory ``/var/run/dpdk/<prefix>``.

Lcores.  testpmd's main lcore only runs the command line (it sleeps in
``read()``), every other lcore in the list is a forwarding lcore that
busy-polls its core.  On this 2-core machine a pair of testpmds is placed
like this (measured, see docs/performance.md): the front-end (virtio_user
ports) ``-l 0,1`` with main lcore 0, forwarding lcore 1; the back-end
(net_vhost ports) ``-l 0,1 --main-lcore 1``, forwarding lcore 0.  Two
forwarding lcores on the same core collapse the loop to ~0.03 Mpps (each
process only runs for a scheduler slice at a time).

Frames longer than 2176 bytes need ``args=["--mbuf-size=..."]`` (testpmd
refuses ``set txpkts`` beyond the mbuf data size).
"""

from __future__ import annotations

import atexit
import itertools
import os
import pty
import re
import shutil
import signal
import subprocess
import threading
import time
import tty
import uuid
import weakref
from dataclasses import dataclass
from typing import Iterable, Sequence

__all__ = [
    "TESTPMD", "FRONTEND_CORES", "BACKEND_CORES",
    "TestPmd", "TestPmdError", "PortStats", "FwdStats",
    "virtio_user", "vhost", "testpmd_available", "parse_port_stats", "parse_fwd_stats",
]

TESTPMD = "dpdk-testpmd"
PROMPT = b"testpmd> "

#: lcore placement of the front-end testpmd (virtio_user ports):
#: (lcore list, main lcore) -> forwarding lcore 1.
FRONTEND_CORES: tuple[list[int], int] = ([0, 1], 0)
#: lcore placement of the reference back-end testpmd (net_vhost ports):
#: forwarding lcore 0, main lcore (idle command line) 1.
BACKEND_CORES: tuple[list[int], int] = ([0, 1], 1)

# EAL options that work on these machines (no hugepages, no PCI).
EAL_BASE = ["--no-huge", "--no-pci", "--no-shconf"]
DEFAULT_MEM_MB = 512
# The vhost library logs every vhost-user message at INFO level.
QUIET_LOG = ["--log-level=lib.vhost.*:warning"]

_ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\x1b[=>78]")


class TestPmdError(RuntimeError):
    """testpmd died, timed out, or answered something we cannot parse."""

    __test__ = False  # not a pytest test class


def testpmd_available() -> bool:
    return shutil.which(TESTPMD) is not None


# --------------------------------------------------------------------------
# vdev strings

_vdev_counter = {"net_virtio_user": itertools.count(), "net_vhost": itertools.count()}


def _next_name(kind: str) -> str:
    return f"{kind}{next(_vdev_counter[kind])}"


def virtio_user(path: str, queues: int = 1, queue_size: int = 256, mrg_rxbuf: bool = True,
                server: bool = False, mac: str | None = None, name: str | None = None,
                packed_vq: bool = False) -> str:
    """``net_virtio_userN,path=...,queues=...,queue_size=...,mrg_rxbuf=0|1[,server=1][,mac=..]
    [,packed_vq=1]`` (``packed_vq``: packed virtqueues, when the back-end offers them).

    ``server=False`` (the default) makes testpmd the vhost-user *client*: the
    back-end (our daemon, or DPDK's net_vhost) owns and listens on ``path``.
    The vdev name only has to be unique within one testpmd; a process-wide
    counter is used unless ``name`` is given.
    """
    s = (f"{name or _next_name('net_virtio_user')},path={path},queues={int(queues)},"
         f"queue_size={int(queue_size)},mrg_rxbuf={1 if mrg_rxbuf else 0}")
    if server:
        s += ",server=1"
    if mac:
        s += f",mac={mac}"
    if packed_vq:
        s += ",packed_vq=1"
    return s


def vhost(iface: str, queues: int = 1, client: bool = False, name: str | None = None) -> str:
    """``net_vhostN,iface=...,queues=...[,client=1]`` (DPDK's vhost-user back-end).

    Without ``client`` the vhost port is the vhost-user *server* and creates
    the socket ``iface``.
    """
    s = f"{name or _next_name('net_vhost')},iface={iface},queues={int(queues)}"
    if client:
        s += ",client=1"
    return s


# --------------------------------------------------------------------------
# parsed replies

@dataclass
class PortStats:
    """One port's block of ``show port stats all`` (counters since last clear)."""
    port: int
    rx_packets: int = 0
    rx_missed: int = 0
    rx_bytes: int = 0
    rx_errors: int = 0
    rx_nombuf: int = 0
    tx_packets: int = 0
    tx_errors: int = 0
    tx_bytes: int = 0


@dataclass
class FwdStats:
    """One port's block of the forward statistics printed by ``stop``."""
    port: int
    rx_packets: int = 0
    rx_dropped: int = 0
    rx_total: int = 0
    tx_packets: int = 0
    tx_dropped: int = 0
    tx_total: int = 0


_PORT_BLOCK = re.compile(r"NIC statistics for port (\d+)\s*#+(.*?)#{20,}", re.S)
_FWD_BLOCK = re.compile(r"Forward statistics for port (\d+)\s*-+(.*?)-{20,}", re.S)
_KV = re.compile(r"([A-Za-z][A-Za-z-]*):\s+(\d+)")


def _kv(text: str) -> dict[str, int]:
    return {k.lower().replace("-", "_"): int(v) for k, v in _KV.findall(text)}


def parse_port_stats(text: str) -> dict[int, PortStats]:
    """Parse the reply of ``show port stats all`` (or ``show port stats N``)."""
    out: dict[int, PortStats] = {}
    for m in _PORT_BLOCK.finditer(text):
        port = int(m.group(1))
        # Only the counters, not the "Throughput (since last show)" part.
        body = m.group(2).split("Throughput", 1)[0]
        kv = _kv(body)
        out[port] = PortStats(port, **{k: v for k, v in kv.items()
                                       if k in PortStats.__dataclass_fields__})
    return out


def parse_fwd_stats(text: str) -> dict[int, FwdStats]:
    """Parse the per-port forward statistics printed by ``stop``."""
    out: dict[int, FwdStats] = {}
    for m in _FWD_BLOCK.finditer(text):
        port = int(m.group(1))
        kv = _kv(m.group(2))
        out[port] = FwdStats(port, **{k: v for k, v in kv.items()
                                      if k in FwdStats.__dataclass_fields__})
    return out


# --------------------------------------------------------------------------
# the process

_live: "weakref.WeakSet[TestPmd]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:  # pragma: no cover - safety net
    for p in list(_live):
        try:
            p.close()
        except Exception:
            pass


def _runtime_dir() -> str:
    if os.geteuid() == 0:
        return "/var/run/dpdk"
    return os.path.join(os.environ.get("XDG_RUNTIME_DIR", "/tmp"), "dpdk")


def _corelist(cores: str | Sequence[int]) -> str:
    if isinstance(cores, str):
        return cores
    return ",".join(str(int(c)) for c in cores)


def _expand_corelist(cores: str | Sequence[int]) -> list[int]:
    if not isinstance(cores, str):
        return [int(c) for c in cores]
    out: list[int] = []
    for part in cores.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


class TestPmd:
    """One interactive ``dpdk-testpmd`` process.

    :param vdevs: ``--vdev`` strings (see :func:`virtio_user`, :func:`vhost`).
    :param args: extra testpmd application arguments (after ``--``).
    :param cores: EAL lcore list, e.g. ``"0-1"`` or ``[0, 1]``.
    :param main_lcore: the lcore that runs the command line; default: the
        lowest in ``cores``.  All other lcores forward (``--nb-cores``).
    :param forward_mode: ``--forward-mode`` (``io`` passes frames unchanged).
    :param nb_rxq, nb_txq: queues per port (``--rxq``/``--txq``).
    :param rxd, txd: descriptors per queue (``--rxd``/``--txd``); ``None``
        leaves the PMD default (the virtio ring size for virtio_user).
    :param total_num_mbufs: ``--total-num-mbufs`` (the default pool does not
        fit in ``-m 512`` without hugepages).
    :param extra: extra EAL arguments (before ``--``).
    :param quiet_vhost_log: lower the vhost library log level to warnings.
    :param mem_mb: EAL ``-m`` (MiB of non-hugepage memory).
    :param start_timeout: seconds to wait for the first prompt.
    :param log_path: if given, everything testpmd prints is also written there.
    """

    __test__ = False

    _seq = itertools.count()

    def __init__(self, vdevs: Iterable[str] = (), args: Iterable[str] = (),
                 cores: str | Sequence[int] = "0-1", main_lcore: int | None = None,
                 forward_mode: str = "io", nb_rxq: int = 1, nb_txq: int = 1,
                 rxd: int | None = None, txd: int | None = None,
                 total_num_mbufs: int = 16384, extra: Iterable[str] = (),
                 quiet_vhost_log: bool = True, start_timeout: float = 30.0,
                 log_path: str | None = None, testpmd: str = TESTPMD,
                 file_prefix: str | None = None, name: str = "testpmd",
                 mem_mb: int = DEFAULT_MEM_MB):
        self.name = name
        self.vdevs = list(vdevs)
        lcores = _expand_corelist(cores)
        if len(lcores) < 2:
            raise ValueError("testpmd needs a main lcore and at least one forwarding lcore")
        self.main_lcore = lcores[0] if main_lcore is None else int(main_lcore)
        if self.main_lcore not in lcores:
            raise ValueError(f"main lcore {self.main_lcore} not in {lcores}")
        self.forwarding_lcores = [c for c in lcores if c != self.main_lcore]
        self.file_prefix = file_prefix or f"vfe-{os.getpid()}-{next(self._seq)}-{uuid.uuid4().hex[:6]}"
        self.runtime_dir = os.path.join(_runtime_dir(), self.file_prefix)

        eal = [testpmd, *EAL_BASE, "-m", str(int(mem_mb)), "-l", _corelist(cores),
               "--main-lcore", str(self.main_lcore), "--file-prefix", self.file_prefix]
        if quiet_vhost_log:
            eal += QUIET_LOG
        for v in self.vdevs:
            eal += ["--vdev", v]
        eal += list(extra)
        app = ["-i", f"--total-num-mbufs={int(total_num_mbufs)}",
               f"--forward-mode={forward_mode}", f"--nb-cores={len(self.forwarding_lcores)}",
               f"--rxq={int(nb_rxq)}", f"--txq={int(nb_txq)}"]
        if rxd:
            app.append(f"--rxd={int(rxd)}")
        if txd:
            app.append(f"--txd={int(txd)}")
        app += list(args)
        self.argv = eal + ["--"] + app

        self._buf = bytearray()
        self._base = 0          # absolute offset of _buf[0]
        self._cond = threading.Condition()
        self._cmd_lock = threading.Lock()
        self._eof = False
        self._closed = False
        self._log = open(log_path, "ab") if log_path else None

        master, slave = pty.openpty()
        try:
            tty.setraw(slave)   # no echo/line editing by the pty itself
        except Exception:
            pass
        try:
            self.proc = subprocess.Popen(self.argv, stdin=slave, stdout=slave, stderr=slave,
                                         close_fds=True, start_new_session=True)
        except Exception:
            os.close(master)
            os.close(slave)
            raise
        os.close(slave)
        self._master = master
        self.pid = self.proc.pid
        _live.add(self)
        self._reader = threading.Thread(target=self._read_loop, name=f"{name}-reader", daemon=True)
        self._reader.start()
        try:
            self._wait_prompt(0, start_timeout, what="first prompt")
        except BaseException:
            self.close()
            raise

    # -- output plumbing ---------------------------------------------------

    def _read_loop(self) -> None:
        while True:
            try:
                data = os.read(self._master, 65536)
            except OSError:  # EIO once the child side is gone, EBADF after close()
                data = b""
            if self._log and data:
                self._log.write(data)
                self._log.flush()
            with self._cond:
                if not data:
                    self._eof = True
                    self._cond.notify_all()
                    return
                self._buf += data
                # keep at most ~4 MiB
                if len(self._buf) > (4 << 20):
                    cut = len(self._buf) - (2 << 20)
                    del self._buf[:cut]
                    self._base += cut
                self._cond.notify_all()

    def _pos(self) -> int:
        with self._cond:
            return self._base + len(self._buf)

    def _wait_for(self, needle: bytes, start: int, timeout: float, what: str) -> int:
        """Wait for ``needle`` at absolute offset >= start; return end offset."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                s = max(0, start - self._base)
                i = self._buf.find(needle, s)
                if i >= 0:
                    return self._base + i + len(needle)
                if self._eof or self.proc.poll() is not None:
                    # give the reader a moment to collect the last output
                    self._cond.wait(0.2)
                    i = self._buf.find(needle, max(0, start - self._base))
                    if i >= 0:
                        return self._base + i + len(needle)
                    raise TestPmdError(f"{self.name} exited (rc={self.proc.poll()}) while waiting "
                                       f"for {what}; output tail:\n{self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TestPmdError(f"{self.name}: timeout ({timeout:.0f}s) waiting for {what}; "
                                       f"output tail:\n{self.tail()}")
                self._cond.wait(min(left, 0.5))

    def _wait_prompt(self, start: int, timeout: float, what: str) -> int:
        return self._wait_for(PROMPT, start, timeout, what)

    def _text(self, start: int, end: int | None = None) -> str:
        with self._cond:
            s = max(0, start - self._base)
            e = len(self._buf) if end is None else max(0, end - self._base)
            raw = bytes(self._buf[s:e])
        raw = _ANSI.sub(b"", raw).replace(b"\r", b"")
        return raw.decode("utf-8", "replace")

    def output(self) -> str:
        """Everything testpmd printed (at most the last ~2-4 MiB)."""
        return self._text(self._base)

    def tail(self, n: int = 3000) -> str:
        return self._text(max(self._base, self._pos() - n))

    # -- commands ----------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def cmd(self, command: str, timeout: float = 15.0) -> str:
        """Type one command, wait for the next prompt, return the reply text
        (the echoed command line and the prompt removed)."""
        command = command.strip()
        if "\n" in command:
            raise ValueError("one command at a time")
        with self._cmd_lock:
            if not self.alive:
                raise TestPmdError(f"{self.name} is not running (rc={self.proc.poll()}); "
                                   f"output tail:\n{self.tail()}")
            start = self._pos()
            os.write(self._master, command.encode() + b"\n")
            end = self._wait_prompt(start, timeout, what=f"reply to {command!r}")
            reply = self._text(start, end - len(PROMPT))
        # drop the echo of the command
        lines = reply.split("\n")
        if lines and lines[0].strip().endswith(command):
            lines = lines[1:]
        return "\n".join(lines).strip("\n")

    def port_stats(self) -> dict[int, PortStats]:
        reply = self.cmd("show port stats all")
        stats = parse_port_stats(reply)
        if not stats:
            raise TestPmdError(f"{self.name}: cannot parse port stats:\n{reply}")
        return stats

    def clear_stats(self) -> None:
        self.cmd("clear port stats all")

    def set_fwd(self, mode: str) -> None:
        reply = self.cmd(f"set fwd {mode}")
        if not re.search(rf"Set {re.escape(mode)} packet forwarding mode", reply):
            raise TestPmdError(f"set fwd {mode}: {reply}")

    def set_txpkts(self, frame_size: int | Sequence[int]) -> None:
        """Length of the frames that ``start tx_first`` (txonly) builds: one
        segment of ``frame_size`` bytes (Ethernet header included, no CRC)."""
        segs = [frame_size] if isinstance(frame_size, int) else list(frame_size)
        reply = self.cmd("set txpkts " + ",".join(str(int(s)) for s in segs))
        if reply.strip():
            raise TestPmdError(f"set txpkts {segs}: {reply}")
        got = self.cmd("show config txpkts")
        m = re.search(r"Segment sizes:\s*([\d,]+)", got)
        if not m or [int(x) for x in m.group(1).split(",")] != segs:
            raise TestPmdError(f"set txpkts {segs} not applied: {got}")

    def start(self, tx_first: int = 0) -> str:
        return self.cmd(f"start tx_first {int(tx_first)}" if tx_first else "start")

    def stop(self) -> dict[int, FwdStats]:
        """``stop``; return the per-port forward statistics it prints
        (empty if forwarding was not started)."""
        return parse_fwd_stats(self.cmd("stop", timeout=30))

    def link_status(self) -> dict[int, bool]:
        reply = self.cmd("show port info all")
        out: dict[int, bool] = {}
        for block in re.split(r"\*+ Infos for port ", reply)[1:]:
            m = re.match(r"(\d+)", block)
            s = re.search(r"Link status:\s*(\w+)", block)
            if m and s:
                out[int(m.group(1))] = s.group(1).lower() == "up"
        return out

    def wait_link_up(self, timeout: float = 20.0, ports: Iterable[int] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while True:
            st = self.link_status()
            want = list(ports) if ports is not None else list(st)
            if want and all(st.get(p) for p in want):
                return
            if time.monotonic() > deadline:
                raise TestPmdError(f"{self.name}: links not up after {timeout}s: {st}")
            time.sleep(0.1)

    @property
    def nb_ports(self) -> int:
        return len(self.port_stats())

    # -- teardown ----------------------------------------------------------

    def close(self, timeout: float = 10.0) -> int | None:
        """quit; SIGTERM; SIGKILL (by PID); remove the EAL runtime dir."""
        if self._closed:
            return self.proc.returncode
        self._closed = True
        try:
            if self.alive:
                try:
                    with self._cmd_lock:
                        os.write(self._master, b"stop\n")
                        time.sleep(0.05)
                        os.write(self._master, b"quit\n")
                except OSError:
                    pass
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                if self.proc.poll() is not None:
                    break
                try:
                    os.kill(self.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            try:
                os.close(self._master)
            except OSError:
                pass
            self._reader.join(2)
            if self._log:
                self._log.close()
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
            _live.discard(self)
        return self.proc.returncode

    def __enter__(self) -> "TestPmd":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<TestPmd {self.name} pid={self.pid} prefix={self.file_prefix}>"
