"""/metrics: what the collectors export from the devices' counters, and the
small HTTP server on the daemon's selector (any local program may connect:
garbage, floods and silence cost it nothing but their own sockets)."""
from __future__ import annotations

import os
import selectors
import socket
import threading
import time

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from vfe.controller import metrics, metrics_http
from vfe.controller.metrics_http import MetricsServer, parse_address


# -- addresses -------------------------------------------------------------------------

@pytest.mark.parametrize("text,want", [("127.0.0.1:9100", ("127.0.0.1", 9100)), (":9100", ("0.0.0.0", 9100)),
                                       ("[::1]:9100", ("::1", 9100)), ("localhost:0", ("localhost", 0))])
def test_parse_address(text, want):
    assert parse_address(text) == want


@pytest.mark.parametrize("text", ["9100", "host:", "host:x", "host:70000", ""])
def test_parse_address_refused(text):
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_address(text)


# -- collectors --------------------------------------------------------------------------

class FakeNet:
    def counters(self):
        return {"queues": [{"queue": 0, "direction": "rx", "packets": 5, "bytes": 300, "dropped_no_room": 2},
                           {"queue": 1, "direction": "tx", "packets": 7, "bytes": 420, "kicks": 3}],
                "device": {"sw_csum": 1, "learned": 4, "Bad-Name": 9}}


def families(collector) -> dict:
    reg = metrics.registry([collector])
    out = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = (s.value, fam.type)
    return out


def test_device_collector_names_and_labels():
    got = families(metrics.DeviceCollector(lambda: [("VNETS1D0F0", FakeNet())]))
    q = lambda i, d: (("device", "VNETS1D0F0"), ("direction", d), ("queue", str(i)))
    assert got[("vfe_net_packets_total", q(0, "rx"))] == (5, "counter")
    assert got[("vfe_net_bytes_total", q(1, "tx"))] == (420, "counter")
    assert got[("vfe_net_kicks_total", q(1, "tx"))] == (3, "counter")
    # a drop reason is a label, not a metric of its own
    assert got[("vfe_net_drops_total", q(0, "rx") + (("reason", "no_room"),))] == (2, "counter")
    assert got[("vfe_net_device_sw_csum_total", (("device", "VNETS1D0F0"),))] == (1, "counter")
    assert got[("vfe_net_device_learned", (("device", "VNETS1D0F0"),))] == (4, "gauge")   # a level
    assert not any("Bad" in name for name, _ in got)               # not a valid metric name: left out
    assert any(name == "process_cpu_seconds_total" for name, _ in got)


def test_a_device_going_away_between_scrapes():
    devices = [("a", FakeNet()), ("b", FakeNet())]
    c = metrics.DeviceCollector(lambda: list(devices))
    assert {dict(labels)["device"] for (name, labels) in families(c) if name == "vfe_net_packets_total"} == {"a", "b"}
    devices.pop()
    assert {dict(labels)["device"] for (name, labels) in families(c) if name == "vfe_net_packets_total"} == {"a"}


# -- the HTTP server -------------------------------------------------------------------

class Loop:
    """The daemon's selector loop in a thread, serving only /metrics."""

    def __init__(self, render):
        self.sel = selectors.DefaultSelector()
        self.server = MetricsServer(self.sel, ("127.0.0.1", 0), render)
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopping:
            for key, _ in self.sel.select(0.05):
                kind, obj = key.data
                assert kind == "http"
                obj.on_readable()

    def stop(self):
        self.stopping = True
        self.thread.join(10)
        self.server.close()
        self.sel.close()


@pytest.fixture
def loop():
    calls = []

    def render():
        calls.append(1)
        if os.environ.get("VFE_TEST_RENDER_FAIL"):
            raise RuntimeError("boom")
        return b"vfe_test_total 1\n"
    lp = Loop(render)
    lp.calls = calls
    yield lp
    lp.stop()


def request(loop, raw: bytes, timeout: float = 10) -> bytes:
    s = socket.create_connection(loop.server.address, timeout=timeout)
    try:
        s.sendall(raw)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk
    finally:
        s.close()


def test_get_metrics(loop):
    resp = request(loop, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = resp.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"text/plain; version=0.0.4" in head
    assert body == b"vfe_test_total 1\n" and f"Content-Length: {len(body)}".encode() in head


@pytest.mark.parametrize("raw,status", [
    (b"GET / HTTP/1.1\r\n\r\n", b"404"), (b"GET /metricsX HTTP/1.0\r\n\r\n", b"404"),
    (b"POST /metrics HTTP/1.1\r\n\r\n", b"405"), (b"\x00\xff garbage\r\n\r\n", b"400"),
    (b"GET /metrics\r\n\r\n", b"400"), (b"GET /metrics HTTP/1.1\r\n" + b"X: " + b"a" * 9000, b"431"),
])
def test_bad_requests_get_an_error_and_the_server_serves_on(loop, raw, status):
    assert request(loop, raw).split(b" ")[1] == status
    assert request(loop, b"GET /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200")


def test_a_failing_collector_is_a_500_not_a_dead_daemon(loop, monkeypatch):
    monkeypatch.setenv("VFE_TEST_RENDER_FAIL", "1")
    assert request(loop, b"GET /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 500")
    monkeypatch.delenv("VFE_TEST_RENDER_FAIL")
    assert request(loop, b"GET /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200")


def test_silent_clients_cannot_lock_others_out(loop, monkeypatch):
    """Connections that never send a request: at most MAX_CLIENTS are kept,
    and those idle past IDLE_SECONDS make room for a new one."""
    idle = [socket.create_connection(loop.server.address, timeout=5) for _ in range(metrics_http.MAX_CLIENTS + 4)]
    try:
        deadline = time.monotonic() + 5
        while len(loop.server.clients) < metrics_http.MAX_CLIENTS and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(loop.server.clients) == metrics_http.MAX_CLIENTS
        # only now may they count as idle: while they were being accepted
        # (slowly, under load) none was pruned to make room for the next
        monkeypatch.setattr(metrics_http, "IDLE_SECONDS", 0.3)
        time.sleep(0.4)
        assert request(loop, b"GET /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200")
        assert idle[0].recv(1) == b""           # the oldest silent one was closed to make room
    finally:
        for s in idle:
            s.close()


def test_close_releases_the_port():
    sel = selectors.DefaultSelector()
    srv = MetricsServer(sel, ("127.0.0.1", 0), lambda: b"")
    port = srv.address[1]
    srv.close()
    sel.close()
    srv2 = MetricsServer(selectors.DefaultSelector(), ("127.0.0.1", port), lambda: b"")
    srv2.close()
