"""Drive the guest's block benchmark, /bin/vfe-blkbench (vfe/guest/files/vfe-blkbench.c).

    res = blkbench.run(vm, "/dev/vda", mode="randread", bs=4096, jobs=2, depth=16, seconds=3)
    res["iops"], res["mib_s"], res["lat_p99_us"]

The tool prints one JSON line; ``run`` returns it as a dict (plus ``exit``,
the tool's exit status: 1 when a request failed or a pattern mismatched).
``pattern_word`` is the tool's data pattern (``-p``), for checking what it
wrote with other means.
"""
from __future__ import annotations

import json

TOOL = "vfe-blkbench"
PATTERN_MUL = 0x9E3779B97F4A7C15
MODES = ("randread", "seqread", "randwrite", "seqwrite")
KEYS = ("tool", "version", "device", "mode", "bs", "jobs", "depth", "offset", "size", "direct",
        "pattern", "seconds", "ops", "bytes", "iops", "mib_s", "lat_avg_us", "lat_p50_us",
        "lat_p99_us", "lat_max_us", "errors", "mismatches", "first_error")


class BlkbenchError(RuntimeError):
    pass


def pattern_word(offset: int, seed: int = 1) -> int:
    """The 64-bit word the tool's pattern puts at device byte ``offset``."""
    return (((offset + 1) * PATTERN_MUL) & 0xFFFF_FFFF_FFFF_FFFF) ^ seed


def pattern_bytes(offset: int, length: int, seed: int = 1) -> bytes:
    return b"".join(pattern_word(offset + i, seed).to_bytes(8, "little")
                    for i in range(0, length, 8))


def command(device: str, mode: str = "randread", bs: int = 4096, jobs: int = 1,
            depth: int = 1, seconds: float = 1.0, ops: int = 0, offset: int = 0,
            size: int = 0, seed: int = 1, pattern: bool = False) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    argv = [TOOL, "-m", mode, "-b", str(bs), "-j", str(jobs), "-d", str(depth),
            "-T", f"{seconds:g}", "-n", str(ops), "-o", str(offset), "-S", str(seed)]
    if size:
        argv += ["-s", str(size)]
    if pattern:
        argv.append("-p")
    return " ".join(argv + [device])


def parse(output: str) -> dict:
    """The tool's JSON line out of the command's output."""
    for line in reversed(output.splitlines()):
        line = line.strip()
        if line.startswith('{"tool":"vfe-blkbench"'):
            try:
                res = json.loads(line)
            except ValueError as e:
                raise BlkbenchError(f"bad JSON from {TOOL}: {e}: {line!r}") from None
            missing = [k for k in KEYS if k not in res]
            if missing:
                raise BlkbenchError(f"{TOOL} output lacks {missing}: {line!r}")
            return res
    raise BlkbenchError(f"no result line from {TOOL}:\n{output[-2000:]}")


def run(vm, device: str, timeout: float | None = None, check: bool = True, **kw) -> dict:
    """Run the tool in ``vm`` (a vfe.guest.vm.VM); return its result dict.
    check=True raises BlkbenchError unless it exited 0 (no I/O error, no
    mismatch)."""
    cmd = command(device, **kw)
    if timeout is None:
        timeout = (kw.get("seconds") or 10.0) + 60.0
    rc, out = vm.run(cmd, timeout=timeout)
    if rc == 2 or (check and rc != 0):
        raise BlkbenchError(f"{cmd} exited {rc}:\n{out[-2000:]}")
    res = parse(out)
    res["exit"] = rc
    return res
