"""The controller's own connects never wait (issue 11, finding 6).

A client-mode device (`client=on`) connects to a path where a listener
sits whose backlog is full and that never accepts -- a local user's, or a
wedged QEMU.  A blocking connect() from the control loop slept there for
good: no other device was answered again.  The loop must go on serving the
other device, and the client-mode device must connect once there is room.
"""
from __future__ import annotations

import shutil
import tempfile
import time

import pytest

from vfe.testing.backlog import full_backlog
from vfe.testing.daemon import ControllerProcess
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
