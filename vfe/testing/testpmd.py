"""A small harness around DPDK's ``dpdk-testpmd`` (DPDK 22.11).

testpmd runs in interactive mode (``-i``) on a pseudo-terminal: with a pipe
its stdout is block-buffered and, without a terminal, it leaves at EOF on
stdin.  A reader thread drains the pty into a buffer all the time (so the
process never blocks on a full pty while forwarding), and :meth:`TestPmd.cmd`
types one command and waits for the next ``testpmd> `` prompt.

Typical use::

    from vfe.testing import testpmd as tp

    with tp.dpdk_vhost_backend(sock0, sock1):          # testpmd B: net_vhost, io fwd
        with tp.TestPmd([tp.virtio_user(sock0), tp.virtio_user(sock1)],
                        cores=[0, 1], main_lcore=0) as a:   # A: forwards on core 1
            a.wait_link_up()
            r = tp.measure_loop(a, seconds=5, frame_size=64, burst_first=4)
            print(r.mpps, r.gbps)

    tp.check_forward_counts(sock0, sock1, frame_size=1518)  # any back-end on sock0/1

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
from dataclasses import dataclass, field, asdict
from typing import Iterable, Sequence

__all__ = [
    "TESTPMD", "CONTROLLER", "FRONTEND_CORES", "BACKEND_CORES",
    "TestPmd", "TestPmdError", "PortStats", "FwdStats", "LoopResult", "CountResult",
    "virtio_user", "vhost", "testpmd_available", "parse_port_stats", "parse_fwd_stats",
    "dpdk_vhost_backend", "frontend", "vhost_daemon", "controller_argv",
    "CpuWatch", "drain", "measure_loop", "time_packets", "send_count",
    "check_forward_counts",
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
                server: bool = False, mac: str | None = None, name: str | None = None) -> str:
    """``net_virtio_userN,path=...,queues=...,queue_size=...,mrg_rxbuf=0|1[,server=1][,mac=..]``.

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


# --------------------------------------------------------------------------
# the reference back-end

def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _wait_sockets(paths: Iterable[str], timeout: float, pmd: TestPmd | None = None) -> None:
    deadline = time.monotonic() + timeout
    paths = list(paths)
    while not all(os.path.exists(p) for p in paths):
        if pmd is not None and not pmd.alive:
            raise TestPmdError(f"{pmd.name} exited before creating {paths}:\n{pmd.tail()}")
        if time.monotonic() > deadline:
            raise TestPmdError(f"sockets {paths} not created within {timeout}s")
        time.sleep(0.05)


class dpdk_vhost_backend:
    """Context manager: testpmd "B" with net_vhost server ports on ``sockets``
    doing io forwarding (port 0 RX -> port 1 TX and back), already started.

    This is the DPDK reference for our daemon: a front-end connects to the
    same socket paths with :func:`virtio_user` (client mode).
    """

    def __init__(self, *sockets: str, queues: int = 1,
                 cores: str | Sequence[int] = BACKEND_CORES[0],
                 main_lcore: int | None = BACKEND_CORES[1], **kw):
        if len(sockets) == 1 and not isinstance(sockets[0], str):
            sockets = tuple(sockets[0])
        self.sockets = list(sockets)
        self.queues = queues
        self.cores = cores
        self.main_lcore = main_lcore
        self.kw = kw
        self.pmd: TestPmd | None = None

    def __enter__(self) -> TestPmd:
        for s in self.sockets:
            _unlink(s)
        self.pmd = TestPmd([vhost(s, queues=self.queues, name=f"net_vhost{i}")
                            for i, s in enumerate(self.sockets)],
                           cores=self.cores, main_lcore=self.main_lcore, forward_mode="io",
                           nb_rxq=self.queues, nb_txq=self.queues, name="dpdk-vhost", **self.kw)
        try:
            _wait_sockets(self.sockets, 10, self.pmd)
            self.pmd.start()
        except BaseException:
            self.pmd.close()
            raise
        return self.pmd

    def __exit__(self, *exc) -> None:
        if self.pmd is not None:
            self.pmd.close()
        for s in self.sockets:
            _unlink(s)


