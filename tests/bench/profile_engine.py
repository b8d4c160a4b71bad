"""Instructions (and cycles) per packet of the net data path, for docs/performance.md
"Per-packet profile": our engine's TX burst -> switch -> RX burst in-process
(`vfe` mode), or DPDK's net_vhost testpmd under callgrind in the bench's
closed loop (`dpdk` mode).  Needs valgrind; dpdk mode needs dpdk-testpmd.

  python3 -m tests.bench.profile_engine vfe    --size 64 --bursts 400
  python3 -m tests.bench.profile_engine dpdk   --size 64 --seconds 8
  python3 -m tests.bench.profile_engine daemon --size 64 --seconds 8
  python3 -m tests.bench.profile_engine cycles --size 64 --rounds 3 --seconds 3

daemon: our virtio-net-controller (this checkout, --mode poll, core 0)
under callgrind, instrumentation switched on once the loop runs; packets =
what testpmd A received; reports the poll worker thread.

cycles: no tool; both back-ends natively in alternating rounds; cycles per
packet = CPU time (utime+stime from /proc/<pid>/task/<tid>/stat) of the
back-end's busiest thread x "cpu MHz" from /proc/cpuinfo / packets A received.

vfe: runs itself under `valgrind --tool=callgrind --toggle-collect=*net_tx_burst`
(so only the engine's burst function and what it calls are counted: the code
the daemon's poll worker runs per iteration, `iter_serve` -> `net_tx_burst`),
sending N bursts of 32 (--per-burst) one-descriptor frames from device A's TX ring through
the switch (flooded: broadcast destination) to device B's RX ring, mrg_rxbuf
on (--no-mrg-rxbuf: off), as testpmd's virtio_user lays them out (header and frame in one
descriptor; RX buffers of 2 KiB, one descriptor each); --packed: packed rings, the
collection toggled on `*packed_tx_burst`.

dpdk: starts testpmd "B" (net_vhost, io forwarding) under callgrind with
--separate-threads, connects testpmd "A" (virtio_user, mrg on) natively, lets
the loop run, zeroes the counters (callgrind_control -z), clears B's port
stats, waits --seconds, dumps (callgrind_control -d) and reads B's stats.
Packets = B's RX packets on both ports (= dequeued from the TX rings of A,
= enqueued to A's RX rings).

Both print Ir/packet and the top functions (inclusive and self) and leave
the callgrind files in --out for callgrind_annotate.
"""
from __future__ import annotations

import argparse
import atexit
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HDR = 12
BURST = 32
RING = 256


def _frame(size: int, unicast: bool = False) -> bytes:
    # broadcast destination: the switch floods it, as it floods testpmd's
    # never-learned 02:00:00:00:00:0N destinations in the bench (--unicast:
    # such a destination, looked up and missed, then flooded)
    dst = b"\x02\x00\x00\x00\x00\x0b" if unicast else b"\xff" * 6
    return dst + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00" + bytes(size - 14)


def run_vfe_rig(size: int, bursts: int, mrg_rxbuf: bool = True, per_burst: int = BURST,
                unicast: bool = False, packed: bool = False) -> None:
    """The measured workload (runs inside callgrind)."""
    from tests.harness.engine_rig import (F_WRITE, FEAT_INDIRECT, FEAT_MRG_RXBUF,
                                          FEAT_VERSION_1, Guest, NetRig, RawRing)
    from tests.harness.packed_ring import FEAT_RING_PACKED
    slot = 2048
    # one memory region, as testpmd's virtio_user shares it (the daemon logs
    # "guest memory (1 region(s), 512 MiB)"): rings first, then the buffers
    g = Guest([(0x100000, 0x100000 + 2 * RING * slot)])
    rig = NetRig(g, FEAT_VERSION_1 | FEAT_INDIRECT | (FEAT_MRG_RXBUF if mrg_rxbuf else 0)
                 | (FEAT_RING_PACKED if packed else 0))
    base = 0x100000
    if packed:
        _run_packed(rig, g, base, slot, size, bursts, per_burst, unicast)
        return
    tx = RawRing(g, RING, base, base + 0x4000, base + 0x6000)
    rx = RawRing(g, RING, base + 0x8000, base + 0xC000, base + 0xE000)
    rig.start(rig.a, 1, tx)
    rig.start(rig.b, 0, rx)
    buf, rxbuf = 0x200000, 0x200000 + RING * slot
    frame = _frame(size, unicast)
    for i in range(RING):
        g.write(buf + slot * i, bytes(HDR) + frame)
        tx.set_desc(i, buf + slot * i, HDR + len(frame))
        rx.set_desc(i, rxbuf + slot * i, slot, F_WRITE)
    rx.post(*range(RING))
    sent = 0
    t = time.perf_counter()
    for _ in range(bursts):
        heads = [(sent + j) % RING for j in range(per_burst)]
        tx.post(*heads)
        if rig.a.run_burst(1) != per_burst:
            raise SystemExit(f"burst forwarded fewer than {per_burst} frames")
        rx.post(*heads)
        sent += per_burst
    dt = time.perf_counter() - t
    if rig.broken(rig.a, 1) or rig.broken(rig.b, 0):
        raise SystemExit(f"ring broken: {rig.a.ring_state(1)} {rig.b.ring_state(0)}")
    print(f"vfe rig: {sent} packets of {size} B, {dt / sent * 1e9:.1f} ns/pkt (wall, under the tool)")


