"""JSON-RPC 2.0, one JSON object per line: framing and validation without I/O.

The server side feeds whatever bytes a socket produced into an
`RpcConnection` and gets back parsed `Request`s, or `ErrorResponse`s for
lines that are not valid requests (to be sent back as they are):

    conn = RpcConnection()
    for item in conn.feed(data):
        if isinstance(item, ErrorResponse):
            send(item.encode())
        else:
            send(encode_result(item.id, handler(item.method, item.params)))

Wire format: each message is one line of UTF-8 JSON terminated by "\\n"
(a "\\r" before it is tolerated, blank lines are ignored).  A request is
`{"jsonrpc": "2.0", "id": N, "method": "...", "params": {...}}`; `params`
may be omitted (= `{}`) but must be an object (by-name parameters) when
present.  A request without "id" is a notification: it is executed and gets
no answer.  Batches (JSON arrays) are refused with -32600.

Error codes
-----------
The JSON-RPC 2.0 standard codes:

    -32700  PARSE_ERROR       the line is not JSON (or not UTF-8)
    -32600  INVALID_REQUEST   not a request object, a batch, or a line longer
                              than the connection's max_line
    -32601  METHOD_NOT_FOUND  no such method (e.g. an older controller)
    -32602  INVALID_PARAMS    params missing/extra/of the wrong type
    -32603  INTERNAL_ERROR    the method failed unexpectedly (a bug)

Application errors (raised by method handlers for expected failures) are
negative errno values, so they stay within -1..-133 and never collide with
the reserved -32768..-32000 range.  `RpcError.from_errno(errno.ENODEV, msg)`
builds one; the ones vfe uses:

    -1   EPERM       operation not permitted
    -5   EIO         the emulated device/firmware failed
    -11  EAGAIN      try again later
    -16  EBUSY       the device is busy (e.g. migrating during a live update)
    -17  EEXIST      already exists (e.g. a MAC or VUID in use)
    -19  ENODEV      no such device (bad PF/VF index or VUID)
    -22  EINVAL      a value is semantically invalid
    -28  ENOSPC      no free resources (hotplug slots, SFs, MSI-X)
    -95  EOPNOTSUPP  not supported by this device/configuration
"""
from __future__ import annotations

import errno as _errno
import json
from dataclasses import dataclass, field
from typing import Any

JSONRPC_VERSION = "2.0"

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

# Application errors: -errno.
ERR_PERM = -_errno.EPERM
ERR_IO = -_errno.EIO
ERR_AGAIN = -_errno.EAGAIN
ERR_BUSY = -_errno.EBUSY
ERR_EXISTS = -_errno.EEXIST
ERR_NO_DEVICE = -_errno.ENODEV
ERR_INVALID = -_errno.EINVAL
ERR_NO_SPACE = -_errno.ENOSPC
ERR_NOT_SUPPORTED = -_errno.EOPNOTSUPP

MAX_LINE = 1 << 20          # bytes per message line, newline excluded


class RpcError(Exception):
    """A JSON-RPC error: raised by method handlers for expected failures
    (the server sends it back as is) and by the client for error responses."""

    def __init__(self, code: int, message: str, data: Any = None):
        super().__init__(message)
        self.code = int(code)
        self.message = str(message)
        self.data = data

    @classmethod
    def from_errno(cls, err: int, message: str, data: Any = None) -> "RpcError":
        return cls(-abs(err), message, data)

    @classmethod
    def method_not_found(cls, method: str) -> "RpcError":
        return cls(METHOD_NOT_FOUND, f"Method not found: {method}")

    @classmethod
    def invalid_params(cls, message: str, data: Any = None) -> "RpcError":
        return cls(INVALID_PARAMS, f"Invalid params: {message}", data)

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"RpcError({self.code}, {self.message!r}, {self.data!r})"


@dataclass
class Request:
    method: str
    params: dict = field(default_factory=dict)
    id: int | str | None = None
    notification: bool = False      # no "id": executed, never answered


@dataclass
class ErrorResponse:
    """A line that is not a valid request: send `encode()` back."""
    id: int | str | None
    code: int
    message: str
    data: Any = None

    def encode(self) -> bytes:
        return encode_error(self.id, self.code, self.message, self.data)


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, separators=(",", ":"), allow_nan=False) + "\n").encode()


def encode_request(id: int | str | None, method: str, params: dict | None = None) -> bytes:
    msg: dict[str, Any] = {"jsonrpc": JSONRPC_VERSION, "id": id, "method": method}
    if params is not None:
        msg["params"] = params
    return _dumps(msg)


def encode_notification(method: str, params: dict) -> bytes:
    """A message that expects no answer (no "id"): the server's progress."""
    return _dumps({"jsonrpc": JSONRPC_VERSION, "method": method, "params": params})


def encode_result(id: int | str | None, result: Any) -> bytes:
    """Raises TypeError/ValueError if `result` is not JSON-serializable."""
    return _dumps({"jsonrpc": JSONRPC_VERSION, "id": id, "result": result})


