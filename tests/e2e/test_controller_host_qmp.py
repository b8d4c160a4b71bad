"""A "host" QEMU registered with the controller by its QMP socket:
`virtnet hotplug` makes a NIC appear in the running guest on a free
pcie-root-port and `virtnet unplug` removes it (the PCIe switch emulation of
the DPU); `virtnet modify` of the MAC is refused while the guest's driver is
bound, accepted after it unbinds, and the guest then sees the new MAC."""
from __future__ import annotations

import os
import shutil
import tempfile
import time

import pytest

from tests.harness.netns import NetNs
from tests.harness.service import ControllerService

pytestmark = pytest.mark.e2e

MAC = "0c:c4:7a:ff:22:93"
NEW_MAC = "0c:c4:7a:ff:22:98"
SECOND_MAC = "0c:c4:7a:ff:22:9a"


@pytest.fixture
def short_dir():
    d = tempfile.mkdtemp(prefix="vfe-h-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def wait_for(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.3)


def wait_guest(vm, cmd, timeout=30.0, want=0):
    deadline = time.monotonic() + timeout
    while True:
        rc, out = vm.run(cmd, timeout=15)
        if rc == want:
            return out
        assert time.monotonic() < deadline, f"{cmd!r} still exits {rc}: {out}"
        time.sleep(0.3)


def test_hotplug_into_running_guest_modify_mac_and_unplug(short_dir, vm_factory):
    host_qmp = os.path.join(short_dir, "host-qmp.sock")
    vm = vm_factory("host", hotplug_ports=2,
                    extra_args=["-chardev", f"socket,id=ctlqmp,path={host_qmp},server=on,wait=off",
                                "-mon", "chardev=ctlqmp,mode=control"])
    vm.wait_booted(90)
    rc, before = vm.run("ls /sys/class/net")
    with NetNs() as ns:
        svc = ControllerService(os.path.join(short_dir, "root"), ns, extra=["--host-qmp", host_qmp])
        try:
            svc.start()
            hp = svc.virtnet_json("hotplug", "-i", "mlx5_0", "-f", "0x0", "-m", MAC, "-t", "1500",
                                  "-n", "3", "-s", "1024")
            # the new NIC shows up in the running guest
            ifname = wait_guest(vm, f"vfe-ifname {MAC}").strip()
            assert ifname not in before.split()
            rep = hp["sf_rep_net_device"]
            ns.run("ip", "addr", "add", "10.2.0.100/24", "dev", rep)
            ns.run("ip", "link", "set", "dev", rep, "up")
            rc, out = vm.run(f"vfe-netup {ifname} 10.2.0.1/24", timeout=30)
            assert rc == 0, out
            rc, out = vm.run("ping -c 3 -W 3 10.2.0.100", timeout=30)
            assert rc == 0 and "3 packets received" in out, out

            # a restart recovers the function and adopts the NIC still in the
            # guest: not plugged a second time, its port not handed out again
            svc.stop()
            svc.start()
            wait_for(lambda: hp["vuid"] in {d["vuid"] for d in svc.virtnet_json("list")["devices"]})
            ns.run("ip", "addr", "replace", "10.2.0.100/24", "dev", rep)   # the SF outlives a restart
            ns.run("ip", "link", "set", "dev", rep, "up")
            wait_guest(vm, "ping -c 1 -W 2 10.2.0.100", timeout=60)
            assert "already plugged into the host VM" in svc.log()
            assert "host QMP plug" not in svc.log()         # no second device_add of it
            second = svc.virtnet_json("hotplug", "-i", "mlx5_0", "-f", "0x0", "-m", SECOND_MAC,
                                      "-t", "1500", "-n", "1", "-s", "256")
            wait_guest(vm, f"vfe-ifname {SECOND_MAC}")
            svc.virtnet("unplug", "-u", second["vuid"], check=True)
            wait_guest(vm, f"vfe-ifname {SECOND_MAC}", want=1)

            # modify MAC: refused while the guest's driver is bound ...
            r = svc.virtnet("modify", "-u", hp["vuid"], "device", "-m", NEW_MAC)
            assert r.returncode != 0 and "in use" in r.stderr, r.stderr + r.stdout
            # ... accepted once it unbinds; after re-bind the guest has the new MAC
            pci = vm.run(f"basename $(readlink -f /sys/class/net/{ifname}/device/..)")[1].strip()
            assert pci.startswith("0000:"), pci
            vm.run(f"echo {pci} > /sys/bus/pci/drivers/virtio-pci/unbind", timeout=30)
            wait_guest(vm, f"test ! -e /sys/bus/pci/drivers/virtio-pci/{pci}")
            deadline = time.monotonic() + 20
            while True:                   # the rings stop a moment after the unbind
                r = svc.virtnet("modify", "-u", hp["vuid"], "device", "-m", NEW_MAC)
                if r.returncode == 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.3)
            assert r.returncode == 0, r.stderr
            vm.run(f"echo {pci} > /sys/bus/pci/drivers/virtio-pci/bind", timeout=30)
            new_if = wait_guest(vm, f"vfe-ifname {NEW_MAC}", timeout=40).strip()
            listed = {d["vuid"]: d for d in svc.virtnet_json("list")["devices"]}
            assert listed[hp["vuid"]]["net_mac"].lower() == NEW_MAC

            # unplug: the NIC leaves the guest, its pieces leave the controller
            r = svc.virtnet("unplug", "-u", hp["vuid"])
            assert r.returncode == 0, r.stderr
            wait_guest(vm, f"test ! -e /sys/class/net/{new_if}", timeout=40)
            assert hp["vuid"] not in {d["vuid"] for d in svc.virtnet_json("list")["devices"]}
            assert not os.path.exists(svc.socket(hp["vuid"]))
            assert not (svc.recovery_dir / f"{hp['vuid']}.json").exists()
        finally:
            svc.stop()