def _run_packed(rig, g, base: int, slot: int, size: int, bursts: int, per_burst: int,
                unicast: bool) -> None:
    """run_vfe_rig with packed rings (tests/harness/packed_ring.py's driver):
    buffer id = the slot it was posted in, one descriptor per buffer, as
    testpmd's virtio_user posts them in order."""
    from tests.harness.engine_rig import F_WRITE
    from tests.harness.packed_ring import FRESH_BASE, PackedRing
    tx = PackedRing(g, RING, base, base + 0x4000, base + 0x6000)
    rx = PackedRing(g, RING, base + 0x8000, base + 0xC000, base + 0xE000)
    rig.a.start_ring(1, RING, *tx.addresses, FRESH_BASE, -1, -1, True)
    rig.b.start_ring(0, RING, *rx.addresses, FRESH_BASE, -1, -1, True)
    buf, rxbuf = 0x200000, 0x200000 + RING * slot
    frame = _frame(size, unicast)
    for i in range(RING):
        g.write(buf + slot * i, bytes(HDR) + frame)
        rx.post([(rxbuf + slot * i, slot, F_WRITE)], i)
    sent = 0
    t = time.perf_counter()
    for _ in range(bursts):
        heads = [(sent + j) % RING for j in range(per_burst)]
        for h in heads:
            tx.post([(buf + slot * h, HDR + len(frame), 0)], h)
        if rig.a.run_burst(1) != per_burst:
            raise SystemExit(f"burst forwarded fewer than {per_burst} frames")
        for h in heads:
            rx.post([(rxbuf + slot * h, slot, F_WRITE)], h)
        sent += per_burst
    dt = time.perf_counter() - t
    if rig.broken(rig.a, 1) or rig.broken(rig.b, 0):
        raise SystemExit(f"ring broken: {rig.a.ring_state(1)} {rig.b.ring_state(0)}")
    print(f"vfe rig (packed): {sent} packets of {size} B, {dt / sent * 1e9:.1f} ns/pkt (wall, under the tool)")


def _total_ir(path: str) -> int:
    with open(path) as f:
        for line in f:
            if line.startswith("summary:") or line.startswith("totals:"):
                return int(line.split()[1])
    return 0


