"""vhost-user over AF_UNIX SOCK_STREAM: the only module that touches sockets.

``Connection`` wraps a connected socket: ``recv_messages()`` does one
``recvmsg`` (SCM_RIGHTS fds included) and returns the complete messages it
finished; ``send_reply()`` / ``send_message()`` write one message with its
fds.  It works with blocking, timeout and non-blocking sockets; the daemon
drives non-blocking ones from a selector (``fileno()``), the test front-end
uses timeouts.

Both socket roles exist in the wild: the back-end listens (``listen``) and
QEMU connects, or QEMU listens (``server=on``) and we ``connect``, retrying
until the socket appears.

Some facts about fd passing on Linux that this code relies on:

- fds arrive with the *first byte* of the ``sendmsg`` that carried them.  A
  stream ``recvmsg`` never returns the data of two fd-carrying sends at once,
  so "the fds of one recvmsg belong to the message whose header is still
  incomplete" is exact (vfe/vhost/framing.py).
- If our ancillary buffer is too small the kernel sets MSG_CTRUNC and closes
  the fds that did not fit; the ones that did are ours to close.
- Every received fd is owned by someone at every moment: the caller (in the
  returned messages), the framer (partial message), or closed here on error.
"""
from __future__ import annotations

import array
import errno
import os
import select
import socket
import stat
import time
from typing import Iterable

from vfe.safepath import UnsafePath, check_socket_path

from .actions import Ack, Reply
from .framing import FrameAssembler, encode_message, encode_reply
from .messages import VERSION, Message, ProtocolError, U64

__all__ = ["Connection", "Listener", "PeerClosed", "UnsafePath", "listen", "connect", "try_connect",
           "connect_nowait", "is_served", "fds_from_ancdata", "wait_ready", "close_fds"]

RECV_SIZE = 65536
MAX_FDS_PER_RECV = 32
SEND_TIMEOUT = 5.0
_FD_SIZE = array.array("i").itemsize


class PeerClosed(ProtocolError, ConnectionError):
    """The peer closed or reset the connection (or stopped reading).

    Also a ConnectionError (an OSError): an action executor that logs a
    failed action and goes on will still run the CloseFds after a Reply
    that could not be sent."""


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def wait_ready(sock, events: int, timeout: float | None) -> bool:
    """poll(), not select(): a daemon with hundreds of functions has fds
    above FD_SETSIZE (1024), which select() cannot take."""
    poller = select.poll()
    poller.register(sock, events)
    return bool(poller.poll(None if timeout is None else max(0.0, timeout) * 1000))


def fds_from_ancdata(ancdata: list) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % _FD_SIZE])
            fds.extend(arr)
    return fds


