"""The one chain walker (cython_ext/vring.pxd walk_chain) under each of its
direction policies, driven in-process on guarded memory
(tests/harness/engine_rig.py), each case in a forked child: net TX
(ALL_READABLE), net RX (ALL_WRITABLE), blk requests
(READABLE_THEN_WRITABLE).

The cases are where one walker for three callers could go wrong: a
direction change (by a zero-length descriptor too, and across the switch
into an indirect table), each caller's byte limit exactly and one byte
past it, zero-length descriptors (skipped, their address never looked at;
a chain of nothing else is E_LEN for net, a missing header for blk), and
an indirect table after a blk chain's first descriptor.
"""
from __future__ import annotations

import pytest

from tests.harness.engine_rig import (
    F_INDIRECT, F_NEXT, F_WRITE, PAGE, BlkRig, Guest, NetRig, RingError, blk_header,
    ring_at_ends, table_bytes,
)
from tests.harness.guarded import run_forked

SIZE = 8
NET_MAX_CHAIN = 262144           # netdata.pxd: bytes in one TX chain or RX buffer
BLK_MAX_CHAIN = 64 << 20         # blk.pxd: bytes in one request chain
NOWHERE = 0xDEAD_0000_0000       # inside no region: a zero-length descriptor may point here
HDR = 12
FRAME = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00" + bytes(range(46))
T_IN = 0
S_OK, S_IOERR = 0, 1


# -- net: a's TX ring (1) floods to b's RX ring (0)

TXD, TXA, TXU, RXD, RXA, RXU, BUF, RXBUF, TABLE = range(9)
NET_REGIONS = [(0x10000, PAGE), (0x20000, PAGE), (0x30000, PAGE), (0x50000, PAGE),
               (0x60000, PAGE), (0x70000, PAGE), (0x100000, 2 * PAGE), (0x200000, 2 * PAGE),
               (0x300000, PAGE)]


class Net:
    """The rig with both rings started; ``rx_buffers`` posts four 512-byte
    RX buffers on b (in RXBUF), the TX frame (header + FRAME) is at BUF."""

    def __init__(self, rx_buffers: bool = True) -> None:
        self.g = Guest(NET_REGIONS)
        self.rig = NetRig(self.g)
        self.tx = ring_at_ends(self.g, SIZE, TXD, TXA, TXU)
        self.rx = ring_at_ends(self.g, SIZE, RXD, RXA, RXU)
        self.rig.start(self.rig.a, 1, self.tx)
        self.rig.start(self.rig.b, 0, self.rx)
        self.frame = self.g.start(BUF)
        self.g.write(self.frame, bytes(HDR) + FRAME)
        self.rx_buf = self.g.start(RXBUF)
        if rx_buffers:
            for i in range(4):
                self.rx.set_desc(i, self.rx_buf + 512 * i, 512, F_WRITE)
            self.rx.post(0, 1, 2, 3)

    def indirect(self, ring, descs) -> None:
        """Descriptor 0 of `ring`: an indirect table (in TABLE) of `descs`."""
        t = table_bytes(*descs)
        self.g.write(self.g.start(TABLE), t)
        ring.set_desc(0, self.g.start(TABLE), len(t), F_INDIRECT)

    def send(self) -> int:
        return self.rig.a.run_burst(1)

    def delivered(self) -> list[bytes]:
        """Frames b's RX ring got, without their virtio-net header (each
        buffer starts at RXBUF + 512 * head)."""
        out = []
        for i in range(self.rx.used_idx()):
            head, length = self.rx.used(i)
            out.append(self.g.read(self.rx_buf + 512 * head, length)[HDR:])
        return out


# TX chains: build(n) posts head 0 on a's TX ring

def tx_zero_length_first(n):
    n.tx.set_desc(0, NOWHERE, 0, F_NEXT, 1)
    n.tx.set_desc(1, n.frame, HDR + len(FRAME))
    n.tx.post(0)


