"""VFE vDPA for virtio-blk: the seed's commands ("Configure VFE vDPA",
"Create a block device on the DPU", "Run VFE vDPA", "Provision the
virtio-blk PF") run as printed, with only the substitutions substitutions() lists:

    mlxconfig -d /dev/mst/mt41686_pciconf0 s ... VIRTIO_BLK_EMULATION_ENABLE=1 ...
    spdk_rpc.py bdev_null_create Null0 1024 512
    snap_rpc.py controller_virtio_blk_create --pf_id 0 --bdev_type spdk mlx5_0 --bdev Null0 --num_queues 1 --admin_q
    sudo ./build/app/dpdk-vfe-vdpa -a 0000:00:00.0 --log-level=.,8 --vfio-vf-token=... -- --client
    python ./app/vfe-vdpa/vhostmgmt mgmtpf -a 0000:af:00.3
    snap_rpc.py controller_virtio_blk_create mlx5_0 --pf_id 0 --vf_id 0 --bdev_type spdk --bdev Null0 --force_in_order
    python ./app/vfe-vdpa/vhostmgmt vf -a 0000:af:05.1 -v /tmp/vfe-blk0

then the VM with the seed's vhost-user-blk-pci arguments (server=on,
num-queues=4) on the VF's socket through vfe-vhostd, and -- so that the
guest reads and writes both of Null0's functions -- the PF's disk on the
controller's own socket.  One guest boot, small I/O:

- the PF (1 queue, --num_queues 1) and the VF (its default --num_queues is
  what the firmware's MSI-X allows, 63; QEMU takes its num-queues=4 of
  them, and the guest's two vCPUs use 2) are both 1 GiB on Null0: written,
  read back as zeros;
- two more VFs (not in the seed) share Malloc0: what the guest writes on one
  it reads back on the other;
- no blk PF 1 (VIRTIO_BLK_EMULATION_NUM_PF=1): refused by vfe-rpc, naming it;
- a VF made with --num_queues 1 and a QEMU asking num-queues=4: QEMU stops
  ("The maximum number of queues supported by the backend is 1"), and the
  controller's log says to re-create it with --num_queues;
- a controller crash (SIGKILL, restart, blk recovery) is ridden out by
  vfe-vhostd; `vf -r` disconnects the VF.
"""
from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from tests.e2e.test_vfe_rpc_blk import error, ok, run
from tests.e2e.test_vfe_vdpa import Vhostd, short_root  # noqa: F401 (fixture)
from tests.harness.netns import NetNs
from tests.harness.service import ControllerService
from vfe.guest.vm import BlkDev

pytestmark = pytest.mark.e2e

BLK_PF_BDF, BLK_VF_BDF = "0000:a0:00.0", "0000:b0:00.0"

# The seed's lines, verbatim (its "Configure VFE vDPA" mlxconfig line joined)
SEED_MLXCONFIG = ("mlxconfig -d /dev/mst/mt41686_pciconf0 s VIRTIO_NET_EMULATION_ENABLE=1 "
                  "VIRTIO_NET_EMULATION_NUM_PF=1 VIRTIO_NET_EMULATION_NUM_VF=16 VIRTIO_BLK_EMULATION_ENABLE=1 "
                  "VIRTIO_BLK_EMULATION_NUM_PF=1 VIRTIO_BLK_EMULATION_NUM_VF=16 VIRTIO_NET_EMULATION_NUM_MSIX=64 "
                  "VIRTIO_BLK_EMULATION_NUM_MSIX=64 NUM_VF_MSIX=64")
SEED_CREATE = [
    "spdk_rpc.py bdev_null_create Null0 1024 512",
    "snap_rpc.py controller_virtio_blk_create --pf_id 0 --bdev_type spdk mlx5_0 --bdev Null0 --num_queues 1 --admin_q",
]
SEED_VDPA = "sudo ./build/app/dpdk-vfe-vdpa -a 0000:00:00.0 --log-level=.,8 " \
            "--vfio-vf-token=cdc786f0-59d4-41d9-b554-fed36ff5e89f -- --client"
SEED_PROVISION = [
    "python ./app/vfe-vdpa/vhostmgmt mgmtpf -a 0000:af:00.3",
    "snap_rpc.py controller_virtio_blk_create mlx5_0 --pf_id 0 --vf_id 0 --bdev_type spdk --bdev Null0 "
    "--force_in_order",
    "python ./app/vfe-vdpa/vhostmgmt vf -a 0000:af:05.1 -v /tmp/vfe-blk0",
]
SEED_QEMU = ["-chardev", "socket,id=char1,path=/tmp/vfe-blk0,server=on",
             "-device", "vhost-user-blk-pci,chardev=char1,page-per-vq=on,num-queues=4,disable-legacy=on,"
                        "disable-modern=off"]


