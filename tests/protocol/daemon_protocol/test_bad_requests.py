"""Wrong sizes, unknown and out-of-order requests: REPLY_ACK failures where
negotiated, else only that connection is dropped; never a crash."""
from __future__ import annotations

import os

import pytest

from tests.protocol.daemon_helpers import MiB, ack_value, exchange, expect_dropped
from tests.protocol.daemon_protocol.bad_requests import BAD, send_bad
from tests.protocol.daemon_protocol.helpers import (
    NO_REPLY_ACK, eventfd, others_still_served, region,
)
from vfe.testing.channel import DEFAULT_PROTOCOL_FEATURES, NackError
from vfe.vhost.messages import Config, ProtocolFeature, Request, SingleMemRegion, VringState
from vfe.virtio.constants import bit

PF = ProtocolFeature


@pytest.mark.parametrize("case", list(BAD.values()), ids=list(BAD))
def test_bad_request_with_reply_ack_is_nacked_and_the_connection_stays_usable(
        daemon, peers, frontends, case):
    a = frontends("a", 2, start=False)
    a.negotiate()
    assert a.has_protocol_feature(PF.REPLY_ACK)
    if case.running:
        a.start(queue_pairs=2, queue_size=256, mem_size=8 * MiB)
        for p in range(2):
            a.post_rx_buffers(p)
        exchange(a, peers.b)
    mark = daemon.mark()
    assert ack_value(send_bad(a, case, need_reply=True)) == 1
    assert "dropping the connection" not in daemon.log_since(mark)
    if not case.running:
        a.start(queue_pairs=2, queue_size=256, mem_size=8 * MiB)
        for p in range(2):
            a.post_rx_buffers(p)
    exchange(a, peers.b)
    assert daemon.attached("a")


@pytest.mark.parametrize("case", list(BAD.values()), ids=list(BAD))
def test_bad_request_without_reply_ack_drops_only_that_connection(daemon, peers, frontends, case):
    a = frontends("a", 2, start=False)
    a.negotiate(protocol_features=NO_REPLY_ACK)
    assert not a.has_protocol_feature(PF.REPLY_ACK)
    if case.running:
        a.start(queue_pairs=2, queue_size=256, mem_size=8 * MiB)
        for p in range(2):
            a.post_rx_buffers(p)
        exchange(a, peers.b)
    mark = daemon.mark()
    send_bad(a, case, need_reply=False)
    expect_dropped(a)
    daemon.wait_log("net0: protocol error, dropping the connection", mark)
    daemon.wait_detached("a")
    others_still_served(daemon, peers)


@pytest.mark.parametrize("name", ["payload-too-short", "unknown-request-99", "kick-without-fd",
                                  "set-vring-base-on-running-ring"])
def test_bad_request_with_reply_ack_but_no_need_reply_drops_the_connection(
        daemon, peers, frontends, name):
    case = BAD[name]
    a = frontends("a", 2, start=False)
    a.negotiate()
    if case.running:
        a.start(queue_pairs=2, queue_size=256, mem_size=8 * MiB)
    mark = daemon.mark()
    send_bad(a, case, need_reply=False)
    expect_dropped(a)
    daemon.wait_log("net0: protocol error, dropping the connection", mark)
    others_still_served(daemon, peers)


MANDATORY = {
    # A request whose reply is part of the protocol cannot be nacked (QEMU
    # would read the ack as the reply): the connection is dropped.
    "get-vring-base-ring-index-too-big": (Request.GET_VRING_BASE, VringState(4, 0).encode(), None),
    "get-vring-base-short-payload": (Request.GET_VRING_BASE, bytes(4), None),
    "get-config-not-negotiated": (Request.GET_CONFIG, Config(0, 4, 0, bytes(4)).encode(), None),
    "get-queue-num-without-mq": (Request.GET_QUEUE_NUM, b"", DEFAULT_PROTOCOL_FEATURES & ~bit(PF.MQ)),
    "get-inflight-fd-unsupported": (Request.GET_INFLIGHT_FD, bytes(24), None),
}


@pytest.mark.parametrize("name", list(MANDATORY))
def test_failing_request_with_a_mandatory_reply_drops_the_connection(daemon, peers, frontends, name):
    request, payload, pfeatures = MANDATORY[name]
    a = frontends("a", 2, start=False)
    a.negotiate(protocol_features=pfeatures)
    mark = daemon.mark()
    a.send_message(request, payload, expect_reply=False)
    expect_dropped(a)
    daemon.wait_log("net0: protocol error, dropping the connection", mark)
    others_still_served(daemon, peers)


def test_get_vring_base_on_a_never_started_ring_is_answered(daemon, peers, frontends):
    """Out of order but answerable: the spec's reply (the ring's base), and
    the connection goes on."""
    a = frontends("a", 2, start=False)
    a.negotiate()
    assert a.get_vring_base(3) == 0
    a.set_vring_base(2, 17)
    assert a.get_vring_base(2) == 17
    a.start(queue_pairs=2, queue_size=256, mem_size=8 * MiB)
    for p in range(2):
        a.post_rx_buffers(p)
    exchange(a, peers.b)


def test_unmappable_region_is_nacked_not_fatal(daemon, peers, frontends):
    """The fd is valid but cannot be mapped (an eventfd): REPLY_ACK 1."""
    a = frontends("a", 2, start=False)
    a.negotiate()
    efd = eventfd()
    try:
        with pytest.raises(NackError):
            a._request(Request.ADD_MEM_REG, SingleMemRegion(region(1 << 32, MiB)).encode(),
                       [efd], ack=True)
    finally:
        os.close(efd)
    a.start(queue_pairs=2, queue_size=256, mem_size=8 * MiB)
    for p in range(2):
        a.post_rx_buffers(p)
    exchange(a, peers.b)