CONTROLLER = "virtio-net-controller"


def controller_argv(sockets: Sequence[str], mode: str = "poll", binary: str | None = None,
                    extra: Iterable[str] = (), queues: int = 1) -> list[str]:
    """``virtio-net-controller --device net,socket=S0[,queues=N] --device
    net,socket=S1[,queues=N] --mode poll [extra...]``."""
    argv = [binary or shutil.which(CONTROLLER) or CONTROLLER]
    for s in sockets:
        argv += ["--device", f"net,socket={s}" + (f",queues={int(queues)}" if queues > 1 else "")]
    return argv + ["--mode", mode, *extra]


class vhost_daemon:
    """Context manager: run a vhost-user back-end daemon (our
    virtio-net-controller) that listens on ``sockets``.

    ``cpus`` pins it (``taskset -c``), e.g. ``[0]`` = the core where the
    reference back-end's forwarding lcore runs.  Output goes to ``log_path``
    (or a temporary file, removed afterwards); :meth:`tail` shows the end of
    it, and start-up errors include it.  Stopped with
    SIGTERM, then SIGKILL, by PID; the socket files are removed.
    """

    def __init__(self, argv: Sequence[str], sockets: Sequence[str],
                 cpus: Iterable[int] | None = None, start_timeout: float = 30.0,
                 grace: float = 0.2, log_path: str | None = None,
                 env: dict | None = None, stop_timeout: float = 10.0):
        self.argv = list(argv)
        self.sockets = list(sockets)
        self.cpus = sorted(set(cpus)) if cpus else None
        self.start_timeout = start_timeout
        self.grace = grace
        self.stop_timeout = stop_timeout
        self.env = env
        self._own_log = log_path is None
        if log_path is None:
            import tempfile
            fd, log_path = tempfile.mkstemp(prefix="vfe-daemon-", suffix=".log")
            os.close(fd)
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - n))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def __enter__(self) -> "vhost_daemon":
        for s in self.sockets:
            _unlink(s)
        argv = list(self.argv)
        if self.cpus and shutil.which("taskset"):
            argv = ["taskset", "-c", ",".join(map(str, self.cpus))] + argv
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         env=self.env)
        if self.cpus and not argv[0] == "taskset":
            try:
                os.sched_setaffinity(self.proc.pid, self.cpus)
            except OSError:
                pass
        try:
            deadline = time.monotonic() + self.start_timeout
            while not all(os.path.exists(s) for s in self.sockets):
                if not self.alive:
                    raise TestPmdError(f"{self.argv[0]} exited (rc={self.proc.returncode}) "
                                       f"before creating {self.sockets}:\n{self.tail()}")
                if time.monotonic() > deadline:
                    raise TestPmdError(f"{self.argv[0]}: sockets {self.sockets} not created "
                                       f"within {self.start_timeout}s:\n{self.tail()}")
                time.sleep(0.05)
            time.sleep(self.grace)  # socket file exists: let it reach listen()
        except BaseException:
            self.stop()
            self._drop_log()
            raise
        return self

    def _drop_log(self) -> None:
        if self._own_log:
            _unlink(self.log_path)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        for sig, wait in ((signal.SIGTERM, self.stop_timeout), (signal.SIGKILL, 5.0)):
            if self.proc.poll() is not None:
                break
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                pass
        for s in self.sockets:
            _unlink(s)
        return self.proc.returncode

    def __exit__(self, *exc) -> None:
        self.stop()
        self._drop_log()  # a temporary log; pass log_path to keep one


