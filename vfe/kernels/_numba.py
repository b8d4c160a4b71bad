"""Numba packet kernels: checksum completion, software TSO, IPv4 header, Toeplitz.

All numba code of vfe/kernels lives in this one file on purpose: numba's
on-disk cache (cache=True) is invalidated by the mtime/size of the file that
holds the cached function, and nothing else. A kernel that called an @njit
helper in another file would keep running the old helper's machine code after
that file changed. Keeping everything here makes "edit -> recompile" reliable.
For the same reason the constants the kernels use are literals in this file
(checked against vfe.kernels.codes at import).

Thread model: every kernel is reentrant and touches only the buffers it is
given. They run in the engine's poll-loop threads without the GIL, through the
C entry points built by ``build_cfuncs()``; the GIL is only ever taken on the
error path of numba's cfunc wrapper, which these kernels never reach: bounds
are checked by hand, error_model="numpy" removes the division-by-zero raise,
and the only other raise sites compiled in (numba's ``.view`` checks in
``_sum16``) cannot fire on an even-length slice of a contiguous array.
Nothing allocates: array slices and views are stack structs; ``carray`` has
no meminfo, so numba's incref/decref calls are null-pointer no-ops.

Byte order: header fields are network order and read/written byte by byte;
checksums sum native-endian words and swap at the end. Any alignment works.
"""
import sys
import threading

import numpy as np
from numba import carray, cfunc, njit, types

from . import codes as _codes

# --- constants (literals: see module docstring) ------------------------------
E_BOUNDS = -1
E_PARSE = -2
E_SPACE = -3
E_UNSUPPORTED = -4
E_INVAL = -5
E_SEGS = -6
E_CSUM = -7

GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80

for _name in _codes.__all__:
    if globals()[_name] != getattr(_codes, _name):  # pragma: no cover - guard
        raise ImportError(f"vfe.kernels._numba.{_name} disagrees with vfe.kernels.codes")

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
IPPROTO_TCP = 6

TCP_FIN = 0x01
TCP_PSH = 0x08
TCP_CWR = 0x80

_LITTLE = sys.byteorder == "little"   # baked into the (per-machine) cache

_JIT = dict(nogil=True, cache=True, error_model="numpy")


# --- byte helpers ------------------------------------------------------------
@njit(**_JIT)
def _rd16(b, i):
    return (np.int64(b[i]) << 8) | np.int64(b[i + 1])


@njit(**_JIT)
def _rd32(b, i):
    return ((np.int64(b[i]) << 24) | (np.int64(b[i + 1]) << 16)
            | (np.int64(b[i + 2]) << 8) | np.int64(b[i + 3]))


@njit(**_JIT)
def _wr16(b, i, v):
    b[i] = (v >> 8) & 0xFF
    b[i + 1] = v & 0xFF


@njit(**_JIT)
def _wr32(b, i, v):
    b[i] = (v >> 24) & 0xFF
    b[i + 1] = (v >> 16) & 0xFF
    b[i + 2] = (v >> 8) & 0xFF
    b[i + 3] = v & 0xFF


@njit(**_JIT)
def _copy(dst, d, src, s, n):
    # Through zero-based views so the loop index is provably non-negative and
    # LLVM turns it into a vectorised copy (with a runtime overlap check).
    dv = dst[d:d + n]
    sv = src[s:s + n]
    for k in range(n):
        dv[k] = sv[k]


# --- Internet checksum (RFC 1071) --------------------------------------------
@njit(**_JIT)
def _fold(s):
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return s


@njit(**_JIT)
def _sum16(b, start, end):
    """One's-complement sum of the big-endian 16-bit words of b[start:end], as
    a value to be added to other such sums and then folded (RFC 1071).

    Words are aligned on ``start``; an odd last byte is padded with zero.
    The words are summed in host byte order through a uint16 view (this
    vectorises; x86/arm64 allow the unaligned loads) and the folded sum is
    byte-swapped at the end, which RFC 1071 section 2(B) shows is equivalent.
    An int64 accumulator cannot overflow for any int32 length.
    """
    n = end - start
    if n <= 0:
        return np.int64(0)
    nw = n >> 1
    s = np.int64(0)
    if nw > 0:
        w = b[start:start + 2 * nw].view(np.uint16)
        for k in range(nw):
            s += w[k]
    if n & 1:
        if _LITTLE:
            s += b[end - 1]
        else:
            s += np.int64(b[end - 1]) << 8
    if _LITTLE:
        s = _fold(s)
        s = ((s & 0xFF) << 8) | (s >> 8)
    return s


