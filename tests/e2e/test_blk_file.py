"""A file bdev (issue 6, acceptance 1, at a CI-sized 64 MiB): a guest on
`vhost-user-blk-pci,num-queues=4` writes a known pattern with O_DIRECT and
reads it back; the checksums match in the guest and in the host-side file;
a discard is seen in the file as zeros.  (busybox has no tool that issues
WRITE_ZEROES; tests/protocol/test_blk_protocol.py sends that request itself.)"""
from __future__ import annotations

import hashlib
import os

import pytest

from qemu.vm import BlkDev

pytestmark = pytest.mark.e2e
MB = 64


def test_file_bdev_pattern_discard_and_write_zeroes(controller, vm_factory, sockdir, tmp_path):
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate((MB + 16) << 20)
    sock = os.path.join(sockdir, "blk.sock")
    ctl = controller([f"blk,socket={sock},bdev=file,path={img},size={MB + 16},queues=4"])
    vm = vm_factory("f", smp=4, memory_mb=384, blks=[BlkDev(sock, num_queues=4)])
    vm.wait_booted(90)
    rc, size = vm.run("cat /sys/block/vda/size")
    assert rc == 0 and int(size) == (MB + 16) << 11
    rc, pat = vm.run(f"vfe-mkdata /tmp/pat {MB * 1024}", timeout=300)
    assert rc == 0, pat
    rc, out = vm.run(f"dd if=/tmp/pat of=/dev/vda bs=1M oflag=direct 2>&1 && sync", timeout=300)
    assert rc == 0, out
    rc, back = vm.run(f"dd if=/dev/vda bs=1M count={MB} iflag=direct 2>/dev/null | md5sum", timeout=300)
    assert rc == 0 and back.split()[0] == pat.strip()
    # FLUSH (sync above) reached the file: the host sees the same bytes
    with open(img, "rb") as f:
        assert hashlib.md5(f.read(MB << 20)).hexdigest() == pat.strip()

    # a 1 MiB discard inside the pattern
    rc, out = vm.run("blkdiscard -o 1048576 -l 1048576 /dev/vda && sync", timeout=60)
    assert rc == 0, out
    with open(img, "rb") as f:
        data = f.read(MB << 20)
    assert data[1 << 20:2 << 20] == bytes(1 << 20)          # discarded: reads back as zeros
    rc, rest = vm.run("dd if=/tmp/pat bs=1M skip=2 2>/dev/null | md5sum", timeout=120)
    assert hashlib.md5(data[2 << 20:]).hexdigest() == rest.split()[0]   # the rest is untouched
    assert "stopped:" not in ctl.log()
