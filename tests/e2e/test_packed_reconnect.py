"""Reconnect with packed rings: a Linux guest on
`vhost-user-blk-pci,packed=on,num-queues=2` over a file bdev, its chardev
with `reconnect=1`, runs two O_DIRECT write loops; the test SIGKILLs the
daemon in the middle and starts it again.  QEMU 7.2 cannot tell a packed
ring's position after a crash (it sends the base of the previous start
again); the new process takes it from the packed inflight region QEMU kept,
the loops finish without an I/O error, and the file holds what the guest
wrote."""
from __future__ import annotations

import hashlib
import os
import time

import pytest

from tests.e2e.test_blk_reconnect import _written
from vfe.guest.vm import BlkDev

pytestmark = pytest.mark.e2e

PAT_KIB = 4096            # the pattern: 4 MiB
ROUNDS = 3                # per writer: 2 writers x 3 rounds x 4 MiB = 24 MiB


def test_kill9_and_restart_during_packed_guest_writes(controller, vm_factory, sockdir, tmp_path):
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    sock = os.path.join(sockdir, "blk.sock")
    ctl = controller([f"blk,socket={sock},bdev=file,path={img},size=32,queues=2"], workers=2)
    vm = vm_factory("prc", smp=2, memory_mb=256,
                    blks=[BlkDev(sock, num_queues=2, reconnect=1, extra="packed=on")])
    vm.wait_booted(90)
    rc, features = vm.run("cat /sys/bus/virtio/devices/$(basename $(readlink "
                          "/sys/class/block/vda/device))/features", timeout=20)
    assert rc == 0 and features.strip()[34] == "1", features     # RING_PACKED negotiated
    rc, pat = vm.run(f"vfe-mkdata /tmp/pat {PAT_KIB}", timeout=120)
    assert rc == 0, pat
    pat = pat.strip()
    step = PAT_KIB // 64
    loop = (f"pids=; for i in 0 1; do "
            f"taskset -c $i sh -c 'i='$i'; for r in $(seq 0 {ROUNDS - 1}); do "
            f"dd if=/tmp/pat of=/dev/vda bs=64k seek=$(( (i * {ROUNDS} + r) * {step} )) "
            f"oflag=direct 2>&1 || exit 1; done' & pids=\"$pids $!\"; done; "
            f"fail=0; for p in $pids; do wait $p || fail=1; done; exit $fail")
    job = vm.run_bg(loop)
    total = 2 * ROUNDS * (PAT_KIB << 10)
    deadline = time.monotonic() + 60
    while _written(img) < total // 3:
        assert time.monotonic() < deadline, "the guest never started writing"
        time.sleep(0.02)
    ctl.kill()                                  # SIGKILL
    assert _written(img) < total, "the loops were done before the kill"
    time.sleep(0.5)
    ctl.start()
    ctl.wait_for_log("blk0: front-end connected", timeout=30, count=2)
    assert job.wait(timeout=300) == 0, job.output()
    serial = vm.serial_tail(400)
    assert "I/O error" not in serial and "blk_update_request" not in serial, serial
    blocks = 2 * ROUNDS
    sums = vm.run(f"for b in $(seq 0 {blocks - 1}); do dd if=/dev/vda bs=64k "
                  f"skip=$((b * {step})) count={step} iflag=direct 2>/dev/null | md5sum; done",
                  timeout=300)[1].split()
    assert [s for s in sums if len(s) == 32] == [pat] * blocks
    with open(img, "rb") as f:
        for b in range(blocks):
            assert hashlib.md5(f.read(PAT_KIB << 10)).hexdigest() == pat, b
    log = ctl.log()
    second = log.split("--- start 2:")[1]
    assert "stopped:" not in log and "Traceback" not in log
    assert "blk0: packed virtqueues" in second
    vm.shutdown()
