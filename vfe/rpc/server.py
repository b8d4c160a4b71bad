"""The controller's JSON-RPC server on a Unix stream socket.

It lives in the daemon's selector loop; nothing here blocks or spawns threads:

    server = RpcServer(paths.rpc_socket, handler, daemon.sel)
    ...
    for key, _ in sel.select(timeout):
        kind, obj = key.data
        if kind == "rpc":
            obj.on_readable()
    ...
    server.close()

The listening socket and every client connection register themselves in the
selector with `data=("rpc", obj)`.  `obj.on_readable()` must be called for
any event on such a key (readable or writable: a connection whose replies did
not fit in the socket buffer waits for EVENT_WRITE and flushes from there).

`handler(method, params) -> result` runs on the loop thread.  It raises
`RpcError(code, message, data)` for expected failures (sent back as is); any
other exception is logged with its traceback and answered with -32603
carrying the exception's message.  A client that disconnects, sends garbage,
sends an endless line or never reads its replies only affects itself.

Only privileged peers are served (vfe.rpc.access: root, or our own uid, by
SO_PEERCRED): the socket is mode 0600 in a directory only root can write,
and a peer that gets through anyway is answered -13 "permission denied" and
disconnected before anything it sent is read.  So is a client beyond
`max_clients`, with -16.
"""
from __future__ import annotations

import collections
import errno
import logging
import os
import selectors
import socket
import stat
import time
from typing import Any, Callable, Iterator, Mapping, Sized

from vfe.rpc import progress
from vfe.rpc.access import Peer, RefusalLog, allowed, unix_peer
from vfe.rpc.protocol import (
    INTERNAL_ERROR, MAX_LINE, ErrorResponse, Request, RpcConnection, RpcError,
    encode_error, encode_notification, encode_result,
)
from vfe.safepath import check_socket_path, check_sun_path, ensure_private_dir
from vfe.vhost.transport import is_served

log = logging.getLogger("vfe.rpc")

Handler = Callable[[str, dict], Any]

RECV_SIZE = 65536
HIGH_WATER = 1 << 20        # stop handling a client's requests while this much output is queued
PROGRESS_INTERVAL = 0.1     # seconds between a call's progress notifications (the last one always goes)
ACCEPT_BURST = 16
MAX_CLIENTS = 64


def method_table(methods: Mapping[str, Callable[[dict], Any]]) -> Handler:
    """A handler dispatching on the method name: `methods[name](params)`;
    unknown names get -32601 (Method not found)."""
    def handler(method: str, params: dict) -> Any:
        fn = methods.get(method)
        if fn is None:
            raise RpcError.method_not_found(method)
        return fn(params)
    return handler


def _short(obj: Any, limit: int = 300) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[:limit] + "..."


