"""finish_csum, ipv4_header_ok/ipv4_fix_csum and toeplitz_hash (the @njit versions)."""
import struct

import numpy as np
import pytest

from tests.unit.kernels import kframes as F
from vfe import kernels as K


def _finish(frame: bytes, csum_start: int, csum_offset: int, extra: int = 8):
    a = F.buf(frame, extra)
    rc = K.finish_csum(a, len(frame), csum_start, csum_offset)
    return rc, a


def _check_finished(a, frame, l4, off, ph):
    """The field validates, equals the reference, and nothing else changed."""
    n = len(frame)
    seg = a[l4:n].tobytes()
    assert F.ones_sum(ph + seg) == 0xFFFF
    zeroed = seg[:off] + b"\0\0" + seg[off + 2:]
    want = F.inet_csum(ph + zeroed) or 0xFFFF
    assert struct.unpack_from("!H", seg, off)[0] == want
    got = a[:n].tobytes()
    assert got[: l4 + off] == frame[: l4 + off] and got[l4 + off + 2:] == frame[l4 + off + 2:]
    assert (a[n:] == 0xA5).all(), "wrote past len"


@pytest.mark.parametrize("plen", [0, 1, 2, 3, 100, 1447, 1448, 9001])
@pytest.mark.parametrize("vlan", [None, 100])
def test_tcp4_partial(plen, vlan):
    frame, l4, ph = F.tcp4_frame(F.payload_bytes(plen, plen), vlan=vlan)
    rc, a = _finish(frame, l4, 16)
    assert rc == 0
    _check_finished(a, frame, l4, 16, ph)


@pytest.mark.parametrize("plen", [0, 5, 1440, 8000])
def test_tcp6_partial(plen):
    frame, l4, ph = F.tcp6_frame(F.payload_bytes(plen, 7 + plen))
    assert l4 == 54
    rc, a = _finish(frame, l4, 16)
    assert rc == 0
    _check_finished(a, frame, l4, 16, ph)


def test_tcp4_with_ip_options_and_vlan():
    frame, l4, ph = F.tcp4_frame(F.payload_bytes(333), vlan=7, ip_options=b"\x01\x01\x01\x00")
    assert l4 == 18 + 24
    rc, a = _finish(frame, l4, 16)
    assert rc == 0
    _check_finished(a, frame, l4, 16, ph)


@pytest.mark.parametrize("plen", [0, 1, 17, 512])
@pytest.mark.parametrize("vlan", [None, 42])
def test_udp4_partial(plen, vlan):
    frame, l4, ph = F.udp4_frame(F.payload_bytes(plen, 3 + plen), vlan=vlan)
    rc, a = _finish(frame, l4, 6)
    assert rc == 0
    _check_finished(a, frame, l4, 6, ph)


def test_udp6_partial():
    frame, l4, ph = F.udp6_frame(F.payload_bytes(99))
    rc, a = _finish(frame, l4, 6)
    assert rc == 0
    _check_finished(a, frame, l4, 6, ph)


def test_udp_zero_result_becomes_ffff():
    # Choose the last payload word so that the checksum comes out as 0.
    payload = bytearray(F.payload_bytes(64, 11))
    payload[-2:] = b"\0\0"
    frame, l4, ph = F.udp4_frame(bytes(payload))
    seg = frame[l4:]
    s = F.ones_sum(ph + seg[:6] + b"\0\0" + seg[8:])
    struct.pack_into("!H", payload, len(payload) - 2, 0xFFFF - s)
    frame, l4, ph = F.udp4_frame(bytes(payload))
    seg = frame[l4:]
    assert F.inet_csum(ph + seg[:6] + b"\0\0" + seg[8:]) == 0  # the case under test
    rc, a = _finish(frame, l4, 6)
    assert rc == 0
    assert struct.unpack_from("!H", a, l4 + 6)[0] == 0xFFFF
    _check_finished(a, frame, l4, 6, ph)


