"""The wheel ships the product and nothing of the test environment: no
top-level `qemu` package (pip's qemu.qmp owns that namespace), no harness
for testpmd, OVS, network namespaces, qemu-storage-daemon or blkbench, and
every console script's target importable from the wheel's files alone.

The Python side of the wheel is what setuptools' build_py puts in its build
directory (bdist_wheel adds the compiled engine and the metadata); the
package list and package data come from pyproject.toml as for the wheel.
Building it that way takes about a second and compiles nothing."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: What a user testing a vhost-user back-end of their own imports (docs/testing.md).
TESTING_MODULES = {"__init__", "channel", "frontend", "guest_ram", "packed_ring", "ring"}

#: Environment harnesses (tests/harness): none of these names anywhere in the wheel.
HARNESSES = {"testpmd", "pmd_backends", "pmd_measure", "ovs", "netns", "qsd", "blkbench",
             "engine_rig", "vhost_harness", "guarded", "unprivileged", "backlog"}


@pytest.fixture(scope="module")
def wheel_tree(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-c", "from setuptools import setup; setup()", "-q",
         "egg_info", "--egg-base", str(out), "build_py", "--build-lib", str(out / "lib")],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return out / "lib"


def test_only_the_vfe_package_at_the_top(wheel_tree):
    assert sorted(p.name for p in wheel_tree.iterdir()) == ["vfe"]


def test_no_environment_harness(wheel_tree):
    modules = {p.relative_to(wheel_tree).with_suffix("").as_posix() for p in wheel_tree.rglob("*.py")}
    assert {m.rsplit("/", 1)[-1] for m in modules} & HARNESSES == set()
    assert {m.rsplit("/", 1)[-1] for m in modules if m.startswith("vfe/testing/")} == TESTING_MODULES


def test_guest_files_are_package_data(wheel_tree):
    files = {p.name for p in (wheel_tree / "vfe" / "guest" / "files").iterdir()}
    assert {"init", "vfe-netup", "vfe-blkbench.c"} <= files


def test_console_scripts_import_from_the_wheel_alone(wheel_tree):
    """Each target "module:function" imports with only the wheel's files on
    the path for vfe (plus the compiled engine, which the wheel carries)."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    engine = importlib.util.find_spec("vfe._engine")
    if engine is not None and engine.origin:
        shutil.copy(engine.origin, wheel_tree / "vfe")
    check = "\n".join(
        ["import importlib", "import vfe",
         f"assert vfe.__file__.startswith({str(wheel_tree)!r}), vfe.__file__"]
        + [f"assert callable(getattr(importlib.import_module({m!r}), {f!r})), {name!r}"
           for name, target in sorted(scripts.items()) for m, f in [target.split(":")]])
    # -P: the current directory (maybe a checkout) is not on the path; the wheel's files are first
    proc = subprocess.run([sys.executable, "-P", "-c", check], cwd="/", capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(wheel_tree)))
    assert proc.returncode == 0, proc.stderr