@njit(**_JIT)
def finish_csum(frame, len, csum_start, csum_offset):
    """VIRTIO_NET_HDR_F_NEEDS_CSUM: checksum frame[csum_start:len] (the field at
    csum_start+csum_offset already holds the pseudo-header sum) and store the
    folded complement there, big-endian. 0 becomes 0xFFFF (as Linux's
    skb_checksum_help does; required for UDP, equivalent for TCP).
    Returns 0 or E_BOUNDS."""
    if len < 0 or len > frame.shape[0] or csum_start < 0 or csum_offset < 0:
        return E_BOUNDS
    pos = np.int64(csum_start) + np.int64(csum_offset)
    if pos + 2 > len:
        return E_BOUNDS
    c = (~_fold(_sum16(frame, np.int64(csum_start), np.int64(len)))) & 0xFFFF
    if c == 0:
        c = 0xFFFF
    _wr16(frame, pos, c)
    return 0


# --- IPv4 header --------------------------------------------------------------
@njit(**_JIT)
def _ipv4_hdr_len(frame, len, l3_off):
    """Header length of a well-formed IPv4 header at l3_off, or a negative code."""
    if len < 0 or len > frame.shape[0] or l3_off < 0:
        return E_BOUNDS
    if np.int64(l3_off) + 20 > len:
        return E_BOUNDS
    vihl = np.int64(frame[l3_off])
    ihl = (vihl & 0xF) * 4
    if (vihl >> 4) != 4 or ihl < 20:
        return E_PARSE
    if l3_off + ihl > len:
        return E_BOUNDS
    return ihl


@njit(**_JIT)
def ipv4_header_ok(frame, len, l3_off):
    """0 if frame[l3_off:] starts with a valid IPv4 header: version 4, IHL >= 5,
    header and total length inside len, total length >= header length and a
    header checksum that validates. Else E_BOUNDS, E_PARSE or E_CSUM."""
    ihl = _ipv4_hdr_len(frame, len, l3_off)
    if ihl < 0:
        return ihl
    tot = _rd16(frame, l3_off + 2)
    if tot < ihl:
        return E_PARSE
    if l3_off + tot > len:
        return E_BOUNDS
    if _fold(_sum16(frame, np.int64(l3_off), np.int64(l3_off) + ihl)) != 0xFFFF:
        return E_CSUM
    return 0


@njit(**_JIT)
def ipv4_fix_csum(frame, len, l3_off):
    """Recompute the header checksum of the IPv4 header at l3_off in place.
    Returns 0, E_BOUNDS or E_PARSE (not IPv4 / bad IHL)."""
    ihl = _ipv4_hdr_len(frame, len, l3_off)
    if ihl < 0:
        return ihl
    base = np.int64(l3_off)
    _wr16(frame, base + 10, 0)
    _wr16(frame, base + 10, (~_fold(_sum16(frame, base, base + ihl))) & 0xFFFF)
    return 0


# --- software TSO -----------------------------------------------------------
@njit(**_JIT)
def _is_ipv6_ext(nh):
    return (nh == 0 or nh == 43 or nh == 44 or nh == 50 or nh == 51 or nh == 60
            or nh == 135 or nh == 139 or nh == 140)


@njit(**_JIT)
def _parse_tcp_frame(frame, n, want_v4):
    """Ethernet [802.1Q] IPv4|IPv6 TCP. Returns (err, l3, l4, hdr_len)."""
    if n < 14:
        return E_PARSE, 0, 0, 0
    et = _rd16(frame, 12)
    l3 = np.int64(14)
    if et == ETH_P_8021Q or et == ETH_P_8021AD:
        if n < 18:
            return E_PARSE, 0, 0, 0
        et = _rd16(frame, 16)
        l3 = np.int64(18)
        if et == ETH_P_8021Q or et == ETH_P_8021AD:
            return E_UNSUPPORTED, 0, 0, 0
    if want_v4:
        if et != ETH_P_IP:
            return E_PARSE, 0, 0, 0
        ihl = _ipv4_hdr_len(frame, n, l3)
        if ihl < 0:
            return E_PARSE, 0, 0, 0
        if frame[l3 + 9] != IPPROTO_TCP:
            return E_PARSE, 0, 0, 0
        if _rd16(frame, l3 + 6) & 0x3FFF:       # MF or fragment offset: not a TSO frame
            return E_PARSE, 0, 0, 0
        l4 = l3 + ihl
    else:
        if et != ETH_P_IPV6:
            return E_PARSE, 0, 0, 0
        if l3 + 40 > n or (frame[l3] >> 4) != 6:
            return E_PARSE, 0, 0, 0
        nh = np.int64(frame[l3 + 6])
        if nh != IPPROTO_TCP:
            if _is_ipv6_ext(nh):
                return E_UNSUPPORTED, 0, 0, 0
            return E_PARSE, 0, 0, 0
        l4 = l3 + 40
    if l4 + 20 > n:
        return E_PARSE, 0, 0, 0
    doff = (np.int64(frame[l4 + 12]) >> 4) * 4
    if doff < 20 or l4 + doff > n:
        return E_PARSE, 0, 0, 0
    return 0, l3, l4, l4 + doff


