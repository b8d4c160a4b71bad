"""Live migration of a guest on a vhost-user NIC served by the daemon: the
destination QEMU connects to a second socket of the same device
(`incoming=`), dirty logging covers every page the engine writes, and the
rings resume at the exact indexes.  A TCP stream to a peer guest runs and
the peer pings the migrating guest at 10 Hz; five round trips in a row."""
from __future__ import annotations

import os
import re
import socket
import time

import pytest

from vfe.guest.vm import VM, BgJob, NetDev

pytestmark = pytest.mark.e2e

MAC_M, MAC_P = "52:54:00:0e:00:01", "52:54:00:0e:00:02"
ROUND_TRIPS = 5
# The stream is paced, a MiB every PACE_S, so that it is still flowing when
# the migrations start: on a quiet machine two TCG guests move 16 MiB in
# well under a second, before any migration could begin.
PACE_S = 0.75


def paced_send(dest_ip: str, megabytes: int, port: int = 5001) -> str:
    """A guest shell line sending /tmp/data to dest_ip:port a MiB at a time;
    it connects after 1 s, when the receiver started just before listens."""
    return (f"sleep 1; i=0; while [ $i -lt {megabytes} ]; do "
            f"dd if=/tmp/data bs=1048576 skip=$i count=1 2>/dev/null; sleep {PACE_S}; i=$((i + 1)); "
            f"done | nc {dest_ip} {port}")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def migrate(src: VM, dst: VM, port: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + 30
    while dst.qmp_command("query-status")["status"] != "inmigrate":   # listening for the stream
        assert time.monotonic() < deadline, "destination QEMU never got ready"
        time.sleep(0.05)
    src.qmp_command("migrate-set-parameters", **{"max-bandwidth": 4 << 30, "downtime-limit": 300})
    src.qmp_command("migrate", uri=f"tcp:127.0.0.1:{port}")
    deadline = time.monotonic() + timeout
    while True:
        info = src.qmp_command("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            break
        assert time.monotonic() < deadline, f"migration still {info.get('status')}"
        time.sleep(0.05)
    assert info["status"] == "completed", info
    return info


def test_live_migration_round_trips_with_tcp_and_pings(controller, vm_factory, guest_image, sockdir, tmp_path):
    sa, sa2, sp = (os.path.join(sockdir, n) for n in ("m.sock", "m-in.sock", "p.sock"))
    ctl = controller([f"net,socket={sa},incoming={sa2}", f"net,socket={sp}"])
    peer = vm_factory("peer", nics=[NetDev(sp, mac=MAC_P)])
    cur = vm_factory("m0", qmp=True, nics=[NetDev(sa, mac=MAC_M)])
    peer.wait_booted(90)
    cur.wait_booted(90)
    assert peer.run("vfe-netup eth0 10.0.0.2/24", timeout=30)[0] == 0
    assert cur.run("vfe-netup eth0 10.0.0.1/24", timeout=30)[0] == 0
    rc, out = peer.run("ping -c 2 -W 3 10.0.0.1", timeout=20)
    assert rc == 0, out

    mb = 16
    rc, data_sum = cur.run(f"vfe-mkdata /tmp/data {mb * 1024}", timeout=300)
    recv = peer.run_bg("vfe-recv 5001 /tmp/got")
    send = cur.run_bg(paced_send("10.0.0.2", mb))
    pings = peer.run_bg("ping -i 0.1 -w 300 10.0.0.1")
    time.sleep(2.5)
    assert send.running(), "the stream ended before the migrations"

    sockets = [sa, sa2]
    downtimes = []
    for i in range(2 * ROUND_TRIPS):
        port = free_port()
        dst_sock = sockets[(i + 1) % 2]
        dst = VM(f"m{i + 1}", tmp_path, image=guest_image, qmp=True, incoming=f"tcp:127.0.0.1:{port}",
                 nics=[NetDev(dst_sock, mac=MAC_M)])
        try:
            dst.start()
            info = migrate(cur, dst, port)
        except BaseException:
            dst.shutdown()
            raise
        downtimes.append(info.get("downtime", -1))
        cur.shutdown()
        cur = dst
        # the background sender now lives in the destination
        send = BgJob(cur, send.id, send.pid, send.cmd)
    assert send.wait(timeout=600) == 0, send.output()
    assert recv.wait(timeout=120) == 0
    got = recv.output().split()
    # replies so far: every sequence number up to the last one answered
    # was sent, so the gaps are the lost pings
    seqs = [int(x) for x in re.findall(r"seq=(\d+)", pings.output())]
    assert seqs, pings.output()
    sent, received = max(seqs) + 1, len(set(seqs))
    lost = sent - received
    pings.kill()
    print(f"\nmigrations: {len(downtimes)}, QEMU downtime ms: {downtimes}, "
          f"pings at 10 Hz: {sent} sent, {lost} lost")
    with open(os.environ.get("VFE_MIGRATION_REPORT", os.devnull), "a") as f:
        f.write(f"downtimes_ms={downtimes} pings_sent={sent} pings_lost={lost}\n")
    assert got == [data_sum.strip(), str(mb << 20)]
    cur.shutdown()
    assert "stopped:" not in ctl.log()


def test_blk_disk_written_during_migration_reads_back_intact(controller, vm_factory, guest_image,
                                                              sockdir, tmp_path):
    """A guest writes a pattern to a vhost-user-blk disk (malloc bdev in the
    daemon) while it migrates, there and back; afterwards the whole pattern
    reads back intact: no request lost or done twice at the switch-over."""
    sb, sb2 = os.path.join(sockdir, "d.sock"), os.path.join(sockdir, "d-in.sock")
    ctl = controller([f"blk,socket={sb},incoming={sb2},bdev=malloc,size=64,queues=2"])
    from vfe.guest.vm import BlkDev
    cur = vm_factory("b0", qmp=True, smp=2, blks=[BlkDev(sb, num_queues=2)])
    cur.wait_booted(90)
    mb = 32
    rc, pat_sum = cur.run(f"vfe-mkdata /tmp/pat {mb * 1024}", timeout=300)
    assert rc == 0, pat_sum
    writer = cur.run_bg(f"dd if=/tmp/pat of=/dev/vda bs=64k oflag=direct && sync")
    sockets = [sb, sb2]
    assert writer.running(), "the write loop ended before the migration started"
    for i in range(2):
        port = free_port()
        dst = VM(f"b{i + 1}", tmp_path, image=guest_image, qmp=True, smp=2,
                 incoming=f"tcp:127.0.0.1:{port}", blks=[BlkDev(sockets[(i + 1) % 2], num_queues=2)])
        try:
            dst.start()
            migrate(cur, dst, port)
        except BaseException:
            dst.shutdown()
            raise
        cur.shutdown()
        cur = dst
        writer = BgJob(cur, writer.id, writer.pid, writer.cmd)
    assert writer.wait(timeout=600) == 0, writer.output()
    rc, disk_sum = cur.run(f"dd if=/dev/vda bs=1M count={mb} iflag=direct 2>/dev/null | md5sum", timeout=300)
    assert rc == 0 and disk_sum.split()[0] == pat_sum.strip(), (disk_sum, pat_sum)
    cur.shutdown()
    assert "stopped:" not in ctl.log()
