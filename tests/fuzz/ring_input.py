"""How the ring fuzz targets (target_net_ring.py, target_blk_ring.py) turn
fuzz input into guest memory: a cursor over the bytes (zeros once they run
out, so every input is a complete case), and a compact descriptor encoding
that mostly lands inside guest memory -- raw 64-bit addresses would stop
nearly every chain at its first descriptor, and the fuzzer would never see
the deeper code.

Compact descriptor (5 bytes, or 13 with a raw address):
  byte 0  where: low 3 bits pick the base -- 0: buffers + 16 * off,
          1: buffers + 4096 + 16 * off, 2: buffers + off (any alignment),
          3: the end of the last buffer region - off (ends at the guard),
          4: the end of the first buffer region - off (crosses into the
          next, adjacent in guest-physical space), 5: the ring areas +
          16 * off, 6: a raw 64-bit address (8 more bytes), 7: the end of
          the last region + off (outside);  bits 3..7: the length is
          byte 2 << (bits % 17)
  byte 1  off
  byte 2  length
  byte 3  flags (below 0xF0: its low 3 bits, NEXT/WRITE/INDIRECT; else as is)
  byte 4  next (mod 2 * size: sometimes out of range)
"""
from __future__ import annotations

import struct

_DESC = struct.Struct("<QIHH")


class Cursor:
    """Bytes from the input, 0 once they run out."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def u8(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out if len(out) == n else out.ljust(n, b"\0")

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "little")

    def u64(self) -> int:
        return int.from_bytes(self.take(8), "little")

    def rest(self) -> bytes:
        out = self.data[self.pos:]
        self.pos = len(self.data)
        return out


class Places:
    """The guest-physical landmarks a compact descriptor may point at."""

    def __init__(self, buf: int, buf_end: int, buf2_end: int, rings: int) -> None:
        self.buf, self.buf_end, self.buf2_end, self.rings = buf, buf_end, buf2_end, rings


def compact_desc(c: Cursor, p: Places, size: int) -> bytes:
    """One 16-byte descriptor from the cursor (see the module docstring)."""
    where, off, length, flags, nxt = c.take(5)
    length <<= (where >> 3) % 17
    nxt %= 2 * size
    base = where & 7
    if base == 0:
        addr = p.buf + 16 * off
    elif base == 1:
        addr = p.buf + 4096 + 16 * off
    elif base == 2:
        addr = p.buf + off
    elif base == 3:
        addr = p.buf2_end - off
    elif base == 4:
        addr = p.buf_end - off
    elif base == 5:
        addr = p.rings + 16 * off
    elif base == 6:
        addr = c.u64()
    else:
        addr = p.buf2_end + off
    return _DESC.pack(addr & 0xFFFF_FFFF_FFFF_FFFF, length & 0xFFFF_FFFF,
                      (flags & 7) if flags < 0xF0 else flags, nxt)


def write_buffers(c: Cursor, p: Places, size: int, guest, buf_gpa: int, page: int) -> None:
    """The buffers' bytes (frames, requests) at ``buf_gpa``, and somewhere in
    them (maybe misaligned) an indirect table of up to 8 compact descriptors."""
    n = c.u8() % 9
    off = c.u16() % (2 * page)
    table = b"".join(compact_desc(c, p, size) for _ in range(n))
    blob = c.rest()[:3 * page]
    if blob:
        guest.write(buf_gpa, blob)
    if table:
        guest.write(buf_gpa + off, table)


def avail_heads(c: Cursor, n: int, size: int) -> list[int]:
    """n avail entries: a byte each, mostly a head in range; 0xFF takes the
    next two bytes as the raw 16-bit value."""
    out = []
    for _ in range(n):
        b = c.u8()
        out.append(c.u16() if b == 0xFF else b % (size + 1))
    return out


# -- the other way round: building inputs (seeds, regression cases)

def enc_desc(base: int, off: int = 0, length: int = 0, flags: int = 0, nxt: int = 0,
             raw: int | None = None) -> bytes:
    """The compact encoding of one descriptor (see the module docstring)."""
    shift = 0
    while length >> shift > 255:
        shift += 1
    if length != (length >> shift) << shift:
        raise ValueError(f"length {length} is not encodable")
    out = bytes([base | (shift << 3), off, length >> shift, flags, nxt])
    return out + (raw.to_bytes(8, "little") if base == 6 else b"")


def enc_ring(descs: list[bytes], size: int, heads: list[int], base: int = 0,
             used: int = 0, count: int | None = None, used_event: int | None = None) -> bytes:
    """A ring's part of an input: its descriptors (padded with zeros to
    `size`), base, avail count and heads (raw 16-bit beyond a byte), used
    index and, with EVENT_IDX, used_event."""
    out = b"".join(descs) + bytes(5 * (size - len(descs)))
    out += base.to_bytes(2, "little") + bytes([len(heads) if count is None else count])
    for h in heads:
        out += bytes([h]) if h < min(size + 1, 0xFF) else b"\xff" + h.to_bytes(2, "little")
    out += used.to_bytes(2, "little")
    if used_event is not None:
        out += used_event.to_bytes(2, "little")
    return out


def enc_table(off: int, descs: list[bytes]) -> bytes:
    """An indirect table of compact descriptors at buffers + off."""
    return bytes([len(descs)]) + off.to_bytes(2, "little") + b"".join(descs)
