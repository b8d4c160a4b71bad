"""vhost-user protocol core: bytes, chunking and real fds through FrameAssembler + Session/BackendProtocol.

The input decides the message bytes, how they are cut into ``recvmsg``
chunks, and which real fds (memfds of 4 KiB, 64 KiB or 16 MiB, eventfds,
pipe ends) ride on which chunk.  It runs through tests.harness.vhost_harness,
which checks after every message that fds, mappings and ring states are
consistent, and after each session (EOF or a dropped connection) that every
fd is closed and every mapping released.  Only ``ProtocolError`` may come
out of the back-end (it drops the connection); anything else is a finding.

Input format (a byte stream; reads past its end give zeros and stop; at
most MAX_RECORDS records and MAX_SESSIONS connections are used):

    config    bit 0: blk device (else net); bits 1-4: how far a running ring
              moves before it is stopped (the engine's answer to a stop);
              bit 5: every connection starts with a valid handshake
              (protocol features incl. REPLY_ACK, owner, features, a 16 MiB
              memory table), so short inputs reach the ring states
    record*   op: op & 3 selects
        0 MSG   request u8, flags u8 (xor 1: 0 is version 1), payload size
                u16le, payload, fd spec, cut: bits 0-6 cut the message in
                two at that fraction (0: one chunk); bit 7 glues its last
                chunk to the next one (no recvmsg boundary between them)
        1 RAW   size u8, bytes (any framing), fd spec
        2 EOF   the front-end closes; a new connection starts
        3 FAULT op bit 2: the engine's next ring start fails
    fd spec   bits 0-3: count (at most 9), bit 4: on the message's last
              chunk (else its first); then one kind byte per fd (FdKind)
"""
from __future__ import annotations

import logging
import os
import struct
import sys

from tests.harness.vhost_harness import Connection, FdKind, memfd_maps
from vfe.vhost.framing import encode_message
from vfe.virtio.constants import F, bit

NATIVE = False          # pure Python under test: no instrumented engine needed
MAX_LEN = 2048
MAX_FDS = 48            # per input: bounds the cost of one run
MAX_RECORDS = 64
MAX_SESSIONS = 4        # per input: later connections add cost, rarely coverage


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def u8(self) -> int:
        if self.pos >= len(self.data):
            self.pos += 1
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        return self.u8() | self.u8() << 8

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out


UVA0 = 0x7F00_0000_0000        # where the handshake's memory sits for the front-end


def _handshake(blk: bool) -> list[tuple[bytes, tuple[FdKind, ...]]]:
    from tests.harness.vhost_harness import device_spec
    from vfe.vhost.messages import MemoryRegion, MemTable, Request, U64

    spec = device_spec(blk)
    return [
        (encode_message(Request.SET_PROTOCOL_FEATURES, U64(spec.protocol_features).encode()), ()),
        (encode_message(Request.SET_OWNER), ()),
        (encode_message(Request.SET_FEATURES,
                        U64(spec.features & ~bit(F.VHOST_LOG_ALL)).encode()), ()),
        (encode_message(Request.SET_MEM_TABLE,
                        MemTable((MemoryRegion(0, 16 << 20, UVA0, 0),)).encode()),
         (FdKind.MEMFD_16M,)),
    ]


_HANDSHAKES = {}


class _Stream:
    """The front-end's side: turns records into delivered chunks."""

    def __init__(self, conn: Connection, handshake: bool) -> None:
        self.conn = conn
        self.pending = b""          # glued bytes not delivered yet
        self.pending_fds: list[int] = []
        self.fds_made = 0
        self.handshake = handshake
        self.greeted = 0            # the session the handshake went to

    def greet(self) -> None:
        """A new connection (the first, or after a drop/EOF): the handshake."""
        if not self.handshake or self.greeted == self.conn.sessions:
            return
        self.greeted = self.conn.sessions
        if self.conn.blk not in _HANDSHAKES:
            _HANDSHAKES[self.conn.blk] = _handshake(self.conn.blk)
        for data, kinds in _HANDSHAKES[self.conn.blk]:
            self.conn.deliver(data, [self.conn.fds.make(k) for k in kinds])

    def fds(self, r: _Reader) -> tuple[list[int], bool]:
        spec = r.u8()
        count, on_last = min(spec & 0x0F, 9), bool(spec & 0x10)
        kinds = [r.u8() % len(FdKind) for _ in range(count)]
        if self.fds_made + count > MAX_FDS:
            return [], on_last
        self.fds_made += count
        return [self.conn.fds.make(FdKind(k)) for k in kinds], on_last

    def send(self, chunk: bytes, fds: list[int], glue: bool = False) -> None:
        data, fds = self.pending + chunk, self.pending_fds + fds
        if glue:
            self.pending, self.pending_fds = data, fds
            return
        self.pending, self.pending_fds = b"", []
        self.conn.deliver(data, fds)

    def eof(self) -> None:
        if self.pending or self.pending_fds:
            self.send(b"", [])
        self.conn.end()


