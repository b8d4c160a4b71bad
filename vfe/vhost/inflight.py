"""The inflight region of VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD.

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

A device whose rings are packed (VIRTIO_F_RING_PACKED acked: QEMU 7.2
sends SET_FEATURES before GET_INFLIGHT_FD, vhost_dev_prepare_inflight, so
the layout is known when the region is made) uses the packed queue regions:

    QueueRegionPacked (29 bytes, padded to 32)  DescStatePacked[desc_num] (32 bytes each)
      u64 features        @0                      u8  inflight @0
      u16 version         @8                      u8  padding  @1
      u16 desc_num        @10                     u16 next     @2
      u16 free_head       @12                     u16 last     @4
      u16 old_free_head   @14                     u16 num      @6
      u16 used_idx        @16                     u64 counter  @8
      u16 old_used_idx    @18                     u16 id       @16
      u8  used_wrap_counter     @20               u16 flags    @18
      u8  old_used_wrap_counter @21               u32 len      @20
      u8  padding[7]      @22                     u64 addr     @24

The engine (cython_ext/inflight.pxd, whose IF_* and PIF_* sizes and offsets
unit tests check against the structs here) reads and writes it; this module
only sizes, allocates and maps it.
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
#: QueueRegionPacked: features, version, desc_num, free_head, old_free_head,
#: used_idx, old_used_idx, used_wrap_counter, old_used_wrap_counter
PACKED_QUEUE_HEADER = struct.Struct("<QHHHHHHBB7x")
#: DescStatePacked: inflight, (padding), next, last, num, counter, id, flags, len, addr
PACKED_DESC_STATE = struct.Struct("<BxHHHQHHIQ")
PACKED_HEADER_SIZE = 32              # 29 bytes, padded: the DescStatePacked array is 8-aligned
PACKED_DESC_SIZE = PACKED_DESC_STATE.size    # 32
INFLIGHT_ALIGN = 64          # one cache line: queue regions never share a line
VERSION = 1


def queue_region_size(queue_size: int, packed: bool = False) -> int:
    """Bytes of one queue's region for a ring of ``queue_size`` entries."""
    if packed:
        n = PACKED_HEADER_SIZE + PACKED_DESC_SIZE * queue_size
    else:
        n = HEADER_SIZE + DESC_SIZE * queue_size
    return (n + INFLIGHT_ALIGN - 1) & ~(INFLIGHT_ALIGN - 1)


def region_size(num_queues: int, queue_size: int, packed: bool = False) -> int:
    return num_queues * queue_region_size(queue_size, packed)


def allocate(num_queues: int, queue_size: int, packed: bool = False) -> tuple[int, int]:
    """A new memfd holding an initialised region: (fd, size); the caller
    sends the fd and closes it.  Split: every queue header says version 1
    and desc_num, nothing is inflight.  Packed: all zero, version 0 -- the
    engine initialises a queue's free list and used cursor from the ring's
    base at its first start (cython_ext/inflight.pxd)."""
    size = region_size(num_queues, queue_size, packed)
    fd = os.memfd_create("vfe-inflight", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)            # zero-filled
        header = QUEUE_HEADER.pack(0, VERSION, queue_size, 0, 0)
        stride = queue_region_size(queue_size)
        for q in range(0 if packed else num_queues):
            os.pwrite(fd, header, q * stride)
    except BaseException:
        os.close(fd)
        raise
    return fd, size


class InflightRegion:
    """The region of SET_INFLIGHT_FD, mapped shared (the fd stays the
    caller's; we keep a dup, ``fd``, which a live update hands on).
    ``packed``: its queue regions have the packed layout."""

    def __init__(self, fd: int, mmap_size: int, mmap_offset: int, num_queues: int,
                 queue_size: int, packed: bool = False) -> None:
        need = region_size(num_queues, queue_size, packed)
        if mmap_size < need:
            raise GuestMemoryError(f"inflight region of {mmap_size} bytes is too small for "
                                   f"{num_queues} {'packed ' if packed else ''}queues of "
                                   f"{queue_size} (needs {need})")
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.packed = packed
        self.stride = queue_region_size(queue_size, packed)
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

    def queue_header(self, q: int) -> tuple[int, ...]:
        """Queue q's header fields (tests, logs): split (features, version,
        desc_num, last_batch_head, used_idx); packed as PACKED_QUEUE_HEADER."""
        header = PACKED_QUEUE_HEADER if self.packed else QUEUE_HEADER
        return header.unpack_from(self.mmap, self.offset + q * self.stride)

    def inflight_heads(self, q: int) -> dict[int, int]:
        """{head (packed: buffer id's slot): counter} of queue q's entries
        marked inflight (tests, logs)."""
        if self.packed:
            base, size, state = PACKED_HEADER_SIZE, PACKED_DESC_SIZE, PACKED_DESC_STATE
        else:
            base, size, state = HEADER_SIZE, DESC_SIZE, DESC_STATE
        base += self.offset + q * self.stride
        out = {}
        for i in range(self.queue_size):
            fields = state.unpack_from(self.mmap, base + size * i)
            if fields[0]:
                out[i] = fields[4] if self.packed else fields[2]
        return out

    def close(self) -> None:
        self.mmap.close()
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


__all__ = ["GuestMemoryError", "InflightRegion", "allocate", "queue_region_size", "region_size",
           "QUEUE_HEADER", "DESC_STATE", "HEADER_SIZE", "DESC_SIZE", "INFLIGHT_ALIGN", "VERSION",
           "PACKED_QUEUE_HEADER", "PACKED_DESC_STATE", "PACKED_HEADER_SIZE", "PACKED_DESC_SIZE"]
