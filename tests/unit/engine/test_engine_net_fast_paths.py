"""The net data path's fast paths and the fallbacks a guest can force, both
run on guarded memory (tests/harness/engine_rig.py: every region between
PROT_NONE pages, the piece under test ending exactly at one, so reading or
writing one byte too many kills the case).

Fast paths (cython_ext/netdata.pxd): the virtio-net header and both MACs
read in place when the chain's first piece holds them (else copied out of
the pieces); the frame copied with one memmove when the RX buffer is one
piece and the frame sits in one source piece (else the scatter-gather
copy); one RX ring lock per run of frames to one destination; a learned
source MAC not looked up again within a burst.  Each case checks the bytes
delivered, and the MAC cases check the decoded MACs through port security
(a frame from the configured MAC passes, one differing in the last byte is
dropped as spoofed), so a wrong byte order or a missed byte fails.
"""
from __future__ import annotations

import struct

from tests.harness.engine_rig import (
    F_NEXT, F_WRITE, FEAT_INDIRECT, FEAT_MRG_RXBUF, FEAT_VERSION_1, PAGE, Guest, NetRig,
    RawRing, ring_at_ends,
)
from tests.harness.guarded import run_forked

SIZE = 8
# regions: TX ring of a, RX ring of b, RX ring of c (desc, avail, used
# each), frame buffers, then one region whose end is the guard page pieces
# are placed against, and one for RX buffers
TXD, TXA, TXU, RXD, RXA, RXU, CXD, CXA, CXU, BUF, EDGE, RXBUF = range(12)
REGIONS = [(0x10000 * (i + 1), PAGE) for i in range(9)] + [
    (0x100000, PAGE), (0x200000, PAGE), (0x300000, 2 * PAGE)]
SRC = "02:00:00:00:00:01"
FRAME = b"\xff" * 6 + bytes.fromhex("020000000001") + b"\x08\x00" + bytes(range(100))
OTHER_SRC = FRAME[:11] + b"\x02" + FRAME[12:]          # source 02:00:00:00:00:02


class Net:
    """Devices a -> b (and c with three=True), one queue pair each."""

    def __init__(self, features: int = FEAT_VERSION_1 | FEAT_INDIRECT, three: bool = False) -> None:
        self.features = features
        self.hdr = 12 if features & (FEAT_VERSION_1 | FEAT_MRG_RXBUF) else 10
        self.g = Guest(REGIONS)
        self.rig = NetRig(self.g, features)
        self.tx = ring_at_ends(self.g, SIZE, TXD, TXA, TXU)
        self.rx = ring_at_ends(self.g, SIZE, RXD, RXA, RXU)
        self.rig.start(self.rig.a, 1, self.tx)
        self.rig.start(self.rig.b, 0, self.rx)
        self.c = self.cx = None
        if three:
            self.c = self.rig.engine.new_net_device(2)
            self.c.set_memory(self.g.table())
            self.c.set_features(features)
            self.cx = ring_at_ends(self.g, SIZE, CXD, CXA, CXU)
            self.rig.start(self.c, 0, self.cx)

    def post_rx(self, ring: RawRing, base: int, buffers: int, length: int) -> None:
        for i in range(buffers):
            ring.set_desc(i, base + length * i, length, F_WRITE)
        ring.post(*range(buffers))

    def tx_pieces(self, first: int, first_at_edge: bool, data: bytes, head: int = 0) -> None:
        """Header + data on a's TX ring as a chain of two pieces, the first
        holding `first` bytes; with first_at_edge it ends at a guard page."""
        whole = bytes(self.hdr) + data
        a = self.g.end(EDGE) - first if first_at_edge else self.g.start(BUF) + 512 * head
        b = self.g.start(BUF) + 512 * head + 256
        self.g.write(a, whole[:first])
        self.g.write(b, whole[first:])
        self.tx.set_desc(2 * head, a, first, F_NEXT, 2 * head + 1)
        self.tx.set_desc(2 * head + 1, b, len(whole) - first)
        self.tx.post(2 * head)

    def tx_one_piece(self, data: bytes, head: int = 0, at_edge: bool = False) -> None:
        whole = bytes(self.hdr) + data
        a = self.g.end(EDGE) - len(whole) if at_edge else self.g.start(BUF) + 512 * head
        self.g.write(a, whole)
        self.tx.set_desc(head, a, len(whole))
        self.tx.post(head)

    def received(self, ring: RawRing, base: int, length: int) -> list[tuple[bytes, int]]:
        """(frame, num_buffers) per used entry: a frame spread over several
        buffers (mergeable) is joined from the buffers it says it used."""
        out, i = [], 0
        while i < ring.used_idx():
            head, n = ring.used(i)
            data = self.g.read(base + length * head, n)
            nbuf = struct.unpack_from("<H", data, 10)[0] if self.hdr == 12 else 1
            for k in range(1, nbuf if self.features & FEAT_MRG_RXBUF else 1):
                h, m = ring.used(i + k)
                data += self.g.read(base + length * h, m)
            out.append((data[self.hdr:], nbuf))
            i += max(nbuf, 1) if self.features & FEAT_MRG_RXBUF else 1
        return out


