"""504 VFs (4 static PFs x 126) created, listed and destroyed, three times:
how long each step takes (pytest-benchmark), and that nothing is left over
afterwards -- fds of the controller, SFs, representor netdevs, sockets,
recovery files.  Not a timed test: the numbers are reported, not asserted.

    pytest tests/bench/test_sriov_scale.py --benchmark-only
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from tests.harness.netns import NetNs
from tests.harness.service import ControllerService

pytestmark = [pytest.mark.bench, pytest.mark.e2e]
PFS, VFS = 4, 126


def sriov(svc, pf, n):
    r = subprocess.run([sys.executable, "-m", "vfe.cli.sriov", "-p", str(pf), str(n)], env=svc.env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr


def test_504_vfs_three_rounds(benchmark):
    root = tempfile.mkdtemp(prefix="vfe-b-", dir="/tmp")
    timings = {"create": [], "list": [], "destroy": []}
    try:
        with NetNs() as ns:
            svc = ControllerService(root, ns)
            svc.mlxconfig("s", "SRIOV_EN=1", f"VIRTIO_NET_EMULATION_NUM_VF={VFS}",
                          f"VIRTIO_NET_EMULATION_NUM_PF={PFS}", "PF_TOTAL_SF=508",
                          "VIRTIO_NET_EMULATION_NUM_MSIX=4", "NUM_VF_MSIX=4")
            svc.start()
            try:
                pid = svc.proc.pid
                fds0 = len(os.listdir(f"/proc/{pid}/fd"))
                links0 = ns.run("ip", "-br", "link").stdout

                def one_round():
                    t0 = time.perf_counter()
                    for pf in range(PFS):
                        sriov(svc, pf, VFS)
                    t1 = time.perf_counter()
                    devs = svc.virtnet_json("list")["devices"]
                    t2 = time.perf_counter()
                    assert sum(d["function_type"] == "VF" for d in devs) == PFS * VFS
                    for pf in range(PFS):
                        sriov(svc, pf, 0)
                    t3 = time.perf_counter()
                    timings["create"].append(t1 - t0)
                    timings["list"].append(t2 - t1)
                    timings["destroy"].append(t3 - t2)

                benchmark.pedantic(one_round, rounds=3, iterations=1)
                assert len(os.listdir(f"/proc/{pid}/fd")) == fds0
                assert ns.run("ip", "-br", "link").stdout == links0
                assert not [p for p in svc.run_dir.iterdir() if "VF" in p.name]
                assert not list(svc.recovery_dir.glob("*VF*.json"))
                pool = json.loads((svc.root / "var/lib/vfe/sf_pool.mlx5_0.json").read_text())
                print(f"\nSF pool after 3 rounds: {json.dumps(pool)[:200]}")
            finally:
                svc.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    benchmark.extra_info.update({k: [round(x, 3) for x in v] for k, v in timings.items()})
    print("\n504 VFs, seconds per round: " +
          "; ".join(f"{k} {', '.join(f'{x:.2f}' for x in v)}" for k, v in timings.items()))
