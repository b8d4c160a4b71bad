"""SR-IOV VFs on static PFs (seed: "Creating Virtio-net SR-IOV VF Devices"):
the host's sriov_numvfs step (vfe-sriov), VFs with VUIDs, BDFs, MACs, SFs and
representors like the PFs, `virtnet list/query/modify -p P -v V`, a guest on
a VF passing traffic through its representor, and 504 VFs created, listed
and destroyed with nothing left over."""
from __future__ import annotations

import os
import pty
import shutil
import subprocess
import sys
import tempfile

import pytest

from tests.harness.netns import NetNs
from tests.harness.service import ControllerService
from vfe.guest.vm import NetDev

pytestmark = pytest.mark.e2e


@pytest.fixture
def short_root():
    d = tempfile.mkdtemp(prefix="vfe-v-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def sriov(svc, *args):
    return subprocess.run([sys.executable, "-m", "vfe.cli.sriov", *args], env=svc.env(),
                          capture_output=True, text=True, timeout=600)


def sriov_on_a_terminal(svc, *args):
    """vfe-sriov with its stderr on a pseudo-terminal: (exit status, what the
    terminal showed)."""
    master, slave = pty.openpty()
    try:
        p = subprocess.run([sys.executable, "-m", "vfe.cli.sriov", *args], env=svc.env(),
                           stdout=subprocess.DEVNULL, stderr=slave, timeout=600)
        os.close(slave)
        slave = -1
        shown = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:                           # EIO: the terminal's other side is closed
                break
            if not chunk:
                break
            shown += chunk
        return p.returncode, shown.decode()
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


def test_vfs_on_a_static_pf_with_a_guest(short_root, vm_factory):
    with NetNs() as ns:
        svc = ControllerService(short_root, ns)
        try:
            svc.mlxconfig("s", "SRIOV_EN=1", "VIRTIO_NET_EMULATION_NUM_VF=4")
            svc.start()
            hp = svc.virtnet_json("hotplug", "-i", "mlx5_0", "-m", "0c:c4:7a:ff:22:93", "-t", "1500",
                                  "-n", "2", "-s", "256")
            r = sriov(svc, "-p", str(hp["id"]), "2")
            assert r.returncode != 0 and "static" in r.stderr      # not on a hot-plugged PF
            r = sriov(svc, "-p", "0", "2", "-l")
            assert r.returncode != 0 and "Transitional VirtIO-net VF devices are not currently supported" in r.stderr
            r = sriov(svc, "-p", "0", "5")
            assert r.returncode != 0 and "VIRTIO_NET_EMULATION_NUM_VF" in r.stderr
            r = sriov(svc, "-p", "0", "2")
            assert r.returncode == 0, r.stderr
            vfs = [d for d in svc.virtnet_json("list")["devices"] if d["function_type"] == "VF"]
            assert [(d["vf_id"], d["parent_pf_id"], d["vuid"]) for d in vfs] == \
                [(0, 0, "VNETS0D0F2VF1"), (1, 0, "VNETS0D0F2VF2")]
            assert len({d["sf_num"] for d in vfs}) == 2 and all(d["sf_num"] >= 1000 for d in vfs)
            for d in vfs:
                assert ns.run("cat", f"/sys/class/net/{d['sf_rep_net_device']}/ifindex").stdout.strip() \
                    == str(d["sf_rep_net_ifindex"])
            # the seed's commands on a VF (its en-dash included)
            q = svc.virtnet_json("query", "-p", "0", "-v", "0")
            assert q["devices"][0]["vuid"] == "VNETS0D0F2VF1"
            svc.virtnet("modify", "-p", "0", "\u2013v", "0", "device", "-m", "00:00:00:00:33:00", check=True)
            vf0 = svc.virtnet_json("query", "-p", "0", "-v", "0", "-b")["devices"][0]
            assert vf0["net_mac"] == "00:00:00:00:33:00"
            assert (svc.recovery_dir / "VNETS0D0F2VF1.json").exists()

            # a guest on VF 0 reaches an address behind the VF's representor
            rep = vf0["sf_rep_net_device"]
            ns.run("ip", "addr", "add", "10.4.0.100/24", "dev", rep)
            ns.run("ip", "link", "set", "dev", rep, "up")
            vm = vm_factory("vf0", nics=[NetDev(svc.socket(vf0["vuid"]), mac="00:00:00:00:33:00")])
            vm.wait_booted(90)
            assert vm.run("vfe-netup eth0 10.4.0.1/24", timeout=30)[0] == 0
            rc, out = vm.run("ping -c 3 -W 3 10.4.0.100", timeout=30)
            assert rc == 0 and "3 packets received" in out, out
            vm.shutdown()

            # destroying returns the SFs to the pool, removes representors,
            # sockets and recovery files, and logs the seed's line
            assert sriov(svc, "-p", "0", "0").returncode == 0
            svc.wait_for_log("PF(0): Unload (2) VFs finished")
            links = ns.run("ip", "-br", "link").stdout
            assert all(d["sf_rep_net_device"] not in links for d in vfs)
            assert not any(os.path.exists(svc.socket(d["vuid"])) for d in vfs)
            assert not list(svc.recovery_dir.glob("*VF*.json"))
            again = sriov(svc, "-p", "0", "2")
            assert again.returncode == 0
            reused = {d["sf_num"] for d in svc.virtnet_json("list")["devices"] if d["function_type"] == "VF"}
            assert reused == {d["sf_num"] for d in vfs}              # from the pool, not new SFs
        finally:
            svc.stop()


def test_504_vfs_created_listed_destroyed_without_leftovers(short_root):
    with NetNs() as ns:
        svc = ControllerService(short_root, ns)
        try:
            svc.mlxconfig("s", "SRIOV_EN=1", "VIRTIO_NET_EMULATION_NUM_VF=126", "VIRTIO_NET_EMULATION_NUM_PF=4",
                          "PF_TOTAL_SF=508", "VIRTIO_NET_EMULATION_NUM_MSIX=4", "NUM_VF_MSIX=4")
            svc.start()
            pid = svc.proc.pid
            fds0 = len(os.listdir(f"/proc/{pid}/fd"))
            links0 = ns.run("ip", "-br", "link").stdout.count("\n")
            # on a terminal vfe-sriov shows how far the controller is; in a pipe nothing
            rc, shown = sriov_on_a_terminal(svc, "-p", "0", "126")
            assert rc == 0, shown
            assert "creating VFs: 126/126 (100%)" in shown and shown.endswith("\r"), repr(shown)
            for pf in range(1, 4):
                r = sriov(svc, "-p", str(pf), "126")
                assert r.returncode == 0 and r.stderr == "", r.stderr
            r = sriov(svc, "-p", "0", "1")
            assert r.returncode != 0                       # already has VFs
            devices = svc.virtnet_json("list")["devices"]
            assert sum(d["function_type"] == "VF" for d in devices) == 504
            assert ns.run("ip", "-br", "link").stdout.count("\n") == links0 + 504
            for pf in range(4):
                assert sriov(svc, "-p", str(pf), "0").returncode == 0
            assert len(os.listdir(f"/proc/{pid}/fd")) == fds0
            assert ns.run("ip", "-br", "link").stdout.count("\n") == links0
            assert sorted(p.name for p in svc.run_dir.iterdir() if "VF" in p.name) == []
            assert not list(svc.recovery_dir.glob("*VF*.json"))
        finally:
            svc.stop()
