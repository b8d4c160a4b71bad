"""The controller's side of the VFE vDPA relay (vfe-vhostd): a relay opens
with VFE_RELAY_HELLO carrying its QEMU-side socket; when the relay dies the
controller serves that front-end directly (no disconnect, the data path keeps
running); a new relay takes the socket back with VFE_RELAY_RESUME.

The relay here is a few lines of test code over the real transport; the front
end is the Python vhost-user front-end, the daemon a real subprocess."""
from __future__ import annotations

import errno
import os
import selectors
import socket
import tempfile
import threading

from tests.harness.unprivileged import needs_root, python_nobody
from tests.protocol.daemon_helpers import close_frontend, daemon_fixtures, exchange, new_mac, open_frontend
from vfe.testing.frontend import Frontend
from vfe.vhost.framing import encode_message
from vfe.vhost.messages import Request
from vfe.vhost.transport import Connection, Listener, PeerClosed

daemon, daemon_guard = daemon_fixtures({"a": "queues=1", "b": "queues=1"})


class TinyRelay:
    """Forward whole messages (with their fds) between two connections."""

    def __init__(self, qemu: Connection, ctl: Connection):
        self.qemu, self.ctl = qemu, ctl
        self.stop_r, self.stop_w = os.pipe()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        sel = selectors.DefaultSelector()
        sel.register(self.qemu, selectors.EVENT_READ, self.ctl)
        sel.register(self.ctl, selectors.EVENT_READ, self.qemu)
        sel.register(self.stop_r, selectors.EVENT_READ, None)
        try:
            while True:
                for key, _ in sel.select():
                    if key.data is None:
                        return
                    for m in key.fileobj.recv_messages():
                        key.data.send_bytes(encode_message(m.request, m.payload, m.flags), m.fds)
                        for fd in m.fds:
                            os.close(fd)
        except (PeerClosed, OSError):
            return
        finally:
            sel.close()

    def kill(self):
        """As SIGKILL would: every fd of the relay closes."""
        os.write(self.stop_w, b"x")
        self.thread.join(5)
        self.qemu.close()
        self.ctl.close()
        os.close(self.stop_r)
        os.close(self.stop_w)


