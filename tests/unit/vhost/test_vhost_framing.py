"""FrameAssembler: bytes in, messages out (whole, byte by byte, with trailing data)."""
import pytest

from vfe.vhost.framing import MAX_PAYLOAD_SIZE, FrameAssembler, encode_message, encode_reply
from vfe.vhost.messages import (
    Config, MemoryRegion, MemTable, Message, ProtocolError, Request, U64, VringAddr, VringState,
)

CASES = [
    ("get_features", Request.GET_FEATURES, 0x1, b""),
    ("set_features", Request.SET_FEATURES, 0x1, U64(1 << 32).encode()),
    ("need_reply", Request.SET_VRING_NUM, 0x9, VringState(0, 256).encode()),
    ("vring_addr", Request.SET_VRING_ADDR, 0x1, VringAddr(1, 0, 0x1000, 0x3000, 0x2000, 0).encode()),
    ("mem_table", Request.SET_MEM_TABLE, 0x1,
     MemTable((MemoryRegion(0, 1 << 20, 0x7F0000000000, 0),)).encode()),
    ("config_max", Request.GET_CONFIG, 0x1, Config(0, 4096, 0, bytes(4096)).encode()),
    ("unknown_id", 1234, 0x1, b"\xff" * 5),
    ("reply", Request.GET_FEATURES, 0x5, U64(7).encode()),
]


def _stream(cases):
    return b"".join(encode_message(r, p, f) for _, r, f, p in cases)


def _expected(cases):
    return [Message(int(r), f, p, ()) for _, r, f, p in cases]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_whole(case):
    fa = FrameAssembler()
    assert fa.feed(_stream([case])) == _expected([case])
    assert fa.at_boundary


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_byte_by_byte(case):
    fa = FrameAssembler()
    out = []
    data = _stream([case])
    for i in range(len(data)):
        got = fa.feed(data[i:i + 1])
        if i < len(data) - 1:
            assert got == []
        out += got
    assert out == _expected([case]) and fa.at_boundary


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_with_trailing_data(case):
    fa = FrameAssembler()
    trailing = encode_message(Request.SET_VRING_BASE, VringState(1, 5).encode())[:15]
    assert fa.feed(_stream([case]) + trailing) == _expected([case])
    assert not fa.at_boundary and fa.buffered == 15
    rest = encode_message(Request.SET_VRING_BASE, VringState(1, 5).encode())[15:]
    assert fa.feed(rest) == [Message(Request.SET_VRING_BASE, 1, VringState(1, 5).encode())]


def test_all_cases_in_one_chunk_and_random_splits():
    import random
    data = _stream(CASES)
    rnd = random.Random(1)
    for _ in range(20):
        fa, out, i = FrameAssembler(), [], 0
        while i < len(data):
            n = rnd.randint(1, 600)
            out += fa.feed(data[i:i + n])
            i += n
        assert out == _expected(CASES)


def test_fds_go_to_the_last_header_in_the_chunk():
    # Linux glues fd-less sends before an fd-carrying one into one read.
    a = encode_message(Request.SET_STATUS, U64(8).encode())
    b = encode_message(Request.SET_MEM_TABLE, MemTable((MemoryRegion(0, 4096, 4096, 0),)).encode())
    fa = FrameAssembler()
    out = fa.feed(a + b, [7])
    assert [m.fds for m in out] == [(), (7,)]


def test_fds_with_a_partial_message():
    a = encode_message(Request.SET_VRING_KICK, U64(0).encode())
    fa = FrameAssembler()
    assert fa.feed(a[:3], [9]) == []            # header starts here: fds are a's
    assert fa.feed(a[3:]) == [Message(Request.SET_VRING_KICK, 1, U64(0).encode(), (9,))]


def test_fds_byte_by_byte_on_the_header_start():
    a = encode_message(Request.SET_VRING_CALL, U64(0).encode())
    b = encode_message(Request.SET_VRING_KICK, U64(1).encode())
    fa = FrameAssembler()
    out = []
    data = a + b
    for i in range(len(data)):
        out += fa.feed(data[i:i + 1], [5] if i == len(a) else [])
    assert [m.fds for m in out] == [(), (5,)]


def test_fds_in_a_chunk_that_starts_mid_message_and_starts_the_next():
    a = encode_message(Request.SET_VRING_ADDR, bytes(40))
    b = encode_message(Request.SET_VRING_KICK, U64(1).encode())
    fa = FrameAssembler()
    assert fa.feed(a[:20]) == []
    out = fa.feed(a[20:] + b[:4], [11])          # b's header starts here
    assert [m.fds for m in out] == [()]
    assert fa.feed(b[4:])[0].fds == (11,)


def test_fds_in_a_chunk_with_no_header_start_go_to_the_message_in_progress():
    a = encode_message(Request.SET_VRING_ADDR, bytes(40))
    fa = FrameAssembler()
    fa.feed(a[:20])
    out = fa.feed(a[20:30], [4]) + fa.feed(a[30:])
    assert out[0].fds == (4,)


def test_oversized_payload_is_rejected_and_fds_are_kept_for_closing():
    ok = encode_message(Request.SET_VRING_KICK, U64(0).encode())
    big = encode_message(Request.SET_CONFIG, b"")[:8] + (MAX_PAYLOAD_SIZE + 1).to_bytes(4, "little")
    fa = FrameAssembler()
    with pytest.raises(ProtocolError, match="exceeds"):
        fa.feed(ok + big, [3, 4])
    assert sorted(fa.take_pending_fds()) == [3, 4]
    with pytest.raises(ProtocolError):           # stays failed
        fa.feed(ok, [5])
    assert fa.take_pending_fds() == [5]


def test_max_payload_is_accepted():
    fa = FrameAssembler()
    m = fa.feed(encode_message(Request.GET_CONFIG, bytes(MAX_PAYLOAD_SIZE)))
    assert len(m[0].payload) == MAX_PAYLOAD_SIZE


def test_encode_reply_flags():
    data = encode_reply(Request.GET_VRING_BASE, VringState(1, 2).encode())
    assert data[4:8] == (5).to_bytes(4, "little")
    assert data[8:12] == (8).to_bytes(4, "little")


def test_message_properties():
    m = Message(Request.SET_FEATURES, 0x9, b"", ())
    assert m.need_reply and not m.is_reply and m.name == "SET_FEATURES"
    assert "SET_FEATURES" in repr(m)
