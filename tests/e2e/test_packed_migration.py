"""Live migration of a guest whose NIC uses packed virtqueues (``packed=on``)
while it sends a TCP stream to a peer: the destination QEMU's SET_VRING_BASE
carries the wrap counters the source's GET_VRING_BASE returned, dirty
logging covers the descriptor ring the engine writes used descriptors into,
and the stream arrives whole (md5 equal)."""
from __future__ import annotations

import os
import time

import pytest

from tests.e2e.test_migration import free_port, migrate, paced_send
from vfe.guest.vm import VM, BgJob, NetDev

pytestmark = pytest.mark.e2e

MAC_M, MAC_P = "52:54:00:0d:00:01", "52:54:00:0d:00:02"
STREAM_MB = 16


def test_packed_guest_migrates_with_a_tcp_stream(controller, vm_factory, guest_image, sockdir,
                                                 tmp_path):
    sa, sa2, sp = (os.path.join(sockdir, n) for n in ("m.sock", "m-in.sock", "p.sock"))
    ctl = controller([f"net,socket={sa},incoming={sa2}", f"net,socket={sp}"])
    peer = vm_factory("peer", nics=[NetDev(sp, mac=MAC_P, extra="packed=on")])
    src = vm_factory("m0", qmp=True, nics=[NetDev(sa, mac=MAC_M, extra="packed=on")])
    peer.wait_booted(90)
    src.wait_booted(90)
    rc, features = src.run("cat /sys/bus/virtio/devices/$(basename $(readlink "
                           "/sys/class/net/eth0/device))/features", timeout=20)
    assert rc == 0 and features.strip()[34] == "1", features       # RING_PACKED negotiated
    assert peer.run("vfe-netup eth0 10.0.3.2/24", timeout=30)[0] == 0
    assert src.run("vfe-netup eth0 10.0.3.1/24", timeout=30)[0] == 0
    rc, out = peer.run("ping -c 2 -W 3 10.0.3.1", timeout=20)
    assert rc == 0, out

    rc, data_sum = src.run(f"vfe-mkdata /tmp/data {STREAM_MB * 1024}", timeout=300)
    assert rc == 0, data_sum
    recv = peer.run_bg("vfe-recv 5001 /tmp/got")
    send = src.run_bg(paced_send("10.0.3.2", STREAM_MB))   # paced: still flowing at the migration
    time.sleep(2.5)
    assert send.running(), "the stream ended before the migration"
    port = free_port()
    dst = VM("m1", tmp_path, image=guest_image, qmp=True, incoming=f"tcp:127.0.0.1:{port}",
             nics=[NetDev(sa2, mac=MAC_M, extra="packed=on")])
    try:
        dst.start()
        migrate(src, dst, port)
    except BaseException:
        dst.shutdown()
        raise
    src.shutdown()
    send = BgJob(dst, send.id, send.pid, send.cmd)      # the sender now lives in the destination
    assert send.wait(timeout=600) == 0, send.output()
    assert recv.wait(timeout=120) == 0, recv.output()
    assert recv.output().split() == [data_sum.strip(), str(STREAM_MB << 20)]
    dst.shutdown()
    assert "stopped:" not in ctl.log()
    # the switch-over really handed a packed ring's position over
    assert "packed virtqueues" in ctl.log()
