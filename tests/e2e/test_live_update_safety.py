"""A live update runs only what root installed (issue 11, finding 5), against
a real controller service (no guests: nothing here needs traffic).

- `update_start` names a build; one that any user but root could change is
  refused before anything moves: in a world-writable directory, with a
  group-writable package directory, owned by another uid.
- The caller cannot choose the interpreter: a `python` parameter is refused.
- The engine the new process runs is the one whose ABI was checked: a new
  build that is slow to start has its engine file swapped for something
  that is no engine right after `update --start` answered; the update still
  succeeds, with the checked engine (before, the new process imported the
  swapped file and died).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import vfe
from tests.harness.builds import build_dir, engine_of, make_build
from tests.harness.netns import NetNs
from tests.harness.service import ControllerService
from vfe.rpc.client import RpcError, call

pytestmark = pytest.mark.e2e

OTHER_UID = 65534


def virtnet(svc: ControllerService, root: Path, *args: str) -> subprocess.CompletedProcess:
    """`virtnet` of the build under `root` (the build being installed)."""
    env = dict(svc.env(), PYTHONPATH=str(root))
    return subprocess.run([sys.executable, "-P", "-m", "vfe.cli.virtnet", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def wait_update(svc: ControllerService, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = svc.virtnet_json("update", "-t")
        if st["status"] in ("success", "failed"):
            return st
        time.sleep(0.2)
    raise AssertionError(f"update did not finish:\n{svc.log()[-3000:]}")


def slow_to_start(root: Path) -> None:
    """The new controller sleeps 2 s before anything else: the window in
    which the test swaps the engine file."""
    p = root / "vfe" / "cli" / "controller.py"
    src = p.read_text()
    anchor = "    raw_argv = list(sys.argv[1:] if argv is None else argv)\n"
    assert anchor in src
    p.write_text(src.replace(anchor, anchor + "    import time\n    time.sleep(2)\n", 1))


@pytest.fixture
def service():
    root = Path(tempfile.mkdtemp(prefix="vfe-us-", dir="/tmp"))
    with NetNs() as ns:
        svc = ControllerService(root / "root", ns)
        try:
            svc.start()
            yield svc
        except BaseException:
            print(svc.log()[-6000:])
            raise
        finally:
            svc.stop()
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def builds():
    with build_dir() as d:
        yield d


def refused(svc: ControllerService, build: Path, needle: str) -> None:
    pid = svc.proc.pid
    r = virtnet(svc, build, "update", "--start")
    assert r.returncode == 1 and needle in r.stderr and "(code -1)" in r.stderr, r.stderr
    assert svc.virtnet_json("update", "-t")["status"] == "idle"          # nothing moved
    assert svc.proc.pid == pid and svc.running()


def test_builds_others_could_change_are_refused(service, builds):
    ww = builds / "ww"
    ww.mkdir()
    os.chmod(ww, 0o777)
    refused(service, make_build(ww / "b", vfe.__version__ + "+ww"),
            f"the directory {ww} is writable by others (its group and everyone")

    b = make_build(builds / "gw", vfe.__version__ + "+gw")
    os.chmod(b / "vfe", 0o775)
    refused(service, b, f"{b}/vfe is writable by others (its group, mode 0775)")

    b = make_build(builds / "uid", vfe.__version__ + "+uid")
    for dirpath, dirnames, filenames in os.walk(b):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), OTHER_UID, -1)
    os.chown(b, OTHER_UID, -1)
    refused(service, b, f"{b} is owned by uid {OTHER_UID}")


def test_the_interpreter_cannot_be_chosen(service, builds):
    b = make_build(builds / "b", vfe.__version__ + "+py")
    with pytest.raises(RpcError) as ei:
        call(service.rpc_socket, "update_start", {"path": str(b), "python": "/bin/sh"})
    assert ei.value.code == -22 and "takes only path, not python" in ei.value.message
    assert service.virtnet_json("update", "-t")["status"] == "idle"


def test_a_swap_of_the_engine_after_the_check_cannot_take_effect(service, builds):
    b = make_build(builds / "slow", vfe.__version__ + "+slow", slow_to_start)
    r = virtnet(service, b, "update", "--start")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "started"
    # checked, and now swapped for a file that is no engine at all: a new
    # process importing the file would die on it
    shutil.copy("/bin/true", b / "swapped")
    os.rename(b / "swapped", engine_of(b))
    st = wait_update(service)
    assert st["status"] == "success", st                 # the checked engine runs, not the file's
    service.follow(st["pid"])
    assert service.virtnet_json("version")["controller"]["version"] == vfe.__version__ + "+slow"
    assert len(service.virtnet_json("list")["devices"]) > 0
