"""Inflight tracking of packed blk queues against a real daemon: a daemon
killed with SIGKILL in the middle of a stream of large writes, and its
successor given the same packed region (as QEMU keeps it).

QEMU 7.2 cannot tell a packed ring's position after a back-end crash
(virtio_queue_packed_restore_last_avail_idx does nothing): it sends the
base of the ring's last start again.  The region holds the truth -- the
used cursor and wrap counter the engine committed, and the chains taken
but not answered -- so the successor continues from there and answers
every request exactly once (the Python driver raises on an id returned
twice)."""
from __future__ import annotations

import os
import re
import time

import pytest

from tests.protocol.blk_helpers import S_OK, T_OUT, BlkDaemon, BlkQueue
from tests.protocol.daemon_helpers import MiB, serving

from vfe.testing.frontend import Frontend
from vfe.vhost import inflight as layout
from vfe.virtio.constants import F, bit
from vfe.virtio.layouts import PACKED_BASE_RESET

SIZE_MB = 128
QSIZE = 16            # small: the writes before the crash take the ring into its second lap


@pytest.fixture
def disk(tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(b"")
    d = BlkDaemon({}, {"file": f"bdev=file,path={img},size={SIZE_MB},queues=1"}, workers=2)
    d.img = img
    frontends: list[Frontend] = []
    d.frontends = frontends
    with serving(d):
        try:
            yield d
        finally:
            for fe in frontends:
                fe.close()


def test_packed_requests_left_by_a_killed_daemon_complete_exactly_once(disk):
    n, chunk = 12, 4 * MiB
    fe = Frontend.connect(disk.paths["file"])
    disk.frontends.append(fe)
    fe.start(rings=1, queue_size=QSIZE, buf_size=64, mem_size=(n * 4 + 16) * MiB, packed=True)
    assert fe.features & bit(F.RING_PACKED)
    assert fe.inflight.mmap_size == layout.region_size(1, QSIZE, packed=True)
    q = BlkQueue(fe, 0)
    # a first lap and a bit: the ring's wrap counters flip before the crash
    for k in range(QSIZE + 3):
        q.write(8 * k, bytes([k]) * 4096)
    pats = [bytes([0x40 + k]) * chunk for k in range(n)]
    ids = {}
    for k in range(n):
        ids[q.submit(T_OUT, 65536 + k * (chunk // 512), pats[k], kick=False, indirect=True)] = k
    info = fe.inflight
    r = layout.InflightRegion(fe.inflight_fd, info.mmap_size, info.mmap_offset,
                              info.num_queues, info.queue_size, packed=True)
    try:
        os.eventfd_write(q.ring.kick_fd, 1)
        deadline = time.monotonic() + 10
        while not r.inflight_heads(0):             # the engine took a request
            assert time.monotonic() < deadline, "the daemon never took a request"
        disk.proc.kill()                           # SIGKILL, waits for it
    finally:
        r.close()
    answered = q.ring.driver.get_used()            # what the killed daemon answered
    assert len(answered) < n, "the daemon finished everything before it was killed"

    disk.start()
    mark = disk.mark()
    fe.reconnect(disk.paths["file"])
    # as QEMU 7.2: the packed base of the last start (no GET_VRING_BASE answer)
    assert fe.rings[0].base == PACKED_BASE_RESET
    fe.start(rings=1, queue_size=QSIZE, buf_size=64, packed=True)
    # the rest, each once (the driver raises on an id returned twice)
    rest = q.complete(n - len(answered), timeout=60)
    assert [s for s, _, _ in rest] == [S_OK] * (n - len(answered))
    log = disk.wait_log("left inflight resubmitted", since=mark)
    assert re.search(r"blk0: ring 0: \d+ request\(s\) left inflight resubmitted", log), log
    time.sleep(0.2)
    assert not q.ring.driver.has_used()            # and nothing more
    assert q.request(4)[0] == S_OK                 # FLUSH: the daemon's page cache is the file's
    with open(disk.img, "rb") as f:
        for k in range(n):
            f.seek(65536 * 512 + k * chunk)
            assert f.read(chunk) == pats[k], k
    # the ring goes on where the region said
    for k in range(3):
        q.write(8 * k, bytes([0xEE]) * 4096)
        assert q.read(8 * k, 4096) == bytes([0xEE]) * 4096
