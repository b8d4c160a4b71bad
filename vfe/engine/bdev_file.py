"""Opening the backing file of a file bdev (an aio bdev of `vfe-rpc
bdev_aio_create`, or `--device blk,bdev=file,path=...`).

The path comes from an RPC or a command line, and the daemon that opens it
is root; what the path names may be changed by others between the moment
it is named and the moment it is opened.  So:

- it is opened with O_NOFOLLOW (a symlink is refused: name the file itself),
  O_CLOEXEC (no child process inherits a disk), O_NOCTTY, and O_NONBLOCK
  while opening (a FIFO opened for reading would wait for a writer; cleared
  once the fd is known to be a file);
- the opened fd decides, not the path: fstat says a regular file or a block
  device, explicitly -- a FIFO, a socket, a character device or a directory
  is refused (before opening too, so a device is not even opened: that can
  have side effects);
- a file smaller than the disk it serves is refused unless the caller asks
  for growing (only `--device blk,...,path=IMG,size=MB`, documented as
  "grown to size= if shorter"); an aio bdev's size is its file's, and a
  recorded bdev whose file shrank is never grown back behind the user's
  back (docs/virtio-blk.md);
- O_DIRECT is a second fd on the same inode, opened through
  /proc/self/fd/N, not through the path again.
"""
from __future__ import annotations

import errno
import os
import stat

__all__ = ["open_backing", "check_backing_size", "probe_backing", "open_direct", "describe_mode"]

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symlink"), (stat.S_ISREG, "a regular file"),
          (stat.S_ISBLK, "a block device"))


def describe_mode(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return f"a file of type {stat.S_IFMT(mode):o}"


def _usable(mode: int) -> bool:
    return stat.S_ISREG(mode) or stat.S_ISBLK(mode)


def _refuse_kind(path: str, mode: int) -> OSError:
    code = errno.ELOOP if stat.S_ISLNK(mode) else errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL
    hint = ": name the file itself (symlinks are not followed)" if stat.S_ISLNK(mode) else ""
    return OSError(code, f"{path} is {describe_mode(mode)}, not a regular file or a block device{hint}", path)


def _size(fd: int, st: os.stat_result) -> int:
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    end = os.lseek(fd, 0, os.SEEK_END)          # a block device's size
    os.lseek(fd, 0, os.SEEK_SET)
    return end


def open_backing(path: str | os.PathLike, *, read_only: bool, need: int = 0,
                 grow: bool = False) -> tuple[int, int]:
    """(fd, size in bytes) of the backing file ``path``: opened as the
    module docstring says, at least ``need`` bytes long (a shorter regular
    file is extended to ``need`` only with ``grow``).  Raises OSError with a
    message naming the path and what is wrong."""
    path = os.fspath(path)
    try:
        pre = os.lstat(path)
    except OSError as exc:
        raise OSError(exc.errno, f"{path}: {exc.strerror}", path) from None
    if not _usable(pre.st_mode):
        raise _refuse_kind(path, pre.st_mode)
    flags = ((os.O_RDONLY if read_only else os.O_RDWR) | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
             | os.O_NONBLOCK)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:            # replaced by a symlink since the lstat
            raise _refuse_kind(path, stat.S_IFLNK) from None
        raise OSError(exc.errno, f"{path}: {exc.strerror}", path) from None
    try:
        st = os.fstat(fd)
        if not _usable(st.st_mode):
            raise _refuse_kind(path, st.st_mode)
        os.set_blocking(fd, True)
        size = _size(fd, st)
        if size < need:
            if not grow or read_only or not stat.S_ISREG(st.st_mode):
                raise _too_small(path, size, need)
            os.ftruncate(fd, need)
            size = need
    except BaseException:
        os.close(fd)
        raise
    return fd, size


def _too_small(path: str, size: int, need: int) -> OSError:
    return OSError(errno.EINVAL, f"{path} is {size} bytes, smaller than the {need} bytes the disk serves "
                                 f"(it is not grown: extend it yourself, e.g. truncate -s {need} {path}, or "
                                 f"serve a smaller disk)", path)


def check_backing_size(fd: int, path: str, need: int) -> None:
    """The open backing file ``fd`` still holds ``need`` bytes: a bdev's
    file is opened once and served by each function made on it later,
    and it may have been truncated in between (it is never grown back)."""
    size = _size(fd, os.fstat(fd))
    if size < need:
        raise _too_small(path, size, need)


def probe_backing(path: str | os.PathLike) -> int:
    """The size in bytes of the backing file ``path``, checked as
    ``open_backing`` does (opened read-only and closed again)."""
    fd, size = open_backing(path, read_only=True)
    os.close(fd)
    return size


def open_direct(fd: int, path: str, read_only: bool) -> int:
    """A second fd, with O_DIRECT, on the very inode ``fd`` is open on."""
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_DIRECT
    try:
        dfd = os.open(f"/proc/self/fd/{fd}", flags)
    except OSError as exc:
        raise OSError(exc.errno, f"{path}: O_DIRECT is not available here ({exc.strerror})", path) from None
    a, b = os.fstat(fd), os.fstat(dfd)
    if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):    # cannot happen: /proc/self/fd is the open file
        os.close(dfd)
        raise OSError(errno.ESTALE, f"{path}: the O_DIRECT fd is not the same file", path)
    return dfd
