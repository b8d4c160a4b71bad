"""The live update's channel (vfe/controller/handover.py): JSON datagrams
with their fds, more fds than one message can carry, and bad input."""
import os
import socket

import pytest

from vfe.controller import handover


@pytest.fixture
def pair():
    a, b = handover.channel()
    yield a, b
    a.close()
    b.close()


def _pipes(n):
    out = []
    for _ in range(n):
        r, w = os.pipe()
        os.close(w)
        out.append(r)
    return out


@pytest.mark.parametrize("n", [0, 1, 250, 251, 600])
def test_fds_arrive_in_order(pair, n):
    a, b = pair
    sent = _pipes(n)
    try:
        handover.send(a, "endpoint", {"state": {"x": 1}}, sent)
        kind, body, got = handover.recv(b, timeout=5)
        assert (kind, body) == ("endpoint", {"state": {"x": 1}})
        assert len(got) == n
        assert [os.fstat(x).st_ino for x in got] == [os.fstat(x).st_ino for x in sent]
        handover.close_fds(got)
    finally:
        handover.close_fds(sent)


def test_garbage_and_silence_and_eof(pair):
    a, b = pair
    a.send(b"\xff not json")
    with pytest.raises(handover.HandoverError, match="not JSON"):
        handover.recv(b, timeout=5)
    a.send(b'["no kind"]')
    with pytest.raises(handover.HandoverError, match="no kind"):
        handover.recv(b, timeout=5)
    with pytest.raises(handover.HandoverError, match="in time"):
        handover.recv(b, timeout=0.05)
    fds = _pipes(2)
    socket.send_fds(a, [b'{"kind": "endpoint", "nfds": 300}'], fds)   # announced more than sent
    a.send(b'{"kind": "end"}')
    with pytest.raises(handover.HandoverError, match="rest of endpoint"):
        handover.recv(b, timeout=5)
    handover.close_fds(fds)
    a.close()
    with pytest.raises(handover.HandoverError, match="closed"):
        handover.recv(b, timeout=5)


def test_received_closes_what_nobody_claimed():
    fds = _pipes(3)
    got = handover.Received(fds)
    kept = got.claim(1)
    got.close_unclaimed()
    os.fstat(kept)
    for i in (0, 2):
        with pytest.raises(OSError):
            os.fstat(fds[i])
    os.close(kept)
