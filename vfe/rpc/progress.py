"""Progress of a long call, told to its caller while the call runs.

A method that works through many items (sriov_numvfs creating 504 VFs)
calls ``report(done, total)`` after each.  When the caller asked for
progress (the request's params carry ``"progress": true``, which the server
takes out before the method sees them), the server has installed a sink for
the duration of the call that sends the caller JSON-RPC notifications

    {"jsonrpc": "2.0", "method": "progress", "params": {"id": ID, "done": K, "total": N}}

ahead of the response; otherwise ``report`` does nothing.  It is a context
variable, not an argument, so the methods' signatures stay the RPC's.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator

Sink = Callable[[int, int], None]

_sink: contextvars.ContextVar[Sink | None] = contextvars.ContextVar("vfe_rpc_progress", default=None)

PROGRESS_PARAM = "progress"        # in a request's params: send progress notifications
PROGRESS_METHOD = "progress"       # the notifications' method


def report(done: int, total: int) -> None:
    """``done`` of ``total`` items finished (a no-op outside a call that asked)."""
    sink = _sink.get()
    if sink is not None:
        sink(done, total)


@contextlib.contextmanager
def reporting(sink: Sink) -> Iterator[None]:
    """Send what ``report`` says to ``sink`` while the block runs."""
    token = _sink.set(sink)
    try:
        yield
    finally:
        _sink.reset(token)
