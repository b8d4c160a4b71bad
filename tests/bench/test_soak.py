"""Soak: does anything leak when front-ends and functions come and go?

Two runs of 1000 cycles each against one running controller:

- a vhost-user front-end connects, negotiates, starts a queue pair, moves a
  frame through the daemon and disconnects (the controller's --device mode);
- a PF is hot-plugged and unplugged (service mode, the seed's hotplug line,
  sent through the RPC as virtnet sends it).

After a warm-up (allocators and caches reach their working size) the
controller's fds, memory mappings, threads -- and for hot-plug its SFs and
the namespace's netdevs -- are snapshotted; after the run they must be back
exactly there, and RSS within 5 %.  Not a CI test (a few minutes each):

    pytest tests/bench/test_soak.py --benchmark-only -s
    VFE_SOAK_CYCLES=200 pytest tests/bench/test_soak.py --benchmark-only -s   # shorter
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

import pytest

from tests.harness.netns import NetNs
from vfe.cli import virtnet
from vfe.rpc.client import call
from vfe.testing.frontend import Frontend

from tests.e2e.service_helpers import SEED_HOTPLUG, links, make_service

pytestmark = [pytest.mark.bench, pytest.mark.e2e]
CYCLES = int(os.environ.get("VFE_SOAK_CYCLES", "1000"))
WARMUP = 30
# A hot-plug leaves reference cycles (pyroute2's request and message objects)
# that only a full GC pass frees -- one every ~130 cycles (freeze_startup_heap
# in vfe/controller/run.py): the heap and the obmalloc arenas reach their
# working size within ~200 cycles and then stay flat (measured to 3000).
# Warm up past that: after 30 cycles one more 1 MiB arena is still to come.
HOTPLUG_WARMUP = 300
RSS_SLACK = 0.05


def process_usage(pid: int) -> dict:
    """What a leak would grow: fds, mappings, threads, resident memory (KiB)."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    with open(f"/proc/{pid}/maps") as f:
        maps = f.read().splitlines()
    return {"fds": len(os.listdir(f"/proc/{pid}/fd")), "maps": len(maps),
            "threads": len(os.listdir(f"/proc/{pid}/task")), "rss_kib": rss,
            "_maps": maps}


COUNTS = ("fds", "maps", "threads")


def quiet_usage(pid: int, quiet: float = 1.0, timeout: float = 10.0) -> dict:
    """The daemon closes a client's fds when it notices the disconnect:
    sample until the counts have not moved for `quiet` seconds."""
    deadline = time.monotonic() + timeout
    last, since = process_usage(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = process_usage(pid)
        if any(now[k] != last[k] for k in COUNTS):
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return now
    return last


def check_baseline(name: str, before: dict, after: dict) -> None:
    print(f"\n{name}: before {public(before)}\n{name}: after  {public(after)}")
    gone = sorted(set(before["_maps"]) - set(after["_maps"]))
    new = sorted(set(after["_maps"]) - set(before["_maps"]))
    for key in COUNTS:
        assert after[key] == before[key], (f"{name}: {key} {before[key]} -> {after[key]}"
                                           + (f"\nmappings gone: {gone}\nnew: {new}" if key == "maps" else ""))
    growth = (after["rss_kib"] - before["rss_kib"]) / before["rss_kib"]
    assert growth <= RSS_SLACK, f"{name}: RSS grew {growth:.1%} ({before['rss_kib']} -> {after['rss_kib']} KiB)"


def public(usage: dict) -> dict:
    return {k: v for k, v in usage.items() if not k.startswith("_")}


def progress(name: str, i: int, t0: float) -> None:
    if sys.stderr.isatty() and (i % 50 == 0 or i == CYCLES):
        rate = i / max(time.monotonic() - t0, 1e-9)
        print(f"\r{name}: {i}/{CYCLES} cycles ({rate:.1f}/s)", end="", file=sys.stderr, flush=True)


def soak(benchmark, name: str, cycle, pid: int) -> None:
    """Run ``cycle`` CYCLES times (once, timed, under the benchmark) and check
    the daemon ``pid``'s fds and mappings end where they were after warm-up."""
    before = quiet_usage(pid)
    stats = {}

    def run():
        t0 = time.monotonic()
        for i in range(1, CYCLES + 1):
            cycle()
            progress(name, i, t0)
        stats["seconds"] = time.monotonic() - t0

    benchmark.pedantic(run, rounds=1, iterations=1)
    after = quiet_usage(pid)
    benchmark.extra_info.update(cycles=CYCLES, before=public(before), after=public(after), **stats)
    check_baseline(name, before, after)


def test_frontend_cycles(benchmark, controller, sockdir):
    path = os.path.join(sockdir, "soak.sock")
    ctl = controller([f"net,socket={path},queues=1"])
    pid = ctl.proc.pid
    frame = bytes.fromhex("ffffffffffff02000000000108060001") + bytes(44)

    def cycle():
        with Frontend.connect(path) as fe:
            fe.start(queue_pairs=1, queue_size=256)
            fe.send_frame(0, frame)
            assert fe.wait_tx_done(0, timeout=5), "the daemon never used the frame"

    for _ in range(WARMUP):
        cycle()
    soak(benchmark, "front-end cycles", cycle, pid)
    assert ctl.running()


def test_hotplug_cycles(benchmark):
    root = tempfile.mkdtemp(prefix="vfe-k-", dir="/tmp")
    try:
        with NetNs() as ns:
            svc = make_service(root, ns, nv=("PCI_SWITCH_EMULATION_ENABLE=1",
                                             "PCI_SWITCH_EMULATION_NUM_PORT=16",
                                             "VIRTIO_NET_EMULATION_ENABLE=1",
                                             "VIRTIO_NET_EMULATION_NUM_PF=0", "PF_TOTAL_SF=64"))
            svc.start()
            try:
                _soak_hotplug(benchmark, svc, ns)
            finally:
                svc.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _soak_hotplug(benchmark, svc, ns) -> None:
    pid = svc.proc.pid
    sock = str(svc.rpc_socket)
    method, params = virtnet.build_request(virtnet.parse_args(list(SEED_HOTPLUG)))

    def cycle():
        out = call(sock, method, params)
        call(sock, "unplug", {"pf": None, "vuid": out["vuid"]})

    def sfs_in_use() -> int:
        return sum(1 for d in call(sock, "list", {})["devices"] if d.get("sf_num") is not None)

    for _ in range(HOTPLUG_WARMUP):
        cycle()
    links0, sfs0 = links(ns), sfs_in_use()
    soak(benchmark, "hotplug/unplug cycles", cycle, pid)
    assert links(ns) == links0, "netdevs left in the namespace"
    assert sfs_in_use() == sfs0, "SFs still in use"
    assert not [p for p in svc.run_dir.iterdir() if p.name.startswith("VNETS")], "sockets left"
