"""The controller's vhost-user sockets against other local users (issue 11).

- Connects never wait (finding 6): a client-mode device (`client=on`)
  connects to a path where a listener sits whose backlog is full and that
  never accepts -- a local user's, or a wedged QEMU.  A blocking connect()
  from the control loop slept there for good: no other device was answered
  again.  The loop must go on serving the other device, and the client-mode
  device must connect once there is room.
- Paths others control are refused (finding 7): a socket in a directory
  other users may write is refused at start with a clear error; in sticky
  /tmp another uid's socket where QEMU's should be is not connected to (the
  other devices are served, and the device connects once the path is ours).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from tests.harness.backlog import full_backlog
from vfe.guest.controller_process import ControllerProcess
from vfe.testing.frontend import Frontend


@pytest.fixture
def workdir():
    d = tempfile.mkdtemp(prefix="vfe-c-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_a_client_device_on_a_full_backlog_does_not_stop_the_others(workdir):
    served, held = f"{workdir}/a.sock", f"{workdir}/b.sock"
    with full_backlog(held) as stuck:
        ctl = ControllerProcess([f"net,socket={served}", f"net,socket={held},client=on"], workdir)
        try:
            ctl.start()
            time.sleep(1.0)            # the loop has tried the held path a few times by now
            # the other device answers: a whole negotiation and a frame both ways
            fe = Frontend.connect(served, timeout=5)
            try:
                fe.start(queue_pairs=1, queue_size=64)
                fe.post_rx_buffers(0, 4)
                assert fe.get_features()
            finally:
                fe.close()
            # and the client-mode device gets in once the listener accepts
            stuck.drain()
            conn = stuck.accept(10)
            assert conn is not None, "the client-mode device never connected once there was room"
            conn.close()
            ctl.wait_for_log("net1: front-end connected", 10)
            assert ctl.running()
        finally:
            ctl.stop()
            print(ctl.log()[-3000:])


def test_a_socket_in_a_directory_others_write_is_refused_at_start(workdir):
    ww = os.path.join(workdir, "ww")
    os.mkdir(ww)
    os.chmod(ww, 0o777)
    for dev in (f"net,socket={ww}/a.sock", f"net,socket={ww}/a.sock,client=on",
                f"blk,socket={ww}/d.sock,bdev=null,size=16"):
        r = subprocess.run([sys.executable, "-m", "vfe.cli.controller", "--device", dev],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1, r.stderr
        assert f"socket path {ww}/" in r.stderr and \
            f"the directory {ww} is writable by others (its group and everyone, mode 0777)" in r.stderr, r.stderr
        assert not os.path.exists(f"{ww}/a.sock") and not os.path.exists(f"{ww}/d.sock")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a socket of another uid")
def test_another_users_socket_in_sticky_tmp_is_not_connected_to(workdir):
    sticky = os.path.join(workdir, "tmp")
    os.mkdir(sticky)
    os.chmod(sticky, 0o1777)                 # like /tmp
    served, squatted = f"{workdir}/a.sock", f"{sticky}/qemu.sock"
    squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    squatter.bind(squatted)
    squatter.listen(8)
    os.lchown(squatted, 65534, -1)           # "nobody" got there first
    ctl = ControllerProcess([f"net,socket={served}", f"net,socket={squatted},client=on"], workdir)
    try:
        ctl.start()
        ctl.wait_for_log(f"net1: socket path {squatted} is a socket of uid 65534", 10)
        squatter.settimeout(1.0)
        with pytest.raises((TimeoutError, socket.timeout)):
            squatter.accept()                # never connected to
        fe = Frontend.connect(served, timeout=5)
        try:
            fe.start(queue_pairs=1, queue_size=64)
        finally:
            fe.close()
        assert ctl.log().count(f"socket path {squatted} is a socket of uid 65534") == 1   # said once
        # the squatter leaves; QEMU (root, as we are) serves the path: connected
        squatter.close()
        os.unlink(squatted)
        qemu = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        qemu.bind(squatted)
        qemu.listen(1)
        qemu.settimeout(10)
        conn, _ = qemu.accept()
        conn.close()
        qemu.close()
        ctl.wait_for_log("net1: front-end connected", 10)
    finally:
        squatter.close()
        ctl.stop()
        print(ctl.log()[-3000:])
