"""Frame builders and a reference Internet checksum, independent of vfe.kernels.

Everything here is plain Python (struct + sum) so the tests check the numba
kernels against a second, obviously-correct implementation.
"""
import ipaddress
import struct

import numpy as np

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100

TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK, TCP_URG, TCP_ECE, TCP_CWR = (
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80)

MAC_A = bytes.fromhex("525400000001")
MAC_B = bytes.fromhex("525400000002")


# --- reference checksum (RFC 1071, the slow obvious way) ---------------------
def ones_sum(data: bytes) -> int:
    """Folded 16-bit one's-complement sum (not complemented)."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def inet_csum(data: bytes) -> int:
    return ~ones_sum(data) & 0xFFFF


def ip4(a: str) -> bytes:
    return ipaddress.IPv4Address(a).packed


def ip6(a: str) -> bytes:
    return ipaddress.IPv6Address(a).packed


def pseudo4(src: bytes, dst: bytes, proto: int, l4len: int) -> bytes:
    return src + dst + struct.pack("!BBH", 0, proto, l4len & 0xFFFF)


def pseudo6(src: bytes, dst: bytes, nh: int, l4len: int) -> bytes:
    return src + dst + struct.pack("!I3xB", l4len, nh)


# --- header builders ---------------------------------------------------------
def eth(ethertype: int, vlan: int | None = None, dst=MAC_B, src=MAC_A) -> bytes:
    if vlan is None:
        return dst + src + struct.pack("!H", ethertype)
    return dst + src + struct.pack("!HHH", ETH_P_8021Q, vlan, ethertype)


def ipv4_hdr(src: bytes, dst: bytes, proto: int, l4len: int, ident=0x1234, ttl=64,
             options=b"", flags_frag=0x4000, tot_len=None) -> bytes:
    assert len(options) % 4 == 0
    ihl = 5 + len(options) // 4
    if tot_len is None:
        tot_len = ihl * 4 + l4len
    h = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, tot_len & 0xFFFF, ident, flags_frag, ttl,
                    proto, 0, src, dst) + options
    c = inet_csum(h)
    return h[:10] + struct.pack("!H", c) + h[12:]


def ipv6_hdr(src: bytes, dst: bytes, nh: int, plen: int, hop=64) -> bytes:
    return struct.pack("!IHBB16s16s", 0x60000000, plen & 0xFFFF, nh, hop, src, dst)


def tcp_hdr(sport, dport, seq, ack, flags, window=0xFFFF, options=b"", check=0) -> bytes:
    assert len(options) % 4 == 0
    doff = 5 + len(options) // 4
    return struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags, window,
                       check, 0) + options


def udp_hdr(sport, dport, length, check=0) -> bytes:
    return struct.pack("!HHHH", sport, dport, length, check)


TS_OPTS = bytes([1, 1, 8, 10]) + struct.pack("!II", 0x01020304, 0x05060708)  # NOP NOP TS


def partial_csum(pseudo: bytes) -> int:
    """What Linux leaves in the L4 checksum field for CHECKSUM_PARTIAL:
    the folded (not complemented) pseudo-header sum."""
    return ones_sum(pseudo)


def tcp4_frame(payload: bytes, *, seq=1000, flags=TCP_ACK | TCP_PSH, vlan=None, ident=0x1234,
               ip_options=b"", tcp_options=TS_OPTS, partial=True, src="10.0.0.1",
               dst="10.0.0.2", ip_tot_len=None):
    """TCP/IPv4 frame with a CHECKSUM_PARTIAL checksum field.
    Returns (frame bytes, l4 offset, pseudo-header bytes)."""
    s, d = ip4(src), ip4(dst)
    l4len = 20 + len(tcp_options) + len(payload)
    ph = pseudo4(s, d, 6, l4len)
    check = partial_csum(ph) if partial else 0
    l2 = eth(ETH_P_IP, vlan)
    l3 = ipv4_hdr(s, d, 6, l4len, ident=ident, options=ip_options, tot_len=ip_tot_len)
    l4 = tcp_hdr(40000, 5201, seq, 0x11223344, flags, options=tcp_options, check=check)
    return l2 + l3 + l4 + payload, len(l2) + len(l3), ph


def tcp6_frame(payload: bytes, *, seq=1000, flags=TCP_ACK | TCP_PSH, vlan=None,
               tcp_options=TS_OPTS, nh=6, src="fd00::1", dst="fd00::2"):
    s, d = ip6(src), ip6(dst)
    l4len = 20 + len(tcp_options) + len(payload)
    ph = pseudo6(s, d, 6, l4len)
    l2 = eth(ETH_P_IPV6, vlan)
    l3 = ipv6_hdr(s, d, nh, l4len)
    l4 = tcp_hdr(40000, 5201, seq, 0x11223344, flags, options=tcp_options,
                 check=partial_csum(ph))
    return l2 + l3 + l4 + payload, len(l2) + len(l3), ph


def udp4_frame(payload: bytes, *, vlan=None, src="10.0.0.1", dst="10.0.0.2"):
    s, d = ip4(src), ip4(dst)
    l4len = 8 + len(payload)
    ph = pseudo4(s, d, 17, l4len)
    l2 = eth(ETH_P_IP, vlan)
    l3 = ipv4_hdr(s, d, 17, l4len)
    l4 = udp_hdr(5353, 5353, l4len, check=partial_csum(ph))
    return l2 + l3 + l4 + payload, len(l2) + len(l3), ph


def udp6_frame(payload: bytes, *, src="fd00::1", dst="fd00::2"):
    s, d = ip6(src), ip6(dst)
    l4len = 8 + len(payload)
    ph = pseudo6(s, d, 17, l4len)
    l2 = eth(ETH_P_IPV6)
    l3 = ipv6_hdr(s, d, 17, l4len)
    l4 = udp_hdr(5353, 5353, l4len, check=partial_csum(ph))
    return l2 + l3 + l4 + payload, len(l2) + len(l3), ph


def buf(data: bytes, extra: int = 0, fill: int = 0xA5) -> np.ndarray:
    """Writable uint8 array holding data, followed by `extra` sentinel bytes."""
    a = np.full(len(data) + extra, fill, dtype=np.uint8)
    a[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    return a


def payload_bytes(n: int, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


# --- reference Toeplitz (bit by bit, as the Microsoft RSS spec describes) ----
def toeplitz_ref(key: bytes, data: bytes) -> int:
    kbits = int.from_bytes(key, "big") if key else 0
    nkbits = len(key) * 8
    result = 0
    for i in range(len(data) * 8):
        if data[i // 8] & (0x80 >> (i % 8)):
            # key bits [i, i+32), zero past the end of the key
            w = 0
            for j in range(32):
                b = i + j
                bit = (kbits >> (nkbits - 1 - b)) & 1 if b < nkbits else 0
                w = (w << 1) | bit
            result ^= w
    return result