def listen_unix(path: str, mode: int = 0o600, backlog: int = 16, what: str = "RPC") -> socket.socket:
    """A non-blocking listening Unix socket at ``path`` with file mode
    ``mode``, in a directory no one else can write (created if missing); a
    socket file left by a crashed server is replaced, a live one is not."""
    check_sun_path(path, f"{what} socket path")   # SocketPathTooLong, an OSError (ENAMETOOLONG)
    ensure_private_dir(os.path.dirname(os.path.abspath(path)), what=f"{what} socket directory")
    check_socket_path(path, f"{what} socket")     # UnsafePath: others could squat it
    _remove_stale(path, what)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _remove_stale(path: str, what: str) -> None:
    """A socket file left by a crashed server is removed; a live one is not."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket; not replacing it", path)
    try:
        live = is_served(path)          # never waits, even on a full backlog
    except OSError:
        live = True                     # cannot tell: not ours to remove
    if live:
        raise OSError(errno.EADDRINUSE, f"another server is already listening on this {what} socket", path)
    log.info("removing stale %s socket %s", what, path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def refuse(sock: socket.socket, line: bytes) -> None:
    """Answer a connection we will not serve with ``line`` and close it.
    What the peer sent is never looked at; reading it first (a bounded
    amount) just keeps the close from resetting the connection before the
    answer is read."""
    try:
        sock.setblocking(False)
        sock.send(line, socket.MSG_NOSIGNAL)
        for _ in range(4):
            if not sock.recv(RECV_SIZE):
                break
    except OSError:
        pass
    sock.close()


UNPROVEN = "a caller whose uid cannot be proven"


def accept_allowed(listener: socket.socket, log_refusal: RefusalLog, *, name: str, server: str,
                   clients: Sized, max_clients: int,
                   denied: Callable[[str], bytes], busy: Callable[[], bytes],
                   peer_of: Callable[[socket.socket], Peer | None] = unix_peer,
                   where: str = "") -> Iterator[tuple[socket.socket, Peer]]:
    """The control endpoints' door (the controller's RPC, vfe-vhostd's):
    accept up to ACCEPT_BURST connections waiting on ``listener`` and yield
    each one to serve, non-blocking, with its peer.  A peer that is not
    privileged gets ``denied(who)``, and while ``clients`` (the caller's,
    which it adds each yielded one to) holds ``max_clients``, a new client
    gets ``busy()``: one line, then the close, before anything it sent is read;
    each refusal is logged (``name``: the log's prefix, ``server``: who
    serves root only, ``where``: which of its listeners), at a bounded rate."""
    for _ in range(ACCEPT_BURST):
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:                  # EMFILE, ENFILE, ENOBUFS...
            log_refusal.logger.warning("%s: accept failed: %s", name, exc)
            return
        peer = peer_of(conn)
        if not allowed(peer):
            who = str(peer) if peer is not None else UNPROVEN
            log_refusal("%s: refused %s%s: %s serves root only", name, who, where, server)
            refuse(conn, denied(who))
            continue
        if len(clients) >= max_clients:
            log_refusal("%s: %d clients connected, refused another (%s)", name, len(clients), peer)
            refuse(conn, busy())
            continue
        conn.setblocking(False)
        yield conn, peer


class RpcClientConnection:
    """One accepted client: reads lines, runs the handler, queues replies."""

    def __init__(self, server: "RpcServer", sock: socket.socket, pid: int | None = None):
        self.server = server
        self.sock = sock
        self.proto = RpcConnection(server.max_line)
        self.pending: collections.deque[Request | ErrorResponse] = collections.deque()
        self.out = bytearray()
        self.eof = False
        self.closed = False
        self.events = selectors.EVENT_READ
        self.name = f"rpc client pid {pid}"

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- the selector's entry point ------------------------------------------------

    def on_readable(self) -> None:
        """Called for any event on this connection (read or write)."""
        if self.closed:
            return
        try:
            self._progress()
            if not self.out and not self.pending and not self.eof and not self.closed:
                self._read()
                self._progress()
        except OSError as exc:
            if self.closed:         # the handler closed the server under us
                return
            if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                log.debug("%s: disconnected (%s)", self.name, exc)
            else:
                log.warning("%s: connection failed: %s", self.name, exc)
            self.close()
            return
        if self.closed:
            return
        if self.eof and not self.out and not self.pending:
            log.debug("%s: disconnected", self.name)
            self.close()
            return
        self._set_events(selectors.EVENT_WRITE if self.out else selectors.EVENT_READ)

    on_writable = on_readable

    # -- internals ------------------------------------------------------------------

    def _read(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        if data:
            self.pending.extend(self.proto.feed(data))
        else:
            self.eof = True
            self.pending.extend(self.proto.feed_eof())

    def _progress(self) -> None:
        """Handle queued requests while the output stays below HIGH_WATER."""
        while not self.closed:
            while self.pending and len(self.out) < HIGH_WATER and not self.closed:
                self._dispatch(self.pending.popleft())
            self._flush()
            if self.out or not self.pending:
                return

    def _flush(self) -> None:
        while self.out and not self.closed:
            try:
                n = self.sock.send(self.out, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                return
            del self.out[:n]

    def _dispatch(self, item: Request | ErrorResponse) -> None:
        if isinstance(item, ErrorResponse):
            log.debug("%s: bad request: %s", self.name, item.message)
            self.out += item.encode()
            return
        if item.params.pop(progress.PROGRESS_PARAM, None) is True and not item.notification:
            with progress.reporting(self._progress_sink(item.id)):
                reply = self.server.execute(item)
        else:
            reply = self.server.execute(item)
        if reply is not None and not item.notification:
            self.out += reply

    def _progress_sink(self, rid) -> progress.Sink:
        """Queue the call's progress ahead of its reply and try to send it now
        (the loop is busy in the call): at most every PROGRESS_INTERVAL, and
        never more than a little, so a caller that does not read costs us
        nothing -- its reports are dropped, not its answer."""
        last = [0.0]

        def sink(done: int, total: int) -> None:
            now = time.monotonic()
            if (now - last[0] < PROGRESS_INTERVAL and done < total) or len(self.out) > RECV_SIZE:
                return
            last[0] = now
            self.out += encode_notification(progress.PROGRESS_METHOD,
                                            {"id": rid, "done": done, "total": total})
            try:
                self._flush()
            except OSError:
                pass                  # the caller went: the loop finds out when it answers
        return sink

    def _set_events(self, events: int) -> None:
        if events != self.events and not self.closed:
            self.server.selector.modify(self, events, ("rpc", self))
            self.events = events

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.server.selector.unregister(self)
        except (KeyError, ValueError, OSError):
            pass
        self.server.clients.discard(self)
        try:
            self.sock.close()
        except OSError:
            pass
        self.pending.clear()
        self.out.clear()


class RpcServer:
    """Listens on `path` (mode `mode`) and serves `handler` through `selector`."""

    def __init__(self, path: str | os.PathLike, handler: Handler,
                 selector: selectors.BaseSelector | None = None, mode: int = 0o600, *,
                 max_line: int = MAX_LINE, max_clients: int = MAX_CLIENTS, backlog: int = 16,
                 sock: socket.socket | None = None):
        self.path = os.fspath(path)
        self.handler = handler
        self.own_selector = selector is None
        self.selector = selectors.DefaultSelector() if selector is None else selector
        self.max_line = max_line
        self.max_clients = max_clients
        self.clients: set[RpcClientConnection] = set()
        self.closed = False
        self.log_refusal = RefusalLog(log)
        # False while the socket file is another controller's too (a live
        # update that may still fail): close() leaves it then
        self.owns_path = sock is None
        if sock is not None:              # a listening socket handed over by a live update
            sock.setblocking(False)
            self.sock = sock
        else:
            self.sock = self._listen(mode, backlog)
        st = os.stat(self.path)
        self._ident = (st.st_dev, st.st_ino)
        self.selector.register(self, selectors.EVENT_READ, ("rpc", self))
        log.info("RPC server listening on %s", self.path)

    def _listen(self, mode: int, backlog: int) -> socket.socket:
        try:
            return listen_unix(self.path, mode, backlog)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(errno.EADDRINUSE, "another virtio-net-controller is already serving this socket",
                              self.path) from None
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def on_readable(self) -> None:
        """Accept pending connections."""
        if self.closed:
            return
        for sock, peer in accept_allowed(
                self.sock, self.log_refusal, name="RPC server", server="virtio-net-controller",
                clients=self.clients, max_clients=self.max_clients,
                denied=lambda who: encode_error(None, -errno.EACCES, f"permission denied: virtio-net-controller "
                                                                     f"serves root only, not {who}"),
                busy=lambda: encode_error(None, -errno.EBUSY, f"virtio-net-controller is serving "
                                                               f"{len(self.clients)} clients, its limit: "
                                                               f"try again later")):
            conn = RpcClientConnection(self, sock, peer.pid)
            self.clients.add(conn)
            self.selector.register(conn, selectors.EVENT_READ, ("rpc", conn))
            log.debug("%s: connected", conn.name)

    def execute(self, req: Request) -> bytes | None:
        """Run one request through the handler; returns the encoded reply."""
        try:
            result = self.handler(req.method, req.params)
        except RpcError as exc:
            log.debug("RPC %s: error %d: %s", req.method, exc.code, exc.message)
            return encode_error(req.id, exc.code, exc.message, exc.data)
        except Exception as exc:
            log.exception("RPC %s(%s) failed", req.method, _short(req.params))
            return encode_error(req.id, INTERNAL_ERROR, str(exc) or type(exc).__name__,
                                {"exception": type(exc).__name__})
        if req.notification:
            return None
        try:
            return encode_result(req.id, result)
        except (TypeError, ValueError) as exc:
            log.error("RPC %s: result is not JSON-serializable: %s", req.method, exc)
            return encode_error(req.id, INTERNAL_ERROR, f"{req.method}: result is not JSON-serializable: {exc}")

    def poll(self, timeout: float | None = 0.0) -> int:
        """Serve events from the selector once; only for a server that owns its
        selector (tests, tools).  Returns the number of events handled."""
        if not self.own_selector:
            raise RuntimeError("poll() is for a server that owns its selector; the daemon's loop dispatches")
        n = 0
        for key, _ in self.selector.select(timeout):
            kind, obj = key.data
            if kind == "rpc":
                obj.on_readable()
                n += 1
        return n

    def close(self) -> None:
        """Drop every client, stop listening and remove the socket file (if it
        is still ours)."""
        if self.closed:
            return
        self.closed = True
        # first stop listening and remove the socket file, then drop the clients:
        # a client that sees its connection end finds no socket to come back to
        try:
            self.selector.unregister(self)
        except (KeyError, ValueError, OSError):
            pass
        self.sock.close()
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ident and self.owns_path:
                os.unlink(self.path)
        except OSError:
            pass
        for conn in list(self.clients):
            conn.close()
        if self.own_selector:
            self.selector.close()
        log.info("RPC server on %s closed", self.path)

    def __enter__(self) -> "RpcServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