@njit(**_JIT)
def gso_segment(frame, len, gso_type, hdr_len_hint, gso_size, csum_start, csum_offset,
                out, out_cap, seg_offsets, seg_lens, max_segs):
    """Software TSO of one linear frame into ``out`` (see docs/kernels.md).

    Returns the number of segments written (>= 1) or a negative code.
    hdr_len_hint is not trusted (virtio 5.1.6.2.2); headers are parsed.
    csum_start < 0 means "not given"; otherwise it must be the TCP header
    offset and csum_offset 16. frame and out must not overlap.
    """
    if len < 0 or len > frame.shape[0]:
        return E_BOUNDS
    if out_cap < 0 or out_cap > out.shape[0]:
        return E_BOUNDS
    if max_segs < 0 or max_segs > seg_offsets.shape[0] or max_segs > seg_lens.shape[0]:
        return E_BOUNDS
    if gso_size <= 0 or gso_type < 0 or gso_type > 0xFF:
        return E_INVAL
    base = gso_type & ~GSO_ECN
    if base == GSO_UDP or base == GSO_UDP_L4:
        return E_UNSUPPORTED
    if base != GSO_TCPV4 and base != GSO_TCPV6:
        return E_INVAL
    v4 = base == GSO_TCPV4
    n = np.int64(len)
    err, l3, l4, hdr = _parse_tcp_frame(frame, n, v4)
    if err != 0:
        return err
    if csum_start >= 0 and (csum_start != l4 or csum_offset != 16):
        return E_PARSE

    mss = np.int64(gso_size)
    payload = n - hdr
    nseg = np.int64(1)
    if payload > 0:
        nseg = (payload + mss - 1) // mss
    first_chunk = payload if payload < mss else mss
    if v4:
        if hdr - l3 + first_chunk > 0xFFFF:
            return E_INVAL
    elif hdr - l4 + first_chunk > 0xFFFF:
        return E_INVAL
    if nseg > max_segs:
        return E_SEGS
    if nseg * hdr + payload > out_cap:
        return E_SPACE

    seq0 = _rd32(frame, l4 + 4)
    flags0 = np.int64(frame[l4 + 13])
    if v4:
        ipid0 = _rd16(frame, l3 + 4)
        pseudo = _sum16(frame, l3 + 12, l3 + 20) + IPPROTO_TCP
    else:
        ipid0 = np.int64(0)
        pseudo = _sum16(frame, l3 + 8, l3 + 40) + IPPROTO_TCP

    off = np.int64(0)
    pos = hdr
    for k in range(nseg):
        chunk = n - pos
        if chunk > mss:
            chunk = mss
        seg_len = hdr + chunk
        _copy(out, off, frame, 0, hdr)
        if v4:
            ip = off + l3
            _wr16(out, ip + 2, seg_len - l3)
            _wr16(out, ip + 4, (ipid0 + k) & 0xFFFF)
            _wr16(out, ip + 10, 0)
            _wr16(out, ip + 10, (~_fold(_sum16(out, ip, off + l4))) & 0xFFFF)
        else:
            _wr16(out, off + l3 + 4, seg_len - l4)
        th = off + l4
        _wr32(out, th + 4, (seq0 + k * mss) & 0xFFFFFFFF)
        flags = flags0
        if k != nseg - 1:
            flags &= ~(TCP_FIN | TCP_PSH)
        if k != 0:
            flags &= ~TCP_CWR
        out[th + 13] = flags
        _wr16(out, th + 16, 0)
        _copy(out, off + hdr, frame, pos, chunk)
        s = pseudo + (seg_len - l4) + _sum16(out, th, off + seg_len)
        _wr16(out, th + 16, (~_fold(s)) & 0xFFFF)
        seg_offsets[k] = off
        seg_lens[k] = seg_len
        off += seg_len
        pos += chunk
    return nseg


# --- RSS ---------------------------------------------------------------------
@njit(**_JIT)
def toeplitz_hash(key, key_len, data, data_len):
    """Microsoft RSS Toeplitz hash of data[:data_len] with key[:key_len].

    For each input bit i (MSB first) that is set, XOR in key bits [i, i+32).
    Key bits past key_len count as 0 (a 40-byte key covers 36 input bytes).
    Negative or oversized lengths are clamped to the arrays.
    """
    kl = np.int64(key_len)
    dl = np.int64(data_len)
    if kl < 0:
        kl = 0
    if kl > key.shape[0]:
        kl = key.shape[0]
    if dl < 0:
        dl = 0
    if dl > data.shape[0]:
        dl = data.shape[0]
    result = np.int64(0)
    # window = key bits [8*i, 8*i + 32) for input byte i
    window = np.int64(0)
    for j in range(4):
        window <<= 8
        if j < kl:
            window |= np.int64(key[j])
    for i in range(dl):
        nxt = np.int64(0)
        if i + 4 < kl:
            nxt = np.int64(key[i + 4])
        d = np.int64(data[i])
        for b in range(8):
            if d & (0x80 >> b):
                result ^= ((window << b) | (nxt >> (8 - b))) & 0xFFFFFFFF
        window = ((window << 8) | nxt) & 0xFFFFFFFF
    return np.uint32(result)


