"""Real QEMU guests on virtio-net-controller: link, ping, TCP streams with
their data checksummed on both ends, and the daemon as client of QEMU
`server=on` sockets surviving a QEMU restart."""
from __future__ import annotations

import os

import pytest

from vfe.guest.vm import NetDev

pytestmark = pytest.mark.e2e

DATA_MB = 100          # per direction (issue acceptance)
MAC_A, MAC_B = "52:54:00:0f:00:01", "52:54:00:0f:00:02"


def netup(vm, addr):
    rc, out = vm.run(f"vfe-netup eth0 {addr}/24", timeout=30)
    assert rc == 0, out


def ping(vm, addr, count=3):
    rc, out = vm.run(f"ping -c {count} -W 3 {addr}", timeout=10 + 4 * count)
    assert rc == 0 and f"{count} packets received" in out, out
    return out


def test_two_guests_multiqueue_tcp_both_ways(controller, vm_factory, sockdir):
    sa, sb = os.path.join(sockdir, "a.sock"), os.path.join(sockdir, "b.sock")
    ctl = controller([f"net,socket={sa},queues=4,queue-size=1024",
                      f"net,socket={sb},queues=4,queue-size=1024"])
    nic = dict(queues=4, queue_size=1024, mq=True)
    a = vm_factory("a", smp=4, memory_mb=512, nics=[NetDev(sa, mac=MAC_A, **nic)])
    b = vm_factory("b", smp=4, memory_mb=512, nics=[NetDev(sb, mac=MAC_B, **nic)])
    a.wait_booted(90)
    b.wait_booted(90)
    for vm in (a, b):
        # Linux enables min(queue pairs, CPUs) pairs: all four must be active
        rc, out = vm.run("ls /sys/class/net/eth0/queues")
        assert {"rx-0", "rx-1", "rx-2", "rx-3", "tx-0", "tx-1", "tx-2", "tx-3"} <= set(out.split()), out
    netup(a, "10.0.0.1")
    netup(b, "10.0.0.2")
    ping(a, "10.0.0.2")
    ping(b, "10.0.0.1")

    sums = {}
    for vm in (a, b):
        rc, out = vm.run(f"vfe-mkdata /tmp/data {DATA_MB * 1024}", timeout=600)
        assert rc == 0, out
        sums[vm.name] = out.strip()
    recv_a = a.run_bg("vfe-recv 5001 /tmp/got")
    recv_b = b.run_bg("vfe-recv 5001 /tmp/got")
    send_a = a.run_bg("vfe-send 10.0.0.2 5001 /tmp/data")
    send_b = b.run_bg("vfe-send 10.0.0.1 5001 /tmp/data")
    for job in (send_a, send_b, recv_a, recv_b):
        assert job.wait(timeout=900) == 0, job.output()
    size = DATA_MB * 1024 * 1024
    assert recv_b.output().split() == [sums["a"], str(size)]
    assert recv_a.output().split() == [sums["b"], str(size)]
    assert "ring" not in ctl.log() or "stopped:" not in ctl.log()


def test_client_mode_reconnects_after_qemu_restart(controller, vm_factory, sockdir):
    sa, sb = os.path.join(sockdir, "a.sock"), os.path.join(sockdir, "b.sock")
    ctl = controller([f"net,socket={sa},client=on", f"net,socket={sb},client=on"])
    a = vm_factory("a", nics=[NetDev(sa, mac=MAC_A, server=True)])
    b = vm_factory("b", nics=[NetDev(sb, mac=MAC_B, server=True)])
    a.wait_booted(90)
    b.wait_booted(90)
    netup(a, "10.0.0.1")
    netup(b, "10.0.0.2")
    ping(a, "10.0.0.2")

    b.shutdown()
    ctl.wait_for_log("net1: front-end disconnected", timeout=30)
    b2 = vm_factory("b2", nics=[NetDev(sb, mac=MAC_B, server=True)])
    b2.wait_booted(90)
    ctl.wait_for_log("net1: front-end connected", timeout=30, count=2)
    netup(b2, "10.0.0.2")
    ping(a, "10.0.0.2")
    ping(b2, "10.0.0.1")


def test_offload_mismatch_is_finished_in_software(controller, vm_factory, sockdir):
    """Guest a negotiates TSO and checksum offload; guest b negotiates none of
    the receive offloads.  a's 64 KiB TSO frames with partial checksums must
    reach b segmented to its MTU with every checksum finished (Numba kernels):
    b's stack verifies them, and the stream's md5 must match."""
    sa, sb = os.path.join(sockdir, "a.sock"), os.path.join(sockdir, "b.sock")
    ctl = controller([f"net,socket={sa}", f"net,socket={sb}"])
    no_rx_offloads = "guest_csum=off,guest_tso4=off,guest_tso6=off,guest_ecn=off,guest_ufo=off"
    a = vm_factory("a", memory_mb=384, nics=[NetDev(sa, mac=MAC_A)])
    b = vm_factory("b", memory_mb=384, nics=[NetDev(sb, mac=MAC_B, extra=no_rx_offloads)])
    a.wait_booted(90)
    b.wait_booted(90)
    netup(a, "10.0.0.1")
    netup(b, "10.0.0.2")
    ping(a, "10.0.0.2")
    mb = 8
    rc, data_sum = a.run(f"vfe-mkdata /tmp/data {mb * 1024}", timeout=300)
    assert rc == 0, data_sum
    rc, before = b.run("cat /sys/class/net/eth0/statistics/rx_packets")
    recv = b.run_bg("vfe-recv 5001 /tmp/got")
    rc, out = a.run("vfe-send 10.0.0.2 5001 /tmp/data", timeout=600)
    assert rc == 0, out
    assert recv.wait(timeout=120) == 0
    assert recv.output().split() == [data_sum.strip(), str(mb << 20)]
    rc, after = b.run("cat /sys/class/net/eth0/statistics/rx_packets")
    # every frame b got fits its 1500-byte MTU: at least one per 1448 bytes of data
    assert int(after) - int(before) >= (mb << 20) // 1448
    assert "stopped:" not in ctl.log()
    b.shutdown()
    ctl.wait_for_log("net1: front-end disconnected")
    summary = ctl.log().split("net1: front-end disconnected")[1].splitlines()[0]
    sw_gso = int(summary.split("software gso ")[1].split()[0])
    assert sw_gso > 0, summary          # a really sent TSO frames, and we cut them
