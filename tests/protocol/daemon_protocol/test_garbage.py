"""Garbage on the socket drops only that connection; a stuck or deaf peer
blocks no one."""
from __future__ import annotations

import os
import struct
import time

import pytest

from tests.protocol.daemon_helpers import (
    MiB, close_frontend, exchange, expect_dropped, open_frontend, send_one,
)
from tests.protocol.daemon_protocol.helpers import others_still_served, wait_equal
from vfe.devices.net import NET_FEATURES
from vfe.vhost.framing import MAX_PAYLOAD_SIZE
from vfe.vhost.messages import HEADER, NEED_REPLY, REPLY_FLAGS, VERSION, Request


GARBAGE = {
    "deadbeef": b"\xde\xad\xbe\xef" * 256,
    "http-request": b"GET / HTTP/1.1\r\nHost: vfe\r\n\r\n",
    "zeros": bytes(64),
    "all-ones": b"\xff" * 4096,
    "random": bytes((i * 7919 + 13) % 251 for i in range(8192)),
}


@pytest.mark.parametrize("kind", list(GARBAGE))
def test_garbage_bytes_drop_the_connection_only(daemon, peers, kind):
    fds0 = daemon.fd_count()
    a = open_frontend(daemon, "a", 2)
    exchange(a, peers.b)
    mark = daemon.mark()
    try:
        a.conn.send_bytes(GARBAGE[kind])
    except OSError:
        pass
    expect_dropped(a)
    daemon.wait_log("net0: protocol error, dropping the connection", mark)
    close_frontend(daemon, a)
    others_still_served(daemon, peers)
    wait_equal(daemon.fd_count, fds0, "daemon fds")


@pytest.mark.parametrize("size", [MAX_PAYLOAD_SIZE + 1, 1 << 20, 0xFFFFFFFF])
def test_header_announcing_a_huge_payload_is_refused(daemon, peers, size):
    a = open_frontend(daemon, "a", 2)
    exchange(a, peers.b)
    mark = daemon.mark()
    a.conn.send_bytes(HEADER.pack(Request.SET_MEM_TABLE, VERSION, size) + bytes(100))
    expect_dropped(a)
    log = daemon.wait_log("net0: protocol error, dropping the connection", mark)
    assert f"payload size {size}" in log
    close_frontend(daemon, a)
    others_still_served(daemon, peers)


def test_a_peer_stuck_in_the_middle_of_a_message_does_not_block_others(daemon, peers):
    """A header announcing the largest payload allowed, then silence: the
    daemon waits for the rest without blocking other devices, and lets go
    when the peer closes."""
    a = open_frontend(daemon, "a", 2)
    exchange(a, peers.b)
    a.conn.send_bytes(HEADER.pack(Request.SET_CONFIG, VERSION, MAX_PAYLOAD_SIZE) + bytes(100))
    time.sleep(0.1)
    assert daemon.attached("a")
    exchange(peers.b, peers.c)
    assert peers.b.get_features() == NET_FEATURES           # control plane answers too
    send_one(peers.b, 0, a)                                 # a's rings still run
    mark = daemon.mark()
    close_frontend(daemon, a)
    assert "in the middle of a message" in daemon.wait_log("net0: front-end disconnected", mark)
    others_still_served(daemon, peers)


def test_every_request_id_with_random_payloads_never_kills_the_daemon(daemon, peers):
    """A small fuzz over the real socket: request ids 0..47, payload sizes
    0..4096 of random bytes (and some with a small first u64), with and
    without an fd, NEED_REPLY set and REPLY_ACK negotiated.  Each gets a
    reply/ack or drops the connection; nothing else happens."""
    import random
    rng = random.Random(20240611)
    fds0 = daemon.fd_count()
    a = None
    answered = dropped = 0
    for rid in range(48):
        for size in (0, 1, 8, 12, 16, 24, 40, 264, 4096):
            for with_fd in (False, True):
                if a is None:
                    a = open_frontend(daemon, "a", 2, start=False)
                    a.negotiate()
                payload = bytearray(rng.getrandbits(8) for _ in range(size))
                if size >= 8 and rng.random() < 0.5:
                    payload[:8] = struct.pack("<Q", rng.choice([0, 1, 3, 4, 255, 256, 257, 1 << 32]))
                fds = []
                if with_fd:
                    fds.append(os.memfd_create("vfe-test-fuzz", os.MFD_CLOEXEC))
                    os.ftruncate(fds[0], MiB)
                try:
                    a.send_message(rid, bytes(payload), fds, flags=VERSION | NEED_REPLY,
                                   expect_reply=False)
                    reply = a.conn.recv_message(3)
                    assert (reply.request, reply.flags) == (rid, REPLY_FLAGS), reply
                    answered += 1
                except TimeoutError:
                    raise AssertionError(f"request {rid} ({size} bytes): no reply, no drop") from None
                except OSError:                     # PeerClosed: dropped
                    dropped += 1
                    close_frontend(daemon, a)
                    a = None
                finally:
                    for fd in fds:
                        os.close(fd)
                assert daemon.alive(), f"request {rid} with {size} bytes killed the daemon"
    close_frontend(daemon, a)
    assert answered and dropped
    others_still_served(daemon, peers)
    wait_equal(daemon.fd_count, fds0, "daemon fds")


def test_a_front_end_that_never_reads_its_replies_does_not_stall_the_others(daemon, peers):
    """A front-end that sends requests with replies and never reads them
    fills its socket.  The daemon must not block on it: another device's
    control requests are answered meanwhile (QEMU waits for every reply)."""
    from vfe.vhost.framing import encode_message
    a = open_frontend(daemon, "a", 2, start=False)
    try:
        a.conn.send_bytes(encode_message(Request.GET_FEATURES) * 3000)
        time.sleep(0.3)
        peers.b.timeout = 1.0
        t0 = time.monotonic()
        try:
            features = peers.b.get_features()
        except TimeoutError:
            features = None
        took = time.monotonic() - t0
        assert features == NET_FEATURES, (
            f"device b's GET_FEATURES was not answered within 1 s ({took:.1f} s) while device a's "
            f"front-end did not read its replies")
    finally:
        close_frontend(daemon, a)
    peers.b.timeout = 5.0
    others_still_served(daemon, peers)
