"""vfe-vhostd's relay (vfe/vhostd/relay.py) between a "QEMU" socket made by
the test and a fake controller endpoint that speaks the relay protocol
(vhostd_fakes.FakeEndpoint): HELLO hands over a dup of the QEMU socket,
messages and their fds go through whole in both directions, a dead relay's
front-end stays served by the controller and RESUME takes it back, and the
ways a relay ends (remove, QEMU leaves, the VF is destroyed)."""
from __future__ import annotations

import errno
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from tests.harness.backlog import finishes, full_backlog
from tests.harness.unprivileged import NOBODY, SETPRIV, needs_root, public_dir
from tests.unit.vhostd.vhostd_fakes import FEATURES, GET_FEATURES, FakeEndpoint, inode, pump
from vfe.vhost.framing import encode_message
from vfe.vhost.messages import REPLY_FLAGS
from vfe.vhost.transport import Connection, Listener
from vfe.vhostd.relay import Relay, RelayError, check_socket_path

SET_MEM_TABLE, SET_VRING_KICK = 5, 12
NEED_REPLY = 0x8


@pytest.fixture
def tmp():
    d = tempfile.mkdtemp(prefix="vfe-vh-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def endpoint(tmp):
    ep = FakeEndpoint(os.path.join(tmp, "VNETS0D0F2VF1.sock"))
    yield ep
    ep.stop()


@pytest.fixture
def sel():
    s = selectors.DefaultSelector()
    yield s
    s.close()


class Qemu:
    """QEMU's side with server=on: it listens, the relay connects."""

    def __init__(self, path: str):
        self.path = path
        self.listener = Listener(path, backlog=4)
        self.conn: Connection | None = None

    def accept(self, timeout: float = 5.0) -> Connection:
        self.conn = self.listener.accept(timeout=timeout, blocking=True)
        assert self.conn is not None, "the relay never connected"
        self.conn.sock.settimeout(5)
        return self.conn

    def get_features(self, sel, relays=()) -> int:
        self.conn.send_bytes(encode_message(GET_FEATURES, b"", 0x1))
        got = []

        def done():
            self.conn.sock.setblocking(False)
            try:
                got.extend(self.conn.recv_messages())
            finally:
                self.conn.sock.settimeout(5)
            return bool(got)
        pump(sel, relays, done)
        assert got[0].request == GET_FEATURES and got[0].flags == REPLY_FLAGS
        return int.from_bytes(got[0].payload, "little")

    def eof(self, timeout: float = 2.0) -> bool:
        self.conn.sock.settimeout(timeout)
        try:
            return self.conn.sock.recv(1) == b""
        except (socket.timeout, TimeoutError):
            return False
        finally:
            self.conn.sock.settimeout(5)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


def make_relay(tmp, endpoint, sel, client=True, **kw):
    return Relay("VF 0000:90:00.0", os.path.join(tmp, "qemu.sock"), endpoint.path, client, sel, **kw)


def test_hello_carries_the_qemu_socket_and_messages_with_fds_pass_both_ways(tmp, endpoint, sel):
    qemu = Qemu(os.path.join(tmp, "qemu.sock"))
    relay = make_relay(tmp, endpoint, sel).start()
    try:
        q = qemu.accept()
        assert relay.relaying and endpoint.events[-2:] == ["attached", "hello 1 fd"]
        # the fd the controller kept is the QEMU socket itself (our end of it)
        assert inode(endpoint.adopted) == inode(relay.qemu.fileno())
        assert qemu.get_features(sel) == FEATURES
        # a request with an fd (guest memory) arrives with the same file
        memfd = os.memfd_create("guest-ram")
        kick = os.eventfd(0)
        try:
            n = len(endpoint.received)
            q.send_bytes(encode_message(SET_MEM_TABLE, b"\x01" * 40, 0x1 | NEED_REPLY), [memfd])
            q.send_bytes(encode_message(SET_VRING_KICK, (0).to_bytes(8, "little"), 0x1), [kick])
            pump(sel, [relay], lambda: len(endpoint.received) >= n + 2)
            (r1, f1, p1, fds1), (r2, f2, p2, fds2) = endpoint.received[n:n + 2]
            assert (r1, f1, p1, fds1) == (SET_MEM_TABLE, 0x9, b"\x01" * 40, [inode(memfd)])
            assert (r2, f2, fds2) == (SET_VRING_KICK, 0x1, [inode(kick)])
        finally:
            os.close(memfd)
            os.close(kick)
        assert relay.forwarded[0] >= 3 and relay.forwarded[1] >= 1
        # the relay holds no stray fds: only its two sockets (+ the selector's)
        fds_before = len(os.listdir("/proc/self/fd"))
        for _ in range(20):
            qemu.get_features(sel)
        assert len(os.listdir("/proc/self/fd")) == fds_before
    finally:
        relay.close()
        qemu.close()


def test_dead_relay_leaves_the_front_end_to_the_controller_and_resume_takes_it_back(tmp, endpoint, sel):
    qemu = Qemu(os.path.join(tmp, "qemu.sock"))
    relay = make_relay(tmp, endpoint, sel).start()
    try:
        qemu.accept()
        assert qemu.get_features(sel) == FEATURES
        relay.close(handoff=True)                      # as SIGKILL/SIGTERM: only our fds close
        endpoint.wait(lambda: "serving directly" in endpoint.events)
        assert not qemu.eof(0.3)                        # QEMU sees no disconnect
        # the controller answers QEMU itself
        qemu.conn.send_bytes(encode_message(GET_FEATURES, b"", 0x1))
        reply = qemu.conn.recv_message(timeout=5)
        assert int.from_bytes(reply.payload, "little") == FEATURES

        relay2 = make_relay(tmp, endpoint, sel).start()    # a restarted vfe-vhostd
        assert relay2.resumed and relay2.relaying
        endpoint.wait(lambda: "resumed" in endpoint.events)
        assert qemu.listener.accept(timeout=0.2) is None    # no new QEMU connection
        n = len(endpoint.received)
        assert qemu.get_features(sel, [relay2]) == FEATURES
        assert len(endpoint.received) == n + 1          # through the new relay
        relay2.close()                                   # vf -r: QEMU sees the disconnect
        assert qemu.eof()
        endpoint.wait(lambda: endpoint.events[-1] == "disconnected")
    finally:
        relay.close()
        qemu.close()


def test_resume_without_an_adopted_front_end_falls_back_to_hello(tmp, endpoint, sel):
    qemu = Qemu(os.path.join(tmp, "qemu.sock"))
    relay = make_relay(tmp, endpoint, sel).start()
    try:
        qemu.accept()
        assert not relay.resumed and relay.relaying
        assert endpoint.events == ["attached", "resume refused", "disconnected", "attached", "hello 1 fd"]
        assert qemu.get_features(sel, [relay]) == FEATURES
    finally:
        relay.close()
        qemu.close()


def test_client_mode_waits_for_qemu_and_reconnects_after_qemu_leaves(tmp, endpoint, sel):
    relay = make_relay(tmp, endpoint, sel, retry_interval=0.05).start()
    qemu = None
    try:
        assert relay.state == Relay.WAITING                 # QEMU's socket is not there yet
        qemu = Qemu(os.path.join(tmp, "qemu.sock"))
        pump(sel, [relay], lambda: relay.relaying)
        qemu.accept()
        assert qemu.get_features(sel, [relay]) == FEATURES
        qemu.conn.close()                                   # QEMU restarts
        pump(sel, [relay], lambda: not relay.relaying)
        endpoint.wait(lambda: endpoint.events[-1] == "disconnected")
        pump(sel, [relay], lambda: relay.relaying)           # and comes back
        qemu.accept()
        assert qemu.get_features(sel, [relay]) == FEATURES
        assert relay.sessions == 2
    finally:
        relay.close()
        if qemu:
            qemu.close()


def test_vf_destroyed_disconnects_qemu_and_reports_gone(tmp, endpoint, sel):
    gone = []
    relay = make_relay(tmp, endpoint, sel, vf_exists=lambda: False,
                       on_gone=lambda r, why: (gone.append(why), r.close()))
    qemu = Qemu(os.path.join(tmp, "qemu.sock"))
    try:
        relay.start()
        qemu.accept()
        endpoint.destroy()                                  # SR-IOV disabled
        pump(sel, [relay], lambda: bool(gone))
        assert relay.state == Relay.CLOSED
        assert qemu.eof()                                   # QEMU sees the link go down
    finally:
        relay.close()
        qemu.close()


def test_controller_restart_makes_the_relay_reconnect_both_sides(tmp, endpoint, sel):
    exists = {"v": None}                                    # controller unreachable at first
    relay = make_relay(tmp, endpoint, sel, retry_interval=0.05, vf_exists=lambda: exists["v"])
    qemu = Qemu(os.path.join(tmp, "qemu.sock"))
    try:
        relay.start()
        qemu.accept()
        endpoint.destroy()                                  # the controller dies
        pump(sel, [relay], lambda: not relay.relaying)
        assert qemu.eof()
        assert relay.recheck
        exists["v"] = True                                  # it is back with the VF (recovery)
        pump(sel, [relay], lambda: relay.relaying)
        qemu.accept()
        assert qemu.get_features(sel, [relay]) == FEATURES
    finally:
        relay.close()
        qemu.close()


def test_server_mode_listens_and_relays(tmp, endpoint, sel):
    path = os.path.join(tmp, "qemu.sock")
    # a socket file left by a killed vfe-vhostd is replaced
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    relay = make_relay(tmp, endpoint, sel, client=False).start()
    try:
        assert relay.state == Relay.WAITING and os.path.exists(path)
        q = Connection(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        q.sock.connect(path)
        pump(sel, [relay], lambda: relay.relaying)
        q.send_bytes(encode_message(GET_FEATURES, b"", 0x1))
        got = []
        q.sock.setblocking(False)
        pump(sel, [relay], lambda: got.extend(q.recv_messages()) or bool(got))
        assert int.from_bytes(got[0].payload, "little") == FEATURES
        # a second front-end on the same socket is refused
        q2 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        q2.connect(path)
        q2.settimeout(2)
        for _ in range(10):
            for key, _ in sel.select(0.02):
                key.data()
        assert q2.recv(1) == b""
        q2.close()
        q.close()
    finally:
        relay.close()
    assert not os.path.exists(path)                         # removed on close


def test_socket_path_checks(tmp):
    path = os.path.join(tmp, "file")
    open(path, "w").close()
    for client in (True, False):
        with pytest.raises(RelayError) as e:
            check_socket_path(path, client=client)
        assert e.value.code == -1030
    live = os.path.join(tmp, "live.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(live)
    srv.listen()
    try:
        check_socket_path(live, client=True)                # QEMU's own socket: fine
        with pytest.raises(RelayError) as e:
            check_socket_path(live, client=False)            # we would listen: someone else serves it
        assert e.value.code == -1030
    finally:
        srv.close()
    with pytest.raises(RelayError) as e:
        check_socket_path("/tmp/" + "x" * 120, client=True)
    assert e.value.code == -errno.ENAMETOOLONG
    check_socket_path(os.path.join(tmp, "new.sock"), client=False)


def test_a_qemu_socket_that_does_not_accept_freezes_nothing(tmp, endpoint, sel):
    """Client mode, QEMU's path held by a listener whose backlog is full:
    provisioning and every retry return at once (vfe-vhostd's one loop
    serves every VF and the RPC), and the relay connects once there is room."""
    path = os.path.join(tmp, "qemu.sock")
    with full_backlog(path) as stuck:
        relay = make_relay(tmp, endpoint, sel, retry_interval=0.01)
        try:
            done, result = finishes(relay.start, 5)
            assert done, "Relay.start waited for QEMU's socket to accept"
            assert result is relay and relay.state == Relay.WAITING
            time.sleep(0.02)
            done, _ = finishes(lambda: relay.tick(time.monotonic()), 5)
            assert done, "Relay.tick waited for QEMU's socket to accept"
            assert relay.state == Relay.WAITING
            stuck.drain()
            pump(sel, [relay], lambda: relay.relaying)
            assert stuck.accept(5) is not None
        finally:
            relay.close()


def test_server_mode_probe_of_a_socket_that_does_not_accept(tmp):
    """vf -a in server mode on a path a live process holds without
    accepting: refused as served by a live process, without waiting."""
    path = os.path.join(tmp, "held.sock")
    with full_backlog(path):
        done, result = finishes(lambda: check_socket_path(path, client=False), 5)
        assert done, "the stale-socket probe waited on a full backlog"
        assert isinstance(result, RelayError) and result.code == -1030
        assert "a live process serves it" in result.message


def test_socket_paths_others_control_are_refused(tmp):
    """vf -a -v PATH: a directory other users may write is refused in both
    modes (-1030, saying why); in a sticky one (/tmp) another uid's socket
    is refused too, and our own (the seed's /tmp/vfe-net0) is fine."""
    ww = os.path.join(tmp, "ww")
    os.mkdir(ww)
    os.chmod(ww, 0o777)
    for client in (True, False):
        with pytest.raises(RelayError) as e:
            check_socket_path(os.path.join(ww, "vfe-net0"), client=client)
        assert e.value.code == -1030 and f"the directory {ww} is writable by" in e.value.message
    sticky = os.path.join(tmp, "sticky")
    os.mkdir(sticky)
    os.chmod(sticky, 0o1777)
    ours = os.path.join(sticky, "vfe-net0")
    check_socket_path(ours, client=False)
    if os.geteuid() != 0:
        return
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(ours)
    srv.listen()
    try:
        check_socket_path(ours, client=True)                 # root's QEMU made it: fine
        os.lchown(ours, 65534, -1)
        for client in (True, False):
            with pytest.raises(RelayError) as e:
                check_socket_path(ours, client=client)
            assert e.value.code == -1030 and "is a socket of uid 65534" in e.value.message
    finally:
        srv.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a socket of another uid")
def test_client_relay_does_not_join_another_users_socket(tmp, endpoint, sel, caplog):
    sticky = os.path.join(tmp, "sticky")
    os.mkdir(sticky)
    os.chmod(sticky, 0o1777)
    path = os.path.join(sticky, "qemu.sock")
    relay = Relay("VF 0000:90:00.0", path, endpoint.path, True, sel, retry_interval=0.01)
    relay.start()                                            # nothing there yet
    squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    squatter.bind(path)
    squatter.listen(4)
    os.lchown(path, 65534, -1)
    try:
        with caplog.at_level("ERROR", logger="vfe.vhostd"):
            for _ in range(5):
                time.sleep(0.02)
                relay.tick(time.monotonic())
        assert relay.state == Relay.WAITING
        assert caplog.text.count("is a socket of uid 65534") == 1       # said once
        squatter.setblocking(False)
        with pytest.raises(BlockingIOError):
            squatter.accept()                                 # never connected to
    finally:
        relay.close()
        squatter.close()


def test_refused_hello_and_missing_endpoint_are_errors(tmp, sel):
    qemu = Qemu(os.path.join(tmp, "qemu.sock"))
    try:
        relay = Relay("VF x", qemu.path, os.path.join(tmp, "missing.sock"), True, sel)
        with pytest.raises(RelayError) as e:
            relay.start()
        assert e.value.code == -errno.ENOENT
        ep = FakeEndpoint(os.path.join(tmp, "ep.sock"), hello_answer=-errno.EPERM)
        try:
            relay = Relay("VF x", qemu.path, ep.path, True, sel)
            with pytest.raises(RelayError) as e:
                relay.start()
            assert e.value.code == -errno.EPERM
            q = qemu.accept()                               # the relay had connected to QEMU ...
            assert qemu.eof()                               # ... and let it go
            assert relay.state == Relay.CLOSED and not sel.get_map()
        finally:
            ep.stop()
    finally:
        qemu.close()


def test_failed_provisioning_after_resume_gives_the_front_end_back(tmp, endpoint, sel):
    qemu = Qemu(os.path.join(tmp, "qemu.sock"))
    relay = make_relay(tmp, endpoint, sel).start()
    try:
        qemu.accept()
        relay.close(handoff=True)
        endpoint.wait(lambda: "serving directly" in endpoint.events)
        # a restarted vfe-vhostd in listening mode, on a path it cannot listen on
        bad = Relay("VF x", os.path.join(tmp, "nodir", "s"), endpoint.path, False, sel)
        with pytest.raises(RelayError) as e:
            bad.start()
        assert e.value.code == -errno.ENOENT and bad.resumed
        endpoint.wait(lambda: endpoint.events.count("serving directly") == 2)
        assert not qemu.eof(0.3)                        # the guest never noticed
        qemu.conn.send_bytes(encode_message(GET_FEATURES, b"", 0x1))
        assert int.from_bytes(qemu.conn.recv_message(timeout=5).payload, "little") == FEATURES
    finally:
        relay.close()
        qemu.close()


# an endpoint impostor on argv[1]: for each connection, report the relay
# request it got and the fds with it, answering RESUME "none" and HELLO "ok"
IMPOSTOR = r"""
import socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1]); s.listen(4); s.settimeout(1.5)
print("ready", flush=True)
while True:
    try:
        c, _ = s.accept()
    except TimeoutError:
        break
    c.settimeout(3)
    data, fds, _, _ = socket.recv_fds(c, 4096, 16)
    if len(data) < 12:
        print("nothing", flush=True)
        continue
    req = struct.unpack_from("<I", data)[0]
    print(f"request {req:#x} with {len(fds)} fds", flush=True)
    answer = -2 if req == 0x7F01 else 0
    c.sendall(struct.pack("<IIIq", req, 0x5, 8, answer))
    if req == 0x7F00:
        break
"""


@needs_root()
def test_an_endpoint_not_served_by_root_gets_no_vm(tmp, sel, monkeypatch):
    """Someone else bound the endpoint's path: HELLO would give them QEMU's
    socket (then the guest's memory).  The relay checks who listens first.
    (The path check refuses their directory before that; it is switched off
    here so that this second line of defence is what the test sees.)"""
    import vfe.vhostd.relay as relay_mod
    monkeypatch.setattr(relay_mod, "check_unsafe", lambda path, what: path)
    qemu = Qemu(os.path.join(tmp, "qemu.sock"))
    with public_dir(owner=NOBODY) as d:
        path = str(d / "VNETS0D0F2VF1.sock")
        proc = subprocess.Popen([*SETPRIV, sys.executable, "-c", IMPOSTOR, path],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline() == "ready\n"
            relay = Relay("VF x", qemu.path, path, True, sel)
            with pytest.raises(RelayError) as e:
                relay.start()
            assert e.value.code == -errno.EPERM
            assert e.value.message == (f"{path} is served by uid 65534, pid {proc.pid}, not by root: "
                                       f"not relaying a VM to it")
            out, _ = proc.communicate(timeout=10)
            assert out == "nothing\n"                       # no request, no fd ever reached it
            assert relay.state == Relay.CLOSED and not sel.get_map()
        finally:
            proc.kill()
            proc.wait()
            qemu.close()
