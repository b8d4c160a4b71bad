"""TCP between two TCG guests: our daemon's in-engine switch against DPDK's
net_vhost (issue 13, "from guests too").

Four guests boot once (QEMU 7.2, TCG, ``-smp 1``, memfd RAM, the busybox
initramfs, virtio-net-pci with 1 queue pair, ring 256, ``vectors=0``): pair
"vfe" on two ``--device net,socket=...`` devices of one virtio-net-controller
(``--mode adaptive``, 1 worker; the switch forwards between them), pair "dpdk"
on two ``net_vhost`` ports of one dpdk-testpmd doing io forwarding between
them (the reference back-end "B" of docs/performance.md, with ``tso=1`` so
that the guests may send TSO frames through it too).  Each pair streams the
same VFE_GUESTTCP_MIB MiB of random data from its first guest to its second
(busybox nc, ``vfe-send``/``vfe-recv``), md5 and length checked on the
receiver, alternately: warm-up vfe and dpdk once, then ROUNDS x {dpdk, vfe}.

CPU budget (the machine has 2 cores): with VFE_GUESTTCP_PIN=1 (default) each
back-end gets core 0 -- our daemon pinned there, testpmd's forwarding lcore
there (its main lcore, which only sleeps in the command line, on core 1) --
and all four QEMUs are pinned to core 1.  testpmd busy-polls its core
whatever the load; ours polls while traffic flows and sleeps when idle, but
on core 0 nobody else could use what it leaves.  Between its runs testpmd's
forwarding is stopped (``stop``: the lcore then sleeps), and our daemon is
idle (adaptive), so neither back-end takes CPU from the other's runs.  With
VFE_GUESTTCP_PIN=0 nothing is pinned but testpmd's lcores (EAL always pins
them): the guests then compete with a busy-polling testpmd on core 0 and
with whatever our daemon uses.

The timed quantity (pytest-benchmark) is the wall time of one of our runs
(console commands and the md5 check included; the waits for a quiet
machine are in the untimed setup); ``extra_info`` and the printed line carry the
guest-clock throughput of every run of both, the ratio of the medians (and
per round), the guests' negotiated offload features, the average frame size
the sender transmitted and the receiver got (tens of KiB = TSO/GSO passed
end to end), each back-end's CPU use and other processes' CPU during each
run.  No assertion on speed; the data must arrive intact (md5), our guests
must have negotiated checksum and TSO offloads, and frames larger than the
MTU (GSO) must have reached our receiver.

    pytest tests/bench/test_guest_tcp.py --benchmark-only -s

Environment: VFE_GUESTTCP_ROUNDS (3), VFE_GUESTTCP_MIB (32), VFE_GUESTTCP_PIN
(1), VFE_GUESTTCP_MODE (adaptive; our --mode), VFE_GUESTTCP_DPDK_DEVARGS
("tso=1"; appended to each net_vhost vdev), VFE_GUESTTCP_WAIT_QUIET (20: before
each run wait up to this many seconds for other processes to use < 0.1
cores; 0 = don't wait).
"""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import shutil
import time

import pytest

from tests.guest_fixtures import vm_pool
from tests.harness.guest_tcp import GuestPair, StreamRun, pin_process
from tests.harness.pmd_backends import vhost_daemon
from tests.harness.pmd_measure import CpuWatch
from tests.harness import testpmd as tp
from vfe.guest.vm import NetDev

pytestmark = [
    pytest.mark.bench,
    pytest.mark.e2e,
    pytest.mark.skipif(not tp.testpmd_available(), reason="dpdk-testpmd not installed (dpdk-dev)"),
]


def _env(name: str, default: int | float | str):
    v = os.environ.get(name)
    return type(default)(v) if v else default


ROUNDS = _env("VFE_GUESTTCP_ROUNDS", 3)
MIB = _env("VFE_GUESTTCP_MIB", 32)
PIN = bool(_env("VFE_GUESTTCP_PIN", 1))
MODE = _env("VFE_GUESTTCP_MODE", "adaptive")
DPDK_DEVARGS = _env("VFE_GUESTTCP_DPDK_DEVARGS", "tso=1")
WAIT_QUIET = _env("VFE_GUESTTCP_WAIT_QUIET", 20.0)
QUIET = 0.1                         # cores others may use in a quiet window
BACKEND_CPU, GUEST_CPU = 0, 1
PORT = 5001
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _wait_sockets(paths: list[str], pmd: tp.TestPmd, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(p) for p in paths):
        if not pmd.alive or time.monotonic() > deadline:
            raise RuntimeError(f"testpmd did not create {paths}:\n{pmd.tail()}")
        time.sleep(0.05)


