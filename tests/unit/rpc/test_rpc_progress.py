"""A long call's progress: notifications ahead of the reply when the caller
asks (and only then), passed to the client's callback; ProgressLine draws
them on a terminal and nothing elsewhere."""
import io
import json
import time

import pytest

from tests.unit.rpc.test_rpc_server import Loop, raw_connect, read_lines
from vfe.progressline import ProgressLine
from vfe.rpc import progress
from vfe.rpc.client import RpcClient, call
from vfe.rpc.protocol import encode_request


class Counting:
    """A method that works through `n` items, reporting each (as sriov_numvfs does)."""

    def __init__(self):
        self.params = []

    def __call__(self, method, params):
        self.params.append(dict(params))
        n = params["n"]
        for i in range(n):
            time.sleep(params.get("pause", 0))
            progress.report(i + 1, n)
        return {"made": n}


@pytest.fixture
def loop(tmp_path):
    methods = Counting()
    lp = Loop(str(tmp_path / "run" / "virtnet.sock"), methods)
    lp.methods = methods
    yield lp
    lp.stop()


def test_progress_reaches_the_callback_then_the_result(loop):
    seen = []
    assert call(loop.server.path, "make", {"n": 5, "pause": 0.12},
                on_progress=lambda d, t: seen.append((d, t))) == {"made": 5}
    assert seen[-1] == (5, 5)                       # the last report always goes
    assert len(seen) >= 3 and seen == sorted(seen)  # one per interval, in order
    assert loop.methods.params[-1] == {"n": 5, "pause": 0.12}   # the method never sees "progress"


def test_reports_are_rate_limited(loop):
    seen = []
    call(loop.server.path, "make", {"n": 2000}, on_progress=lambda d, t: seen.append(d))
    assert seen[-1] == 2000 and len(seen) < 50


def test_no_progress_unless_asked(loop):
    """A caller that did not ask (every older client) gets the reply only."""
    s = raw_connect(loop.server.path)
    s.sendall(encode_request(1, "make", {"n": 3, "pause": 0.12}))
    assert read_lines(s, 1) == [{"jsonrpc": "2.0", "id": 1, "result": {"made": 3}}]
    s.close()


def test_notifications_on_the_wire(loop):
    s = raw_connect(loop.server.path)
    s.sendall(encode_request(7, "make", {"n": 2, "progress": True}))
    lines = read_lines(s, 3)           # the first report, the last, the reply
    s.close()
    assert lines == [{"jsonrpc": "2.0", "method": "progress", "params": {"id": 7, "done": d, "total": 2}}
                     for d in (1, 2)] + [{"jsonrpc": "2.0", "id": 7, "result": {"made": 2}}]


def test_client_ignores_reports_that_are_not_its_calls(tmp_path):
    """Garbage or another call's id in a report does not reach the callback
    and does not break the call."""
    import socket
    import threading
    path = str(tmp_path / "s.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def serve():
        c, _ = srv.accept()
        req = json.loads(c.makefile("rb").readline())
        for params in ({"id": req["id"] + 1, "done": 1, "total": 2}, {"id": req["id"], "done": "x", "total": 2},
                       {"id": req["id"], "done": -1, "total": 2}, {"id": req["id"], "done": 1, "total": 2}):
            c.sendall((json.dumps({"jsonrpc": "2.0", "method": "progress", "params": params}) + "\n").encode())
        c.sendall((json.dumps({"jsonrpc": "2.0", "method": "other", "params": {}}) + "\n").encode())
        c.sendall((json.dumps({"jsonrpc": "2.0", "id": req["id"], "result": 42}) + "\n").encode())
        c.close()
    t = threading.Thread(target=serve)
    t.start()
    seen = []
    with RpcClient(path, 10) as client:
        assert client.call("x", {}, on_progress=lambda d, tot: seen.append((d, tot))) == 42
    t.join(10)
    srv.close()
    assert seen == [(1, 2)]


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_line_on_a_terminal():
    out = Tty()
    bar = ProgressLine("creating VFs", out)
    bar.update(12, 504)
    bar.update(504, 504)
    bar.step("done")
    bar.close()
    text = out.getvalue()
    assert "\rcreating VFs: 12/504 (2%)" in text and "\rcreating VFs: 504/504 (100%)" in text
    assert text.endswith("\r")                          # the line is blanked for what follows
    assert "\rcreating VFs: done" + " " * 6 in text     # a shorter text blanks the longer one's tail


def test_progress_line_silent_elsewhere():
    out = io.StringIO()
    bar = ProgressLine("creating VFs", out)
    bar.update(1, 2)
    bar.close()
    assert out.getvalue() == "" and not bar.active