def hello(path: str, qemu_sock: socket.socket) -> Connection:
    ctl = Connection(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    ctl.sock.connect(path)
    ctl.send_message(Request.VFE_RELAY_HELLO, (0).to_bytes(8, "little"), [qemu_sock.fileno()])
    reply = ctl.recv_message(timeout=5)
    assert reply.request == Request.VFE_RELAY_HELLO and int.from_bytes(reply.payload, "little") == 0
    return ctl


def test_relay_dies_data_path_and_control_survive_then_resume(daemon):
    b = open_frontend(daemon, "b", 1)
    tmp = tempfile.mkdtemp(prefix="vfe-q-", dir="/tmp")
    qemu_path = os.path.join(tmp, "qemu.sock")
    try:
        # "QEMU" is a server socket the relay connects to (vhostd --client)
        listener = Listener(qemu_path)
        relay_side = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        relay_side.connect(qemu_path)
        fe = Frontend(listener.accept(timeout=5, blocking=True))
        listener.close()
        ctl = hello(daemon.paths["a"], relay_side)
        relay = TinyRelay(Connection(relay_side), ctl)
        fe.mac = new_mac(0)
        fe.dev = "a"
        fe.start(queue_pairs=1, mem_size=8 * 1024 * 1024)
        fe.post_rx_buffers(0)
        exchange(fe, b)                             # through the relayed control path
        mark = daemon.mark()

        relay.kill()                                # vfe-vhostd dies
        daemon.wait_log("serving the front-end directly", mark)
        exchange(fe, b)                             # the data path never stopped
        assert fe.get_features() != 0               # and the controller answers QEMU itself
        assert "front-end disconnected" not in daemon.log_since(mark)

        # a restarted vfe-vhostd takes the front-end back
        ctl2 = Connection(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        ctl2.sock.connect(daemon.paths["a"])
        ctl2.send_message(Request.VFE_RELAY_RESUME, (0).to_bytes(8, "little"))
        reply = ctl2.recv_message(timeout=5)
        assert int.from_bytes(reply.payload, "little") == 0 and len(reply.fds) == 1
        qemu_again = socket.socket(fileno=reply.fds[0])
        relay2 = TinyRelay(Connection(qemu_again), ctl2)
        daemon.wait_log("resumed relaying", mark)
        assert fe.get_features() != 0               # control through the new relay
        exchange(fe, b)
        relay2.kill()
        fe.close()
        daemon.wait_log("front-end disconnected", mark)
    finally:
        close_frontend(daemon, b)
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)


def test_resume_without_an_adopted_front_end_is_refused(daemon):
    a = open_frontend(daemon, "a", 1)
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(daemon.paths["a"])
        s.settimeout(3)
        assert s.recv(1) == b""                     # a plain second front-end: closed at once
        s.close()
    finally:
        close_frontend(daemon, a)


# As another user: connect to argv[1], send relay request argv[2] (with an fd
# of our own when argv[3] is "fd"), print the reply's value and fd count,
# then whether the daemon hung up.
RELAY_REQUEST = r"""
import socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(3)
s.connect(sys.argv[1])
mine, _theirs = socket.socketpair()
msg = struct.pack("<III", int(sys.argv[2], 0), 0x1, 8) + bytes(8)
socket.send_fds(s, [msg], [mine.fileno()] if sys.argv[3] == "fd" else [])
data, fds, _, _ = socket.recv_fds(s, 64, 4)
print(int.from_bytes(data[12:20], "little", signed=True), len(fds))
try:
    print("hung up" if s.recv(1) == b"" else "open")
except (TimeoutError, socket.timeout):
    print("open")
"""


@needs_root()
def test_relay_requests_from_an_unprivileged_peer_are_refused(daemon):
    """The endpoint's socket opened to everyone (its mode is the admin's to
    choose, e.g. for an unprivileged QEMU): still only root's vfe-vhostd may
    HELLO (become the relay of a root process) or RESUME (take a VM's socket)."""
    dir_mode = os.stat(daemon.dir).st_mode
    os.chmod(daemon.dir, 0o755)
    os.chmod(daemon.paths["a"], 0o777)
    b = open_frontend(daemon, "b", 1)
    tmp = tempfile.mkdtemp(prefix="vfe-q-", dir="/tmp")
    try:
        mark = daemon.mark()
        r = python_nobody(RELAY_REQUEST, daemon.paths["a"], hex(Request.VFE_RELAY_HELLO), "fd")
        assert r.stdout.split() == [str(-errno.EPERM), "0", "hung", "up"], r.stdout + r.stderr
        daemon.wait_log("VFE_RELAY_HELLO from uid 65534", mark)
        daemon.wait_detached("a")
        # a front-end adopted from a dead relay: RESUME would hand it out
        qemu_path = os.path.join(tmp, "qemu.sock")
        listener = Listener(qemu_path)
        relay_side = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        relay_side.connect(qemu_path)
        fe = Frontend(listener.accept(timeout=5, blocking=True))
        listener.close()
        relay = TinyRelay(Connection(relay_side), hello(daemon.paths["a"], relay_side))
        fe.mac, fe.dev = new_mac(0), "a"
        fe.start(queue_pairs=1, mem_size=8 * 1024 * 1024)
        fe.post_rx_buffers(0)
        relay.kill()
        daemon.wait_log("serving the front-end directly", mark)
        r = python_nobody(RELAY_REQUEST, daemon.paths["a"], hex(Request.VFE_RELAY_RESUME), "none")
        assert r.stdout.split() == [str(-errno.EPERM), "0", "hung", "up"], r.stdout + r.stderr
        daemon.wait_log("VFE_RELAY_RESUME from uid 65534", mark)
        exchange(fe, b)                              # the guest never noticed
        assert "resumed relaying" not in daemon.log_since(mark)
        fe.close()
        daemon.wait_log("front-end disconnected", mark)
    finally:
        close_frontend(daemon, b)
        os.chmod(daemon.dir, dir_mode)
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
