"""A vhost-user *front-end* in Python: it plays QEMU's part for tests.

It connects to a back-end's socket (or listens for a client-mode back-end),
negotiates, shares guest memory made with ``memfd_create``, sets up split
rings with real kick/call eventfds, and moves virtio-net frames:

    fe = Frontend.connect("/run/vfe/vm1.sock")
    fe.start(queue_pairs=1, queue_size=256)
    fe.post_rx_buffers(0, 64)
    fe.send_frame(0, frame)                 # queue pair 0 -> TX ring 1
    frames = fe.recv_frames(0, timeout=2)   # queue pair 0 -> RX ring 0
    base = fe.get_vring_base(1)
    fe.close()

``start()`` sends the messages in the order QEMU 7.2 does for a vhost-user
net device.  Every request also has a method of its own (``set_vring_num``
...), and ``send_message()`` sends anything at all, for adversarial tests:
those come from ``FrontendChannel`` (channel.py), which also checks the
replies as QEMU does (a non-zero REPLY_ACK raises ``NackError``).  Guest
memory is a ``GuestRam`` (guest_ram.py); rings are driven with
``DriverRing`` (ring.py), or ``PackedDriverRing`` (packed_ring.py) when
``start(packed=True)`` acks VIRTIO_F_RING_PACKED.

Net helpers take a *queue pair* number: pair ``k`` is RX ring ``2k`` and TX
ring ``2k+1``.  Protocol helpers take ring indices.
"""
from __future__ import annotations

import mmap
import os
import select
import struct
import time
from dataclasses import dataclass

from vfe.vhost.messages import MEM_TABLE_MAX_REGIONS, Inflight, ProtocolError, ProtocolFeature
from vfe.vhost.transport import Connection, close_fds
from vfe.virtio.constants import (VIRTIO_NET_HDR_LEN, VIRTIO_NET_HDR_MRG_LEN, VRING_DESC_SIZE, F, Status, bit,
                                  net_hdr_len)
from vfe.virtio.layouts import PACKED_BASE_RESET

from .channel import FrontendChannel
from .guest_ram import PAGE, GuestRam, MiB
from .packed_ring import PackedDriverRing, packed_ring_layout
from .ring import DriverRing, RingLayout, split_ring_layout

#: Virtio features never acked by default (split rings unless
#: ``start(packed=True)``, no IOMMU, and LOG_ALL only while migrating).
NEVER_ACK = bit(F.VHOST_LOG_ALL) | bit(F.RING_PACKED) | bit(F.ACCESS_PLATFORM) | bit(F.IN_ORDER)


# ---------------------------------------------------------------------------
# Rings


@dataclass
class FrontRing:
    index: int
    size: int
    layout: RingLayout
    ring_gpa: int
    driver: DriverRing | PackedDriverRing
    kick_fd: int
    call_fd: int
    buf_gpa: int            # buffer pool: ``size`` slots of ``buf_size`` bytes
    buf_size: int
    free_slots: list[int]
    base: int = 0           # SET_VRING_BASE at the next start (GET_VRING_BASE's answer;
                            # packed: QEMU's 32-bit encoding, vfe/virtio/layouts.py)
    started: bool = True

    def slot_gpa(self, slot: int) -> int:
        return self.buf_gpa + slot * self.buf_size


