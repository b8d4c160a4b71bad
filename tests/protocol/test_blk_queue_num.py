"""A front-end that wants more queues than a blk device has.

QEMU's vhost-user-blk asks GET_QUEUE_NUM before SET_OWNER and, when its
num-queues is larger than the answer, closes the connection and says only
"The maximum number of queues supported by the backend is N".  The
daemon's log then says what to change (the controller's blk functions name
--num_queues there: tests/unit/controller/test_ctl_blk_firmware.py); a
front-end that goes on after GET_QUEUE_NUM gets no such line.
"""
from __future__ import annotations

import pytest

from tests.protocol.blk_helpers import BlkDaemon
from tests.protocol.daemon_helpers import serving

from vfe.testing.channel import FrontendChannel
from vfe.vhost.messages import ProtocolFeature

HINT = "QEMU does that when its num-queues is larger; serve it with a larger queues="


@pytest.fixture(scope="module")
def disk():
    d = BlkDaemon({}, {"one": "bdev=null,size=8,queues=1"}, workers=1)
    with serving(d):
        yield d


def handshake(disk) -> FrontendChannel:
    """QEMU's vhost_user_backend_init up to its num-queues check."""
    disk.wait_detached("one")
    ch = FrontendChannel.connect(disk.paths["one"])
    ch.get_features()
    ch.set_protocol_features(ch.get_protocol_features() & (1 << ProtocolFeature.MQ | 1 << ProtocolFeature.CONFIG))
    assert ch.get_queue_num() == 1
    return ch


def test_leaving_after_get_queue_num_is_explained(disk):
    mark = disk.mark()
    handshake(disk).close()
    log = disk.wait_log("front-end disconnected", since=mark)
    assert f"blk0: the front-end closed the connection right after GET_QUEUE_NUM answered 1: {HINT}" in log


def test_going_on_after_get_queue_num_is_not(disk):
    mark = disk.mark()
    ch = handshake(disk)
    ch.set_owner()
    ch.close()
    log = disk.wait_log("front-end disconnected", since=mark)
    assert "right after GET_QUEUE_NUM" not in log