def substitutions(sock: str) -> dict[str, str]:
    """What differs here, and why: the programs are vfe's (run as root
    already), the BDFs are the emulated DPU's blk PF 0 and its VF 0
    (docs/virtio-blk.md), the socket is in the test's directory (not
    /tmp, shared by parallel tests); vfe-mlxconfig also needs SRIOV_EN=1
    (SR-IOV is on in the seed's firmware) and -y (no prompt)."""
    return {"sudo ": "", "spdk_rpc.py ": "vfe-rpc ", "snap_rpc.py ": "vfe-rpc ",
            "./build/app/dpdk-vfe-vdpa ": "vfe-vhostd ", "python ./app/vfe-vdpa/vhostmgmt ": "vhostmgmt ",
            "mlxconfig -d /dev/mst/mt41686_pciconf0 s ": "vfe-mlxconfig -d /dev/mst/mt41686_pciconf0 -y s SRIOV_EN=1 ",
            "0000:af:00.3": BLK_PF_BDF, "0000:af:05.1": BLK_VF_BDF, "/tmp/vfe-blk0": sock}


PROGRAMS = {"vfe-rpc": "vfe.cli.vfe_rpc", "vhostmgmt": "vfe.cli.vhostmgmt", "vfe-mlxconfig": "vfe.cli.mlxconfig"}


def here(line: str, subst: dict[str, str]) -> list[str]:
    for seed, ours in subst.items():
        line = line.replace(seed, ours)
    return shlex.split(line)


