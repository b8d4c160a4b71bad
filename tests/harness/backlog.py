"""A unix-socket listener that never accepts, with its backlog full: what a
local user (or a wedged process) can leave on a path a daemon connects to.
A blocking connect() to it sleeps until it accepts -- forever.

    with full_backlog(path) as stuck:
        ...                      # connects to `path` get EAGAIN (non-blocking) or hang
        stuck.drain()            # accept and drop the queued ones: room again

Also ``finishes(fn, timeout)``: run ``fn`` in a thread and report whether it
returned in time, for tests of code that used to hang (the thread is left
to end by itself once the listener is closed).
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
from typing import Any, Callable


class FullBacklog:
    def __init__(self, path: str):
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(0)
        self.queued: list[socket.socket] = []
        while True:                           # fill it: connect until the kernel says EAGAIN
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            try:
                s.connect(path)
            except BlockingIOError:
                s.close()
                break
            self.queued.append(s)
            if len(self.queued) > 64:
                raise RuntimeError("the backlog never filled")

    def drain(self) -> None:
        """Accept (and close) what is queued: the next connect gets in."""
        self.listener.setblocking(False)
        while True:
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                break
            conn.close()
        for s in self.queued:
            s.close()
        self.queued = []

    def accept(self, timeout: float) -> socket.socket | None:
        self.listener.settimeout(timeout)
        try:
            return self.listener.accept()[0]
        except (TimeoutError, socket.timeout):
            return None

    def close(self) -> None:
        for s in self.queued:
            s.close()
        self.listener.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


@contextlib.contextmanager
def full_backlog(path: str):
    stuck = FullBacklog(path)
    try:
        yield stuck
    finally:
        stuck.close()


def finishes(fn: Callable[[], Any], timeout: float) -> tuple[bool, Any]:
    """(returned in time, its result or exception)."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:          # handed to the caller
            out["result"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    return not t.is_alive(), out.get("result")
