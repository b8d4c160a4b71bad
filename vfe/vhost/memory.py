"""The front-end's memory, mapped into our address space.

Address kinds (names used everywhere in vfe):

- ``gpa``: guest-physical address (descriptor addresses, dirty log),
- ``uva``: the front-end's (QEMU's) virtual address (SET_VRING_ADDR),
- ``hva``: our virtual address of the same byte (what the engine dereferences).

Each region arrives as (gpa, size, uva, mmap_offset, fd).  ``mmap`` offsets
must be page aligned and ``mmap_offset`` need not be, so, like DPDK, we map
``mmap_offset + size`` bytes from file offset 0 and add ``mmap_offset``.

Some facts that bite here:

- Python's ``mmap.mmap`` keeps its own dup of the fd until ``close()`` but
  does not hand it out; the fd passed in stays the caller's to close (the
  protocol closes it right after mapping).  We keep one more dup per region
  (``MappedRegion.fd``, ``LogRegion.fd``): a live update passes it to the
  next controller, which maps the same memory.
- A file shorter than the mapping maps fine but SIGBUSes on access, which
  would kill the daemon on a guest-chosen address.  We ``fstat`` the fd and
  refuse regions that end beyond the file.
- A front-end can still shrink the file later, unless it sealed it
  (``F_SEAL_SHRINK``: QEMU's memory-backend-memfd does by default).  We read
  the seals (``MappedRegion.seals``, ``GuestMemory.can_shrink``); where the
  file may shrink, the engine survives the SIGBUS of a vanished page and
  breaks only that device (cython_ext/includes/guard.h, fault.pxd).  Python
  reads guest memory through the file (``os.pread``), never the mapping,
  so a vanished page is a short read here (GuestMemoryError), not a signal;
  ``write`` and the dirty log's ``mark_dirty`` are for tests only.
- ``ctypes.c_char.from_buffer(mm)`` exports the mmap's buffer, and an mmap
  with live exports cannot be closed ("cannot close exported pointers
  exist").  We take the address and drop the ctypes object at once, and
  ``view()`` memoryviews must be released by their users before ``close()``.
"""
from __future__ import annotations

import bisect
import ctypes
import fcntl
import mmap
import os
import stat
from dataclasses import dataclass, field

from .actions import MemRegion
from .messages import LOG_PAGE


class GuestMemoryError(ValueError):
    """A region cannot be mapped, or an address is not mapped."""


