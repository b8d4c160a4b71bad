"""Indirect descriptor tables through the real daemon: a front-end that
negotiated RING_INDIRECT_DESC sends frames whose chains live in indirect
tables (header and data split over several descriptors); they arrive intact
on the other device, and the ring keeps running."""
from __future__ import annotations

import pytest

from tests.protocol.daemon_helpers import (close_frontend, daemon_fixtures, exchange, frame,
                                            new_token, open_frontend, recv_token)

daemon, daemon_guard = daemon_fixtures({"a": "queues=1", "b": "queues=1"})


@pytest.mark.parametrize("split_header", [False, True], ids=["whole", "split-header"])
@pytest.mark.parametrize("size", [60, 1514])
def test_indirect_chains_arrive_intact(daemon, split_header, size):
    a = open_frontend(daemon, "a", 1)
    b = open_frontend(daemon, "b", 1)
    try:
        exchange(a, b)                            # both MACs learnt
        for _ in range(8):
            token = new_token()
            f = frame(b.mac, a.mac, token, size)
            a.send_frame(0, f, indirect=True, split_header=split_header)
            got = recv_token(b, token, 3.0)
            assert got is not None and got[1] == f
            assert a.wait_tx_done(0, 3.0)
        assert "stopped:" not in daemon.log()
    finally:
        close_frontend(daemon, a)
        close_frontend(daemon, b)
