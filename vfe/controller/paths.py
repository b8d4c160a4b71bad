"""Where the controller keeps its files: the defaults of vfe/paths.py (the
seed's paths under ``$VFE_ROOT``), each overridable by the daemon's flags; a
relative explicit path is taken relative to the current directory, not to
the root.

Also here: ``atomic_write_text``/``atomic_write_json``, the one way every
module of the controller replaces a file (temp file in the same directory,
fsync, rename, fsync of the directory).
"""
from __future__ import annotations

import json
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from vfe import paths as defaults
from vfe.safepath import check_sun_path, ensure_private_dir, make_dirs


@dataclass(frozen=True)
class Paths:
    root: Path
    conf: Path
    recovery_dir: Path
    state_dir: Path
    run_dir: Path

    @classmethod
    def from_env(cls, root: str | os.PathLike | None = None,
                 conf: str | os.PathLike | None = None,
                 recovery: str | os.PathLike | None = None,
                 run_dir: str | os.PathLike | None = None,
                 state_dir: str | os.PathLike | None = None,
                 env: Mapping[str, str] | None = None) -> "Paths":
        """The paths for this process: ``root`` (else ``$VFE_ROOT``, else
        ``/``) prefixes every default; the other arguments override one path
        each.  Nothing is created (see ``ensure``)."""
        root_p = defaults.root(env) if root is None else Path(os.path.abspath(os.fspath(root)))

        def pick(explicit, rel: str) -> Path:
            if explicit is not None and os.fspath(explicit) != "":
                return Path(os.path.abspath(os.fspath(explicit)))
            return root_p / rel

        return cls(
            root=root_p,
            conf=pick(conf, defaults.CONF_REL),
            recovery_dir=pick(recovery, defaults.RECOVERY_REL),
            state_dir=pick(state_dir, defaults.STATE_REL),
            run_dir=pick(run_dir, defaults.RUN_REL),
        )

    # -- derived paths -------------------------------------------------------

    @property
    def rpc_socket(self) -> Path:
        """The controller's JSON-RPC socket, where ``virtnet`` connects."""
        return self.run_dir / defaults.RPC_SOCKET_NAME

    def endpoint_socket(self, vuid: str) -> Path:
        """A function's vhost-user socket (``<run dir>/<VUID>.sock``);
        SocketPathTooLong (an OSError and a ValueError) if the kernel would
        refuse it."""
        if not vuid or "/" in vuid or vuid in (".", ".."):
            raise ValueError(f"bad VUID {vuid!r} for a socket name")
        path = self.run_dir / defaults.endpoint_socket_name(vuid)
        check_sun_path(path, fix="choose a shorter run dir (--run-dir) or VFE_ROOT")
        return path

    def display(self, path: Path) -> str:
        """``path`` as the seed names it, with the root noted when it is not
        ``/`` -- for messages that tell a user which files to delete."""
        path = Path(path)
        if self.root == Path("/"):
            return str(path)
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            return str(path)
        return f"/{rel} (under VFE_ROOT={self.root}, i.e. {path})"

    # -- creation ------------------------------------------------------------

    def ensure(self) -> "Paths":
        """Create the recovery, state and run directories (and the conf's
        directory) if missing.  The run dir holds the control sockets: it
        must be root's and writable by no one else (UnsafePath, with
        what to fix, if not).  Returns self."""
        for d in (self.conf.parent, self.recovery_dir, self.state_dir):
            make_dirs(d, 0o755)        # never group/world-writable, whatever the umask
        ensure_private_dir(self.run_dir, what="run directory")
        return self


# -- atomic file replacement ----------------------------------------------------

def fsync_dir(directory: str | os.PathLike) -> None:
    try:
        fd = os.open(os.fspath(directory), os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str, mode: int = 0o644) -> None:
    """Replace ``path`` with ``text`` so that a reader (or a crash) sees the
    old content or the new, never a part: write a temp file in the same
    directory, fsync it, rename it over ``path``, fsync the directory."""
    path = Path(path)
    try:
        # unchanged (a restart or live update re-saving what it loaded): two
        # fsyncs saved, and a live update's data-path gap is shorter for it
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o7777 == mode and path.read_text(encoding="utf-8") == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any, mode: int = 0o644) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n", mode=mode)


def is_temp_name(name: str) -> bool:
    """True for the temp files ``atomic_write_text`` leaves after a crash."""
    return name.startswith(".") and name.endswith(".tmp")