def run(conn: Connection, r: _Reader, handshake: bool) -> None:
    stream = _Stream(conn, handshake)
    for _ in range(MAX_RECORDS):
        if r.left <= 0 or conn.sessions > MAX_SESSIONS:
            break
        stream.greet()
        op = r.u8()
        kind = op & 3
        if kind == 0:
            request, flags, size = r.u8(), r.u8() ^ 1, r.u16()
            data = encode_message(request, r.take(size), flags)
            fds, on_last = stream.fds(r)
            cut = r.u8()
            frac, glue = cut & 0x7F, bool(cut & 0x80)
            at = 1 + frac * (len(data) - 1) // 128 if frac else len(data)
            pieces = [data[:at], data[at:]] if at < len(data) else [data]
            for i, piece in enumerate(pieces):
                last = i == len(pieces) - 1
                mine = fds if (last if on_last else i == 0) else []
                stream.send(piece, mine, glue=glue and last)
        elif kind == 1:
            raw = r.take(r.u8())
            fds, _ = stream.fds(r)
            stream.send(raw, fds)
        elif kind == 2:
            stream.eof()
        else:
            conn.rings.fail_next_start = bool(op & 4)
    stream.eof()


_MEMFD_MAPS = None      # the process's memfd mappings between inputs (checked after each)


def setup() -> None:
    global _MEMFD_MAPS
    logging.disable(logging.CRITICAL)     # the back-end logs every refused message
    _MEMFD_MAPS = memfd_maps()


def fuzz_one(data: bytes) -> None:
    if not data:
        return
    conn = Connection(blk=bool(data[0] & 1), maps_now=_MEMFD_MAPS)
    conn.rings.stop_step = data[0] >> 1 & 0xF
    try:
        run(conn, _Reader(data[1:]), handshake=bool(data[0] & 0x20))
        conn.check_process()
    finally:
        conn.close()


# -- seeds (python3 -m tests.fuzz.target_protocol DIR writes them) -----------------