def _check_macs_through_port_security(build) -> None:
    """a's configured MAC is FRAME's source: FRAME passes, OTHER_SRC is
    counted as spoofed; both laid out by build(net, data, head)."""
    n = Net()
    n.rig.a.set_port_mac(SRC)
    base = n.g.start(RXBUF)
    n.post_rx(n.rx, base, 4, 512)
    build(n, FRAME, 0)
    assert n.rig.a.run_burst(1) == 1
    build(n, OTHER_SRC, 1)
    assert n.rig.a.run_burst(1) == 1
    assert n.rig.broken(n.rig.a, 1) == 0 and n.rig.broken(n.rig.b, 0) == 0
    assert n.received(n.rx, base, 512) == [(FRAME, 1)]
    assert n.rig.a.switch_stats()["spoofed"] == 1
    n.rig.close()


def test_macs_read_in_place_up_to_a_guard_page():
    """Fast path: the first piece is exactly header + 12 MAC bytes and ends
    at a guard page (the 8-byte MAC loads must stay inside the 12)."""
    def build(n, data, head):
        n.tx_pieces(n.hdr + 12, True, data, head)
    run_forked(_check_macs_through_port_security, build)


def test_macs_split_across_pieces():
    """Fallback: the first piece ends (at a guard page) one byte before the
    source MAC's last byte, which the second piece holds."""
    def build(n, data, head):
        n.tx_pieces(n.hdr + 11, True, data, head)
    run_forked(_check_macs_through_port_security, build)


def test_header_whole_but_no_mac_in_the_first_piece():
    def build(n, data, head):
        n.tx_pieces(n.hdr, True, data, head)
    run_forked(_check_macs_through_port_security, build)


def test_one_piece_frame_ending_at_a_guard_page():
    def build(n, data, head):
        n.tx_one_piece(data, head, at_edge=head == 0)
    run_forked(_check_macs_through_port_security, build)


def test_short_header_read_in_place():
    """Without VERSION_1 and mergeable buffers the header is 10 bytes: read
    in place from a first piece of exactly header + MACs at a guard page,
    and written as 10 bytes to b."""
    def case():
        n = Net(features=FEAT_INDIRECT)
        assert n.hdr == 10
        n.rig.a.set_port_mac(SRC)
        base = n.g.start(RXBUF)
        n.post_rx(n.rx, base, 4, 512)
        n.tx_pieces(n.hdr + 12, True, FRAME)
        assert n.rig.a.run_burst(1) == 1
        assert n.received(n.rx, base, 512) == [(FRAME, 1)]
        assert n.rx.used(0) == (0, 10 + len(FRAME))
        n.rig.close()
    run_forked(case)


def test_rx_buffer_exactly_the_frame_at_a_guard_page():
    """Fast path on the RX side: one one-piece buffer of exactly header +
    frame ending at a guard page."""
    def case():
        n = Net()
        end = n.g.end(RXBUF)
        n.rx.set_desc(0, end - 12 - len(FRAME), 12 + len(FRAME), F_WRITE)
        n.rx.post(0)
        n.tx_one_piece(FRAME)
        assert n.rig.a.run_burst(1) == 1
        assert n.g.read(end - len(FRAME), len(FRAME)) == FRAME
        assert n.rx.used(0) == (0, 12 + len(FRAME))
        n.rig.close()
    run_forked(case)


def test_rx_buffer_of_two_pieces_cutting_the_header():
    """Fallback: one RX buffer as two descriptors, the first 8 bytes (part
    of the header), the second ending at a guard page."""
    def case():
        n = Net()
        first = n.g.start(RXBUF)
        rest = n.g.end(RXBUF) - (12 + len(FRAME) - 8)
        n.rx.set_desc(0, first, 8, F_WRITE | F_NEXT, 1)
        n.rx.set_desc(1, rest, 12 + len(FRAME) - 8, F_WRITE)
        n.rx.post(0)
        n.tx_one_piece(FRAME)
        assert n.rig.a.run_burst(1) == 1
        got = n.g.read(first, 8) + n.g.read(rest, 12 + len(FRAME) - 8)
        assert got[12:] == FRAME and got[10:12] == b"\x01\x00"
        assert n.rx.used(0) == (0, 12 + len(FRAME))
        n.rig.close()
    run_forked(case)


