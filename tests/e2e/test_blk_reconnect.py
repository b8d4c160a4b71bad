"""Reconnect without losing a request (issue 6, INFLIGHT_SHMFD): a Linux
guest on `vhost-user-blk-pci,num-queues=4` over a file bdev, its chardev
with `reconnect=1`, runs four O_DIRECT write loops (one per CPU, so every
queue carries requests); the test SIGKILLs the daemon in the middle and
starts it again on the same socket and file.  QEMU reconnects, hands the
new process the inflight region it kept, the loops finish without an I/O
error, and the host file holds exactly what the guest wrote."""
from __future__ import annotations

import hashlib
import os
import re
import time

import pytest

from vfe.guest.vm import BlkDev

pytestmark = pytest.mark.e2e

PAT_KIB = 4096            # the pattern: 4 MiB
ROUNDS = 3                # per writer: 4 writers x 3 rounds x 4 MiB = 48 MiB


def test_kill9_and_restart_during_guest_writes(controller, vm_factory, sockdir, tmp_path):
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    sock = os.path.join(sockdir, "blk.sock")
    ctl = controller([f"blk,socket={sock},bdev=file,path={img},size=64,queues=4"], workers=2)
    vm = vm_factory("rc", smp=4, memory_mb=384,
                    blks=[BlkDev(sock, num_queues=4, reconnect=1)])
    vm.wait_booted(90)
    rc, pat = vm.run(f"vfe-mkdata /tmp/pat {PAT_KIB}", timeout=120)
    assert rc == 0, pat
    pat = pat.strip()
    step = PAT_KIB // 64                       # the pattern in 64 KiB blocks
    # writer i, round r writes the pattern at block (i * ROUNDS + r) * step
    loop = (f"pids=; for i in 0 1 2 3; do "
            f"taskset -c $i sh -c 'i='$i'; for r in $(seq 0 {ROUNDS - 1}); do "
            f"dd if=/tmp/pat of=/dev/vda bs=64k seek=$(( (i * {ROUNDS} + r) * {step} )) "
            f"oflag=direct 2>&1 || exit 1; done' & pids=\"$pids $!\"; done; "
            f"fail=0; for p in $pids; do wait $p || fail=1; done; exit $fail")
    mark = vm.log_mark()
    t0 = time.monotonic()
    job = vm.run_bg(loop)
    # kill once the writes are well under way: a third of the data has
    # reached the file (through the page cache the daemon writes)
    total = 4 * ROUNDS * (PAT_KIB << 10)
    deadline = time.monotonic() + 60
    while _written(img) < total // 3:
        assert time.monotonic() < deadline, "the guest never started writing"
        time.sleep(0.02)
    ctl.kill()                                  # SIGKILL: no cleanup in the daemon
    t_kill, at_kill = time.monotonic() - t0, _written(img)
    assert at_kill < total, "the loops were done before the kill"
    time.sleep(0.5)
    ctl.start()                                 # same socket, same file
    ctl.wait_for_log("blk0: front-end connected", timeout=30, count=2)
    assert job.wait(timeout=300) == 0, job.output()
    t_done = time.monotonic() - t0
    serial = vm.serial_tail(400)
    assert "I/O error" not in serial and "blk_update_request" not in serial, serial
    assert not re.search(r"I/O error|error", job.output()), job.output()

    # every range holds the pattern, in the guest and in the host file
    blocks = 4 * ROUNDS
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
    resubmitted = sum(int(n) for n in re.findall(r"blk0: ring \d+: (\d+) request\(s\) left inflight",
                                                 second))
    print(f"killed at {t_kill:.1f} s ({at_kill >> 20} of {total >> 20} MiB written), "
          f"loops done at {t_done:.1f} s, "
          f"{resubmitted} request(s) resubmitted by the new process")
    vm.shutdown()


def _written(img) -> int:
    """Bytes of the image that hold data (allocated blocks)."""
    return os.stat(img).st_blocks * 512