def _annotate(path: str, inclusive: bool, top: int) -> list[tuple[int, str]]:
    out = subprocess.run(["callgrind_annotate", f"--inclusive={'yes' if inclusive else 'no'}",
                          "--threshold=100", path], capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        if rows and line.startswith("--"):
            break       # the function table ended; annotated source follows
        m = re.match(r"\s*([\d,]+) \([ \d.]+%\)\s+(.*)", line)
        if m and "PROGRAM TOTALS" not in line:
            rows.append((int(m.group(1).replace(",", "")), m.group(2)))
    return rows[:top]


def _report(path: str, packets: int, top: int) -> None:
    total = _total_ir(path)
    print(f"{path}: {total:,} Ir, {packets:,} packets, {total / max(packets, 1):.0f} Ir/packet")
    for inclusive in (True, False):
        print(f"  {'inclusive' if inclusive else 'self'} Ir/packet:")
        for ir, name in _annotate(path, inclusive, top):
            print(f"    {ir / max(packets, 1):8.1f}  {name[:150]}")


_MARK = re.compile(r'^\s*/\* "([\w./]+)":(\d+)')


def _cython_map(c_path: str) -> list[tuple[str, int] | None]:
    """engine.c line -> the .pyx/.pxd/.pxi line Cython generated it from
    (the nearest `/* "file":N` marker above it)."""
    out: list[tuple[str, int] | None] = [None]
    cur = None
    with open(c_path, errors="replace") as f:
        for line in f:
            m = _MARK.match(line)
            if m:
                cur = (m.group(1), int(m.group(2)))
            out.append(cur)
    return out


def self_by_line(path: str) -> dict[tuple[str, int], int]:
    """Self Ir per source line from a callgrind file (positions: line);
    lines of engine.c are mapped back to the Cython sources."""
    names: dict[str, str] = {}
    cost: dict[tuple[str, int], int] = {}
    fl = fi = None
    pos = 0
    skip = False

    def name(v: str) -> str:
        m = re.match(r"\((\d+)\)(?: (.*))?", v)
        if not m:
            return v
        if m.group(2):
            names[m.group(1)] = m.group(2)
        return names.get(m.group(1), v)

    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("fl="):
                fl = fi = name(line[3:])
            elif line.startswith(("fi=", "fe=")):
                fi = name(line[3:])
            elif line.startswith("fn="):
                fi = fl
            elif line.startswith(("cfi=", "cfl=")):
                name(line[4:])
            elif line.startswith("calls="):
                skip = True
            elif line and (line[0].isdigit() or line[0] in "+-*"):
                parts = line.split()
                p = parts[0]
                if p == "*":
                    pass
                elif p[0] in "+-":
                    pos += int(p)
                else:
                    pos = int(p)
                if skip:
                    skip = False
                    continue
                if len(parts) > 1:
                    key = (fi or "?", pos)
                    cost[key] = cost.get(key, 0) + int(parts[1])
    maps: dict[str, list] = {}
    out: dict[tuple[str, int], int] = {}
    for (fname, ln), ir in cost.items():
        if fname.endswith("engine.c") and os.path.exists(fname):
            m = maps.setdefault(fname, _cython_map(fname))
            src = m[ln] if ln < len(m) else None
            key = (os.path.join(os.path.dirname(fname), src[0]), src[1]) if src else (fname, ln)
        else:
            key = (fname, ln)
        out[key] = out.get(key, 0) + ir
    return out


def _source_line(fname: str, ln: int) -> str:
    try:
        with open(fname, errors="replace") as f:
            for i, line in enumerate(f, 1):
                if i == ln:
                    return line.strip()
    except OSError:
        pass
    return ""


def _report_lines(path: str, packets: int, top: int) -> None:
    rows = sorted(self_by_line(path).items(), key=lambda kv: -kv[1])[:top]
    print(f"  self Ir/packet by source line (Cython lines mapped back from engine.c):")
    for (fname, ln), ir in rows:
        print(f"    {ir / max(packets, 1):8.1f}  {os.path.basename(fname)}:{ln}  {_source_line(fname, ln)[:90]}")


_DEF = re.compile(r"^\s*(?:cdef|cpdef|def)\s+(?:inline\s+)?[\w *]*?\b(\w+)\s*\(")


def _enclosing_function(fname: str, ln: int, cache: dict) -> str:
    """The Cython function a .pxd/.pyx line belongs to (nearest def above)."""
    if fname not in cache:
        defs, cur = [None], "?"
        try:
            with open(fname, errors="replace") as f:
                for line in f:
                    m = _DEF.match(line)
                    if m:
                        cur = m.group(1)
                    defs.append(cur)
        except OSError:
            pass
        cache[fname] = defs
    defs = cache[fname]
    return defs[ln] if ln < len(defs) else "?"


def _report_functions(path: str, packets: int) -> None:
    cache: dict = {}
    by_fn: dict[str, int] = {}
    for (fname, ln), ir in self_by_line(path).items():
        base = os.path.basename(fname)
        if base.endswith((".pxd", ".pyx", ".pxi")):
            key = f"{base}:{_enclosing_function(fname, ln, cache)}"
        else:
            key = base
        by_fn[key] = by_fn.get(key, 0) + ir
    print("  self Ir/packet by Cython function (inlined code counted where it was written):")
    for key, ir in sorted(by_fn.items(), key=lambda kv: -kv[1]):
        if ir / max(packets, 1) >= 0.5:
            print(f"    {ir / max(packets, 1):8.1f}  {key}")


def vfe(args) -> None:
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"cg.vfe.{args.size}{'.nomrg' if args.no_mrg_rxbuf else ''}"
                                  f"{'' if args.per_burst == BURST else f'.b{args.per_burst}'}"
                                  f"{'.uc' if args.unicast else ''}{'.packed' if args.packed else ''}")
    # the burst function the worker loop's net_burst calls for the layout
    burst_fn = "*packed_tx_burst" if args.packed else "*net_tx_burst"
    cmd = ["valgrind", "--tool=callgrind", f"--toggle-collect={burst_fn}",
           f"--callgrind-out-file={path}", sys.executable, "-m", "tests.bench.profile_engine",
           "_vfe_rig", "--size", str(args.size), "--bursts", str(args.bursts)]
    if args.no_mrg_rxbuf:
        cmd.append("--no-mrg-rxbuf")
    cmd += ["--per-burst", str(args.per_burst)] + (["--unicast"] if args.unicast else [])
    cmd += ["--packed"] if args.packed else []
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL if not args.verbose else None)
    _report(path, args.bursts * args.per_burst, args.top)
    _report_functions(path, args.bursts * args.per_burst)
    _report_lines(path, args.bursts * args.per_burst, args.top)


