"""Run virtio-net-controller in service mode for tests: a private VFE_ROOT
(so the seed's /opt/mellanox/... paths live in a temp dir), inside a network
namespace the test made (so its representor netdevs never touch the host's
namespace), started and stopped by PID.

    with NetNs() as ns:
        svc = ControllerService(tmp_path / "root", ns).start()
        out = svc.virtnet_json("hotplug", "-i", "mlx5_0", "-m", "0C:C4:7A:FF:22:93", ...)
        svc.stop()
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from vfe.guest.controller_process import LoggedProcess


# The firmware settings a test's blk PF 0 needs (the seed's VIRTIO_BLK_EMULATION_* values
# for the PF; VIRTIO_BLK_EMULATION_NUM_VF and SRIOV_EN too for blk VFs):
# `svc.mlxconfig("s", *BLK_PF_NV)` before the first start.
BLK_PF_NV = ("VIRTIO_BLK_EMULATION_ENABLE=1", "VIRTIO_BLK_EMULATION_NUM_PF=1", "VIRTIO_BLK_EMULATION_NUM_MSIX=64")


class ControllerService(LoggedProcess):
    DEVICE = "/dev/mst/mt41686_pciconf0"

    def __init__(self, root: str | os.PathLike, netns=None, *, mode: str = "adaptive",
                 extra: list[str] | None = None):
        self.root = Path(root)
        self.netns = netns
        self.mode = mode
        self.extra = list(extra or [])
        self.log_path = self.root / "controller.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    # -- paths
    @property
    def run_dir(self) -> Path:
        return self.root / "run/virtnet"

    @property
    def rpc_socket(self) -> Path:
        return self.run_dir / "virtnet.sock"

    @property
    def recovery_dir(self) -> Path:
        return self.root / "opt/mellanox/mlnx_virtnet/recovery"

    @property
    def conf_path(self) -> Path:
        return self.root / "opt/mellanox/mlnx_virtnet/virtnet.conf"

    def socket(self, vuid: str) -> str:
        return str(self.run_dir / f"{vuid}.sock")

    def env(self) -> dict:
        return dict(os.environ, VFE_ROOT=str(self.root), VIRTNET_SOCKET=str(self.rpc_socket))

    def write_conf(self, conf: dict | str) -> None:
        self.conf_path.parent.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(conf if isinstance(conf, str) else json.dumps(conf, indent=2))

    # -- process
    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "vfe.cli.controller", "--mode", self.mode, *self.extra]
        return self.netns.exec_argv(argv) if self.netns is not None else argv

    def start(self, wait: bool = True, timeout: float = 30.0) -> "ControllerService":
        self.root.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with open(self.log_path, "a") as logf:
            logf.write(f"--- start {self.starts}\n")
            logf.flush()
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT, env=self.env())
        if wait:
            self.wait_for_log("serving", timeout, count=self.starts)
        return self

    # -- the user's commands
    def virtnet(self, *args: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, "-m", "vfe.cli.virtnet", *args], env=self.env(),
                           capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"virtnet {' '.join(args)} exited {r.returncode}:\n{r.stderr}{r.stdout}")
        return r

    def virtnet_json(self, *args: str) -> dict:
        return json.loads(self.virtnet(*args, check=True).stdout)

    def mlxconfig(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, "-m", "vfe.cli.mlxconfig", "-d", self.DEVICE, "-y", *args],
                           env=self.env(), capture_output=True, text=True, timeout=60)
        if check and r.returncode != 0:
            raise AssertionError(f"vfe-mlxconfig {' '.join(args)} exited {r.returncode}:\n{r.stderr}{r.stdout}")
        return r
