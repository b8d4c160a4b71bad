"""vfe.rpc.protocol: newline-delimited JSON-RPC 2.0 framing and validation."""
import errno
import json

import pytest

from vfe.rpc.protocol import (
    INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND, PARSE_ERROR,
    ErrorResponse, LineBuffer, Request, RpcConnection, RpcError, encode_error,
    encode_request, encode_result, parse_request, parse_response,
)


def req(id=1, method="list", params=None, **extra) -> bytes:
    msg = {"jsonrpc": "2.0", "id": id, "method": method}
    if params is not None:
        msg["params"] = params
    msg.update(extra)
    return json.dumps(msg).encode() + b"\n"


# -- framing --------------------------------------------------------------------------

def test_whole_request():
    items = RpcConnection().feed(req(7, "query", {"pf": 0, "vf": None}))
    assert items == [Request(method="query", params={"pf": 0, "vf": None}, id=7)]


def test_byte_by_byte():
    conn = RpcConnection()
    data = req(1, "hotplug", {"mac": "0C:C4:7A:FF:22:93", "mtu": 1500}) + req("two", "list")
    got = []
    for i in range(len(data)):
        got += conn.feed(data[i:i + 1])
    assert [(r.id, r.method) for r in got] == [(1, "hotplug"), ("two", "list")]
    assert got[0].params == {"mac": "0C:C4:7A:FF:22:93", "mtu": 1500}


def test_many_requests_in_one_chunk_and_split_across_chunks():
    conn = RpcConnection()
    data = b"".join(req(i) for i in range(100))
    a, b = conn.feed(data[:1234]), conn.feed(data[1234:])
    assert [r.id for r in a + b] == list(range(100))


def test_crlf_blank_lines_and_whitespace_are_tolerated():
    conn = RpcConnection()
    data = b"\n\r\n   \n" + req(1).rstrip(b"\n") + b"\r\n" + b"  " + req(2)
    assert [r.id for r in conn.feed(data)] == [1, 2]


def test_params_key_order_is_kept():
    params = {"z": 1, "a": 2, "m": 3}
    (r,) = RpcConnection().feed(req(1, "x", params))
    assert list(r.params) == ["z", "a", "m"]


def test_missing_params_is_empty_dict():
    (r,) = RpcConnection().feed(req(1, "list"))
    assert r.params == {} and not r.notification
    (r,) = RpcConnection().feed(b'{"jsonrpc":"2.0","id":1,"method":"list","params":null}\n')
    assert r.params == {}


@pytest.mark.parametrize("line", [
    b"garbage", b"{", b'{"jsonrpc": "2.0", "id": 1', b"\xff\xfe\x00", b"[[[" * 100000,
    b'{"jsonrpc":"2.0","id":1,"method":"x","params":{"v":NaN}}', b"1" * 5000,
])
def test_garbage_is_a_parse_error_and_the_connection_goes_on(line):
    conn = RpcConnection()
    items = conn.feed(line + b"\n" + req(5))
    assert isinstance(items[0], ErrorResponse)
    assert items[0].code == PARSE_ERROR and items[0].id is None
    assert items[1] == Request(method="list", id=5)


@pytest.mark.parametrize("obj, code, rid", [
    ([], INVALID_REQUEST, None),
    ([{"jsonrpc": "2.0", "id": 1, "method": "list"}], INVALID_REQUEST, None),
    (42, INVALID_REQUEST, None),
    ("list", INVALID_REQUEST, None),
    ({"jsonrpc": "2.0", "id": {"x": 1}, "method": "list"}, INVALID_REQUEST, None),
    ({"jsonrpc": "2.0", "id": True, "method": "list"}, INVALID_REQUEST, None),
    ({"jsonrpc": "2.0", "id": 1.5, "method": "list"}, INVALID_REQUEST, None),
    ({"jsonrpc": "1.0", "id": 3, "method": "list"}, INVALID_REQUEST, 3),
    ({"id": 3, "method": "list"}, INVALID_REQUEST, 3),
    ({"jsonrpc": "2.0", "id": 3}, INVALID_REQUEST, 3),
    ({"jsonrpc": "2.0", "id": 3, "method": ""}, INVALID_REQUEST, 3),
    ({"jsonrpc": "2.0", "id": 3, "method": 12}, INVALID_REQUEST, 3),
    ({"jsonrpc": "2.0", "id": 3, "method": "list", "params": [1, 2]}, INVALID_PARAMS, 3),
    ({"jsonrpc": "2.0", "id": 3, "method": "list", "params": "x"}, INVALID_REQUEST, 3),
])
def test_invalid_requests(obj, code, rid):
    (item,) = RpcConnection().feed(json.dumps(obj).encode() + b"\n")
    assert isinstance(item, ErrorResponse)
    assert (item.code, item.id) == (code, rid)
    assert item.message


def test_string_and_null_ids_are_valid():
    assert parse_request(req("abc")).id == "abc"
    r = parse_request(req(None))
    assert r.id is None and not r.notification


def test_notification_has_no_id():
    (r,) = RpcConnection().feed(b'{"jsonrpc":"2.0","method":"log","params":{"level":"info"}}\n')
    assert r.notification and r.method == "log"
    # a broken notification is not answered at all
    assert RpcConnection().feed(b'{"jsonrpc":"2.0","method":"log","params":[1]}\n') == []