class Bench:
    """What the test needs from the fixture: both pairs and both back-ends."""

    def __init__(self, ours: GuestPair, ref: GuestPair, daemon: vhost_daemon, pmd: tp.TestPmd):
        self.ours, self.ref, self.daemon, self.pmd = ours, ref, daemon, pmd

    @property
    def own_pids(self) -> list[int]:
        vms = [p.a.pid for p in (self.ours, self.ref)] + [p.b.pid for p in (self.ours, self.ref)]
        return [os.getpid(), self.daemon.pid, self.pmd.pid, *vms]


@pytest.fixture(scope="module")
def bench_rig(guest_image, tmp_path_factory):
    work = tmp_path_factory.mktemp("guest-tcp")
    sockdir = tempfile.mkdtemp(prefix="vfe-gt-", dir="/tmp")   # short unix socket paths
    s = {n: f"{sockdir}/{n}.sock" for n in ("o0", "o1", "d0", "d1")}
    argv = [sys.executable, "-m", "vfe.cli.controller", "--mode", MODE, "--workers", "1",
            "--device", f"net,socket={s['o0']}", "--device", f"net,socket={s['o1']}"]
    devargs = f",{DPDK_DEVARGS}" if DPDK_DEVARGS else ""
    daemon = vhost_daemon(argv, [s["o0"], s["o1"]], cpus=[BACKEND_CPU] if PIN else None,
                          log_path=str(work / "vfe.log"))
    memory = 256 + 4 * MIB          # data file and received copy live in the guests' tmpfs
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(daemon)
            # forwarding lcore on core 0, the (sleeping) command line on core 1
            pmd = stack.enter_context(tp.TestPmd(
                [tp.vhost(s["d0"], name="net_vhost0") + devargs,
                 tp.vhost(s["d1"], name="net_vhost1") + devargs],
                cores=[BACKEND_CPU, GUEST_CPU], main_lcore=GUEST_CPU, forward_mode="io",
                name="dpdk-vhost", log_path=str(work / "testpmd.log")))
            _wait_sockets([s["d0"], s["d1"]], pmd)
            make = stack.enter_context(vm_pool(guest_image, work))
            vms = {name: make(name, memory_mb=memory,
                              nics=[NetDev(s[sock], mac=f"52:54:00:13:00:{i:02x}")])
                   for i, (name, sock) in enumerate((("va", "o0"), ("vb", "o1"),
                                                     ("da", "d0"), ("db", "d1")), 1)}
            for vm in vms.values():
                vm.wait_booted(180)
                if PIN:
                    pin_process(vm.pid, {GUEST_CPU})
            pmd.start()   # the dpdk pair's ping needs forwarding
            for name, addr in (("va", "10.0.1.1"), ("vb", "10.0.1.2"),
                               ("da", "10.0.2.1"), ("db", "10.0.2.2")):
                vms[name].run(f"vfe-netup eth0 {addr}/24", timeout=30, check=True)
            for a, peer in (("va", "10.0.1.2"), ("da", "10.0.2.2")):
                vms[a].run(f"ping -c 2 -W 3 {peer}", timeout=30, check=True)
            pmd.stop()
            ours = GuestPair("vfe", vms["va"], vms["vb"], "10.0.1.2")
            ref = GuestPair("dpdk", vms["da"], vms["db"], "10.0.2.2")
            for pair in (ours, ref):
                pair.prepare(MIB << 10)
            yield Bench(ours, ref, daemon, pmd)
    finally:
        print(f"--- vfe daemon log (tail) ---\n{daemon.tail(4000)}")
        shutil.rmtree(sockdir, ignore_errors=True)


def _wait_quiet(own_pids: list[int]) -> None:
    """Wait (at most WAIT_QUIET s) until other processes use < QUIET cores."""
    deadline = time.monotonic() + WAIT_QUIET
    while True:
        with CpuWatch(own_pids) as watch:
            time.sleep(0.5)
        if watch.foreign < QUIET or time.monotonic() > deadline:
            return