def tx_zero_length_writable_after_readable(n):
    n.tx.set_desc(0, n.frame, HDR + len(FRAME), F_NEXT, 1)
    n.tx.set_desc(1, NOWHERE, 0, F_WRITE)
    n.tx.post(0)


def tx_only_zero_lengths(n):
    n.tx.set_desc(0, NOWHERE, 0, F_NEXT, 1)
    n.tx.set_desc(1, n.frame, 0)
    n.tx.post(0)


def tx_indirect_after_the_first_descriptor(n):
    t = table_bytes((n.frame + 20, HDR + len(FRAME) - 20, 0, 0))
    n.g.write(n.g.start(TABLE), t)
    n.tx.set_desc(0, n.frame, 20, F_NEXT, 1)
    n.tx.set_desc(1, n.g.start(TABLE), len(t), F_INDIRECT)
    n.tx.post(0)


def _tx_of(n, total):
    """A TX chain of `total` bytes: 8 KiB pieces of BUF (the frame first)."""
    descs, left = [], total
    while left:
        piece = min(left, 2 * PAGE)
        left -= piece
        descs.append((n.frame, piece, F_NEXT if left else 0, len(descs) + 1))
    n.indirect(n.tx, descs)
    n.tx.post(0)


def tx_at_the_byte_limit(n):
    _tx_of(n, NET_MAX_CHAIN)


def tx_one_byte_over_the_limit(n):
    _tx_of(n, NET_MAX_CHAIN + 1)


TX_CASES = [
    (tx_zero_length_first, None),
    (tx_zero_length_writable_after_readable, RingError.DIR),
    (tx_only_zero_lengths, RingError.LEN),
    (tx_indirect_after_the_first_descriptor, None),
    (tx_at_the_byte_limit, "taken"),
    (tx_one_byte_over_the_limit, RingError.LEN),
]


def _run_tx_case(build, expected):
    n = Net()
    build(n)
    n.send()
    broken = n.rig.broken(n.rig.a, 1)
    if expected is None or expected == "taken":
        assert broken == 0, RingError(broken)
        assert n.tx.used_idx() == 1 and n.tx.used(0) == (0, 0)
        if expected is None:
            assert n.delivered() == [FRAME]
    else:
        assert broken == expected, n.rig.a.ring_state(1)
        assert n.tx.used_idx() == 0 and n.delivered() == []
    assert n.rig.broken(n.rig.b, 0) == 0
    n.rig.close()


@pytest.mark.parametrize("build,expected", TX_CASES, ids=[c[0].__name__ for c in TX_CASES])
def test_tx_chain(build, expected):
    run_forked(_run_tx_case, build, expected)


# RX chains: a sends one good frame; build(n) posts head 0 on b's RX ring

def rx_readable_after_writable(n):
    n.rx.set_desc(0, n.rx_buf, 512, F_WRITE | F_NEXT, 1)
    n.rx.set_desc(1, n.rx_buf + 512, 512)
    n.rx.post(0)


def rx_readable_before_writable(n):
    n.rx.set_desc(0, n.rx_buf + 512, 16, 0, 1)
    n.rx.set_desc(1, n.rx_buf, 512, F_WRITE)
    n.rx.post(0)


def rx_zero_length_readable_after_writable(n):
    n.rx.set_desc(0, n.rx_buf, 512, F_WRITE | F_NEXT, 1)
    n.rx.set_desc(1, NOWHERE, 0)
    n.rx.post(0)


def rx_zero_length_first(n):
    n.rx.set_desc(0, NOWHERE, 0, F_WRITE | F_NEXT, 1)
    n.rx.set_desc(1, n.rx_buf, 512, F_WRITE)
    n.rx.post(0)


def rx_only_zero_lengths(n):
    n.rx.set_desc(0, NOWHERE, 0, F_WRITE | F_NEXT, 1)
    n.rx.set_desc(1, n.rx_buf, 0, F_WRITE)
    n.rx.post(0)