def _seeds() -> dict[str, bytes]:
    from tests.harness.vhost_harness import device_spec
    from vfe.devices.net import NET_PROTOCOL_FEATURES
    from vfe.devices.blk import BLK_PROTOCOL_FEATURES
    BLK_FEATURES = device_spec(True).features         # what the target's devices offer
    NET_FEATURES = device_spec(False).features
    from vfe.vhost.messages import (
        Config, Inflight, Log, MemoryRegion, MemTable, NEED_REPLY, Request as R,
        SingleMemRegion, U64, VringAddr, VringFile, VringState,
    )

    uva0, size = 0x7F00_0000_0000, 16 << 20

    def msg(req, payload=b"", fds=(), flags=0, cut=0):
        payload = payload.encode() if hasattr(payload, "encode") else bytes(payload)
        spec = len(fds)
        return (bytes([0, int(req), flags]) + struct.pack("<H", len(payload)) + payload
                + bytes([spec]) + bytes(int(k) for k in fds) + bytes([cut]))

    def addr(i, num=256, flags=0, log=0):
        start = uva0 + 0x10000 * (i + 1)
        avail = start + 16 * num
        used = (avail + 6 + 2 * num + 3) & ~3
        return VringAddr(i, flags, start, used, avail, log)

    def ring(i, num=256, call_first=True):
        out = b""
        if call_first:
            out += msg(R.SET_VRING_CALL, U64(VringFile(i, False).value), [FdKind.EVENTFD])
        out += msg(R.SET_VRING_NUM, VringState(i, num))
        out += msg(R.SET_VRING_BASE, VringState(i, 0))
        out += msg(R.SET_VRING_ADDR, addr(i, num))
        out += msg(R.SET_VRING_KICK, U64(VringFile(i, False).value), [FdKind.EVENTFD])
        return out

    table = MemTable((MemoryRegion(0, size, uva0, 0),))
    net_hello = (msg(R.GET_FEATURES) + msg(R.GET_PROTOCOL_FEATURES)
                 + msg(R.SET_PROTOCOL_FEATURES, U64(NET_PROTOCOL_FEATURES))
                 + msg(R.GET_QUEUE_NUM) + msg(R.SET_OWNER)
                 + msg(R.SET_FEATURES, U64(NET_FEATURES & ~bit(F.VHOST_LOG_ALL)))
                 + msg(R.SET_MEM_TABLE, table, [FdKind.MEMFD_16M]))
    stop = msg(R.GET_VRING_BASE, VringState(0, 0)) + msg(R.GET_VRING_BASE, VringState(1, 0))
    seeds = {
        "net-start-stop": bytes([2]) + net_hello + ring(0) + ring(1)
        + msg(R.SET_VRING_ENABLE, VringState(0, 1)) + msg(R.SET_VRING_ENABLE, VringState(1, 1))
        + stop + ring(0, call_first=False) + bytes([2]),
        "net-reply-ack-memslots": bytes([4]) + net_hello
        + msg(R.GET_MAX_MEM_SLOTS)
        + msg(R.ADD_MEM_REG, SingleMemRegion(MemoryRegion(size, 1 << 16, uva0 + size, 0)),
              [FdKind.MEMFD_64K], flags=NEED_REPLY)
        + ring(0) + msg(R.SET_VRING_NUM, VringState(0, 512), flags=NEED_REPLY)
        + msg(R.REM_MEM_REG, SingleMemRegion(MemoryRegion(size, 1 << 16, uva0 + size, 0)),
              flags=NEED_REPLY)
        + msg(R.SET_MEM_TABLE, MemTable((MemoryRegion(0, 1 << 20, uva0, 0),)),
              [FdKind.MEMFD_4K], flags=NEED_REPLY)
        + msg(R.NET_SET_MTU, U64(1500), flags=NEED_REPLY) + stop,
        "net-migration-log": bytes([6]) + net_hello + ring(0) + ring(1)
        + msg(R.SET_LOG_BASE, Log(4096, 0), [FdKind.MEMFD_4K])
        + msg(R.SET_FEATURES, U64(NET_FEATURES))
        + msg(R.SET_VRING_ADDR, addr(0, flags=1, log=0x11000))
        + msg(R.SEND_RARP, U64(0x5254_0012_3456)) + stop + msg(R.RESET_OWNER),
        "net-split-glued": bytes([2]) + net_hello
        + ring(0)[:-1] + bytes([0x40]) + msg(R.GET_VRING_BASE, VringState(0, 0), cut=0xC0)
        + msg(R.GET_STATUS) + bytes([3 | 4]) + ring(1),
        "blk-inflight": bytes([3]) + msg(R.GET_FEATURES) + msg(R.GET_PROTOCOL_FEATURES)
        + msg(R.SET_PROTOCOL_FEATURES, U64(BLK_PROTOCOL_FEATURES)) + msg(R.SET_OWNER)
        + msg(R.GET_CONFIG, Config(0, 60, 0, bytes(60)))
        + msg(R.GET_INFLIGHT_FD, Inflight(0, 0, 2, 256))
        + msg(R.SET_INFLIGHT_FD, Inflight(1 << 16, 0, 2, 256), [FdKind.MEMFD_64K])
        + msg(R.SET_FEATURES, U64(BLK_FEATURES & ~bit(F.VHOST_LOG_ALL)))
        + msg(R.SET_MEM_TABLE, table, [FdKind.MEMFD_16M]) + ring(0) + ring(1) + stop
        + msg(R.SET_STATUS, U64(0x0F)),
        "handshake-net-rings": bytes([0x22]) + ring(0) + ring(1) + stop
        + msg(R.SET_VRING_KICK, U64(VringFile(0, True).value))
        + msg(R.SET_VRING_CALL, U64(VringFile(1, False).value), [FdKind.PIPE_WRITE])
        + msg(R.SET_VRING_ENABLE, VringState(0, 1)) + bytes([2]) + ring(2),
        "handshake-blk-inflight": bytes([0x23])
        + msg(R.SET_INFLIGHT_FD, Inflight(1 << 16, 0, 2, 256), [FdKind.MEMFD_64K])
        + ring(0) + ring(1) + stop
        + msg(R.SET_INFLIGHT_FD, Inflight(4096, 0, 1, 64), [FdKind.MEMFD_4K], flags=NEED_REPLY),
        "raw-garbage": bytes([0]) + bytes([1, 20]) + b"\x05\0\0\0\x01\0\0\0\xff\xff\0\0garbage!"
        + bytes([1, FdKind.PIPE_READ]) + bytes([2]),
    }
    return seeds


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__),
                                                             "corpus", "protocol")
    os.makedirs(out, exist_ok=True)
    for name, data in _seeds().items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    print(f"wrote {len(_seeds())} seeds to {out}")