def _measure(rig: Bench, pair: GuestPair, backend_pid: int) -> StreamRun:
    cpu0, t0 = _cpu_seconds(backend_pid), time.monotonic()
    with CpuWatch(rig.own_pids) as watch:
        run = pair.stream(PORT, timeout=60 + MIB * 4)
    run.backend_cores = (_cpu_seconds(backend_pid) - cpu0) / (time.monotonic() - t0)
    run.foreign_cores = watch.foreign
    return run


def _dpdk_run(rig: Bench) -> StreamRun:
    rig.pmd.start()
    try:
        return _measure(rig, rig.ref, rig.pmd.pid)
    finally:
        rig.pmd.stop()


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def test_guest_tcp_vs_dpdk(benchmark, bench_rig, capsys):
    rig = bench_rig
    benchmark.group = "guest-tcp"
    _wait_quiet(rig.own_pids)
    warm = [_measure(rig, rig.ours, rig.daemon.pid)]                    # not counted
    _wait_quiet(rig.own_pids)
    warm.append(_dpdk_run(rig))
    runs: dict[str, list[StreamRun]] = {"vfe": [], "dpdk": []}

    def reference_round():          # pedantic's setup, not timed: the waits go here too
        _wait_quiet(rig.own_pids)
        runs["dpdk"].append(_dpdk_run(rig))
        _wait_quiet(rig.own_pids)

    def our_round():
        runs["vfe"].append(_measure(rig, rig.ours, rig.daemon.pid))

    benchmark.pedantic(our_round, setup=reference_round, rounds=ROUNDS, iterations=1)
    assert len(runs["vfe"]) == len(runs["dpdk"]) == ROUNDS

    def summary(rs: list[StreamRun]) -> dict:
        rates = [r.mib_s for r in rs]
        return {"mib_s_median": round(statistics.median(rates), 2),
                "mib_s": [round(x, 2) for x in rates],
                "seconds": [round(r.seconds, 2) for r in rs],
                "tx_frame_bytes": [round(r.tx_frame_bytes) for r in rs],
                "rx_frame_bytes": [round(r.rx_frame_bytes) for r in rs],
                "backend_cores": [round(r.backend_cores, 2) for r in rs],
                "foreign_cores": [round(r.foreign_cores, 2) for r in rs]}

    s_ours, s_ref = summary(runs["vfe"]), summary(runs["dpdk"])
    ratio = s_ours["mib_s_median"] / s_ref["mib_s_median"]
    pair = [a.mib_s / b.mib_s for a, b in zip(runs["vfe"], runs["dpdk"])]
    feats = {"vfe": rig.ours.features(), "dpdk": rig.ref.features()}
    foreign = max(r.foreign_cores for r in runs["vfe"] + runs["dpdk"])
    benchmark.extra_info.update(
        commit=_git_commit(), cpu=_cpu_model(),
        mib_per_run=MIB, rounds=ROUNDS, pinned=PIN, vfe_mode=MODE, dpdk_devargs=DPDK_DEVARGS,
        vfe=s_ours, dpdk=s_ref, ratio=round(ratio, 3),
        round_ratios=[round(x, 3) for x in pair],
        warmup_mib_s={"vfe": round(warm[0].mib_s, 2), "dpdk": round(warm[1].mib_s, 2)},
        features=feats, foreign_cores_max=round(foreign, 2))
    note = f"  [others used up to {foreign:.2f} cores: disturbed]" if foreign > QUIET else ""
    with capsys.disabled():
        print(f"\nguest TCP {MIB} MiB x {ROUNDS} (alternating dpdk, vfe; pinned={PIN}, "
              f"ours --mode {MODE}, net_vhost {DPDK_DEVARGS or '-'})")
        for name, sm in (("vfe", s_ours), ("dpdk", s_ref)):
            print(f"  {name:5s} MiB/s {sm['mib_s']} median {sm['mib_s_median']}; "
                  f"frame bytes tx {sm['tx_frame_bytes']} rx {sm['rx_frame_bytes']}; "
                  f"back-end cores {sm['backend_cores']}; others {sm['foreign_cores']}")
        print(f"  vfe/dpdk {ratio:.2f} (rounds {' '.join(f'{x:.2f}' for x in pair)}){note}")
        for name, f in feats.items():
            print(f"  {name} features: {f}")
    # what this benchmark is for: offloads negotiated and used end to end
    for names in feats["vfe"].values():
        assert {"CSUM", "GUEST_CSUM", "HOST_TSO4", "GUEST_TSO4"} <= set(names), feats
    assert max(r.rx_frame_bytes for r in runs["vfe"]) > 1514, s_ours   # GSO frames arrived
