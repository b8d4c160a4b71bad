"""Controller live update (`virtnet update --start`), end to end.

Two builds are "installed": this checkout, and a copy of its `vfe` package
with another version (what a newer deb beside the running one would be).
The `virtnet` of the build being installed starts the update, as the seed
has the user do after installing it.  Two guests on the static PFs, their
representors on a bridge, stream TCP both ways and ping at 100 Hz while the
controller is replaced ten times, and one of them writes its virtio-blk disk
(an aio bdev, a blk function of the same controller) with O_DIRECT meanwhile.
QEMU must never see a disconnect (its chardevs have no reconnect: a dropped
connection would be fatal), the guests' carrier never drops, the streams
and the disk's pattern arrive intact, and the controller that ends up
running holds no more fds, threads or memory than the one after the first
updates.  A malloc bdev or an engine-ABI mismatch is refused before anything
moves, and a new build that fails half-way leaves every device with the old
one.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import vfe
import json

from tests.harness.builds import build_dir, engine_of, make_build, set_engine_abi
from tests.harness.netns import NetNs
from tests.harness.service import BLK_PF_NV, ControllerService
from vfe.guest.vm import BlkDev, NetDev

pytestmark = pytest.mark.e2e

def bump_engine_abi(root: Path) -> None:
    set_engine_abi(engine_of(root), 9)


def _before_confirming(line: str):
    """A patch for a build whose takeover runs `line` at its last step, after
    it started every ring it was handed and before telling the old
    controller it did."""
    def patch(root: Path) -> None:
        p = root / "vfe" / "controller" / "update.py"
        src = p.read_text()
        anchor = '        left = sorted(daemon.inherited)\n'
        assert anchor in src
        p.write_text(src.replace(anchor, f"        {line}\n" + anchor))
    return patch


# the takeover fails there: the old controller must get the rings back intact
fail_after_rings_started = _before_confirming('raise RuntimeError("simulated failure of the new build")')
# it waits 3 s there: the window in which devices show as migrating
slow_to_confirm = _before_confirming("time.sleep(3)")


def broken_import(root: Path) -> None:
    """A build that cannot even start (a syntax error in its controller)."""
    p = root / "vfe" / "cli" / "controller.py"
    p.write_text("def broken(:\n" + p.read_text())


def virtnet(svc: ControllerService, root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`virtnet` of the build under `root` (-P: not this checkout first)."""
    env = dict(svc.env(), PYTHONPATH=str(root))
    r = subprocess.run([sys.executable, "-P", "-m", "vfe.cli.virtnet", *args], env=env,
                       capture_output=True, text=True, timeout=60)
    if check and r.returncode != 0:
        raise AssertionError(f"virtnet {' '.join(args)} exited {r.returncode}:\n{r.stderr}{r.stdout}")
    return r


def vfe_rpc(svc: ControllerService, *args: str, check: bool = True):
    r = subprocess.run([sys.executable, "-m", "vfe.cli.vfe_rpc", *args], env=svc.env(),
                       capture_output=True, text=True, timeout=60)
    if check:
        assert r.returncode == 0, f"vfe-rpc {' '.join(args)}: {r.stderr}{r.stdout}"
    return r


