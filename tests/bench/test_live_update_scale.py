"""A live update of a controller with 504 VFs (4 static PFs x 126): how long
from `virtnet update --start` to success, and the data-path gap the new
controller reports.  Not a timed test: the numbers are reported.

    pytest tests/bench/test_live_update_scale.py --benchmark-only
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import vfe
from tests.e2e.test_live_update import make_build, virtnet, wait_update
from tests.harness.builds import build_dir
from tests.harness.netns import NetNs
from tests.harness.service import ControllerService

pytestmark = [pytest.mark.bench, pytest.mark.e2e]
PFS, VFS = 4, 126


def test_live_update_of_504_vfs(benchmark):
    root = Path(tempfile.mkdtemp(prefix="vfe-b-", dir="/tmp"))
    bdir = build_dir()                  # not /tmp: a live update refuses builds others could change
    installed = bdir.__enter__()
    builds = [make_build(installed / "b2", vfe.__version__ + "+scale"),
              make_build(installed / "b1", vfe.__version__)]      # the checkout may sit in /tmp
    gaps, totals = [], []
    try:
        with NetNs() as ns:
            svc = ControllerService(root / "root", ns)
            svc.mlxconfig("s", "SRIOV_EN=1", f"VIRTIO_NET_EMULATION_NUM_VF={VFS}",
                          f"VIRTIO_NET_EMULATION_NUM_PF={PFS}", "PF_TOTAL_SF=508",
                          "VIRTIO_NET_EMULATION_NUM_MSIX=4", "NUM_VF_MSIX=4")
            svc.start()
            try:
                for pf in range(PFS):
                    r = subprocess.run([sys.executable, "-m", "vfe.cli.sriov", "-p", str(pf), str(VFS)],
                                       env=svc.env(), capture_output=True, text=True, timeout=600)
                    assert r.returncode == 0, r.stderr
                n = len(svc.virtnet_json("list")["devices"])

                def one_update():
                    build = builds[len(gaps) % 2]
                    t0 = time.monotonic()
                    virtnet(svc, build, "update", "--start")
                    st = wait_update(svc, build, timeout=600)
                    assert st["status"] == "success", st
                    totals.append(time.monotonic() - t0)
                    gaps.append(st["gap_ms"])
                    svc.follow(st["pid"])

                benchmark.pedantic(one_update, rounds=2, iterations=1)
                assert len(svc.virtnet_json("list")["devices"]) == n
            finally:
                svc.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
        bdir.__exit__(None, None, None)
    benchmark.extra_info.update({"functions": n, "gap_ms": gaps, "seconds": [round(t, 2) for t in totals]})
    print(f"\nlive update of {n} functions: gap {gaps} ms, {[f'{t:.1f}' for t in totals]} s each")
