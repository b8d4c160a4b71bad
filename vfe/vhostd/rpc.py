"""JSON-RPC 2.0 for vfe-vhostd, as the reference service speaks it
(app/vfe-vdpa/jsonrpc-c.c): a client writes JSON request objects one after
another (no delimiter needed; whitespace between them is fine) and gets one
JSON response object per request (we end each with a newline).  The
connection stays open for more requests.

    {"jsonrpc": "2.0", "method": "mgmtpf", "id": 1, "params": {"list": true}}
    -> {"jsonrpc": "2.0", "result": {"devices": [...], "errno": 0, "errstr": "Success"}, "id": 1}

It is served on a Unix socket (vhostmgmt's default) and, when vfe-vhostd is
started with --tcp, on TCP 127.0.0.1:12190 (the reference's vhostmgmt).
Only root (or vfe-vhostd's own uid) is served, on either: see RpcServer.

Protocol errors use the reference's codes and texts:

    -32700  "Parse error. Invalid JSON was received by the server."  (then the connection closes)
    -32600  "The JSON sent is not a valid Request object."
    -32601  "Method not found."
    -32603  "Internal error."      (a bug in a method; logged)

and two of our own, each sent unasked (id null) on a new connection that is
then closed:

    -32001  "Permission denied: vfe-vhostd serves root only, not uid N."
    -32002  "Too many clients: vfe-vhostd serves N at a time."

A request without "id" is a notification: it runs and gets no response.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import selectors
import socket
from typing import Any, Callable

from vfe.rpc.access import RefusalLog, connection_peer
from vfe.rpc.server import accept_allowed, listen_unix

log = logging.getLogger("vfe.vhostd.rpc")

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INTERNAL_ERROR = -32603

PARSE_ERROR_TEXT = "Parse error. Invalid JSON was received by the server."
INVALID_REQUEST_TEXT = "The JSON sent is not a valid Request object."
METHOD_NOT_FOUND_TEXT = "Method not found."
INTERNAL_ERROR_TEXT = "Internal error."

#: vfe-vhostd's own refusals, in the range JSON-RPC leaves to servers
PERMISSION_DENIED = -32001
TOO_MANY_CLIENTS = -32002

MAX_REQUEST = 1 << 20       # bytes of one request (a longer one is a parse error)
MAX_OUTPUT = 1 << 20        # a client's unsent answers above which its requests wait
MAX_CLIENTS = 32
RECV_SIZE = 65536

_WS = b" \t\r\n"


class ParseError(Exception):
    """Invalid JSON; ``values`` are the complete ones that came before it."""

    def __init__(self, message: str, values: list | None = None):
        super().__init__(message)
        self.values = values or []


class JsonStream:
    """Split a byte stream into top-level JSON objects/arrays (sans-I/O).

    ``feed(data)`` returns the values completed so far; a value that is not
    JSON, a stream that does not start an object or array, or more than
    ``max_size`` bytes pending raise ParseError (the stream is then dead)."""

    def __init__(self, max_size: int = MAX_REQUEST):
        self.max_size = max_size
        self._buf = bytearray()
        self._pos = 0          # scan position in _buf
        self._depth = 0
        self._in_str = False
        self._esc = False

    def feed(self, data: bytes) -> list[Any]:
        self._buf += data
        out: list[Any] = []
        try:
            while True:
                value = self._next()
                if value is _NOTHING:
                    break
                out.append(value)
            if len(self._buf) > self.max_size:
                raise ParseError(f"request larger than {self.max_size} bytes")
        except ParseError as exc:
            exc.values = out
            raise
        return out

    def _next(self) -> Any:
        buf = self._buf
        if self._depth == 0:
            # skip whitespace between values
            i = 0
            while i < len(buf) and buf[i] in _WS:
                i += 1
            if i:
                del buf[:i]
            if not buf:
                self._pos = 0
                return _NOTHING
            if buf[0] not in b"{[":
                raise ParseError(f"unexpected {bytes(buf[:1])!r} where a JSON object must start")
            self._pos = 0
        i = self._pos
        n = len(buf)
        depth, in_str, esc = self._depth, self._in_str, self._esc
        while i < n:
            c = buf[i]
            i += 1
            if in_str:
                if esc:
                    esc = False
                elif c == 0x5C:          # backslash
                    esc = True
                elif c == 0x22:          # quote
                    in_str = False
                continue
            if c == 0x22:
                in_str = True
            elif c in (0x7B, 0x5B):      # { [
                depth += 1
            elif c in (0x7D, 0x5D):      # } ]
                depth -= 1
                if depth == 0:
                    text = bytes(buf[:i])
                    del buf[:i]
                    self._pos, self._depth, self._in_str, self._esc = 0, 0, False, False
                    try:
                        return json.loads(text.decode("utf-8"))
                    except (UnicodeDecodeError, ValueError) as exc:
                        raise ParseError(str(exc)) from None
        self._pos, self._depth, self._in_str, self._esc = i, depth, in_str, esc
        return _NOTHING


_NOTHING = object()


def error_response(code: int, message: str, rid: Any = None) -> dict:
    return {"jsonrpc": "2.0", "error": {"code": code, "message": message}, "id": rid}


def dispatch(methods: dict[str, Callable[[Any, Any], Any]], req: Any) -> dict | None:
    """One decoded request -> its response (None for a notification)."""
    if not isinstance(req, dict):
        return error_response(INVALID_REQUEST, INVALID_REQUEST_TEXT)
    method, params = req.get("method"), req.get("params")
    has_id = "id" in req
    rid = req.get("id")
    if (not isinstance(method, str) or (params is not None and not isinstance(params, (dict, list)))
            or isinstance(rid, bool) or not (rid is None or isinstance(rid, (str, int, float)))):
        return error_response(INVALID_REQUEST, INVALID_REQUEST_TEXT)
    fn = methods.get(method)
    if fn is None:
        return error_response(METHOD_NOT_FOUND, METHOD_NOT_FOUND_TEXT, rid) if has_id else None
    try:
        result = fn(params if params is not None else {}, rid)
    except Exception:
        log.exception("method %s failed", method)
        return error_response(INTERNAL_ERROR, INTERNAL_ERROR_TEXT, rid) if has_id else None
    return {"jsonrpc": "2.0", "result": result, "id": rid} if has_id else None


def encode(obj: dict) -> bytes:
    return (json.dumps(obj) + "\n").encode("utf-8")


class RpcServer:
    """vfe-vhostd's JSON-RPC endpoints, inside a selector loop whose keys'
    data are callables (vfe.vhostd.loop.Loop).

    ``path``: a Unix socket (mode 0600 in a directory only root can write),
    what vhostmgmt uses.  ``tcp``: (host, port), for the reference's
    vhostmgmt, which speaks TCP only.  Either way a connection is served only
    when its peer is privileged (vfe.rpc.access: SO_PEERCRED on the Unix
    socket, the kernel's owner of the peer's socket on TCP); anyone else, and
    a client beyond ``max_clients``, gets one JSON-RPC error and is
    disconnected before anything it sent is read."""

    def __init__(self, sel: selectors.BaseSelector, methods: dict[str, Callable[[Any, Any], Any]], *,
                 path: str | None = None, tcp: tuple[str, int] | None = None, mode: int = 0o600,
                 max_clients: int = MAX_CLIENTS, max_request: int = MAX_REQUEST, max_output: int = MAX_OUTPUT):
        if path is None and tcp is None:
            raise ValueError("vfe-vhostd's RPC needs a Unix socket path or a TCP address")
        self.sel = sel
        self.methods = methods
        self.max_clients = max_clients
        self.max_request = max_request
        self.max_output = max_output
        self.clients: set[_Client] = set()
        self.log_refusal = RefusalLog(log)
        self.path = path
        self.unix: socket.socket | None = None
        self.tcp: socket.socket | None = None
        try:
            if path is not None:
                self.unix = listen_unix(path, mode, backlog=64, what="vfe-vhostd")
                st = os.stat(path)
                self._ident = (st.st_dev, st.st_ino)
                sel.register(self.unix, selectors.EVENT_READ, lambda: self._accept(self.unix))
            if tcp is not None:
                self.tcp = socket.create_server(tcp, family=_family(tcp[0]), backlog=64)
                self.tcp.setblocking(False)
                sel.register(self.tcp, selectors.EVENT_READ, lambda: self._accept(self.tcp))
        except BaseException:
            self.close()
            raise

    @property
    def port(self) -> int | None:
        """The TCP port (None without TCP)."""
        return self.tcp.getsockname()[1] if self.tcp is not None else None

    def _accept(self, listener: socket.socket) -> None:
        how = " on the TCP" if listener is self.tcp else " on the Unix socket"
        for conn, peer in accept_allowed(
                listener, self.log_refusal, name="JSON-RPC", server="vfe-vhostd", where=how,
                peer_of=connection_peer, clients=self.clients, max_clients=self.max_clients,
                denied=lambda who: encode(error_response(
                    PERMISSION_DENIED, f"Permission denied: vfe-vhostd serves root only, not {who}.")),
                busy=lambda: encode(error_response(
                    TOO_MANY_CLIENTS, f"Too many clients: vfe-vhostd serves {self.max_clients} at a time."))):
            self.clients.add(_Client(self, conn, peer))

    def close(self) -> None:
        for c in list(self.clients):
            c.close()
        for sock in (self.unix, self.tcp):
            if sock is None:
                continue
            try:
                self.sel.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()
        if self.unix is not None:
            try:                                # not a newer vfe-vhostd's socket
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._ident:
                    os.unlink(self.path)
            except OSError:
                pass
        self.unix = self.tcp = None


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class _Client:
    """One served connection.  Its buffers are bounded: requests are read
    only while its answers are sent (less than ``max_output`` unsent), and
    one request may not exceed ``max_request`` bytes."""

    def __init__(self, server: RpcServer, sock: socket.socket, peer):
        self.server = server
        self.sock = sock
        self.peer = peer
        self.stream = JsonStream(server.max_request)
        self.pending: collections.deque = collections.deque()   # requests of the last read, not yet run
        self.out = bytearray()
        self.closing = False       # no more reading: answer what came, then close
        self.closed = False
        self.events = selectors.EVENT_READ
        server.sel.register(sock, self.events, self._on_event)

    def _on_event(self) -> None:
        self._flush()
        if not self.closed and not self.closing and not self.pending and len(self.out) < self.server.max_output:
            self._read()
        self._progress()
        if self.closed:
            return
        if self.closing and not self.pending and not self.out:
            self.close()
            return
        wants_input = not self.closing and not self.pending and len(self.out) < self.server.max_output
        events = (selectors.EVENT_READ if wants_input else 0) | (selectors.EVENT_WRITE if self.out else 0)
        if events and events != self.events:
            self.server.sel.modify(self.sock, events, self._on_event)
            self.events = events

    def _read(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not data:
            self.closing = True            # answer what it sent before it hung up
            return
        try:
            self.pending.extend(self.stream.feed(data))
        except ParseError as exc:
            log.debug("client %s sent invalid JSON: %s", self.peer, exc)
            self.pending.extend(exc.values)
            self.pending.append(_PARSE_FAILED)
            self.closing = True

    def _progress(self) -> None:
        """Answer pending requests and send, until they are all answered or
        max_output of answers wait for the client to read."""
        while not self.closed:
            self._serve()
            self._flush()
            if not self.pending or len(self.out) >= self.server.max_output:
                return

    def _serve(self) -> None:
        while self.pending and len(self.out) < self.server.max_output and not self.closed:
            req = self.pending.popleft()
            if req is _PARSE_FAILED:
                self.out += encode(error_response(PARSE_ERROR, PARSE_ERROR_TEXT))
                continue
            resp = dispatch(self.server.methods, req)
            if resp is not None:
                self.out += encode(resp)

    def _flush(self) -> None:
        while self.out and not self.closed:
            try:
                n = self.sock.send(self.out, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.close()
                return
            del self.out[:n]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.server.clients.discard(self)
        try:
            self.server.sel.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()
        self.pending.clear()
        self.out.clear()


_PARSE_FAILED = object()           # in a client's pending requests: where its stream broke
