"""vfe-vhostd's JSON-RPC (vfe/vhostd/rpc.py): the stream splitter, request
validation with the reference's error codes and texts, and a live server --
on a Unix socket and an ephemeral TCP port -- driven by the daemon's loop in
a thread: who it serves (root only, on both), and the caps on clients and on
what one client may make it buffer."""
from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import stat
import threading
import time

import pytest

from tests.harness.unprivileged import exchange_nobody, needs_root, public_dir
from vfe.vhostd.rpc import (INTERNAL_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, PARSE_ERROR, PERMISSION_DENIED,
                            TOO_MANY_CLIENTS, JsonStream, ParseError, RpcServer, dispatch)


def test_stream_splits_objects_across_and_within_chunks():
    s = JsonStream()
    text = b'{"a": "}{\\"", "b": [1, {"c": 2}]}  \n{"d": 1}[1]'
    out = []
    for i in range(len(text)):                     # byte by byte
        out += s.feed(text[i:i + 1])
    assert out == [{"a": '}{"', "b": [1, {"c": 2}]}, {"d": 1}, [1]]
    assert JsonStream().feed(text) == out          # all at once
    assert JsonStream().feed(b"   ") == []


@pytest.mark.parametrize("bad", [b"x", b"5", b'"s"', b"{'a': 1}", b'{"a": tru}', b"\xff{}"])
def test_stream_parse_errors(bad):
    with pytest.raises(ParseError):
        JsonStream().feed(bad)


def test_stream_size_limit():
    s = JsonStream(max_size=100)
    with pytest.raises(ParseError):
        s.feed(b'{"a": "' + b"x" * 200)


def test_dispatch_validation():
    methods = {"m": lambda p, i: {"p": p, "id": i}, "boom": lambda p, i: 1 / 0}
    assert dispatch(methods, {"jsonrpc": "2.0", "method": "m", "id": 3, "params": {"x": 1}}) == \
        {"jsonrpc": "2.0", "result": {"p": {"x": 1}, "id": 3}, "id": 3}
    assert dispatch(methods, {"method": "m", "id": "s"})["result"] == {"p": {}, "id": "s"}
    inv = {"jsonrpc": "2.0", "error": {"code": INVALID_REQUEST,
                                       "message": "The JSON sent is not a valid Request object."}, "id": None}
    for bad in ([], [{"method": "m"}], {"method": 1, "id": 1}, {"id": 1}, {"method": "m", "params": 3, "id": 1},
                {"method": "m", "id": True}, {"method": "m", "id": {}}):
        assert dispatch(methods, bad) == inv
    assert dispatch(methods, {"method": "nope", "id": 4}) == \
        {"jsonrpc": "2.0", "error": {"code": METHOD_NOT_FOUND, "message": "Method not found."}, "id": 4}
    assert dispatch(methods, {"method": "boom", "id": 5})["error"] == {"code": INTERNAL_ERROR,
                                                                       "message": "Internal error."}
    assert dispatch(methods, {"method": "m"}) is None          # a notification
    assert dispatch(methods, {"method": "nope"}) is None


class Served:
    """A vfe-vhostd RPC server (Unix socket + TCP) in a loop thread."""

    def __init__(self, path: str, methods: dict | None = None, **kw):
        self.sel = selectors.DefaultSelector()
        self.calls: list = []
        base = {"echo": self._echo, "big": lambda p, i: {"x": "y" * p.get("n", 3_000_000)}}
        self.srv = RpcServer(self.sel, dict(base, **(methods or {})), path=path, tcp=("127.0.0.1", 0), **kw)
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _echo(self, p, i):
        self.calls.append(p)
        return p

    def _loop(self):
        while not self.stop_flag.is_set():
            for key, _ in self.sel.select(0.05):
                key.data()

    def stop(self):
        self.stop_flag.set()
        self.thread.join(5)
        self.srv.close()
        self.sel.close()


@pytest.fixture
def served(tmp_path):
    s = Served(str(tmp_path / "run" / "vhostd.sock"))
    yield s
    s.stop()


@pytest.fixture
def server(served):
    return served.srv


def connect(srv) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=5)


def connect_unix(srv) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(srv.path)
    return s


def read_objects(s: socket.socket, n: int) -> list:
    dec = json.JSONDecoder()
    buf, out = "", []
    while len(out) < n:
        data = s.recv(1 << 20)
        if not data:
            break
        buf += data.decode()
        while True:
            buf = buf.lstrip()
            try:
                obj, end = dec.raw_decode(buf)
            except ValueError:
                break
            out.append(obj)
            buf = buf[end:]
    return out