def _calls(path: str, fn: str) -> int:
    """How many calls the callgrind file records to function `fn`."""
    names: dict[str, str] = {}
    total, target = 0, False
    with open(path) as f:
        for line in f:
            if line.startswith(("fn=", "cfn=")):
                m = re.match(r"c?fn=\((\d+)\)(?: (.*))?", line.rstrip("\n"))
                if m and m.group(2):
                    names[m.group(1)] = m.group(2)
                target = line.startswith("cfn=") and m is not None and names.get(m.group(1)) == fn
            elif line.startswith("calls=") and target:
                total += int(line.split()[0][6:])
    return total


def _forwarding_thread(files: list[str]) -> str | None:
    """The dump of B's forwarding lcore: the thread that calls the dequeue."""
    for path in files:
        if _calls(path, "rte_vhost_dequeue_burst"):
            return path
    return None


def _callgrind_window(pid: int, seconds: float, before=None) -> None:
    subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)
    if before:
        before()
    time.sleep(seconds)
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)


def dpdk(args) -> None:
    from tests.harness.pmd_backends import dpdk_vhost_backend, frontend

    os.makedirs(args.out, exist_ok=True)
    prefix = os.path.join(args.out, f"cg.dpdk.{args.size}")
    for old in glob.glob(prefix + "*"):
        os.unlink(old)
    wrapper = os.path.join(args.out, "valgrind-testpmd.sh")
    with open(wrapper, "w") as f:
        f.write("#!/bin/sh\nexec valgrind --tool=callgrind --separate-threads=yes --fair-sched=yes "
                f"--callgrind-out-file={prefix} dpdk-testpmd \"$@\" 2>>{prefix}.log\n")
    os.chmod(wrapper, 0o755)
    tmp = tempfile.mkdtemp(prefix="vfe-prof-")
    atexit.register(shutil.rmtree, tmp, True)
    socks = [os.path.join(tmp, "s0"), os.path.join(tmp, "s1")]
    # the wrapper execs valgrind, so testpmd B's pid is valgrind's
    with dpdk_vhost_backend(*socks, testpmd=wrapper, start_timeout=300) as b:
        a = frontend(socks, mrg_rxbuf=not args.no_mrg_rxbuf, start_timeout=300)
        try:
            a.wait_link_up(300)
            # window 1 (dump 1): no traffic -- what one empty poll iteration costs
            _callgrind_window(b.pid, args.seconds / 2)
            a.set_fwd("io")
            a.set_txpkts(args.size)
            a.start(tx_first=4)
            time.sleep(args.warmup)
            # window 2 (dump 2): the closed loop
            _callgrind_window(b.pid, args.seconds, before=b.clear_stats)
            stats = b.port_stats()
            a.stop()
        finally:
            a.close()
    rx = sum(s.rx_packets for s in stats.values())
    tx = sum(s.tx_packets for s in stats.values())
    idle = _forwarding_thread(sorted(glob.glob(prefix + ".1-*")))
    busy = _forwarding_thread(sorted(glob.glob(prefix + ".2-*")))
    if not idle or not busy:
        raise SystemExit(f"no forwarding-thread dump among {prefix}.*")
    idle_iter = _total_ir(idle) / max(_calls(idle, "rte_vhost_dequeue_burst"), 1)
    iters = _calls(busy, "rte_vhost_dequeue_burst")
    bursts = _calls(busy, "rte_vhost_enqueue_burst")     # io fwd transmits only what it received
    total = _total_ir(busy)
    print(f"dpdk B forwarding lcore: rx {rx:,} tx {tx:,} packets in the {args.seconds}s window; "
          f"{iters:,} poll iterations, {bursts:,} with packets ({rx / max(bursts, 1):.1f} packets each)")
    print(f"  idle iteration: {idle_iter:.1f} Ir ({idle})")
    print(f"  all Ir/packet: {total / max(rx, 1):.0f}; without the {iters - bursts:,} empty polls: "
          f"{(total - (iters - bursts) * idle_iter) / max(rx, 1):.0f}")
    _report(busy, rx, args.top)


