"""vfe.vhost.transport over real AF_UNIX sockets, with fd passing."""
import os
import socket
import threading
import time

import pytest

from tests.harness.backlog import finishes, full_backlog
from vfe.vhost.actions import Ack, Reply
from vfe.vhost.framing import encode_message
from vfe.vhost.messages import Message, ProtocolError, Request, U64, VringState
from vfe.vhost.transport import Connection, PeerClosed, connect, is_served, listen, try_connect

pytestmark = pytest.mark.no_fd_leaks


@pytest.fixture
def pair():
    a, b = Connection.pair()
    yield a, b
    a.close()
    b.close()


def test_message_with_fds_round_trip(pair):
    a, b = pair
    r, w = os.pipe()
    a.send_message(Request.SET_VRING_KICK, U64(0).encode(), [r, w])
    os.close(r)
    (m,) = b.recv_messages()
    assert (m.request, m.flags, m.payload) == (Request.SET_VRING_KICK, 1, U64(0).encode())
    assert len(m.fds) == 2
    os.write(w, b"ping")
    assert os.read(m.fds[0], 4) == b"ping"        # the same pipe
    for fd in (*m.fds, w):
        os.close(fd)


def test_fds_go_to_the_right_message_when_reads_glue_sends(pair):
    a, b = pair
    r, w = os.pipe()
    a.send_message(Request.SET_STATUS, U64(8).encode())
    a.send_message(Request.SET_FEATURES, U64(1).encode())
    a.send_message(Request.SET_LOG_BASE, bytes(16), [r])
    a.send_message(Request.SET_OWNER)
    time.sleep(0.01)
    msgs = []
    while len(msgs) < 4:
        msgs += b.recv_messages()
    assert [m.request for m in msgs] == [39, 2, 6, 3]
    assert [len(m.fds) for m in msgs] == [0, 0, 1, 0]
    for fd in (r, w, *msgs[2].fds):
        os.close(fd)


def test_partial_sends_are_assembled(pair):
    a, b = pair
    data = encode_message(Request.GET_VRING_BASE, VringState(1, 0).encode())
    a.send_bytes(data[:5])
    assert b.recv_messages() == []
    a.send_bytes(data[5:])
    assert b.recv_messages() == [Message(Request.GET_VRING_BASE, 1, VringState(1, 0).encode())]


def test_non_blocking_read_with_nothing_to_read(pair):
    a, b = pair
    b.sock.setblocking(False)
    assert b.recv_messages() == []


def test_eof(pair):
    a, b = pair
    a.close()
    with pytest.raises(PeerClosed):
        b.recv_messages()


def test_eof_in_the_middle_of_a_message_closes_its_fds(pair):
    a, b = pair
    r, w = os.pipe()
    a.send_bytes(encode_message(Request.SET_VRING_CALL, U64(0).encode())[:14], [r])
    os.close(r)
    assert b.recv_messages() == []
    a.close()
    with pytest.raises(PeerClosed, match="middle"):
        b.recv_messages()
    os.close(w)


def test_oversized_message_is_a_protocol_error_and_closes_fds(pair):
    a, b = pair
    r, w = os.pipe()
    a.send_bytes(encode_message(Request.SET_CONFIG, bytes(5000)), [r])
    os.close(r)
    os.close(w)
    with pytest.raises(ProtocolError, match="exceeds"):
        b.recv_messages()


def test_too_many_fds_is_a_protocol_error(pair):
    a, b = pair
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(40)]
    a.send_message(Request.SET_MEM_TABLE, bytes(8), fds)
    for fd in fds:
        os.close(fd)
    with pytest.raises(ProtocolError, match="fds"):
        b.recv_messages()


def test_send_reply_and_ack_flags(pair):
    a, b = pair
    a.send_reply(Reply(Request.GET_FEATURES, U64(3).encode()))
    a.send_reply(Ack(Request.SET_MEM_TABLE, ok=True))
    a.send_reply(Ack(Request.SET_MEM_TABLE, ok=False))
    got = []
    while len(got) < 3:
        got += b.recv_messages()
    assert [(m.request, m.flags, m.payload) for m in got] == [
        (1, 5, U64(3).encode()), (5, 5, U64(0).encode()), (5, 5, U64(1).encode())]


def test_recv_message_timeout(pair):
    a, b = pair
    with pytest.raises(TimeoutError):
        b.recv_message(timeout=0.05)


def test_send_to_a_closed_peer(pair):
    a, b = pair
    b.close()
    with pytest.raises(PeerClosed) as info:
        for _ in range(100):
            a.send_message(Request.GET_FEATURES)
    assert isinstance(info.value, ConnectionError) and isinstance(info.value, ProtocolError)


def test_listen_accept_connect(tmp_path):
    path = str(tmp_path / "vhost.sock")
    with listen(path) as lst:
        assert lst.accept() is None                      # nobody yet
        client = connect(path, timeout=1)
        server = lst.accept(timeout=1)
        assert server is not None
        client.send_message(Request.GET_FEATURES)
        server.sock.setblocking(True)
        assert server.recv_messages()[0].request == Request.GET_FEATURES
        client.close()
        server.close()
    assert not os.path.exists(path)


def test_listen_replaces_a_stale_socket_but_not_a_live_one(tmp_path):
    path = str(tmp_path / "s")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()                                        # file left behind
    with listen(path):
        with pytest.raises(OSError, match="live"):
            listen(path)
    open(path, "w").close()
    with pytest.raises(FileExistsError):
        listen(path)


def test_connect_retries_until_the_socket_appears(tmp_path):
    path = str(tmp_path / "late.sock")
    assert try_connect(path) is None
    holder = {}

    def serve():
        time.sleep(0.15)
        holder["lst"] = listen(path)

    t = threading.Thread(target=serve)
    t.start()
    conn = connect(path, retry_interval=0.02, timeout=3)
    t.join()
    conn.close()
    holder["lst"].close()


def test_connect_timeout(tmp_path):
    with pytest.raises(TimeoutError):
        connect(str(tmp_path / "never"), retry_interval=0.01, timeout=0.05)


# -- a listener that never accepts (full backlog): nothing here may wait on it ------

def test_try_connect_to_a_full_backlog_returns_at_once_and_gets_in_later(tmp_path):
    """A blocking connect() sleeps until the listener accepts: from the
    controller's or vfe-vhostd's single loop that froze every device.  Now
    it is "not now" (None), and a later attempt connects once there is room."""
    path = str(tmp_path / "stuck.sock")
    with full_backlog(path) as stuck:
        done, result = finishes(lambda: try_connect(path), 5)
        assert done, "try_connect waited for a listener that does not accept"
        assert result is None
        stuck.drain()
        conn = try_connect(path)
        assert conn is not None and not conn.sock.getblocking()
        conn.close()


def test_stale_socket_probes_do_not_wait_on_a_full_backlog(tmp_path):
    """listen() on a path whose listener does not accept: it is live (not
    replaced), and finding that out does not wait."""
    path = str(tmp_path / "stuck.sock")
    with full_backlog(path):
        done, result = finishes(lambda: listen(path), 5)
        assert done, "listen()'s stale-socket probe waited on a full backlog"
        assert isinstance(result, OSError) and "live" in str(result)
        assert is_served(path)
    assert not is_served(path)
