"""The VFE vDPA device operations behind `vhostmgmt vf -o N` (RPC vf_state):
quiesce/freeze stop the data path -- the guest's TX waits in its ring and
nothing is lost -- and running resumes it; dirty logging needs the log the
front-end maps, and the status reports it."""
from __future__ import annotations

import shutil
import tempfile
import time

import pytest

from tests.harness.netns import NetNs
from tests.harness.service import ControllerService
from vfe.guest.vm import NetDev
from vfe.rpc.client import call
from vfe.rpc.protocol import RpcError

pytestmark = pytest.mark.e2e


@pytest.fixture
def short_root():
    d = tempfile.mkdtemp(prefix="vfe-s-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def rx_packets(ns, dev):
    return int(ns.run("cat", f"/sys/class/net/{dev}/statistics/rx_packets").stdout)


def test_quiesce_freeze_and_resume_lose_nothing(short_root, vm_factory):
    mac = "0c:c4:7a:ff:22:b0"
    with NetNs() as ns:
        svc = ControllerService(short_root, ns)
        try:
            svc.start()
            hp = svc.virtnet_json("hotplug", "-i", "mlx5_0", "-m", mac, "-t", "1500", "-n", "2", "-s", "256")
            rep, vuid = hp["sf_rep_net_device"], hp["vuid"]
            ns.run("ip", "addr", "add", "10.5.0.100/24", "dev", rep)
            ns.run("ip", "link", "set", "dev", rep, "up")
            vm = vm_factory("st", nics=[NetDev(svc.socket(vuid), mac=mac)])
            vm.wait_booted(90)
            assert vm.run("vfe-netup eth0 10.5.0.1/24", timeout=30)[0] == 0
            assert vm.run("ping -c 2 -W 3 10.5.0.100", timeout=20)[0] == 0
            rpc = lambda op: call(str(svc.rpc_socket), "vf_state", {"vuid": vuid, "op": op})

            for op, name in ((2, "quiesced"), (3, "freeze")):
                assert rpc(op)["state"] == name
                before = rx_packets(ns, rep)
                rc, out = vm.run("ping -c 5 -i 0.2 -W 1 10.5.0.100", timeout=20)
                assert rc != 0                                    # no answer while stopped
                time.sleep(0.5)
                assert rx_packets(ns, rep) == before              # nothing left the guest's ring
                assert rpc(1)["state"] == "running"
                deadline = time.monotonic() + 5
                while rx_packets(ns, rep) < before + 5:           # the queued requests go out now
                    assert time.monotonic() < deadline, "frames queued during the pause were lost"
                    time.sleep(0.1)
                assert vm.run("ping -c 2 -W 3 10.5.0.100", timeout=20)[0] == 0

            status = rpc(6)
            assert status["state"] == "running" and status["logging"] is False
            with pytest.raises(RpcError) as err:
                rpc(4)                                            # no log from QEMU outside migration
            assert err.value.code == -61 and "SET_LOG_BASE" in err.value.message
            with pytest.raises(RpcError):
                rpc(7)
        finally:
            svc.stop()
