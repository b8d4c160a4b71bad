"""Blk functions in the controller service survive a controller crash
(issue 6, controller side): a file bdev and a virtio-blk controller made
with vfe-rpc, a Linux guest on `vhost-user-blk-pci` whose chardev has
`reconnect=1`, a pattern written with O_DIRECT; the controller is SIGKILLed
and restarted; `virtnet list` shows the blk function with the same VUID,
BDF and socket, QEMU reconnects and the guest reads its pattern back and
goes on writing.  Then a corrupt blk recovery file: the controller refuses
to start with a message naming it, no recovery file is changed, and once
the file is fixed everything comes back."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.harness.netns import NetNs
from tests.harness.service import BLK_PF_NV, ControllerService
from vfe.guest.vm import BlkDev

pytestmark = pytest.mark.e2e

VUID, BDF = "VBLKS0D0F2", "a0:00.0"
KB = 1024                           # the pattern: 1 MiB at offset 0, then another at 2 MiB


@pytest.fixture
def short_root():
    d = tempfile.mkdtemp(prefix="vfe-br-", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def vfe_rpc(svc: ControllerService, *args: str):
    r = subprocess.run([sys.executable, "-m", "vfe.cli.vfe_rpc", *args], env=svc.env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"vfe-rpc {' '.join(args)}: {r.stderr}{r.stdout}"
    return json.loads(r.stdout) if r.stdout.strip() else None


def blk_entries(svc: ControllerService) -> list[dict]:
    return [d for d in svc.virtnet_json("list")["devices"] if d.get("type") == "virtio_blk"]


def run(vm, cmd: str, timeout: float = 60) -> str:
    rc, out = vm.run(cmd, timeout=timeout)
    assert rc == 0, f"{cmd}: {out}"
    return out.strip()


def host_md5(img: Path, offset_mb: int) -> str:
    with open(img, "rb") as f:
        f.seek(offset_mb << 20)
        return hashlib.md5(f.read(KB * 1024)).hexdigest()


def blk_files(svc: ControllerService) -> dict[str, bytes]:
    return {str(p.relative_to(svc.recovery_dir)): p.read_bytes()
            for p in sorted(svc.recovery_dir.rglob("*.json"))}


def make_disk(svc: ControllerService, img: Path) -> dict:
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    assert vfe_rpc(svc, "bdev_aio_create", str(img), "Aio0") == "Aio0"
    made = vfe_rpc(svc, "controller_virtio_blk_create", "mlx5_0", "--pf_id", "0", "--bdev_type", "spdk",
                   "--bdev", "Aio0", "--num_queues", "1")
    assert (made["vuid"], made["pci_bdf"], made["socket"]) == (VUID, BDF, svc.socket(VUID)), made
    return made


def test_blk_function_survives_controller_sigkill_and_guest_reads_its_data(short_root, vm_factory):
    with NetNs() as ns:
        svc = ControllerService(short_root / "root", ns)
        try:
            svc.mlxconfig("s", *BLK_PF_NV)
            svc.start()
            img = short_root / "disk.img"
            made = make_disk(svc, img)
            [entry] = blk_entries(svc)
            assert (entry["vuid"], entry["bdf"], entry["blk_bdev"], entry["blk_bdev_type"]) == \
                (VUID, BDF, "Aio0", "aio")

            vm = vm_factory("blkrec", smp=1, memory_mb=256,
                            blks=[BlkDev(made["socket"], num_queues=1, reconnect=1)])
            vm.wait_booted(120)
            assert run(vm, "cat /sys/block/vda/size") == str(16 << 11)
            pat = run(vm, f"vfe-mkdata /tmp/pat {KB}", timeout=120)
            run(vm, "dd if=/tmp/pat of=/dev/vda bs=64k oflag=direct 2>&1 && sync")
            assert run(vm, f"dd if=/dev/vda bs=64k count=16 iflag=direct 2>/dev/null | md5sum").split()[0] == pat
            assert host_md5(img, 0) == pat
            svc.wait_for_log(f"{VUID}: front-end connected")

            # the crash: no shutdown, no cleanup; the recovery files are all there is
            svc.kill()
            svc.start()
            assert blk_entries(svc) == [entry]                         # same VUID, BDF, bdev, fields
            q = svc.virtnet_json("query", "-u", VUID, "-b")["devices"][0]
            assert q["socket"] == made["socket"]
            svc.wait_for_log(f"{VUID}: front-end connected", timeout=30, count=2)   # QEMU reconnect=1

            # the guest's disk is back: its data, read from the device, and new writes
            assert run(vm, "dd if=/dev/vda bs=64k count=16 iflag=direct 2>/dev/null | md5sum",
                       timeout=60).split()[0] == pat
            pat2 = run(vm, f"vfe-mkdata /tmp/pat2 {KB}", timeout=120)
            run(vm, "dd if=/tmp/pat2 of=/dev/vda bs=64k seek=32 oflag=direct 2>&1 && sync")
            assert host_md5(img, 2) == pat2 and host_md5(img, 0) == pat
            assert svc.virtnet_json("query", "-u", VUID, "-b")["devices"][0]["status"] == "running"
            log = svc.log()
            assert "Traceback" not in log and "stopped:" not in log
        finally:
            svc.stop()


def test_corrupt_blk_recovery_file_refuses_start_and_loses_nothing(short_root):
    with NetNs() as ns:
        svc = ControllerService(short_root / "root", ns)
        try:
            svc.mlxconfig("s", *BLK_PF_NV)
            svc.start()
            make_disk(svc, short_root / "disk.img")
            vfe_rpc(svc, "bdev_null_create", "Null0", "64", "512")
            listed = svc.virtnet_json("list")["devices"]
            svc.kill()
            files = blk_files(svc)
            assert {"blk/bdevs/Aio0.json", "blk/bdevs/Null0.json", f"blk/controllers/{VUID}.json",
                    "VNETS0D0F2.json"} <= set(files)

            ctrl = svc.recovery_dir / "blk" / "controllers" / f"{VUID}.json"
            good = ctrl.read_text()
            ctrl.write_text(good.replace('"queue_size": 128', '"queue_size": 100'))
            broken = blk_files(svc)
            svc.start(wait=False)
            rc = svc.proc.wait(30)
            svc.proc = None
            log = svc.log().split(f"--- start {svc.starts}\n")[-1]
            assert rc != 0, log
            assert f"recovery file blk/controllers/{VUID}.json is invalid (queue_size: 100 is not a power " \
                   f"of 2); fix it, or delete it ({ctrl}) and restart" in log, log
            assert "Traceback" not in log
            assert blk_files(svc) == broken                           # nothing rewritten or deleted

            ctrl.write_text(good)
            svc.start(wait=False)
            svc.wait_for_log("serving", count=2)                       # start 2 refused to serve
            assert svc.virtnet_json("list")["devices"] == listed
            assert blk_files(svc) == files
        finally:
            svc.stop()
