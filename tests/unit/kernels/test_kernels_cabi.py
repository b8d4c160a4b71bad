"""The C entry points: called through ctypes at their .address, they must give
exactly what the @njit kernels give (results and bytes written)."""
import ctypes
import subprocess
import sys

import numpy as np
import pytest

from tests.unit.kernels import kframes as F
import vfe.kernels as K
from vfe.virtio import constants as VC

u8p = ctypes.POINTER(ctypes.c_uint8)
i32p = ctypes.POINTER(ctypes.c_int32)
i32 = ctypes.c_int32

PROTOS = {
    "finish_csum": ctypes.CFUNCTYPE(i32, u8p, i32, i32, i32),
    "gso_segment": ctypes.CFUNCTYPE(i32, u8p, i32, i32, i32, i32, i32, i32, u8p, i32, i32p,
                                    i32p, i32),
    "ipv4_header_ok": ctypes.CFUNCTYPE(i32, u8p, i32, i32),
    "ipv4_fix_csum": ctypes.CFUNCTYPE(i32, u8p, i32, i32),
    "toeplitz_hash": ctypes.CFUNCTYPE(ctypes.c_uint32, u8p, i32, u8p, i32),
}


@pytest.fixture(scope="module")
def c():
    addrs = K.kernel_addresses()
    return {name: proto(addrs[name]) for name, proto in PROTOS.items()}


def p8(a):
    return a.ctypes.data_as(u8p)


def p32(a):
    return a.ctypes.data_as(i32p)


def test_addresses_api():
    addrs = K.kernel_addresses()
    assert set(addrs) == set(PROTOS) == set(K.C_SIGNATURES)
    assert all(isinstance(v, int) and v > 0 for v in addrs.values())
    assert K.ADDRESSES is addrs                    # module-level dict, computed once
    assert K.kernel_addresses() is addrs
    cfs = K.kernel_cfuncs()
    assert {k: cf.address for k, cf in cfs.items()} == addrs
    assert K.C_SIGNATURES["finish_csum"] == (
        "int32_t finish_csum(uint8_t *frame, int32_t len, int32_t csum_start, "
        "int32_t csum_offset)")


