"""The two back-ends a testpmd front-end is measured against, and that
front-end: DPDK's own net_vhost (testpmd "B", :class:`dpdk_vhost_backend`)
and our daemon (:class:`vhost_daemon`, a virtio-net-controller process), with
testpmd "A" on virtio_user ports connected to either (:func:`frontend`).
The process harness itself is tests/harness/testpmd.py."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from typing import Iterable, Sequence

from tests.harness.testpmd import (
    BACKEND_CORES, FRONTEND_CORES, TestPmd, TestPmdError, vhost, virtio_user,
)

__all__ = ["CONTROLLER", "dpdk_vhost_backend", "frontend", "vhost_daemon", "controller_argv"]

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
             packed_vq: bool = False, **kw) -> TestPmd:
    """testpmd "A": one virtio_user port per socket (vhost-user client unless
    ``server``; packed virtqueues with ``packed_vq``), io forwarding, not started."""
    macs = list(macs) if macs else [None] * len(sockets)
    vdevs = [virtio_user(s, queues=queues, queue_size=queue_size, mrg_rxbuf=mrg_rxbuf,
                         server=server, mac=m, name=f"net_virtio_user{i}", packed_vq=packed_vq)
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
