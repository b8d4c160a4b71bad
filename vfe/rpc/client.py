"""A blocking JSON-RPC client for the controller's Unix socket (virtnet's side).

    result = call("/run/virtnet/virtnet.sock", "list")

Error responses raise `RpcError(code, message, data)`.  Failing to reach or
talk to the controller raises `RpcConnectionError` (a subclass, with a
negative errno as its code and a message saying what to check).
"""
from __future__ import annotations

import errno
import itertools
import os
import socket
import time
from typing import Any, Callable

from vfe.rpc.access import allowed, unix_peer
from vfe.rpc.progress import PROGRESS_METHOD, PROGRESS_PARAM
from vfe.rpc.protocol import MAX_LINE, LineBuffer, Notification, RpcError, encode_request, parse_response

# on_progress(done, total): what a long call reports while it runs (vfe.rpc.progress)
ProgressCallback = Callable[[int, int], None]

DEFAULT_TIMEOUT = 30.0


class RpcConnectionError(RpcError):
    """The controller could not be reached, timed out, or answered garbage."""


def _connect_error(path: str, exc: OSError) -> RpcConnectionError:
    if isinstance(exc, FileNotFoundError):
        return RpcConnectionError(-errno.ENOENT,
                                  f"is virtio-net-controller running? socket {path} not found")
    if isinstance(exc, ConnectionRefusedError):
        return RpcConnectionError(-errno.ECONNREFUSED,
                                  f"is virtio-net-controller running? nothing is listening on socket {path}")
    if isinstance(exc, PermissionError):
        return RpcConnectionError(-errno.EACCES,
                                  f"permission denied on socket {path}: virtio-net-controller serves root only")
    if isinstance(exc, TimeoutError):
        return RpcConnectionError(-errno.ETIMEDOUT,
                                  f"timed out connecting to virtio-net-controller on {path}")
    return RpcConnectionError(-(exc.errno or errno.EIO),
                              f"cannot connect to virtio-net-controller on {path}: {exc.strerror or exc}")


class RpcClient:
    """One connection; calls are sequential."""

    def __init__(self, path: str | os.PathLike, timeout: float = DEFAULT_TIMEOUT, max_line: int = MAX_LINE):
        self.path = os.fspath(path)
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._lines = LineBuffer(max_line)
        self._ready: list[bytes | None] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
        except OSError as exc:
            self.sock.close()
            raise _connect_error(self.path, exc) from None
        # what we send may be acted on as root and what comes back is
        # trusted (vfe-vhostd hands a VM's socket to the endpoint it names):
        # only a server running as root, or as ourselves, is one of ours
        server = unix_peer(self.sock)
        if not allowed(server):
            self.sock.close()
            raise RpcConnectionError(-errno.EPERM, f"the process serving {self.path} runs as "
                                                   f"{server or 'an unknown user'}, not root: not talking to it")

    def call(self, method: str, params: dict | None = None, timeout: float | None = None,
             on_progress: ProgressCallback | None = None) -> Any:
        """`method(params)`'s result.  With on_progress, the server is asked
        to report the call's progress, and each report is passed to it."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        rid = next(self._ids)
        if on_progress is not None:
            params = {**(params or {}), PROGRESS_PARAM: True}
        try:
            self.sock.settimeout(timeout)
            try:
                self.sock.sendall(encode_request(rid, method, params))
            except (BrokenPipeError, ConnectionResetError):
                pass            # refused and closed at once: its answer may be waiting (read below)
            while True:
                line = self._next_line(deadline)
                if line is None:
                    raise RpcConnectionError(-errno.EMSGSIZE, "virtio-net-controller sent an oversized response")
                if not line.strip():
                    continue
                try:
                    resp = parse_response(line)
                except ValueError as exc:
                    raise RpcConnectionError(-errno.EPROTO,
                                             f"bad response from virtio-net-controller: {exc}") from None
                if isinstance(resp, Notification):
                    if on_progress is not None and resp.method == PROGRESS_METHOD:
                        _progress(on_progress, resp.params, rid)
                    continue                  # anything else a server may tell: not ours to act on
                if resp.id != rid and not (resp.id is None and resp.error is not None):
                    raise RpcConnectionError(-errno.EPROTO,
                                             f"response for request {resp.id!r}, expected {rid}")
                if resp.error is not None:
                    raise resp.error
                return resp.result
        except TimeoutError:
            raise RpcConnectionError(-errno.ETIMEDOUT,
                                     f"no answer from virtio-net-controller on {self.path} "
                                     f"within {timeout:g} s") from None
        except (BrokenPipeError, ConnectionResetError):
            raise RpcConnectionError(-errno.ECONNRESET,
                                     "virtio-net-controller closed the connection before answering") from None
        except RpcError:
            raise
        except OSError as exc:
            raise RpcConnectionError(-(exc.errno or errno.EIO),
                                     f"talking to virtio-net-controller on {self.path}: {exc}") from None

    def _next_line(self, deadline: float) -> bytes | None:
        while not self._ready:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self.sock.settimeout(remaining)
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionResetError
            self._ready.extend(self._lines.feed(data))
        return self._ready.pop(0)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RpcClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _progress(on_progress: ProgressCallback, params: dict, rid: int) -> None:
    """Pass a well-formed report of our call on; ignore any other."""
    done, total = params.get("done"), params.get("total")
    if params.get("id") == rid and all(type(v) is int and v >= 0 for v in (done, total)):
        on_progress(done, total)


def call(path: str | os.PathLike, method: str, params: dict | None = None,
         timeout: float = DEFAULT_TIMEOUT, on_progress: ProgressCallback | None = None) -> Any:
    """Connect, call `method(params)`, return its result; raises RpcError."""
    with RpcClient(path, timeout) as client:
        return client.call(method, params, on_progress=on_progress)
