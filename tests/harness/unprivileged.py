"""Run things as an unprivileged user, for the tests of who may use vfe's
control endpoints (vfe/rpc/access.py).

    with public_dir() as d:                 # a directory every user can enter
        r = run_nobody(["python3", "-c", CODE, str(d / "s.sock")])

``run_nobody`` is `setpriv --reuid=65534 --regid=65534 --clear-groups`, as
the issue's acceptance names it: no capabilities, no supplementary groups.
It needs root; ``needs_root`` is the matching pytest mark.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

NOBODY = 65534
SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def can_switch_user() -> bool:
    return os.geteuid() == 0 and shutil.which("setpriv") is not None


def needs_root():
    import pytest
    return pytest.mark.skipif(not can_switch_user(), reason="needs root and setpriv to act as another user")


def run_nobody(argv: list[str], *, env: dict | None = None, timeout: float = 60,
               input: str | None = None) -> subprocess.CompletedProcess:
    """``argv`` as uid/gid 65534; stdout and stderr captured as text.  The
    environment is ours (PYTHONPATH pointing at this checkout, so that
    `python -m vfe...` imports the code under test) unless ``env`` is given."""
    if env is None:
        env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return subprocess.run([*SETPRIV, *argv], env=env, capture_output=True, text=True, timeout=timeout,
                          input=input, cwd="/")


def python_nobody(code: str, *args: str, **kw) -> subprocess.CompletedProcess:
    """``python -c code args...`` as nobody."""
    return run_nobody([sys.executable, "-c", code, *args], **kw)


# connect to argv[1] (a Unix socket path, or "tcp:PORT" on 127.0.0.1), send
# argv[2], print all that comes back until the server hangs up -- then
# "(still open)" if it has not within 3 s
_EXCHANGE = r"""
import socket, sys
where = sys.argv[1]
if where.startswith("tcp:"):
    s = socket.create_connection(("127.0.0.1", int(where[4:])), timeout=3)
else:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(3)
    s.connect(where)
try:
    s.sendall(sys.argv[2].encode())
except OSError:
    pass                            # refused and closed already: read the answer
buf = b""
while True:
    try:
        data = s.recv(65536)
    except ConnectionResetError:    # closed with our request unread
        break
    except TimeoutError:
        buf += b"(still open)"
        break
    if not data:
        break
    buf += data
sys.stdout.write(buf.decode())
"""


def exchange_nobody(where: str, data: str) -> subprocess.CompletedProcess:
    """Send ``data`` to a server as uid 65534 (``where``: a Unix socket path
    or "tcp:PORT"); stdout is what it answered before hanging up, followed by
    "(still open)" if it did not hang up."""
    return python_nobody(_EXCHANGE, where, data)


@contextlib.contextmanager
def public_dir(owner: int | None = None) -> Iterator[Path]:
    """A fresh directory under /tmp that everyone may enter (mode 0755), so
    that what decides is a socket's own mode and the server's peer check;
    ``owner`` makes it that uid's (to let it create sockets there).
    Removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="vfe-pub-", dir="/tmp"))
    try:
        os.chmod(d, 0o755)
        if owner is not None:
            os.chown(d, owner, owner)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
