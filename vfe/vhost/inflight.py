"""The inflight region of VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD (split rings).

A shared buffer the back-end hands the front-end (GET_INFLIGHT_FD) and the
front-end hands back at every start (SET_INFLIGHT_FD) -- also to a new
back-end process after the old one crashed, which is the point: QEMU keeps
it, so what the dead process wrote there survives it.

Layout (QEMU docs/interop/vhost-user.rst, "Inflight I/O tracking"), one
queue region per virtqueue, back to back, each padded to INFLIGHT_ALIGN:

    QueueRegionSplit (16 bytes)          DescStateSplit[desc_num] (16 bytes each)
      u64 features     @0                  u8  inflight  @0
      u16 version      @8  (1; 0 = new)    u8  pad[5]    @1
      u16 desc_num     @10                 u16 next      @6  (last-batch list)
      u16 last_batch_head @12              u64 counter   @8  (fetch order)
      u16 used_idx     @14

The engine (cython_ext/inflight.pxd, whose IF_* sizes and offsets a unit
test checks against the structs here) reads and writes it; this module only
sizes, allocates and maps it.
"""
from __future__ import annotations

import os
import struct

from .memory import GuestMemoryError, address_of, _mmap_fd

#: QueueRegionSplit: features, version, desc_num, last_batch_head, used_idx
QUEUE_HEADER = struct.Struct("<QHHHH")
#: DescStateSplit: inflight, (padding), next, counter
DESC_STATE = struct.Struct("<B5xHQ")
HEADER_SIZE = QUEUE_HEADER.size      # 16
DESC_SIZE = DESC_STATE.size          # 16
INFLIGHT_ALIGN = 64          # one cache line: queue regions never share a line
VERSION = 1


def queue_region_size(queue_size: int) -> int:
    """Bytes of one queue's region for a ring of ``queue_size`` entries."""
    n = HEADER_SIZE + DESC_SIZE * queue_size
    return (n + INFLIGHT_ALIGN - 1) & ~(INFLIGHT_ALIGN - 1)


def region_size(num_queues: int, queue_size: int) -> int:
    return num_queues * queue_region_size(queue_size)


def allocate(num_queues: int, queue_size: int) -> tuple[int, int]:
    """A new memfd holding an initialised region: (fd, size).  Every queue
    header says version 1 and desc_num, nothing is inflight; the caller
    sends the fd and closes it."""
    size = region_size(num_queues, queue_size)
    fd = os.memfd_create("vfe-inflight", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)            # zero-filled
        header = QUEUE_HEADER.pack(0, VERSION, queue_size, 0, 0)
        stride = queue_region_size(queue_size)
        for q in range(num_queues):
            os.pwrite(fd, header, q * stride)
    except BaseException:
        os.close(fd)
        raise
    return fd, size


class InflightRegion:
    """The region of SET_INFLIGHT_FD, mapped shared (the fd stays the
    caller's; we keep a dup, ``fd``, which a live update hands on)."""

    def __init__(self, fd: int, mmap_size: int, mmap_offset: int, num_queues: int,
                 queue_size: int) -> None:
        need = region_size(num_queues, queue_size)
        if mmap_size < need:
            raise GuestMemoryError(f"inflight region of {mmap_size} bytes is too small for "
                                   f"{num_queues} queues of {queue_size} (needs {need})")
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.stride = queue_region_size(queue_size)
        self.size = mmap_size
        self.offset = mmap_offset
        self.mmap = _mmap_fd(fd, mmap_offset + mmap_size)
        self._map_hva = address_of(self.mmap)
        try:
            self.fd = os.dup(fd)
        except OSError as exc:
            self.mmap.close()
            raise GuestMemoryError(f"inflight fd {fd}: {exc.strerror}") from None

    @property
    def hva(self) -> int:
        """Address of queue 0's region."""
        return self._map_hva + self.offset

    def queue_header(self, q: int) -> tuple[int, int, int, int, int]:
        """(features, version, desc_num, last_batch_head, used_idx) of queue q (tests, logs)."""
        return QUEUE_HEADER.unpack_from(self.mmap, self.offset + q * self.stride)

    def inflight_heads(self, q: int) -> dict[int, int]:
        """{head: counter} of queue q's entries marked inflight (tests, logs)."""
        base = self.offset + q * self.stride + HEADER_SIZE
        out = {}
        for i in range(self.queue_size):
            flag, _, counter = DESC_STATE.unpack_from(self.mmap, base + DESC_SIZE * i)
            if flag:
                out[i] = counter
        return out

    def close(self) -> None:
        self.mmap.close()
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


__all__ = ["GuestMemoryError", "InflightRegion", "allocate", "queue_region_size", "region_size",
           "QUEUE_HEADER", "DESC_STATE", "HEADER_SIZE", "DESC_SIZE", "INFLIGHT_ALIGN", "VERSION"]