# --- C entry points ----------------------------------------------------------
# Plain module-level functions, turned into @cfunc only by build_cfuncs() so
# that importing this module compiles nothing. Integer arguments are widened
# to int64 so the C path and Python tests share one compiled specialisation of
# each @njit kernel. carray() gives a view on the caller's buffer: no copy, no
# allocation.

def _finish_csum_c(frame, len, csum_start, csum_offset):
    if len < 0:
        return E_BOUNDS
    return finish_csum(carray(frame, len), np.int64(len), np.int64(csum_start),
                       np.int64(csum_offset))


def _gso_segment_c(frame, len, gso_type, hdr_len_hint, gso_size, csum_start, csum_offset,
                   out, out_cap, seg_offsets, seg_lens, max_segs):
    if len < 0 or out_cap < 0 or max_segs < 0:
        return E_BOUNDS
    return gso_segment(carray(frame, len), np.int64(len), np.int64(gso_type),
                       np.int64(hdr_len_hint), np.int64(gso_size), np.int64(csum_start),
                       np.int64(csum_offset), carray(out, out_cap), np.int64(out_cap),
                       carray(seg_offsets, max_segs), carray(seg_lens, max_segs),
                       np.int64(max_segs))


def _ipv4_header_ok_c(frame, len, l3_off):
    if len < 0:
        return E_BOUNDS
    return ipv4_header_ok(carray(frame, len), np.int64(len), np.int64(l3_off))


def _ipv4_fix_csum_c(frame, len, l3_off):
    if len < 0:
        return E_BOUNDS
    return ipv4_fix_csum(carray(frame, len), np.int64(len), np.int64(l3_off))


def _toeplitz_hash_c(key, key_len, data, data_len):
    if key_len < 0:
        key_len = 0
    if data_len < 0:
        data_len = 0
    return toeplitz_hash(carray(key, key_len), np.int64(key_len), carray(data, data_len),
                         np.int64(data_len))


_u8p = types.CPointer(types.uint8)
_i32p = types.CPointer(types.int32)
_i32 = types.int32

# name -> (numba signature, python body, C prototype)
C_KERNELS = {
    "finish_csum": (
        _i32(_u8p, _i32, _i32, _i32), _finish_csum_c,
        "int32_t finish_csum(uint8_t *frame, int32_t len, int32_t csum_start, "
        "int32_t csum_offset)"),
    "gso_segment": (
        _i32(_u8p, _i32, _i32, _i32, _i32, _i32, _i32, _u8p, _i32, _i32p, _i32p, _i32),
        _gso_segment_c,
        "int32_t gso_segment(uint8_t *frame, int32_t len, int32_t gso_type, "
        "int32_t hdr_len_hint, int32_t gso_size, int32_t csum_start, int32_t csum_offset, "
        "uint8_t *out, int32_t out_cap, int32_t *seg_offsets, int32_t *seg_lens, "
        "int32_t max_segs)"),
    "ipv4_header_ok": (
        _i32(_u8p, _i32, _i32), _ipv4_header_ok_c,
        "int32_t ipv4_header_ok(uint8_t *frame, int32_t len, int32_t l3_off)"),
    "ipv4_fix_csum": (
        _i32(_u8p, _i32, _i32), _ipv4_fix_csum_c,
        "int32_t ipv4_fix_csum(uint8_t *frame, int32_t len, int32_t l3_off)"),
    "toeplitz_hash": (
        types.uint32(_u8p, _i32, _u8p, _i32), _toeplitz_hash_c,
        "uint32_t toeplitz_hash(uint8_t *key, int32_t key_len, uint8_t *data, "
        "int32_t data_len)"),
}

_cfuncs = None
_cfuncs_lock = threading.Lock()


def build_cfuncs():
    """Compile (or load from the on-disk cache) every C entry point, once.

    Returns {name: numba CFunc}. The CFunc objects are kept alive here for the
    life of the process, so their addresses stay valid.
    """
    global _cfuncs
    with _cfuncs_lock:
        if _cfuncs is None:
            built = {}
            for name, (sig, body, _proto) in C_KERNELS.items():
                built[name] = cfunc(sig, nopython=True, cache=True)(body)
            _cfuncs = built
    return _cfuncs
