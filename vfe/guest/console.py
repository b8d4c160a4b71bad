"""Drive the guest's shell over a serial port exposed as a unix socket.

The guest's /init runs a non-interactive ``sh`` on ttyS1 with echo off, raw
input and no \\n -> \\r\\n mapping, and prints ``vfe-shell-ready <pid>``
each time it (re)starts one. ``run()`` types one line:

    printf '%s%s\\n' '=VFE-B:' 'ID'; sh -c 'CMD' </dev/null 2>&1; printf '%s%s %s\\n' '=VFE-E:' 'ID' "$?"

and parses only what lies between the markers ``=VFE-B:ID`` and
``=VFE-E:ID <rc>``. The markers are printed from pieces, so the typed text
never contains them: an echo (a fresh shell before its ``stty -echo``) can
not be mistaken for output. ``sh -c`` keeps a syntax error or an ``exit``
inside CMD from killing the shell, and stdin from /dev/null keeps CMD from
eating the next command.

A reader thread drains the socket all the time (QEMU stalls the guest's
serial output when nobody reads) into a buffer that ``run()`` searches.
"""

from __future__ import annotations

import itertools
import re
import socket
import threading
import time

READY = re.compile(rb"vfe-shell-ready (\d+)\n")
# Bytes the guest tty would act on (^C, ^Z, ^\ ...) or that break the line.
_FORBIDDEN = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class ConsoleError(RuntimeError):
    pass


class GuestTimeout(TimeoutError):
    """A guest command did not finish in time (``output`` holds what it printed)."""

    def __init__(self, msg: str, output: str = ""):
        super().__init__(msg)
        self.output = output


def shell_quote(s: str) -> str:
    """Quote for a POSIX shell: one single-quoted word."""
    return "'" + s.replace("'", "'\\''") + "'"


class ShellConsole:
    def __init__(self, path: str, name: str = "vm"):
        self.path = path
        self.name = name
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._base = 0  # stream offset of _buf[0] (consumed bytes are dropped)
        self._cond = threading.Condition()
        self._closed = False
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()  # one command at a time on the wire
        self._ids = itertools.count(1)
        self.shell_pid: int | None = None

    # --- connection -------------------------------------------------------

    def connect(self, timeout: float = 10.0, alive=lambda: True) -> None:
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if not alive():
                    raise ConsoleError(f"QEMU exited before {self.path} appeared")
                if time.monotonic() > deadline:
                    raise ConsoleError(f"no console socket {self.path} after {timeout}s")
                time.sleep(0.01)
        self._sock = s
        self._reader = threading.Thread(target=self._read_loop, daemon=True,
                                        name=f"console-{self.name}")
        self._reader.start()

    def _read_loop(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                data = b""
            with self._cond:
                if not data:
                    self._closed = True
                    self._cond.notify_all()
                    return
                self._buf += data.replace(b"\r", b"")
                self._cond.notify_all()

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        if self._reader is not None:
            self._reader.join(timeout=2)
        self._sock = None

    @property
    def closed(self) -> bool:
        return self._closed

    def send(self, data: bytes) -> None:
        if self._sock is None or self._closed:
            raise ConsoleError("console is not connected (QEMU gone?)")
        self._sock.sendall(data)

    # --- waiting on the stream -------------------------------------------

    def offset(self) -> int:
        with self._cond:
            return self._base + len(self._buf)

    def wait_re(self, pattern: re.Pattern[bytes], timeout: float,
                since: int = 0) -> tuple[re.Match, int]:
        """Wait until ``pattern`` matches the stream from offset ``since``.

        Returns the match (on a snapshot of the buffer) and the stream
        offset of that snapshot's first byte."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                start = max(since - self._base, 0)
                m = pattern.search(self._buf, start)
                if m:
                    # Snapshot: the buffer may move once we release the lock.
                    return pattern.search(bytes(self._buf), start), self._base
                if self._closed:
                    raise ConsoleError(f"console closed (QEMU exited?) while waiting for "
                                       f"{pattern.pattern!r}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GuestTimeout(f"{pattern.pattern!r} not seen within {timeout}s",
                                       bytes(self._buf[start:]).decode(errors="replace"))
                self._cond.wait(left)

    def _consume(self, upto: int) -> None:
        """Forget stream bytes before offset ``upto`` (keeps memory bounded)."""
        with self._cond:
            n = upto - self._base
            if n > 0:
                del self._buf[:n]
                self._base = upto

    def wait_ready(self, timeout: float, since: int = 0) -> int:
        m, _ = self.wait_re(READY, timeout, since)
        self.shell_pid = int(m.group(1))
        return self.shell_pid

    # --- commands ---------------------------------------------------------

    def run(self, cmd: str, timeout: float = 30.0) -> tuple[int, str]:
        """Run ``cmd`` in the guest; return (exit status, stdout+stderr)."""
        if _FORBIDDEN.search(cmd):
            raise ValueError("command contains control characters the guest tty would act on")
        with self._lock:
            tag = f"{next(self._ids)}x{time.monotonic_ns() % 10**9}"
            begin = re.compile(rb"=VFE-B:" + tag.encode() + rb"\n")
            end = re.compile(rb"=VFE-E:" + tag.encode() + rb" (\d+)\n")
            line = (f"printf '%s%s\\n' '=VFE-B:' '{tag}'; "
                    f"sh -c {shell_quote(cmd)} </dev/null 2>&1; "
                    f"printf '%s%s %s\\n' '=VFE-E:' '{tag}' \"$?\"\n")
            since = self.offset()
            self.send(line.encode())
            deadline = time.monotonic() + timeout
            try:
                b, b_base = self.wait_re(begin, timeout, since)
                start = b_base + b.end()
                e, e_base = self.wait_re(end, max(deadline - time.monotonic(), 0), start)
            except GuestTimeout as exc:
                self._recover()
                raise GuestTimeout(f"guest command timed out after {timeout}s: {cmd!r}",
                                   exc.output) from None
            out = e.string[start - e_base:e.start()].decode(errors="replace")
            self._consume(e_base + e.end())
            return int(e.group(1)), out

    def _recover(self) -> None:
        """Abort a hung command: ^C ends the shell (it has the tty as its
        controlling terminal), /init starts a new one; wait for it."""
        since = self.offset()
        try:
            self.send(b"\x03")
            self.wait_ready(timeout=15, since=since)
        except (ConsoleError, GuestTimeout):
            return
        self._consume(self.offset())  # drop the dead command's output