class Frontend(FrontendChannel):
    """A vhost-user front-end with guest memory and rings (see module docstring)."""

    def __init__(self, conn: Connection, timeout: float = 5.0, ack_all: bool = False) -> None:
        super().__init__(conn, timeout, ack_all)
        self.memory: GuestRam | None = None
        self.rings: dict[int, FrontRing] = {}
        self._call_fds: dict[int, int] = {}
        self._eventfds: list[int] = []
        #: The inflight region (GET_INFLIGHT_FD), kept across reconnects as
        #: QEMU keeps it: (description, fd, our shared mapping).
        self.inflight: Inflight | None = None
        self.inflight_fd = -1
        self.inflight_map: mmap.mmap | None = None
        self._closed = False

    # -- connecting ------------------------------------------------------------

    def reconnect(self, path: str, timeout: float = 5.0) -> None:
        """The back-end went away (a crash): connect to its successor on
        ``path`` as QEMU's ``reconnect=`` does.  Guest memory, rings, call
        and kick fds and the inflight region stay; negotiation starts over
        (call ``start`` again); every ring restarts from the guest's
        used->idx, which is where QEMU 7.2 puts last_avail_idx when
        GET_VRING_BASE cannot reach the back-end.  A packed ring has no such
        index in memory: QEMU 7.2 keeps the base it had
        (virtio_queue_packed_restore_last_avail_idx does nothing), so do we."""
        super().reconnect(path, timeout)
        for ring in self.rings.values():
            if not ring.layout.packed:
                ring.base = ring.driver.used_idx()
            ring.started = False

    # -- requests that change the rings' state -----------------------------------

    def get_vring_base(self, index: int) -> int:
        """GET_VRING_BASE: stops ring ``index`` and returns its last avail index."""
        base = super().get_vring_base(index)
        if index in self.rings:
            self.rings[index].started = False
            self.rings[index].base = base
        return base

    def setup_inflight(self, num_queues: int, queue_size: int) -> None:
        """What QEMU's vhost-user-blk does at each start: get a region once
        (it keeps it, also across reconnects), then hand it over.  A
        back-end that answers "no region" is asked again at the next start."""
        if self.inflight is None:
            info, fd = self.get_inflight_fd(num_queues, queue_size)
            if fd < 0:
                return
            self.inflight, self.inflight_fd = info, fd
            self.inflight_map = mmap.mmap(fd, info.mmap_offset + info.mmap_size,
                                          flags=mmap.MAP_SHARED)
        self.set_inflight_fd(self.inflight, self.inflight_fd)

    # -- the QEMU sequence ---------------------------------------------------------

    def start(self, queue_pairs: int = 1, queue_size: int = 256, *, rings: int | None = None,
              mem_size: int = 32 * MiB, regions: int = 1, shared_fd: bool = True,
              gpa_gap: int = 0, use_add_mem_reg: bool | None = None, features: int | None = None,
              protocol_features: int | None = None, buf_size: int = 2048,
              enable: bool = True, start_idx: int = 0, used_align: int = 4,
              call_after_kick: bool = False, sync: bool = True,
              inflight: bool | None = None, packed: bool = False) -> None:
        """Bring rings up the way QEMU 7.2 starts a vhost-user net device.

        ``rings`` defaults to ``2 * queue_pairs``.  ``features`` are the
        virtio features wanted (acked: offered & wanted); by default all the
        offered ones except ``NEVER_ACK``.  Memory goes as one ADD_MEM_REG
        per region when CONFIGURE_MEM_SLOTS is negotiated (as QEMU 7.2
        does; needed for more than 8 regions), else as SET_MEM_TABLE;
        ``use_add_mem_reg`` forces either.  Call fds are sent before the
        rings start (QEMU's guest notifiers); ``call_after_kick`` sends them
        again after each kick (devices without notifier masking).  With ``sync`` it ends
        with a GET_FEATURES round trip, so the back-end has handled
        everything (rings enabled) when ``start`` returns.  ``inflight``
        (default: when INFLIGHT_SHMFD is negotiated, as QEMU's vhost-user-blk
        does) gets/sets the inflight region before the features.
        ``packed`` acks VIRTIO_F_RING_PACKED too (when offered): every ring
        is then a packed one.
        """
        nrings = 2 * queue_pairs if rings is None else rings
        if not self.backend_features:
            self.negotiate(protocol_features)
        if self.memory is None:
            self.memory = GuestRam(mem_size, regions, shared_fd=shared_fd, gpa_gap=gpa_gap)
        # vhost_virtqueue_init, then set_guest_notifiers: a call fd per ring
        # before anything else of the start.
        for i in range(nrings):
            if i not in self._call_fds:
                self._call_fds[i] = self._eventfd()
            self.set_vring_call(i, self._call_fds[i])
        if inflight is None:
            inflight = self.has_protocol_feature(ProtocolFeature.INFLIGHT_SHMFD)
        wanted = (self.backend_features & ~NEVER_ACK) if features is None else features
        if packed:
            wanted |= bit(F.RING_PACKED)
        if inflight:
            if packed:
                # QEMU 7.2 acks the features first (vhost_dev_prepare_inflight):
                # the region's layout may depend on them
                self.set_features(self.backend_features & wanted)
            self.setup_inflight(nrings, queue_size)
        self.set_features(self.backend_features & wanted)
        if self.has_protocol_feature(ProtocolFeature.STATUS):
            self.add_status(Status.FEATURES_OK)
        self._send_memory(use_add_mem_reg)
        for i in range(nrings):
            self.setup_ring(i, queue_size, buf_size=buf_size, start_idx=start_idx,
                            used_align=used_align, call=call_after_kick)
        if self.has_protocol_feature(ProtocolFeature.STATUS):
            self.add_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.DRIVER_OK)
        if self.features & bit(F.VHOST_USER_PROTOCOL_FEATURES):
            for i in range(nrings):
                self.set_vring_enable(i, enable)
        if sync:
            self.sync()

    def _send_memory(self, use_add_mem_reg: bool | None) -> None:
        assert self.memory is not None
        regions = self.memory.regions
        slots = self.has_protocol_feature(ProtocolFeature.CONFIGURE_MEM_SLOTS)
        if use_add_mem_reg is None:
            use_add_mem_reg = slots          # what QEMU 7.2 does

        if use_add_mem_reg:
            if not slots:
                raise ValueError("ADD_MEM_REG needs CONFIGURE_MEM_SLOTS")
            for r in regions:
                self.add_mem_reg(r)
        else:
            if len(regions) > MEM_TABLE_MAX_REGIONS:
                raise ValueError(f"{len(regions)} regions need CONFIGURE_MEM_SLOTS")
            self.set_mem_table(regions)

    def setup_ring(self, index: int, size: int, *, buf_size: int = 2048, start_idx: int = 0,
                   used_align: int = 4, kick: bool = True, call: bool = True) -> FrontRing:
        """vhost_virtqueue_start: NUM, BASE, ADDR, KICK, CALL for one ring.

        A ring set up before (and stopped with ``get_vring_base``) keeps its
        memory and the guest's state; like QEMU, SET_VRING_BASE then carries
        the index the back-end returned from GET_VRING_BASE.
        """
        assert self.memory is not None
        ring = self.rings.get(index)
        event_idx = bool(self.features & bit(F.RING_EVENT_IDX))
        packed = bool(self.features & bit(F.RING_PACKED))
        if ring is None or ring.size != size or ring.layout.packed != packed:
            if ring is not None:
                ring.driver.release()
            layout = packed_ring_layout(size) if packed else split_ring_layout(size, used_align)
            max_indirect = 16
            # indirect tables start 16-byte aligned, as a driver's kmalloc'd ones do
            indirect_off = (layout.total + 15) & ~15
            area = indirect_off + size * max_indirect * VRING_DESC_SIZE
            ring_gpa = self.memory.alloc(area, align=PAGE)
            buf_gpa = self.memory.alloc(size * buf_size, align=PAGE)
            region, off = self.memory.region_of(ring_gpa)
            view = region.view[off:off + area]
            if packed:
                driver: DriverRing | PackedDriverRing = PackedDriverRing(
                    view, size, layout.desc, layout.avail, layout.used, event_idx=event_idx,
                    gpa_base=ring_gpa, indirect_off=indirect_off, max_indirect=max_indirect)
                base = PACKED_BASE_RESET
            else:
                driver = DriverRing(view, size, layout.desc, layout.avail, layout.used,
                                    event_idx=event_idx, gpa_base=ring_gpa,
                                    indirect_off=indirect_off, max_indirect=max_indirect,
                                    start_idx=start_idx)
                base = start_idx & 0xFFFF
            ring = FrontRing(index, size, layout, ring_gpa, driver, -1, -1, buf_gpa, buf_size,
                             list(range(size - 1, -1, -1)), base=base)
            self.rings[index] = ring
        if ring.kick_fd < 0:
            ring.kick_fd = self._eventfd()
        if index not in self._call_fds:
            self._call_fds[index] = self._eventfd()
        ring.call_fd = self._call_fds[index]
        self.set_vring_num(index, size)
        self.set_vring_base(index, ring.base)
        uva = self.memory.gpa_to_uva
        self.set_vring_addr(index, uva(ring.ring_gpa + ring.layout.desc),
                            uva(ring.ring_gpa + ring.layout.used),
                            uva(ring.ring_gpa + ring.layout.avail))
        if kick:
            self.set_vring_kick(index, ring.kick_fd)
        if call:
            self.set_vring_call(index, ring.call_fd)
        ring.started = True
        return ring

    def stop(self) -> dict[int, int]:
        """vhost_dev_stop as QEMU 7.2 does it: SET_STATUS 0, then
        GET_VRING_BASE for every started ring.  Returns {ring: base}."""
        if self.has_protocol_feature(ProtocolFeature.STATUS):
            self.set_status(0)
        return {i: self.get_vring_base(i) for i, r in sorted(self.rings.items()) if r.started}

    def _eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._eventfds.append(fd)
        return fd

    # -- data path (virtio-net) ----------------------------------------------------

    @property
    def net_hdr_len(self) -> int:
        return net_hdr_len(self.features)

    def kick(self, index: int) -> None:
        os.eventfd_write(self.rings[index].kick_fd, 1)

    def _maybe_kick(self, ring: FrontRing) -> None:
        if ring.driver.kick_needed():
            os.eventfd_write(ring.kick_fd, 1)

    def reclaim_tx(self, queue: int) -> int:
        """Take back TX buffers the back-end has consumed; returns how many."""
        ring = self.rings[2 * queue + 1]
        done = ring.driver.get_used()
        for u in done:
            ring.free_slots.extend(u.token)
        return len(done)

    def send_frame(self, queue: int, frame: bytes, *, header: bytes | None = None,
                   split_header: bool = False, indirect: bool = False, kick: bool = True) -> int:
        """Queue one frame on queue pair ``queue``'s TX ring (virtio-net header
        first; zeros unless ``header``).  A frame bigger than a buffer slot
        becomes a chain of slots.  Returns the chain's head."""
        ring = self.rings[2 * queue + 1]
        self.reclaim_tx(queue)
        hdr = bytes(self.net_hdr_len) if header is None else bytes(header)
        pieces: list[bytes] = []
        if split_header:
            pieces.append(hdr)
            data = bytes(frame)
        else:
            data = hdr + bytes(frame)
        pieces += [data[i:i + ring.buf_size] for i in range(0, len(data), ring.buf_size)] or [b""]
        if len(pieces) > len(ring.free_slots):
            raise BlockingIOError(f"TX ring {ring.index}: no free buffers")
        slots = [ring.free_slots.pop() for _ in pieces]
        bufs = []
        for slot, piece in zip(slots, pieces):
            gpa = ring.slot_gpa(slot)
            self.memory.write(gpa, piece)  # type: ignore[union-attr]
            bufs.append((gpa, len(piece), False))
        try:
            head = ring.driver.add_chain(bufs, indirect=indirect, token=slots)
        except Exception:
            ring.free_slots.extend(slots)
            raise
        if kick:
            self._maybe_kick(ring)
        return head

    def wait_tx_done(self, queue: int, timeout: float | None = None) -> bool:
        """Wait until the back-end consumed every TX chain of pair ``queue``."""
        ring = self.rings[2 * queue + 1]
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            self.reclaim_tx(queue)
            if ring.driver.outstanding == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            self._wait_call(ring, min(0.05, max(0.0, deadline - time.monotonic())))

    def post_rx_buffers(self, queue: int, n: int | None = None, size: int | None = None,
                        kick: bool = True) -> int:
        """Give ``n`` (default: all free) device-writable buffers of ``size``
        bytes (default: the slot size) to pair ``queue``'s RX ring."""
        ring = self.rings[2 * queue]
        size = ring.buf_size if size is None else size
        if size > ring.buf_size:
            raise ValueError(f"RX buffer {size} > slot size {ring.buf_size}")
        n = len(ring.free_slots) if n is None else min(n, len(ring.free_slots))
        for _ in range(n):
            slot = ring.free_slots.pop()
            ring.driver.add_chain([(ring.slot_gpa(slot), size, True)], token=(slot, size),
                                  publish=False)
        ring.driver.publish()
        if kick and n:
            self._maybe_kick(ring)
        return n

    def _wait_call(self, ring: FrontRing, timeout: float) -> None:
        ready, _, _ = select.select([ring.call_fd], [], [], timeout)
        if ready:
            try:
                os.eventfd_read(ring.call_fd)
            except BlockingIOError:
                pass

    def recv_frames(self, queue: int, timeout: float = 1.0, count: int | None = None, *,
                    with_header: bool = False, repost: bool = True) -> list:
        """Frames the back-end delivered on pair ``queue``'s RX ring.

        Waits (call eventfd, and polling used->idx) until at least one frame
        (or ``count`` frames) arrived or ``timeout`` passed.  Mergeable
        buffers (num_buffers > 1) are joined.  Returns frames without the
        virtio-net header, or ``(header, frame)`` pairs with ``with_header``.
        Consumed buffers are posted again unless ``repost`` is False.
        """
        ring = self.rings[2 * queue]
        hdr_len = self.net_hdr_len
        mrg = bool(self.features & bit(F.NET_MRG_RXBUF))
        want = 1 if count is None else count
        frames: list = []
        pending: list[bytes] = []
        remaining = 0
        deadline = time.monotonic() + timeout
        while True:
            consumed = []
            for used in ring.driver.get_used():
                slot, size = used.token
                consumed.append((slot, size))
                if used.length > size:
                    raise ProtocolError(f"RX used length {used.length} > buffer {size}")
                data = self.memory.read(ring.slot_gpa(slot), used.length)  # type: ignore[union-attr]
                if remaining == 0:
                    pending = [data]
                    # num_buffers follows the header's first VIRTIO_NET_HDR_LEN bytes
                    nbufs = (struct.unpack_from("<H", data, VIRTIO_NET_HDR_LEN)[0]
                             if mrg and len(data) >= VIRTIO_NET_HDR_MRG_LEN else 1)
                    remaining = max(nbufs, 1) - 1
                else:
                    pending.append(data)
                    remaining -= 1
                if remaining == 0:
                    whole = b"".join(pending)
                    hdr, frame = whole[:hdr_len], whole[hdr_len:]
                    frames.append((hdr, frame) if with_header else frame)
            if consumed and repost:
                for slot, size in consumed:
                    ring.driver.add_chain([(ring.slot_gpa(slot), size, True)], token=(slot, size),
                                          publish=False)
                ring.driver.publish()
                self._maybe_kick(ring)
            else:
                ring.free_slots.extend(slot for slot, _ in consumed)
            if (len(frames) >= want and remaining == 0) or time.monotonic() >= deadline:
                return frames
            ring.driver.enable_interrupts()
            if ring.driver.has_used():
                continue
            self._wait_call(ring, min(0.05, max(0.0, deadline - time.monotonic())))

    # -- lifetime --------------------------------------------------------------

    def close(self) -> None:
        """Close the socket (the back-end sees the front-end go away), then
        free rings, memory and eventfds."""
        if self._closed:
            return
        self._closed = True
        super().close()
        for ring in self.rings.values():
            ring.driver.release()
        self.rings = {}
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        close_fds(self._eventfds)
        self._eventfds = []
        if self.inflight_map is not None:
            self.inflight_map.close()
            self.inflight_map = None
        if self.inflight_fd >= 0:
            close_fds([self.inflight_fd])
            self.inflight_fd = -1

    def __enter__(self) -> "Frontend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
