"""/metrics over HTTP, served on the daemon's selector loop (so the
collectors read the devices on the control thread, never racing it).

Only what Prometheus needs: ``GET /metrics`` (HTTP/1.0 or 1.1, the
response closes the connection); anything else is 404 or 405.  Any local
program can connect, so a client is held to the same rules as the RPC's:
a request head of at most MAX_REQUEST bytes, at most MAX_CLIENTS
connections (a new one closes those idle longer than IDLE_SECONDS first),
and one slow or silent client holds nothing but its own socket.
"""
from __future__ import annotations

import logging
import selectors
import socket
import time
from typing import Callable

log = logging.getLogger("vfe.metrics")

MAX_REQUEST = 8192
MAX_CLIENTS = 16
IDLE_SECONDS = 10.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"   # Prometheus' text format


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [addr]:port); ValueError with the reason."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: expected HOST:PORT, e.g. 127.0.0.1:9100")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host or "0.0.0.0", int(port)


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n")
    return head.encode() + body


class MetricsServer:
    """Listens on (host, port); ``render()`` gives the /metrics body."""

    def __init__(self, selector: selectors.BaseSelector, address: tuple[str, int],
                 render: Callable[[], bytes]):
        self.selector = selector
        self.render = render
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # a live update's new process binds the port while the old one
            # still serves it, until the old one exits
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            self.sock.bind(address)
            self.sock.listen(16)
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise
        self.address = self.sock.getsockname()[:2]
        self.clients: list[_Client] = []
        selector.register(self, selectors.EVENT_READ, ("http", self))

    def fileno(self) -> int:
        return self.sock.fileno()

    def on_readable(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("metrics: accept failed: %s", exc)
                return
            self._make_room()
            if len(self.clients) >= MAX_CLIENTS:
                conn.close()
                continue
            self.clients.append(_Client(self, conn))

    def _make_room(self) -> None:
        now = time.monotonic()
        for c in [c for c in self.clients if now - c.since > IDLE_SECONDS]:
            c.close()

    def close(self) -> None:
        for c in list(self.clients):
            c.close()
        try:
            self.selector.unregister(self)
        except (KeyError, ValueError, OSError):
            pass
        self.sock.close()


class _Client:
    def __init__(self, server: MetricsServer, conn: socket.socket):
        self.server = server
        self.sock = conn
        self.sock.setblocking(False)
        self.since = time.monotonic()
        self.head = bytearray()
        self.out = b""
        server.selector.register(self, selectors.EVENT_READ, ("http", self))

    def fileno(self) -> int:
        return self.sock.fileno()

    def on_readable(self) -> None:
        try:
            if self.out:
                self._flush()
                return
            data = self.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not data:
            self.close()
            return
        self.head += data
        if b"\r\n\r\n" not in self.head and b"\n\n" not in self.head:
            if len(self.head) > MAX_REQUEST:
                self._answer(_response("431 Request Header Fields Too Large", b"request too large\n"))
            return
        self._answer(self._respond(bytes(self.head).split(b"\n", 1)[0]))

    def _respond(self, request_line: bytes) -> bytes:
        parts = request_line.decode("latin-1").strip().split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _response("400 Bad Request", b"bad request\n")
        method, target = parts[0], parts[1].split("?", 1)[0]
        if target != "/metrics":
            return _response("404 Not Found", b"only /metrics is served here\n")
        if method != "GET":
            return _response("405 Method Not Allowed", b"GET /metrics\n")
        try:
            body = self.server.render()
        except Exception:                       # a collector's bug: the daemon keeps serving
            log.exception("metrics: collecting failed")
            return _response("500 Internal Server Error", b"collecting the metrics failed\n")
        return _response("200 OK", body, CONTENT_TYPE)

    def _answer(self, response: bytes) -> None:
        self.out = response
        try:
            self.server.selector.modify(self, selectors.EVENT_WRITE, ("http", self))
        except (KeyError, ValueError, OSError):
            self.close()
            return
        self._flush()

    def _flush(self) -> None:
        try:
            n = self.sock.send(self.out, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        self.out = self.out[n:]
        if not self.out:
            self.close()

    def close(self) -> None:
        try:
            self.server.selector.unregister(self)
        except (KeyError, ValueError, OSError):
            pass
        self.sock.close()
        if self in self.server.clients:
            self.server.clients.remove(self)
