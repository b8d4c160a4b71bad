"""VFE vDPA for virtio-blk (seed: "Provision the virtio-blk PF"): the blk
PF's and VF's controllers made with vfe-rpc on the emulated DPU, vfe-vhostd
--client on the host, QEMU with the seed's vhost-user-blk-pci arguments
(server=on), then

    vhostmgmt mgmtpf -a <blk PF BDF>
    vhostmgmt vf -a <blk VF BDF> -v /tmp/vfe-blk0

and the guest sees the VF's null disk (reading zeros) through the relay;
`vf -i` shows its virtio-blk features; a controller crash (SIGKILL, restart,
blk recovery) is ridden out by vfe-vhostd; `vf -r` disconnects it.

Difference from the seed's lines: the VF's controller is on its own bdev
(Null1), since a bdev serves one controller here, and has --num_queues 4 to
match QEMU's num-queues=4."""
from __future__ import annotations

import pytest

from tests.e2e.test_vfe_vdpa import Vhostd, short_root  # noqa: F401 (fixture)
from tests.e2e.test_vfe_rpc_blk import ok, run
from tests.harness.netns import NetNs
from tests.harness.service import ControllerService

pytestmark = pytest.mark.e2e

BLK_PF_BDF, BLK_VF_BDF = "0000:a0:00.0", "0000:b0:00.0"    # the seed's 0000:af:00.3 / 0000:af:05.1


def seed_blk_qemu_args(sock: str) -> list[str]:
    """The seed's <qemu:commandline> for the blk device (no option ROM here)."""
    return ["-chardev", f"socket,id=char1,path={sock},server=on",
            "-device", "vhost-user-blk-pci,chardev=char1,page-per-vq=on,num-queues=4,disable-legacy=on,"
                       "disable-modern=off,romfile="]


def test_seed_vfe_vdpa_blk_flow(short_root, vm_factory):  # noqa: F811
    with NetNs() as ns:
        svc = ControllerService(short_root / "root", ns)
        vhostd = Vhostd(svc, short_root)
        sock = str(short_root / "vfe-blk0")
        try:
            svc.start()
            # "Create a block device on the DPU", then the PF's and the VF's controllers
            assert ok(svc, "bdev_null_create", "Null0", "1024", "512") == "Null0"
            ok(svc, "controller_virtio_blk_create", "--pf_id", "0", "--bdev_type", "spdk", "mlx5_0",
               "--bdev", "Null0", "--num_queues", "1", "--admin_q")
            assert ok(svc, "bdev_null_create", "Null1", "64", "512") == "Null1"
            made = ok(svc, "controller_virtio_blk_create", "mlx5_0", "--pf_id", "0", "--vf_id", "0",
                      "--bdev_type", "spdk", "--bdev", "Null1", "--force_in_order", "--num_queues", "4")
            assert made["pci_bdf"] == BLK_VF_BDF[5:]

            vhostd.start()                                       # dpdk-vfe-vdpa ... -- --client
            vm = vm_factory("vdpablk", start=False, smp=1, memory_mb=256, extra_args=seed_blk_qemu_args(sock))
            vm.start()                                           # QEMU waits (server=on) for vfe-vhostd
            assert vhostd.mgmt_result("mgmtpf", "-a", BLK_PF_BDF) == {"errno": 0, "errstr": "Success"}
            assert vhostd.mgmt_result("vf", "-a", BLK_VF_BDF, "-v", sock) == {"errno": 0, "errstr": "Success"}
            vm.wait_booted(120)
            assert run(vm, "cat /sys/block/vda/size") == str(64 * 2048)
            zeros = run(vm, "dd if=/dev/zero bs=1M count=4 2>/dev/null | md5sum").split()[0]
            assert run(vm, "dd if=/dev/vda bs=1M count=4 iflag=direct 2>/dev/null | md5sum").split()[0] == zeros
            assert "VBLKS0D0F2VF1: front-end relayed by vfe-vhostd" in svc.log()

            info = vhostd.mgmt_result("vf", "-i", BLK_VF_BDF)["device"]
            assert (info["vf"], info["socket_file"], info["queue_num"], info["configured"]) == \
                (BLK_VF_BDF, sock, "4", True)
            assert info["device_feature"]["    9"] == "VIRTIO_BLK_F_FLUSH"
            assert info["device_feature"]["   12"] == "VIRTIO_BLK_F_MQ"
            assert vhostd.mgmt_result("vf", "-d", BLK_VF_BDF, "-o", "6") == \
                {"device": {"vf": BLK_VF_BDF, "lm_status": "1"}, "Success": BLK_VF_BDF}

            # the controller crashes and recovers the blk functions (recovery files):
            # vfe-vhostd reconnects both sides by itself, the guest's I/O goes on
            svc.kill()
            svc.start()
            svc.wait_for_log("VBLKS0D0F2VF1: front-end relayed by vfe-vhostd", count=2, timeout=30)
            assert run(vm, "dd if=/dev/vda bs=1M skip=8 count=4 iflag=direct 2>/dev/null | md5sum",
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