def test_oversize_line_in_one_chunk():
    conn = RpcConnection(max_line=100)
    big = req(1, "x", {"pad": "a" * 200})
    items = conn.feed(big + req(2))
    assert isinstance(items[0], ErrorResponse) and items[0].code == INVALID_REQUEST
    assert "longer than 100 bytes" in items[0].message
    assert items[1].id == 2


def test_oversize_line_arriving_slowly_is_discarded_with_bounded_memory():
    conn = RpcConnection(max_line=100)
    errors = conn.feed(b"x" * 150)
    assert len(errors) == 1 and errors[0].code == INVALID_REQUEST
    for _ in range(1000):           # the rest of the endless line
        assert conn.feed(b"y" * 1000) == []
        assert conn.lines.pending <= 100
    items = conn.feed(b"zzz\n" + req(9))    # its end, then a good request
    assert [getattr(i, "id", None) for i in items] == [9]


def test_line_of_exactly_max_line_is_accepted():
    pad = 100 - len(req(1, "x", {"p": ""})[:-1])
    line = req(1, "x", {"p": "a" * pad})[:-1]
    assert len(line) == 100
    (r,) = RpcConnection(max_line=100).feed(line + b"\n")
    assert isinstance(r, Request)


def test_feed_eof_takes_an_unterminated_last_line():
    conn = RpcConnection()
    assert conn.feed(req(1)[:-1]) == []
    (r,) = conn.feed_eof()
    assert r.id == 1
    assert RpcConnection().feed_eof() == []


def test_linebuffer_returns_none_marker_for_too_long():
    lb = LineBuffer(max_line=4)
    assert lb.feed(b"ab\nabcdefg\ncd\n") == [b"ab", None, b"cd"]


# -- encoding -------------------------------------------------------------------------

def test_encode_result_is_one_line_and_keeps_key_order():
    out = encode_result(3, {"bdf": "85:00.0", "vuid": "VNETS1D0F0", "id": 3})
    assert out.endswith(b"\n") and out.count(b"\n") == 1
    msg = json.loads(out)
    assert msg == {"jsonrpc": "2.0", "id": 3, "result": {"bdf": "85:00.0", "vuid": "VNETS1D0F0", "id": 3}}
    assert list(msg["result"]) == ["bdf", "vuid", "id"]


def test_encode_result_rejects_what_json_cannot_carry():
    with pytest.raises(TypeError):
        encode_result(1, {"x": object()})
    with pytest.raises(ValueError):
        encode_result(1, float("nan"))


def test_encode_error_with_and_without_data():
    assert json.loads(encode_error(1, METHOD_NOT_FOUND, "Method not found: foo")) == {
        "jsonrpc": "2.0", "id": 1, "error": {"code": -32601, "message": "Method not found: foo"}}
    msg = json.loads(encode_error(None, -19, "no such device", {"pf": 4}))
    assert msg["error"] == {"code": -19, "message": "no such device", "data": {"pf": 4}}


def test_encode_error_never_raises():
    msg = json.loads(encode_error(2, INTERNAL_ERROR, "boom", {"obj": object()}))
    assert msg["error"]["code"] == INTERNAL_ERROR and isinstance(msg["error"]["data"], str)


def test_error_response_encode():
    out = ErrorResponse(None, PARSE_ERROR, "Parse error: x").encode()
    assert json.loads(out)["error"]["code"] == -32700


def test_request_response_round_trip():
    (r,) = RpcConnection().feed(encode_request(11, "modify", {"pf": 0, "mac": "0C:C4:7A:FF:22:98"}))
    assert (r.id, r.method, r.params) == (11, "modify", {"pf": 0, "mac": "0C:C4:7A:FF:22:98"})
    resp = parse_response(encode_result(11, [1, 2]))
    assert (resp.id, resp.result, resp.error) == (11, [1, 2], None)
    resp = parse_response(encode_error(11, -16, "device is migrating", {"vuid": "X"}))
    assert resp.error.code == -16 and resp.error.message == "device is migrating"
    assert resp.error.data == {"vuid": "X"}
    assert parse_response(encode_result(1, None)).result is None


@pytest.mark.parametrize("line", [
    b"nope", b"[]", b'{"jsonrpc":"2.0","result":1}', b'{"jsonrpc":"1.0","id":1,"result":1}',
    b'{"jsonrpc":"2.0","id":1}', b'{"jsonrpc":"2.0","id":1,"error":{"code":"x","message":"m"}}',
    b'{"jsonrpc":"2.0","id":1,"error":{"code":1}}', b'{"jsonrpc":"2.0","id":1,"error":"bad"}',
])
def test_parse_response_rejects_malformed(line):
    with pytest.raises(ValueError):
        parse_response(line)


def test_rpc_error():
    e = RpcError.from_errno(errno.ENODEV, "no such device: pf 9", {"pf": 9})
    assert (e.code, e.message, e.data, str(e)) == (-19, "no such device: pf 9", {"pf": 9},
                                                  "no such device: pf 9")
    assert RpcError.method_not_found("update_start").code == METHOD_NOT_FOUND
    assert RpcError.invalid_params("mtu").code == INVALID_PARAMS
