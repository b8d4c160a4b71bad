"""Guest RAM for a test front-end: memfd-backed regions it shares with the
back-end (SET_MEM_TABLE / ADD_MEM_REG), with guest-physical addresses, our
own addresses of them, and a bump allocator for rings and buffers.

    ram = GuestRam(32 * MiB, regions=2, gpa_gap=MiB)
    gpa = ram.alloc(4096, align=PAGE)
    ram.write(gpa, b"...")
    ram.close()
"""
from __future__ import annotations

import fcntl
import mmap
import os
from dataclasses import dataclass, field

from vfe.vhost.memory import address_of
from vfe.vhost.messages import MemoryRegion
from vfe.vhost.transport import close_fds

PAGE = 4096
MiB = 1 << 20


@dataclass
class RamRegion:
    gpa: int
    size: int
    uva: int               # our (the front-end's) address of the region's first byte
    mmap_offset: int       # offset of the region in its memfd
    fd: int
    view: memoryview = field(repr=False)    # exactly the region
    used: int = 0          # bump allocator

    def to_message(self) -> MemoryRegion:
        return MemoryRegion(self.gpa, self.size, self.uva, self.mmap_offset)


class GuestRam:
    """Guest RAM from memfd_create, split into regions.

    ``shared_fd=True`` keeps all regions in one memfd at increasing offsets
    (as QEMU does for RAM below and above 4 GiB), so ``mmap_offset`` is
    non-zero for every region but the first.  ``gpa_gap`` leaves holes
    between regions in guest-physical space.  ``seals`` (e.g.
    ``fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW``, what QEMU's
    memory-backend-memfd adds) seals the memfds once sized; without them a
    test may shrink the memory under the back-end (``fds``).
    """

    def __init__(self, size: int = 32 * MiB, regions: int = 1, *, shared_fd: bool = True,
                 gpa_base: int = 0, gpa_gap: int = 0, fd_offset: int = 0, seals: int = 0) -> None:
        if regions < 1 or size % (regions * PAGE):
            raise ValueError(f"{size} bytes do not split into {regions} page-multiple regions")
        self.region_size = size // regions
        self.regions: list[RamRegion] = []
        self._maps: list[mmap.mmap] = []
        self._fds: list[int] = []
        mfd_flags = os.MFD_ALLOW_SEALING if seals else 0
        try:
            if shared_fd:
                fd = os.memfd_create("vfe-guest-ram", os.MFD_CLOEXEC | mfd_flags)
                self._fds.append(fd)
                os.ftruncate(fd, fd_offset + size)
                self._seal(fd, seals)
                mm = mmap.mmap(fd, fd_offset + size, flags=mmap.MAP_SHARED)
                self._maps.append(mm)
                base = address_of(mm)
                whole = memoryview(mm)
                for k in range(regions):
                    off = fd_offset + k * self.region_size
                    self.regions.append(RamRegion(
                        gpa=gpa_base + k * (self.region_size + gpa_gap), size=self.region_size,
                        uva=base + off, mmap_offset=off, fd=fd,
                        view=whole[off:off + self.region_size]))
                whole.release()
            else:
                for k in range(regions):
                    fd = os.memfd_create(f"vfe-guest-ram{k}", os.MFD_CLOEXEC | mfd_flags)
                    self._fds.append(fd)
                    os.ftruncate(fd, fd_offset + self.region_size)
                    self._seal(fd, seals)
                    mm = mmap.mmap(fd, fd_offset + self.region_size, flags=mmap.MAP_SHARED)
                    self._maps.append(mm)
                    self.regions.append(RamRegion(
                        gpa=gpa_base + k * (self.region_size + gpa_gap), size=self.region_size,
                        uva=address_of(mm) + fd_offset, mmap_offset=fd_offset, fd=fd,
                        view=memoryview(mm)[fd_offset:fd_offset + self.region_size]))
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _seal(fd: int, seals: int) -> None:
        if seals:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)

    @property
    def fds(self) -> list[int]:
        """The memfds behind the regions (tests shrink or inspect them)."""
        return list(self._fds)

    def region_of(self, gpa: int) -> tuple[RamRegion, int]:
        for r in self.regions:
            if r.gpa <= gpa < r.gpa + r.size:
                return r, gpa - r.gpa
        raise ValueError(f"gpa {gpa:#x} is not guest RAM")

    def gpa_to_uva(self, gpa: int) -> int:
        r, off = self.region_of(gpa)
        return r.uva + off

    def alloc(self, size: int, align: int = 64) -> int:
        """Carve ``size`` bytes (never crossing a region); returns the gpa."""
        for r in self.regions:
            start = (r.used + align - 1) & ~(align - 1)
            if start + size <= r.size:
                r.used = start + size
                return r.gpa + start
        raise MemoryError(f"guest RAM exhausted ({size} bytes wanted)")

    def read(self, gpa: int, length: int) -> bytes:
        r, off = self.region_of(gpa)
        if off + length > r.size:
            raise ValueError("read crosses a region end")
        return bytes(r.view[off:off + length])

    def write(self, gpa: int, data: bytes) -> None:
        r, off = self.region_of(gpa)
        if off + len(data) > r.size:
            raise ValueError("write crosses a region end")
        r.view[off:off + len(data)] = data

    def close(self) -> None:
        for r in self.regions:
            r.view.release()
        self.regions = []
        for mm in self._maps:
            mm.close()
        self._maps = []
        close_fds(self._fds)
        self._fds = []
