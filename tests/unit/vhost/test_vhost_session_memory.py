"""Session (vfe/devices/adapter.py) memory table changes that fail to map,
with real memfds and real mappings (tests/harness/vhost_harness.py)."""
import logging

import pytest

from tests.unit.vhost.vhost_helpers import MiB, UVA0, msg, ring_addr, u64

from tests.harness.vhost_harness import Connection, FdKind
from vfe.vhost.messages import (
    MemoryRegion, MemTable, ProtocolFeature, Request, U64, VringFile, VringState,
)
from vfe.virtio.constants import F, bit


@pytest.fixture
def conn(caplog):
    caplog.set_level(logging.CRITICAL, logger="vfe")
    c = Connection(blk=False)
    yield c
    c.close()


def _running_ring(c: Connection) -> None:
    spec = c.spec
    c.handle(u64(Request.SET_PROTOCOL_FEATURES, spec.protocol_features))
    c.handle(msg(Request.SET_OWNER))
    c.handle(u64(Request.SET_FEATURES, spec.features & ~bit(F.VHOST_LOG_ALL)))
    c.handle(msg(Request.SET_MEM_TABLE, MemTable((MemoryRegion(0, 16 * MiB, UVA0, 0),)),
                 [c.fds.make(FdKind.MEMFD_16M)]))
    c.handle(msg(Request.SET_VRING_NUM, VringState(0, 256)))
    c.handle(msg(Request.SET_VRING_ADDR, ring_addr(0, 256)))
    c.handle(msg(Request.SET_VRING_KICK, U64(VringFile(0, False).value),
                 [c.fds.make(FdKind.EVENTFD)]))
    assert 0 in c.rings.started


def test_failed_mem_table_leaves_no_ring_on_the_old_memory(conn):
    """A new table that cannot be mapped (its memfd is shorter than the
    region) is nacked and forgotten; the old table must not stay mapped
    under it, or the ring the protocol restarts runs on memory the
    protocol no longer has (found by tests/fuzz/target_protocol.py)."""
    _running_ring(conn)
    assert conn.session.protocol.has_protocol_feature(ProtocolFeature.REPLY_ACK)
    conn.handle(msg(Request.SET_MEM_TABLE, MemTable((MemoryRegion(0, MiB, UVA0, 0),)),
                    [conn.fds.make(FdKind.MEMFD_4K)], need_reply=True))
    acks = [r for r in conn.replies if r.request == Request.SET_MEM_TABLE]
    assert [U64.decode(r.payload).value for r in acks] == [1]      # nacked
    assert conn.session.protocol.regions == ()
    assert len(conn.session.memory) == 0                           # nothing left mapped
    assert conn.rings.started == {}                                # no ring without memory
    assert not conn.session.protocol.rings[0].started
    # a good table afterwards starts the ring again
    conn.handle(msg(Request.SET_MEM_TABLE, MemTable((MemoryRegion(0, 16 * MiB, UVA0, 0),)),
                    [conn.fds.make(FdKind.MEMFD_16M)], need_reply=True))
    assert 0 in conn.rings.started
    conn.end()
    conn.check_process()


def test_mem_table_that_fails_to_map_while_rings_run_is_nacked(conn):
    """With rings running, SET_MEM_TABLE is applied only once they stopped
    (from the StopRing's follow-up actions); its failure there must still
    make REPLY_ACK say 1, not 0 (found with the first fix above)."""
    _running_ring(conn)
    conn.replies.clear()
    fd = conn.fds.make(FdKind.MEMFD_4K)
    conn.fds.hand_over([fd])
    # straight into the Session: no harness checks, only what the front-end hears
    conn.session.handle(msg(Request.SET_MEM_TABLE, MemTable((MemoryRegion(0, MiB, UVA0, 0),)),
                            [fd], need_reply=True))
    acks = [U64.decode(r.payload).value for r in conn.replies if r.request == Request.SET_MEM_TABLE]
    assert acks == [1]