def run_seed(svc: ControllerService, line: str, subst: dict[str, str]) -> str:
    argv = here(line, subst)
    r = subprocess.run([sys.executable, "-m", PROGRAMS[argv[0]], *argv[1:]], env=svc.env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{line}\n -> {argv}\n{r.stderr}{r.stdout}"
    if argv[0] == "vhostmgmt":                   # its errors are results, exit status 0
        assert '"errno": 0' in r.stdout, f"{line}\n -> {argv}\n{r.stdout}"
    return r.stdout


def guest_disks(vm) -> dict[str, tuple[str, int, int]]:
    """The guest's virtio disks: name -> (serial, 512-byte sectors, blk-mq queues)."""
    out = run(vm, "for d in /sys/block/vd*; do echo ${d##*/} $(cat $d/serial) $(cat $d/size) "
                  "$(ls $d/mq | wc -l); done")
    return {n: (serial, int(size), int(nq)) for n, serial, size, nq in (ln.split() for ln in out.splitlines())}


def too_many_queues(socket: str) -> subprocess.CompletedProcess:
    """QEMU with the seed's -device (num-queues=4) on ``socket``, stopped
    before the guest runs (-S): it fails while realizing the device."""
    return subprocess.run(
        ["qemu-system-x86_64", "-M", "q35", "-display", "none", "-nodefaults", "-S", "-m", "64",
         "-object", "memory-backend-memfd,id=mem,size=64M,share=on", "-numa", "node,memdev=mem",
         "-chardev", f"socket,id=char1,path={socket}",
         "-device", "vhost-user-blk-pci,chardev=char1,page-per-vq=on,num-queues=4,disable-legacy=on,"
                    "disable-modern=off"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


def test_seed_vfe_vdpa_blk_flow(short_root, vm_factory):  # noqa: F811
    with NetNs() as ns:
        svc = ControllerService(short_root / "root", ns)
        sock = str(short_root / "vfe-blk0")
        subst = substitutions(sock)
        vdpa = here(SEED_VDPA, subst)
        assert vdpa[0] == "vfe-vhostd"
        vhostd = Vhostd(svc, short_root, client=False, extra=tuple(vdpa[1:]))
        try:
            run_seed(svc, SEED_MLXCONFIG, subst)
            svc.start()
            assert [run_seed(svc, line, subst) for line in SEED_CREATE][0].strip() == '"Null0"'
            vhostd.start()
            assert "set up): -a --log-level --vfio-vf-token; --log-level: logging at" in vhostd.log()
            for line in SEED_PROVISION:
                run_seed(svc, line, subst)
            listed = {c["name"]: c for c in ok(svc, "controller_list")}
            assert [(n, c["bdev"], c["num_queues"], c["admin_q"], c["force_in_order"])
                    for n, c in sorted(listed.items())] == [
                ("VblkEmu0pf0", "Null0", 1, True, False), ("VblkEmu0pf0vf0", "Null0", 63, False, True)]
            assert ok(svc, "bdev_get_bdevs", "-b", "Null0")[0]["claimed_by"] == ["VblkEmu0pf0", "VblkEmu0pf0vf0"]

            # not in the seed: two more VFs sharing a RAM disk, for a data check
            assert ok(svc, "bdev_malloc_create", "-b", "Malloc0", "64", "512") == "Malloc0"
            shared = [ok(svc, "controller_virtio_blk_create", "mlx5_0", "--pf_id", "0", "--vf_id", str(v),
                         "--bdev_type", "spdk", "--bdev", "Malloc0", "--num_queues", "1")["socket"]
                      for v in (1, 2)]

            # "Start VM": QEMU waits (server=on) until vfe-vhostd connects
            # two vCPUs: Linux's virtio_blk uses at most one queue per CPU
            vm = vm_factory("vdpablk", smp=2, memory_mb=256, extra_args=SEED_QEMU[:1] + [
                                SEED_QEMU[1].replace("/tmp/vfe-blk0", sock)] + SEED_QEMU[2:],
                            blks=[BlkDev(svc.socket("VBLKS0D0F2"), num_queues=1)]
                            + [BlkDev(s, num_queues=1) for s in shared])
            vm.wait_booted(120)
            assert "VBLKS0D0F2VF1: front-end relayed by vfe-vhostd" in svc.log()
            disks = guest_disks(vm)
            gib, malloc = 1024 * 2048, 64 * 2048
            assert sorted(disks.values()) == [("Malloc0", malloc, 1)] * 2 + [("Null0", gib, 1), ("Null0", gib, 2)]

            # every disk written (small, O_DIRECT), then read: Null0's read zeros, Malloc0's
            # two read what was written last through either of them
            names = sorted(disks)
            for n in names:
                run(vm, f"printf '%-4096s' mark-{n} | dd of=/dev/{n} bs=4096 count=1 seek=2 oflag=direct "
                        f"conv=notrunc 2>/dev/null")
            on_malloc = [n for n in names if disks[n][0] == "Malloc0"]
            for n in names:
                got = run(vm, f"dd if=/dev/{n} bs=4096 count=1 skip=2 iflag=direct 2>/dev/null | tr -d ' \\000'")
                assert got == (f"mark-{on_malloc[-1]}" if n in on_malloc else ""), (n, got)
            zeros = run(vm, "dd if=/dev/zero bs=1M count=1 2>/dev/null | md5sum").split()[0]
            for n in names:
                if disks[n][0] == "Null0":
                    assert run(vm, f"dd if=/dev/{n} bs=1M count=1 skip=1000 iflag=direct 2>/dev/null | md5sum"
                               ).split()[0] == zeros

            info = vhostd.mgmt_result("vf", "-i", BLK_VF_BDF)["device"]
            assert (info["vf"], info["socket_file"], info["configured"]) == (BLK_VF_BDF, sock, True)
            assert info["device_feature"]["   12"] == "VIRTIO_BLK_F_MQ"

            # the firmware has one blk PF (VIRTIO_BLK_EMULATION_NUM_PF=1): no pf_id 1, for
            # vfe-rpc nor (it does not exist) for vhostmgmt
            e = error(svc, "controller_virtio_blk_create", "mlx5_0", "--pf_id", "1", "--bdev_type", "spdk",
                      "--bdev", "Null0")
            assert e["code"] == -19 and "VIRTIO_BLK_EMULATION_NUM_PF=1" in e["message"], e
            assert vhostd.mgmt_result("mgmtpf", "-a", "0000:a1:00.0") == {"errno": -19, "errstr": "No such device"}

            # a VF whose --num_queues is smaller than QEMU's num-queues
            small = ok(svc, "controller_virtio_blk_create", "mlx5_0", "--pf_id", "0", "--vf_id", "3",
                       "--bdev_type", "spdk", "--bdev", "Null0", "--num_queues", "1")
            q = too_many_queues(small["socket"])
            assert q.returncode != 0 and "The maximum number of queues supported by the backend is 1" in q.stderr, q
            svc.wait_for_log("VBLKS0D0F2VF4: the front-end closed the connection right after GET_QUEUE_NUM "
                             "answered 1: QEMU does that when its num-queues is larger; controller "
                             "VblkEmu0pf0vf3 was created with --num_queues 1; delete it and create it again "
                             "with --num_queues N")

            # the controller crashes and recovers the blk functions: vfe-vhostd
            # reconnects both sides by itself, the guest's I/O goes on
            svc.kill()
            svc.start()
            svc.wait_for_log("VBLKS0D0F2VF1: front-end relayed by vfe-vhostd", count=2, timeout=30)
            vf_disk = next(n for n in names if disks[n][2] == 2)
            assert run(vm, f"dd if=/dev/{vf_disk} bs=1M skip=8 count=1 iflag=direct 2>/dev/null | md5sum",
                       timeout=60).split()[0] == zeros
            assert vhostd.mgmt_result("vf", "-i", BLK_VF_BDF)["device"]["configured"] is True

            before = svc.log().count("VBLKS0D0F2VF1: front-end disconnected")
            assert vhostd.mgmt_result("vf", "-r", BLK_VF_BDF)["errno"] == 0
            svc.wait_for_log("VBLKS0D0F2VF1: front-end disconnected", count=before + 1)
            assert vhostd.mgmt_result("mgmtpf", "-r", BLK_PF_BDF)["errno"] == 0
            assert "Traceback" not in svc.log() + vhostd.log()
        finally:
            vhostd.stop()
            svc.stop()
