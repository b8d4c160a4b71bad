"""virtio-blk from a Linux guest: our daemon against qemu-storage-daemon.

Two guests, identical (``-smp 2``, 256 MiB, vhost-user-blk-pci with
``num-queues=2``, queue-size 128), each with two disks: vda = null (1 GiB),
vdb = RAM (256 MiB).  Guest "vfe" is served by our daemon
(``--mode adaptive``, 1 worker: ``bdev=null`` and ``bdev=malloc``), guest
"qsd" by qemu-storage-daemon (``null-co,read-zeroes=on`` and a file on
/dev/shm, ``cache.direct=off,aio=io_uring``: see tests/harness/qsd.py).  The
RAM disks are written in full once before measuring, so both back-ends serve
real pages.

The guest tool /bin/vfe-blkbench (vfe/guest/files/vfe-blkbench.c: O_DIRECT,
native AIO) runs each workload against both back-ends alternately, the same
number of requests each time (calibrated by a warm-up on ours to about
VFE_BLKBENCH_SECONDS):

  randread-4k   4 KiB random reads, 2 threads x 16 in flight   (IOPS)
  seqread-1m    1 MiB sequential reads, 2 threads x 4           (MiB/s)
  seqwrite-1m   1 MiB sequential writes, 2 threads x 4 (RAM disk only)

The timed quantity (pytest-benchmark) is the wall time our daemon needs for
those requests (guest tool start to exit, through the serial console); the
reference's run of the same round is the untimed setup.  ``extra_info`` and
the line printed per workload carry the guest-measured rates of both, the
ours/reference ratio (of the medians; also each round's ratio and their
median), the back-ends' CPU use and how much CPU other processes took
meanwhile (the machine is shared).  No assertion on
speed: the numbers go to docs/performance.md.

    pytest tests/bench/test_blk_qsd.py --benchmark-only
    VFE_BLKBENCH_ROUNDS=5 VFE_BLKBENCH_SMP=1 VFE_BLKBENCH_QUEUES=1 pytest ... -k randread

Environment: VFE_BLKBENCH_ROUNDS (5), VFE_BLKBENCH_SECONDS (3), VFE_BLKBENCH_SMP
(2), VFE_BLKBENCH_QUEUES (2), VFE_BLKBENCH_JOBS (= queues), VFE_BLKBENCH_WORKERS
(our --workers, 1), VFE_BLKBENCH_VFE_ARGS (more controller arguments, e.g.
"--spin-us 0"), VFE_BLKBENCH_QSD_AIO (io_uring|threads|native),
VFE_BLKBENCH_WAIT_QUIET (before each run, wait up to this many seconds, 20,
for other processes to use < 0.1 cores; 0 = don't wait).
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass

import pytest

from tests.guest_fixtures import vm_pool
from tests.harness import blkbench
from tests.harness.pmd_measure import CpuWatch
from tests.harness.qsd import QsdExport, StorageDaemon, qsd_available
from vfe.guest.controller_process import ControllerProcess
from vfe.guest.vm import BlkDev

pytestmark = [
    pytest.mark.bench,
    pytest.mark.e2e,
    pytest.mark.skipif(not qsd_available(), reason="qemu-storage-daemon not installed "
                                                   "(package qemu-system-common)"),
]


def _env(name: str, default: int | float | str):
    v = os.environ.get(name)
    return type(default)(v) if v else default


ROUNDS = _env("VFE_BLKBENCH_ROUNDS", 5)
SECONDS = _env("VFE_BLKBENCH_SECONDS", 3.0)
SMP = _env("VFE_BLKBENCH_SMP", 2)
QUEUES = _env("VFE_BLKBENCH_QUEUES", 2)
JOBS = _env("VFE_BLKBENCH_JOBS", QUEUES)
WORKERS = _env("VFE_BLKBENCH_WORKERS", 1)
VFE_ARGS = _env("VFE_BLKBENCH_VFE_ARGS", "").split()   # e.g. "--spin-us 0"
QSD_AIO = _env("VFE_BLKBENCH_QSD_AIO", "io_uring")
WAIT_QUIET = _env("VFE_BLKBENCH_WAIT_QUIET", 20.0)   # s to wait for others to calm down
QUIET = 0.1                                         # cores others may use in a quiet window
NULL_MB, RAM_MB = 1024, 256
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Workload:
    name: str
    disk: str          # "null" (vda) or "ram" (vdb)
    mode: str
    bs: int
    depth: int

    @property
    def id(self) -> str:
        return f"{self.name}-{self.disk}"

    @property
    def device(self) -> str:
        return "/dev/vda" if self.disk == "null" else "/dev/vdb"

    @property
    def metric(self) -> str:
        return "iops" if self.bs <= 4096 else "mib_s"


WORKLOADS = [
    Workload("randread-4k", "null", "randread", 4096, 16),
    Workload("seqread-1m", "null", "seqread", 1 << 20, 4),
    Workload("randread-4k", "ram", "randread", 4096, 16),
    Workload("seqread-1m", "ram", "seqread", 1 << 20, 4),
    Workload("seqwrite-1m", "ram", "seqwrite", 1 << 20, 4),
]


class Side:
    """One back-end with its guest."""

    def __init__(self, name: str, daemon, vm):
        self.name, self.daemon, self.vm = name, daemon, vm

    @property
    def pid(self) -> int:
        return self.daemon.proc.pid


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@pytest.fixture(scope="module")
def sides(guest_image, tmp_path_factory):
    work = tmp_path_factory.mktemp("blk-qsd")
    sock = tempfile.mkdtemp(prefix="vfe-bq-", dir="/tmp")   # short unix socket paths
    ours = ControllerProcess(
        [f"blk,socket={sock}/vn.sock,bdev=null,size={NULL_MB},queues={QUEUES}",
         f"blk,socket={sock}/vr.sock,bdev=malloc,size={RAM_MB},queues={QUEUES}"],
        work, mode="adaptive", workers=WORKERS, extra=VFE_ARGS, name="vfe")
    ref = StorageDaemon([QsdExport(f"{sock}/qn.sock", "null", NULL_MB, QUEUES),
                         QsdExport(f"{sock}/qr.sock", "memory", RAM_MB, QUEUES, aio=QSD_AIO)],
                        work, name="qsd")
    try:
        with vm_pool(guest_image, work) as make:
            ours.start()
            ref.start()
            vms = {}
            for name, pre in (("vfe", "v"), ("qsd", "q")):
                vms[name] = make(name, smp=SMP, memory_mb=256,
                                 blks=[BlkDev(f"{sock}/{pre}n.sock", num_queues=QUEUES),
                                       BlkDev(f"{sock}/{pre}r.sock", num_queues=QUEUES)])
            for vm in vms.values():
                vm.wait_booted(120)
            for vm in vms.values():  # the RAM disks hold real pages from here on
                blkbench.run(vm, "/dev/vdb", mode="seqwrite", bs=1 << 20, jobs=1, depth=4,
                             seconds=0, ops=RAM_MB, timeout=300)
            yield [Side("vfe", ours, vms["vfe"]), Side("qsd", ref, vms["qsd"])]
    finally:
        rc_ours, rc_ref = ours.stop(), ref.stop()
        print(f"--- vfe daemon (exit {rc_ours}) ---\n{ours.log()[-3000:]}")
        print(f"--- qemu-storage-daemon (exit {rc_ref}) ---\n{ref.log()[-3000:]}")
        shutil.rmtree(sock, ignore_errors=True)


def _wait_quiet(own_pids: list[int]) -> None:
    """Before a run, wait (at most WAIT_QUIET s) until other processes use
    less than QUIET cores; measure anyway after that (the run is flagged)."""
    deadline = time.monotonic() + WAIT_QUIET
    while True:
        with CpuWatch(own_pids) as watch:
            time.sleep(0.5)
        if watch.foreign < QUIET or time.monotonic() > deadline:
            return


def _measure(side: Side, wl: Workload, ops: int, own_pids: list[int]) -> dict:
    cpu0 = _cpu_seconds(side.pid)
    with CpuWatch(own_pids) as watch:
        res = blkbench.run(side.vm, wl.device, mode=wl.mode, bs=wl.bs, jobs=JOBS,
                           depth=wl.depth, seconds=SECONDS * 20, ops=ops,
                           timeout=SECONDS * 20 + 60)
    res["backend_cores"] = (_cpu_seconds(side.pid) - cpu0) / max(res["seconds"], 1e-9)
    res["foreign_cores"] = watch.foreign
    return res


def _fmt_rate(wl: Workload, v: float) -> str:
    return f"{v / 1000:.1f}k IOPS" if wl.metric == "iops" else f"{v:.0f} MiB/s"


@pytest.mark.parametrize("wl", WORKLOADS, ids=lambda w: w.id)
def test_blk_vs_qsd(benchmark, sides, wl, capsys):
    ours, ref = sides
    own = [os.getpid(), ours.pid, ref.pid, ours.vm.pid, ref.vm.pid]
    benchmark.group = f"blk-{wl.id}"

    # warm-up on both; ours sets the number of requests per run
    _wait_quiet(own)
    warm = blkbench.run(ours.vm, wl.device, mode=wl.mode, bs=wl.bs, jobs=JOBS, depth=wl.depth,
                        seconds=1.0)
    blkbench.run(ref.vm, wl.device, mode=wl.mode, bs=wl.bs, jobs=JOBS, depth=wl.depth,
                 seconds=1.0)
    ops = max(JOBS * wl.depth * 4, int(warm["iops"] * SECONDS))

    runs: dict[str, list[dict]] = {"vfe": [], "qsd": []}

    def reference_round():  # pedantic's setup: not timed
        _wait_quiet(own)
        runs["qsd"].append(_measure(ref, wl, ops, own))
        _wait_quiet(own)

    def our_round():
        runs["vfe"].append(_measure(ours, wl, ops, own))

    benchmark.pedantic(our_round, setup=reference_round, rounds=ROUNDS, iterations=1)
    assert len(runs["vfe"]) == len(runs["qsd"]) == ROUNDS
    for r in runs["vfe"] + runs["qsd"]:
        assert r["ops"] == ops and r["errors"] == 0, r

    def summary(rs: list[dict]) -> dict:
        vals = [r[wl.metric] for r in rs]
        return {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
                "all": [round(v, 1) for v in vals],
                "lat_p50_us": statistics.median(r["lat_p50_us"] for r in rs),
                "lat_p99_us": statistics.median(r["lat_p99_us"] for r in rs),
                "backend_cores": round(statistics.median(r["backend_cores"] for r in rs), 2)}

    s_ours, s_ref = summary(runs["vfe"]), summary(runs["qsd"])
    ratio = s_ours["median"] / s_ref["median"] if s_ref["median"] else None
    pair = [a[wl.metric] / b[wl.metric] for a, b in zip(runs["vfe"], runs["qsd"]) if b[wl.metric]]
    foreign = max(r["foreign_cores"] for r in runs["vfe"] + runs["qsd"])
    benchmark.extra_info.update(
        workload=wl.id, mode=wl.mode, bs=wl.bs, jobs=JOBS, depth=wl.depth, smp=SMP,
        num_queues=QUEUES, workers=WORKERS, vfe_args=" ".join(VFE_ARGS), qsd_aio=QSD_AIO,
        ops_per_run=ops,
        metric=wl.metric, vfe=s_ours, qsd=s_ref,
        ratio=round(ratio, 3) if ratio else None,
        round_ratios=[round(x, 3) for x in pair],
        round_ratio_median=round(statistics.median(pair), 3) if pair else None,
        foreign_cores=[round(r["foreign_cores"], 2) for r in runs["vfe"] + runs["qsd"]],
        foreign_cores_max=round(foreign, 2),
    )
    note = f"  [others used up to {foreign:.2f} cores: disturbed]" if foreign > 0.1 else ""
    with capsys.disabled():
        print(f"\nblk {wl.id:16s} vfe {_fmt_rate(wl, s_ours['median']):>13s} "
              f"qsd {_fmt_rate(wl, s_ref['median']):>13s}  vfe/qsd {ratio:.2f} "
              f"(rounds {' '.join(f'{x:.2f}' for x in pair)}, median "
              f"{statistics.median(pair):.2f}); p99 {s_ours['lat_p99_us']:.0f}"
              f"/{s_ref['lat_p99_us']:.0f} us; back-end cores {s_ours['backend_cores']:.2f}"
              f"/{s_ref['backend_cores']:.2f}{note}")