def daemon(args) -> None:
    """Our virtio-net-controller (this checkout, `--mode poll`, pinned to
    core 0 as scripts/bench runs it) under callgrind in the bench's loop.
    Packets = what testpmd A received on both ports in the window (each
    crossed the daemon once); the worker thread's dump is the one that
    calls net_tx_burst."""
    from tests.harness.pmd_backends import frontend, vhost_daemon

    os.makedirs(args.out, exist_ok=True)
    prefix = os.path.join(args.out, f"cg.daemon.{args.size}")
    for old in glob.glob(prefix + "*"):
        os.unlink(old)
    tmp = tempfile.mkdtemp(prefix="vfe-prof-")
    atexit.register(shutil.rmtree, tmp, True)
    socks = [os.path.join(tmp, "s0"), os.path.join(tmp, "s1")]
    # instrumentation off until the window: fully instrumented, the daemon
    # does not finish the vhost-user handshake within 300 s
    argv = ["valgrind", "--tool=callgrind", "--separate-threads=yes", "--fair-sched=yes",
            "--instr-atstart=no", f"--callgrind-out-file={prefix}", sys.executable, "-m", "vfe.cli.controller"]
    for s_ in socks:
        argv += ["--device", f"net,socket={s_}"]
    argv += ["--mode", "poll"]
    with vhost_daemon(argv, socks, cpus=[0], start_timeout=600, log_path=prefix + ".log") as d:
        a = frontend(socks, mrg_rxbuf=not args.no_mrg_rxbuf, start_timeout=300)
        try:
            a.wait_link_up(300)
            a.set_fwd("io")
            a.set_txpkts(args.size)
            a.start(tx_first=4)
            time.sleep(args.warmup)
            subprocess.run(["callgrind_control", "-i", "on", str(d.pid)], check=True, capture_output=True)
            time.sleep(args.warmup)
            _callgrind_window(d.pid, args.seconds, before=a.clear_stats)
            stats = a.port_stats()
            a.stop()
        finally:
            a.close()
    packets = sum(s_.rx_packets for s_ in stats.values())
    files = sorted(glob.glob(prefix + ".1-*"))
    worker = next((f for f in files if _calls(f, "__pyx_f_7netdata_net_tx_burst")), None)
    if worker is None:
        raise SystemExit(f"no worker-thread dump among {files}")
    iters = _calls(worker, "__pyx_f_7netdata_net_tx_burst")
    print(f"daemon worker: {packets:,} packets in the {args.seconds}s window, "
          f"{iters:,} net_tx_burst calls ({packets / max(iters, 1):.1f} packets each)")
    _report(worker, packets, args.top)
    _report_functions(worker, packets)


