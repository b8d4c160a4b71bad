"""Who may use vfe's local control endpoints, and how we know who is calling.

The controller's JSON-RPC socket (virtnet, vfe-rpc), vfe-vhostd's JSON-RPC
(vhostmgmt) and the relay hand-over on a function's vhost-user endpoint all
act as root: they create and remove devices and hand out a VM's memory.  Only
a *privileged* peer may use them: root, or the uid the daemon itself runs as
(someone running the whole stack as themselves).  File modes already keep
others from connecting to a Unix socket (0600, in a directory only root can
write); the peer check below is what decides, so a socket made world-writable
by hand, an fd passed on, or TCP -- which has no file mode -- change nothing.

How the peer is known, never from anything the client says:

- Unix sockets: ``SO_PEERCRED``, the credentials the kernel recorded when
  the peer called connect() (or listen(), seen from a client).
- TCP over loopback: the uid that owns the *peer's* socket in the kernel's
  socket table of our network namespace (``/proc/net/tcp`` and ``tcp6``,
  the entry whose local address is the peer's and whose remote address is
  ours).  Some facts about that table that the lookup depends on:

  * The uid is the owner of the socket's inode -- whoever created the
    socket.  Only root can make a socket owned by root.
  * A socket its owner has closed soon shows uid 0: the FIN_WAIT2 and
    TIME_WAIT remnants of a closed socket have no owner, and on older
    kernels (Debian 12's 6.1) any orphaned socket reads as root's.  A client
    could send a request and close at once, so that its entry reads as
    root's by the time we look.  Hence only an ESTABLISHED entry counts:
    close() moves a socket out of ESTABLISHED *before* orphaning it.
  * The kernel reads an entry's state before its uid, so a close that lands
    between the two reads could still show "ESTABLISHED, uid 0".  Hence the
    table is read twice: if the second read still finds the same socket
    (inode) ESTABLISHED, it was not closed yet when the first read took its
    uid, and that uid is the real owner's.
  * The table is per network namespace, as is loopback: a process that can
    reach our 127.0.0.1 is in the table we read.  A peer that is not in it
    (another host, when vfe-vhostd is told to listen elsewhere) is refused.

Also here: ``RefusalLog``, which keeps a flood of refused connections from
flooding the log too.  That nobody but root (or us) can replace what is in
the directory of a control socket is vfe/safepath.py's ``ensure_private_dir``.
"""
from __future__ import annotations

import logging
import os
import socket
import struct
import sys
import time
from dataclasses import dataclass


PROC_NET = "/proc/net"
TCP_ESTABLISHED = 0x01
_UCRED = struct.Struct("3i")          # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class Peer:
    """Who is at the other end of a connection."""
    uid: int
    pid: int | None = None             # known for Unix sockets only

    def __str__(self) -> str:
        return f"uid {self.uid}" + (f", pid {self.pid}" if self.pid else "")


def is_privileged(uid: int) -> bool:
    """May a process running as ``uid`` use our control endpoints?"""
    return uid == 0 or uid == os.geteuid()


def allowed(peer: Peer | None) -> bool:
    """A peer we know, running as root or as ourselves."""
    return peer is not None and is_privileged(peer.uid)


def unix_peer(sock: socket.socket) -> Peer | None:
    """SO_PEERCRED of a connected Unix socket (None if the kernel has none)."""
    try:
        pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    except OSError:
        return None
    if uid < 0:                        # (uid_t)-1: no credentials recorded
        return None
    return Peer(uid, pid or None)


def tcp_peer(sock: socket.socket, proc_net: str = PROC_NET) -> Peer | None:
    """The owner of the peer's end of an accepted TCP connection, or None
    when it cannot be proven (see the module docstring for the rules)."""
    try:
        peer = _endpoint(sock.getpeername())
        ours = _endpoint(sock.getsockname())
    except OSError:
        return None
    first = _find(proc_net, peer, ours)
    again = _find(proc_net, peer, ours)
    # the same socket (inode), still ESTABLISHED: it was not closed when the
    # first read took its uid (states never return to ESTABLISHED)
    if first is None or again is None or again[0] != TCP_ESTABLISHED or not first[2] == again[2] != 0:
        return None
    return Peer(first[1])


def connection_peer(sock: socket.socket) -> Peer | None:
    """unix_peer or tcp_peer, by the socket's family."""
    if sock.family == socket.AF_UNIX:
        return unix_peer(sock)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        return tcp_peer(sock)
    return None


def _endpoint(sockaddr) -> tuple[bytes, int]:
    """(16-byte IPv6 address, IPv4 as ::ffff:a.b.c.d; port) of a sockaddr."""
    host, port = sockaddr[0], sockaddr[1]
    if ":" in host:
        return socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0]), port
    return b"\0" * 10 + b"\xff\xff" + socket.inet_pton(socket.AF_INET, host), port


def _proc_endpoint(text: str) -> tuple[bytes, int]:
    """An address of /proc/net/tcp{,6}: hex words of the address, each
    printed as a host-order u32, then ':' and the port in hex."""
    host, port = text.split(":")
    raw = bytes.fromhex(host)
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    if len(raw) == 4:
        raw = b"\0" * 10 + b"\xff\xff" + raw
    return raw, int(port, 16)


def _find(proc_net: str, local: tuple[bytes, int], remote: tuple[bytes, int]) -> tuple[int, int, int] | None:
    """(state, uid, inode) of the socket whose local end is ``local`` and
    remote end ``remote``, from both tables."""
    for name in ("tcp", "tcp6"):
        try:
            f = open(os.path.join(proc_net, name), encoding="ascii")
        except OSError:
            continue
        with f:
            next(f, None)                                  # the header line
            for line in f:
                fields = line.split()
                if len(fields) < 10:
                    continue
                try:
                    if _proc_endpoint(fields[1]) != local or _proc_endpoint(fields[2]) != remote:
                        continue
                    return int(fields[3], 16), int(fields[7]), int(fields[9])
                except ValueError:
                    continue
    return None


# -- logging refusals -------------------------------------------------------------------

class RefusalLog:
    """Log each refused connection, but at most ``burst`` per ``interval``
    seconds; the rest are counted and reported with the next line."""

    def __init__(self, logger: logging.Logger, burst: int = 10, interval: float = 10.0):
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self._window = 0.0
        self._logged = 0
        self._suppressed = 0

    def __call__(self, fmt: str, *args) -> None:
        now = time.monotonic()
        if now - self._window >= self.interval:
            self._window, self._logged = now, 0
        if self._logged >= self.burst:
            self._suppressed += 1
            return
        self._logged += 1
        if self._suppressed:
            fmt += " (%d more refused and not logged)"
            args = (*args, self._suppressed)
            self._suppressed = 0
        self.logger.warning(fmt, *args)
