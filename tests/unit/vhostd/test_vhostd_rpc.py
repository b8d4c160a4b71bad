"""vfe-vhostd's JSON-RPC over TCP (vfe/vhostd/rpc.py): the stream splitter,
request validation with the reference's error codes and texts, and a live
server on an ephemeral port driven by the daemon's loop in a thread."""
from __future__ import annotations

import json
import selectors
import socket
import threading
import time

import pytest

from vfe.vhostd.rpc import (INTERNAL_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, PARSE_ERROR, JsonStream,
                            ParseError, RpcServer, dispatch)


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


@pytest.fixture
def server():
    sel = selectors.DefaultSelector()
    methods = {"echo": lambda p, i: p, "big": lambda p, i: {"x": "y" * 3_000_000}}
    srv = RpcServer(sel, methods, "127.0.0.1", 0)
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            for key, _ in sel.select(0.05):
                key.data()
    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield srv
    stop.set()
    t.join(5)
    srv.close()
    sel.close()


def connect(srv) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
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
