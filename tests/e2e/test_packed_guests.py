"""Real QEMU 7.2 guests whose virtio devices use packed virtqueues
(``packed=on``: VIRTIO_F_RING_PACKED negotiated, which each test checks in
the guest's own feature bits): two multiqueue NICs passing ping and a TCP
stream with matching md5s, and a disk that reads back what was written."""
from __future__ import annotations

import os

import pytest

from vfe.guest.vm import BlkDev, NetDev

pytestmark = pytest.mark.e2e

MAC_A, MAC_B = "52:54:00:0e:00:01", "52:54:00:0e:00:02"
STREAM_MB = 16
RING_PACKED = 34


def run(vm, cmd, timeout=60):
    rc, out = vm.run(cmd, timeout=timeout)
    assert rc == 0, f"{cmd}: {out}"
    return out.strip()


def assert_packed(vm, dev: str) -> None:
    """The guest's driver negotiated RING_PACKED on ``dev`` (the sysfs
    features string has one character per bit, bit 0 first)."""
    features = run(vm, f"cat /sys/bus/virtio/devices/$(basename $(readlink "
                       f"/sys/class/{dev}/device))/features")
    assert features[RING_PACKED] == "1", features


def test_two_packed_guests_multiqueue_ping_and_tcp(controller, vm_factory, sockdir):
    sa, sb = os.path.join(sockdir, "a.sock"), os.path.join(sockdir, "b.sock")
    ctl = controller([f"net,socket={sa},queues=2", f"net,socket={sb},queues=2"])
    nic = dict(queues=2, mq=True, extra="packed=on")
    a = vm_factory("a", smp=2, memory_mb=384, nics=[NetDev(sa, mac=MAC_A, **nic)])
    b = vm_factory("b", smp=2, memory_mb=384, nics=[NetDev(sb, mac=MAC_B, **nic)])
    a.wait_booted(90)
    b.wait_booted(90)
    for vm in (a, b):
        assert_packed(vm, "net/eth0")
        # both queue pairs active (Linux enables min(pairs, CPUs))
        assert {"rx-0", "rx-1", "tx-0", "tx-1"} <= set(run(vm, "ls /sys/class/net/eth0/queues").split())
    run(a, "vfe-netup eth0 10.0.2.1/24")
    run(b, "vfe-netup eth0 10.0.2.2/24")
    for vm, peer in ((a, "10.0.2.2"), (b, "10.0.2.1")):
        out = run(vm, f"ping -c 3 -W 3 {peer}", timeout=30)
        assert "3 packets received" in out, out
    data_sum = run(a, f"vfe-mkdata /tmp/data {STREAM_MB * 1024}", timeout=300)
    recv = b.run_bg("vfe-recv 5001 /tmp/got")
    send = a.run_bg("vfe-send 10.0.2.2 5001 /tmp/data")
    assert send.wait(timeout=600) == 0, send.output()
    assert recv.wait(timeout=120) == 0, recv.output()
    assert recv.output().split() == [data_sum, str(STREAM_MB << 20)]
    assert "stopped:" not in ctl.log()


def test_packed_blk_guest_writes_and_reads_back(controller, vm_factory, sockdir):
    sm = os.path.join(sockdir, "m.sock")
    ctl = controller([f"blk,socket={sm},bdev=malloc,size=64,block-size=512,queues=2"])
    vm = vm_factory("blk", smp=2, memory_mb=256,
                    blks=[BlkDev(sm, num_queues=2, extra="packed=on")])
    vm.wait_booted(90)
    assert_packed(vm, "block/vda")
    assert run(vm, "cat /sys/block/vda/size") == str(64 * 2048)
    # a 4 MiB pattern from each CPU (so both queues), O_DIRECT, read back
    sums = run(vm, "for i in 0 1; do vfe-mkdata /tmp/d$i 4096 > /tmp/d$i.md5; done; "
                   "cat /tmp/d0.md5 /tmp/d1.md5", timeout=120).split()
    run(vm, "for i in 0 1; do taskset -c $i dd if=/tmp/d$i of=/dev/vda bs=64k "
            "seek=$((i * 64)) oflag=direct 2>/dev/null & done; wait", timeout=300)
    run(vm, "echo 3 > /proc/sys/vm/drop_caches")
    for i in range(2):
        got = run(vm, f"dd if=/dev/vda bs=64k skip={i * 64} count=64 iflag=direct 2>/dev/null "
                      f"| md5sum", timeout=120).split()[0]
        assert got == sums[i], (i, got, sums[i])
    # the buffered path with FLUSH too
    run(vm, "dd if=/tmp/d0 of=/dev/vda bs=4k seek=8192 conv=fsync 2>/dev/null", timeout=120)
    run(vm, "echo 3 > /proc/sys/vm/drop_caches")
    assert run(vm, "dd if=/dev/vda bs=4k skip=8192 count=1024 2>/dev/null | md5sum",
               timeout=120).split()[0] == sums[0]
    assert "I/O error" not in vm.serial_tail(200)
    assert "stopped:" not in ctl.log()
    vm.shutdown()
    ctl.wait_for_log("blk0: front-end disconnected")
    summary = ctl.log().split("blk0: front-end disconnected")[1].splitlines()[0]
    assert " 0 I/O errors" in summary, summary
    per_queue = [int(n) for n in summary.split("requests per queue ")[1].split("/")]
    assert len(per_queue) == 2 and all(n > 0 for n in per_queue), summary