def _rx_of(n, total):
    """An RX buffer of `total` bytes: 8 KiB pieces, all of RXBUF."""
    descs, left = [], total
    while left:
        piece = min(left, 2 * PAGE)
        left -= piece
        descs.append((n.rx_buf, piece, F_WRITE | (F_NEXT if left else 0), len(descs) + 1))
    n.indirect(n.rx, descs)
    n.rx.post(0)


def rx_at_the_byte_limit(n):
    _rx_of(n, NET_MAX_CHAIN)


def rx_one_byte_over_the_limit(n):
    _rx_of(n, NET_MAX_CHAIN + 1)


RX_CASES = [
    (rx_readable_after_writable, RingError.DIR),
    (rx_readable_before_writable, RingError.DIR),
    (rx_zero_length_readable_after_writable, RingError.DIR),
    (rx_zero_length_first, None),
    (rx_only_zero_lengths, RingError.LEN),
    (rx_at_the_byte_limit, None),
    (rx_one_byte_over_the_limit, RingError.LEN),
]


def _run_rx_case(build, expected):
    n = Net(rx_buffers=False)
    n.tx.set_desc(0, n.frame, HDR + len(FRAME))
    n.tx.post(0, publish=False)
    build(n)
    n.tx.publish()
    n.send()
    assert n.rig.broken(n.rig.a, 1) == 0 and n.tx.used_idx() == 1     # the sender goes on
    broken = n.rig.broken(n.rig.b, 0)
    if expected is None:
        assert broken == 0, RingError(broken)
        assert n.rx.used(0) == (0, HDR + len(FRAME))
        assert n.g.read(n.rx_buf + HDR, len(FRAME)) == FRAME
    else:
        assert broken == expected, n.rig.b.ring_state(0)
        assert n.rx.used_idx() == 0
    n.rig.close()


@pytest.mark.parametrize("build,expected", RX_CASES, ids=[c[0].__name__ for c in RX_CASES])
def test_rx_chain(build, expected):
    run_forked(_run_rx_case, build, expected)


# -- blk: one malloc device, its request queue 0

DESC, AVAIL, USED, BBUF, BTABLE, BIG = range(6)
BIG_SIZE = 16 << 20              # sparse: only what a case writes is ever touched
BLK_REGIONS = [(0x10000, PAGE), (0x20000, PAGE), (0x30000, PAGE), (0x100000, 2 * PAGE),
               (0x200000, PAGE), (0x1000000, BIG_SIZE)]


class Blk:
    """The rig with its ring started; a T_IN header for sector 0 at BBUF,
    the status byte at BBUF + 200, data at BBUF + PAGE."""

    def __init__(self) -> None:
        self.g = Guest(BLK_REGIONS)
        self.rig = BlkRig(self.g)
        self.ring = ring_at_ends(self.g, SIZE, DESC, AVAIL, USED)
        self.rig.start(self.rig.dev, 0, self.ring)
        self.hdr = self.g.start(BBUF)
        self.g.write(self.hdr, blk_header(T_IN))
        self.status = self.hdr + 200
        self.g.write(self.status, b"\xee")
        self.data = self.hdr + PAGE

    def chain(self, *descs) -> None:
        """Descriptors 0.. as one chain (NEXT added but on the last), posted."""
        for i, (addr, length, flags) in enumerate(descs):
            last = i == len(descs) - 1
            self.ring.set_desc(i, addr, length, flags | (0 if last else F_NEXT), i + 1)
        self.ring.post(0)

    def table(self, *descs) -> tuple[int, int, int]:
        """An indirect table (in BTABLE) chaining `descs`; its descriptor."""
        t = table_bytes(*[(a, ln, fl | (F_NEXT if i < len(descs) - 1 else 0), i + 1)
                          for i, (a, ln, fl) in enumerate(descs)])
        self.g.write(self.g.start(BTABLE), t)
        return self.g.start(BTABLE), len(t), F_INDIRECT


def blk_readable_writable_readable(b):
    b.chain((b.hdr, 16, 0), (b.data, 512, F_WRITE), (b.data + 512, 16, 0), (b.status, 1, F_WRITE))


