"""Port security in the in-engine switch (finding 9 of issue 11), against a
real virtio-net-controller process driven by the Python front-end.

A guest could claim another VM's MAC (and receive its traffic) or fill the
MAC table with random source MACs (pushing everyone else out, so their
traffic is flooded to every port).  Now:

- a device with ``mac=`` owns that MAC: its guest's frames from any other
  source MAC are dropped and counted, and no other port -- configured or
  not -- can take the MAC's table entry;
- a port learns at most 256 source MACs, and a full table window refuses a
  new MAC instead of evicting another port's: 100000 random source MACs
  leave the other VMs' entries where they were;
- a device without ``mac=`` learns as before (compatibility), MAC moves
  included.

The counters are read where the device's other counters are: the summary
line the daemon logs when the front-end disconnects (and a warning once
per front-end when it starts).

One daemon serves the module: v (net0, mac=V) and x (net1, mac=X) are
configured; p (net2) and o (net3) are not.
"""
from __future__ import annotations

import os
import re

import pytest

from tests.protocol.daemon_helpers import (
    close_frontend, daemon_fixtures, frame, new_token, open_frontend, recv_token, send_one,
)

V = bytes.fromhex("02aa00000001")
X = bytes.fromhex("02aa00000002")
BCAST = b"\xff" * 6
LIMIT = 256                      # MAC_LEARN_LIMIT (cython_ext/netpath.pxd)

daemon, daemon_guard = daemon_fixtures({
    "v": "mac=02:aa:00:00:00:01", "x": "mac=02:AA:00:00:00:02", "p": "", "o": ""})

SUMMARY = re.compile(r"(net\d): front-end disconnected \([^)]*\); .*spoofed (\d+), macs learned (-?\d+), "
                     r"not learned (\d+) \(limit\) (\d+) \(table full\)")


@pytest.fixture
def ports(daemon):
    """All four devices with front-ends; v and x use their configured MACs."""
    fes = {}
    for name in ("v", "x", "p", "o"):
        fes[name] = open_frontend(daemon, name)
    fes["v"].mac, fes["x"].mac = V, X
    yield fes
    for fe in fes.values():
        close_frontend(daemon, fe)


def counters(daemon, fe, mark: int) -> dict[str, int]:
    """Close fe and read its switch counters from the disconnect summary:
    what changed since the device's previous summary (the counters live as
    long as the device), and the entries it held when it went."""
    name = daemon.names[fe.dev]
    close_frontend(daemon, fe)
    log = daemon.log()
    seen = [(m.start(), [int(g) for g in m.groups()[1:]]) for m in SUMMARY.finditer(log)
            if m.group(1) == name]
    now = [v for pos, v in seen if pos >= mark]
    assert now, f"no switch counters for {name} in:\n{log[mark:][-3000:]}"
    before = [v for pos, v in seen if pos < mark] or [[0, 0, 0, 0]]
    (spoofed, learned, capped, full), (s0, _, c0, f0) = now[-1], before[-1]
    return {"spoofed": spoofed - s0, "learned": learned, "capped": capped - c0, "full": full - f0}


def unicast_reaches_only(src, dst, bystanders) -> None:
    """src -> dst's MAC arrives at dst and at none of the bystanders: the
    switch knows dst's port (the frame was not flooded)."""
    token = new_token()
    src.send_frame(0, frame(dst.mac, src.mac, token))
    assert recv_token(dst, token) is not None, f"{dst.dev} did not get {src.dev}'s frame"
    for b in bystanders:
        assert recv_token(b, token, timeout=0.3) is None, f"{b.dev} got a frame for {dst.dev}"


def send_spoofed(fe, src: bytes, dst: bytes) -> bytes:
    token = new_token()
    fe.send_frame(0, frame(dst, src, token))
    assert fe.wait_tx_done(0, 2)
    return token


