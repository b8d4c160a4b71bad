"""CI's share of the fuzzing: each target runs for a minute from its committed
corpus through scripts/fuzz, and any finding fails the test (its input is
saved under the test's temporary directory; the failure message says where).

VFE_FUZZ_SMOKE_SECONDS shortens (or lengthens) the minute.
"""
import os
import re
import subprocess
import sys

import pytest

from tests.fuzz.runner import FUZZ_DIR, REPO

TARGETS = ["protocol", "net_ring", "blk_ring"]
SECONDS = int(os.environ.get("VFE_FUZZ_SMOKE_SECONDS", "60"))


@pytest.mark.timeout(SECONDS + 240)      # + the instrumented build on a fresh machine
@pytest.mark.parametrize("target", TARGETS)
def test_target_runs_clean_from_its_corpus(target, tmp_path):
    # every target is merged now: a missing one is a failure, not a skip
    assert os.path.exists(os.path.join(FUZZ_DIR, f"target_{target}.py")), f"no target_{target}.py"
    findings = tmp_path / "findings"
    proc = subprocess.run(
        [os.path.join(REPO, "scripts", "fuzz"), target, "--seconds", str(SECONDS),
         "--corpus", str(tmp_path / "corpus"), "--findings", str(findings)],
        cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=SECONDS + 230)
    out = proc.stdout + proc.stderr
    saved = sorted(os.listdir(findings)) if findings.exists() else []
    assert proc.returncode == 0 and not saved, (
        f"scripts/fuzz {target} exited {proc.returncode}, inputs saved: "
        f"{[str(findings / f) for f in saved]}\n{out[-6000:]}")
    summary = [line for line in proc.stdout.splitlines() if line.startswith(f"fuzz {target}:")]
    assert summary and "no findings" in summary[-1], out
    runs = int(re.search(r"([\d,]+) inputs", summary[-1]).group(1).replace(",", ""))
    assert runs > 0, summary[-1]
    print(summary[-1], file=sys.stderr)