def frontend(sockets: Sequence[str], queues: int = 1, queue_size: int = 256,
             mrg_rxbuf: bool = True, server: bool = False,
             cores: str | Sequence[int] = FRONTEND_CORES[0],
             main_lcore: int | None = FRONTEND_CORES[1], macs: Sequence[str | None] | None = None,
             **kw) -> TestPmd:
    """testpmd "A": one virtio_user port per socket (vhost-user client unless
    ``server``), io forwarding, not started."""
    macs = list(macs) if macs else [None] * len(sockets)
    vdevs = [virtio_user(s, queues=queues, queue_size=queue_size, mrg_rxbuf=mrg_rxbuf,
                         server=server, mac=m, name=f"net_virtio_user{i}")
             for i, (s, m) in enumerate(zip(sockets, macs))]
    kw.setdefault("name", "virtio-user")
    pmd = TestPmd(vdevs, cores=cores, main_lcore=main_lcore, forward_mode="io",
                  nb_rxq=queues, nb_txq=queues, **kw)
    try:
        n = pmd.nb_ports
        if n != len(vdevs):
            raise TestPmdError(f"{pmd.name}: {n} ports probed, expected {len(vdevs)}:\n{pmd.tail()}")
    except BaseException:
        pmd.close()
        raise
    return pmd


# --------------------------------------------------------------------------
# measurements

@dataclass
class LoopResult:
    """Closed-loop throughput measured on the front-end's RX counters."""
    frame_size: int
    burst_first: int
    seconds: float                      # measured window
    rx_packets: dict[int, int]          # per port, over the window
    rx_bytes: dict[int, int]
    rx_missed: int = 0
    rx_errors: int = 0
    rx_nombuf: int = 0
    tx_dropped: int = 0                 # from the forward stats of `stop`
    foreign_cpu: float = 0.0            # cores used by other processes meanwhile
    steal_cpu: float = 0.0              # cores stolen by the hypervisor meanwhile

    @property
    def packets(self) -> int:
        return sum(self.rx_packets.values())

    @property
    def mpps(self) -> float:
        """Sum over the front-end's ports of received packets, Mpps."""
        return self.packets / self.seconds / 1e6 if self.seconds > 0 else 0.0

    @property
    def gbps(self) -> float:
        """Received L2 bytes (frame without CRC, no preamble/IFG) x 8, Gbit/s."""
        return sum(self.rx_bytes.values()) * 8 / self.seconds / 1e9 if self.seconds > 0 else 0.0

    @property
    def port_mpps(self) -> dict[int, float]:
        return {p: n / self.seconds / 1e6 for p, n in self.rx_packets.items()}

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(mpps=self.mpps, gbps=self.gbps, packets=self.packets)
        return d


_HZ = os.sysconf("SC_CLK_TCK")


def _proc_jiffies(pid: int) -> int:
    """utime+stime of a whole process (all its threads), in clock ticks."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


def _system_jiffies() -> tuple[int, int]:
    """(busy, steal) clock ticks summed over all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return user + nice + system + irq + softirq, steal


def _with_descendants(pids: Iterable[int]) -> set[int]:
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out = set(pids)
    grew = True
    while grew:
        new = {c for c, pp in parent.items() if pp in out and c not in out}
        out |= new
        grew = bool(new)
    return out


class CpuWatch:
    """How much CPU *other* processes used while we measured.

    ``foreign`` is in cores (1.0 = one core busy the whole window): the
    machine's busy time minus the time of ``own_pids`` and their descendants
    (our testpmds, the back-end, this process).  Anything well above 0.05
    means somebody else ran on the machine and the numbers are not
    trustworthy.
    """

    def __init__(self, own_pids: Iterable[int] = ()):
        self.roots = {os.getpid(), *[int(p) for p in own_pids if p]}

    def __enter__(self) -> "CpuWatch":
        self.pids = _with_descendants(self.roots)
        self.t0 = time.monotonic()
        self.sys0 = _system_jiffies()
        self.own0 = {p: _proc_jiffies(p) for p in self.pids}
        return self

    def __exit__(self, *exc) -> None:
        dt = time.monotonic() - self.t0
        busy1, steal1 = _system_jiffies()
        # processes born during the window count from zero
        pids = self.pids | _with_descendants(self.roots)
        own = sum(_proc_jiffies(p) - self.own0.get(p, 0) for p in pids)
        ticks = max(dt, 1e-9) * _HZ
        self.busy = (busy1 - self.sys0[0]) / ticks
        self.steal = (steal1 - self.sys0[1]) / ticks
        self.own = own / ticks
        self.foreign = max(0.0, self.busy - self.own)


def _sum_rx(stats: dict[int, PortStats]) -> int:
    return sum(s.rx_packets for s in stats.values())


