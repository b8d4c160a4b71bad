"""The engine's SIGBUS recovery (cython_ext/includes/guard.h): a guarded
access to a page its file no longer has comes back as "vanished" instead
of killing the process, on any thread -- and every other SIGBUS still
kills it, as it would without the handler."""
import ctypes
import mmap
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from vfe import _engine

PAGE = mmap.PAGESIZE


@pytest.fixture
def shrinking():
    """A shared mapping of a 4-page memfd and the memfd (to cut it)."""
    fd = os.memfd_create("vfe-test-shrink", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4 * PAGE)
    mm = mmap.mmap(fd, 4 * PAGE)
    anchor = ctypes.c_char.from_buffer(mm)
    base = ctypes.addressof(anchor)
    del anchor
    yield fd, mm, base
    mm.close()
    os.close(fd)


def test_a_guarded_read_of_a_vanished_page_says_so(shrinking):
    fd, mm, base = shrinking
    mm[2 * PAGE:2 * PAGE + 4] = b"ring"
    assert _engine.read_guarded(base + 2 * PAGE, 4) == b"ring"
    os.ftruncate(fd, PAGE)
    assert _engine.read_guarded(base + 2 * PAGE, 4) is None
    assert _engine.read_guarded(base, 4) == bytes(4)      # the page that is left
    other = []                                             # another thread: its own guard
    t = threading.Thread(target=lambda: other.append(_engine.read_guarded(base + 3 * PAGE, 8)))
    t.start()
    t.join()
    assert other == [None]


def run_child(code: str, *python_args: str) -> subprocess.CompletedProcess:
    prog = textwrap.dedent("""
        import ctypes, mmap, os
        from vfe import _engine
        fd = os.memfd_create("t")
        os.ftruncate(fd, 2 * mmap.PAGESIZE)
        mm = mmap.mmap(fd, 2 * mmap.PAGESIZE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        os.ftruncate(fd, 0)
        assert _engine.read_guarded(base, 1) is None      # the handler is in
        print("guarded ok", flush=True)
    """) + textwrap.dedent(code)
    return subprocess.run([sys.executable, *python_args, "-c", prog], capture_output=True,
                          text=True, timeout=60, cwd=os.path.dirname(os.path.dirname(_engine.__file__)))


def test_an_unguarded_fault_still_kills_the_process():
    """A bug (a fault outside a guarded section) must not be hidden."""
    r = run_child("ctypes.string_at(base, 1)\nprint('survived')")
    assert r.stdout.strip() == "guarded ok"
    assert r.returncode == -signal.SIGBUS, r.stderr


def test_a_sigbus_sent_by_kill_still_kills_the_process():
    r = run_child("os.kill(os.getpid(), 7)\nprint('survived')")
    assert r.stdout.strip() == "guarded ok"
    assert r.returncode == -signal.SIGBUS, r.stderr


def test_faulthandler_still_reports_an_unguarded_fault():
    """The handler chains to what was there before it (here Python's
    faulthandler, which prints where the process died)."""
    r = run_child("ctypes.string_at(base, 1)", "-X", "faulthandler")
    assert r.returncode == -signal.SIGBUS
    assert "Fatal Python error: Bus error" in r.stderr


def test_io_threads_get_efault_not_sigbus(shrinking, tmp_path):
    """The file bdev's I/O threads move data with preadv/pwritev: the kernel
    answers EFAULT for a vanished page (no signal), which becomes IOERR."""
    fd, mm, base = shrinking
    libc = ctypes.CDLL(None, use_errno=True)
    src = tmp_path / "disk"
    src.write_bytes(b"x" * 4096)
    f = os.open(src, os.O_RDWR)
    try:
        os.ftruncate(fd, PAGE)
        assert libc.pread(f, ctypes.c_void_p(base + 2 * PAGE), 100, ctypes.c_long(0)) == -1
        assert ctypes.get_errno() == 14                    # EFAULT
        assert libc.pwrite(f, ctypes.c_void_p(base + 2 * PAGE), 100, ctypes.c_long(0)) == -1
        assert ctypes.get_errno() == 14
    finally:
        os.close(f)
