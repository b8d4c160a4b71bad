"""The live update's channel (vfe/controller/handover.py): JSON datagrams
with their fds, more fds than one message can carry, and bad input; what
the new process makes of the functions handed over (update.Takeover)."""
import os
import socket
import types

import pytest

from vfe.controller import handover
from vfe.controller.net_recovery import RecoveryRecord
from vfe.controller.update import HANDED_OVER_KIND, Takeover


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


def test_the_new_side_gets_the_records_typed(pair):
    """A function's record crosses as its file's JSON (features in hex) and
    comes out as the RecoveryRecord the codec would load, for the kind
    handed over only; its run-time state is kept by VUID."""
    a, b = pair
    record = RecoveryRecord(vuid="VNETS1D0F0", port_ib_dev="mlx5_0", pf_id=2, function_type="pf",
                            bdf_raw=0x8500, device_type="hotplug", mac="0c:c4:7a:ff:22:93", pf_num=0,
                            sf_num=1001, mq=1, mtu=1500, max_queues=3, max_queue_size=256, num_msix=4,
                            features=0x3000, legacy=True, port=0)
    takeover = Takeover(os.dup(b.fileno()))
    rpc = _pipes(1)
    try:
        handover.send(a, "begin", {"version": "0.9", "paused_at": 1.5}, rpc)
        handover.send(a, "function", {"record": record.validate().to_json(), "representor": None,
                                      "extra": {"qmp_id": None, "lm_state": "freeze", "paused": True}})
        handover.send(a, "end")
        takeover.receive(types.SimpleNamespace(inherited={}))
    finally:
        handover.close_fds(rpc)
        os.close(takeover.rpc_fd)
        takeover.chan.close()
    loaded = takeover.handed_over(HANDED_OVER_KIND)
    assert loaded.records == [record] and loaded.problems == []
    assert takeover.handed_over("blk") is None                 # blk functions come back from their files
    assert takeover.run_time_state == {"VNETS1D0F0": {"qmp_id": None, "lm_state": "freeze", "paused": True}}