def drain(pmd: TestPmd, settle: float = 0.2, timeout: float = 5.0) -> None:
    """Receive and drop whatever is still circulating (``rxonly``), so the
    next injection starts from an empty loop.  Leaves forwarding stopped."""
    pmd.stop()
    pmd.set_fwd("rxonly")
    pmd.start()
    deadline = time.monotonic() + timeout
    last = _sum_rx(pmd.port_stats())
    while time.monotonic() < deadline:
        time.sleep(settle)
        now = _sum_rx(pmd.port_stats())
        if now == last:
            break
        last = now
    pmd.stop()


def measure_loop(pmd: TestPmd, seconds: float, frame_size: int, burst_first: int = 4,
                 warmup: float = 1.0, fwd: str = "io",
                 own_pids: Iterable[int] = ()) -> LoopResult:
    """Closed-loop throughput through whatever connects the front-end's ports.

    io forwarding on the front-end; ``start tx_first N`` injects N bursts of
    32 ``frame_size``-byte frames on every stream (so 2*N*32 frames circulate
    with two ports); after ``warmup`` seconds the RX counters of all ports
    are sampled (``show port stats all``) before and after a window of
    ``seconds``.  Returns Mpps (sum of RX over the ports) and Gbit/s.
    The loop is drained first and forwarding is stopped afterwards.
    ``own_pids`` (the back-end's PIDs) are excluded from ``foreign_cpu``.
    """
    drain(pmd)
    pmd.set_fwd(fwd)
    pmd.set_txpkts(frame_size)
    pmd.clear_stats()
    pmd.start(tx_first=burst_first)
    try:
        time.sleep(warmup)
        with CpuWatch([pmd.pid, *own_pids]) as cpu:
            t0 = time.monotonic()
            s0 = pmd.port_stats()
            t0 = (t0 + time.monotonic()) / 2
            time.sleep(seconds)
            t1 = time.monotonic()
            s1 = pmd.port_stats()
            t1 = (t1 + time.monotonic()) / 2
    finally:
        fwdstats = pmd.stop()
    ports = sorted(s1)
    return LoopResult(
        frame_size=frame_size, burst_first=burst_first, seconds=t1 - t0,
        rx_packets={p: s1[p].rx_packets - s0[p].rx_packets for p in ports},
        rx_bytes={p: s1[p].rx_bytes - s0[p].rx_bytes for p in ports},
        rx_missed=sum(s1[p].rx_missed for p in ports),
        rx_errors=sum(s1[p].rx_errors for p in ports),
        rx_nombuf=sum(s1[p].rx_nombuf for p in ports),
        tx_dropped=sum(f.tx_dropped for f in fwdstats.values()),
        foreign_cpu=cpu.foreign, steal_cpu=cpu.steal,
    )


def time_packets(pmd: TestPmd, packets: int, poll: float = 0.02,
                 stall: float = 5.0) -> tuple[float, int]:
    """With a loop already running, wait until the front-end's ports have
    received ``packets`` more frames; return (elapsed seconds, packets
    actually counted).  Raises TestPmdError if nothing arrives for ``stall``
    seconds.  For pytest-benchmark: the timed quantity means something."""
    t0 = time.monotonic()
    start = _sum_rx(pmd.port_stats())
    last, last_t = start, t0
    while True:
        time.sleep(poll)
        now = _sum_rx(pmd.port_stats())
        t = time.monotonic()
        if now - start >= packets:
            return t - t0, now - start
        if now != last:
            last, last_t = now, t
        elif t - last_t > stall:
            raise TestPmdError(f"loop stalled: {now - start} of {packets} packets")


