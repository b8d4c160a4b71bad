"""What the testpmd benchmarks and count checks measure: closed-loop
throughput on the front-end's counters (:func:`measure_loop`), CPU use of
the processes involved (:class:`CpuWatch`), exact forwarding counts
(:func:`send_count`, :func:`check_forward_counts`).  The process harness is
tests/harness/testpmd.py, the back-ends tests/harness/pmd_backends.py."""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable

from tests.harness.pmd_backends import frontend
from tests.harness.testpmd import FwdStats, PortStats, TestPmd, TestPmdError

__all__ = ["LoopResult", "CountResult", "CpuWatch", "drain", "measure_loop", "time_packets",
           "send_count", "check_forward_counts"]

# --------------------------------------------------------------------------
# measurements

@dataclass
class LoopResult:
    """Closed-loop throughput measured on the front-end's RX counters."""
    frame_size: int
    burst_first: int
    seconds: float                      # measured window
    rx_packets: dict[int, int]          # per port, over the window
    rx_bytes: dict[int, int]
    rx_missed: int = 0
    rx_errors: int = 0
    rx_nombuf: int = 0
    tx_dropped: int = 0                 # from the forward stats of `stop`
    foreign_cpu: float = 0.0            # cores used by other processes meanwhile
    steal_cpu: float = 0.0              # cores stolen by the hypervisor meanwhile

    @property
    def packets(self) -> int:
        return sum(self.rx_packets.values())

    @property
    def mpps(self) -> float:
        """Sum over the front-end's ports of received packets, Mpps."""
        return self.packets / self.seconds / 1e6 if self.seconds > 0 else 0.0

    @property
    def gbps(self) -> float:
        """Received L2 bytes (frame without CRC, no preamble/IFG) x 8, Gbit/s."""
        return sum(self.rx_bytes.values()) * 8 / self.seconds / 1e9 if self.seconds > 0 else 0.0

    @property
    def port_mpps(self) -> dict[int, float]:
        return {p: n / self.seconds / 1e6 for p, n in self.rx_packets.items()}

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(mpps=self.mpps, gbps=self.gbps, packets=self.packets)
        return d


_HZ = os.sysconf("SC_CLK_TCK")


def _proc_jiffies(pid: int) -> int:
    """utime+stime of a whole process (all its threads), in clock ticks."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


def _system_jiffies() -> tuple[int, int]:
    """(busy, steal) clock ticks summed over all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return user + nice + system + irq + softirq, steal


def _with_descendants(pids: Iterable[int]) -> set[int]:
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out = set(pids)
    grew = True
    while grew:
        new = {c for c, pp in parent.items() if pp in out and c not in out}
        out |= new
        grew = bool(new)
    return out


class CpuWatch:
    """How much CPU *other* processes used while we measured.

    ``foreign`` is in cores (1.0 = one core busy the whole window): the
    machine's busy time minus the time of ``own_pids`` and their descendants
    (our testpmds, the back-end, this process).  Anything well above 0.05
    means somebody else ran on the machine and the numbers are not
    trustworthy.
    """

    def __init__(self, own_pids: Iterable[int] = ()):
        self.roots = {os.getpid(), *[int(p) for p in own_pids if p]}

    def __enter__(self) -> "CpuWatch":
        self.pids = _with_descendants(self.roots)
        self.t0 = time.monotonic()
        self.sys0 = _system_jiffies()
        self.own0 = {p: _proc_jiffies(p) for p in self.pids}
        return self

    def __exit__(self, *exc) -> None:
        dt = time.monotonic() - self.t0
        busy1, steal1 = _system_jiffies()
        # processes born during the window count from zero
        pids = self.pids | _with_descendants(self.roots)
        own = sum(_proc_jiffies(p) - self.own0.get(p, 0) for p in pids)
        ticks = max(dt, 1e-9) * _HZ
        self.busy = (busy1 - self.sys0[0]) / ticks
        self.steal = (steal1 - self.sys0[1]) / ticks
        self.own = own / ticks
        self.foreign = max(0.0, self.busy - self.own)


def _sum_rx(stats: dict[int, PortStats]) -> int:
    return sum(s.rx_packets for s in stats.values())


