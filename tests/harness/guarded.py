"""Memory between PROT_NONE guard pages, and a way to run code that may
crash in a forked child -- for tests and fuzzing of the engine's ring code
in-process (tests/harness/engine_rig.py).

An access one byte before or after a `GuardedArea` faults (SIGSEGV)
instead of silently reading or writing whatever is mapped next to it, so
an out-of-bounds read or write in the engine is a crash, never a pass.
Put the structure under test at the area's end (`end_offset`) to catch
overruns, or at its start to catch underruns.

`run_forked` runs such a case in a child process: a crash is reported as
an exception naming the signal, and the test process lives on.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import pickle
import select
import signal
import time
import traceback
from typing import Any, Callable

PAGE = mmap.PAGESIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long)
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_FIXED = 0x10
_MAP_NORESERVE = 0x4000
_PROT_NONE = 0


def _mmap(addr: int | None, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    p = _libc.mmap(addr, length, prot, flags, fd, offset)
    if p is None or p == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {length} bytes: {os.strerror(err)}")
    return p


class GuardedArea:
    """`size` bytes (rounded up to whole pages) of shared, read-write memory
    backed by a memfd (``fd``: a real fd, as a front-end's guest memory
    has), with one PROT_NONE page below and one above.

    ``addr`` is its address, ``view`` a writable memoryview of it.
    """

    def __init__(self, size: int, name: str = "vfe-guarded") -> None:
        self.size = max(PAGE, (size + PAGE - 1) // PAGE * PAGE)
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        self._base = 0
        try:
            os.ftruncate(self.fd, self.size)
            # reserve guard + area + guard inaccessible, then map the memfd
            # over the middle: the guards are ours, nothing else lands there
            self._total = self.size + 2 * PAGE
            self._base = _mmap(None, self._total, _PROT_NONE,
                               mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
            self.addr = _mmap(self._base + PAGE, self.size, mmap.PROT_READ | mmap.PROT_WRITE,
                              mmap.MAP_SHARED | _MAP_FIXED, self.fd, 0)
        except BaseException:
            self._unmap()
            raise
        self.view = memoryview((ctypes.c_char * self.size).from_address(self.addr)).cast("B")

    def end_offset(self, length: int, align: int = 1) -> int:
        """The offset at which `length` bytes end exactly at the upper guard
        page (lowered to `align` if the alignment asks for it)."""
        if length > self.size:
            raise ValueError(f"{length} bytes do not fit {self.size}")
        return (self.size - length) // align * align

    def write(self, offset: int, data: bytes) -> None:
        self.view[offset:offset + len(data)] = data

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.view[offset:offset + length])

    def fill(self, byte: int = 0) -> None:
        ctypes.memset(self.addr, byte, self.size)

    def _unmap(self) -> None:
        if self._base:
            _libc.munmap(self._base, self._total)
            self._base = 0

    def close(self) -> None:
        """Unmap (the caller makes sure nothing uses the memory any more)."""
        if getattr(self, "view", None) is not None:
            self.view.release()
            self.view = None
        self._unmap()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ChildCrashed(AssertionError):
    """The forked child died of a signal (an out-of-bounds access, ...)."""


class ChildFailed(AssertionError):
    """The forked child raised; the message carries its traceback."""


def run_forked(fn: Callable[..., Any], *args: Any, timeout: float = 30.0) -> Any:
    """Run ``fn(*args)`` in a forked child and return its (picklable)
    result.  A child killed by a signal raises ChildCrashed naming it; an
    exception in the child raises ChildFailed with its traceback; a child
    still running after ``timeout`` seconds is killed (SIGKILL, by its pid)
    and TimeoutError raised.  Start no threads in the parent you need in
    the child: only the calling thread is forked."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:                                           # the child
        os.close(rfd)
        try:
            try:
                out = pickle.dumps(("ok", fn(*args)))
            except BaseException:
                out = pickle.dumps(("error", traceback.format_exc()))
            view = memoryview(out)
            while view:
                view = view[os.write(wfd, view):]
        finally:
            os._exit(0)
    os.close(wfd)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([rfd], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise TimeoutError(f"{getattr(fn, '__name__', fn)} still running after {timeout} s")
            data = os.read(rfd, 65536)
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(rfd)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        raise ChildCrashed(f"{getattr(fn, '__name__', fn)} died of {signal.Signals(sig).name}")
    kind, value = pickle.loads(b"".join(chunks))
    if kind == "error":
        raise ChildFailed(f"{getattr(fn, '__name__', fn)} raised in the child:\n{value}")
    return value


__all__ = ["PAGE", "GuardedArea", "ChildCrashed", "ChildFailed", "run_forked"]