def test_odd_csum_start():
    # Words are aligned on csum_start, not on the buffer: shift everything by one byte.
    frame, l4, ph = F.tcp4_frame(F.payload_bytes(201))
    shifted = b"\x99" + frame
    rc, a = _finish(shifted, l4 + 1, 16)
    assert rc == 0
    assert F.ones_sum(ph + a[l4 + 1:len(shifted)].tobytes()) == 0xFFFF


def test_idempotent_when_field_refilled():
    frame, l4, ph = F.tcp4_frame(F.payload_bytes(1000))
    rc, a = _finish(frame, l4, 16)
    first = a.copy()
    a[l4 + 16:l4 + 18] = np.frombuffer(struct.pack("!H", F.ones_sum(ph)), np.uint8)
    assert K.finish_csum(a, len(frame), l4, 16) == 0
    assert (a == first).all()


@pytest.mark.parametrize("n,start,off", [
    (100, 98, 1),      # field would end at 101
    (100, 99, 0),      # field would end at 101
    (100, 100, 0),     # start at len
    (100, 200, 0),
    (100, -1, 16),
    (100, 34, -2),
    (-1, 0, 0),
    (1, 0, 0),
    (0, 0, 0),
    (100, 0x7FFFFFFF, 0x7FFFFFFF),   # int32 overflow must not wrap
])
def test_bounds(n, start, off):
    a = F.buf(bytes(max(n, 0)), 16)
    before = a.copy()
    assert K.finish_csum(a, n, start, off) == K.E_BOUNDS
    assert (a == before).all()


def test_len_beyond_array_is_bounds():
    a = F.buf(bytes(60))
    assert K.finish_csum(a, 61, 34, 16) == K.E_BOUNDS


def test_field_at_exact_end():
    a = F.buf(bytes(range(38)) + b"\0\0", 4)          # field holds a zero partial sum
    assert K.finish_csum(a, 40, 30, 8) == 0          # field = bytes 38..39
    assert F.ones_sum(a[30:40].tobytes()) == 0xFFFF
    assert (a[40:] == 0xA5).all()


# --- IPv4 header helpers -----------------------------------------------------
def test_ipv4_header_ok_and_fix():
    frame, l4, _ = F.tcp4_frame(b"x" * 10, vlan=5, ip_options=b"\x01\x01\x01\x00")
    a = F.buf(frame)
    l3 = 18
    assert K.ipv4_header_ok(a, len(frame), l3) == 0
    a[l3 + 8] ^= 1                                    # TTL changed: checksum stale
    assert K.ipv4_header_ok(a, len(frame), l3) == K.E_CSUM
    assert K.ipv4_fix_csum(a, len(frame), l3) == 0
    assert K.ipv4_header_ok(a, len(frame), l3) == 0
    assert F.ones_sum(a[l3:l4].tobytes()) == 0xFFFF
    want = F.ipv4_hdr(F.ip4("10.0.0.1"), F.ip4("10.0.0.2"), 6, 20 + 12 + 10, ttl=65,
                      options=b"\x01\x01\x01\x00")
    assert a[l3:l4].tobytes() == want


def test_ipv4_header_errors():
    frame, l4, _ = F.tcp4_frame(b"y" * 10)
    n = len(frame)
    a = F.buf(frame)
    assert K.ipv4_header_ok(a, n, -1) == K.E_BOUNDS
    assert K.ipv4_header_ok(a, 30, 14) == K.E_BOUNDS            # header cut
    assert K.ipv4_header_ok(a, n - 1, 14) == K.E_BOUNDS         # tot_len beyond len
    assert K.ipv4_header_ok(a, n + 1, 14) == K.E_BOUNDS         # len beyond array
    b = a.copy()
    b[14] = 0x65                                                # version 6
    assert K.ipv4_header_ok(b, n, 14) == K.E_PARSE
    assert K.ipv4_fix_csum(b, n, 14) == K.E_PARSE
    b[14] = 0x44                                                # IHL 4
    assert K.ipv4_header_ok(b, n, 14) == K.E_PARSE
    b = a.copy()
    b[16:18] = [0, 10]                                          # tot_len < IHL*4
    assert K.ipv4_header_ok(b, n, 14) == K.E_PARSE
    b = a.copy()
    b[14] = 0x4F                                                # IHL 15 = 60 bytes > len
    assert K.ipv4_header_ok(b, 50, 14) == K.E_BOUNDS