def test_server_answers_each_request_on_one_connection(server):
    s = connect(server)
    try:
        s.sendall(b'{"jsonrpc": "2.0", "method": "echo", "id": 1, "params": {"a": 1}}'
                  b'{"jsonrpc": "2.0", "method": "echo", "id": 2, "params": {"b": "}"}}')
        r = read_objects(s, 2)
        assert [x["result"] for x in r] == [{"a": 1}, {"b": "}"}] and [x["id"] for x in r] == [1, 2]
        for piece in (b'{"method": "ec', b'ho", "id": 3,', b' "params": {}}'):
            s.sendall(piece)
            time.sleep(0.02)
        assert read_objects(s, 1)[0]["id"] == 3
        s.sendall(b'{"method": "nope", "id": 4}')
        assert read_objects(s, 1)[0]["error"] == {"code": METHOD_NOT_FOUND, "message": "Method not found."}
        s.sendall(b'{"method": "big", "id": 5}')     # larger than any socket buffer
        assert len(read_objects(s, 1)[0]["result"]["x"]) == 3_000_000
    finally:
        s.close()


def test_parse_error_answers_and_closes(server):
    s = connect(server)
    try:
        s.sendall(b'{"method": "echo", "id": 1} garbage')
        r = read_objects(s, 2)
        assert r[0]["id"] == 1
        assert r[1] == {"jsonrpc": "2.0", "error": {"code": PARSE_ERROR, "message":
                        "Parse error. Invalid JSON was received by the server."}, "id": None}
        assert s.recv(10) == b""
    finally:
        s.close()
    s = connect(server)                                  # the server goes on
    s.sendall(b'{"method": "echo", "id": 9, "params": {}}')
    assert read_objects(s, 1)[0]["id"] == 9
    s.close()


def test_unix_socket_answers_like_tcp(server):
    s = connect_unix(server)
    try:
        s.sendall(b'{"jsonrpc": "2.0", "method": "echo", "id": 1, "params": {"a": 1}}')
        assert read_objects(s, 1) == [{"jsonrpc": "2.0", "result": {"a": 1}, "id": 1}]
    finally:
        s.close()
    st = os.stat(server.path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(server.path)).st_mode) == 0o755


def test_close_removes_the_socket(tmp_path):
    s = Served(str(tmp_path / "vhostd.sock"))
    s.stop()
    assert not os.path.exists(tmp_path / "vhostd.sock")


# -- who is served --------------------------------------------------------------------

REQUEST = '{"jsonrpc": "2.0", "method": "echo", "id": 1, "params": {"vfdev": "0000:90:00.0"}}'


def refusal_of(out: str) -> dict:
    assert not out.endswith("(still open)"), out
    objs = read_all(out)
    assert len(objs) == 1, out                  # one answer, nothing run, then closed
    assert objs[0]["id"] is None
    return objs[0]["error"]


def read_all(text: str) -> list:
    dec, out = json.JSONDecoder(), []
    text = text.strip()
    while text:
        obj, end = dec.raw_decode(text)
        out.append(obj)
        text = text[end:].strip()
    return out


@needs_root()
def test_unprivileged_tcp_caller_is_refused(tmp_path, caplog):
    s = Served(str(tmp_path / "vhostd.sock"))
    try:
        with caplog.at_level(logging.WARNING, "vfe.vhostd.rpc"):
            r = exchange_nobody(f"tcp:{s.srv.port}", REQUEST)
        assert r.returncode == 0, r.stderr
        assert refusal_of(r.stdout) == {"code": PERMISSION_DENIED, "message":
                                        "Permission denied: vfe-vhostd serves root only, not uid 65534."}
        assert s.calls == []
        assert "refused uid 65534 on the TCP: vfe-vhostd serves root only" in caplog.text
        c = connect(s.srv)                         # root still is served
        c.sendall(REQUEST.encode())
        assert read_objects(c, 1)[0]["result"] == {"vfdev": "0000:90:00.0"}
        c.close()
    finally:
        s.stop()


@needs_root()
def test_unprivileged_unix_caller_is_refused_even_through_an_open_socket():
    """The socket's mode keeps others out; made connectable by everyone (by
    hand, or an fd handed on), SO_PEERCRED still does."""
    with public_dir() as d:
        s = Served(str(d / "vhostd.sock"), mode=0o666)
        try:
            r = exchange_nobody(s.srv.path, REQUEST)
            assert r.returncode == 0, r.stderr
            assert refusal_of(r.stdout)["code"] == PERMISSION_DENIED
            assert s.calls == []
        finally:
            s.stop()


