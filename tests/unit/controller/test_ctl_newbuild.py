"""The new build of a live update (vfe/controller/newbuild.py): only a build
nobody but root can change is run, and the new process loads the very
engine whose ABI was checked, whatever happens to the file afterwards."""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import vfe
from tests.harness.builds import build_dir, engine_of, make_build
from vfe.controller.newbuild import BuildError, check_build, load_engine, pin_engine
from vfe.engine import ENGINE_ABI
from vfe.engine.abi import AbiError, read_abi

OTHER_UID = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, /run)")


@pytest.fixture
def builds():
    if os.geteuid() != 0:
        pytest.skip("test builds live under /run (root's)")
    with build_dir() as d:
        yield d


@pytest.fixture
def build(builds):
    return make_build(builds / "b2", vfe.__version__ + "+t")


def test_a_root_build_is_accepted(build):
    assert check_build(str(build)) == str(build)


def test_a_build_under_tmp_is_refused(tmp_path):
    """/tmp is sticky, but a build there is still in a directory everyone
    writes: refused (no sticky exception for code root runs)."""
    b = make_build(tmp_path / "b", vfe.__version__ + "+tmp")
    with pytest.raises(BuildError, match=r"the directory /tmp is writable by others \(its group and everyone, mode 1777\)"):
        check_build(str(b))


def test_a_build_in_a_world_writable_directory_is_refused(builds):
    ww = builds / "ww"
    ww.mkdir()
    os.chmod(ww, 0o777)
    b = make_build(ww / "b", vfe.__version__ + "+ww")
    with pytest.raises(BuildError, match=f"the directory {ww} is writable by others \\(its group and everyone"):
        check_build(str(b))


@pytest.mark.parametrize("what", ["vfe", "vfe/controller", "vfe/controller/update.py", "engine"])
def test_a_group_writable_part_of_the_build_is_refused(build, what):
    path = engine_of(build) if what == "engine" else build / what
    os.chmod(path, os.stat(path).st_mode | 0o020)
    with pytest.raises(BuildError, match=f"{path} is writable by others \\(its group, mode"):
        check_build(str(build))


@needs_root
@pytest.mark.parametrize("what", ["", "vfe", "vfe/cli/controller.py", "engine"])
def test_a_build_owned_by_another_uid_is_refused(build, what):
    path = engine_of(build) if what == "engine" else build / what
    os.chown(path, OTHER_UID, -1)
    with pytest.raises(BuildError, match=f"{str(path).rstrip('/')} is owned by uid {OTHER_UID}"):
        check_build(str(build))


def test_symlinks_in_the_build_and_other_mistakes_are_refused(build, builds):
    (build / "vfe" / "evil.py").symlink_to("/tmp/evil.py")
    with pytest.raises(BuildError, match="evil.py is a symlink"):
        check_build(str(build))
    with pytest.raises(BuildError, match="absolute path"):
        check_build("relative/build")
    with pytest.raises(BuildError, match="absolute path"):
        check_build(None)
    (builds / "empty").mkdir()
    with pytest.raises(BuildError, match="does not exist"):
        check_build(str(builds / "empty"))


def test_the_pinned_engine_is_a_sealed_copy_with_the_files_abi(build):
    fd, so = pin_engine(str(build))
    try:
        assert so == str(engine_of(build))
        assert read_abi(fd, name=so) == ENGINE_ABI
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", 0)
        with open(so, "rb") as f:
            assert os.pread(fd, 1 << 24, 0) == f.read()
    finally:
        os.close(fd)


def _engine_loaded_by_a_new_process(build: Path, fd: int) -> str:
    """What a new controller process started on `build` with --engine-fd
    imports: its engine's ABI, where its package and its engine came from."""
    code = ("import sys; from vfe.controller.newbuild import load_engine; load_engine(int(sys.argv[1])); "
            "import vfe, vfe.engine; print(vfe.engine.ENGINE_ABI, vfe.__file__, vfe._engine.__file__)")
    r = subprocess.run([sys.executable, "-P", "-c", code, str(fd)], pass_fds=[fd], capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(build)))
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.mark.parametrize("swap", ["renamed over", "rewritten in place"])
def test_a_swap_of_the_engine_after_the_check_cannot_take_effect(build, swap):
    """After the check the file is replaced by something that is no engine
    at all (a copy of /bin/true): the new process still imports the engine
    that was checked -- importing the file now would fail."""
    fd, so = pin_engine(str(build))
    try:
        assert read_abi(fd, name=so) == ENGINE_ABI             # what was checked
        if swap == "renamed over":
            shutil.copy("/bin/true", build / "swapped")
            os.rename(build / "swapped", so)
        else:
            with open(so, "r+b") as f:                          # same inode, other bytes
                f.truncate(0)
                f.write(Path("/bin/true").read_bytes())
        with pytest.raises(AbiError, match="no vfe_engine_abi symbol"):
            read_abi(so)                                        # the file is no engine now
        abi, pkg, loaded_from = _engine_loaded_by_a_new_process(build, fd).split()
        assert int(abi) == ENGINE_ABI                           # the process runs what was checked
        assert pkg == str(build / "vfe" / "__init__.py")        # with the new build's modules
        assert loaded_from.startswith("/proc/self/fd/")
    finally:
        os.close(fd)


def test_load_engine_takes_only_a_sealed_memfd_before_any_engine_import():
    with pytest.raises(RuntimeError, match="imported before"):      # this process has one loaded
        load_engine(0)
    unsealed = os.memfd_create("x", os.MFD_ALLOW_SEALING)     # writable: could change after a check
    code = "import sys; from vfe.controller.newbuild import load_engine; load_engine(int(sys.argv[1]))"
    r = subprocess.run([sys.executable, "-c", code, str(unsealed)], pass_fds=[unsealed], capture_output=True,
                       text=True, timeout=60)
    os.close(unsealed)
    assert r.returncode != 0 and "is not a sealed memfd" in r.stderr, r.stderr