# --- Toeplitz ----------------------------------------------------------------
MS_KEY = bytes.fromhex("6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c"
                       "6a42b73bbeac01fa")

# Microsoft "Verifying the RSS Hash Calculation": (src, sport, dst, dport, ipv4, ipv4+tcp)
MS_V4 = [
    ("66.9.149.187", 2794, "161.142.100.80", 1766, 0x323E8FC2, 0x51CCC178),
    ("199.92.111.2", 14230, "65.69.140.83", 4739, 0xD718262A, 0xC626B0EA),
    ("24.19.198.95", 12898, "12.22.207.184", 38024, 0xD2D0A5DE, 0x5C2B394A),
    ("38.27.205.30", 48228, "209.142.163.6", 2217, 0x82989176, 0xAFC7327F),
    ("153.39.163.191", 44251, "202.188.127.2", 1303, 0x5D1809C5, 0x10E828A2),
]
MS_V6 = [
    ("3ffe:2501:200:1fff::7", 2794, "3ffe:2501:200:3::1", 1766, 0x2CC18CD5, 0x40207D3D),
]


def _u8(b: bytes) -> np.ndarray:
    return np.frombuffer(bytearray(b), dtype=np.uint8)


@pytest.mark.parametrize("src,sport,dst,dport,h_ip,h_tcp", MS_V4)
def test_toeplitz_ms_vectors_v4(src, sport, dst, dport, h_ip, h_tcp):
    ips = F.ip4(src) + F.ip4(dst)
    ports = struct.pack("!HH", sport, dport)
    key = _u8(MS_KEY)
    assert K.toeplitz_hash(key, 40, _u8(ips), 8) == h_ip
    assert K.toeplitz_hash(key, 40, _u8(ips + ports), 12) == h_tcp
    assert F.toeplitz_ref(MS_KEY, ips + ports) == h_tcp


@pytest.mark.parametrize("src,sport,dst,dport,h_ip,h_tcp", MS_V6)
def test_toeplitz_ms_vectors_v6(src, sport, dst, dport, h_ip, h_tcp):
    ips = F.ip6(src) + F.ip6(dst)
    ports = struct.pack("!HH", sport, dport)
    key = _u8(MS_KEY)
    assert K.toeplitz_hash(key, 40, _u8(ips), 32) == h_ip
    assert K.toeplitz_hash(key, 40, _u8(ips + ports), 36) == h_tcp


def test_toeplitz_random_against_reference():
    rng = np.random.default_rng(5)
    for klen, dlen in [(40, 12), (40, 36), (40, 37), (52, 40), (4, 3), (3, 2), (0, 5), (40, 0)]:
        key = rng.integers(0, 256, klen, dtype=np.uint8).tobytes()
        data = rng.integers(0, 256, dlen, dtype=np.uint8).tobytes()
        assert K.toeplitz_hash(_u8(key), klen, _u8(data), dlen) == F.toeplitz_ref(key, data)
    key = _u8(MS_KEY)
    assert K.toeplitz_hash(key, 40, _u8(b"abc"), -3) == 0
    assert K.toeplitz_hash(key, -1, _u8(b"abc"), 3) == 0


def test_random_lengths_and_starts_against_reference():
    rng = np.random.default_rng(21)
    for _ in range(300):
        n = int(rng.integers(2, 3000))
        start = int(rng.integers(0, n - 1))
        off = int(rng.integers(0, n - start - 1)) & ~1
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        a = F.buf(data, 4)
        assert K.finish_csum(a, n, start, off) == 0
        region = data[start:]
        zeroed = region[:off] + b"\0\0" + region[off + 2:]
        # the field's old content acts as the pseudo-header partial sum
        want = F.inet_csum(region[off:off + 2] + zeroed) or 0xFFFF
        assert struct.unpack_from("!H", a, start + off)[0] == want
        assert a[:start + off].tobytes() == data[:start + off]
        assert a[start + off + 2:n].tobytes() == data[start + off + 2:]