def drain(pmd: TestPmd, settle: float = 0.2, timeout: float = 5.0) -> None:
    """Receive and drop whatever is still circulating (``rxonly``), so the
    next injection starts from an empty loop.  Leaves forwarding stopped."""
    pmd.stop()
    pmd.set_fwd("rxonly")
    pmd.start()
    deadline = time.monotonic() + timeout
    last = _sum_rx(pmd.port_stats())
    while time.monotonic() < deadline:
        time.sleep(settle)
        now = _sum_rx(pmd.port_stats())
        if now == last:
            break
        last = now
    pmd.stop()


def measure_loop(pmd: TestPmd, seconds: float, frame_size: int, burst_first: int = 4,
                 warmup: float = 1.0, fwd: str = "io",
                 own_pids: Iterable[int] = ()) -> LoopResult:
    """Closed-loop throughput through whatever connects the front-end's ports.

    io forwarding on the front-end; ``start tx_first N`` injects N bursts of
    32 ``frame_size``-byte frames on every stream (so 2*N*32 frames circulate
    with two ports); after ``warmup`` seconds the RX counters of all ports
    are sampled (``show port stats all``) before and after a window of
    ``seconds``.  Returns Mpps (sum of RX over the ports) and Gbit/s.
    The loop is drained first and forwarding is stopped afterwards.
    ``own_pids`` (the back-end's PIDs) are excluded from ``foreign_cpu``.
    """
    drain(pmd)
    pmd.set_fwd(fwd)
    pmd.set_txpkts(frame_size)
    pmd.clear_stats()
    pmd.start(tx_first=burst_first)
    try:
        time.sleep(warmup)
        with CpuWatch([pmd.pid, *own_pids]) as cpu:
            t0 = time.monotonic()
            s0 = pmd.port_stats()
            t0 = (t0 + time.monotonic()) / 2
            time.sleep(seconds)
            t1 = time.monotonic()
            s1 = pmd.port_stats()
            t1 = (t1 + time.monotonic()) / 2
    finally:
        fwdstats = pmd.stop()
    ports = sorted(s1)
    return LoopResult(
        frame_size=frame_size, burst_first=burst_first, seconds=t1 - t0,
        rx_packets={p: s1[p].rx_packets - s0[p].rx_packets for p in ports},
        rx_bytes={p: s1[p].rx_bytes - s0[p].rx_bytes for p in ports},
        rx_missed=sum(s1[p].rx_missed for p in ports),
        rx_errors=sum(s1[p].rx_errors for p in ports),
        rx_nombuf=sum(s1[p].rx_nombuf for p in ports),
        tx_dropped=sum(f.tx_dropped for f in fwdstats.values()),
        foreign_cpu=cpu.foreign, steal_cpu=cpu.steal,
    )


def time_packets(pmd: TestPmd, packets: int, poll: float = 0.02,
                 stall: float = 5.0) -> tuple[float, int]:
    """With a loop already running, wait until the front-end's ports have
    received ``packets`` more frames; return (elapsed seconds, packets
    actually counted).  Raises TestPmdError if nothing arrives for ``stall``
    seconds.  For pytest-benchmark: the timed quantity means something."""
    t0 = time.monotonic()
    start = _sum_rx(pmd.port_stats())
    last, last_t = start, t0
    while True:
        time.sleep(poll)
        now = _sum_rx(pmd.port_stats())
        t = time.monotonic()
        if now - start >= packets:
            return t - t0, now - start
        if now != last:
            last, last_t = now, t
        elif t - last_t > stall:
            raise TestPmdError(f"loop stalled: {now - start} of {packets} packets")


