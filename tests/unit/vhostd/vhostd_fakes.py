"""Fakes for the vfe-vhostd unit tests (imported by file name; keep the name
unique): a controller endpoint that speaks the relay protocol, a fake
controller RPC, and a pump for a selector whose keys' data are callables.

``FakeEndpoint`` follows the contract of docs/vfe-vdpa.md: HELLO (one fd,
kept) -> reply u64 0; when the relay connection closes while the adopted
QEMU socket is open it serves that socket itself; a RESUME on a second
connection gets the adopted socket back (u64 0 + fd), else -ENOENT.  It
answers GET_FEATURES (request 1) with FEATURES and records every message
(request, flags, payload, fds' inode numbers)."""
from __future__ import annotations

import errno
import os
import selectors
import socket
import threading
import time

from vfe.vhost.messages import REPLY_FLAGS
from vfe.vhost.transport import Connection, Listener, PeerClosed, close_fds
from vfe.vhostd.errors import VdpaError

HELLO, RESUME = 0x7F00, 0x7F01
GET_FEATURES = 1
FEATURES = 0x1_3000_0000


def u64(v: int) -> bytes:
    return (v & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")


def inode(fd: int) -> int:
    return os.fstat(fd).st_ino


class FakeEndpoint:
    def __init__(self, path: str, hello_answer: int = 0):
        self.path = path
        self.hello_answer = hello_answer
        self.listener = Listener(path, backlog=8)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listener, selectors.EVENT_READ, ("accept", None))
        self.conn: Connection | None = None
        self.adopted: int | None = None
        self.via_relay = False
        self.fresh = False
        self.events: list[str] = []
        self.received: list[tuple[int, int, bytes, list[int]]] = []
        self.lock = threading.Lock()
        self._stop_r, self._stop_w = os.pipe()
        self.sel.register(self._stop_r, selectors.EVENT_READ, ("stop", None))
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    # -- test side
    def wait(self, cond, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise TimeoutError(f"fake endpoint: condition not met; events {self.events}")
            time.sleep(0.01)

    def destroy(self) -> None:
        """The VF goes away (SR-IOV disabled): every connection closes."""
        with self.lock:
            self._reset("destroyed")

    def stop(self) -> None:
        os.write(self._stop_w, b"x")
        self.thread.join(5)
        with self.lock:
            self._reset("stopped")
        self.listener.close()
        self.sel.close()
        os.close(self._stop_r)
        os.close(self._stop_w)

    # -- the loop
    def _run(self) -> None:
        while True:
            for key, _ in self.sel.select(0.5):
                kind, obj = key.data
                if kind == "stop":
                    return
                with self.lock:
                    if kind == "accept":
                        self._accept()
                    elif kind == "conn" and obj is self.conn:
                        self._readable()
                    elif kind == "probe":
                        self._probe(obj)

    def _accept(self) -> None:
        conn = self.listener.accept(timeout=0.0)
        if conn is None:
            return
        if self.conn is None:
            self.conn, self.fresh = conn, True
            self.sel.register(conn, selectors.EVENT_READ, ("conn", conn))
            self.events.append("attached")
        else:
            self.sel.register(conn, selectors.EVENT_READ, ("probe", conn))

    def _readable(self) -> None:
        try:
            msgs = self.conn.recv_messages()
        except PeerClosed:
            if self.via_relay and self.adopted is not None:
                self.sel.unregister(self.conn)
                self.conn.close()
                sock = socket.socket(fileno=os.dup(self.adopted))
                sock.setblocking(False)
                self.conn = Connection(sock)
                self.via_relay = False
                self.sel.register(self.conn, selectors.EVENT_READ, ("conn", self.conn))
                self.events.append("serving directly")
            else:
                self._reset("disconnected")
            return
        for m in msgs:
            if self.fresh and m.request == RESUME:      # nothing adopted: a fresh connection
                close_fds(m.fds)
                self.conn.send_bytes(_reply(RESUME, u64(-errno.ENOENT)))
                self.events.append("resume refused")
                self._reset("disconnected")
                return
            if self.fresh and m.request == HELLO:
                self.fresh = False
                if self.hello_answer != 0:
                    close_fds(m.fds)
                    self.conn.send_bytes(_reply(HELLO, u64(self.hello_answer)))
                    self.events.append("hello refused")
                    continue
                self.adopted = m.fds[0]
                self.via_relay = True
                self.events.append(f"hello {len(m.fds)} fd")
                self.conn.send_bytes(_reply(HELLO, u64(0)))
                continue
            self.fresh = False
            self.received.append((m.request, m.flags, m.payload, [inode(fd) for fd in m.fds]))
            close_fds(m.fds)
            if m.request == GET_FEATURES:
                self.conn.send_bytes(_reply(GET_FEATURES, u64(FEATURES)))

    def _probe(self, conn: Connection) -> None:
        self.sel.unregister(conn)
        try:
            msgs = conn.recv_messages()
        except PeerClosed:
            conn.close()
            return
        if not msgs or msgs[0].request != RESUME or self.adopted is None or self.via_relay:
            conn.send_bytes(_reply(RESUME, u64(-errno.ENOENT)))
            conn.close()
            self.events.append("resume refused")
            return
        conn.send_bytes(_reply(RESUME, u64(0)), [self.adopted])
        self.sel.unregister(self.conn)
        self.conn.close()
        self.conn, self.via_relay = conn, True
        self.sel.register(conn, selectors.EVENT_READ, ("conn", conn))
        self.events.append("resumed")

    def _reset(self, why: str) -> None:
        if self.conn is not None:
            try:
                self.sel.unregister(self.conn)
            except (KeyError, ValueError):
                pass
            self.conn.close()
            self.conn = None
        if self.adopted is not None:
            os.close(self.adopted)
            self.adopted = None
        self.via_relay = False
        self.events.append(why)


def _reply(request: int, payload: bytes) -> bytes:
    from vfe.vhost.framing import encode_message
    return encode_message(request, payload, REPLY_FLAGS)


def pump(sel: selectors.BaseSelector, relays=(), until=lambda: False, timeout: float = 5.0) -> None:
    """Run the daemon loop's work (ticks + callbacks) until ``until()``."""
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise TimeoutError("pump: condition not met")
        now = time.monotonic()
        for r in list(relays):
            r.tick(now)
        for key, _ in sel.select(0.02):
            key.data()


class FakeController:
    """vfe.vhostd.controller_client.Controller's interface over a dict of functions."""

    def __init__(self, functions: list[dict], socket_path: str = "/nonexistent/virtnet.sock"):
        self.functions_ = functions
        self.socket_path = socket_path
        self.down = False
        self.status: dict[str, str] = {}
        self.features: dict[str, str] = {}
        self.calls: list[str] = []
        self.lm_state: dict[str, str] = {}

    def _check(self) -> None:
        if self.down:
            raise VdpaError(-errno.ECONNREFUSED, "virtio-net-controller: nothing is listening")

    def functions(self) -> list[dict]:
        self.calls.append("list")
        self._check()
        return [dict(f) for f in self.functions_]

    def query(self, vuid: str | None = None, all: bool = False) -> list[dict]:
        self.calls.append("query")
        self._check()
        out = []
        for f in self.functions_:
            if all or f["vuid"] == vuid:
                out.append(dict(f, status=self.status.get(f["vuid"], "not connected"),
                                socket=f.get("socket", f"/run/{f['vuid']}.sock"),
                                negotiated_features=self.features.get(f["vuid"], "0x0")))
        if not out:
                raise VdpaError(-errno.ENODEV, f"no such device: VUID {vuid}")
        return out

    def version(self) -> dict:
        self._check()
        return {"controller": {"version": "9.9.9", "engine_abi": 1, "pid": 1}}

    def vf_state(self, vuid: str, op: int) -> dict:
        """Like the controller's: 1-3 set the state, 4/5 need QEMU's log."""
        self.calls.append(f"vf_state {op}")
        self._check()
        if op in (4, 5):
            raise VdpaError(-errno.ENODATA, "no dirty log: the front-end maps one when a migration starts")
        if op in (1, 2, 3):
            self.lm_state[vuid] = {1: "running", 2: "quiesced", 3: "freeze"}[op]
        return {"vuid": vuid, "state": self.lm_state.get(vuid, "running"), "logging": False, "log_size": 0}


def pf(pf_id: int, bdf: str, vuid: str, kind: str = "static PF") -> dict:
    return {"pf_id": pf_id, "function_type": kind, "vuid": vuid, "bdf": bdf, "num_msix": 64,
            "max_queues": 62, "max_queues_size": 256, "net_mac": "00:11:22:33:44:55", "net_mtu": 1500}


def vf(pf_id: int, vf_id: int, bdf: str, vuid: str, mac: str = "00:00:00:00:33:00") -> dict:
    return {"vf_id": vf_id, "parent_pf_id": pf_id, "function_type": "VF", "vuid": vuid, "bdf": bdf,
            "num_msix": 64, "max_queues": 62, "max_queues_size": 1024, "net_mac": mac, "net_mtu": 1500}


class FakeRelay:
    """Stands in for vfe.vhostd.relay.Relay in service tests: records how it
    was made and closed; ``fail_with`` makes start() raise."""

    instances: list["FakeRelay"] = []
    fail_with: RelayError | None = None

    def __init__(self, name, socket_path, endpoint, client, sel, *, vf_exists, on_gone):
        self.name, self.socket_path, self.endpoint, self.client = name, socket_path, endpoint, client
        self.vf_exists, self.on_gone = vf_exists, on_gone
        self.closed = None
        self.resumed = False
        FakeRelay.instances.append(self)

    def start(self):
        if FakeRelay.fail_with is not None:
            raise FakeRelay.fail_with
        return self

    def close(self, handoff=False):
        self.closed = "handoff" if handoff else "disconnect"

    def tick(self, now):
        return None
