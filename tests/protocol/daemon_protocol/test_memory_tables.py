"""Memory tables: many regions, buffers across region ends, tables that fail to map."""
from __future__ import annotations

import os
import time

import pytest

from tests.protocol.daemon_helpers import MiB, Memfd, exchange, frame, new_token, recv_token
from tests.protocol.daemon_protocol.helpers import region
from vfe.testing.channel import NackError
from vfe.testing.guest_ram import GuestRam
from vfe.vhost.messages import MemTable, Request, SingleMemRegion
from vfe.virtio.constants import F, bit


def _write_span(ram: GuestRam, gpa: int, data: bytes) -> None:
    """Write across region ends (regions are contiguous in gpa)."""
    while data:
        r, off = ram.region_of(gpa)
        n = min(len(data), r.size - off)
        r.view[off:off + n] = data[:n]
        gpa, data = gpa + n, data[n:]


def _read_span(ram: GuestRam, gpa: int, length: int) -> bytes:
    out = b""
    while length:
        r, off = ram.region_of(gpa)
        n = min(length, r.size - off)
        out += bytes(r.view[off:off + n])
        gpa, length = gpa + n, length - n
    return out


def _ram_for_crossing(size: int, regions: int, shared_fd: bool) -> GuestRam:
    """Regions contiguous in gpa; rings and slot buffers go to the last two
    regions; the first ones are free for buffers that straddle region ends."""
    ram = GuestRam(size, regions, shared_fd=shared_fd)
    for r in ram.regions[:-2]:
        r.used = r.size
    return ram


def _cross_region_traffic(a, b, ram: GuestRam) -> None:
    """A TX chain whose pieces straddle the ends of regions 0, 1 and 2, and
    an RX buffer across the end of region 3 (a's RX ring 0 has no other
    buffers): both frames arrive intact."""
    starts = [r.gpa for r in ram.regions]
    token = new_token()
    f = frame(b.mac, a.mac, token, 1400)
    data = bytes(a.net_hdr_len) + f
    cuts = [(starts[1] - 10, 40), (starts[2] - 300, 700), (starts[3] - 1, len(data) - 740)]
    bufs, pos = [], 0
    for gpa, n in cuts:
        _write_span(ram, gpa, data[pos:pos + n])
        bufs.append((gpa, n, False))
        pos += n
    assert pos == len(data)
    tx = a.rings[1]
    tx.driver.add_chain(bufs, token=[])
    os.eventfd_write(tx.kick_fd, 1)
    got = recv_token(b, token, 2)
    assert got is not None and got[1] == f, "TX chain across regions"
    assert a.wait_tx_done(0)

    rx = a.rings[0]
    buf_gpa = starts[4] - 1000
    _write_span(ram, buf_gpa, bytes(2048))
    rx.driver.add_chain([(buf_gpa, 2048, True)], token=("cross", 2048))
    os.eventfd_write(rx.kick_fd, 1)
    token = new_token()
    f = frame(a.mac, b.mac, token, 1200)
    b.send_frame(0, f)
    deadline = time.monotonic() + 2
    used = []
    while not used and time.monotonic() < deadline:
        used = rx.driver.get_used()
        time.sleep(0.005)
    assert len(used) == 1 and used[0].token == ("cross", 2048), used
    assert used[0].length == a.net_hdr_len + len(f)
    got = _read_span(ram, buf_gpa, used[0].length)
    assert got[a.net_hdr_len:] == f, "RX buffer across regions"


def test_set_mem_table_with_8_regions_and_buffers_across_regions(daemon, peers, frontends):
    a = frontends("a", 2, start=False)
    a.memory = _ram_for_crossing(32 * MiB, 8, shared_fd=True)
    a.start(queue_pairs=2, queue_size=256, use_add_mem_reg=False)
    assert Request.SET_MEM_TABLE in [r for r, *_ in a.sent]
    assert Request.ADD_MEM_REG not in [r for r, *_ in a.sent]
    a.post_rx_buffers(1)
    exchange(a, peers.b, a_pairs=[0, 1], b_pairs=[1])
    _cross_region_traffic(a, peers.b, a.memory)
    # the same table again (older QEMUs send one per queue pair): a no-op
    a.set_mem_table(a.memory.regions)
    exchange(a, peers.b, a_pairs=[0, 1], b_pairs=[1])


def test_ten_regions_with_add_mem_reg_and_rem_mem_reg(daemon, peers, frontends):
    a = frontends("a", 2, start=False)
    a.memory = _ram_for_crossing(40 * MiB, 10, shared_fd=False)
    a.start(queue_pairs=2, queue_size=256)
    assert [r for r, *_ in a.sent].count(Request.ADD_MEM_REG) == 10
    assert len(daemon.guest_maps()) >= 10
    a.post_rx_buffers(1)
    exchange(a, peers.b, a_pairs=[0, 1], b_pairs=[1])
    _cross_region_traffic(a, peers.b, a.memory)
    # remove an unused region under running rings, then add it back
    spare = a.memory.regions[5]
    a.rem_mem_reg(spare)
    exchange(a, peers.b, a_pairs=[0, 1], b_pairs=[1])
    a.add_mem_reg(spare)
    exchange(a, peers.b, a_pairs=[0, 1], b_pairs=[1])


def test_rings_set_up_before_the_memory_table_start_once_it_arrives(daemon, peers, frontends):
    """Out of QEMU's order but legal: NUM/BASE/ADDR/KICK first, memory last."""
    a = frontends("a", 2, start=False)
    a.negotiate()
    a.memory = GuestRam(8 * MiB, 1)
    a.set_features(a.backend_features & ~(bit(F.VHOST_LOG_ALL) | bit(F.RING_PACKED)))
    for i in range(4):
        a.setup_ring(i, 256)
    a.sync()
    assert a.get_vring_base(0) == 0           # not running yet: answered at once
    a.setup_ring(0, 256)
    for r in a.memory.regions:
        a.add_mem_reg(r)
    for i in range(4):
        a.set_vring_enable(i, True)
    a.sync()
    for p in range(2):
        a.post_rx_buffers(p)
    exchange(a, peers.b)


def test_failed_mem_table_mapping_is_not_remembered(daemon, peers, frontends):
    """SET_MEM_TABLE whose fd cannot be mapped (file shorter than the
    region) is refused (REPLY_ACK 1).  QEMU then retries with the same
    table and a good fd: that must map it, and rings must run."""
    a = frontends("a", 2, start=False)
    a.negotiate()
    a.memory = GuestRam(8 * MiB, 1)
    region = a.memory.regions[0]
    short = Memfd(4096)
    try:
        with pytest.raises(NackError):
            a._request(Request.SET_MEM_TABLE, MemTable((region.to_message(),)).encode(),
                       [short.fd], ack=True)
    finally:
        short.close()
    a.start(queue_pairs=2, queue_size=256, use_add_mem_reg=False)   # same table, good fd
    for p in range(2):
        a.post_rx_buffers(p)
    exchange(a, peers.b)


def test_failed_add_mem_reg_mapping_is_not_remembered(daemon, peers, frontends):
    a = frontends("a", 2, start=False)
    a.negotiate()
    a.memory = GuestRam(8 * MiB, 1)
    region = a.memory.regions[0]
    short = Memfd(4096)
    try:
        with pytest.raises(NackError):
            a._request(Request.ADD_MEM_REG, SingleMemRegion(region.to_message()).encode(),
                       [short.fd], ack=True)
    finally:
        short.close()
    a.start(queue_pairs=2, queue_size=256)                           # same region, good fd
    for p in range(2):
        a.post_rx_buffers(p)
    exchange(a, peers.b)