def test_spoofed_source_mac_is_dropped_and_counted(daemon, ports):
    v, x, p, o = ports["v"], ports["x"], ports["p"], ports["o"]
    mark = daemon.mark()
    send_one(v, 0, o)                                     # the victim speaks
    unicast_reaches_only(o, v, [x, p])
    spoofs = [send_spoofed(x, V, BCAST), send_spoofed(x, V, o.mac), send_spoofed(x, V, V),
              send_spoofed(x, p.mac, BCAST)]
    for token in spoofs:
        for fe in (v, p, o):
            assert recv_token(fe, token, timeout=0.3) is None, f"{fe.dev} got a spoofed frame"
    unicast_reaches_only(o, v, [x, p])                    # the victim's entry is still v's
    send_one(x, 0, o)                                     # x's own MAC goes through
    # the whole line (a read between the daemon's partial writes sees only its start)
    warning = ("net1: port security: dropping frames from source MAC 02:aa:00:00:00:01 (the "
               "device's MAC is 02:aa:00:00:00:02)")
    daemon.wait_log(warning, mark)
    assert daemon.log_since(mark).count(warning) == 1                # once, then counted
    assert counters(daemon, x, mark)["spoofed"] == len(spoofs)
    assert counters(daemon, v, mark)["spoofed"] == 0


def test_a_port_without_mac_cannot_take_a_configured_mac(daemon, ports):
    """p has no mac= (it may learn), but V is v's: p's frames from V are
    dropped as spoofed and v keeps its entry."""
    v, x, p, o = ports["v"], ports["x"], ports["p"], ports["o"]
    mark = daemon.mark()
    token = send_spoofed(p, V, BCAST)
    for fe in (v, x, o):
        assert recv_token(fe, token, timeout=0.3) is None
    unicast_reaches_only(o, v, [x, p])
    assert "net2: port security: dropping frames from source MAC 02:aa:00:00:00:01 (another " \
           "device's configured MAC)" in daemon.wait_log("port security", mark)
    assert counters(daemon, p, mark)["spoofed"] == 1


def test_random_source_macs_are_capped_and_evict_nobody(daemon, ports):
    """p sends 100000 frames from random source MACs (to its own MAC, so the
    switch hairpins them: nothing is delivered).  v's configured entry and
    o's learned one stay; p holds 256 entries, the rest is counted."""
    v, x, p, o = ports["v"], ports["x"], ports["p"], ports["o"]
    mark = daemon.mark()
    send_one(o, 0, p)                                     # p and o learned
    send_one(p, 0, o)
    send_one(v, 0, o)
    sources = set()
    while len(sources) < 100000:
        b = bytearray(os.urandom(6))
        b[0] = (b[0] & 0xFE) | 0x02                       # unicast, locally administered
        sources.add(bytes(b))
    sources -= {V, X, p.mac, o.mac}
    tail = bytes(46)
    for i, src in enumerate(sources):
        f = p.mac + src + b"\x88\xb5" + tail
        while True:
            try:
                p.send_frame(0, f, kick=(i % 64 == 63))
                break
            except BlockingIOError:
                p.kick(1)
                p.wait_tx_done(0, 1)
    p.kick(1)
    assert p.wait_tx_done(0, 10)
    unicast_reaches_only(x, v, [o, p])                    # not flooded: v's entry is there,
    unicast_reaches_only(x, o, [v, p])                    # and o's learned one
    assert "net2: switch: the device has 256 source MACs in the MAC table, its limit" in \
        daemon.wait_log("its limit", mark)
    c = counters(daemon, p, mark)
    assert c["learned"] == LIMIT
    assert c["capped"] + c["full"] == len(sources) - (LIMIT - 1)     # p's own MAC is one of 256
    assert c["spoofed"] == 0


def test_devices_without_mac_learn_as_before(daemon, ports):
    """Compatibility: p and o (no mac=) learn their peers, reach each other
    by unicast, and a MAC that moves from p to o follows it."""
    v, x, p, o = ports["v"], ports["x"], ports["p"], ports["o"]
    mark = daemon.mark()
    send_one(p, 0, o)                                     # flooded, p learned
    send_one(o, 0, p)                                     # unicast, o learned
    unicast_reaches_only(p, o, [v, x])
    unicast_reaches_only(o, p, [v, x])
    moving = bytes.fromhex("02bb00000042")
    send_spoofed(p, moving, BCAST)                        # learnt on p ...
    token = new_token()
    v.send_frame(0, frame(moving, V, token))
    assert recv_token(p, token) is not None and recv_token(o, token, timeout=0.3) is None
    send_spoofed(o, moving, BCAST)                        # ... then on o: it moved
    token = new_token()
    v.send_frame(0, frame(moving, V, token))
    assert recv_token(o, token) is not None and recv_token(p, token, timeout=0.3) is None
    assert "port security" not in daemon.log_since(mark)
