"""VFE vDPA end to end (seed: "Install/Configure/Run VFE vDPA", "Provision the
VirtIO net PF"): the emulated DPU (virtio-net-controller in service mode, in
a network namespace), vfe-vhostd on the host relaying a real QEMU guest's
vhost-user socket to a VF's endpoint, the VF's representor on an Open
vSwitch bridge with a peer address behind it.

1. The seed's flow command for command (modulo BDFs and paths): NV config,
   SR-IOV VF, representor on the bridge, vfe-vhostd --client, QEMU with the
   seed's qemu:commandline arguments (server=on, queues=4, page-per-vq,
   1024-entry rings, mq=on), `vhostmgmt mgmtpf -a`, `virtnet modify ... -m
   00:00:00:00:33:00`, `vhostmgmt vf -a BDF -v SOCKET`: the guest's NIC has
   that MAC, gets link and passes traffic.  Then the seed's warning: SR-IOV
   disabled and re-enabled -> the VF is detached (the guest's link goes
   down) and must be provisioned again, which brings it back; a controller
   crash and recovery is ridden out by vfe-vhostd on its own; `vf -r`.
2. SIGKILL vfe-vhostd while the guest pings at 10 Hz: no ping lost beyond
   one, the link stays up; restart + provision again restores the control
   channel (the guest re-binds its driver through the new relay).
4. Every RPC error the service can hit, with its number and text, as
   vhostmgmt prints it.
"""
from __future__ import annotations

import json
import os
import re
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
from tests.harness.ovs import Ovs
from tests.harness.service import ControllerService
from vfe.guest.vm import detect_accel

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(shutil.which("ovs-vswitchd") is None, reason="openvswitch-switch missing")]

# The seed's "Configure VFE vDPA" NV settings (plus SRIOV_EN for the VFs).
SEED_NV = ("VIRTIO_NET_EMULATION_ENABLE=1", "VIRTIO_NET_EMULATION_NUM_PF=1", "VIRTIO_NET_EMULATION_NUM_VF=16",
           "VIRTIO_BLK_EMULATION_ENABLE=1", "VIRTIO_BLK_EMULATION_NUM_PF=1", "VIRTIO_BLK_EMULATION_NUM_VF=16",
           "VIRTIO_NET_EMULATION_NUM_MSIX=64", "VIRTIO_BLK_EMULATION_NUM_MSIX=64", "NUM_VF_MSIX=64",
           "SRIOV_EN=1")
PF_BDF, VF_BDF = "0000:84:00.2", "0000:90:00.0"      # the seed's 0000:af:00.2 / 0000:af:04.5
SEED_MAC = "00:00:00:00:33:00"
PEER_IP, GUEST_IP = "10.7.0.100", "10.7.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def result_of(out: str) -> dict:
    """The JSON result vhostmgmt printed after its params line."""
    i = out.find("{\n")
    assert i >= 0, f"no JSON result in vhostmgmt's output:\n{out}"
    return json.loads(out[i:])


class Vhostd:
    """vfe-vhostd as a process (stopped by PID) and vhostmgmt as the user runs
    it: on vfe-vhostd's Unix socket under the controller's VFE_ROOT, and
    also on TCP (``port``) with ``tcp``."""

    def __init__(self, svc: ControllerService, workdir: Path, *, client: bool = True,
                 extra: tuple[str, ...] = (), tcp: bool = False):
        self.svc = svc
        self.port = free_port() if tcp else None
        self.socket_path = svc.root / "run/vfe-vhostd/vhostd.sock"
        self.client = client
        self.extra = extra
        self.log_path = workdir / "vfe-vhostd.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def env(self) -> dict:
        return self.svc.env()

    def start(self) -> "Vhostd":
        self.starts += 1
        argv = [sys.executable, "-m", "vfe.cli.vhostd", *(["--client"] if self.client else []),
                *(["--tcp", "--port", str(self.port)] if self.port else []), *self.extra]
        with open(self.log_path, "a") as logf:
            logf.write(f"--- start {self.starts}\n")
            logf.flush()
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                         env=self.env())
        self.wait_for_log("serving JSON-RPC", count=self.starts)
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, text: str, timeout: float = 20.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while self.log().count(text) < count:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"vfe-vhostd exited ({self.proc.returncode}):\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"vfe-vhostd log never showed {text!r}:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc, self.proc = self.proc.returncode, None
        return rc

    def mgmt(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "vfe.cli.vhostmgmt", *args], env=self.env(),
                              capture_output=True, text=True, timeout=60, input=input)

    def mgmt_result(self, *args: str) -> dict:
        r = self.mgmt(*args)
        assert r.returncode == 0, f"vhostmgmt {' '.join(args)}: {r.returncode}\n{r.stdout}{r.stderr}"
        return result_of(r.stdout)


