"""Paths a root daemon can trust: only root (or the daemon's own uid) can
change what they name.

A local user who can write a directory on the way to a file can put another
file there -- a socket of their own where QEMU's was expected (and become the
front-end of a root process), or a module of their own where the next
controller build was expected (and have root run it).  Two kinds of check:

- ``check_dir_chain(path, allow_sticky)``: every directory from ``/`` down to
  ``path`` is owned by root or by us and is not group- or world-writable.
  With ``allow_sticky`` a writable directory is accepted when it is sticky
  (``/tmp``): there only an entry's owner may rename or remove it, and the
  next component must be ours anyway.  Symlinks on the way must be ours
  too, and the chain of the path they resolve to is checked as well.
- ``check_socket_path(path)``: a vhost-user / RPC socket, where we listen or
  where we connect.  Its directory chain as above (sticky allowed); in a
  directory others may write (sticky ``/tmp``) the socket itself must be
  ours: absent (we create it), or present and owned by our uid.  Where
  others cannot write, whatever is there was put there by root or by us.
- ``check_sun_path(path)``: a socket path the kernel can bind or connect at
  (no longer than ``SUN_PATH_MAX`` bytes); ``SocketPathTooLong`` if not.
- ``ensure_private_dir(path)``: the directory of a control socket (the run
  dir).  Missing directories are made with exactly the mode asked for; then
  its chain as above, sticky allowed on the way but not for the directory
  itself: nobody but root or us may add, rename or remove anything in it.

Every other refusal is an ``UnsafePath`` (a PermissionError) whose message names
the path, the directory and what is wrong with it, and says what to do.
"""
from __future__ import annotations

import errno
import os
import stat

__all__ = ["SUN_PATH_MAX", "SocketPathTooLong", "UnsafePath", "check_dir_chain", "check_socket_path",
           "check_sun_path", "check_trusted_file", "ensure_private_dir", "make_dirs", "writable_by_others",
           "trusted_uids"]

#: The longest path (in bytes) a Unix socket can be bound or connected at:
#: sockaddr_un.sun_path is 108 bytes, the terminating NUL included.
SUN_PATH_MAX = 107


class SocketPathTooLong(OSError, ValueError):
    """A Unix socket path longer than ``SUN_PATH_MAX`` bytes: ENAMETOOLONG,
    with the path as ``filename`` and, as ``strerror``, what it is and how
    long; also a ValueError (a bad argument, for callers checking one).
    ``str()`` names the path too."""

    def __init__(self, path: str, nbytes: int, what: str, fix: str = ""):
        fix = f"; {fix}" if fix else ""
        super().__init__(errno.ENAMETOOLONG,
                         f"{what} is {nbytes} bytes, longer than the {SUN_PATH_MAX} a Unix socket allows{fix}",
                         path)
        self.message = f"{what} {path} is {nbytes} bytes, longer than the {SUN_PATH_MAX} a Unix socket allows{fix}"

    def __str__(self) -> str:
        return self.message


def check_sun_path(path: str | os.PathLike, what: str = "socket path", fix: str = "") -> None:
    """Raise SocketPathTooLong if ``path`` does not fit a sockaddr_un (its
    bytes, not its characters, count); ``what`` names it in the message and
    ``fix``, if given, says what to do about it."""
    nbytes = len(os.fsencode(path))
    if nbytes > SUN_PATH_MAX:
        raise SocketPathTooLong(os.fspath(path), nbytes, what, fix)


class UnsafePath(PermissionError):
    """A path that someone other than root or us could change."""

    def __init__(self, path: str, why: str):
        super().__init__(errno.EPERM, why, path)
        self.why = why

    def __str__(self) -> str:
        return self.why


def trusted_uids() -> tuple[int, ...]:
    """root, and the uid we run as."""
    return (0, os.geteuid())


def writable_by_others(st: os.stat_result) -> str | None:
    """Why the inode ``st`` may be changed by someone other than root or us
    (None: it may not)."""
    if st.st_uid not in trusted_uids():
        return f"is owned by uid {st.st_uid}"
    writers = [who for bit, who in ((stat.S_IWGRP, "its group"), (stat.S_IWOTH, "everyone"))
               if st.st_mode & bit]
    if writers:
        return f"is writable by others ({' and '.join(writers)}, mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _components(path: str):
    """``/``, ``/a``, ``/a/b``, ... for an absolute ``path``."""
    cur = "/"
    yield cur
    for part in path.split("/"):
        if part:
            cur = os.path.join(cur, part)
            yield cur