def test_mergeable_frame_over_several_buffers():
    """Multi-buffer RX: 48-byte buffers, the last one ending at a guard
    page; num_buffers says how many, the bytes join up to the frame."""
    def case():
        n = Net(features=FEAT_VERSION_1 | FEAT_MRG_RXBUF)
        length = 48
        need = -(-(12 + len(FRAME)) // length)
        base = n.g.end(RXBUF) - length * need
        n.post_rx(n.rx, base, need, length)
        n.tx_one_piece(FRAME)
        assert n.rig.a.run_burst(1) == 1
        assert n.received(n.rx, base, length) == [(FRAME, need)]
        assert n.rig.broken(n.rig.b, 0) == 0
        n.rig.close()
    run_forked(case)


def test_no_room_for_the_second_buffer_keeps_the_frame():
    """A mergeable frame to b's MAC (unicast) needing two buffers with one
    posted: nothing is written or consumed, the sender waits (the run keeps
    no stale state: once the guest posts more, the frame goes through)."""
    def case():
        n = Net(features=FEAT_VERSION_1 | FEAT_MRG_RXBUF)
        n.rig.b.set_port_mac("02:00:00:00:00:0b")
        frame = bytes.fromhex("02000000000b") + FRAME[6:]
        base = n.g.start(RXBUF)
        n.rx.set_desc(0, base, 64, F_WRITE)
        n.rx.set_desc(1, base + 64, 64, F_WRITE)
        n.rx.post(0)
        n.tx_one_piece(frame)
        assert n.rig.a.run_burst(1) == 0
        assert n.rx.used_idx() == 0 and n.tx.used_idx() == 0
        n.rx.post(1)
        assert n.rig.a.run_burst(1) == 1
        assert n.received(n.rx, base, 64) == [(frame, 2)]
        n.rig.close()
    run_forked(case)


def test_flood_alternating_destinations_in_one_burst():
    """Each frame of a burst is flooded to b and c: the held RX ring changes
    at every delivery, and both rings are published at the burst's end."""
    def case():
        n = Net(three=True)
        base_b, base_c = n.g.start(RXBUF), n.g.start(RXBUF) + PAGE
        n.post_rx(n.rx, base_b, 4, 512)
        n.post_rx(n.cx, base_c, 4, 512)
        frames = [FRAME[:14] + bytes([i]) * 50 for i in range(3)]
        for i, f in enumerate(frames):
            n.tx_one_piece(f, i)
        assert n.rig.a.run_burst(1) == 3
        assert n.received(n.rx, base_b, 512) == [(f, 1) for f in frames]
        assert n.received(n.cx, base_c, 512) == [(f, 1) for f in frames]
        assert n.rig.b.ring_stats(0)["packets"] == 3 and n.c.ring_stats(0)["packets"] == 3
        assert n.rig.a.ring_stats(1)["packets"] == 3
        n.c.close()
        n.rig.close()
    run_forked(case)


def test_a_broken_destination_ends_the_run():
    """b's second buffer is bad: b stops at the second frame and the rest of
    the burst is dropped for b while c still gets every frame (the lock of
    the broken ring is not kept: the next burst reaches c again)."""
    def case():
        n = Net(three=True)
        base_b, base_c = n.g.start(RXBUF), n.g.start(RXBUF) + PAGE
        n.rx.set_desc(0, base_b, 512, F_WRITE)
        n.rx.set_desc(1, base_b + 512, 512)              # not device-writable
        n.rx.post(0, 1)
        n.post_rx(n.cx, base_c, 4, 512)
        for i in range(3):
            n.tx_one_piece(FRAME, i)
        assert n.rig.a.run_burst(1) == 3
        assert n.rig.broken(n.rig.b, 0) == 7              # RingError.DIR
        assert n.received(n.rx, base_b, 512) == [(FRAME, 1)]
        assert len(n.received(n.cx, base_c, 512)) == 3
        n.tx_one_piece(FRAME, 3)
        assert n.rig.a.run_burst(1) == 1
        assert len(n.received(n.cx, base_c, 512)) == 4
        n.c.close()
        n.rig.close()
    run_forked(case)


def test_source_macs_changing_within_a_burst_are_each_learned():
    """Frames from two source MACs, alternating in one burst: each is
    learned (the remembered one is replaced, not trusted for the other)."""
    def case():
        n = Net()
        base = n.g.start(RXBUF)
        n.post_rx(n.rx, base, 4, 512)
        for i, f in enumerate([FRAME, OTHER_SRC, FRAME, OTHER_SRC]):
            n.tx_one_piece(f, i)
        assert n.rig.a.run_burst(1) == 4
        assert n.rig.a.switch_stats()["learned"] == 2
        n.rig.a.learn_limit = 2
        n.tx_one_piece(FRAME[:6] + bytes.fromhex("020000000003") + FRAME[12:], 4)
        assert n.rig.a.run_burst(1) == 1
        assert n.rig.a.switch_stats()["learn_capped"] == 1
        n.rig.close()
    run_forked(case)


def test_destination_learned_mid_burst_is_looked_up_again():
    """One burst: a frame to the unknown MAC X (flooded to b), a broadcast
    from source X (a learns X), a frame to X again: now a's own MAC, so it
    is not sent anywhere (hairpin).  A destination remembered from the first
    lookup would flood it to b."""
    def case():
        n = Net()
        base = n.g.start(RXBUF)
        n.post_rx(n.rx, base, 4, 512)
        x = bytes.fromhex("02000000000c")
        to_x = x + FRAME[6:]
        from_x = b"\xff" * 6 + x + FRAME[12:]
        for i, f in enumerate([to_x, from_x, to_x]):
            n.tx_one_piece(f, i)
        assert n.rig.a.run_burst(1) == 3
        assert n.received(n.rx, base, 512) == [(to_x, 1), (from_x, 1)]
        n.rig.close()
    run_forked(case)
