"""A page of a GuardedArea that is missing until first touched, and
something that happens at that moment while the toucher waits
(userfaultfd, MISSING mode): how a test plays a driver that writes guest
memory *while* the engine is in the middle of reading it, deterministically
-- e.g. re-flagging a descriptor the engine has already read, before it
reads the ring's next page.

`FirstTouch(area, page, contents, at_touch)`: drops page `page` of the
area's memfd and registers it; the first access from any thread blocks
until a helper thread has run ``at_touch()`` and filled the page with
`contents`.  Needs userfaultfd (root, or vm.unprivileged_userfaultfd);
`available()` says whether this machine has it.
"""
from __future__ import annotations

import ctypes
import os
import struct
import threading

from tests.harness.guarded import PAGE, GuardedArea

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_SYS_USERFAULTFD = 323                  # x86-64
_UFFD_API = 0xAA
_UFFDIO_API = 0xC018AA3F                # _IOWR(0xAA, 0x3F, struct uffdio_api)
_UFFDIO_REGISTER = 0xC020AA00           # _IOWR(0xAA, 0x00, struct uffdio_register)
_UFFDIO_COPY = 0xC028AA03               # _IOWR(0xAA, 0x03, struct uffdio_copy)
_MODE_MISSING = 1
_EVENT_PAGEFAULT = 0x12
_FALLOC_PUNCH_HOLE = 0x02 | 0x01        # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def _ioctl(fd: int, req: int, buf) -> None:
    if _libc.ioctl(fd, req, ctypes.addressof(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"userfaultfd ioctl {req:#x}: {os.strerror(err)}")


def _open() -> int:
    fd = _libc.syscall(_SYS_USERFAULTFD, os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"userfaultfd: {os.strerror(err)}")
    api = ctypes.create_string_buffer(struct.pack("<QQQ", _UFFD_API, 0, 0), 24)
    try:
        _ioctl(fd, _UFFDIO_API, api)
    except OSError:
        os.close(fd)
        raise
    return fd


def available() -> bool:
    try:
        os.close(_open())
    except OSError:
        return False
    return True


class FirstTouch:
    def __init__(self, area: GuardedArea, page: int, contents: bytes, at_touch) -> None:
        if len(contents) != PAGE:
            raise ValueError("a whole page of contents")
        self.addr = area.addr + page * PAGE
        self._src = ctypes.create_string_buffer(contents, PAGE)
        self._at_touch = at_touch
        self.touched = threading.Event()
        self.error: BaseException | None = None
        if _libc.fallocate(area.fd, _FALLOC_PUNCH_HOLE, ctypes.c_long(page * PAGE),
                           ctypes.c_long(PAGE)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"fallocate: {os.strerror(err)}")
        self.fd = _open()
        reg = ctypes.create_string_buffer(struct.pack("<QQQQ", self.addr, PAGE, _MODE_MISSING, 0), 32)
        _ioctl(self.fd, _UFFDIO_REGISTER, reg)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            msg = os.read(self.fd, 32)
            event, addr = msg[0], struct.unpack_from("<Q", msg, 16)[0]
            if event != _EVENT_PAGEFAULT or addr & ~(PAGE - 1) != self.addr:
                raise RuntimeError(f"unexpected userfault event {event:#x} at {addr:#x}")
            self._at_touch()
            copy = ctypes.create_string_buffer(
                struct.pack("<QQQQq", self.addr, ctypes.addressof(self._src), PAGE, 0, 0), 40)
            _ioctl(self.fd, _UFFDIO_COPY, copy)
        except BaseException as e:          # reported by close(); the toucher would hang
            self.error = e
        finally:
            self.touched.set()

    def close(self) -> None:
        """After the touch: join the helper, raise what went wrong in it."""
        self._thread.join(timeout=10)
        os.close(self.fd)
        if self.error is not None:
            raise self.error


__all__ = ["FirstTouch", "available"]
