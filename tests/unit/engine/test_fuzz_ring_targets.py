"""The ring fuzz targets (tests/fuzz/target_{net,blk}_ring.py) as regression
tests: every committed input -- the seed corpus and each crash the fuzzing
found (tests/fuzz/regressions/<target>/) -- runs through the target in a
forked child (a crash fails the test naming the signal), then a few
thousand random inputs do.  The seeds reach what they are named for
(make_seeds.py): frames delivered, each request type served."""
from __future__ import annotations

import importlib
import os
import random

from tests.harness.guarded import run_forked

FUZZ = os.path.join(os.path.dirname(__file__), "..", "..", "fuzz")


def _inputs(name: str) -> list[str]:
    out = []
    for sub in ("corpus", "regressions"):
        d = os.path.join(FUZZ, sub, name)
        if os.path.isdir(d):
            out += sorted(os.path.join(d, f) for f in os.listdir(d))
    return out


def _replay(target: str, corpus: str, random_inputs: int) -> dict:
    mod = importlib.import_module(f"tests.fuzz.{target}")
    mod.setup()
    seen = {}
    for path in _inputs(corpus):
        with open(path, "rb") as f:
            mod.fuzz_one(f.read())
        seen[os.path.basename(path)] = _outcome(mod, target)
    rnd = random.Random(11)
    for _ in range(random_inputs):
        mod.fuzz_one(rnd.randbytes(rnd.randrange(600)))
    return seen


def _outcome(mod, target: str):
    if target == "target_net_ring":
        b = mod._rig.b
        return {"tx": mod._rig.a.ring_state(1)["broken"], "rx": b.ring_state(0)["broken"],
                "received": b.ring_stats(0)["packets"]}
    return {"broken": mod.last_device.ring_state(0)["broken"]}


def test_net_ring_target_replays_its_inputs():
    seen = run_forked(_replay, "target_net_ring", "net_ring", 3000, timeout=120)
    assert len(seen) >= 10
    # frames went through: the receiver's count grows over the seeds that deliver
    assert seen["plain"]["tx"] == 0 and seen["plain"]["received"] >= 1
    assert seen["head_out_of_range"]["tx"] == 1 and seen["rx_bad_head"]["rx"] == 1
    assert seen["soft_tso"]["received"] - seen["soft_csum"]["received"] >= 2   # segments


def test_blk_ring_target_replays_its_inputs():
    seen = run_forked(_replay, "target_blk_ring", "blk_ring", 3000, timeout=120)
    assert len(seen) >= 10
    assert seen["duplicate_head"]["broken"] == 14                   # E_DUP
    assert seen["head_out_of_range"]["broken"] == 1                 # E_HEAD
    for name in ("read", "write", "flush", "get_id", "discard", "write_zeroes",
                 "inflight_resubmit"):
        assert seen[name]["broken"] == 0, name