def blk_zero_length_readable_after_writable(b):
    b.chain((b.hdr, 16, 0), (b.status, 1, F_WRITE), (NOWHERE, 0, 0))


def blk_readable_after_zero_length_writable(b):
    b.chain((b.hdr, 16, 0), (NOWHERE, 0, F_WRITE), (b.data, 512, 0), (b.status, 1, F_WRITE))


def blk_readable_in_a_table_after_writable(b):
    b.chain((b.status, 1, F_WRITE), b.table((b.hdr, 16, 0), (b.data, 1, F_WRITE)))


def blk_indirect_after_the_header(b):
    b.chain((b.hdr, 16, 0), b.table((b.data, 512, F_WRITE), (b.status, 1, F_WRITE)))
    return 513


def blk_header_split_by_the_table(b):
    b.chain((b.hdr, 8, 0), b.table((b.hdr + 8, 8, 0), (b.status, 1, F_WRITE)))
    return 1


def blk_zero_lengths_skipped(b):
    b.chain((b.hdr, 16, 0), (NOWHERE, 0, 0), (NOWHERE, 0, F_WRITE), (b.status, 1, F_WRITE),
            (NOWHERE, 0, F_WRITE))
    return 1


def blk_only_zero_lengths(b):
    b.chain((NOWHERE, 0, 0), (b.hdr, 0, 0), (NOWHERE, 0, F_WRITE))


def blk_no_writable_byte(b):
    b.chain((b.hdr, 16, 0), (NOWHERE, 0, F_WRITE))


def _blk_of(b, total):
    """A request of `total` bytes: the 16-byte header, then writable
    pieces of BIG; the status byte is the last piece's last."""
    descs, left = [(b.hdr, 16, 0)], total - 16
    while left:
        piece = min(left, BIG_SIZE)
        left -= piece
        descs.append((b.g.start(BIG), piece, F_WRITE))
    b.chain(*descs)
    b.status = b.g.start(BIG) + descs[-1][1] - 1


def blk_at_the_byte_limit(b):
    """Served: 64 MiB - 17 bytes to read is no multiple of 512 (IOERR)."""
    _blk_of(b, BLK_MAX_CHAIN)
    return 1


def blk_one_byte_over_the_limit(b):
    _blk_of(b, BLK_MAX_CHAIN + 1)


BLK_CASES = [
    (blk_readable_writable_readable, RingError.DIR),
    (blk_zero_length_readable_after_writable, RingError.DIR),
    (blk_readable_after_zero_length_writable, RingError.DIR),
    (blk_readable_in_a_table_after_writable, RingError.DIR),
    (blk_indirect_after_the_header, S_OK),
    (blk_header_split_by_the_table, S_OK),
    (blk_zero_lengths_skipped, S_OK),
    (blk_only_zero_lengths, RingError.BLK_HDR),
    (blk_no_writable_byte, RingError.BLK_STATUS),
    (blk_at_the_byte_limit, S_IOERR),
    (blk_one_byte_over_the_limit, RingError.LEN),
]


def _run_blk_case(build, expected):
    """expected: a RingError, or the status byte of a served request (the
    case returns the used length it must get)."""
    b = Blk()
    used_len = build(b)
    b.rig.dev.run_burst(0)
    broken = b.rig.broken(b.rig.dev, 0)
    if isinstance(expected, RingError):
        assert broken == expected, b.rig.dev.ring_state(0)
        assert b.ring.used_idx() == 0
    else:
        assert broken == 0, RingError(broken)
        assert b.ring.used_idx() == 1 and b.ring.used(0) == (0, used_len)
        assert b.g.read(b.status, 1) == bytes([expected])
    b.rig.close()


@pytest.mark.parametrize("build,expected", BLK_CASES, ids=[c[0].__name__ for c in BLK_CASES])
def test_blk_chain(build, expected):
    run_forked(_run_blk_case, build, expected)
