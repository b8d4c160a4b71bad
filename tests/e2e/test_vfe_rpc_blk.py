"""The seed's VFE vDPA blk commands against the controller in service mode:

    spdk_rpc.py bdev_null_create Null0 1024 512
    snap_rpc.py controller_virtio_blk_create mlx5_0 --pf_id 0 --bdev_type spdk --bdev Null0 \\
                --num_queues 1 --admin_q

(as `vfe-rpc ...`), then a QEMU guest with vhost-user-blk-pci on the
function's socket sees a 1 GiB disk of 512-byte blocks reading zeros; the
bdev in use cannot be deleted; the controller is deleted, then the bdev."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile

import pytest

from tests.harness.netns import NetNs
from tests.harness.service import BLK_PF_NV, ControllerService
from vfe.guest.vm import BlkDev

pytestmark = pytest.mark.e2e

WIRE = ("the controller does not serve the bdev/blk methods: service.build() must register "
        "the blk kind (vfe.controller.blk_kind.BlkKind) with the inventory")


@pytest.fixture
def short_root():
    d = tempfile.mkdtemp(prefix="vfe-b-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def vfe_rpc(svc: ControllerService, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vfe.cli.vfe_rpc", *args], env=svc.env(),
                          capture_output=True, text=True, timeout=60)


def ok(svc, *args):
    r = vfe_rpc(svc, *args)
    assert r.returncode == 0, f"vfe-rpc {' '.join(args)}: {r.stderr}{r.stdout}"
    return json.loads(r.stdout) if r.stdout.strip() else None


def error(svc, *args) -> dict:
    r = vfe_rpc(svc, *args)
    assert r.returncode == 1 and r.stdout == "", f"vfe-rpc {' '.join(args)}: {r.stderr}{r.stdout}"
    return json.loads(r.stderr.split("response:\n", 1)[1])


def run(vm, cmd, timeout=60):
    rc, out = vm.run(cmd, timeout=timeout)
    assert rc == 0, f"{cmd}: {out}"
    return out.strip()


def test_seed_blk_commands_guest_reads_zeros(short_root, vm_factory):
    with NetNs() as ns:
        svc = ControllerService(short_root, ns)
        try:
            svc.mlxconfig("s", *BLK_PF_NV)
            svc.start()
            r = vfe_rpc(svc, "bdev_get_bdevs")
            assert '"code": -32601' not in r.stderr, WIRE        # the verbs must be served
            assert r.returncode == 0 and json.loads(r.stdout) == [], r.stderr

            # the seed's two commands
            assert ok(svc, "bdev_null_create", "Null0", "1024", "512") == "Null0"
            made = ok(svc, "controller_virtio_blk_create", "mlx5_0", "--pf_id", "0", "--bdev_type", "spdk",
                      "--bdev", "Null0", "--num_queues", "1", "--admin_q")
            assert made["vuid"] == "VBLKS0D0F2" and made["pci_bdf"] == "a0:00.0", made
            assert made["socket"] == svc.socket("VBLKS0D0F2")
            listed = ok(svc, "controller_list")
            assert [(c["name"], c["vuid"], c["bdev"], c["num_queues"], c["admin_q"]) for c in listed] == \
                [(made["name"], "VBLKS0D0F2", "Null0", 1, True)]
            assert ok(svc, "bdev_get_bdevs", "-b", "Null0")[0]["claimed"] is True

            vm = vm_factory("blk", smp=1, memory_mb=256, blks=[BlkDev(made["socket"], num_queues=1)])
            vm.wait_booted(120)
            assert run(vm, "cat /sys/block/vda/size") == str(1024 * 2048)      # 1 GiB of sectors
            assert run(vm, "cat /sys/block/vda/queue/logical_block_size") == "512"
            assert run(vm, "ls /sys/block/vda/mq") == "0"                       # --num_queues 1
            zeros = run(vm, "dd if=/dev/zero bs=1M count=4 2>/dev/null | md5sum").split()[0]
            assert run(vm, "dd if=/dev/vda bs=1M count=4 iflag=direct 2>/dev/null | md5sum").split()[0] == zeros
            assert run(vm, "dd if=/dev/vda bs=1M skip=1020 count=4 iflag=direct 2>/dev/null | md5sum"
                       ).split()[0] == zeros
            assert ok(svc, "controller_list", "-c", "VBLKS0D0F2")[0]["bound"] is True

            # in use: neither the bdev nor (without --force) the bound controller goes
            e = error(svc, "bdev_null_delete", "Null0")
            assert e["code"] == -16 and f"in use by controller {made['name']}" in e["message"], e
            e = error(svc, "controller_virtio_blk_delete", made["name"])
            assert e["code"] == -16 and "guest" in e["message"], e

            vm.shutdown()
            svc.wait_for_log("VBLKS0D0F2: front-end disconnected")
            assert ok(svc, "controller_virtio_blk_delete", made["name"]) is None
            assert ok(svc, "controller_list") == []
            assert ok(svc, "bdev_null_delete", "Null0") is None
            assert ok(svc, "bdev_get_bdevs") == []
            assert "Traceback" not in svc.log()
        finally:
            svc.stop()