def wait_update(svc: ControllerService, root: Path, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = virtnet(svc, root, "update", "-t", check=False)
        if r.returncode == 0:
            st = json.loads(r.stdout)
            if st["status"] in ("success", "failed"):
                return st
        time.sleep(0.2)
    raise AssertionError(f"update did not finish:\n{svc.log()[-3000:]}")


def usage(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    return {"fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1)),
            "rss_kb": int(re.search(r"^VmRSS:\s+(\d+)", status, re.M).group(1))}


def carrier_changes(vm) -> int:
    rc, out = vm.run("cat /sys/class/net/eth0/carrier_changes")
    assert rc == 0, out
    return int(out.strip())


@pytest.fixture
def short_root():
    d = tempfile.mkdtemp(prefix="vfe-u-", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def builds_root():
    """Where the other builds are installed: a live update refuses a build
    any user but root could change, so not under /tmp."""
    with build_dir() as d:
        yield d


def test_live_update_ten_times_under_traffic(short_root, builds_root, vm_factory):
    # both builds the updates alternate between are installed where only root
    # can write: the checkout itself may be anywhere (a clone in /tmp is refused)
    builds = [make_build(builds_root / "b2", vfe.__version__ + "+lu2"),
              make_build(builds_root / "b1", vfe.__version__)]
    versions = [vfe.__version__ + "+lu2", vfe.__version__]
    broken_abi = make_build(builds_root / "b3", vfe.__version__ + "+abi", bump_engine_abi)
    failing = make_build(builds_root / "b4", vfe.__version__ + "+fail", fail_after_rings_started)
    slow = make_build(builds_root / "b5", vfe.__version__ + "+slow", slow_to_confirm)
    dead = make_build(builds_root / "b6", vfe.__version__ + "+dead", broken_import)
    with NetNs() as ns:
        svc = ControllerService(short_root / "root", ns)
        try:
            svc.mlxconfig("s", *BLK_PF_NV)
            svc.start()
            devices = svc.virtnet_json("list")["devices"][:2]
            ns.run("ip", "link", "add", "br0", "type", "bridge")
            ns.run("ip", "link", "set", "br0", "up")
            for d in devices:
                ns.run("ip", "link", "set", d["sf_rep_net_device"], "master", "br0", "up")
            img = short_root / "disk.img"
            with open(img, "wb") as f:
                f.truncate(32 << 20)
            vfe_rpc(svc, "bdev_aio_create", str(img), "Aio0")
            disk = json.loads(vfe_rpc(svc, "controller_virtio_blk_create", "mlx5_0", "--pf_id", "0",
                                      "--bdev_type", "spdk", "--bdev", "Aio0", "--num_queues", "2").stdout)
            # no reconnect: a connection QEMU loses stays lost
            vms = [vm_factory(f"u{i}", nics=[NetDev(svc.socket(d["vuid"]), mac=d["net_mac"])],
                              blks=[BlkDev(disk["socket"], num_queues=2)] if i == 0 else [])
                   for i, d in enumerate(devices)]
            for i, vm in enumerate(vms):
                vm.wait_booted(90)
                rc, out = vm.run(f"vfe-netup eth0 10.7.0.{i + 1}/24", timeout=30)
                assert rc == 0, out
            a, b = vms
            assert a.run("ping -c 2 -W 3 10.7.0.2", timeout=20)[0] == 0
            carrier = [carrier_changes(vm) for vm in vms]
            sums = {}
            for vm, name in ((a, "a"), (b, "b")):
                rc, out = vm.run(f"vfe-mkdata /tmp/data 6144", timeout=120)
                assert rc == 0, out
                sums[name] = out.strip()
            pid0 = svc.proc.pid

            rc, out = a.run("vfe-mkdata /tmp/pat 8192", timeout=120)
            assert rc == 0, out
            pat = out.strip().split()[0]

            # refused before anything moves: a malloc bdev (its data cannot
            # leave this process), and another engine ABI
            vfe_rpc(svc, "bdev_malloc_create", "-b", "M0", "8", "512")
            r = virtnet(svc, builds[0], "update", "--start", check=False)
            assert r.returncode == 1 and "malloc bdev(s) M0" in r.stderr, r.stderr
            vfe_rpc(svc, "bdev_malloc_delete", "M0")
            r = virtnet(svc, broken_abi, "update", "--start", check=False)
            assert r.returncode == 1
            assert "engine ABI is 9" in r.stderr and "not compatible" in r.stderr, r.stderr
            assert svc.proc.pid == pid0 and svc.running()

            ping = b.run_bg("ping -i 0.01 -W 1 10.7.0.1 > /tmp/ping.txt 2>&1")
            results = []
            for rnd in range(int(os.environ.get('LU_ROUNDS', 2))):
                # a stream each way, for the first five updates and again for the last five
                recv_b = b.run_bg("vfe-recv 5001 /tmp/got")
                recv_a = a.run_bg("vfe-recv 5002 /tmp/got")
                send_a = a.run_bg("vfe-send 10.7.0.2 5001 /tmp/data")
                send_b = b.run_bg("vfe-send 10.7.0.1 5002 /tmp/data")
                writes = a.run_bg("for i in 1 2 3; do dd if=/tmp/pat of=/dev/vda bs=64k oflag=direct "
                                  "2>/dev/null || exit 1; done; sync")
                time.sleep(0.5)
                for i in range(5):
                    n = rnd * 5 + i
                    root, version = builds[n % 2], versions[n % 2]
                    out = json.loads(virtnet(svc, root, "update", "--start").stdout)
                    assert out["status"] == "started" and out["to"] == version
                    st = wait_update(svc, root)
                    assert st["status"] == "success", st
                    assert st["to"] == version and st["pid"] != svc.proc.pid
                    svc.follow(st["pid"])
                    v = svc.virtnet_json("version")
                    assert v["controller"]["version"] == version and v["controller"]["pid"] == st["pid"]
                    results.append({"to": version, "gap_ms": st["gap_ms"], **usage(st["pid"])})
                    print(f"update {n + 1}: -> {version} pid {st['pid']} gap {st['gap_ms']:.1f} ms "
                          f"fds {results[-1]['fds']} threads {results[-1]['threads']} "
                          f"rss {results[-1]['rss_kb']} kB")
                for job in (send_a, send_b):
                    assert job.wait(timeout=300) == 0, job.output()
                assert recv_b.wait(timeout=120) == 0
                assert recv_a.wait(timeout=120) == 0
                assert recv_b.output().split() == [sums["a"], str(6144 << 10)]
                assert recv_a.output().split() == [sums["b"], str(6144 << 10)]
                assert writes.wait(timeout=300) == 0, writes.output()
                rc, out = a.run("dd if=/dev/vda bs=64k count=128 iflag=direct 2>/dev/null | md5sum", timeout=120)
                assert out.split()[0] == pat
                assert hashlib.md5(img.read_bytes()[:8 << 20]).hexdigest() == pat

            # a new build that fails after starting the rings it was handed:
            # the old controller keeps (and runs) every device
            before = svc.proc.pid
            virtnet(svc, failing, "update", "--start")
            st = wait_update(svc, failing)
            assert st["status"] == "failed" and "simulated failure" in st["reason"], st
            assert svc.proc.pid == before and svc.running()
            assert a.run("ping -c 3 -W 2 10.7.0.2", timeout=20)[0] == 0
            # and one that dies before it could take anything
            virtnet(svc, dead, "update", "--start")
            st = wait_update(svc, dead)
            assert st["status"] == "failed" and "went away before taking over" in st["reason"], st
            assert svc.proc.pid == before and svc.running()

            ping.kill("INT")
            time.sleep(0.5)
            rc, out = b.run("cat /tmp/ping.txt | tail -3")
            m = re.search(r"(\d+) packets transmitted, (\d+) packets received", out)
            assert m, out
            sent, got = int(m.group(1)), int(m.group(2))
            print(f"100 Hz ping over 10 updates + 2 failed ones: {sent - got} of {sent} lost; "
                  f"controller gaps {[r['gap_ms'] for r in results]} ms")
            assert [carrier_changes(vm) for vm in vms] == carrier, "a guest's link went down"

            # while the devices move, virtnet is answered: they show as
            # migrating, and a change is refused with EAGAIN (retry later)
            virtnet(svc, slow, "update", "--start")
            deadline = time.monotonic() + 30
            while True:
                listed = svc.virtnet_json("list")["devices"]
                if listed[0].get("status") == "migrating":
                    break
                assert time.monotonic() < deadline, listed
                time.sleep(0.05)
            assert all(d["status"] == "migrating" for d in listed)
            v = svc.virtnet_json("version")      # both controllers while both exist
            assert v["controller"]["pid"] == svc.proc.pid and v["update"]["version"] == vfe.__version__ + "+slow"
            assert svc.virtnet_json("query", "-p", "0")["devices"][0]["status"] == "migrating"
            r = svc.virtnet("modify", "-p", "0", "device", "-t", "1400")
            assert r.returncode == 1 and "migrating" in r.stderr and "(code -11)" in r.stderr, r.stderr
            st = wait_update(svc, slow)
            assert st["status"] == "success" and st["to"] == vfe.__version__ + "+slow", st
            svc.follow(st["pid"])
            assert "status" not in svc.virtnet_json("list")["devices"][0]
            assert a.run("ping -c 2 -W 2 10.7.0.2", timeout=20)[0] == 0
            # no growth in the process that survives: the same build after
            # update 2 and update 10 holds the same fds and threads, and no
            # more memory than noise
            first, last = results[1], results[9]
            assert first["to"] == last["to"]
            assert last["fds"] == first["fds"], results
            assert last["threads"] == first["threads"], results
            assert last["rss_kb"] < first["rss_kb"] * 1.2, results
        except BaseException:
            print(svc.log()[-8000:])
            raise
        finally:
            svc.stop()