@needs_root()
def test_the_socket_mode_keeps_others_out():
    with public_dir() as d:
        s = Served(str(d / "vhostd.sock"))
        try:
            r = exchange_nobody(s.srv.path, REQUEST)
            assert r.returncode == 1 and "PermissionError: [Errno 13] Permission denied" in r.stderr
        finally:
            s.stop()


def test_a_caller_whose_uid_cannot_be_proven_is_refused(served, monkeypatch):
    from vfe.rpc import access
    monkeypatch.setattr(access, "_find", lambda *a: None)     # as if the peer were not in the table
    c = connect(served.srv)
    c.sendall(REQUEST.encode())
    objs = read_objects(c, 1)
    assert objs[0]["error"] == {"code": PERMISSION_DENIED, "message": "Permission denied: vfe-vhostd serves "
                                "root only, not a caller whose uid cannot be proven."}
    assert_disconnected(c)
    c.close()
    assert served.calls == []


# -- caps -----------------------------------------------------------------------------

def test_clients_beyond_the_cap_are_refused(tmp_path):
    s = Served(str(tmp_path / "vhostd.sock"), max_clients=2)
    try:
        held = [connect_unix(s.srv), connect(s.srv)]
        for c in held:                                # both served, and kept open
            c.sendall(REQUEST.encode())
            assert read_objects(c, 1)[0]["id"] == 1
        third = connect_unix(s.srv)
        _send_quietly(third, REQUEST.encode())          # it may be closed already
        assert read_objects(third, 1)[0]["error"] == {
            "code": TOO_MANY_CLIENTS, "message": "Too many clients: vfe-vhostd serves 2 at a time."}
        assert_disconnected(third)
        third.close()
        held.pop().close()                            # a slot frees up
        deadline = time.monotonic() + 5
        while len(s.srv.clients) > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        again = connect(s.srv)
        again.sendall(REQUEST.encode())
        assert read_objects(again, 1)[0]["result"] == {"vfdev": "0000:90:00.0"}
        again.close()
        held[0].close()
    finally:
        s.stop()


def test_a_client_that_never_reads_buffers_a_bounded_amount(tmp_path):
    """200 requests for 100 kB answers each, none of them read: the server
    stops answering (and reading) that client's requests once max_output of
    its answers wait, so it holds about that much -- not 20 MB.  Everyone
    else is still served."""
    answered = []
    s = Served(str(tmp_path / "vhostd.sock"), {"big": lambda p, i: answered.append(i) or {"x": "y" * 100_000}},
               max_output=256 * 1024)
    greedy = connect_unix(s.srv)
    greedy.settimeout(None)
    req = b'{"jsonrpc": "2.0", "method": "big", "id": 1, "params": {"n": 100000}}'
    sender = threading.Thread(target=lambda: _send_quietly(greedy, req * 200), daemon=True)
    try:
        sender.start()
        deadline = time.monotonic() + 10
        while not s.srv.clients or len(next(iter(s.srv.clients)).out) < 256 * 1024:
            assert time.monotonic() < deadline, "the server never queued its answers"
            time.sleep(0.01)
        time.sleep(0.5)                                   # time to grow, if it were going to
        (client,) = s.srv.clients
        assert 256 * 1024 <= len(client.out) <= 256 * 1024 + 100_100   # one answer past the mark at most
        assert len(answered) < 20                         # the rest wait, unanswered, for it to read
        other = connect(s.srv)
        other.sendall(REQUEST.encode())
        assert read_objects(other, 1)[0]["result"] == {"vfdev": "0000:90:00.0"}
        other.close()
    finally:
        s.stop()                                          # closes the server's end: the sender fails
        sender.join(5)
        greedy.close()


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass


def assert_disconnected(c: socket.socket) -> None:
    try:
        assert c.recv(10) == b""
    except ConnectionResetError:          # the server closed with our request unread
        pass


def test_an_endless_request_is_cut_at_max_request(tmp_path):
    s = Served(str(tmp_path / "vhostd.sock"), max_request=64 * 1024)
    try:
        c = connect_unix(s.srv)
        c.sendall(b'{"jsonrpc": "2.0", "method": "echo", "id": 1, "params": {"x": "' + b"y" * 200_000)
        objs = read_objects(c, 1)
        assert objs[0]["error"]["code"] == PARSE_ERROR
        assert_disconnected(c)
        c.close()
        assert s.srv.clients == set()
    finally:
        s.stop()