def _check_literal_chain(path: str, allow_sticky: bool, private: bool, what: str, subject: str) -> None:
    for comp in _components(path):
        try:
            st = os.lstat(comp)
        except FileNotFoundError:
            raise                     # not unsafe, just not there (yet)
        except OSError as exc:
            raise UnsafePath(subject, f"{what} {subject}: cannot check {comp}: {exc.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            # the link's own mode means nothing; who may replace it is its
            # directory's business (checked one step up) and its owner's
            if st.st_uid not in trusted_uids():
                raise UnsafePath(subject, f"{what} {subject}: the symlink {comp} is owned by uid {st.st_uid}")
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafePath(subject, f"{what} {subject}: {comp} is not a directory")
        why = writable_by_others(st)
        if why is None:
            continue
        # a sticky directory (/tmp) others write is fine on the way: only the
        # owner of our next component may rename or remove it, and that
        # component is checked next (root's or ours, or refused)
        last = comp == path
        sticky_ok = (allow_sticky and st.st_mode & stat.S_ISVTX and st.st_uid in trusted_uids()
                     and not (private and last))
        if not sticky_ok:
            fix = ("use a directory only root can write" if st.st_uid not in trusted_uids()
                   else f"run `chmod go-w {comp}` or use a directory only root can write")
            raise UnsafePath(subject, f"{what} {subject}: the directory {comp} {why}, so another user "
                                   f"could replace what is there; {fix}")


def check_dir_chain(path: str | os.PathLike, *, allow_sticky: bool, private: bool = False,
                    what: str = "path", subject: str | None = None) -> str:
    """Raise UnsafePath unless every directory from / down to ``path`` (a
    directory, itself included) is owned by root or us and not writable by
    group or others (sticky ones excepted with ``allow_sticky``; with
    ``private``, ``path`` itself may not be writable by others even when
    sticky).  Messages name ``subject`` (default ``path``): the file the
    caller wants there.  Returns the absolute path."""
    path = os.path.abspath(os.fspath(path))
    subject = path if subject is None else subject
    _check_literal_chain(path, allow_sticky, private, what, subject)
    real = os.path.realpath(path)
    if real != path:
        _check_literal_chain(real, allow_sticky, private, what, subject)
    return path


def check_trusted_file(st: os.stat_result, path: str, what: str) -> None:
    """Raise UnsafePath unless the inode ``st`` (of ``path``) is owned by
    root or us and not group/world-writable."""
    why = writable_by_others(st)
    if why is not None:
        raise UnsafePath(path, f"{what} {path} {why}; it must be owned by root and not writable by others")


def make_dirs(path: str | os.PathLike, mode: int = 0o755) -> list[str]:
    """Create ``path`` and its missing parents, each with ``mode`` (a umask
    can only take bits away: a 002 umask cannot make them group-writable,
    which the checks here would then refuse, as os.makedirs' parents are).
    Returns the directories it created, top first."""
    path = os.path.abspath(os.fspath(path))
    made = []
    for comp in _components(path):
        try:
            os.mkdir(comp, mode)
        except FileExistsError:
            continue
        made.append(comp)
    return made


def ensure_private_dir(path: str | os.PathLike, mode: int = 0o755, what: str = "directory") -> str:
    """Create ``path`` if missing (the directories made get exactly ``mode``,
    whatever the umask), then raise UnsafePath, saying what to fix, unless
    no one but root and us can add, rename or remove anything in it: its
    chain as check_dir_chain's, sticky directories allowed on the way (their
    next component must be root's or ours) but not as ``path`` itself.
    Returns the absolute path."""
    for d in make_dirs(path, mode):
        # not narrowed by the umask; through an fd of the directory itself,
        # never a symlink put in its place (in a directory others write)
        # that would have root chmod whatever it names
        try:
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as exc:
            raise UnsafePath(d, f"{what} {path}: {d}, just made, is not a directory any more "
                                f"({exc.strerror}): another user replaced it") from None
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
    return check_dir_chain(path, allow_sticky=True, private=True, what=what)


def check_socket_path(path: str | os.PathLike, what: str = "socket path") -> str:
    """Raise UnsafePath unless the unix socket ``path`` is one only root or
    we control (see the module docstring).  Returns the absolute path.
    A missing path is fine: a listener creates it (bind() never replaces an
    existing file), a client finds nothing to connect to yet."""
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    check_dir_chain(directory, allow_sticky=True, what=what, subject=path)
    dst = os.stat(directory)
    why = writable_by_others(dst)
    if why is None:
        return path
    # a sticky directory others write (/tmp): the entry itself must be ours
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    except OSError as exc:
        raise UnsafePath(path, f"{what} {path}: {exc.strerror}") from None
    if st.st_uid != os.geteuid():
        kind = "a socket" if stat.S_ISSOCK(st.st_mode) else "a symlink" if stat.S_ISLNK(st.st_mode) else "a file"
        raise UnsafePath(path, f"{what} {path} is {kind} of uid {st.st_uid} in {directory}, which "
                               f"{why}: it is not ours to serve or connect to; remove it, or use a "
                               f"directory only root can write")
    return path