def encode_error(id: int | str | None, code: int, message: str, data: Any = None) -> bytes:
    """Never raises: data that cannot be serialized is sent as its str()."""
    err: dict[str, Any] = {"code": int(code), "message": str(message)}
    if data is not None:
        err["data"] = data
    try:
        return _dumps({"jsonrpc": JSONRPC_VERSION, "id": id, "error": err})
    except (TypeError, ValueError):
        err["data"] = str(data)
        return _dumps({"jsonrpc": JSONRPC_VERSION, "id": id, "error": err})


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def loads_line(line: bytes) -> Any:
    """Decode one line; ValueError if it is not UTF-8 JSON (NaN/Infinity and
    absurdly deep nesting included)."""
    try:
        return json.loads(line.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8: {exc.reason}") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _valid_id(value: Any) -> bool:
    return value is None or isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def parse_request(line: bytes) -> Request | ErrorResponse | None:
    """One line (without its newline) -> a Request, an ErrorResponse to send,
    or None (blank line, or a broken notification that must not be answered)."""
    line = line.strip()
    if not line:
        return None
    try:
        msg = loads_line(line)
    except ValueError as exc:
        return ErrorResponse(None, PARSE_ERROR, f"Parse error: {exc}")
    if isinstance(msg, list):
        why = "empty batch" if not msg else "batch requests are not supported"
        return ErrorResponse(None, INVALID_REQUEST, f"Invalid Request: {why}")
    if not isinstance(msg, dict):
        return ErrorResponse(None, INVALID_REQUEST, "Invalid Request: not a JSON object")
    notification = "id" not in msg
    rid = msg.get("id")
    if not _valid_id(rid):
        return ErrorResponse(None, INVALID_REQUEST, "Invalid Request: id must be a string, an integer or null")
    if msg.get("jsonrpc") != JSONRPC_VERSION:
        return ErrorResponse(rid, INVALID_REQUEST, 'Invalid Request: "jsonrpc" must be "2.0"')
    method = msg.get("method")
    if not isinstance(method, str) or not method:
        return ErrorResponse(rid, INVALID_REQUEST, 'Invalid Request: "method" must be a non-empty string')
    params = msg.get("params")
    if params is None:
        params = {}
    elif not isinstance(params, dict):
        if notification:
            return None
        if isinstance(params, list):
            return ErrorResponse(rid, INVALID_PARAMS,
                                 "Invalid params: params must be an object (by-name), not an array")
        return ErrorResponse(rid, INVALID_REQUEST, 'Invalid Request: "params" must be an object')
    return Request(method=method, params=params, id=rid, notification=notification)


class LineBuffer:
    """Splits a byte stream into lines of at most `max_line` bytes.

    `feed()` returns complete lines (without the newline) and, for a line
    that grows past the limit, one `None` marker; the rest of that line is
    discarded up to its newline, so memory stays bounded."""

    def __init__(self, max_line: int = MAX_LINE):
        self.max_line = max_line
        self._buf = bytearray()
        self._scanned = 0           # bytes of _buf known to hold no newline
        self._discarding = False

    def feed(self, data: bytes) -> list[bytes | None]:
        out: list[bytes | None] = []
        self._buf += data
        while True:
            nl = self._buf.find(b"\n", self._scanned)
            if nl < 0:
                if self._discarding:
                    self._buf.clear()
                elif len(self._buf) > self.max_line:
                    out.append(None)
                    self._buf.clear()
                    self._discarding = True
                self._scanned = len(self._buf)
                return out
            line = bytes(self._buf[:nl])
            del self._buf[:nl + 1]
            self._scanned = 0
            if self._discarding:
                self._discarding = False
            elif len(line) > self.max_line:
                out.append(None)
            else:
                out.append(line)

    def feed_eof(self) -> list[bytes | None]:
        """The stream ended: an unterminated last line counts as a line."""
        rest, discarding = bytes(self._buf), self._discarding
        self._buf.clear()
        self._scanned = 0
        self._discarding = False
        if discarding or not rest.strip():
            return []
        return [rest] if len(rest) <= self.max_line else [None]

    @property
    def pending(self) -> int:
        """Bytes buffered of an unfinished line."""
        return len(self._buf)


class RpcConnection:
    """The server side of one connection, without I/O."""

    def __init__(self, max_line: int = MAX_LINE):
        self.lines = LineBuffer(max_line)

    @property
    def max_line(self) -> int:
        return self.lines.max_line

    def _parse(self, lines: list[bytes | None]) -> list[Request | ErrorResponse]:
        out: list[Request | ErrorResponse] = []
        for line in lines:
            if line is None:
                out.append(ErrorResponse(None, INVALID_REQUEST,
                                         f"Invalid Request: line longer than {self.max_line} bytes"))
                continue
            item = parse_request(line)
            if item is not None:
                out.append(item)
        return out

    def feed(self, data: bytes) -> list[Request | ErrorResponse]:
        return self._parse(self.lines.feed(data))

    def feed_eof(self) -> list[Request | ErrorResponse]:
        return self._parse(self.lines.feed_eof())


@dataclass
class Response:
    id: int | str | None
    result: Any = None
    error: RpcError | None = None


@dataclass
class Notification:
    """A server-to-client message without an id (vfe.rpc.progress)."""
    method: str
    params: dict


def parse_response(line: bytes) -> Response | Notification:
    """One line from the server -> Response, or Notification (a "method" and
    no "id"); ValueError if it is neither in valid JSON-RPC 2.0."""
    msg = loads_line(line.strip())
    if not isinstance(msg, dict) or msg.get("jsonrpc") != JSONRPC_VERSION:
        raise ValueError("not a JSON-RPC 2.0 response")
    if "method" in msg and "id" not in msg:
        if not isinstance(msg["method"], str) or not isinstance(msg.get("params", {}), dict):
            raise ValueError("malformed notification")
        return Notification(msg["method"], msg.get("params", {}))
    rid = msg.get("id")
    if not _valid_id(rid) or "id" not in msg:
        raise ValueError("response without a valid id")
    if "error" in msg:
        err = msg["error"]
        if (not isinstance(err, dict) or not isinstance(err.get("code"), int)
                or isinstance(err.get("code"), bool) or not isinstance(err.get("message"), str)):
            raise ValueError("malformed error object")
        return Response(rid, error=RpcError(err["code"], err["message"], err.get("data")))
    if "result" not in msg:
        raise ValueError("response has neither result nor error")
    return Response(rid, result=msg["result"])