def _mmap_fd(fd: int, length: int) -> mmap.mmap:
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise GuestMemoryError(f"fd {fd}: {exc}") from None
    if stat.S_ISREG(st.st_mode) and st.st_size < length:
        raise GuestMemoryError(f"fd {fd}: file is {st.st_size} bytes, mapping needs {length}")
    try:
        return mmap.mmap(fd, length, flags=mmap.MAP_SHARED,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
    except (OSError, ValueError, OverflowError) as exc:
        raise GuestMemoryError(f"fd {fd}: mmap of {length} bytes failed: {exc}") from None


def file_seals(fd: int) -> int | None:
    """The file's seals (fcntl F_GET_SEALS: F_SEAL_SHRINK, F_SEAL_GROW, ...),
    or None for a file that cannot have any (not shmem/hugetlbfs): such a
    file can always be truncated."""
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return None


def address_of(mm: mmap.mmap) -> int:
    """The address of the first byte of the mapping ``mm`` in this process."""
    anchor = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor                    # release the buffer export now


@dataclass(eq=False)
class MappedRegion:
    """One mapped region.  ``hva`` is the address of the region's first byte
    (the mapping's base plus ``mmap_offset``)."""

    gpa: int
    size: int
    uva: int
    mmap_offset: int
    mmap: mmap.mmap = field(repr=False)
    map_hva: int = field(repr=False)       # address of the whole mapping (file offset 0)
    fd: int = field(default=-1, repr=False)   # our dup of the front-end's fd (for a live update)
    seals: int | None = None               # the file's seals when mapped (file_seals)

    @property
    def can_shrink(self) -> bool:
        """The front-end may truncate the file under us (not F_SEAL_SHRINK)."""
        return self.seals is None or not self.seals & fcntl.F_SEAL_SHRINK

    @property
    def hva(self) -> int:
        return self.map_hva + self.mmap_offset

    def view(self) -> memoryview:
        """A memoryview of exactly the region.  Release it before ``close()``."""
        return memoryview(self.mmap)[self.mmap_offset:self.mmap_offset + self.size]

    def matches(self, gpa: int, size: int, uva: int) -> bool:
        return (self.gpa, self.size, self.uva) == (gpa, size, uva)

    def close(self) -> None:
        self.mmap.close()
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def map_region(region: MemRegion) -> MappedRegion:
    """Map one region (the fd stays the caller's; the region keeps a dup)."""
    if region.size <= 0:
        raise GuestMemoryError(f"region gpa={region.gpa:#x}: size {region.size}")
    mm = _mmap_fd(region.fd, region.mmap_offset + region.size)
    try:
        fd = os.dup(region.fd)
    except OSError as exc:
        mm.close()
        raise GuestMemoryError(f"fd {region.fd}: {exc.strerror}") from None
    return MappedRegion(region.gpa, region.size, region.uva, region.mmap_offset, mm, address_of(mm), fd,
                        file_seals(fd))


class GuestMemory:
    """The memory table: gpa -> hva (clipped at region ends) and uva -> gpa/hva."""

    def __init__(self, regions: tuple[MemRegion, ...] | list[MemRegion] = ()) -> None:
        self._regions: list[MappedRegion] = []      # sorted by gpa
        self._starts: list[int] = []
        if regions:
            self.replace(regions)

    # -- table changes ----------------------------------------------------------

    @property
    def regions(self) -> tuple[MappedRegion, ...]:
        return tuple(self._regions)

    def __len__(self) -> int:
        return len(self._regions)

    @property
    def can_shrink(self) -> bool:
        """Some region's file is not sealed against shrinking."""
        return any(r.can_shrink for r in self._regions)

    @property
    def size(self) -> int:
        return sum(r.size for r in self._regions)

    def _check_free(self, new: list[MappedRegion] | list[MemRegion], existing: list[MappedRegion]) -> None:
        spans = sorted([(r.gpa, r.size) for r in existing] + [(r.gpa, r.size) for r in new])
        for (a, alen), (b, _) in zip(spans, spans[1:]):
            if a + alen > b:
                raise GuestMemoryError(f"regions overlap at gpa {b:#x}")

    def _install(self, regions: list[MappedRegion]) -> None:
        self._regions = sorted(regions, key=lambda r: r.gpa)
        self._starts = [r.gpa for r in self._regions]

    def add(self, region: MemRegion) -> MappedRegion:
        self._check_free([region], self._regions)
        mapped = map_region(region)
        self._install(self._regions + [mapped])
        return mapped

    def remove(self, gpa: int, size: int, uva: int) -> None:
        """Unmap the region with this gpa, size and uva (REM_MEM_REG)."""
        for r in self._regions:
            if r.matches(gpa, size, uva):
                self._install([x for x in self._regions if x is not r])
                r.close()
                return
        raise GuestMemoryError(f"no region gpa={gpa:#x} size={size:#x} uva={uva:#x}")

    def replace(self, regions: tuple[MemRegion, ...] | list[MemRegion]) -> None:
        """Map the new table, then unmap the old one.  If any new region fails
        to map, the old table stays in place."""
        self._check_free(list(regions), [])
        new: list[MappedRegion] = []
        try:
            for region in regions:
                new.append(map_region(region))
        except BaseException:
            for m in new:
                m.close()
            raise
        old = self._regions
        self._install(new)
        for r in old:
            r.close()

    def close(self) -> None:
        old = self._regions
        self._install([])
        for r in old:
            r.close()

    # -- lookups ----------------------------------------------------------------

    def find_gpa(self, gpa: int) -> MappedRegion | None:
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0:
            r = self._regions[i]
            if gpa < r.gpa + r.size:
                return r
        return None

    def find_uva(self, uva: int) -> MappedRegion | None:
        for r in self._regions:
            if r.uva <= uva < r.uva + r.size:
                return r
        return None

    def gpa_to_hva(self, gpa: int, length: int) -> tuple[int, int]:
        """(hva, clipped_len): the hva of ``gpa`` and how many of ``length``
        bytes are contiguous there (clipped at the region's end)."""
        r = self.find_gpa(gpa)
        if r is None:
            raise GuestMemoryError(f"gpa {gpa:#x} is not mapped")
        off = gpa - r.gpa
        return r.hva + off, min(length, r.size - off)

    def uva_to_hva(self, uva: int, length: int) -> tuple[int, int]:
        """(hva, clipped_len) for a front-end virtual address."""
        r = self.find_uva(uva)
        if r is None:
            raise GuestMemoryError(f"uva {uva:#x} is not mapped")
        off = uva - r.uva
        return r.hva + off, min(length, r.size - off)

    def uva_to_gpa(self, uva: int) -> int:
        r = self.find_uva(uva)
        if r is None:
            raise GuestMemoryError(f"uva {uva:#x} is not mapped")
        return r.gpa + (uva - r.uva)

    # -- slow-path access (control plane, tests) --------------------------------

    def read(self, gpa: int, length: int) -> bytes:
        """Read through the region's file (not the mapping): bytes the
        front-end truncated away are a GuestMemoryError, not a SIGBUS."""
        out = bytearray()
        while length > 0:
            r = self.find_gpa(gpa)
            if r is None:
                raise GuestMemoryError(f"gpa {gpa:#x} is not mapped")
            off = r.mmap_offset + (gpa - r.gpa)
            n = min(length, r.size - (gpa - r.gpa))
            try:
                got = os.pread(r.fd, n, off)
            except OSError as exc:
                raise GuestMemoryError(f"gpa {gpa:#x}: {exc.strerror}") from None
            if len(got) != n:
                raise GuestMemoryError(f"gpa {gpa:#x}: guest memory vanished (the front-end "
                                       f"shrank its file to {os.fstat(r.fd).st_size} bytes)")
            out += got
            gpa, length = gpa + n, length - n
        return bytes(out)

    def write(self, gpa: int, data: bytes) -> None:
        """Write through the mapping (tests only: a file shrunk between the
        size check and the copy would SIGBUS here)."""
        data = memoryview(bytes(data))
        while data:
            r = self.find_gpa(gpa)
            if r is None:
                raise GuestMemoryError(f"gpa {gpa:#x} is not mapped")
            off = r.mmap_offset + (gpa - r.gpa)
            n = min(len(data), r.size - (gpa - r.gpa))
            if os.fstat(r.fd).st_size < off + n:
                raise GuestMemoryError(f"gpa {gpa:#x}: guest memory vanished")
            r.mmap[off:off + n] = data[:n]
            gpa, data = gpa + n, data[n:]

    def __enter__(self) -> "GuestMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LogRegion:
    """The dirty log of SET_LOG_BASE: one bit per LOG_PAGE of guest-physical
    memory, starting ``offset`` bytes into the fd."""

    def __init__(self, fd: int, size: int, offset: int) -> None:
        if size <= 0 or offset < 0:
            raise GuestMemoryError(f"log: size {size} offset {offset}")
        self.size = size
        self.offset = offset
        self.mmap = _mmap_fd(fd, offset + size)
        self._map_hva = address_of(self.mmap)
        try:
            self.fd = os.dup(fd)          # for a live update (module docstring)
        except OSError as exc:
            self.mmap.close()
            raise GuestMemoryError(f"log fd {fd}: {exc.strerror}") from None

    @property
    def hva(self) -> int:
        """Address of the bitmap's first byte (the engine sets bits atomically there)."""
        return self._map_hva + self.offset

    @property
    def pages(self) -> int:
        return self.size * 8

    def mark_dirty(self, gpa: int, length: int) -> None:
        """Tests only: mark pages of [gpa, gpa+length).

        Not atomic against concurrent writers (the engine's fetch-or is), and
        through the mapping (a log file shrunk by the front-end would SIGBUS
        here; the engine's writes are guarded)."""
        if length <= 0:
            return
        first, last = gpa // LOG_PAGE, (gpa + length - 1) // LOG_PAGE
        if last >= self.pages:
            raise GuestMemoryError(f"log: gpa {gpa + length - 1:#x} beyond {self.size}-byte log")
        for page in range(first, last + 1):
            i = self.offset + page // 8
            self.mmap[i] = self.mmap[i] | (1 << (page % 8))

    def is_dirty(self, gpa: int) -> bool:
        """Read through the file (a shrunk log reads as clean, no SIGBUS)."""
        page = gpa // LOG_PAGE
        if page >= self.pages:
            return False
        byte = os.pread(self.fd, 1, self.offset + page // 8)
        return bool(byte and byte[0] >> (page % 8) & 1)

    def close(self) -> None:
        self.mmap.close()
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
