"""vfe.rpc.server + vfe.rpc.client over a real Unix socket.

The server runs in a thread with a selector loop shaped like the daemon's:
it dispatches keys whose data[0] == "rpc" to `obj.on_readable()` and has
other registrations (a stop pipe) in the same selector."""
import errno
import json
import logging
import os
import select
import selectors
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from vfe.rpc import (
    INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND, PARSE_ERROR,
    RpcClient, RpcConnectionError, RpcError, RpcServer, call, method_table,
)
from tests.harness.unprivileged import NOBODY, SETPRIV, exchange_nobody, needs_root, public_dir
from vfe.rpc.protocol import encode_request
from vfe.safepath import UnsafePath


class Loop:
    """The daemon's selector loop, in a thread."""

    def __init__(self, path, handler, **kw):
        self.sel = selectors.DefaultSelector()
        self._r, self._w = os.pipe()
        self.sel.register(self._r, selectors.EVENT_READ, ("stop", None))
        self.server = RpcServer(path, handler, self.sel, **kw)
        self.stopping = False
        self.crashed: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            while not self.stopping:
                for key, _ in self.sel.select(1.0):
                    kind, obj = key.data
                    if kind == "rpc":
                        obj.on_readable()
                    elif kind == "stop":
                        os.read(self._r, 64)
        except BaseException as exc:       # the server must never kill the loop
            self.crashed.append(exc)
            raise

    def stop(self):
        self.stopping = True
        os.write(self._w, b"x")
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.server.close()
        self.sel.close()
        os.close(self._r)
        os.close(self._w)
        assert not self.crashed, self.crashed


class Methods:
    def __init__(self):
        self.calls = []

    def __call__(self, method, params):
        self.calls.append((method, params))
        if method == "echo":
            return params
        if method == "list":
            return [{"vuid": f"VNETS0D0F{i}", "pf_id": i} for i in range(params.get("n", 2))]
        if method == "big":
            return "x" * params["size"]
        if method == "fail":
            raise RpcError(-19, "no such device: pf 7", {"pf": 7})
        if method == "crash":
            raise ZeroDivisionError("division by zero")
        if method == "crash_empty":
            raise KeyError()
        if method == "unserializable":
            return {"obj": object()}
        if method == "none":
            return None
        raise RpcError.method_not_found(method)


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "run" / "virtnet" / "virtnet.sock")


@pytest.fixture
def server(sock_path):
    methods = Methods()
    loop = Loop(sock_path, methods)
    loop.methods = methods
    loop.path = sock_path
    yield loop
    loop.stop()


def raw_connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s


def read_lines(sock, n):
    buf = b""
    while buf.count(b"\n") < n:
        data = sock.recv(65536)
        if not data:
            break
        buf += data
    return [json.loads(line) for line in buf.splitlines() if line.strip()]


# -- basics ---------------------------------------------------------------------------

def test_call_returns_result_in_order(server):
    assert call(server.path, "echo", {"b": 1, "a": [1, 2], "c": None}) == {"b": 1, "a": [1, 2], "c": None}
    assert list(call(server.path, "echo", {"z": 1, "a": 2})) == ["z", "a"]
    assert call(server.path, "list") == [{"vuid": "VNETS0D0F0", "pf_id": 0}, {"vuid": "VNETS0D0F1", "pf_id": 1}]
    assert call(server.path, "none", {}) is None
    assert server.methods.calls[2] == ("list", {})


