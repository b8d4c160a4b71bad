"""DPDK's testpmd as a second real front-end: two net_virtio_user ports on
two sockets of our daemon; frames sent on one port must arrive on the other
with equal counts (the in-engine switch floods the unknown destination)."""
from __future__ import annotations

import os

import pytest

from tests.harness import pmd_measure as measure
from tests.harness import testpmd

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not testpmd.testpmd_available(), reason="dpdk-testpmd not installed (scripts/setup)")]


@pytest.mark.parametrize("queues", [1, 2])
@pytest.mark.parametrize("mrg_rxbuf", [True, False], ids=["mrg", "nomrg"])
@pytest.mark.parametrize("frame_size", [64, 1518])
def test_testpmd_counts_through_daemon(controller, sockdir, frame_size, mrg_rxbuf, queues):
    sa, sb = os.path.join(sockdir, "a.sock"), os.path.join(sockdir, "b.sock")
    ctl = controller([f"net,socket={sa},queues={queues}", f"net,socket={sb},queues={queues}"])
    res = measure.check_forward_counts(sa, sb, frame_size=frame_size, mrg_rxbuf=mrg_rxbuf, queues=queues)
    # counts equal in both directions (checked inside), and every frame sent
    for tx_port, sent, rx_port, got in res.pairs():
        assert sent == got == 32 * 4 * queues, res
    assert "stopped:" not in ctl.log()


@pytest.mark.parametrize("mode,workers", [("poll", 1), ("adaptive", 2), ("poll", 2)])
def test_testpmd_counts_across_modes_and_workers(controller, sockdir, mode, workers):
    """The same counts with busy polling and with rings spread over two worker threads."""
    sa, sb = os.path.join(sockdir, "a.sock"), os.path.join(sockdir, "b.sock")
    controller([f"net,socket={sa},queues=2", f"net,socket={sb},queues=2"], mode=mode, workers=workers)
    res = measure.check_forward_counts(sa, sb, frame_size=64, queues=2)
    for tx_port, sent, rx_port, got in res.pairs():
        assert sent == got == 32 * 4 * 2, res
