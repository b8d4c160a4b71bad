"""The guest image's C tools (vfe/guest/files/*.c): compiled static, a missing
compiler or static libc is a clear error, and the initramfs is rebuilt when
a tool's source changes (the inputs hash)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vfe.guest import guest_image

needs_gcc = pytest.mark.skipif(shutil.which(guest_image.CC) is None, reason="no gcc")


def test_every_c_file_is_a_tool_not_a_script():
    assert [p.name for p in guest_image.guest_tool_sources()] == ["vfe-blkbench.c", "vfe-zeroout.c"]


@needs_gcc
def test_zeroout_builds_static_and_checks_its_arguments(tmp_path):
    exe = tmp_path / "vfe-zeroout"
    guest_image.build_tool(guest_image.GUEST_FILES / "vfe-zeroout.c", exe)
    assert b"/lib64/ld-linux" not in exe.read_bytes()[:4096]
    proc = subprocess.run([str(exe), "/dev/null", "x", "4096"], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage: vfe-zeroout" in proc.stderr
    # not a block device: the ioctl fails with a clear message, exit 1
    f = tmp_path / "plain"
    f.write_bytes(b"\1" * 8192)
    proc = subprocess.run([str(exe), str(f), "0", "4096"], capture_output=True, text=True)
    assert proc.returncode == 1 and "BLKZEROOUT 0+4096" in proc.stderr
    assert f.read_bytes() == b"\1" * 8192


@needs_gcc
def test_tool_builds_static_and_runs(tmp_path):
    exe = tmp_path / "vfe-blkbench"
    guest_image.build_tool(guest_image.GUEST_FILES / "vfe-blkbench.c", exe)
    assert b"/lib64/ld-linux" not in exe.read_bytes()[:4096]
    # usage errors exit 2 with a message and no JSON on stdout
    proc = subprocess.run([str(exe), "-j", "0", "/dev/null"], capture_output=True, text=True)
    assert proc.returncode == 2 and "jobs must be 1..64" in proc.stderr and proc.stdout == ""


@needs_gcc
def test_a_broken_tool_fails_the_build_with_the_compiler_message(tmp_path):
    src = tmp_path / "broken.c"
    src.write_text("int main(void) { return undeclared; }\n")
    with pytest.raises(RuntimeError, match=r"(?s)building guest tool broken.c failed.*undeclared"):
        guest_image.build_tool(src, tmp_path / "broken")


def test_missing_compiler_names_the_packages(monkeypatch):
    monkeypatch.setattr(guest_image, "CC", "vfe-no-such-cc")
    with pytest.raises(RuntimeError, match=r"vfe-no-such-cc not found.*libc6-dev"):
        guest_image.compiler_identity()


@needs_gcc
@pytest.mark.skipif(not guest_image.BUSYBOX.exists(), reason="no busybox")
def test_inputs_hash_follows_the_tool_source(tmp_path, monkeypatch):
    guest = tmp_path / "guest"
    shutil.copytree(guest_image.GUEST_FILES, guest)
    monkeypatch.setattr(guest_image, "GUEST_FILES", guest)
    h1 = guest_image._inputs_hash("v", tmp_path, [])
    assert guest_image._inputs_hash("v", tmp_path, []) == h1
    src: Path = guest / "vfe-blkbench.c"
    src.write_text(src.read_text() + "\n/* changed */\n")
    assert guest_image._inputs_hash("v", tmp_path, []) != h1