def test_socket_file_mode_and_parent_dir(server):
    st = os.stat(server.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600                 # root's only
    run_dir = os.stat(os.path.dirname(server.path))
    assert stat.S_IMODE(run_dir.st_mode) == 0o755 and run_dir.st_uid == os.geteuid()


def test_custom_mode(tmp_path):
    loop = Loop(str(tmp_path / "s.sock"), Methods(), mode=0o640)
    try:
        assert stat.S_IMODE(os.stat(tmp_path / "s.sock").st_mode) == 0o640
    finally:
        loop.stop()


def test_run_dir_writable_by_others_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    os.chmod(run, 0o777)                    # anyone could swap the socket for their own
    with pytest.raises(UnsafePath) as ei:
        RpcServer(str(run / "virtnet.sock"), Methods(), selectors.DefaultSelector())
    assert str(ei.value) == (f"RPC socket directory {run}: the directory {run} is writable by others "
                             f"(its group and everyone, mode 0777), so another user could replace what "
                             f"is there; run `chmod go-w {run}` or use a directory only root can write")
    assert not (run / "virtnet.sock").exists()


# -- who may call ----------------------------------------------------------------------

@needs_root()
def test_unprivileged_peer_is_refused_even_through_an_open_socket():
    """The socket made connectable by everyone (a misconfiguration, or an
    fd handed on): SO_PEERCRED still keeps uid 65534 out."""
    with public_dir() as d:
        methods = Methods()
        loop = Loop(str(d / "s.sock"), methods, mode=0o666)
        try:
            r = exchange_nobody(loop.server.path, encode_request(1, "echo", {"x": 1}).decode())
            assert r.returncode == 0, r.stderr
            lines = r.stdout.splitlines()
            assert len(lines) == 1, r.stdout             # one answer, then the server hung up
            err = json.loads(lines[0])
            assert err["id"] is None and err["error"]["code"] == -errno.EACCES
            assert err["error"]["message"].startswith(
                "permission denied: virtio-net-controller serves root only, not uid 65534, pid ")
            assert methods.calls == []                   # nothing it sent was run
            assert call(loop.server.path, "echo", {"ok": 1}) == {"ok": 1}     # root still is served
        finally:
            loop.stop()


@needs_root()
def test_client_does_not_talk_to_a_server_run_by_another_user():
    listener = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1]); s.listen(4)
