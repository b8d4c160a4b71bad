"""A minimal virtio-blk driver over vfe.testing.ring.DriverRing, for the
tests that drive a real daemon's blk devices with the Python front-end
(test_blk_protocol.py, test_blk_inflight.py).  Imported by file name from
tests/protocol (keep the name unique)."""
from __future__ import annotations

import os
import struct
import tempfile
import time

from tests.protocol.daemon_helpers import Daemon

from vfe.guest.controller_process import ControllerProcess
from vfe.testing.frontend import Frontend

T_IN, T_OUT, T_FLUSH, T_GET_ID, T_GET_LIFETIME, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 10, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2


class BlkDaemon(Daemon):
    """daemon_helpers.Daemon with blk devices too (names blk0, blk1, ...)."""

    def __init__(self, nets: dict[str, str], blks: dict[str, str], workers: int = 2) -> None:
        self.dir = tempfile.mkdtemp(prefix="vfe-b-", dir="/tmp")
        self.paths, self.names = {}, {}
        specs = []
        for i, (name, opts) in enumerate(nets.items()):
            self.paths[name] = os.path.join(self.dir, f"{name}.sock")
            self.names[name] = f"net{i}"
            specs.append(f"net,socket={self.paths[name]}" + (f",{opts}" if opts else ""))
        for k, (name, opts) in enumerate(blks.items()):
            self.paths[name] = os.path.join(self.dir, f"{name}.sock")
            self.names[name] = f"blk{k}"
            specs.append(f"blk,socket={self.paths[name]},{opts}")
        self.proc = ControllerProcess(specs, self.dir, mode="adaptive", workers=workers, name="daemon")


class BlkQueue:
    def __init__(self, fe: Frontend, index: int) -> None:
        self.fe = fe
        self.ring = fe.rings[index]
        self.index = index
        # The test front-end carves indirect tables right after the used
        # ring, which is never 16-byte aligned; the engine (like Linux's
        # kmalloc'd tables) wants them aligned: move them up by 2 bytes
        # (we use at most 9 of the 16 slots per table, so they still fit).
        d = self.ring.driver
        d._indirect_off = (d._indirect_off + 15) & ~15

    def _buf(self, data: bytes | int, write: bool) -> tuple[int, int, bool]:
        n = data if isinstance(data, int) else len(data)
        gpa = self.fe.memory.alloc(max(n, 1), align=512)
        self.fe.memory.write(gpa, bytes([0xA5]) * n if isinstance(data, int) else data)
        return gpa, n, write

    def submit(self, kind: int, sector: int = 0, out: bytes = b"", in_len: int = 0, *,
               status: bool = True, header: bytes | None = None, pieces: int = 1,
               indirect: bool = False, kick: bool = True, publish: bool = True) -> int:
        """Queue one request: header, data out (readable), data in
        (writable), status byte, each data part cut into ``pieces``.
        ``publish=False`` leaves avail->idx to a later publish."""
        hdr = struct.pack("<IIQ", kind, 0, sector) if header is None else header
        bufs = [self._buf(hdr, False)]
        for part in _split(len(out), pieces):
            bufs.append(self._buf(out[part[0]:part[1]], False))
        ins = [self._buf(b - a, True) for a, b in _split(in_len, pieces)]
        st = self._buf(b"\xee", True) if status else None
        bufs += ins + ([st] if st else [])
        head = self.ring.driver.add_chain(bufs, indirect=indirect, token=(ins, st),
                                          publish=publish)
        self.last = (ins, st)
        if kick:
            os.eventfd_write(self.ring.kick_fd, 1)
        return head

    def post_raw(self, *heads: int) -> None:
        """Put `heads` into the avail ring as they are (what a hostile
        driver can write), publish everything added so far with one
        avail->idx store, and kick."""
        d = self.ring.driver
        for h in heads:
            d._avail16[2 + d.avail_idx % d.size] = h
            d._avail_idx = (d._avail_idx + 1) & 0xFFFF
        d.publish()
        os.eventfd_write(self.ring.kick_fd, 1)

    def complete(self, n: int = 1, timeout: float = 5.0) -> list[tuple[int, int, bytes]]:
        """Wait for n completions: [(status, used length, data in)], in used order."""
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            for u in self.ring.driver.get_used():
                ins, st = u.token
                data = b"".join(self.fe.memory.read(g, ln) for g, ln, _ in ins)
                status = self.fe.memory.read(st[0], 1)[0] if st else None
                out.append((status, u.length, data))
            if len(out) >= n:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"queue {self.index}: {len(out)} of {n} requests completed")
            time.sleep(0.002)
        return out

    def request(self, kind: int, sector: int = 0, out: bytes = b"", in_len: int = 0, **kw):
        self.submit(kind, sector, out, in_len, **kw)
        return self.complete()[0]

    def read(self, sector: int, nbytes: int, **kw) -> bytes:
        status, length, data = self.request(T_IN, sector, in_len=nbytes, **kw)
        assert status == S_OK and length == nbytes + 1, (status, length)
        return data

    def write(self, sector: int, data: bytes, **kw) -> None:
        status, length, _ = self.request(T_OUT, sector, data, **kw)
        assert status == S_OK and length == 1, (status, length)


def _split(n: int, pieces: int) -> list[tuple[int, int]]:
    if n == 0:
        return []
    step = -(-n // pieces)
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def ranges(*items: tuple[int, int, int]) -> bytes:
    return b"".join(struct.pack("<QII", s, n, f) for s, n, f in items)


