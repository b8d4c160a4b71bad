"""Closed-loop throughput: DPDK's vhost back-end vs our virtio-net-controller.

The same testpmd front-end ("A": two net_virtio_user ports, vhost-user
clients, io forwarding, forwarding lcore on core 1) runs against

  dpdk  testpmd "B": two net_vhost server ports, io forwarding, forwarding
        lcore on core 0 (the reference);
  vfe   virtio-net-controller --device net,socket=S0 --device net,socket=S1
        --mode poll, pinned to core 0 (skipped if not installed).

in alternating runs (dpdk, vfe, vfe, dpdk, ...), for each frame size:
inject `start tx_first N` bursts, io-forward in a loop, and count the
packets A receives on both ports over a window.  Prints a table (median
and range over the runs); --json for programs.  Writes nothing unless
--record FILE is given.  Progress goes to stderr.

    scripts/bench                        # 3 rounds, 64 and 1518 B, 5 s windows
    scripts/bench --rounds 5 --seconds 10 --json
    scripts/bench --record docs/performance.md
    scripts/bench --counters-ab          # counters on vs compiled out, 64 B

--counters-ab compares two builds of our engine instead of DPDK and ours:
this checkout's ("vfe") and a copy built with VFE_ENGINE_COUNTERS=0 in a
temporary directory ("off": the per-queue counters compiled out,
cython_ext/counters.pxd), in the same alternating runs; the ratio is
vfe/off.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from tests.harness import pmd_backends
from tests.harness import pmd_measure as measure
from tests.harness import testpmd as tp

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BEGIN = "<!-- bench:results:begin -->"
END = "<!-- bench:results:end -->"


def progress(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine() -> dict:
    model = ""
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": model, "nproc": os.cpu_count(), "kernel": platform.release(),
            "avx2": "avx2" in flags, "avx512f": "avx512f" in flags}


def git_rev() -> str:
    try:
        return subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=5).stdout.strip() or "-"
    except Exception:
        return "-"


# ---------------------------------------------------------------------------

class Backend:
    """One side of the comparison: a context manager that serves two sockets."""

    def __init__(self, name: str, args):
        self.name = name
        self.args = args
        self.error: str | None = None

    def serve(self, sockets):
        raise NotImplementedError


class DpdkBackend(Backend):
    def serve(self, sockets):
        b = pmd_backends.dpdk_vhost_backend(*sockets, queues=self.args.queues,
                                  cores=[0, 1], main_lcore=self.args.backend_main_lcore)
        return _Wrap(b, lambda pmd: [pmd.pid])


class OursBackend(Backend):
    def __init__(self, name: str, args, env: dict | None = None):
        super().__init__(name, args)
        self.env = env                  # the daemon's environment (None: ours)

    def serve(self, sockets):
        argv = pmd_backends.controller_argv(sockets, mode=self.args.mode, binary=self.args.controller,
                                  extra=self.args.controller_arg, queues=self.args.queues)
        log = None
        if self.args.keep_logs:
            os.makedirs(self.args.keep_logs, exist_ok=True)
            log = os.path.join(self.args.keep_logs, f"controller-{int(time.time())}.log")
        cpus = [int(c) for c in self.args.controller_cpus.split(",") if c.strip()] or None
        d = pmd_backends.vhost_daemon(argv, sockets, cpus=cpus, log_path=log, env=self.env)
        return _Wrap(d, lambda dm: [dm.pid])


class _Wrap:
    def __init__(self, cm, pids):
        self.cm, self.pids_of = cm, pids
        self.pids: list[int] = []

    def __enter__(self):
        obj = self.cm.__enter__()
        self.pids = self.pids_of(obj)
        self.obj = obj
        return self

    def __exit__(self, *exc):
        return self.cm.__exit__(*exc)


def one_run(backend: Backend, args, workdir: str) -> list[measure.LoopResult]:
    """Start the back-end and the front-end, measure every frame size."""
    socks = [os.path.join(workdir, f"{backend.name}-{i}.sock") for i in range(2)]
    results = []
    with backend.serve(socks) as srv:
        with pmd_backends.frontend(socks, queues=args.queues, queue_size=args.queue_size,
                         mrg_rxbuf=not args.no_mrg_rxbuf, cores=[0, 1],
                         main_lcore=args.frontend_main_lcore, packed_vq=args.packed) as a:
            a.wait_link_up(20)
            own = [a.pid, *srv.pids]
            for size in args.sizes:
                best = None
                for attempt in range(args.retries + 1):
                    if args.wait_quiet > 0:
                        wait_quiet(own, args.wait_quiet, args.quiet_threshold)
                    r = measure.measure_loop(a, args.seconds, size, burst_first=args.bursts,
                                        warmup=args.warmup, own_pids=srv.pids)
                    if best is None or r.foreign_cpu < best.foreign_cpu:
                        best = r
                    if r.foreign_cpu <= args.quiet_threshold:
                        break
                    if attempt < args.retries:
                        progress(f"  {backend.name:4s} {size:5d} B: {r.mpps:6.2f} Mpps, but others "
                                 f"used {r.foreign_cpu:.2f} cores: measuring again")
                r = best
                note = ""
                if r.foreign_cpu > args.quiet_threshold:
                    note += f"  [others used {r.foreign_cpu:.2f} cores: unreliable]"
                if r.tx_dropped or r.rx_missed or r.rx_errors:
                    note += f"  [dropped={r.tx_dropped} missed={r.rx_missed} errors={r.rx_errors}]"
                progress(f"  {backend.name:4s} {size:5d} B: {r.mpps:6.2f} Mpps "
                         f"{r.gbps:6.2f} Gbit/s{note}")
                results.append(r)
    return results


def wait_quiet(own_pids, max_wait: float, threshold: float) -> bool:
    """Wait (at most max_wait s) until other processes use < threshold cores."""
    deadline = time.monotonic() + max_wait
    said = False
    while True:
        with measure.CpuWatch(own_pids) as c:
            time.sleep(0.5)
        if c.foreign <= threshold:
            return True
        if time.monotonic() > deadline:
            progress(f"  machine still busy ({c.foreign:.2f} cores used by others); measuring anyway")
            return False
        if not said:
            progress(f"  waiting for a quiet machine (others use {c.foreign:.2f} cores)")
            said = True


def build_without_counters(workdir: str) -> str:
    """A copy of this checkout's package and engine sources under workdir,
    built with VFE_ENGINE_COUNTERS=0; returns the directory to put first on
    PYTHONPATH.  Raises RuntimeError if the build fails or still counts."""
    root = os.path.join(workdir, "nocounters")
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.c", "build")
    for part in ("vfe", "cython_ext"):
        shutil.copytree(os.path.join(REPO, part), os.path.join(root, part), ignore=skip)
    for f in ("setup.py", "pyproject.toml"):
        shutil.copy(os.path.join(REPO, f), root)
    env = dict(os.environ, VFE_ENGINE_COUNTERS="0")
    b = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], cwd=root, env=env,
                       capture_output=True, text=True)
    if b.returncode:
        raise RuntimeError(f"building the engine without counters failed:\n{b.stderr[-2000:]}")
    check = subprocess.run([sys.executable, "-P", "-c", "import vfe.engine; print(vfe.engine.ENGINE_COUNTERS)"],
                           env=dict(os.environ, PYTHONPATH=root), capture_output=True, text=True)
    if check.stdout.strip() != "False":
        raise RuntimeError(f"the build in {root} still counts: {check.stdout}{check.stderr}")
    return root


def summarize(runs: dict[str, dict[int, list[measure.LoopResult]]], sizes,
              names: tuple[str, str] = ("dpdk", "vfe")) -> list[dict]:
    """Per frame size: each side's median and range, and the ratio second/first."""
    rows = []
    for size in sizes:
        row = {"frame_size": size}
        for name in names:
            rs = runs.get(name, {}).get(size, [])
            if not rs:
                row[name] = None
                continue
            mp = [r.mpps for r in rs]
            gb = [r.gbps for r in rs]
            row[name] = {"mpps": statistics.median(mp), "gbps": statistics.median(gb),
                         "mpps_min": min(mp), "mpps_max": max(mp), "runs": len(rs),
                         "foreign_cpu_max": max(r.foreign_cpu for r in rs)}
        d, o = row.get(names[0]), row.get(names[1])
        row["ratio"] = (o["mpps"] / d["mpps"]) if d and o and d["mpps"] > 0 else None
        rows.append(row)
    return rows


