"""BackendProtocol.export_state / from_state: a live update rebuilds a
connection's state machine in another process, mid-conversation."""
import json
import os

import pytest

from tests.unit.vhost.vhost_helpers import (
    Driver, Fds, default_region, mem_table, msg, negotiate, setup_ring, spec, u64,
)

from vfe.vhost.actions import CloseFds, Reply, StopRing
from vfe.vhost.messages import Log, Request, VringFile, VringState
from vfe.vhost.protocol import BackendProtocol


@pytest.fixture
def fds():
    f = Fds()
    yield f
    f.cleanup()


def running(fds) -> Driver:
    """Negotiated, memory, two rings started, a dirty log, ring 1 disabled."""
    drv = Driver(BackendProtocol(spec()))
    negotiate(drv)
    drv.send(mem_table([default_region()], fds.new(1)))
    setup_ring(drv, fds, 0)
    setup_ring(drv, fds, 1)
    drv.send(msg(Request.SET_VRING_ENABLE, VringState(0, 1)))
    drv.send(msg(Request.SET_LOG_BASE, Log(4096, 0), [fds.one()]))
    drv.send(u64(Request.SET_STATUS, 0x0F))
    return drv


def moved(p: BackendProtocol) -> tuple[BackendProtocol, dict]:
    """Export, through JSON, into a new protocol owning dups of the fds."""
    state = json.loads(json.dumps(p.export_state()))
    new_fds = [os.dup(fd) for fd in state["fds"]]
    return BackendProtocol.from_state(p.spec, state, new_fds), dict(zip(state["fds"], new_fds))


def test_round_trip_keeps_every_observable(fds):
    drv = running(fds)
    p = drv.p
    p.rings_paused({0: 17, 1: 300})
    q, fdmap = moved(p)
    try:
        assert (q.features, q.protocol_features, q.session_owned, q.status) == \
            (p.features, p.protocol_features, p.session_owned, p.status)
        assert q.regions == p.regions and q.log_base == p.log_base
        for i, r in p.rings.items():
            s = q.rings[i]
            assert s.base == r.base and s.num == r.num and s.addr == r.addr
            assert (s.enabled, s.started, s.kick_set) == (r.enabled, r.started, r.kick_set)
            assert s.kick_fd == fdmap[r.kick_fd] and s.call_fd == fdmap[r.call_fd]
        assert q.rings[0].base == 17 and q.rings[1].base == 300
        assert q.held_fds() == frozenset(fdmap.values())
        assert [(c.index, c.base, c.enabled) for c in q.running_rings()] == [(0, 17, True), (1, 300, False)]
    finally:
        Driver(q).disconnect()


def test_the_new_protocol_goes_on_with_the_conversation(fds):
    p = running(fds).p
    p.rings_paused({0: 5})
    q, fdmap = moved(p)
    drv = Driver(q)
    drv.avail[0] = 9
    out = drv.send(msg(Request.GET_VRING_BASE, VringState(0, 0)))
    assert isinstance(out[0], StopRing) and out[0].index == 0
    reply = [a for a in out if isinstance(a, Reply)][0]
    assert VringState.decode(reply.payload) == VringState(0, 9)
    # the old kick fd (ours, under the new number) is released with the stop
    kick = fdmap[p.rings[0].kick_fd]
    assert any(isinstance(a, CloseFds) and kick in a.fds for a in out)
    # and a disconnect closes every fd it was handed
    drv.disconnect()
    for fd in fdmap.values():
        with pytest.raises(OSError):
            os.fstat(fd)


def test_export_refuses_a_state_in_the_middle_of_a_change(fds):
    drv = Driver(BackendProtocol(spec()))
    negotiate(drv)
    drv.send(mem_table([default_region()], fds.new(1)))
    setup_ring(drv, fds, 0)
    drv.p.receive(msg(Request.GET_VRING_BASE, VringState(0, 0)))     # StopRing not answered yet
    with pytest.raises(RuntimeError, match="in progress"):
        drv.p.export_state()


def test_from_state_checks_version_and_fd_count(fds):
    p = running(fds).p
    state = p.export_state()
    with pytest.raises(ValueError, match="version"):
        BackendProtocol.from_state(p.spec, dict(state, version=99), list(state["fds"]))
    with pytest.raises(ValueError, match="fds"):
        BackendProtocol.from_state(p.spec, state, state["fds"][:-1])


def test_a_kick_after_the_move_restarts_from_the_recorded_base(fds):
    p = running(fds).p
    p.rings_paused({1: 42})
    q, _ = moved(p)
    drv = Driver(q)
    drv.avail[1] = 42
    out = drv.send(msg(Request.SET_VRING_KICK, VringFile(1, False), [fds.one()]))
    starts = [a.ring for a in out if type(a).__name__ == "StartRing"]
    assert [(s.index, s.base) for s in starts] == [(1, 42)]
    drv.disconnect()


def test_the_handed_over_json_keeps_its_shape(fds):
    """A live update hands this JSON between two builds: its keys (and
    SET_OWNER's "owner") are a format, not names in the code."""
    drv = running(fds)
    drv.send(msg(Request.SET_OWNER))
    state = drv.p.export_state()
    assert sorted(state) == sorted([
        "version", "fds", "features", "features_set", "protocol_features", "owner",
        "backend_req_fd", "status", "log", "log_fd", "inflight", "inflight_packed", "regions",
        "rings"])
    assert state["version"] == 1 and state["owner"] is True
    assert sorted(state["rings"][0]) == sorted([
        "index", "num", "base", "addr", "kick_fd", "kick_set", "call_fd", "err_fd", "enabled",
        "started", "told_enabled"])