@dataclass
class CountResult:
    frame_size: int
    bursts: int
    # port stats (after `clear port stats all`)
    tx: dict[int, int] = field(default_factory=dict)
    rx: dict[int, int] = field(default_factory=dict)
    rx_bytes: dict[int, int] = field(default_factory=dict)
    # forward statistics from `stop`
    fwd: dict[int, FwdStats] = field(default_factory=dict)
    rx_missed: int = 0
    rx_errors: int = 0

    def pairs(self) -> list[tuple[int, int, int, int]]:
        """(tx port, tx count, rx port, rx count) for 0->1 and 1->0 (and in
        general port i -> port i^1)."""
        out = []
        for p in sorted(self.tx):
            q = p ^ 1
            if q in self.rx:
                out.append((p, self.tx[p], q, self.rx[q]))
        return out

    @property
    def ok(self) -> bool:
        pairs = self.pairs()
        return bool(pairs) and all(t == r and t > 0 for _, t, _, r in pairs) and all(
            self.rx_bytes[q] == self.rx[q] * self.frame_size for _, _, q, _ in pairs)


def send_count(pmd: TestPmd, frame_size: int, bursts: int = 4, settle: float = 0.3,
               timeout: float = 5.0) -> CountResult:
    """Send ``bursts`` bursts of 32 frames on every stream and count.

    ``set fwd rxonly``; ``set txpkts frame_size``; ``clear port stats all``;
    ``start tx_first bursts``: testpmd first runs the txonly burst function
    once per stream ``bursts`` times (port 1 sends on stream 0 = RX P0 -> TX
    P1, port 0 on stream 1), then starts rxonly, which receives and frees on
    every port.  We poll ``show port stats all`` until the RX counters stop
    moving, then ``stop``.  Frames sent on port 0 must arrive on port 1 and
    vice versa: compare port 0's TX-packets with port 1's RX-packets.
    """
    pmd.stop()
    pmd.set_fwd("rxonly")
    pmd.set_txpkts(frame_size)
    pmd.clear_stats()
    pmd.start(tx_first=bursts)
    deadline = time.monotonic() + timeout
    prev = None
    while True:
        time.sleep(settle)
        st = pmd.port_stats()
        sig = tuple((s.rx_packets, s.tx_packets) for s in st.values())
        done = all(st[p ^ 1].rx_packets >= st[p].tx_packets for p in st if p ^ 1 in st)
        if (done and sig == prev) or time.monotonic() > deadline:
            break
        prev = sig
    fwd = pmd.stop()
    return CountResult(frame_size=frame_size, bursts=bursts,
                       tx={p: s.tx_packets for p, s in st.items()},
                       rx={p: s.rx_packets for p, s in st.items()},
                       rx_bytes={p: s.rx_bytes for p, s in st.items()},
                       fwd=fwd,
                       rx_missed=sum(s.rx_missed for s in st.values()),
                       rx_errors=sum(s.rx_errors for s in st.values()))


def check_forward_counts(socket_a: str, socket_b: str, frame_size: int = 64,
                         mrg_rxbuf: bool = True, queues: int = 1, bursts: int = 4,
                         queue_size: int = 256, link_timeout: float = 20.0,
                         **testpmd_kw) -> CountResult:
    """Frames sent on one virtio_user port arrive on the other, counts equal.

    Starts a testpmd front-end with two virtio_user ports connecting (as
    vhost-user clients) to ``socket_a`` and ``socket_b`` -- the back-end
    under test (DPDK's net_vhost via :class:`dpdk_vhost_backend`, or our
    daemon) must already listen there and forward between the two.  Sends
    ``bursts`` x 32 frames of ``frame_size`` bytes on each port
    (:func:`send_count`) and asserts TX(port0) == RX(port1) and
    TX(port1) == RX(port0), > 0, with RX-bytes == RX-packets * frame_size.
    Returns the CountResult; raises AssertionError with the counters
    otherwise.
    """
    with frontend([socket_a, socket_b], queues=queues, queue_size=queue_size,
                  mrg_rxbuf=mrg_rxbuf, **testpmd_kw) as pmd:
        pmd.wait_link_up(link_timeout)
        res = send_count(pmd, frame_size, bursts=bursts)
    expected = 32 * bursts * queues
    msg = (f"frame_size={frame_size} mrg_rxbuf={mrg_rxbuf} queues={queues}: "
           f"tx={res.tx} rx={res.rx} rx_bytes={res.rx_bytes} missed={res.rx_missed} "
           f"errors={res.rx_errors} fwd={res.fwd} (expected {expected} per port)")
    assert res.ok, msg
    return res
