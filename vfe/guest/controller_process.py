"""Run a virtio-net-controller process for the demo and tests.

Started by PID and stopped by PID (SIGTERM, then SIGKILL); its stderr goes
to a log file that tests print when they fail."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from vfe.vhost.transport import wait_ready


class AdoptedProcess:
    """A process this test did not fork -- the new controller of a live
    update, which the old one started -- followed by a pidfd, so the PID
    cannot be reused under us.  Its exit status is not ours to collect:
    ``returncode`` is None unless we killed it (-9) or it died of our SIGTERM
    (-15)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.fd = os.pidfd_open(pid)
        self.returncode: int | None = None
        self._sent: int | None = None
        self._done = False

    def poll(self):
        if not self._done and wait_ready(self.fd, select.POLLIN, 0):
            self._finish()
        return self.returncode if self._done else None

    def _finish(self) -> None:
        self._done = True
        self.returncode = -self._sent if self._sent else None
        os.close(self.fd)

    def wait(self, timeout: float | None = None):
        if not self._done:
            if not wait_ready(self.fd, select.POLLIN, timeout):
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            self._finish()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if not self._done:
            self._sent = sig
            signal.pidfd_send_signal(self.fd, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class LoggedProcess:
    """A controller process started by a subclass's start(): its log file,
    waiting for a log line, and stopping it by PID (SIGTERM, then SIGKILL)."""

    log_path: Path
    proc: subprocess.Popen | None = None

    def wait_for_log(self, text: str, timeout: float = 30.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log().count(text) >= count:
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"controller exited ({self.proc.returncode}):\n{self.log()[-4000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"controller log never showed {text!r}:\n{self.log()[-4000:]}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait, SIGKILL if needed.  Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        return rc

    def follow(self, pid: int) -> None:
        """The controller is now `pid` (a live update handed everything to
        it): reap the old process, stop and kill the new one from now on."""
        if self.proc is not None and self.proc.pid != pid:
            old, self.proc = self.proc, AdoptedProcess(pid)
            old.wait(30)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class ControllerProcess(LoggedProcess):
    def __init__(self, devices: list[str], workdir: str | os.PathLike, *, mode: str = "adaptive",
                 workers: int = 1, extra: list[str] | None = None, name: str = "controller"):
        self.devices = devices
        self.workdir = Path(workdir)
        self.mode = mode
        self.workers = workers
        self.extra = extra or []
        self.log_path = self.workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "vfe.cli.controller", "--mode", self.mode,
                "--workers", str(self.workers)]
        for d in self.devices:
            argv += ["--device", d]
        return argv + self.extra

    def start(self, wait_sockets: bool = True, timeout: float = 30.0) -> "ControllerProcess":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        logf = open(self.log_path, "a")
        logf.write(f"--- start {self.starts}: {' '.join(self.argv())}\n")
        logf.flush()
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=logf,
                                     stderr=subprocess.STDOUT)
        logf.close()
        if wait_sockets:
            # the log keeps every start's lines: a restart waits for its own
            self.wait_for_log("serving", timeout, count=self.starts)
        return self
