"""Issue 11, finding 4 -- local users: as an unprivileged user (`setpriv
--reuid=65534 --regid=65534 --clear-groups`) no call to vfe-vhostd or the
controller succeeds; root's `vhostmgmt` and `virtnet` work as before,
including the seed's commands.

A controller in service mode (in a network namespace, a private VFE_ROOT
whose directories everyone may enter, as /run is) with one SR-IOV VF, and
vfe-vhostd on its Unix socket and -- the explicit option -- TCP.  uid 65534
runs `virtnet list/query/hotplug`, `vfe-rpc`, and the seed's `vhostmgmt`
commands (`mgmtpf -a`, `vf -a`, `vf -l`, `vf -r`, `vf -d`) on the socket and
over TCP: each is refused with a message saying why, and nothing changes.
The same commands as root succeed.

The helpers start vfe-vhostd with `--port` and point vhostmgmt at it with
$VFE_VHOSTD_PORT, which older builds understand too: run against one, the
first check fails because uid 65534's `vhostmgmt --port P mgmtpf -a`
succeeds.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.harness.netns import NetNs
from tests.harness.service import ControllerService
from tests.harness.unprivileged import NOBODY, can_switch_user, run_nobody

from tests.e2e.service_helpers import assert_unchanged, hotplug_args, snapshot

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not can_switch_user(), reason="needs root (namespaces, setpriv)")]

# The seed's "Configure VFE vDPA" NV settings (plus SRIOV_EN for the VFs).
NV = ("VIRTIO_NET_EMULATION_ENABLE=1", "VIRTIO_NET_EMULATION_NUM_PF=1", "VIRTIO_NET_EMULATION_NUM_VF=16",
      "VIRTIO_NET_EMULATION_NUM_MSIX=64", "NUM_VF_MSIX=64", "SRIOV_EN=1")
PF_BDF, VF_BDF, VF2_BDF = "0000:84:00.2", "0000:90:00.0", "0000:90:00.1"   # the seed's af:00.2, af:04.5
HOTPLUG_MAC = "0C:C4:7A:FF:22:93"


@pytest.fixture
def public_root():
    """A short VFE_ROOT everyone may enter (mode 0755, like /run): what keeps
    uid 65534 out is then the sockets' own mode and the daemons' checks."""
    d = Path(tempfile.mkdtemp(prefix="vfe-lu-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Vhostd:
    """vfe-vhostd --client --port P (stopped by PID); vhostmgmt as root or uid 65534."""

    def __init__(self, svc: ControllerService, log_path: Path):
        self.svc = svc
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict:
        return dict(self.svc.env(), VFE_VHOSTD_PORT=str(self.port))

    def start(self) -> "Vhostd":
        with open(self.log_path, "a") as logf:
            self.proc = subprocess.Popen([sys.executable, "-m", "vfe.cli.vhostd", "--client", "--port",
                                          str(self.port)], stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT, env=self.env())
        deadline = time.monotonic() + 20
        while "serving JSON-RPC" not in self.log():
            assert self.proc.poll() is None, f"vfe-vhostd exited:\n{self.log()}"
            assert time.monotonic() < deadline, f"vfe-vhostd did not start:\n{self.log()}"
            time.sleep(0.05)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def mgmt(self, *args: str, nobody: bool = False) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "vfe.cli.vhostmgmt", *args]
        if nobody:
            return run_nobody(argv, env=self.env())
        return subprocess.run(argv, env=self.env(), capture_output=True, text=True, timeout=60)

    def result(self, *args: str) -> dict:
        r = self.mgmt(*args)
        assert r.returncode == 0, f"vhostmgmt {' '.join(args)} as root: {r.returncode}\n{r.stdout}{r.stderr}"
        return json.loads(r.stdout[r.stdout.index("{\n"):])


def as_nobody(svc: ControllerService, module: str, *args: str) -> subprocess.CompletedProcess:
    return run_nobody([sys.executable, "-m", module, *args], env=svc.env())


def test_unprivileged_users_are_refused_everywhere_root_is_served(public_root):
    with NetNs() as ns:
        svc = ControllerService(public_root / "root", ns)
        vhostd = Vhostd(svc, public_root / "vfe-vhostd.log")
        qemu_sock = str(public_root / "vfe-net0")             # the seed's /tmp/vfe-net0
        try:
            svc.mlxconfig("s", *NV)
            svc.start()
            r = subprocess.run([sys.executable, "-m", "vfe.cli.sriov", "-p", "0", "2"], env=svc.env(),
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
            vhostd.start()
            vhostd_socket = public_root / "root/run/vfe-vhostd/vhostd.sock"
            rpc_socket = svc.rpc_socket
            before = snapshot(svc, ns)

            # -- vfe-vhostd: the seed's commands as uid 65534, over TCP and on the socket
            seed_cmds = [("mgmtpf", "-a", PF_BDF), ("vf", "-a", VF_BDF, "-v", qemu_sock), ("vf", "-l", PF_BDF),
                         ("vf", "-r", VF_BDF), ("vf", "-d", VF_BDF, "-o", "3")]
            for cmd in seed_cmds:
                r = vhostd.mgmt("--port", str(vhostd.port), *cmd, nobody=True)
                shown = " ".join(cmd)
                assert r.returncode == 1, f"uid 65534's vhostmgmt --port {vhostd.port} {shown} was served:\n{r.stdout}"
                assert "Got JSON-RPC error response" in r.stdout, r.stdout
                assert '"message": "Permission denied: vfe-vhostd serves root only, not uid 65534."' \
                    in r.stdout, r.stdout
                r = vhostd.mgmt(*cmd, nobody=True)
                assert r.returncode == 1, f"uid 65534's vhostmgmt {shown} was served:\n{r.stdout}"
                assert r.stdout.splitlines()[-2:] == [
                    f"ERR: Can't connect to vhostd: permission denied on {vhostd_socket}",
                    "     vfe-vhostd serves root only: run vhostmgmt as root"], r.stdout
            assert f"refused uid {NOBODY}" in vhostd.log()
            assert vhostd.result("mgmtpf", "-l") == {"errno": -1001, "errstr": "PF device not found"}

            # -- the controller: virtnet and vfe-rpc as uid 65534
            refused = f"permission denied on socket {rpc_socket}: virtio-net-controller serves root only"
            for args in (("list",), ("query", "-p", "0", "-v", "0"), hotplug_args(HOTPLUG_MAC)):
                r = as_nobody(svc, "vfe.cli.virtnet", *args)
                assert (r.returncode, r.stdout, r.stderr) == (1, "", f"Error: {refused}\n"), (args, r)
            r = as_nobody(svc, "vfe.cli.vfe_rpc", "bdev_null_create", "Null0", "1024", "512")
            assert (r.returncode, r.stdout, r.stderr) == (1, "", f"vfe-rpc: bdev_null_create: {refused}\n")
            assert_unchanged(before, snapshot(svc, ns), "uid 65534's commands")

            # -- root: the same commands work, the seed's vhostmgmt lines verbatim
            assert svc.virtnet_json("query", "-p", "0", "-v", "0")["devices"][0]["bdf"] == VF_BDF[5:]
            hp = svc.virtnet_json(*hotplug_args(HOTPLUG_MAC))
            assert hp["mac"].upper() == HOTPLUG_MAC
            assert hp["vuid"] in [d["vuid"] for d in svc.virtnet_json("list")["devices"]]
            r = subprocess.run([sys.executable, "-m", "vfe.cli.vfe_rpc", "bdev_null_create", "Null0", "1024",
                                "512"], env=svc.env(), capture_output=True, text=True, timeout=60)
            assert r.returncode == 0 and "Null0" in r.stdout, r.stdout + r.stderr
            assert vhostd.result("mgmtpf", "-a", PF_BDF) == {"errno": 0, "errstr": "Success"}
            assert vhostd.result("vf", "-a", VF_BDF, "-v", qemu_sock) == {"errno": 0, "errstr": "Success"}
            listed = vhostd.result("vf", "-l", PF_BDF)
            assert [(d["vf"], d["socket_file"]) for d in listed["devices"]] == [(VF_BDF, qemu_sock)]
            assert vhostd.result("--port", str(vhostd.port), "mgmtpf", "-l") == \
                {"devices": [{"pf": PF_BDF}], "errno": 0, "errstr": "Success"}         # root over TCP

            # -- uid 65534 cannot undo or take over what root provisioned
            for cmd in (("vf", "-r", VF_BDF), ("mgmtpf", "-r", PF_BDF), ("vf", "-d", VF_BDF, "-o", "3"),
                        ("vf", "-a", VF2_BDF, "-v", str(public_root / "mine"))):
                for transport in ((), ("--port", str(vhostd.port))):
                    r = vhostd.mgmt(*transport, *cmd, nobody=True)
                    assert r.returncode == 1 and "serves root only" in r.stdout, (cmd, transport, r.stdout)
            assert vhostd.result("vf", "-l", PF_BDF) == listed
            assert vhostd.result("vf", "-d", VF_BDF, "-o", "6")["device"]["lm_status"] == "1"   # not frozen
            r = as_nobody(svc, "vfe.cli.virtnet", "unplug", "-u", hp["vuid"])
            assert r.returncode == 1 and refused in r.stderr
            assert hp["vuid"] in [d["vuid"] for d in svc.virtnet_json("list")["devices"]]

            # -- root tears it down
            assert vhostd.result("vf", "-r", VF_BDF) == {"errno": 0, "errstr": "Success"}
            assert vhostd.result("mgmtpf", "-r", PF_BDF) == {"errno": 0, "errstr": "Success"}
            svc.virtnet("unplug", "-u", hp["vuid"], check=True)
            assert "Traceback" not in svc.log() + vhostd.log()
        finally:
            vhostd.stop()
            svc.stop()
