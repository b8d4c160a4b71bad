"""Closed-loop throughput with pytest-benchmark.

testpmd "A" (two virtio_user ports, io forwarding, forwarding lcore on core
1) against DPDK's net_vhost back-end (testpmd "B", forwarding lcore on core
0) and against our virtio-net-controller (pinned to core 0; skipped if not
installed).  The timed quantity is the time A needs to receive a fixed
number of packets on its two ports (lower is better); ``extra_info`` has
Mpps and Gbit/s.  Nothing here asserts on time.

    pytest tests/bench --benchmark-only
    VFE_BENCH_PACKETS=2000000 pytest tests/bench --benchmark-only -k vfe
"""
import os
import shutil
import statistics
import time

import pytest

from tests.harness import pmd_backends
from tests.harness import pmd_measure as measure
from tests.harness import testpmd as tp

pytestmark = [
    pytest.mark.bench,
    pytest.mark.e2e,
    pytest.mark.skipif(not tp.testpmd_available(),
                       reason="dpdk-testpmd not installed (package dpdk-dev)"),
]

SIZES = [64, 1518]
# ~1.3 s per round with DPDK's back-end on the development machines
PACKETS = {64: 10_000_000, 1518: 4_000_000}
MAX_ROUND_SECONDS = 10.0
ROUNDS = 3


def _packets(frame_size: int) -> int:
    env = os.environ.get("VFE_BENCH_PACKETS")
    return int(env) if env else PACKETS.get(frame_size, 4_000_000)


@pytest.fixture(scope="module")
def reference_loop(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench-dpdk")
    socks = [str(d / "a.sock"), str(d / "b.sock")]
    with pmd_backends.dpdk_vhost_backend(*socks) as b:
        with pmd_backends.frontend(socks) as a:
            a.wait_link_up()
            yield a, [b.pid]


@pytest.fixture(scope="module")
def vfe_loop(tmp_path_factory):
    binary = shutil.which(pmd_backends.CONTROLLER)
    if not binary:
        pytest.skip(f"{pmd_backends.CONTROLLER} not installed")
    d = tmp_path_factory.mktemp("bench-vfe")
    socks = [str(d / "a.sock"), str(d / "b.sock")]
    with pmd_backends.vhost_daemon(pmd_backends.controller_argv(socks, binary=binary), socks, cpus=[0]) as dm:
        with pmd_backends.frontend(socks) as a:
            a.wait_link_up()
            yield a, [dm.pid]


def _run(benchmark, loop, frame_size):
    a, own = loop
    packets = _packets(frame_size)
    # calibrate: a slow back-end gets fewer packets per round (noted in extra_info)
    probe = measure.measure_loop(a, 1.0, frame_size, burst_first=4, warmup=0.5, own_pids=own)
    if probe.mpps <= 0:
        pytest.fail(f"no traffic through the loop at {frame_size} B: {probe}")
    if packets / (probe.mpps * 1e6) > MAX_ROUND_SECONDS and "VFE_BENCH_PACKETS" not in os.environ:
        packets = max(10_000, int(float(f"{probe.mpps * 1e6 * 2:.1g}")))

    measure.drain(a)
    a.set_fwd("io")
    a.set_txpkts(frame_size)
    a.start(tx_first=4)
    samples = []
    try:
        time.sleep(0.5)

        def target():
            elapsed, got = measure.time_packets(a, packets)
            samples.append((elapsed, got))
            return got

        with measure.CpuWatch([a.pid, *own]) as cpu:
            benchmark.pedantic(target, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    finally:
        a.stop()
    measured = samples[-ROUNDS:]  # without the warm-up round
    rates = [got / el / 1e6 for el, got in measured if el > 0]
    mpps = statistics.median(rates) if rates else 0.0
    benchmark.extra_info.update(
        frame_size=frame_size, packets=packets, mpps=round(mpps, 3),
        gbps=round(mpps * frame_size * 8 / 1e3, 3),
        mpps_all=[round(r, 3) for r in rates],
        foreign_cpu=round(cpu.foreign, 3),
    )


@pytest.mark.parametrize("frame_size", SIZES)
def test_dpdk_vhost(benchmark, reference_loop, frame_size):
    benchmark.group = f"loop-{frame_size}B"
    _run(benchmark, reference_loop, frame_size)


@pytest.mark.parametrize("frame_size", SIZES)
def test_vfe(benchmark, vfe_loop, frame_size):
    benchmark.group = f"loop-{frame_size}B"
    _run(benchmark, vfe_loop, frame_size)
