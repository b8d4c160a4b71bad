"""The new build of a live update: what root may run, and the very engine
that was checked.

`virtnet update --start` names a directory (the one holding the new build's
`vfe/`); the running controller, as root, starts the controller from it with
its own interpreter (sys.executable -- the caller cannot choose one).  So:

- ``check_build(root)``: nobody but root (or our uid) can change what will
  run: every directory from / down to ``root`` is owned by root or us and not
  group/world-writable (no sticky exception: a build under /tmp is refused),
  and so is everything under ``root/vfe`` -- the package, its modules, their
  __pycache__ and the compiled engine; no symlinks in it.
- ``pin_engine(root)``: the compiled engine the new process will import is
  opened once (O_NOFOLLOW), its bytes copied into a sealed memfd (no write,
  grow or shrink can change them any more), and the engine ABI is read from
  that memfd.  The memfd is passed to the new process, which loads
  ``vfe._engine`` from ``/proc/self/fd/N`` (``load_engine``) instead of
  from the build's directory: whatever happens to the file after the check
  -- renamed over, rewritten in place -- the process runs what was checked.

``load_engine`` runs in the new process before anything imports
vfe.engine, so this module must not import it.
"""
from __future__ import annotations

import errno
import fcntl
import importlib.machinery
import importlib.util
import os
import stat
import sys

import vfe
from vfe.safepath import UnsafePath, check_dir_chain, check_trusted_file

__all__ = ["BuildError", "check_build", "engine_path", "pin_engine", "load_engine"]

_MFD_EXEC = 0x10                  # memfd_create: executable (kernels with vm.memfd_noexec)
_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
_MAX_ENGINE = 256 << 20


class BuildError(Exception):
    """The named build cannot be run (the message says why)."""


def check_build(root: str) -> str:
    """The absolute build directory, once nobody but root (or our uid) could
    change anything the new process imports from it; BuildError otherwise."""
    if not isinstance(root, str) or not os.path.isabs(root):
        raise BuildError(f"no controller build at {root!r} (give the absolute path of the directory "
                         f"that holds vfe/)")
    root = os.path.normpath(root)
    pkg = os.path.join(root, "vfe")
    try:
        check_dir_chain(root, allow_sticky=False, what="controller build")
        st = os.lstat(pkg)
    except FileNotFoundError as exc:
        raise BuildError(f"no controller build at {root} ({exc.filename} does not exist)") from None
    except UnsafePath as exc:
        raise BuildError(str(exc)) from None
    if not stat.S_ISDIR(st.st_mode):
        raise BuildError(f"no controller build at {root} ({pkg} is not a directory)")
    try:
        _check_tree(pkg)
    except UnsafePath as exc:
        raise BuildError(str(exc)) from None
    return root


def _check_tree(pkg: str) -> None:
    for dirpath, dirnames, filenames in os.walk(pkg, onerror=_walk_error):
        check_trusted_file(os.lstat(dirpath), dirpath, "the build's directory")
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                raise UnsafePath(path, f"{path} is a symlink: a controller build holds none (what it "
                                       f"points to is not checked)")
            if not stat.S_ISDIR(st.st_mode):
                check_trusted_file(st, path, "the build's file")


def _walk_error(exc: OSError) -> None:
    raise UnsafePath(exc.filename or "?", f"cannot check {exc.filename}: {exc.strerror}")


def engine_path(root: str) -> str:
    """The compiled engine ``import vfe._engine`` would pick under ``root``."""
    from vfe.engine.abi import AbiError, engine_file      # not at import: see the docstring
    try:
        return engine_file(root)
    except AbiError as exc:
        raise BuildError(str(exc)) from None


def _memfd(name: str) -> int:
    flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
    try:
        return os.memfd_create(name, flags | _MFD_EXEC)
    except OSError as exc:
        if exc.errno != errno.EINVAL:         # a kernel that predates MFD_EXEC
            raise
        return os.memfd_create(name, flags)


def pin_engine(root: str) -> tuple[int, str]:
    """(a sealed memfd holding the engine of the checked build ``root``, the
    file it was read from).  The caller owns the memfd."""
    path = engine_path(root)
    try:
        src = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise BuildError(f"cannot open the new engine {path}: {exc.strerror}") from None
    try:
        st = os.fstat(src)
        if not stat.S_ISREG(st.st_mode):
            raise BuildError(f"the new engine {path} is not a regular file")
        try:
            check_trusted_file(st, path, "the new engine")
        except UnsafePath as exc:
            raise BuildError(str(exc)) from None
        if st.st_size > _MAX_ENGINE:
            raise BuildError(f"the new engine {path} is {st.st_size} bytes: not an engine")
        mfd = _memfd("vfe-engine")
        try:
            while True:
                chunk = os.read(src, 1 << 20)
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    view = view[os.write(mfd, view):]
            fcntl.fcntl(mfd, fcntl.F_ADD_SEALS, _SEALS)
        except BaseException:
            os.close(mfd)
            raise
    finally:
        os.close(src)
    return mfd, path


def load_engine(fd: int) -> object:
    """In the new process, before anything imports vfe.engine: load
    ``vfe._engine`` from the sealed memfd ``fd`` the old controller checked,
    and close ``fd``.  Returns the module."""
    if "vfe._engine" in sys.modules:
        raise RuntimeError("vfe._engine was imported before the checked engine could be loaded")
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    if seals & _SEALS != _SEALS:
        raise RuntimeError(f"the engine fd {fd} is not a sealed memfd (seals {seals:#x})")
    path = f"/proc/self/fd/{fd}"
    loader = importlib.machinery.ExtensionFileLoader("vfe._engine", path)
    spec = importlib.util.spec_from_file_location("vfe._engine", path, loader=loader)
    module = importlib.util.module_from_spec(spec)      # dlopen() of the memfd
    sys.modules["vfe._engine"] = module
    try:
        loader.exec_module(module)
    except BaseException:
        del sys.modules["vfe._engine"]
        raise
    vfe._engine = module
    os.close(fd)                          # the loader mapped it; the fd is not needed
    return module