class Connection:
    """One vhost-user connection over a connected AF_UNIX stream socket.

    Owns the socket and any fds of partial messages; ``close()`` releases
    both.  Fds in returned messages belong to the caller.
    """

    def __init__(self, sock: socket.socket, send_timeout: float = SEND_TIMEOUT) -> None:
        self.sock = sock
        # How long a send may wait for a peer that does not read.  The daemon
        # uses 0: its one control thread serves every device, and a front-end
        # whose socket buffer is full of unread replies is dropped, not waited for.
        self.send_timeout = send_timeout
        self._assembler = FrameAssembler()
        self._queue: list[Message] = []      # complete, not yet returned by recv_message
        self._closed = False

    @classmethod
    def pair(cls) -> tuple["Connection", "Connection"]:
        """Two connected Connections (blocking sockets), for tests."""
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return cls(a), cls(b)

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- receiving ------------------------------------------------------------

    def recv_messages(self) -> list[Message]:
        """One ``recvmsg``; the messages it completed (possibly none).

        Blocks if the socket is blocking (``TimeoutError`` if it has a
        timeout); returns ``[]`` at once on a non-blocking socket with nothing
        to read.  Raises ``PeerClosed`` on EOF or reset and ``ProtocolError``
        on a framing error; in both cases every fd received is closed.
        """
        try:
            data, ancdata, msg_flags, _addr = self.sock.recvmsg(
                RECV_SIZE, socket.CMSG_SPACE(MAX_FDS_PER_RECV * _FD_SIZE), socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return []
        except (socket.timeout, TimeoutError):
            raise
        except OSError as exc:
            self._drop_pending()
            raise PeerClosed(f"recvmsg: {exc}") from None
        fds = fds_from_ancdata(ancdata)
        if msg_flags & socket.MSG_CTRUNC:
            close_fds(fds)
            self._drop_pending()
            raise ProtocolError(f"more than {MAX_FDS_PER_RECV} fds in one message")
        if not data:
            close_fds(fds)
            partial = self._assembler.buffered
            self._drop_pending()
            raise PeerClosed("peer closed the connection"
                             + (f" in the middle of a message ({partial} bytes)" if partial else ""))
        try:
            return self._assembler.feed(data, fds)
        except ProtocolError:
            self._drop_pending()
            raise

    def recv_message(self, timeout: float | None = None) -> Message:
        """Block until one whole message arrives (front-end side helper).
        Extra messages that arrive with it are kept for the next call."""
        if self._queue:
            return self._queue.pop(0)
        deadline = None if timeout is None else time.monotonic() + timeout
        old = self.sock.gettimeout()
        try:
            while True:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError("no vhost-user message in time")
                    self.sock.settimeout(left)
                else:
                    self.sock.settimeout(None)
                msgs = self.recv_messages()
                if msgs:
                    self._queue = msgs[1:]
                    return msgs[0]
        finally:
            self.sock.settimeout(old)

    @property
    def idle(self) -> bool:
        """Between messages: nothing half-received, nothing queued (a live
        update hands over only such a connection)."""
        return not self._queue and self._assembler.at_boundary

    def _drop_pending(self) -> None:
        close_fds(self._assembler.take_pending_fds())
        for msg in self._queue:
            close_fds(msg.fds)
        self._queue = []

    # -- sending --------------------------------------------------------------

    def send_bytes(self, data: bytes, fds: Iterable[int] = ()) -> None:
        """Write all of ``data``; ``fds`` ride with its first byte.  The fds
        stay the caller's (the kernel duplicates them into the peer)."""
        fds = list(fds)
        view = memoryview(data)
        deadline = time.monotonic() + self.send_timeout
        while view:
            try:
                if fds:
                    n = self.sock.sendmsg(
                        [view], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))],
                        socket.MSG_NOSIGNAL)
                    fds = []
                else:
                    n = self.sock.send(view, socket.MSG_NOSIGNAL)
            except InterruptedError:
                continue
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PeerClosed("peer does not read its socket") from None
                wait_ready(self.sock, select.POLLOUT, left)
                continue
            except (socket.timeout, TimeoutError):
                raise PeerClosed("peer does not read its socket") from None
            except OSError as exc:
                raise PeerClosed(f"send: {exc}") from None
            view = view[n:]

    def send_message(self, request: int, payload: bytes = b"", fds: Iterable[int] = (),
                     flags: int = VERSION) -> None:
        self.send_bytes(encode_message(request, payload, flags), fds)

    def send_reply(self, action: Reply | Ack) -> None:
        """Send a ``Reply`` or ``Ack`` action (flags exactly 0x5)."""
        if isinstance(action, Ack):
            self.send_bytes(encode_reply(action.request, U64(0 if action.ok else 1).encode()))
        else:
            self.send_bytes(encode_reply(action.request, action.payload), action.fds)

    send = send_reply

    # -- lifetime -------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._drop_pending()
        self.sock.close()

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Listener:
    """A listening vhost-user socket (the back-end is the server)."""

    def __init__(self, path: str, backlog: int = 1, *, sock: socket.socket | None = None) -> None:
        self.path = path
        # False while a live update may still fail: the socket file is the
        # old controller's too, and must survive our close()
        self.owns_path = True
        if sock is not None:              # inherited from the controller we take over from
            sock.setblocking(False)
            self.sock = sock
            self._inode = os.stat(path).st_ino
            self.owns_path = False
            return
        # a path others could have put a socket or symlink on is refused
        # before anything there is probed or removed (vfe/safepath.py)
        check_socket_path(path)
        _remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        self.sock = sock
        self._inode = os.stat(path).st_ino

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self, timeout: float | None = 0.0, blocking: bool = False) -> Connection | None:
        """Accept one front-end: None if none arrived within ``timeout``
        (0: don't wait; None: wait forever).  The new connection's socket is
        non-blocking unless ``blocking``."""
        if timeout != 0.0:
            if not wait_ready(self.sock, select.POLLIN, timeout):
                return None
        try:
            sock, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        sock.setblocking(blocking)
        return Connection(sock)

    def close(self, unlink: bool = True) -> None:
        self.sock.close()
        if unlink and self.owns_path:
            try:
                if os.stat(self.path).st_ino == self._inode:
                    os.unlink(self.path)
            except OSError:
                pass

    def __enter__(self) -> "Listener":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect_nowait(path: str) -> socket.socket:
    """A connected, non-blocking AF_UNIX stream socket to ``path``, or the
    OSError of the one attempt.  It never waits: a listener whose backlog is
    full (it does not accept) answers EAGAIN (BlockingIOError) at once --
    a blocking connect() would sleep until it accepts, which freezes the
    single-threaded loop of the controller or vfe-vhostd that called it.
    (Polling for POLLOUT does not help on AF_UNIX: the failed socket polls
    writable at once; the caller retries later from its loop instead.)"""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


def is_served(path: str) -> bool:
    """Does a live process listen on the socket ``path``?  One connect that
    never waits: refused (or no file) is no; accepted, or a full backlog,
    is yes.  Other errors (EACCES...) are raised."""
    try:
        sock = connect_nowait(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except BlockingIOError:
        return True                   # a listener that does not accept is still a listener
    sock.close()
    return True


def _remove_stale_socket(path: str) -> None:
    """Unlink ``path`` if it is a socket nobody serves any more."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
    if is_served(path):
        raise OSError(errno.EADDRINUSE, "a live process serves this socket", path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def listen(path: str, backlog: int = 1) -> Listener:
    """Serve vhost-user on ``path`` (a stale socket file there is replaced)."""
    return Listener(path, backlog)


def try_connect(path: str, blocking: bool = False) -> Connection | None:
    """One attempt to connect to a front-end's ``server=on`` socket: None if
    it is not there (yet), refuses, or does not accept (a full backlog):
    the caller's loop tries again later.  Never waits (``connect_nowait``);
    ``blocking`` is the mode of the returned connection's socket.  Raises
    ``UnsafePath`` for a socket someone else could have put there (a
    directory others write, or in sticky /tmp a socket of another uid)."""
    try:
        check_socket_path(path)
        sock = connect_nowait(path)
    except (FileNotFoundError, ConnectionRefusedError, BlockingIOError):
        return None
    sock.setblocking(blocking)
    return Connection(sock)


def connect(path: str, retry_interval: float = 0.1, timeout: float | None = None,
            blocking: bool = False) -> Connection:
    """Connect to ``path``, retrying every ``retry_interval`` seconds until the
    socket appears and accepts (``TimeoutError`` after ``timeout``)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        conn = try_connect(path, blocking=blocking)
        if conn is not None:
            return conn
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"no vhost-user socket at {path}")
        time.sleep(retry_interval)
