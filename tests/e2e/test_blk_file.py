"""A file bdev, served asynchronously (issue 6, acceptance): a guest on
`vhost-user-blk-pci,num-queues=4` writes 256 MiB of a known pattern with
O_DIRECT and reads it back; the checksums match in the guest and in the
host-side file; a discard is seen in the file as a hole that reads zeros,
and a write-zeroes (the guest's BLKZEROOUT, /bin/vfe-zeroout) as zeros in
the file, counted by the daemon as a WRITE_ZEROES request.

The pattern: 16 MiB of random data, written 16 times, each copy rotated by
its index in MiB, so a block written to the wrong place changes the sum."""
from __future__ import annotations

import hashlib
import os
import time

import pytest

from vfe.guest.vm import BlkDev

pytestmark = pytest.mark.e2e
CHUNK_MB = 16
CHUNKS = 16
MB = CHUNK_MB * CHUNKS            # 256


@pytest.mark.parametrize("direct", ["off", "on"])
def test_file_bdev_256m_pattern_and_discard(controller, vm_factory, sockdir, tmp_path, direct):
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate((MB + 16) << 20)
    sock = os.path.join(sockdir, "blk.sock")
    ctl = controller([f"blk,socket={sock},bdev=file,path={img},size={MB + 16},queues=4,"
                      f"direct={direct}"], workers=2)
    vm = vm_factory("f", smp=4, memory_mb=384, blks=[BlkDev(sock, num_queues=4)])
    vm.wait_booted(90)
    rc, size = vm.run("cat /sys/block/vda/size")
    assert rc == 0 and int(size) == (MB + 16) << 11
    rc, out = vm.run(f"vfe-mkdata /tmp/pat {CHUNK_MB * 1024}", timeout=300)
    assert rc == 0, out
    t0 = time.monotonic()
    rc, out = vm.run(
        f"for i in $(seq 0 {CHUNKS - 1}); do "
        f"dd if=/tmp/pat of=/tmp/c bs=1M skip=$i 2>/dev/null && "
        f"dd if=/tmp/pat bs=1M count=$i 2>/dev/null >> /tmp/c && "
        f"dd if=/tmp/c of=/dev/vda bs=1M seek=$((i * {CHUNK_MB})) oflag=direct 2>/dev/null "
        f"|| exit 1; done; rm -f /tmp/c; sync", timeout=900)
    assert rc == 0, out
    t_write = time.monotonic() - t0
    rc, back = vm.run(f"dd if=/dev/vda bs=1M count={MB} iflag=direct 2>/dev/null | md5sum",
                      timeout=900)
    t_read = time.monotonic() - t0 - t_write
    assert rc == 0, back
    # what should be there, from the pattern file (not the disk)
    rc, want = vm.run(f"for i in $(seq 0 {CHUNKS - 1}); do "
                      f"dd if=/tmp/pat bs=1M skip=$i 2>/dev/null; "
                      f"dd if=/tmp/pat bs=1M count=$i 2>/dev/null; done | md5sum", timeout=900)
    assert rc == 0, want
    want = want.split()[0]
    assert back.split()[0] == want
    with open(img, "rb") as f:                 # the host file, read behind the daemon's back
        host = f.read(MB << 20)
    assert hashlib.md5(host).hexdigest() == want
    print(f"direct={direct}: {MB} MiB written with O_DIRECT in {t_write:.1f} s, "
          f"read back in {t_read:.1f} s")

    # a 1 MiB discard inside the pattern: a hole in the file, zeros in it
    rc, out = vm.run("blkdiscard -o 1048576 -l 1048576 /dev/vda && sync", timeout=60)
    assert rc == 0, out
    fd = os.open(img, os.O_RDONLY)
    try:
        assert os.lseek(fd, 1 << 20, os.SEEK_HOLE) == 1 << 20
        assert os.lseek(fd, 1 << 20, os.SEEK_DATA) == 2 << 20
        data = os.pread(fd, MB << 20, 0)
    finally:
        os.close(fd)
    assert data[1 << 20:2 << 20] == bytes(1 << 20)
    assert data[:1 << 20] == host[:1 << 20] and data[2 << 20:] == host[2 << 20:]
    rc, z = vm.run("dd if=/dev/vda bs=1M skip=1 count=1 iflag=direct 2>/dev/null | md5sum")
    assert z.split()[0] == hashlib.md5(bytes(1 << 20)).hexdigest()
    # write-zeroes over 2 MiB further in: zeros in the file, the rest intact
    zoff = 8 << 20
    rc, out = vm.run(f"vfe-zeroout /dev/vda {zoff} {2 << 20} && sync", timeout=60)
    assert rc == 0, out
    with open(img, "rb") as f:
        after = f.read(MB << 20)
    assert after[zoff:zoff + (2 << 20)] == bytes(2 << 20)
    assert after[zoff + (2 << 20):] == data[zoff + (2 << 20):] and after[:zoff] == data[:zoff]
    log = ctl.log()
    assert "stopped:" not in log and "Traceback" not in log
    vm.shutdown()
    ctl.wait_for_log("blk0: front-end disconnected")
    summary = ctl.log().split("blk0: front-end disconnected")[1].splitlines()[0]
    assert " 0 I/O errors" in summary and " 0 failed" in summary, summary
    # the zeroing reached us as WRITE_ZEROES, not as writes of zero pages
    assert int(summary.split(" write-zeroes")[0].rsplit(" ", 1)[1]) >= 1, summary
    direct_ios = int(summary.split(" with O_DIRECT")[0].rsplit(" ", 1)[1])
    # the guest's O_DIRECT buffers are sector-aligned: all of its data went direct
    assert (direct_ios >= MB) if direct == "on" else (direct_ios == 0), summary
