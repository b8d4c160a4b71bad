"""gso_segment (software TSO), @njit version, checked segment by segment."""
import struct

import numpy as np
import pytest

from tests.unit.kernels import kframes as F
from vfe import kernels as K


def run_gso(frame: bytes, gso_type: int, mss: int, csum_start: int, csum_offset: int = 16,
            out_cap: int | None = None, max_segs: int = 64, hint: int = 0, out_extra: int = 16):
    a = F.buf(frame)
    if out_cap is None:
        out_cap = len(frame) * 2 + 4096
    out = np.full(out_cap + out_extra, 0xA5, dtype=np.uint8)
    offs = np.full(max_segs + 1, -7, dtype=np.int32)
    lens = np.full(max_segs + 1, -7, dtype=np.int32)
    rc = K.gso_segment(a, len(frame), gso_type, hint, mss, csum_start, csum_offset,
                       out, out_cap, offs, lens, max_segs)
    assert a.tobytes() == frame, "input frame modified"
    assert offs[max_segs] == -7 and lens[max_segs] == -7, "wrote past max_segs"
    assert (out[out_cap:] == 0xA5).all(), "wrote past out_cap"
    return rc, out, offs, lens


def check_segments(frame, l4, v6, rc, out, offs, lens, mss, *, l3, first_flags_only=0,
                   last_flags_only=0):
    """Verify every segment against the original TSO frame; return the segments."""
    n = len(frame)
    doff = (frame[l4 + 12] >> 4) * 4
    hdr = l4 + doff
    payload = frame[hdr:]
    nseg = max(1, -(-len(payload) // mss))
    assert rc == nseg
    seq0, = struct.unpack_from("!I", frame, l4 + 4)
    flags0 = frame[l4 + 13]
    ipid0 = None if v6 else struct.unpack_from("!H", frame, l3 + 4)[0]
    pos = 0
    got_payload = b""
    segs = []
    for k in range(nseg):
        chunk = payload[k * mss:(k + 1) * mss]
        assert offs[k] == pos and lens[k] == hdr + len(chunk)
        seg = out[offs[k]:offs[k] + lens[k]].tobytes()
        segs.append(seg)
        pos += lens[k]
        assert seg[:l3] == frame[:l3]                                   # L2 (+VLAN) unchanged
        if v6:
            plen, = struct.unpack_from("!H", seg, l3 + 4)
            assert plen == len(seg) - l4
            assert seg[l3:l3 + 4] == frame[l3:l3 + 4] and seg[l3 + 6:l4] == frame[l3 + 6:l4]
            ph = F.pseudo6(seg[l3 + 8:l3 + 24], seg[l3 + 24:l3 + 40], 6, len(seg) - l4)
        else:
            ihl = (seg[l3] & 0xF) * 4
            assert l3 + ihl == l4
            tot, ident = struct.unpack_from("!HH", seg, l3 + 2)
            assert tot == len(seg) - l3
            assert ident == (ipid0 + k) & 0xFFFF
            assert F.ones_sum(seg[l3:l4]) == 0xFFFF, "IPv4 header checksum"
            # everything but tot_len, id and checksum is copied
            assert seg[l3:l3 + 2] == frame[l3:l3 + 2]
            assert seg[l3 + 6:l3 + 10] == frame[l3 + 6:l3 + 10]
            assert seg[l3 + 12:l4] == frame[l3 + 12:l4]
            ph = F.pseudo4(seg[l3 + 12:l3 + 16], seg[l3 + 16:l3 + 20], 6, len(seg) - l4)
        seq, = struct.unpack_from("!I", seg, l4 + 4)
        assert seq == (seq0 + k * mss) & 0xFFFFFFFF
        flags = seg[l4 + 13]
        want = flags0
        if k != nseg - 1:
            want &= ~(F.TCP_FIN | F.TCP_PSH)
        if k != 0:
            want &= ~F.TCP_CWR
        assert flags == want, (k, hex(flags), hex(want))
        assert F.ones_sum(ph + seg[l4:]) == 0xFFFF, f"TCP checksum of segment {k}"
        zeroed = seg[l4:l4 + 16] + b"\0\0" + seg[l4 + 18:]
        assert struct.unpack_from("!H", seg, l4 + 16)[0] == F.inet_csum(ph + zeroed)
        # ports, ack, doff, window, urg, options unchanged
        assert seg[l4:l4 + 4] == frame[l4:l4 + 4]
        assert seg[l4 + 8:l4 + 13] == frame[l4 + 8:l4 + 13]
        assert seg[l4 + 14:l4 + 16] == frame[l4 + 14:l4 + 16]
        assert seg[l4 + 18:hdr] == frame[l4 + 18:hdr]
        assert seg[hdr:] == chunk
        got_payload += seg[hdr:]
    assert got_payload == payload
    return segs


MSS = 1448
BIG = 65536 - 14 - 20 - 32      # 64 KiB frame: eth + IPv4 + TCP(ts) + payload


def test_tcp4_64k_mss1448():
    payload = F.payload_bytes(BIG, 1)
    frame, l4, _ = F.tcp4_frame(payload, seq=0xFFFFF000, ident=0xFFF0,
                                flags=F.TCP_ACK | F.TCP_PSH)
    assert len(frame) == 65536
    rc, out, offs, lens = run_gso(frame, K.GSO_TCPV4, MSS, l4)
    assert rc == 46            # ceil(65470 / 1448)
    segs = check_segments(frame, l4, False, rc, out, offs, lens, MSS, l3=14)
    assert len(segs[0]) == 14 + 20 + 32 + MSS
    assert len(segs[-1]) == 14 + 20 + 32 + BIG - 45 * MSS
    # seq and IP id wrapped
    assert struct.unpack_from("!I", segs[-1], l4 + 4)[0] < 0xFFFFF000
    assert struct.unpack_from("!H", segs[-1], 18)[0] < 0xFFF0


def test_tcp6_64k():
    payload = F.payload_bytes(65000, 2)
    frame, l4, _ = F.tcp6_frame(payload, seq=123456789)
    rc, out, offs, lens = run_gso(frame, K.GSO_TCPV6, MSS, l4)
    assert rc == 45
    check_segments(frame, l4, True, rc, out, offs, lens, MSS, l3=14)


def test_tcp6_vlan_small_mss():
    frame, l4, _ = F.tcp6_frame(F.payload_bytes(5000, 3), vlan=0x0123)
    assert l4 == 58
    rc, out, offs, lens = run_gso(frame, K.GSO_TCPV6, 536, l4)
    check_segments(frame, l4, True, rc, out, offs, lens, 536, l3=18)


def test_tcp4_vlan_ip_options_no_tcp_options():
    frame, l4, _ = F.tcp4_frame(F.payload_bytes(10000, 4), vlan=10, tcp_options=b"",
                                ip_options=b"\x94\x04\x00\x00")   # Router Alert
    assert l4 == 18 + 24
    rc, out, offs, lens = run_gso(frame, K.GSO_TCPV4, 1460, l4)
    assert rc == 7
    check_segments(frame, l4, False, rc, out, offs, lens, 1460, l3=18)


def test_flags_fin_psh_last_cwr_first_with_ecn():
    flags = F.TCP_ACK | F.TCP_PSH | F.TCP_FIN | F.TCP_CWR | F.TCP_ECE
    frame, l4, _ = F.tcp4_frame(F.payload_bytes(4000, 5), flags=flags)
    rc, out, offs, lens = run_gso(frame, K.GSO_TCPV4 | K.GSO_ECN, 1000, l4)
    assert rc == 4
    segs = check_segments(frame, l4, False, rc, out, offs, lens, 1000, l3=14)
    got = [s[l4 + 13] for s in segs]
    assert got == [F.TCP_ACK | F.TCP_ECE | F.TCP_CWR, F.TCP_ACK | F.TCP_ECE,
                   F.TCP_ACK | F.TCP_ECE, F.TCP_ACK | F.TCP_ECE | F.TCP_PSH | F.TCP_FIN]


def test_tcp6_ecn():
    frame, l4, _ = F.tcp6_frame(F.payload_bytes(3000, 6),
                                flags=F.TCP_ACK | F.TCP_CWR | F.TCP_PSH)
    rc, out, offs, lens = run_gso(frame, K.GSO_TCPV6 | K.GSO_ECN, 1400, l4)
    check_segments(frame, l4, True, rc, out, offs, lens, 1400, l3=14)


@pytest.mark.parametrize("plen,mss,nseg", [(0, 1448, 1), (1, 1448, 1), (1448, 1448, 1),
                                           (1449, 1448, 2), (2896, 1448, 2), (10, 1, 10)])
def test_edges(plen, mss, nseg):
    frame, l4, _ = F.tcp4_frame(F.payload_bytes(plen, 8), flags=F.TCP_ACK | F.TCP_FIN)
    rc, out, offs, lens = run_gso(frame, K.GSO_TCPV4, mss, l4)
    assert rc == nseg
    check_segments(frame, l4, False, rc, out, offs, lens, mss, l3=14)


def test_csum_start_not_given_and_hint_ignored():
    frame, l4, _ = F.tcp4_frame(F.payload_bytes(3000, 9))
    ref = run_gso(frame, K.GSO_TCPV4, 1000, l4)
    for cs, co, hint in [(-1, 0, 0), (-1, -1, 9999), (l4, 16, 14), (l4, 16, -5)]:
        rc, out, offs, lens = run_gso(frame, K.GSO_TCPV4, 1000, cs, co, hint=hint)
        assert rc == ref[0] == 3
        assert (out == ref[1]).all() and (offs == ref[2]).all() and (lens == ref[3]).all()


def test_exact_out_cap_and_max_segs():
    frame, l4, _ = F.tcp4_frame(F.payload_bytes(4000, 10))
    hdr = l4 + 32
    need = 4 * hdr + 4000
    rc, out, offs, lens = run_gso(frame, K.GSO_TCPV4, 1000, l4, out_cap=need, max_segs=4)
    assert rc == 4
    check_segments(frame, l4, False, rc, out, offs, lens, 1000, l3=14)
    rc, out, *_ = run_gso(frame, K.GSO_TCPV4, 1000, l4, out_cap=need - 1, max_segs=4)
    assert rc == K.E_SPACE
    assert (out == 0xA5).all(), "nothing written on error"
    rc, *_ = run_gso(frame, K.GSO_TCPV4, 1000, l4, out_cap=need, max_segs=3)
    assert rc == K.E_SEGS
    rc, *_ = run_gso(frame, K.GSO_TCPV4, 1000, l4, out_cap=0, max_segs=0)
    assert rc == K.E_SEGS


def _gso_rc(frame, gso_type=K.GSO_TCPV4, mss=1000, cs=-1, co=16, n=None, **kw):
    a = F.buf(frame)
    out = np.zeros(len(frame) * 2 + 4096, np.uint8)
    offs = np.zeros(64, np.int32)
    lens = np.zeros(64, np.int32)
    n = len(frame) if n is None else n
    args = dict(out_cap=out.size, max_segs=64)
    args.update(kw)
    return K.gso_segment(a, n, gso_type, 0, mss, cs, co, out, args["out_cap"], offs, lens,
                         args["max_segs"])


def test_argument_errors():
    frame, l4, _ = F.tcp4_frame(F.payload_bytes(3000, 11))
    assert _gso_rc(frame, mss=0) == K.E_INVAL
    assert _gso_rc(frame, mss=-1448) == K.E_INVAL
    assert _gso_rc(frame, gso_type=K.GSO_UDP) == K.E_UNSUPPORTED
    assert _gso_rc(frame, gso_type=K.GSO_UDP_L4) == K.E_UNSUPPORTED
    assert _gso_rc(frame, gso_type=K.GSO_NONE) == K.E_INVAL
    assert _gso_rc(frame, gso_type=2) == K.E_INVAL
    assert _gso_rc(frame, gso_type=0x101) == K.E_INVAL
    assert _gso_rc(frame, gso_type=-1) == K.E_INVAL
    assert _gso_rc(frame, n=len(frame) + 1) == K.E_BOUNDS
    assert _gso_rc(frame, n=-1) == K.E_BOUNDS
    assert _gso_rc(frame, out_cap=10 ** 6) == K.E_BOUNDS        # larger than out array
    assert _gso_rc(frame, max_segs=65) == K.E_BOUNDS            # larger than seg arrays
    assert _gso_rc(frame, cs=l4 + 1) == K.E_PARSE               # csum_start not TCP header
    assert _gso_rc(frame, cs=l4, co=6) == K.E_PARSE


def test_segment_larger_than_ip_allows():
    frame, l4, _ = F.tcp4_frame(F.payload_bytes(70000, 12), ip_tot_len=0)
    assert _gso_rc(frame, mss=65536) == K.E_INVAL
    assert _gso_rc(frame, mss=65535 - 20 - 32) > 0              # largest that fits
    frame6, l4, _ = F.tcp6_frame(F.payload_bytes(70000, 12))
    assert _gso_rc(frame6, K.GSO_TCPV6, mss=65535 - 32 + 1) == K.E_INVAL
    assert _gso_rc(frame6, K.GSO_TCPV6, mss=65535 - 32) == 2


def test_truncated_frames():
    frame, l4, _ = F.tcp4_frame(F.payload_bytes(100, 13))
    for n in [0, 1, 13, 14, 20, 33, l4, l4 + 19, l4 + 31]:    # inside eth, IP, TCP(+options)
        assert _gso_rc(frame, n=n) == K.E_PARSE, n
    assert _gso_rc(frame, n=l4 + 32) == 1                       # headers only: one segment
    frame6, l4, _ = F.tcp6_frame(F.payload_bytes(100, 13), vlan=3)
    for n in [17, 18, 57, l4 + 10, l4 + 31]:
        assert _gso_rc(frame6, K.GSO_TCPV6, n=n) == K.E_PARSE, n


def test_unparseable_headers():
    frame, l4, _ = F.tcp4_frame(F.payload_bytes(3000, 14))
    f6, l46, _ = F.tcp6_frame(F.payload_bytes(3000, 14))
    assert _gso_rc(frame, K.GSO_TCPV6) == K.E_PARSE             # IPv4 frame, TCPV6 type
    assert _gso_rc(f6, K.GSO_TCPV4) == K.E_PARSE
    udp, _, _ = F.udp4_frame(F.payload_bytes(3000, 14))
    assert _gso_rc(udp) == K.E_PARSE                            # not TCP
    arp = F.eth(0x0806) + bytes(28)
    assert _gso_rc(arp) == K.E_PARSE

    def patched(src, off, val):
        b = bytearray(src)
        b[off] = val
        return bytes(b)

    assert _gso_rc(patched(frame, 14, 0x44)) == K.E_PARSE       # IHL 4
    assert _gso_rc(patched(frame, 14, 0x55)) == K.E_PARSE       # version 5
    assert _gso_rc(patched(frame, 20, 0x60)) == K.E_PARSE       # MF set (DF|MF)
    assert _gso_rc(patched(frame, 21, 0x08)) == K.E_PARSE       # fragment offset
    assert _gso_rc(patched(frame, l4 + 12, 0x40)) == K.E_PARSE  # TCP doff 4
    assert _gso_rc(patched(f6, 14, 0x40), K.GSO_TCPV6) == K.E_PARSE    # version 4
    assert _gso_rc(patched(f6, 20, 0), K.GSO_TCPV6) == K.E_UNSUPPORTED   # hop-by-hop
    assert _gso_rc(patched(f6, 20, 44), K.GSO_TCPV6) == K.E_UNSUPPORTED  # fragment hdr
    assert _gso_rc(patched(f6, 20, 17), K.GSO_TCPV6) == K.E_PARSE        # UDP
    qinq = frame[:12] + struct.pack("!HHHH", 0x88A8, 5, 0x8100, 6) + frame[12:]
    assert _gso_rc(qinq) == K.E_UNSUPPORTED


def test_ip_tot_len_is_not_trusted():
    payload = F.payload_bytes(3000, 15)
    ref, l4, _ = F.tcp4_frame(payload)
    r = run_gso(ref, K.GSO_TCPV4, 1000, l4)
    for tl in (0, 1, 65535):
        frame, _, _ = F.tcp4_frame(payload, ip_tot_len=tl)
        rc, out, offs, lens = run_gso(frame, K.GSO_TCPV4, 1000, l4)
        assert rc == r[0] and (out == r[1]).all()


def test_mutated_frames_never_misbehave():
    """Random truncations and header byte flips: either a negative code, or
    segments that are well-formed and validate (never a crash, never a write
    outside out/out_cap; run_gso checks the sentinels)."""
    rng = np.random.default_rng(99)
    base4, l4_4, _ = F.tcp4_frame(F.payload_bytes(3000, 16), vlan=3)
    base6, l4_6, _ = F.tcp6_frame(F.payload_bytes(3000, 17))
    for it in range(300):
        v6 = bool(it & 1)
        frame = bytearray(base6 if v6 else base4)
        l4 = l4_6 if v6 else l4_4
        for _ in range(int(rng.integers(1, 4))):
            frame[int(rng.integers(0, l4 + 32))] = int(rng.integers(0, 256))
        if rng.random() < 0.3:
            frame = frame[:int(rng.integers(0, len(frame)))]
        gso_type = K.GSO_TCPV6 if v6 else K.GSO_TCPV4
        mss = int(rng.integers(1, 2000))
        rc, out, offs, lens = run_gso(bytes(frame), gso_type, mss, -1, max_segs=4096,
                                      out_cap=200_000)
        if rc < 0:
            assert rc in K.ERROR_NAMES
            continue
        # parsed: find where the kernel saw L3/L4 and check every segment
        l3 = 18 if frame[12:14] == b"\x81\x00" or frame[12:14] == b"\x88\xa8" else 14
        seen_l4 = l3 + (40 if v6 else (frame[l3] & 0xF) * 4)
        check_segments(bytes(frame), seen_l4, v6, rc, out, offs, lens, mss, l3=l3)
