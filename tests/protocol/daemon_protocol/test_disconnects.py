"""A front-end that disconnects at any step leaves the daemon serving the
other devices and the socket ready for a new front-end."""
from __future__ import annotations

import os
import socket
import time

import pytest

from tests.protocol.daemon_helpers import (
    MiB, Cut, Memfd, close_frontend, cut_after, exchange, frame, new_token, open_frontend,
    qemu_start_sequence, send_one,
)
from tests.protocol.daemon_protocol.helpers import others_still_served, region, wait_equal
from vfe.vhost.messages import HEADER, VERSION, Request, SingleMemRegion
from vfe.virtio.constants import F, bit


SEQUENCE = qemu_start_sequence(2)
CUTS = [pytest.param(k, id=f"after-{k:02d}-{SEQUENCE[k - 1] if k else 'connect'}")
        for k in range(len(SEQUENCE) + 1)]


@pytest.mark.parametrize("k", CUTS)
def test_disconnect_during_the_start_sequence(daemon, peers, k):
    fds0 = daemon.fd_count()
    a = open_frontend(daemon, "a", 2, start=False)
    cut_after(a, k)
    try:
        a.start(queue_pairs=2, queue_size=256, mem_size=8 * MiB)
    except Cut:
        pass
    else:
        assert k == len(SEQUENCE)
        a.post_rx_buffers(0)
        a.send_frame(0, frame(peers.b.mac, a.mac, new_token()))
    close_frontend(daemon, a)
    others_still_served(daemon, peers)
    wait_equal(daemon.fd_count, fds0, "daemon fds")


def _running(daemon, peers, post_rx=True):
    a = open_frontend(daemon, "a", 2, post_rx=post_rx)
    if post_rx:
        exchange(a, peers.b)
    return a


def _flood(src, dst, n, pairs=(0, 1)):
    for i in range(n):
        try:
            src.send_frame(pairs[i % len(pairs)], frame(dst.mac, src.mac, new_token()))
        except BlockingIOError:
            break


def _scenario_traffic_in_flight(daemon, peers):
    a = _running(daemon, peers)
    _flood(a, peers.b, 200)
    _flood(peers.b, a, 200)
    return a


def _scenario_peer_stalled_on_our_full_rx(daemon, peers):
    a = open_frontend(daemon, "a", 2, post_rx=False)
    a.post_rx_buffers(0, 4)
    a.post_rx_buffers(1, 4)
    send_one(a, 0, peers.b)                   # the switch learns a's MAC
    _flood(peers.b, a, 60)                    # b's TX stalls on a's full RX
    time.sleep(0.1)
    return a


def _scenario_after_set_status_0(daemon, peers):
    a = _running(daemon, peers)
    _flood(a, peers.b, 50)
    a.set_status(0)
    return a


def _scenario_after_first_get_vring_base(daemon, peers):
    a = _running(daemon, peers)
    _flood(a, peers.b, 50)
    a.set_status(0)
    a.get_vring_base(0)
    a.get_vring_base(1)
    return a


def _scenario_stopped(daemon, peers):
    a = _running(daemon, peers)
    a.stop()
    return a


def _scenario_half_restarted(daemon, peers):
    a = _running(daemon, peers)
    a.stop()
    a.setup_ring(0, 256)
    a.setup_ring(1, 256, kick=False)
    return a


def _scenario_after_reset_owner(daemon, peers):
    a = _running(daemon, peers)
    _flood(a, peers.b, 50)
    a.reset_owner()
    a.sync()
    return a


def _scenario_after_log_base(daemon, peers):
    a = _running(daemon, peers)
    log = Memfd(4096)
    a.set_log_base(log.fd, 4096)
    log.close()
    a.set_features(a.features | bit(F.VHOST_LOG_ALL))
    _flood(a, peers.b, 20)
    return a


def _scenario_half_header(daemon, peers):
    a = open_frontend(daemon, "a", 2, start=False)
    a.get_features()
    a.conn.send_bytes(HEADER.pack(Request.SET_OWNER, VERSION, 0)[:6])
    return a


def _scenario_header_without_payload(daemon, peers):
    a = _running(daemon, peers)
    a.conn.send_bytes(HEADER.pack(Request.SET_MEM_TABLE, VERSION, 40))
    return a


def _scenario_partial_payload_with_fd(daemon, peers):
    a = _running(daemon, peers)
    msg = HEADER.pack(Request.ADD_MEM_REG, VERSION, 40) + SingleMemRegion(region(1 << 32, MiB)).encode()
    fd = os.memfd_create("vfe-test-partial", os.MFD_CLOEXEC)
    os.ftruncate(fd, MiB)
    a.conn.send_bytes(msg[:30], [fd])
    os.close(fd)
    return a


RUNNING_CUTS = {
    "traffic-in-flight": _scenario_traffic_in_flight,
    "peer-stalled-on-our-full-rx": _scenario_peer_stalled_on_our_full_rx,
    "after-SET_STATUS-0": _scenario_after_set_status_0,
    "after-first-GET_VRING_BASEs": _scenario_after_first_get_vring_base,
    "after-stop": _scenario_stopped,
    "half-restarted": _scenario_half_restarted,
    "after-RESET_OWNER": _scenario_after_reset_owner,
    "logging-dirty-pages": _scenario_after_log_base,
    "half-a-header": _scenario_half_header,
    "header-without-its-payload": _scenario_header_without_payload,
    "partial-payload-with-an-fd": _scenario_partial_payload_with_fd,
}


@pytest.mark.parametrize("scenario", list(RUNNING_CUTS))
def test_disconnect_while_running(daemon, peers, scenario):
    fds0 = daemon.fd_count()
    maps0 = len(daemon.guest_maps())
    a = RUNNING_CUTS[scenario](daemon, peers)
    close_frontend(daemon, a)
    others_still_served(daemon, peers)
    wait_equal(daemon.fd_count, fds0, "daemon fds")
    wait_equal(lambda: len(daemon.guest_maps()), maps0, "guest memory mappings")


def test_second_front_end_on_a_busy_socket_is_refused(daemon, peers, frontends):
    a = frontends("a", 2)
    exchange(a, peers.b)
    mark = daemon.mark()
    intruder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        intruder.connect(daemon.paths["a"])
        intruder.settimeout(3)
        assert intruder.recv(1) == b""                     # closed by the daemon
    finally:
        intruder.close()
    assert "refusing a second front-end" in daemon.wait_log("refusing", mark)
    exchange(a, peers.b)