def test_import_is_cheap():
    code = ("import sys, vfe.kernels as K; "
            "assert 'numba' not in sys.modules, 'numba imported'; "
            "assert K.E_BOUNDS == -1; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=str(__import__("pathlib").Path(K.__file__).parents[2]))
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_constants_match_virtio():
    assert K.GSO_NONE == VC.VIRTIO_NET_HDR_GSO_NONE
    assert K.GSO_TCPV4 == VC.VIRTIO_NET_HDR_GSO_TCPV4
    assert K.GSO_UDP == VC.VIRTIO_NET_HDR_GSO_UDP
    assert K.GSO_TCPV6 == VC.VIRTIO_NET_HDR_GSO_TCPV6
    assert K.GSO_ECN == VC.VIRTIO_NET_HDR_GSO_ECN
    codes = [K.E_BOUNDS, K.E_PARSE, K.E_SPACE, K.E_UNSUPPORTED, K.E_INVAL, K.E_SEGS, K.E_CSUM]
    assert len(set(codes)) == len(codes) and all(x < 0 for x in codes)
    assert set(K.ERROR_NAMES) == set(codes)


FINISH_CASES = [
    ("tcp4", lambda: F.tcp4_frame(F.payload_bytes(1500, 1))[:2], 16),
    ("tcp6", lambda: F.tcp6_frame(F.payload_bytes(777, 2))[:2], 16),
    ("udp4vlan", lambda: F.udp4_frame(F.payload_bytes(33, 3), vlan=9)[:2], 6),
]


@pytest.mark.parametrize("name,make,off", FINISH_CASES, ids=[x[0] for x in FINISH_CASES])
def test_finish_csum_parity(c, name, make, off):
    frame, l4 = make()
    a = F.buf(frame, 8)
    b = F.buf(frame, 8)
    assert c["finish_csum"](p8(a), len(frame), l4, off) == K.finish_csum(b, len(frame), l4, off) == 0
    assert (a == b).all()


@pytest.mark.parametrize("n,start,off", [(100, 98, 1), (100, -1, 16), (100, 34, -2),
                                         (10, 0x7FFFFFFF, 0x7FFFFFFF), (0, 0, 0)])
def test_finish_csum_bounds_parity(c, n, start, off):
    a = F.buf(bytes(100), 8)
    assert c["finish_csum"](p8(a), n, start, off) == K.finish_csum(a, n, start, off) == K.E_BOUNDS
    assert (a[:100] == 0).all() and (a[100:] == 0xA5).all()


def test_negative_len_via_c(c):
    a = F.buf(bytes(64))
    o = np.zeros(256, np.uint8)
    s = np.zeros(4, np.int32)
    assert c["finish_csum"](p8(a), -1, 0, 0) == K.E_BOUNDS
    assert c["ipv4_header_ok"](p8(a), -5, 14) == K.E_BOUNDS
    assert c["ipv4_fix_csum"](p8(a), -5, 14) == K.E_BOUNDS
    for n, cap, ms in [(-1, 256, 4), (64, -1, 4), (64, 256, -1)]:
        assert c["gso_segment"](p8(a), n, 1, 0, 100, -1, 0, p8(o), cap, p32(s), p32(s),
                                ms) == K.E_BOUNDS
    assert c["toeplitz_hash"](p8(a), -1, p8(a), 12) == 0
    assert c["toeplitz_hash"](p8(a), 40, p8(a), -1) == 0


def _gso_both(c, frame, gso_type, mss, cs, co=16, out_cap=None, max_segs=64):
    cap = out_cap if out_cap is not None else 2 * len(frame) + 4096
    res = []
    for use_c in (True, False):
        a = F.buf(frame)
        out = np.full(cap + 8, 0xA5, np.uint8)
        offs = np.full(max_segs + 1, -1, np.int32)
        lens = np.full(max_segs + 1, -1, np.int32)
        if use_c:
            rc = c["gso_segment"](p8(a), len(frame), gso_type, 0, mss, cs, co, p8(out), cap,
                                  p32(offs), p32(lens), max_segs)
        else:
            rc = K.gso_segment(a, len(frame), gso_type, 0, mss, cs, co, out, cap, offs, lens,
                               max_segs)
        res.append((rc, out, offs, lens))
    (rc1, o1, s1, l1), (rc2, o2, s2, l2) = res
    assert rc1 == rc2
    assert (o1 == o2).all() and (s1 == s2).all() and (l1 == l2).all()
    return rc1


def test_gso_parity_64k_ipv4(c):
    frame, l4, _ = F.tcp4_frame(F.payload_bytes(65536 - 66, 4), flags=0x19)
    assert _gso_both(c, frame, K.GSO_TCPV4, 1448, l4) == 46


def test_gso_parity_ipv6_vlan_ecn(c):
    frame, l4, _ = F.tcp6_frame(F.payload_bytes(20000, 5), vlan=77, flags=0x98)
    assert _gso_both(c, frame, K.GSO_TCPV6 | K.GSO_ECN, 1440, l4) == 14


def test_gso_parity_errors(c):
    frame, l4, _ = F.tcp4_frame(F.payload_bytes(5000, 6))
    assert _gso_both(c, frame, K.GSO_TCPV4, 1000, l4, out_cap=1000) == K.E_SPACE
    assert _gso_both(c, frame, K.GSO_TCPV4, 1000, l4, max_segs=2) == K.E_SEGS
    assert _gso_both(c, frame, K.GSO_TCPV4, 0, l4) == K.E_INVAL
    assert _gso_both(c, frame, K.GSO_UDP, 1000, l4) == K.E_UNSUPPORTED
    assert _gso_both(c, frame, K.GSO_TCPV6, 1000, l4) == K.E_PARSE
    assert _gso_both(c, frame[:40], K.GSO_TCPV4, 1000, l4) == K.E_PARSE


def test_ipv4_helpers_parity(c):
    frame, _, _ = F.tcp4_frame(b"z" * 20, vlan=1)
    a = F.buf(frame)
    assert c["ipv4_header_ok"](p8(a), len(frame), 18) == 0
    a[26] = 1                                     # TTL
    assert c["ipv4_header_ok"](p8(a), len(frame), 18) == K.E_CSUM == K.ipv4_header_ok(
        a, len(frame), 18)
    b = a.copy()
    assert c["ipv4_fix_csum"](p8(a), len(frame), 18) == 0 == K.ipv4_fix_csum(b, len(frame), 18)
    assert (a == b).all() and c["ipv4_header_ok"](p8(a), len(frame), 18) == 0


def test_toeplitz_parity(c):
    rng = np.random.default_rng(9)
    key = rng.integers(0, 256, 40, dtype=np.uint8)
    for n in (4, 8, 12, 36, 40):
        data = rng.integers(0, 256, n, dtype=np.uint8)
        h = c["toeplitz_hash"](p8(key), 40, p8(data), n)
        assert h == K.toeplitz_hash(key, 40, data, n) == F.toeplitz_ref(key.tobytes(),
                                                                          data.tobytes())