print("ready", flush=True)
c, _ = s.accept()
c.sendall(b'{"jsonrpc": "2.0", "id": 1, "result": "fake"}\n')
sys.stdin.read()
"""
    with public_dir(owner=NOBODY) as d:
        path = str(d / "fake.sock")
        proc = subprocess.Popen([*SETPRIV, sys.executable, "-c", listener, path], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline() == "ready\n"
            with pytest.raises(RpcConnectionError) as ei:
                call(path, "list")
            assert ei.value.code == -errno.EPERM
            assert ei.value.message.startswith(f"the process serving {path} runs as uid 65534")
        finally:
            proc.stdin.close()
            proc.kill()
            proc.wait()


def test_application_error_passes_through(server):
    with pytest.raises(RpcError) as ei:
        call(server.path, "fail")
    assert (ei.value.code, ei.value.message, ei.value.data) == (-19, "no such device: pf 7", {"pf": 7})
    assert not isinstance(ei.value, RpcConnectionError)


def test_method_not_found(server):
    with pytest.raises(RpcError) as ei:
        call(server.path, "update_start")
    assert ei.value.code == METHOD_NOT_FOUND and "update_start" in ei.value.message


def test_method_table_handler(tmp_path):
    loop = Loop(str(tmp_path / "t.sock"), method_table({"list": lambda p: ["a"], "log": lambda p: p["level"]}))
    try:
        assert call(loop.server.path, "list") == ["a"]
        assert call(loop.server.path, "log", {"level": "debug"}) == "debug"
        with pytest.raises(RpcError) as ei:
            call(loop.server.path, "hotplug", {})
        assert ei.value.code == METHOD_NOT_FOUND
    finally:
        loop.stop()


def test_handler_exception_is_internal_error_logged_and_server_lives(server, caplog):
    with caplog.at_level(logging.ERROR, logger="vfe.rpc"):
        with pytest.raises(RpcError) as ei:
            call(server.path, "crash")
    assert ei.value.code == INTERNAL_ERROR
    assert ei.value.message == "division by zero"
    assert ei.value.data == {"exception": "ZeroDivisionError"}
    assert any("crash" in r.getMessage() and r.exc_info for r in caplog.records)
    with pytest.raises(RpcError) as ei:
        call(server.path, "crash_empty")
    assert ei.value.code == INTERNAL_ERROR and ei.value.message == "KeyError"
    assert call(server.path, "echo", {"still": "alive"}) == {"still": "alive"}


def test_unserializable_result_is_internal_error(server):
    with pytest.raises(RpcError) as ei:
        call(server.path, "unserializable")
    assert ei.value.code == INTERNAL_ERROR and "not JSON-serializable" in ei.value.message
    assert call(server.path, "echo", {}) == {}


def test_several_calls_on_one_client_connection(server):
    with RpcClient(server.path, timeout=5) as c:
        for i in range(20):
            assert c.call("echo", {"i": i}) == {"i": i}
        with pytest.raises(RpcError):
            c.call("fail")
        assert c.call("echo", {"after": "error"}) == {"after": "error"}


# -- bad clients ----------------------------------------------------------------------

def test_garbage_gets_parse_error_then_connection_still_works(server):
    s = raw_connect(server.path)
    s.sendall(b"this is not json\n" + b'{"jsonrpc":"2.0","id":1,"method":"list","params":[1]}\n'
              + b"[]\n" + encode_request(2, "echo", {"ok": 1}))
    r = read_lines(s, 4)
    assert [x["error"]["code"] for x in r[:3]] == [PARSE_ERROR, INVALID_PARAMS, INVALID_REQUEST]
    assert [x["id"] for x in r[:3]] == [None, 1, None]
    assert r[3] == {"jsonrpc": "2.0", "id": 2, "result": {"ok": 1}}
    s.close()


def test_pipelined_requests_answered_in_order(server):
    s = raw_connect(server.path)
    s.sendall(b"".join(encode_request(i, "echo", {"i": i}) for i in range(500)))
    r = read_lines(s, 500)
    assert [x["id"] for x in r] == list(range(500))
    assert all(x["result"] == {"i": x["id"]} for x in r)
    s.close()


def test_byte_by_byte_client(server):
    s = raw_connect(server.path)
    for b in encode_request(1, "echo", {"slow": True}):
        s.send(bytes([b]))
    assert read_lines(s, 1)[0]["result"] == {"slow": True}
    s.close()


def test_notification_gets_no_reply(server):
    s = raw_connect(server.path)
    s.sendall(b'{"jsonrpc":"2.0","method":"echo","params":{"n":1}}\n' + encode_request(5, "echo", {}))
    r = read_lines(s, 1)
    assert r == [{"jsonrpc": "2.0", "id": 5, "result": {}}]
    assert ("echo", {"n": 1}) in server.methods.calls
    s.close()


def test_half_closed_client_still_gets_answers(server):
    s = raw_connect(server.path)
    s.sendall(encode_request(1, "echo", {"a": 1}) + encode_request(2, "echo", {"b": 2})[:-1])
    s.shutdown(socket.SHUT_WR)          # the last line has no newline: EOF ends it
    r = read_lines(s, 2)
    assert [x["id"] for x in r] == [1, 2]
    assert s.recv(10) == b""            # then the server closes
    s.close()


def test_disconnects_and_unfinished_lines_do_not_affect_others(server):
    idle = raw_connect(server.path)
    idle.sendall(b'{"jsonrpc":"2.0","id":1,"meth')          # never finished
    gone = raw_connect(server.path)
    gone.sendall(encode_request(1, "big", {"size": 4 << 20}))
    gone.close()                                             # leaves before its answer
    rst = raw_connect(server.path)
    rst.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    rst.sendall(b'{"jsonrpc":"2.0"')
    rst.close()
    for i in range(10):
        assert call(server.path, "echo", {"i": i}) == {"i": i}
    idle.close()
    deadline = time.monotonic() + 5
    while server.server.clients and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not server.server.clients                         # every connection was reaped


def test_endless_line_is_bounded_and_reported(tmp_path):
    loop = Loop(str(tmp_path / "s.sock"), Methods(), max_line=4096)
    try:
        s = raw_connect(loop.server.path)
        for _ in range(64):
            s.sendall(b"a" * 4096)          # 256 KiB without a newline
        assert call(loop.server.path, "echo", {"other": 1}) == {"other": 1}
        s.sendall(b"\n" + encode_request(2, "echo", {"after": 1}))
        r = read_lines(s, 2)
        assert r[0]["error"]["code"] == INVALID_REQUEST and "4096" in r[0]["error"]["message"]
        assert r[1]["result"] == {"after": 1}
        s.close()
    finally:
        loop.stop()


def test_client_that_does_not_read_does_not_block_others(server):
    hog = raw_connect(server.path)
    # many big answers, never read: the server must buffer/back off, not block
    hog.sendall(b"".join(encode_request(i, "big", {"size": 1 << 20}) for i in range(40)))
    deadline = time.monotonic() + 5
    while not any(c.events == selectors.EVENT_WRITE for c in list(server.server.clients)):
        assert time.monotonic() < deadline     # waiting for the socket to drain
        time.sleep(0.01)
    hogged = next(iter(server.server.clients))
    assert len(hogged.out) < 3 << 20 and hogged.pending       # backs off instead of buffering 40 MiB
    t0 = time.monotonic()
    for i in range(5):
        assert call(server.path, "echo", {"i": i}, timeout=5) == {"i": i}
    assert time.monotonic() - t0 < 5
    # the hog still gets everything once it reads
    got = 0
    buf = bytearray()
    while got < 40:
        data = hog.recv(1 << 20)
        assert data
        got += data.count(b"\n")
        buf += data
    assert [json.loads(x)["id"] for x in buf.splitlines()] == list(range(40))
    hog.close()


def test_concurrent_clients(server):
    errors = []

    def worker(n):
        try:
            with RpcClient(server.path, timeout=10) as c:
                for i in range(50):
                    assert c.call("echo", {"w": n, "i": i}) == {"w": n, "i": i}
                    if i % 10 == 0:
                        with pytest.raises(RpcError):
                            c.call("fail")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors


def test_max_clients(tmp_path):
    loop = Loop(str(tmp_path / "s.sock"), Methods(), max_clients=2)
    try:
        a, b = raw_connect(loop.server.path), raw_connect(loop.server.path)
        a.sendall(encode_request(1, "echo", {}))
        b.sendall(encode_request(1, "echo", {}))
        read_lines(a, 1), read_lines(b, 1)
        with pytest.raises(RpcError) as ei:
            call(loop.server.path, "echo", {})     # answered -EBUSY and closed at once
        assert ei.value.code == -errno.EBUSY
        assert ei.value.message == "virtio-net-controller is serving 2 clients, its limit: try again later"
        # the same when the server has hung up before the client sent anything
        # (its send fails with EPIPE): the answer waiting to be read still counts
        late = RpcClient(loop.server.path)
        try:
            assert select.select([late.sock], [], [], 5)[0]
            time.sleep(0.1)                        # and closed
            with pytest.raises(RpcError) as ei:
                late.call("echo", {})
            assert ei.value.code == -errno.EBUSY
        finally:
            late.close()
        a.close()
        deadline = time.monotonic() + 5
        while len(loop.server.clients) > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert call(loop.server.path, "echo", {"ok": 1}) == {"ok": 1}
        b.close()
    finally:
        loop.stop()


# -- socket file lifecycle ------------------------------------------------------------

def test_close_removes_socket_and_drops_clients(sock_path):
    loop = Loop(sock_path, Methods())
    s = raw_connect(sock_path)
    loop.stop()
    assert not os.path.exists(sock_path)
    assert s.recv(10) == b""
    s.close()


def test_close_leaves_a_replaced_socket_alone(sock_path):
    loop = Loop(sock_path, Methods())
    os.unlink(sock_path)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(sock_path)
    loop.stop()
    assert os.path.exists(sock_path)
    other.close()


def test_stale_socket_is_replaced(sock_path):
    os.makedirs(os.path.dirname(sock_path))
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)
    stale.close()                   # file left behind, nobody listening
    loop = Loop(sock_path, Methods())
    try:
        assert call(sock_path, "echo", {"x": 1}) == {"x": 1}
    finally:
        loop.stop()


def test_live_socket_is_not_stolen(server):
    with pytest.raises(OSError) as ei:
        RpcServer(server.path, Methods(), selectors.DefaultSelector())
    assert ei.value.errno == errno.EADDRINUSE
    assert call(server.path, "echo", {}) == {}


def test_regular_file_is_not_replaced(tmp_path):
    p = tmp_path / "virtnet.sock"
    p.write_text("keep me")
    with pytest.raises(FileExistsError):
        RpcServer(str(p), Methods(), selectors.DefaultSelector())
    assert p.read_text() == "keep me"


def test_too_long_path(tmp_path):
    with pytest.raises(OSError) as ei:
        RpcServer(str(tmp_path / ("x" * 120)), Methods(), selectors.DefaultSelector())
    assert ei.value.errno == errno.ENAMETOOLONG


def test_own_selector_and_poll(tmp_path):
    path = str(tmp_path / "p.sock")
    with RpcServer(path, Methods()) as srv:
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("r", call(path, "echo", {"p": 1}, timeout=5)))
        t.start()
        deadline = time.monotonic() + 5
        while t.is_alive() and time.monotonic() < deadline:
            srv.poll(0.05)
        t.join()
        assert result["r"] == {"p": 1}
    assert not os.path.exists(path)


def test_poll_refused_on_shared_selector(server):
    with pytest.raises(RuntimeError):
        server.server.poll(0)


# -- client errors --------------------------------------------------------------------

def test_client_missing_socket(tmp_path):
    path = str(tmp_path / "nope.sock")
    with pytest.raises(RpcConnectionError) as ei:
        call(path, "list")
    assert ei.value.code == -errno.ENOENT
    assert str(ei.value) == f"is virtio-net-controller running? socket {path} not found"


def test_client_stale_socket(tmp_path):
    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()
    with pytest.raises(RpcConnectionError) as ei:
        call(path, "list")
    assert ei.value.code == -errno.ECONNREFUSED
    assert "is virtio-net-controller running?" in ei.value.message and path in ei.value.message


def _fake_listener(path, reply: bytes | None):
    """A listener that reads one request and answers `reply` (None: never, b"": close)."""
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(1)

    def serve():
        conn, _ = lsock.accept()
        conn.recv(65536)
        if reply is None:
            time.sleep(0.8)
        elif reply:
            conn.sendall(reply)
        conn.close()
        lsock.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def test_client_timeout(tmp_path):
    path = str(tmp_path / "slow.sock")
    t = _fake_listener(path, None)
    t0 = time.monotonic()
    with pytest.raises(RpcConnectionError) as ei:
        call(path, "list", timeout=0.2)
    assert ei.value.code == -errno.ETIMEDOUT and "no answer" in ei.value.message
    assert time.monotonic() - t0 < 0.7
    t.join()


def test_client_connection_closed_without_answer(tmp_path):
    path = str(tmp_path / "close.sock")
    t = _fake_listener(path, b"")
    with pytest.raises(RpcConnectionError) as ei:
        call(path, "list", timeout=5)
    assert ei.value.code == -errno.ECONNRESET and "closed the connection" in ei.value.message
    t.join()


@pytest.mark.parametrize("reply", [b"garbage\n", b'{"jsonrpc":"2.0","id":99,"result":1}\n'])
def test_client_bad_response(tmp_path, reply):
    path = str(tmp_path / "bad.sock")
    t = _fake_listener(path, reply)
    with pytest.raises(RpcConnectionError) as ei:
        call(path, "list", timeout=5)
    assert ei.value.code == -errno.EPROTO
    t.join()


def test_client_gets_null_id_error(tmp_path):
    path = str(tmp_path / "nullid.sock")
    t = _fake_listener(path, b'{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"Parse error"}}\n')
    with pytest.raises(RpcError) as ei:
        call(path, "list", timeout=5)
    assert ei.value.code == PARSE_ERROR and not isinstance(ei.value, RpcConnectionError)
    t.join()


def test_handler_closing_the_server_does_not_crash_the_loop(tmp_path):
    path = str(tmp_path / "bye.sock")
    holder = {}

    def handler(method, params):
        if method == "shutdown":
            holder["loop"].server.close()
            return "bye"
        return params

    holder["loop"] = loop = Loop(path, handler)
    try:
        other = raw_connect(path)
        with pytest.raises(RpcConnectionError) as ei:
            call(path, "shutdown")
        assert ei.value.code == -errno.ECONNRESET
        assert other.recv(10) == b""            # everyone was dropped
        other.close()
        assert not os.path.exists(path)
    finally:
        loop.stop()                             # also checks the loop did not crash
