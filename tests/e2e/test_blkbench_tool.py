"""The guest's block benchmark tool (/bin/vfe-blkbench) against our daemon:
its JSON line is complete and consistent, its pattern lands on the disk as
documented (read back with dd), it reads back what it wrote, and it notices
a block that differs.  A few short runs on one guest (the speed itself is
tests/bench/test_blk_qsd.py's business)."""
from __future__ import annotations

import os

import pytest

from tests.harness import blkbench
from vfe.guest.vm import BlkDev

pytestmark = pytest.mark.e2e

RAM_MB = 8


def _sector(vm, dev: str, sector: int) -> bytes:
    """One 512-byte sector read with dd (O_DIRECT), not with the tool."""
    rc, out = vm.run(f"dd if={dev} bs=512 skip={sector} count=1 iflag=direct 2>/dev/null "
                     f"| od -A n -t x1 -v", timeout=30)
    assert rc == 0, out
    data = bytes.fromhex("".join(out.split()))
    assert len(data) == 512, out
    return data


def test_blkbench_tool(controller, vm_factory, sockdir):
    sm, sn = os.path.join(sockdir, "m.sock"), os.path.join(sockdir, "n.sock")
    ctl = controller([f"blk,socket={sm},bdev=malloc,size={RAM_MB},queues=2",
                      f"blk,socket={sn},bdev=null,size=64"])
    vm = vm_factory("bb", smp=1, blks=[BlkDev(sm, num_queues=2), BlkDev(sn)])
    vm.wait_booted(90)

    # a timed random-read run: every key, and numbers that agree with each other
    r = blkbench.run(vm, "/dev/vdb", mode="randread", bs=4096, jobs=2, depth=4, seconds=0.3)
    assert list(r)[:len(blkbench.KEYS)] == list(blkbench.KEYS)
    assert (r["tool"], r["version"], r["device"], r["mode"]) == ("vfe-blkbench", 1, "/dev/vdb",
                                                                  "randread")
    assert (r["bs"], r["jobs"], r["depth"], r["size"], r["direct"]) == (4096, 2, 4, 64 << 20, True)
    assert r["errors"] == 0 and r["mismatches"] == 0 and r["first_error"] is None and r["exit"] == 0
    assert r["ops"] > 0 and r["bytes"] == r["ops"] * 4096
    assert 0.3 <= r["seconds"] < 10
    assert r["iops"] == pytest.approx(r["ops"] / r["seconds"], rel=1e-3)
    assert r["mib_s"] == pytest.approx(r["bytes"] / r["seconds"] / 2**20, rel=1e-2)
    assert 0 < r["lat_p50_us"] <= r["lat_p99_us"] <= r["lat_max_us"]

    # the pattern, written over the whole RAM disk (sequential, one pass)
    w = blkbench.run(vm, "/dev/vda", mode="seqwrite", bs=65536, jobs=1, depth=4, seconds=0,
                     ops=RAM_MB * 16, pattern=True, seed=7)
    assert (w["ops"], w["bytes"], w["errors"]) == (RAM_MB * 16, RAM_MB << 20, 0)
    # ... is on the disk as documented: checked sector by sector with dd
    for sector in (0, 1, 12345, RAM_MB * 2048 - 1):
        assert _sector(vm, "/dev/vda", sector) == blkbench.pattern_bytes(sector * 512, 512, seed=7), sector
    # ... and the tool reads it back: every block, two threads, random blocks too
    r = blkbench.run(vm, "/dev/vda", mode="seqread", bs=4096, jobs=2, depth=8, seconds=0,
                     ops=RAM_MB * 256, pattern=True, seed=7)
    assert (r["ops"], r["bytes"], r["mismatches"], r["exit"]) == (RAM_MB * 256, RAM_MB << 20, 0, 0)
    r = blkbench.run(vm, "/dev/vda", mode="randread", bs=4096, jobs=1, depth=8, seconds=0.3,
                     pattern=True, seed=7)
    assert r["ops"] > 0 and r["mismatches"] == 0

    # a block that differs (written with dd) is noticed, once, with exit status 1
    rc, out = vm.run("dd if=/dev/zero of=/dev/vda bs=4096 seek=10 count=1 oflag=direct 2>&1")
    assert rc == 0, out
    r = blkbench.run(vm, "/dev/vda", mode="seqread", bs=4096, jobs=1, depth=4, seconds=0,
                     ops=64, pattern=True, seed=7, check=False)
    assert (r["ops"], r["mismatches"], r["errors"], r["exit"]) == (64, 1, 0, 1)
    # ... and so is the wrong seed
    r = blkbench.run(vm, "/dev/vda", mode="seqread", bs=4096, jobs=1, depth=1, seconds=0,
                     ops=4, pattern=True, seed=8, check=False)
    assert (r["mismatches"], r["exit"]) == (4, 1)

    # a region past the end is a usage error (exit 2, no JSON); the daemon
    # saw only requests it could serve
    rc, out = vm.run(blkbench.command("/dev/vda", offset=RAM_MB << 20, seconds=0.1))
    assert rc == 2 and "past the end" in out, out
    assert "stopped:" not in ctl.log()