def sriov(svc: ControllerService, *args: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "vfe.cli.sriov", *args], env=svc.env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def seed_qemu_args(sock: str, accel: str) -> list[str]:
    """The seed's <qemu:commandline> for the net device, with what this
    machine needs appended (vectors=0 under TCG: facts.md; no option ROM)."""
    vectors = 2 * 4 + 2 if accel == "kvm" else 0
    return ["-chardev", f"socket,id=char0,path={sock},server=on",
            "-netdev", "type=vhost-user,id=vdpa,chardev=char0,queues=4",
            "-device", f"virtio-net-pci,netdev=vdpa,mac={SEED_MAC},page-per-vq=on,rx_queue_size=1024,"
                       f"tx_queue_size=1024,mq=on,vectors={vectors},romfile="]


@pytest.fixture
def short_root():
    d = tempfile.mkdtemp(prefix="vfe-vd-", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


class Setup:
    """The DPU side of the seed's flow, up to "Run the VFE vDPA application"."""

    def __init__(self, root: Path, ns: NetNs, peer: NetNs, ovs: Ovs):
        self.root, self.ns, self.peer, self.ovs = root, ns, peer, ovs
        self.svc = ControllerService(root / "root", ns)
        self.sock = str(root / "vfe-net0")
        self.rep = ""

    def dpu(self) -> None:
        self.svc.mlxconfig("s", *SEED_NV)
        self.svc.start()
        # the host's "echo 1 > /sys/bus/pci/devices/<PF>/sriov_numvfs"
        out = sriov(self.svc, "-p", "0", "1")
        assert out["vfs"][0]["bdf"] == VF_BDF[5:]
        self.ovs.add_bridge("ovsbr1")
        self.ns.veth_pair("vpeer0", "vpeer1", peer=self.peer, peer_addr=f"{PEER_IP}/24", up=True,
                          peer_tx_csum=False)
        self.ovs.add_port("ovsbr1", "vpeer0")
        self.add_representor()

    def add_representor(self) -> None:
        # virtnet query -p 0 -v 0 | grep sf_rep_net_device; ovs-vsctl add-port ovsbr1 <rep>
        q = self.svc.virtnet_json("query", "-p", "0", "-v", "0")["devices"][0]
        self.rep = q["sf_rep_net_device"]
        self.ovs.del_port("ovsbr1", self.rep)
        self.ovs.add_port("ovsbr1", self.rep)
        self.ns.run("ip", "link", "set", "dev", self.rep, "up")

    def prepare_vf(self) -> None:
        """On the DPU: the seed's MAC change; and rings as large as the
        seed's QEMU line asks for (VFs are created with max_queues_size 256)."""
        self.svc.virtnet("modify", "-p", "0", "-v", "0", "device", "-m", SEED_MAC, check=True)
        self.svc.virtnet("modify", "-p", "0", "-v", "0", "device", "-q", "1024", check=True)


def boot_seed_guest(vm_factory, sock: str):
    vm = vm_factory("vdpa", start=False, extra_args=seed_qemu_args(sock, detect_accel()))
    vm.start()                 # QEMU waits (server=on) for vfe-vhostd to connect
    return vm


def guest_up(vm) -> None:
    vm.wait_booted(120)
    rc, mac = vm.run("cat /sys/class/net/eth0/address")
    assert rc == 0 and mac.strip() == SEED_MAC
    rc, out = vm.run(f"vfe-netup eth0 {GUEST_IP}/24", timeout=30)
    assert rc == 0, out


def carrier(vm) -> str:
    return vm.run("cat /sys/class/net/eth0/carrier 2>/dev/null || echo none")[1].strip()


def wait_carrier(vm, want: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while carrier(vm) != want:
        assert time.monotonic() < deadline, f"guest carrier never became {want}"
        time.sleep(0.2)


def ping(vm, count: int = 3) -> None:
    rc, out = vm.run(f"ping -c {count} -W 3 {PEER_IP}", timeout=30)
    assert rc == 0 and f"{count} packets received" in out, out


def test_seed_vfe_vdpa_flow_and_reprovisioning_after_sriov(short_root, vm_factory):
    with NetNs() as ns, NetNs() as peer, Ovs(netns=ns) as ovs:
        s = Setup(short_root, ns, peer, ovs)
        vhostd = Vhostd(s.svc, short_root)
        try:
            s.dpu()
            vhostd.start()                                       # dpdk-vfe-vdpa ... -- --client
            vm = boot_seed_guest(vm_factory, s.sock)
            r = vhostd.mgmt("mgmtpf", "-a", PF_BDF)
            assert r.returncode == 0 and r.stdout == (
                f"{{'add': True, 'dev': '{PF_BDF}'}}\n" + json.dumps({"errno": 0, "errstr": "Success"}, indent=2)
                + "\n"), r.stdout + r.stderr
            s.prepare_vf()
            assert vhostd.mgmt_result("vf", "-a", VF_BDF, "-v", s.sock) == {"errno": 0, "errstr": "Success"}
            guest_up(vm)
            assert carrier(vm) == "1"
            ping(vm)
            # the relay is ours, the data path the controller's
            assert "relayed by vfe-vhostd" in s.svc.log()
            info = vhostd.mgmt_result("vf", "-i", VF_BDF)["device"]
            assert (info["vf"], info["mac"], info["socket_file"], info["queue_size"], info["configured"]) == \
                (VF_BDF, SEED_MAC.upper(), s.sock, "1024", True)
            assert info["device_feature"]["   32"] == "VIRTIO_F_VERSION_1"
            assert info["device_feature"]["   22"] == "VIRTIO_NET_F_MQ"
            assert vhostd.mgmt_result("mgmtpf", "-l") == {"devices": [{"pf": PF_BDF}], "errno": 0,
                                                          "errstr": "Success"}
            assert vhostd.mgmt_result("vf", "-d", VF_BDF, "-o", "6") == \
                {"device": {"vf": VF_BDF, "lm_status": "1"}, "Success": VF_BDF}

            # SR-IOV disabled: the provisioned VF is detached, QEMU sees the link go down
            sriov(s.svc, "-p", "0", "0")
            vhostd.wait_for_log("the VF is gone from the controller")
            wait_carrier(vm, "0")
            assert vhostd.mgmt_result("vf", "-l", PF_BDF) == {"errno": 0, "errstr": "Success"}
            assert vhostd.mgmt_result("vf", "-i", VF_BDF) == {"errno": -1003, "errstr": "VF device not found"}
            # ... re-enabled: it must be provisioned again, and then works again
            sriov(s.svc, "-p", "0", "1")
            time.sleep(1.0)
            assert carrier(vm) == "0"                            # not on its own
            s.add_representor()
            s.prepare_vf()
            assert vhostd.mgmt_result("vf", "-a", VF_BDF, "-v", s.sock)["errno"] == 0
            wait_carrier(vm, "1")
            ping(vm)
            # the controller crashes and recovers its functions: vfe-vhostd
            # reconnects both sides by itself (QEMU sees a back-end restart)
            s.svc.kill()
            s.svc.start()
            t0 = time.monotonic()
            while vm.run(f"ping -c 1 -W 1 {PEER_IP}", timeout=10)[0] != 0:
                assert time.monotonic() - t0 < 30, "no traffic after the controller's recovery"
            assert carrier(vm) == "1"
            # vf -r: the relay closes, the guest's link goes down, the controller sees a disconnect
            before = s.svc.log().count("front-end disconnected")
            assert vhostd.mgmt_result("vf", "-r", VF_BDF)["errno"] == 0
            wait_carrier(vm, "0")
            s.svc.wait_for_log("front-end disconnected", count=before + 1)
            assert vhostd.mgmt_result("mgmtpf", "-r", PF_BDF)["errno"] == 0
        finally:
            vhostd.stop()
            s.svc.stop()


def test_killing_vfe_vhostd_keeps_the_data_path_and_reprovisioning_restores_control(short_root, vm_factory):
    with NetNs() as ns, NetNs() as peer, Ovs(netns=ns) as ovs:
        s = Setup(short_root, ns, peer, ovs)
        vhostd = Vhostd(s.svc, short_root)
        try:
            s.dpu()
            vhostd.start()
            vm = boot_seed_guest(vm_factory, s.sock)
            assert vhostd.mgmt_result("mgmtpf", "-a", PF_BDF)["errno"] == 0
            s.prepare_vf()
            assert vhostd.mgmt_result("vf", "-a", VF_BDF, "-v", s.sock)["errno"] == 0
            guest_up(vm)
            ping(vm)

            # 10 Hz pings through the VF, its representor and the bridge; SIGKILL vfe-vhostd
            mark = len(s.svc.log())
            flood = vm.run_bg(f"ping -i 0.1 -c 80 -W 1 {PEER_IP}")
            time.sleep(2.0)
            vhostd.kill()
            s.svc.wait_for_log("vfe-vhostd went away")
            assert "front-end disconnected" not in s.svc.log()[mark:]
            assert flood.wait(timeout=60) in (0, 1)
            out = flood.output()
            m = re.search(r"(\d+) packets transmitted, (\d+) packets received", out)
            assert m, out
            sent, got = int(m.group(1)), int(m.group(2))
            assert sent == 80 and sent - got <= 1, out
            assert carrier(vm) == "1"                            # QEMU never saw a disconnect
            ping(vm)

            # restart and provision again: the relay takes the front-end back
            vhostd.start()
            assert vhostd.mgmt_result("mgmtpf", "-a", PF_BDF)["errno"] == 0
            assert vhostd.mgmt_result("vf", "-a", VF_BDF, "-v", s.sock) == {"errno": 0, "errstr": "Success"}
            vhostd.wait_for_log("resumed the relay")
            s.svc.wait_for_log("resumed relaying")
            listed = vhostd.mgmt_result("vf", "-l", PF_BDF)
            assert [d["vf"] for d in listed["devices"]] == [VF_BDF]
            info = vhostd.mgmt_result("vf", "-i", VF_BDF)["device"]
            assert info["configured"] is True and info["socket_file"] == s.sock
            # the control channel runs through the new relay: the guest re-binds
            # its driver (ring stop/start, features, memory table ...) and pings
            pci = vm.run("basename $(readlink -f /sys/class/net/eth0/device/..)")[1].strip()
            assert pci.startswith("0000:"), pci
            vm.run(f"echo {pci} > /sys/bus/pci/drivers/virtio-pci/unbind", timeout=30)
            vm.run(f"echo {pci} > /sys/bus/pci/drivers/virtio-pci/bind", timeout=30)
            rc, out = vm.run(f"vfe-netup eth0 {GUEST_IP}/24", timeout=30)
            assert rc == 0, out
            ping(vm)
            assert carrier(vm) == "1"
            # QEMU never noticed a thing: no vhost-user error in its log
            qlog = [ln for ln in vm.qemu_log.read_text(errors="replace").splitlines()
                    if not ln.startswith("#") and "QEMU waiting for connection" not in ln]
            assert qlog == [], qlog
        finally:
            vhostd.stop()
            s.svc.stop()


def test_every_rpc_error_with_its_number_and_text(short_root):
    """Acceptance 4: the errors a user can hit, as vhostmgmt prints them
    (vfe-vhostd in its default server mode, a real controller)."""
    with NetNs() as ns:
        svc = ControllerService(short_root / "root", ns)
        vhostd = Vhostd(svc, short_root, client=False, extra=("--iface", str(short_root / "vhost-user-")),
                        tcp=True)
        try:
            svc.mlxconfig("s", *SEED_NV)
            svc.start()
            sriov(svc, "-p", "0", "2")
            vhostd.start()

            def expect(args, code, text):
                assert vhostd.mgmt_result(*args) == {"errno": code, "errstr": text}, args

            expect(("mgmtpf", "-l"), -1001, "PF device not found")
            expect(("mgmtpf", "-r", PF_BDF), -1001, "PF device not found")
            expect(("mgmtpf", "-a", "0000:99:00.0"), -19, "No such device")
            expect(("mgmtpf", "-a", "not-a-bdf"), -22, "Invalid argument")
            expect(("mgmtpf", "-a", VF_BDF), -1010, "PF deviceid not support")
            expect(("vf", "-a", VF_BDF), -1001, "PF device not found")          # its PF is not managed
            expect(("vf", "-l", PF_BDF), -1001, "PF device not found")
            expect(("mgmtpf", "-a", PF_BDF), 0, "Success")
            expect(("mgmtpf", "-a", "84:00.2"), -1008, "PF device already add")
            expect(("vf", "-a", PF_BDF), -1001, "PF device not found")          # a PF is not a VF
            expect(("vf", "-a", "0000:90:00.7"), -19, "No such device")
            expect(("vf", "-r", VF_BDF), -1003, "VF device not found")
            expect(("vf", "-i", VF_BDF), -1003, "VF device not found")
            expect(("vf", "-a", VF_BDF, "-u", "not-a-uuid"), -1007, "Devargs parse fail")
            blocker = short_root / "not-a-socket"
            blocker.write_text("")
            expect(("vf", "-a", VF_BDF, "-v", str(blocker)), -1030, "Can't access vhost socket path")
            expect(("vf", "-a", VF_BDF, "-v", "/tmp/" + "x" * 120), -36, "File name too long")
            expect(("vf", "-a", VF_BDF, "-v", str(short_root / "nodir" / "s")), -2, "No such file or directory")
            # --iface PREFIX names the socket <PREFIX><VF BDF>
            expect(("vf", "-a", VF_BDF), 0, "Success")
            assert os.path.exists(f"{short_root}/vhost-user-{VF_BDF}")
            expect(("vf", "-a", VF_BDF, "-v", str(short_root / "other")), -1014, "VF device already add")
            expect(("vf", "-a", "0000:90:00.1", "-v", f"{short_root}/vhost-user-{VF_BDF}"), -1038,
                   "Vhost socket file already exists")
            expect(("mgmtpf", "-r", PF_BDF), -1013, "Please remove all VF devices before remove PF")
            # -o: the controller's device operations (vf_state)
            assert vhostd.mgmt_result("vf", "-d", VF_BDF, "-o", "3") == {"Success": VF_BDF}
            assert vhostd.mgmt_result("vf", "-d", VF_BDF, "-o", "6") == \
                {"device": {"vf": VF_BDF, "lm_status": "3"}, "Success": VF_BDF}
            assert vhostd.mgmt_result("vf", "-d", VF_BDF, "-o", "1") == {"Success": VF_BDF}
            assert vhostd.mgmt_result("vf", "-d", VF_BDF, "-o", "4") == \
                {"Error": "Fail to debug VF device", "errno": -61, "errstr": "No data available"}
            assert vhostd.mgmt_result("vf", "-d", "0000:90:00.1", "-o", "1") == {"Error": "Fail to find VF device"}
            expect(("vf", "-r", VF_BDF), 0, "Success")
            assert not os.path.exists(f"{short_root}/vhost-user-{VF_BDF}")
            # the reference CLI's own checks
            r = vhostd.mgmt("vf", "-a")
            assert r.returncode == 1 and r.stdout == ("Error: No vf device specified for add vf action.\n"
                                                      "usage: vhostmgmt [-h] {version,mgmtpf,vf} ...\n")
            # protocol-level errors over the wire (TCP, the reference's vhostmgmt's way)
            with socket.create_connection(("127.0.0.1", vhostd.port), timeout=5) as c:
                c.sendall(b'{"jsonrpc": "2.0", "method": "nosuch", "id": 7}')
                assert json.loads(c.recv(65536)) == {"jsonrpc": "2.0", "id": 7,
                                                     "error": {"code": -32601, "message": "Method not found."}}
                c.sendall(b'{"jsonrpc": "2.0", "method": "mgmtpf", "id": 8, "params": {"add": true}}')
                assert json.loads(c.recv(65536))["result"] == {"Error": "Invalid pf parameters in RPC message",
                                                               "id": 8}
                c.sendall(b'[1]')
                assert json.loads(c.recv(65536))["error"] == {
                    "code": -32600, "message": "The JSON sent is not a valid Request object."}
                c.sendall(b"}{")
                assert json.loads(c.recv(65536))["error"] == {
                    "code": -32700, "message": "Parse error. Invalid JSON was received by the server."}
            # the controller unreachable: the system error
            svc.stop()
            r = result_of(vhostd.mgmt("mgmtpf", "-a", "0000:84:00.3").stdout)
            assert (r["errno"], r["errstr"]) in ((-2, "No such file or directory"), (-111, "Connection refused"))
            v = vhostd.mgmt_result("version")
            assert v["vfe-vhostd-ha version"] == "Not Known Due to HA Disconnected" and v["errno"] == 0
            # vfe-vhostd itself unreachable (SIGTERM: a clean exit)
            assert vhostd.stop() == 0 and "stopped" in vhostd.log()
            r = vhostd.mgmt("mgmtpf", "-l")
            assert r.returncode == 1 and r.stdout.splitlines()[1:] == [
                f"ERR: Can't connect to vhostd: socket {vhostd.socket_path} not found",
                "     VDPA is not ready to accept commands (is vfe-vhostd running?)"]
            r = vhostd.mgmt("--tcp", "--port", str(vhostd.port), "mgmtpf", "-l")
            assert r.returncode == 1 and r.stdout.splitlines()[1:] == [
                "ERR: Can't connect to vhostd: [Errno 111] Connection refused",
                "     VDPA is not ready to accept commands"]
        finally:
            vhostd.stop()
            svc.stop()