def fmt_table(rows, vfe_note: str | None, markdown: bool = False,
              names: tuple[str, str] = ("dpdk", "vfe")) -> str:
    first, second = names
    head = ["frame", f"{first} Mpps", f"{first} Gbit/s", f"{second} Mpps", f"{second} Gbit/s",
            f"{second}/{first}"]
    body = []
    for row in rows:
        d, o = row[first], row[second]
        cells = [f"{row['frame_size']} B"]
        for name, x in ((first, d), (second, o)):
            if x:
                cells += [f"{x['mpps']:.2f} ({x['mpps_min']:.2f}-{x['mpps_max']:.2f})",
                          f"{x['gbps']:.2f}"]
            else:
                cells += ["pending" if name == "vfe" else "-", "-"]
        cells.append(f"{row['ratio']:.2f}" if row["ratio"] is not None else "-")
        body.append(cells)
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        out += ["| " + " | ".join(c) + " |" for c in body]
        return "\n".join(out)
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    line = lambda cs: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cs, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(c) for c in body])


def record(path: str, report: dict, table_md: str) -> None:
    m = report["machine"]
    p = report["params"]
    lines = [
        BEGIN,
        f"Recorded {report['when']} by `scripts/bench` (git {report['git']}): "
        f"{m['cpu']}, {m['nproc']} CPUs, kernel {m['kernel']}.",
        f"{p['rounds']} alternating rounds, {p['seconds']} s windows after {p['warmup']} s warm-up, "
        f"tx_first {p['bursts']}, {p['queues']} queue pair(s), ring {p['queue_size']}, "
        f"mrg_rxbuf={'off' if p['no_mrg_rxbuf'] else 'on'}"
        f"{', packed virtqueues' if p.get('packed') else ''}. Median (min-max) of the runs; "
        f"Mpps = packets received by testpmd A on both ports; Gbit/s = their L2 bytes x 8.",
        "",
        table_md,
        "",
    ]
    if report.get("vfe_skipped"):
        lines += [f"vfe: {report['vfe_skipped']}", ""]
    worst = max((r[k]["foreign_cpu_max"] for r in report["rows"] for k in ("dpdk", "off", "vfe") if r.get(k)),
                default=0.0)
    lines += [f"Other processes used up to {worst:.2f} cores during the windows"
              + (" (numbers disturbed)." if worst > 0.05 else "."), END]
    block = "\n".join(lines)
    text = open(path).read() if os.path.exists(path) else "# Performance\n"
    if BEGIN in text and END in text:
        pre, rest = text.split(BEGIN, 1)
        post = rest.split(END, 1)[1]
        text = pre + block + post
    else:
        text = text.rstrip("\n") + "\n\n## Latest recorded results\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=None,
                    help="frame sizes in bytes (default 64,1518; with --counters-ab 64)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--seconds", type=float, default=5.0, help="measurement window (default 5)")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds before the window (default 1)")
    ap.add_argument("--bursts", type=int, default=4, help="start tx_first N (default 4)")
    ap.add_argument("--queues", type=int, default=1)
    ap.add_argument("--queue-size", type=int, default=256)
    ap.add_argument("--no-mrg-rxbuf", action="store_true")
    ap.add_argument("--packed", action="store_true",
                    help="packed virtqueues: testpmd A's ports get packed_vq=1 (both back-ends)")
    ap.add_argument("--frontend-main-lcore", type=int, default=tp.FRONTEND_CORES[1],
                    help="testpmd A main lcore of 0,1 (default 0: forwarding on core 1)")
    ap.add_argument("--backend-main-lcore", type=int, default=tp.BACKEND_CORES[1],
                    help="testpmd B main lcore of 0,1 (default 1: forwarding on core 0)")
    ap.add_argument("--quiet-threshold", type=float, default=0.05,
                    help="a window is disturbed when other processes used more cores (0.05)")
    ap.add_argument("--wait-quiet", type=float, default=30.0,
                    help="before a window, wait up to this many seconds for other processes "
                         "to go quiet (default 30; 0 = don't wait)")
    ap.add_argument("--retries", type=int, default=2,
                    help="measure a disturbed window again up to N times (default 2)")
    ap.add_argument("--controller", default=None,
                    help="path of virtio-net-controller (default: found on PATH)")
    ap.add_argument("--controller-arg", action="append", default=[],
                    help="extra argument for the controller (repeatable)")
    ap.add_argument("--controller-cpus", default="0",
                    help="pin the controller to these CPUs (default 0; '' = no pinning)")
    ap.add_argument("--mode", default="poll", help="controller --mode (default poll)")
    ap.add_argument("--only", choices=["dpdk", "vfe"], help="run one side only")
    ap.add_argument("--counters-ab", action="store_true",
                    help="compare our engine with a build of it with the counters compiled out "
                         "(instead of DPDK; --sizes defaults to 64)")
    ap.add_argument("--keep-logs", metavar="DIR", help="keep the controller's logs there")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--record", metavar="FILE", help="write the results into FILE (markdown)")
    args = ap.parse_args(argv)
    if args.sizes is None:
        args.sizes = "64" if args.counters_ab else "64,1518"
    # SIGTERM unwinds like Ctrl-C: the context managers stop testpmd/the daemon
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

    if not tp.testpmd_available():
        print("dpdk-testpmd not found (apt-get install dpdk-dev librte-net-vhost23 "
              "librte-mempool-ring23)", file=sys.stderr)
        return 2

    backends: list[Backend] = []
    vfe_skipped = None
    names = ("off", "vfe") if args.counters_ab else ("dpdk", "vfe")
    workdir = tempfile.mkdtemp(prefix="vfe-bench-")
    if args.counters_ab:
        binary = args.controller or shutil.which(pmd_backends.CONTROLLER)
        if not binary:
            print(f"{pmd_backends.CONTROLLER} not installed", file=sys.stderr)
            return 2
        args.controller = binary
        progress("building the engine without counters")
        try:
            off_root = build_without_counters(workdir)
        except RuntimeError as e:
            print(e, file=sys.stderr)
            shutil.rmtree(workdir, ignore_errors=True)
            return 2
        backends = [OursBackend("off", args, env=dict(os.environ, PYTHONPATH=off_root)),
                    OursBackend("vfe", args)]
    elif args.only != "vfe":
        backends.append(DpdkBackend("dpdk", args))
    if args.only == "dpdk":
        vfe_skipped = "not run (--only dpdk)"
    else:
        binary = args.controller or shutil.which(pmd_backends.CONTROLLER)
        if binary and os.access(binary, os.X_OK):
            args.controller = binary
            backends.append(OursBackend("vfe", args))
        else:
            vfe_skipped = f"{pmd_backends.CONTROLLER} not installed: our side skipped"
            progress(vfe_skipped)
    if not backends:
        return 2

    runs: dict[str, dict[int, list[measure.LoopResult]]] = {b.name: {} for b in backends}
    try:
        for rnd in range(args.rounds):
            order = backends if rnd % 2 == 0 else list(reversed(backends))
            for b in order:
                if b.error:
                    continue
                progress(f"round {rnd + 1}/{args.rounds}: {b.name}")
                try:
                    for r in one_run(b, args, workdir):
                        runs[b.name].setdefault(r.frame_size, []).append(r)
                except (tp.TestPmdError, OSError) as e:
                    b.error = f"{b.name} failed: {e}"
                    progress(b.error)
    except KeyboardInterrupt:
        progress("interrupted")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    for b in backends:
        if b.error and b.name == "vfe":
            vfe_skipped = b.error.splitlines()[0]
    rows = summarize(runs, args.sizes, names)
    report = {
        "when": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git": git_rev(),
        "machine": machine(),
        "params": {k: getattr(args, k) for k in ("sizes", "rounds", "seconds", "warmup", "bursts",
                                                  "counters_ab",
                                                  "quiet_threshold", "retries", "wait_quiet",
                                                  "queues", "queue_size", "no_mrg_rxbuf", "packed",
                                                  "frontend_main_lcore", "backend_main_lcore",
                                                  "controller_cpus", "mode")},
        "rows": rows,
        "runs": {name: {str(size): [r.as_dict() for r in rs] for size, rs in per.items()}
                 for name, per in runs.items()},
        "vfe_skipped": vfe_skipped,
        "errors": [b.error for b in backends if b.error],
    }
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print(fmt_table(rows, vfe_skipped, names=names))
        if vfe_skipped:
            print(f"vfe: {vfe_skipped}")
        worst = max((r[k]["foreign_cpu_max"] for r in rows for k in names if r[k]),
                    default=0.0)
        if worst > 0.05:
            print(f"warning: other processes used up to {worst:.2f} cores during the windows; "
                  "the numbers are disturbed")
    if args.record:
        record(args.record, report, fmt_table(rows, vfe_skipped, markdown=True, names=names))
        progress(f"recorded in {args.record}")
    return 1 if any(b.error for b in backends) else 0


if __name__ == "__main__":
    sys.exit(main())
