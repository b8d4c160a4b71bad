"""Run qemu-storage-daemon with vhost-user-blk exports: the reference
back-end for our blk devices (benchmarks).

    with StorageDaemon([QsdExport("/tmp/s/null.sock", "null", 1024, num_queues=2),
                        QsdExport("/tmp/s/mem.sock", "memory", 256, num_queues=2)],
                       workdir) as qsd:
        ...   # sockets listening; QEMU connects as for our daemon

Backends, the closest qemu-storage-daemon has to ours:

  null    ``driver=null-co,read-zeroes=on``: reads zeros, drops writes (our
          ``bdev=null`` zeroes reads too).
  memory  ``driver=file`` on a file in /dev/shm (tmpfs, so RAM) with
          ``cache.direct=off`` and ``aio=`` ``aio`` (default ``io_uring``): QEMU
          has no RAM block driver; this is the memory-backed equivalent of our
          ``bdev=malloc``.  The file is created (sparse) at start and
          removed at stop.

Started and stopped by PID (SIGTERM, then SIGKILL, LoggedProcess); its
output goes to ``<workdir>/<name>.log``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from vfe.guest.controller_process import LoggedProcess

QSD = os.environ.get("VFE_QSD", "qemu-storage-daemon")

__all__ = ["QSD", "QsdExport", "StorageDaemon", "qsd_available"]


def qsd_available() -> bool:
    return shutil.which(QSD) is not None


@dataclass
class QsdExport:
    socket: str
    bdev: str                 # "null" or "memory"
    size_mb: int
    num_queues: int = 1
    block_size: int = 512
    aio: str = "io_uring"     # memory only: threads, native, io_uring

    def __post_init__(self) -> None:
        if self.bdev not in ("null", "memory"):
            raise ValueError(f"bdev must be 'null' or 'memory', not {self.bdev!r}")
        if self.aio not in ("threads", "native", "io_uring"):
            raise ValueError(f"aio must be threads, native or io_uring, not {self.aio!r}")


class StorageDaemon(LoggedProcess):
    def __init__(self, exports: list[QsdExport], workdir: str | os.PathLike, *,
                 name: str = "qsd", shm_dir: str = "/dev/shm"):
        self.exports = list(exports)
        self.workdir = Path(workdir)
        self.log_path = self.workdir / f"{name}.log"
        self.name = name
        self.shm_dir = shm_dir
        self.files: list[Path] = []
        self.proc: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        argv = [QSD]
        for i, e in enumerate(self.exports):
            node = f"{e.bdev}{i}"
            size = e.size_mb << 20
            if e.bdev == "null":
                argv += ["--blockdev", f"driver=null-co,node-name={node},size={size},read-zeroes=on"]
            else:
                argv += ["--blockdev", f"driver=file,node-name={node},filename={self.files[i]},"
                                       f"cache.direct=off,aio={e.aio}"]
            argv += ["--export", f"type=vhost-user-blk,id=exp{i},node-name={node},addr.type=unix,"
                                 f"addr.path={e.socket},writable=on,num-queues={e.num_queues},"
                                 f"logical-block-size={e.block_size}"]
        return argv

    def start(self, timeout: float = 30.0) -> "StorageDaemon":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.files = []
        for i, e in enumerate(self.exports):
            if e.bdev == "memory":
                fd, path = tempfile.mkstemp(prefix=f"vfe-qsd-{self.name}-{i}-", suffix=".img",
                                            dir=self.shm_dir)
                os.ftruncate(fd, e.size_mb << 20)
                os.close(fd)
                self.files.append(Path(path))
            else:
                self.files.append(Path(os.devnull))  # placeholder, keeps indices aligned
        for e in self.exports:
            Path(e.socket).unlink(missing_ok=True)
        with open(self.log_path, "a") as logf:
            logf.write(f"--- start: {' '.join(self.argv())}\n")
            logf.flush()
            try:
                self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=logf,
                                             stderr=subprocess.STDOUT)
            except OSError:
                self._remove_files()
                raise
        deadline = time.monotonic() + timeout
        while not all(os.path.exists(e.socket) for e in self.exports):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                rc = self.proc.poll()
                self.stop()
                raise RuntimeError(f"{QSD} " + (f"exited ({rc})" if rc is not None else
                                                "never created its sockets")
                                   + f":\n{self.log()[-4000:]}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 15.0) -> int | None:
        try:
            return super().stop(timeout)
        finally:
            self._remove_files()

    def kill(self) -> None:
        try:
            super().kill()
        finally:
            self._remove_files()

    def _remove_files(self) -> None:
        for f in self.files:
            if f != Path(os.devnull):
                f.unlink(missing_ok=True)
        self.files = []
