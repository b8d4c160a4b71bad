"""GuestMemory / LogRegion over real memfds."""
import ctypes
import os

import pytest

from vfe.vhost.actions import MemRegion
from vfe.vhost.memory import GuestMemory, GuestMemoryError, LogRegion, map_region

MiB = 1 << 20
UVA = 0x7F00_0000_0000


@pytest.fixture
def memfd():
    made = []

    def make(size):
        fd = os.memfd_create("t", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        made.append(fd)
        return fd
    yield make
    for fd in made:
        os.close(fd)


def test_map_with_unaligned_mmap_offset(memfd):
    fd = memfd(2 * MiB)
    os.pwrite(fd, b"hello", 4096 + 100)
    with GuestMemory([MemRegion(0x10000, MiB, UVA, 4096 + 100, fd)]) as mem:
        (r,) = mem.regions
        assert ctypes.string_at(r.hva, 5) == b"hello"
        hva, n = mem.gpa_to_hva(0x10000, 16)
        assert hva == r.hva and n == 16
        ctypes.memmove(hva + 5, b"!", 1)
        assert os.pread(fd, 6, 4096 + 100) == b"hello!"
        assert mem.read(0x10000, 6) == b"hello!"


def test_translation_clips_at_region_end(memfd):
    fd = memfd(2 * MiB)
    with GuestMemory([MemRegion(0, MiB, UVA, 0, fd), MemRegion(MiB, MiB, UVA + 4 * MiB, MiB, fd)]) as mem:
        hva, n = mem.gpa_to_hva(MiB - 10, 100)
        assert n == 10
        hva2, n2 = mem.gpa_to_hva(MiB, 90)
        assert n2 == 90 and hva2 == mem.regions[1].hva
        with pytest.raises(GuestMemoryError):
            mem.gpa_to_hva(2 * MiB, 1)
        assert mem.uva_to_gpa(UVA + 4 * MiB + 5) == MiB + 5
        assert mem.uva_to_hva(UVA + 4 * MiB + 5, 10) == (mem.regions[1].hva + 5, 10)
        with pytest.raises(GuestMemoryError):
            mem.uva_to_gpa(UVA + MiB)
        mem.write(MiB - 3, b"abcdef")              # spans both regions
        assert mem.read(MiB - 3, 6) == b"abcdef"
        assert os.pread(fd, 6, MiB - 3) == b"abcdef"   # same memfd, contiguous offsets


def test_add_remove_replace(memfd):
    fd1, fd2 = memfd(MiB), memfd(MiB)
    mem = GuestMemory()
    mem.add(MemRegion(0, MiB, UVA, 0, fd1))
    with pytest.raises(GuestMemoryError, match="overlap"):
        mem.add(MemRegion(MiB // 2, MiB // 2, UVA + 8 * MiB, 0, fd2))
    mem.add(MemRegion(4 * MiB, MiB, UVA + 8 * MiB, 0, fd2))
    assert [r.gpa for r in mem.regions] == [0, 4 * MiB]
    with pytest.raises(GuestMemoryError):
        mem.remove(0, MiB, UVA + 1)
    mem.remove(0, MiB, UVA)
    assert [r.gpa for r in mem.regions] == [4 * MiB]
    old = mem.regions[0]
    with pytest.raises(GuestMemoryError):               # bad fd: old table stays
        mem.replace([MemRegion(0, MiB, UVA, 0, fd1), MemRegion(2 * MiB, MiB, UVA + MiB, 0, 9999)])
    assert mem.regions == (old,)
    mem.replace([MemRegion(0, MiB, UVA, 0, fd1)])
    assert old.mmap.closed and len(mem) == 1
    mem.close()
    assert len(mem) == 0


def test_file_shorter_than_region_is_refused(memfd):
    fd = memfd(MiB)
    with pytest.raises(GuestMemoryError, match="file is"):
        map_region(MemRegion(0, MiB, UVA, 4096, fd))


def test_mapping_survives_closing_the_fd():
    fd = os.memfd_create("t", os.MFD_CLOEXEC)
    os.ftruncate(fd, MiB)
    mem = GuestMemory([MemRegion(0, MiB, UVA, 0, fd)])
    os.close(fd)
    mem.write(10, b"xyz")
    assert mem.read(10, 3) == b"xyz"
    mem.close()


def test_views_must_be_released_before_close(memfd):
    mem = GuestMemory([MemRegion(0, MiB, UVA, 0, memfd(MiB))])
    v = mem.regions[0].view()
    v[0:2] = b"ok"
    v.release()
    mem.close()


def test_log_region(memfd):
    fd = memfd(8192 + 4096)
    log = LogRegion(fd, 8192, 4096)
    log.mark_dirty(0x5000, 0x2001)              # pages 5, 6, 7
    assert [log.is_dirty(p * 4096) for p in range(4, 9)] == [False, True, True, True, False]
    assert os.pread(fd, 1, 4096) == bytes([0b11100000])
    assert ctypes.string_at(log.hva, 1) == bytes([0b11100000])
    with pytest.raises(GuestMemoryError):
        log.mark_dirty(8192 * 8 * 4096, 1)
    log.close()


@pytest.mark.parametrize("size,offset", [(2**64 - 4096, 8192), (8192, 2**64 - 4096), (2**63, 2**63),
                                         (8192, 4097)])
def test_log_whose_offset_and_size_overflow_or_pass_the_file_is_refused(memfd, size, offset):
    """CVE-2020-10722: a C back-end adding a 64-bit offset and size could
    wrap and map less than it then writes; here the sum is checked against
    the file before anything is mapped."""
    fd = memfd(8192 + 4096)
    with pytest.raises(GuestMemoryError):
        LogRegion(fd, size, offset)


def test_seals_say_whether_the_memory_can_shrink(memfd, tmp_path):
    """F_GET_SEALS is read at mapping time: QEMU's sealed memfd cannot
    shrink under us, an unsealed one or a plain file can."""
    import fcntl
    sealed = os.memfd_create("sealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    plain = os.open(tmp_path / "ram", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
    try:
        os.ftruncate(sealed, MiB)
        fcntl.fcntl(sealed, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        os.ftruncate(plain, MiB)
        with GuestMemory([MemRegion(0, MiB, UVA, 0, sealed)]) as mem:
            assert mem.regions[0].seals & fcntl.F_SEAL_SHRINK and not mem.can_shrink
            mem.add(MemRegion(MiB, MiB, UVA + MiB, 0, memfd(MiB)))
            assert mem.can_shrink                     # one unsealed region is enough
        with GuestMemory([MemRegion(0, MiB, UVA, 0, plain)]) as mem:
            assert mem.regions[0].seals is None and mem.can_shrink
    finally:
        os.close(sealed)
        os.close(plain)


def test_reading_memory_the_front_end_shrank_is_an_error_not_a_signal(memfd):
    """Python reads guest memory through the file: a page the front-end cut
    away is a GuestMemoryError (through the mapping it would be SIGBUS)."""
    fd = memfd(2 * MiB)
    os.pwrite(fd, b"used", MiB + 2)
    with GuestMemory([MemRegion(0, 2 * MiB, UVA, 0, fd)]) as mem:
        assert mem.read(MiB + 2, 4) == b"used"
        os.ftruncate(fd, MiB)
        assert mem.read(0, 4) == bytes(4)             # what is left still reads
        with pytest.raises(GuestMemoryError, match="guest memory vanished"):
            mem.read(MiB + 2, 4)
        with pytest.raises(GuestMemoryError, match="guest memory vanished"):
            mem.write(MiB + 2, b"x")


def test_dirty_bits_of_a_shrunk_log_read_clean(memfd):
    fd = memfd(4096)
    log = LogRegion(fd, 4096, 0)
    try:
        log.mark_dirty(0x5000, 1)
        assert log.is_dirty(0x5000)
        os.ftruncate(fd, 0)
        assert not log.is_dirty(0x5000)               # no SIGBUS
    finally:
        log.close()
