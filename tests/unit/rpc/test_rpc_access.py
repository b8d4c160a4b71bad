"""vfe.rpc.access: who is at the other end of a Unix or TCP connection, the
directory check of control sockets, and the rate-limited refusal log.

The TCP lookup is tried against the real kernel table with clients running
as root and as uid 65534 (setpriv), including a client that closes before
the server looks -- its entry then reads uid 0 on our kernels."""
from __future__ import annotations

import logging
import os
import socket
import stat
import sys
import time

import pytest

from tests.harness.unprivileged import NOBODY, needs_root, python_nobody
from vfe.rpc import access
from vfe.rpc.access import Peer, RefusalLog, is_privileged, tcp_peer, unix_peer
from vfe.safepath import UnsafePath, ensure_private_dir


# -- Unix sockets ---------------------------------------------------------------------

def test_unix_peer_is_the_connecting_process():
    a, b = socket.socketpair()
    with a, b:
        assert unix_peer(a) == Peer(os.geteuid(), os.getpid())


def test_privileged_is_root_or_ourselves():
    assert is_privileged(0) and is_privileged(os.geteuid())
    assert not is_privileged(NOBODY) or os.geteuid() == NOBODY


# -- TCP: the kernel's table ----------------------------------------------------------

@pytest.fixture
def listener():
    s = socket.create_server(("127.0.0.1", 0))
    yield s
    s.close()


def test_tcp_peer_of_our_own_connection(listener):
    c = socket.create_connection(listener.getsockname())
    conn, _ = listener.accept()
    with c, conn:
        assert tcp_peer(conn) == Peer(os.geteuid())


def test_tcp_peer_over_ipv6():
    try:
        srv = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback")
    with srv:
        c = socket.create_connection(srv.getsockname()[:2])
        conn, _ = srv.accept()
        with c, conn:
            assert tcp_peer(conn) == Peer(os.geteuid())


# connect to argv[1]:argv[2], then either stay until the server hangs up
# ("stay") or send a byte and close at once ("close")
TCP_CLIENT = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
if sys.argv[3] == "close":
    c.sendall(b"{")
    c.close()
else:
    print("connected", flush=True)
    c.recv(1)