@dataclass
class CountResult:
    frame_size: int
    bursts: int
    # port stats (after `clear port stats all`)
    tx: dict[int, int] = field(default_factory=dict)
    rx: dict[int, int] = field(default_factory=dict)
    rx_bytes: dict[int, int] = field(default_factory=dict)
    # forward statistics from `stop`
    fwd: dict[int, FwdStats] = field(default_factory=dict)
    rx_missed: int = 0
    rx_errors: int = 0

    def pairs(self) -> list[tuple[int, int, int, int]]:
        """(tx port, tx count, rx port, rx count) for 0->1 and 1->0 (and in
        general port i -> port i^1)."""
        out = []
        for p in sorted(self.tx):
            q = p ^ 1
            if q in self.rx:
                out.append((p, self.tx[p], q, self.rx[q]))
        return out

    @property
    def ok(self) -> bool:
        pairs = self.pairs()
        return bool(pairs) and all(t == r and t > 0 for _, t, _, r in pairs) and all(
            self.rx_bytes[q] == self.rx[q] * self.frame_size for _, _, q, _ in pairs)


def send_count(pmd: TestPmd, frame_size: int, bursts: int = 4, settle: float = 0.3,
               timeout: float = 5.0) -> CountResult:
    """Send ``bursts`` bursts of 32 frames on every stream and count.

    ``set fwd rxonly``; ``set txpkts frame_size``; ``clear port stats all``;
    ``start tx_first bursts``: testpmd first runs the txonly burst function
    once per stream ``bursts`` times (port 1 sends on stream 0 = RX P0 -> TX
    P1, port 0 on stream 1), then starts rxonly, which receives and frees on
    every port.  We poll ``show port stats all`` until the RX counters stop
    moving, then ``stop``.  Frames sent on port 0 must arrive on port 1 and
    vice versa: compare port 0's TX-packets with port 1's RX-packets.
    """
    pmd.stop()
    pmd.set_fwd("rxonly")
    pmd.set_txpkts(frame_size)
    pmd.clear_stats()
    pmd.start(tx_first=bursts)
    deadline = time.monotonic() + timeout
    prev = None
    while True:
        time.sleep(settle)
        st = pmd.port_stats()
        sig = tuple((s.rx_packets, s.tx_packets) for s in st.values())
        done = all(st[p ^ 1].rx_packets >= st[p].tx_packets for p in st if p ^ 1 in st)
        if (done and sig == prev) or time.monotonic() > deadline:
            break
        prev = sig
    fwd = pmd.stop()
    return CountResult(frame_size=frame_size, bursts=bursts,
                       tx={p: s.tx_packets for p, s in st.items()},
                       rx={p: s.rx_packets for p, s in st.items()},
                       rx_bytes={p: s.rx_bytes for p, s in st.items()},
                       fwd=fwd,
                       rx_missed=sum(s.rx_missed for s in st.values()),
                       rx_errors=sum(s.rx_errors for s in st.values()))


def check_forward_counts(socket_a: str, socket_b: str, frame_size: int = 64,
                         mrg_rxbuf: bool = True, queues: int = 1, bursts: int = 4,
                         queue_size: int = 256, link_timeout: float = 20.0,
                         **testpmd_kw) -> CountResult:
    """Frames sent on one virtio_user port arrive on the other, counts equal.

    Starts a testpmd front-end with two virtio_user ports connecting (as
    vhost-user clients) to ``socket_a`` and ``socket_b`` -- the back-end
    under test (DPDK's net_vhost via :class:`dpdk_vhost_backend`, or our
    daemon) must already listen there and forward between the two.  Sends
    ``bursts`` x 32 frames of ``frame_size`` bytes on each port
    (:func:`send_count`) and asserts TX(port0) == RX(port1) and
    TX(port1) == RX(port0), > 0, with RX-bytes == RX-packets * frame_size.
    Returns the CountResult; raises AssertionError with the counters
    otherwise.
    """
    with frontend([socket_a, socket_b], queues=queues, queue_size=queue_size,
                  mrg_rxbuf=mrg_rxbuf, **testpmd_kw) as pmd:
        pmd.wait_link_up(link_timeout)
        res = send_count(pmd, frame_size, bursts=bursts)
    expected = 32 * bursts * queues
    msg = (f"frame_size={frame_size} mrg_rxbuf={mrg_rxbuf} queues={queues}: "
           f"tx={res.tx} rx={res.rx} rx_bytes={res.rx_bytes} missed={res.rx_missed} "
           f"errors={res.rx_errors} fwd={res.fwd} (expected {expected} per port)")
    assert res.ok, msg
    return res
