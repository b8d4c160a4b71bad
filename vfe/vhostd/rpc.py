"""JSON-RPC 2.0 over TCP for vfe-vhostd, as the reference service speaks it
(app/vfe-vdpa/jsonrpc-c.c): a client writes JSON request objects one after
another (no delimiter needed; whitespace between them is fine) and gets one
JSON response object per request (we end each with a newline).  The
connection stays open for more requests.

    {"jsonrpc": "2.0", "method": "mgmtpf", "id": 1, "params": {"list": true}}
    -> {"jsonrpc": "2.0", "result": {"devices": [...], "errno": 0, "errstr": "Success"}, "id": 1}

Protocol errors use the reference's codes and texts:

    -32700  "Parse error. Invalid JSON was received by the server."  (then the connection closes)
    -32600  "The JSON sent is not a valid Request object."
    -32601  "Method not found."
    -32603  "Internal error."      (a bug in a method; logged)

A request without "id" is a notification: it runs and gets no response.
"""
from __future__ import annotations

import json
import logging
import selectors
import socket
from typing import Any, Callable

log = logging.getLogger("vfe.vhostd.rpc")

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INTERNAL_ERROR = -32603

PARSE_ERROR_TEXT = "Parse error. Invalid JSON was received by the server."
INVALID_REQUEST_TEXT = "The JSON sent is not a valid Request object."
METHOD_NOT_FOUND_TEXT = "Method not found."
INTERNAL_ERROR_TEXT = "Internal error."

MAX_REQUEST = 1 << 20

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
    """Listens on TCP (127.0.0.1:12190 by default) inside a selector loop
    whose keys' data are callables (vfe.vhostd.service.Loop)."""

    def __init__(self, sel: selectors.BaseSelector, methods: dict[str, Callable[[Any, Any], Any]],
                 host: str = "127.0.0.1", port: int = 12190):
        self.sel = sel
        self.methods = methods
        self.sock = socket.create_server((host, port), family=socket.AF_INET, backlog=64)
        self.sock.setblocking(False)
        self.address = self.sock.getsockname()
        self.clients: set[_Client] = set()
        sel.register(self.sock, selectors.EVENT_READ, self._accept)

    @property
    def port(self) -> int:
        return self.address[1]

    def _accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(False)
        self.clients.add(_Client(self, conn))

    def close(self) -> None:
        for c in list(self.clients):
            c.close()
        try:
            self.sel.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()


class _Client:
    def __init__(self, server: RpcServer, sock: socket.socket):
        self.server = server
        self.sock = sock
        self.stream = JsonStream()
        self.out = bytearray()
        self.closing = False
        self.closed = False
        server.sel.register(sock, selectors.EVENT_READ, self._on_event)

    def _on_event(self) -> None:
        if self.out:
            self._flush()
        if self.closed or self.closing:
            return
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not data:
            self.close()
            return
        try:
            reqs = self.stream.feed(data)
        except ParseError as exc:
            log.debug("client sent invalid JSON: %s", exc)
            reqs = exc.values
            self.closing = True
        for req in reqs:
            resp = dispatch(self.server.methods, req)
            if resp is not None:
                self.out += encode(resp)
        if self.closing:
            self.out += encode(error_response(PARSE_ERROR, PARSE_ERROR_TEXT))
        self._flush()

    def _flush(self) -> None:
        while self.out:
            try:
                n = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.close()
                return
            del self.out[:n]
        if self.closed:
            return
        if not self.out and self.closing:
            self.close()
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.out else 0)
        try:
            self.server.sel.modify(self.sock, events, self._on_event)
        except (KeyError, ValueError):
            pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.server.sel.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()
        self.server.clients.discard(self)
