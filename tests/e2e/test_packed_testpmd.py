"""DPDK's testpmd with packed virtqueues (``net_virtio_user ... packed_vq=1``)
on two sockets of our daemon: frames sent on one port arrive on the
other, counts exact, with mergeable RX buffers on and off."""
from __future__ import annotations

import os

import pytest

from tests.harness import pmd_measure as measure
from tests.harness import testpmd

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not testpmd.testpmd_available(), reason="dpdk-testpmd not installed (scripts/setup)")]


def test_packed_vq_vdev_string():
    assert testpmd.virtio_user("/s", name="net_virtio_user0", packed_vq=True) == \
        "net_virtio_user0,path=/s,queues=1,queue_size=256,mrg_rxbuf=1,packed_vq=1"


@pytest.mark.parametrize("queues", [1, 2])
@pytest.mark.parametrize("mrg_rxbuf", [True, False], ids=["mrg", "nomrg"])
@pytest.mark.parametrize("frame_size", [64, 1518])
def test_testpmd_packed_counts_through_daemon(controller, sockdir, frame_size, mrg_rxbuf, queues):
    sa, sb = os.path.join(sockdir, "a.sock"), os.path.join(sockdir, "b.sock")
    ctl = controller([f"net,socket={sa},queues={queues}", f"net,socket={sb},queues={queues}"])
    res = measure.check_forward_counts(sa, sb, frame_size=frame_size, mrg_rxbuf=mrg_rxbuf,
                                       queues=queues, packed_vq=True)
    for tx_port, sent, rx_port, got in res.pairs():
        assert sent == got == 32 * 4 * queues, res
    # both ports ran packed rings (the daemon says so once per front-end)
    assert ctl.log().count("packed virtqueues (VIRTIO_F_RING_PACKED)") >= 2, ctl.log()
    assert "stopped:" not in ctl.log()