"""


@needs_root()
def test_tcp_peer_of_an_unprivileged_client(listener):
    import subprocess
    from tests.harness.unprivileged import SETPRIV
    host, port = listener.getsockname()
    proc = subprocess.Popen([*SETPRIV, sys.executable, "-c", TCP_CLIENT, host, str(port), "stay"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "connected\n"
        conn, _ = listener.accept()
        with conn:
            assert tcp_peer(conn) == Peer(NOBODY)
    finally:
        proc.kill()
        proc.wait()


@needs_root()
def test_a_client_that_closed_is_not_taken_for_root(listener):
    """A client that sent its request and closed before we look: what is
    left of its socket soon shows uid 0 in the kernel's table (an orphaned
    FIN_WAIT2 remnant has no owner).  Only ESTABLISHED entries may count."""
    host, port = listener.getsockname()
    r = python_nobody(TCP_CLIENT, host, str(port), "close")
    assert r.returncode == 0, r.stderr
    conn, _ = listener.accept()
    with conn:
        peer = _endpoint_text(conn.getpeername())
        deadline = time.monotonic() + 10
        while True:                                  # wait until the kernel shows it as root's
            rows = [line.split() for line in open("/proc/net/tcp").read().splitlines()[1:]]
            row = next(r for r in rows if r[1] == peer)
            if row[7] == "0" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert (row[3], row[7]) == ("05", "0")       # FIN_WAIT2, "uid 0"
        assert tcp_peer(conn) is None


def _endpoint_text(sockaddr) -> str:
    host, port = sockaddr
    return "%08X:%04X" % (int.from_bytes(socket.inet_aton(host), sys.byteorder), port)


def test_proc_addresses_are_parsed():
    v4, port = access._proc_endpoint(_endpoint_text(("127.0.0.1", 12190)))
    assert (v4, port) == (b"\0" * 10 + b"\xff\xff\x7f\0\0\x01", 12190)
    raw = socket.inet_pton(socket.AF_INET6, "::1")
    words = "".join("%08X" % int.from_bytes(raw[i:i + 4], sys.byteorder) for i in range(0, 16, 4))
    assert access._proc_endpoint(f"{words}:2F8E") == (raw, 0x2F8E)


@pytest.mark.parametrize("second_read", [
    pytest.param((0x04, 0, 4242), id="closed-in-between"),                        # FIN_WAIT1
    pytest.param((access.TCP_ESTABLISHED, NOBODY, 4343), id="another-socket"),
])
def test_a_change_between_the_two_reads_is_caught(listener, monkeypatch, second_read):
    """The kernel reads an entry's state before its uid: a close in between
    reads "ESTABLISHED, uid 0".  The second read sees it gone from
    ESTABLISHED (or another socket in its place), so the first uid is not
    trusted."""
    c = socket.create_connection(listener.getsockname())
    conn, _ = listener.accept()
    reads = iter([(access.TCP_ESTABLISHED, 0, 4242), second_read])
    monkeypatch.setattr(access, "_find", lambda *a: next(reads))
    with c, conn:
        assert tcp_peer(conn) is None


def test_a_peer_missing_from_the_table_is_refused(listener, tmp_path):
    c = socket.create_connection(listener.getsockname())
    conn, _ = listener.accept()
    (tmp_path / "tcp").write_text("  sl  local_address rem_address   st ...\n")
    with c, conn:
        assert tcp_peer(conn, proc_net=str(tmp_path)) is None


# -- the directory of a control socket ------------------------------------------------

def test_private_dir_is_created_0755_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        d = ensure_private_dir(tmp_path / "run" / "virtnet")
    finally:
        os.umask(old)
    for p in (tmp_path / "run", d):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o755


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757, 0o1777])
def test_private_dir_writable_by_others_is_refused(tmp_path, mode):
    d = tmp_path / "run"
    d.mkdir()
    os.chmod(d, mode)
    with pytest.raises(UnsafePath, match=rf"the directory {d} is writable by others \(.*mode {mode:04o}\).*"
                                         rf"run `chmod go-w {d}`"):
        ensure_private_dir(d)


def test_a_writable_parent_is_refused_unless_sticky(tmp_path):
    parent = tmp_path / "p"
    (parent / "run").mkdir(parents=True)
    os.chmod(parent, 0o777)
    with pytest.raises(UnsafePath, match=f"{parent} is writable by others"):
        ensure_private_dir(parent / "run")
    os.chmod(parent, 0o1777)                       # like /tmp: our entry cannot be renamed
    assert ensure_private_dir(parent / "run") == str(parent / "run")


@needs_root()
def test_a_dir_of_another_user_is_refused(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    os.chown(d, NOBODY, NOBODY)
    with pytest.raises(UnsafePath, match=f"the directory {d} is owned by uid {NOBODY}"):
        ensure_private_dir(d / "virtnet")
    os.chown(d, 0, 0)
    sticky = tmp_path / "sticky"
    (sticky / "theirs").mkdir(parents=True)
    os.chmod(sticky, 0o1777)
    os.chown(sticky / "theirs", NOBODY, NOBODY)     # they made it first in a /tmp-like dir
    with pytest.raises(UnsafePath, match=f"the directory {sticky / 'theirs'} is owned by uid {NOBODY}"):
        ensure_private_dir(sticky / "theirs" / "run")


def test_where_a_symlink_leads_is_checked_too(tmp_path):
    """The link and what it names look fine; the directory above the target
    is anyone's, so the target can be swapped."""
    open_dir = tmp_path / "open"
    (open_dir / "run").mkdir(parents=True)
    os.chmod(open_dir, 0o777)
    (tmp_path / "link").symlink_to(open_dir / "run")
    with pytest.raises(UnsafePath, match=f"{open_dir} is writable by others"):
        ensure_private_dir(tmp_path / "link")


# -- the refusal log -------------------------------------------------------------------

def test_refusal_log_is_bounded(caplog, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    log = RefusalLog(logging.getLogger("test.refusals"), burst=3, interval=10.0)
    with caplog.at_level(logging.WARNING, "test.refusals"):
        for i in range(50):
            log("refused uid %d", i)
        assert [r.getMessage() for r in caplog.records] == ["refused uid 0", "refused uid 1", "refused uid 2"]
        now[0] += 10.0
        log("refused uid %d", 99)
    assert caplog.records[-1].getMessage() == "refused uid 99 (47 more refused and not logged)"