def _thread_ticks(pid: int) -> dict[int, int]:
    """utime+stime (clock ticks) of every thread of `pid`."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[int(tid)] = int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return out


def _cpu_mhz() -> float:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1])
    return 0.0


def _loop_window(a, pid: int, size: int, seconds: float, warmup: float) -> dict:
    from tests.harness.pmd_measure import CpuWatch, drain
    drain(a)
    a.set_fwd("io")
    a.set_txpkts(size)
    a.clear_stats()
    a.start(tx_first=4)
    try:
        time.sleep(warmup)
        with CpuWatch([a.pid, pid]) as cpu:
            s0, t0, c0 = a.port_stats(), time.monotonic(), _thread_ticks(pid)
            time.sleep(seconds)
            s1, t1, c1 = a.port_stats(), time.monotonic(), _thread_ticks(pid)
    finally:
        a.stop()
    packets = sum(s1[p].rx_packets - s0[p].rx_packets for p in s1)
    hz = os.sysconf("SC_CLK_TCK")
    busiest = max(c1, key=lambda t: c1[t] - c0.get(t, 0))
    thread_s = (c1[busiest] - c0.get(busiest, 0)) / hz
    return {"packets": packets, "seconds": t1 - t0, "mpps": packets / (t1 - t0) / 1e6,
            "thread_cpu_s": thread_s,
            "process_cpu_s": (sum(c1.values()) - sum(c0.get(t, 0) for t in c1)) / hz,
            "cycles_per_packet": thread_s * _cpu_mhz() * 1e6 / max(packets, 1),
            "others_cores": cpu.foreign, "load": os.getloadavg()[0]}


def cycles(args) -> None:
    """Cycles per packet from CPU time: the back-end's busiest thread (DPDK's
    forwarding lcore, our poll worker) over the packets A received in a
    window, at /proc/cpuinfo's clock.  Back-ends alternate, as scripts/bench."""
    from tests.harness.pmd_backends import controller_argv, dpdk_vhost_backend, frontend, vhost_daemon

    tmp = tempfile.mkdtemp(prefix="vfe-prof-")
    atexit.register(shutil.rmtree, tmp, True)
    socks = [os.path.join(tmp, "s0"), os.path.join(tmp, "s1")]
    order = ["dpdk", "vfe", "vfe", "dpdk"] * args.rounds
    for name in order[: 2 * args.rounds]:
        if name == "dpdk":
            ctx = dpdk_vhost_backend(*socks)
        else:
            argv = [sys.executable, "-m", "vfe.cli.controller"] + controller_argv(socks)[1:]
            ctx = vhost_daemon(argv, socks, cpus=[0])
        with ctx as b:
            a = frontend(socks, mrg_rxbuf=not args.no_mrg_rxbuf)
            try:
                a.wait_link_up()
                r = _loop_window(a, b.pid, args.size, args.seconds, args.warmup)
            finally:
                a.close()
        print(f"{name:4} {args.size} B: {r['mpps']:.2f} Mpps, busiest thread {r['thread_cpu_s']:.2f} s CPU "
              f"of {r['seconds']:.2f} s (process {r['process_cpu_s']:.2f} s), "
              f"{r['cycles_per_packet']:.0f} cycles/packet at {_cpu_mhz():.0f} MHz; "
              f"others {r['others_cores']:.2f} cores, load {r['load']:.2f}", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["vfe", "dpdk", "daemon", "cycles", "_vfe_rig"])
    p.add_argument("--size", type=int, default=64, help="frame bytes (without the virtio header)")
    p.add_argument("--bursts", type=int, default=400, help="vfe: bursts of --per-burst frames")
    p.add_argument("--seconds", type=float, default=10.0, help="dpdk/daemon: window under callgrind; cycles: timed window")
    p.add_argument("--warmup", type=float, default=3.0, help="dpdk/daemon/cycles: seconds before the window")
    p.add_argument("--rounds", type=int, default=3, help="cycles: alternating rounds")
    p.add_argument("--top", type=int, default=25, help="functions listed")
    p.add_argument("--out", default="/tmp/vfe-profile", help="where the callgrind files go")
    p.add_argument("--per-burst", type=int, default=BURST,
                   help="vfe: frames per burst (the bench's loop gives the poll worker fewer than 32 "
                        "when the front-end is the slower side)")
    p.add_argument("--unicast", action="store_true",
                   help="vfe: frames to an unknown unicast MAC (as the bench's) instead of broadcast")
    p.add_argument("--no-mrg-rxbuf", action="store_true",
                   help="mergeable RX buffers off (the rig's devices; testpmd A's mrg_rxbuf=0)")
    p.add_argument("--packed", action="store_true",
                   help="vfe: packed rings (VIRTIO_F_RING_PACKED) instead of split ones")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.mode == "_vfe_rig":
        run_vfe_rig(args.size, args.bursts, not args.no_mrg_rxbuf, args.per_burst, args.unicast,
                    args.packed)
    else:
        {"vfe": vfe, "dpdk": dpdk, "daemon": daemon, "cycles": cycles}[args.mode](args)


if __name__ == "__main__":
    main()
