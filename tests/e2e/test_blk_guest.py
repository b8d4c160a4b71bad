"""A real Linux guest on virtio-blk devices served by the engine
(vhost-user-blk-pci, QEMU 7.2 under TCG): sizes and block sizes as the
guest sees them, data written with O_DIRECT from several CPUs (so several
queues) read back with matching md5s, a null bdev that reads zeros, and a
net device on the same daemon passing traffic meanwhile."""
from __future__ import annotations

import os

import pytest

from vfe.guest.vm import BlkDev, NetDev

pytestmark = pytest.mark.e2e

MAC_A, MAC_B = "52:54:00:0b:00:01", "52:54:00:0b:00:02"


def run(vm, cmd, timeout=60):
    rc, out = vm.run(cmd, timeout=timeout)
    assert rc == 0, f"{cmd}: {out}"
    return out.strip()


def test_blk_guest_malloc_and_null(controller, vm_factory, sockdir):
    sm, sn = os.path.join(sockdir, "m.sock"), os.path.join(sockdir, "n.sock")
    ctl = controller([f"blk,socket={sm},bdev=malloc,size=64,block-size=512,queues=4,serial=vfe-malloc0",
                      f"blk,socket={sn},bdev=null,size=1024,block-size=512"], workers=2)
    vm = vm_factory("blk", smp=4, memory_mb=256,
                    blks=[BlkDev(sm, num_queues=4), BlkDev(sn, num_queues=1)])
    vm.wait_booted(90)
    # malloc0: 64 MiB of 512-byte sectors, four queues (one per CPU)
    assert run(vm, "cat /sys/block/vda/size") == str(64 * 2048)
    assert run(vm, "cat /sys/block/vda/queue/logical_block_size") == "512"
    assert run(vm, "cat /sys/block/vda/serial") == "vfe-malloc0"
    assert sorted(run(vm, "ls /sys/block/vda/mq").split()) == ["0", "1", "2", "3"]
    assert run(vm, "cat /sys/block/vda/ro") == "0"
    # null: 1 GiB
    assert run(vm, "cat /sys/block/vdb/size") == str(1024 * 2048)

    # four writers, one per CPU (so every queue carries requests), O_DIRECT
    sums = run(vm, "for i in 0 1 2 3; do vfe-mkdata /tmp/d$i 2048 > /tmp/d$i.md5; done; "
                   "cat /tmp/d0.md5 /tmp/d1.md5 /tmp/d2.md5 /tmp/d3.md5", timeout=120).split()
    run(vm, "for i in 0 1 2 3; do "
            "taskset -c $i dd if=/tmp/d$i of=/dev/vda bs=64k seek=$((i * 32)) oflag=direct "
            "2>/dev/null & done; wait", timeout=120)
    run(vm, "echo 3 > /proc/sys/vm/drop_caches")
    for i in range(4):
        got = run(vm, f"dd if=/dev/vda bs=64k skip={i * 32} count=32 iflag=direct 2>/dev/null | md5sum",
                  timeout=60).split()[0]
        assert got == sums[i], (i, got, sums[i])
    # the buffered path and FLUSH (fsync) too
    run(vm, "dd if=/tmp/d0 of=/dev/vda bs=4k seek=8192 conv=fsync 2>/dev/null")
    run(vm, "echo 3 > /proc/sys/vm/drop_caches")
    assert run(vm, "dd if=/dev/vda bs=4k skip=8192 count=512 2>/dev/null | md5sum").split()[0] == sums[0]

    # DISCARD and WRITE_ZEROES were negotiated; a discarded range of the
    # malloc bdev reads back as zeros
    assert int(run(vm, "cat /sys/block/vda/queue/discard_max_bytes")) == 65536 * 512
    assert int(run(vm, "cat /sys/block/vda/queue/write_zeroes_max_bytes")) == 65536 * 512
    run(vm, "blkdiscard -o 0 -l 1048576 /dev/vda")
    zeros1m = run(vm, "dd if=/dev/zero bs=1M count=1 2>/dev/null | md5sum").split()[0]
    assert run(vm, "dd if=/dev/vda bs=1M count=1 iflag=direct 2>/dev/null | md5sum").split()[0] == zeros1m

    # null reads zeros, and drops writes
    zeros = run(vm, "dd if=/dev/zero bs=1M count=4 2>/dev/null | md5sum").split()[0]
    run(vm, "dd if=/tmp/d1 of=/dev/vdb bs=64k oflag=direct 2>/dev/null")
    assert run(vm, "dd if=/dev/vdb bs=1M count=4 iflag=direct 2>/dev/null | md5sum").split()[0] == zeros
    assert run(vm, "dd if=/dev/vdb bs=1M skip=1020 count=4 iflag=direct 2>/dev/null | md5sum").split()[0] == zeros
    # reading past the end is the guest's own EOF, never a device error
    assert "I/O error" not in vm.serial_tail(200)
    assert "stopped:" not in ctl.log()

    vm.shutdown()
    ctl.wait_for_log("blk0: front-end disconnected")
    summary = ctl.log().split("blk0: front-end disconnected")[1].splitlines()[0]
    assert " 0 I/O errors" in summary, summary
    assert " 0 discards" not in summary and " 0 flushes" not in summary, summary
    per_queue = [int(n) for n in summary.split("requests per queue ")[1].split("/")]
    assert len(per_queue) == 4 and all(n > 0 for n in per_queue), summary


def test_blk_and_net_guests_on_one_daemon(controller, vm_factory, sockdir):
    """A read-only disk and a NIC in one guest, a NIC in another: the
    disk serves reads and refuses writes while ping runs over the switch."""
    sb, sa, sc = (os.path.join(sockdir, n) for n in ("b.sock", "a.sock", "c.sock"))
    ctl = controller([f"net,socket={sa}", f"net,socket={sc}",
                      f"blk,socket={sb},bdev=malloc,size=16,block-size=4096,ro=on"])
    a = vm_factory("a", smp=1, nics=[NetDev(sa, mac=MAC_A)], blks=[BlkDev(sb)])
    c = vm_factory("c", smp=1, nics=[NetDev(sc, mac=MAC_B)])
    a.wait_booted(90)
    c.wait_booted(90)
    assert run(a, "cat /sys/block/vda/queue/logical_block_size") == "4096"
    assert run(a, "cat /sys/block/vda/size") == str(16 * 2048)
    assert run(a, "cat /sys/block/vda/ro") == "1"
    run(a, "vfe-netup eth0 10.0.1.1/24")
    run(c, "vfe-netup eth0 10.0.1.2/24")
    ping = a.run_bg("ping -c 20 -i 0.2 -W 3 10.0.1.2")
    run(a, "for i in 1 2 3 4 5; do dd if=/dev/vda of=/dev/null bs=64k iflag=direct 2>/dev/null; done",
        timeout=120)
    rc, out = a.run("dd if=/dev/zero of=/dev/vda bs=4k count=1 oflag=direct", timeout=30)
    assert rc != 0, out                  # the kernel refuses writes to a read-only disk
    assert ping.wait(timeout=60) == 0, ping.output()
    assert "20 packets received" in ping.output(), ping.output()
    assert "stopped:" not in ctl.log()
