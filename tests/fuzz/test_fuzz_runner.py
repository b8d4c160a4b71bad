"""scripts/fuzz itself: findings, the instrumented engine, the fallback."""
import os
import shutil
import subprocess
import sys

import pytest

from tests.fuzz.runner import REPO

FAILING_TARGET = '''"""Fails on inputs starting with B."""
NATIVE = False

def fuzz_one(data):
    if data[:1] == b"B":
        raise ValueError("found the B")
'''

ENGINE_TARGET = '''"""Drives the compiled engine a little."""
import struct
from vfe import _engine

def setup():
    global device
    device = _engine.Engine(workers=1).new_net_device(2)

def fuzz_one(data):
    if len(data) >= 8:
        device.set_features(struct.unpack_from("<Q", data)[0])
'''


def fuzz(*args, env=None, timeout=180):
    proc = subprocess.run([sys.executable, "-m", "tests.fuzz.runner", *map(str, args)],
                          cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def test_list_names_the_targets():
    rc, out, _ = fuzz("--list")
    assert rc == 0
    assert any(line.split()[0] == "protocol" for line in out.splitlines())


def test_a_finding_exits_1_and_saves_the_input(tmp_path):
    target = tmp_path / "target_fails.py"
    target.write_text(FAILING_TARGET)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "seed").write_bytes(b"Bad input")
    rc, out, err = fuzz(target, "--runs", 100, "--corpus", corpus,
                        "--findings", tmp_path / "found")
    assert rc == 1, out + err
    assert "FINDING" in out and "found the B" in err
    saved = [line.split(" saved in ")[1] for line in err.splitlines() if " saved in " in line]
    assert len(saved) == 1 and os.path.dirname(saved[0]) == str(tmp_path / "found")
    with open(saved[0], "rb") as f:
        assert f.read() == b"Bad input"
    # and the saved input replays as a finding
    rc, out, _ = fuzz(target, "--replay", saved[0])
    assert rc == 1 and "FINDING" in out


def test_clean_run_exits_0_with_a_summary(tmp_path):
    target = tmp_path / "target_quiet.py"
    target.write_text(FAILING_TARGET.replace('data[:1] == b"B"',
                                             'hashlib.sha256(data).digest()[:8] == bytes(8)')
                      .replace("NATIVE = False", "import hashlib\nNATIVE = False"))
    rc, out, err = fuzz(target, "--runs", 500, "--corpus", tmp_path / "corpus",
                        "--findings", tmp_path / "found")
    assert rc == 0, out + err
    (summary,) = [line for line in out.splitlines() if line.startswith("fuzz quiet:")]
    assert "no findings" in summary and "500 inputs" in summary, summary
    assert not os.listdir(tmp_path / "found")


@pytest.mark.skipif(shutil.which("clang") is None, reason="clang is not installed")
def test_engine_runs_instrumented(tmp_path):
    target = tmp_path / "target_engine.py"
    target.write_text(ENGINE_TARGET)
    rc, out, err = fuzz(target, "--runs", 2000, "--corpus", tmp_path / "corpus",
                        "--findings", tmp_path / "found", timeout=300)
    assert rc == 0, out + err
    assert "native + Python" in out
    with open(os.path.join(REPO, "build", "fuzz", "logs", "engine.log")) as f:
        log = f.read()
    assert "inline 8-bit counters" in log            # libFuzzer sees the engine's edges
    assert "in __pyx_" in log or "cov: " in log


def test_without_clang_it_says_so_and_fuzzes_python_only(tmp_path):
    target = tmp_path / "target_engine.py"
    target.write_text(ENGINE_TARGET)
    env = dict(os.environ, PATH="/nonexistent")
    rc, out, err = fuzz(target, "--runs", 200, "--corpus", tmp_path / "corpus",
                        "--findings", tmp_path / "found", env=env)
    assert rc == 0, out + err
    assert "NOTICE: native coverage of vfe._engine is OFF" in err
    assert "clang is not installed" in err
    assert "Python only" in out
