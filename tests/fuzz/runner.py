"""scripts/fuzz: run one coverage-guided (atheris/libFuzzer) fuzz target.

    scripts/fuzz --list
    scripts/fuzz TARGET [--runs N | --seconds S] [--corpus DIR] [--no-native]
                        [--timeout S] [--findings DIR] [--sanitizer address|none]
                        [-- LIBFUZZER_ARGS...]
    scripts/fuzz TARGET --replay FILE...

A target is tests/fuzz/target_<name>.py (interface: tests/fuzz/worker.py).
Inputs that found something new go to the working corpus (default
build/fuzz/corpus/<name>/, kept between runs); the committed seeds in
tests/fuzz/corpus/<name>/ and the inputs of past findings in
tests/fuzz/regressions/<name>/ are read first, never written.  A crash, an exception
out of the target or a hang (--timeout, default 25 s per input) is a
finding: the input is saved under build/fuzz/findings/<name>/, its path
printed, and the exit status is 1.  Exit 2: the run could not be made.

The fuzzing runs in a child process (tests/fuzz/worker.py); this one builds
what it needs (tests/fuzz/native.py), shows progress and sums up.  libFuzzer's
own log goes to build/fuzz/logs/<name>.log.
"""
from __future__ import annotations

import argparse
import ast
import glob
import os
import re
import selectors
import signal
import subprocess
import sys
import time

from . import native

REPO = native.REPO
FUZZ_DIR = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(REPO, "build", "fuzz")

# libFuzzer's status lines: "#4096  pulse  cov: 812 ft: 1630 corp: 41/3208b ... exec/s: 2048"
_STATUS = re.compile(r"^#(\d+)\s+(\w+)\s+cov: (\d+) ft: (\d+) corp: (\d+)/")
_ARTIFACT = re.compile(r"Test unit written to (\S+)")
_DONE = re.compile(r"^Done (\d+) runs in (\d+) second")
_RUNNING = re.compile(r"^Running: (.+)$")           # replay: the input being run
# Where a finding's report starts in the log (for the excerpt shown).
_REPORT_START = ("=== Uncaught Python exception", "ERROR: AddressSanitizer", "ERROR: libFuzzer",
                 "ALARM: working on the last Unit", "==ERROR", "ERROR: UndefinedBehaviorSanitizer")


def target_files() -> dict[str, str]:
    out = {}
    for path in sorted(glob.glob(os.path.join(FUZZ_DIR, "target_*.py"))):
        out[os.path.basename(path)[len("target_"):-len(".py")]] = path
    return out


def _module_constant(path: str, name: str, default):
    """A literal top-level assignment in the target file, read without
    importing it (this process must stay free of the code under test)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == name for t in node.targets):
            try:
                return ast.literal_eval(node.value)
            except ValueError:
                return default
    return default


def _docstring(path: str) -> str:
    with open(path) as f:
        doc = ast.get_docstring(ast.parse(f.read(), path)) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


class Progress:
    """What the run has done so far, from libFuzzer's log and the worker's counter."""

    def __init__(self) -> None:
        self.runs = 0
        self.cov = self.ft = self.corpus = 0
        self.artifacts: list[str] = []
        self.native = ""
        self.done_runs: int | None = None
        self.running = ""
        self.interrupted = False        # libFuzzer was stopped by a signal

    def log_line(self, line: str) -> None:
        m = _STATUS.match(line)
        if m:
            self.runs = max(self.runs, int(m.group(1)))
            self.cov, self.ft, self.corpus = int(m.group(3)), int(m.group(4)), int(m.group(5))
            return
        m = _ARTIFACT.search(line)
        if m:
            self.artifacts.append(os.path.abspath(m.group(1)))
            return
        m = _DONE.match(line)
        if m:
            self.done_runs = int(m.group(1))
            return
        m = _RUNNING.match(line)
        if m:
            self.running = m.group(1)
            return
        if "libFuzzer: run interrupted" in line:
            self.interrupted = True

    def status_line(self, line: str) -> None:
        kind, _, value = line.partition(" ")
        if kind == "runs":
            self.runs = max(self.runs, int(value))
        elif kind == "native":
            self.native = value


def _excerpt(log_path: str, lines: int = 40) -> str:
    with open(log_path, errors="replace") as f:
        text = f.read().splitlines()
    for i, line in enumerate(text):
        if any(marker in line for marker in _REPORT_START):
            return "\n".join(text[i:i + lines])
    return "\n".join(text[-lines:])


def _fmt_time(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(
        prog="scripts/fuzz", description="Run one coverage-guided fuzz target (atheris).",
        epilog="Arguments after -- go to libFuzzer unchanged.")
    ap.add_argument("target", nargs="?", help="target name (see --list), or a target file (.py)")
    ap.add_argument("--list", action="store_true", help="list the targets and exit")
    limit = ap.add_mutually_exclusive_group()
    limit.add_argument("--runs", type=int, help="stop after N inputs")
    limit.add_argument("--seconds", type=int, help="stop after S seconds")
    ap.add_argument("--corpus", help="working corpus directory (default build/fuzz/corpus/TARGET)")
    ap.add_argument("--findings", help="where crashing inputs go (default build/fuzz/findings/TARGET)")
    ap.add_argument("--timeout", type=int, default=25,
                    help="seconds one input may take before it counts as a hang (default 25)")
    ap.add_argument("--no-native", action="store_true",
                    help="do not use the instrumented engine build (Python coverage only)")
    ap.add_argument("--sanitizer", choices=sorted(native.VARIANTS), default="address",
                    help="how the engine is built for fuzzing: address (ASan + coverage, "
                         "default) or none (coverage only, faster)")
    ap.add_argument("--replay", nargs="+", metavar="FILE", help="run these inputs once each")
    args = ap.parse_args(argv)
    args.libfuzzer = extra
    if not args.list and not args.target:
        ap.error("name a target (or --list)")
    return args


def _native_env(args, path: str, say) -> tuple[dict[str, str], str]:
    """The worker's environment and a word on its coverage."""
    env = dict(os.environ, VFE_FUZZ_OVERLAY="", PYTHONPATH=REPO + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    env.pop("LD_PRELOAD", None)
    if args.no_native or not _module_constant(path, "NATIVE", True):
        return env, "Python only (" + ("--no-native" if args.no_native else "target: NATIVE = False") + ")"
    try:
        build = native.prepare(args.sanitizer, log=say)
    except native.NativeUnavailable as exc:
        say(f"fuzz: NOTICE: native coverage of vfe._engine is OFF, Python coverage only: {exc}")
        return env, "Python only (no instrumented build)"
    env.update(build.env, VFE_FUZZ_OVERLAY=build.overlay, LD_PRELOAD=build.preload)
    return env, "native + Python" + (" (ASan)" if args.sanitizer == "address" else "")


def _resolve(name_or_file: str, targets: dict[str, str]) -> tuple[str | None, str]:
    """(target file or None, short name) for a name from --list or a .py file."""
    if name_or_file.endswith(".py"):           # a target file outside tests/fuzz
        path = os.path.abspath(name_or_file) if os.path.isfile(name_or_file) else None
        return path, os.path.basename(name_or_file)[:-3].removeprefix("target_")
    return targets.get(name_or_file), name_or_file


def _libfuzzer_args(args, name: str, findings: str) -> list[str]:
    out = [f"-timeout={args.timeout}", "-rss_limit_mb=4096", "-print_final_stats=1",
           f"-artifact_prefix={findings}/"]
    if args.replay:
        return out + args.libfuzzer + [os.path.abspath(p) for p in args.replay]
    corpus = os.path.abspath(args.corpus or os.path.join(OUT_DIR, "corpus", name))
    os.makedirs(corpus, exist_ok=True)
    seeds = [d for d in (os.path.join(FUZZ_DIR, "corpus", name),
                         os.path.join(FUZZ_DIR, "regressions", name)) if os.path.isdir(d)]
    if args.runs is not None:
        out.append(f"-runs={args.runs}")
    if args.seconds is not None:
        out.append(f"-max_total_time={args.seconds}")
    # new inputs go to the first directory: the working corpus, never the seeds
    return out + args.libfuzzer + [corpus] + seeds


def run(args) -> int:
    targets = target_files()
    if args.list:
        for name, path in targets.items():
            print(f"{name:16} {_docstring(path)}")
        return 0
    path, name = _resolve(args.target, targets)
    if path is None:
        print(f"fuzz: no target {args.target!r} (have: {', '.join(targets) or 'none'})",
              file=sys.stderr)
        return 2
    tty = sys.stderr.isatty()

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    env, coverage = _native_env(args, path, say)
    findings = os.path.abspath(args.findings or os.path.join(OUT_DIR, "findings", name))
    os.makedirs(findings, exist_ok=True)
    logs = os.path.join(OUT_DIR, "logs")
    os.makedirs(logs, exist_ok=True)
    log_path = os.path.join(logs, f"{name}.log")
    # SIGTERM (CI's timeout, kill) stops the run like Ctrl-C: the worker's
    # summary still comes out
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)
    status_r, status_w = os.pipe()
    env["VFE_FUZZ_STATUS_FD"] = str(status_w)
    cmd = [sys.executable, "-m", "tests.fuzz.worker", path] + _libfuzzer_args(args, name, findings)
    say(f"fuzz {name}: coverage {coverage}; log {os.path.relpath(log_path)}")
    start = time.monotonic()
    progress = Progress()
    with open(log_path, "w") as log_file:
        log_file.write("$ " + " ".join(cmd) + "\n")
        log_file.flush()
        child = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 pass_fds=(status_w,))
        os.close(status_w)
        try:
            _follow(child, status_r, log_file, progress, start, name, tty, say)
        except KeyboardInterrupt:
            progress.interrupted = True
            child.send_signal(signal.SIGTERM)        # libFuzzer: "run interrupted", stats
            try:
                _follow(child, status_r, log_file, progress, start, name, tty, say)
            except KeyboardInterrupt:
                child.kill()
        rc = child.wait()
        os.close(status_r)
    if tty:
        sys.stderr.write("\r\x1b[K")
    overlay = env["VFE_FUZZ_OVERLAY"]
    if overlay and not progress.native.startswith(overlay):
        coverage = ("Python only (the target does not load vfe._engine)" if not progress.native
                    else f"Python only (vfe._engine came from {progress.native})")
    return _report(args, name, progress, rc, time.monotonic() - start, coverage, log_path, say)


def _report(args, name, progress, rc, elapsed, coverage, log_path, say) -> int:
    """The closing lines and the exit status (0 clean, 1 finding, 2 error)."""
    runs = progress.done_runs if progress.done_runs is not None else progress.runs
    rate = runs / elapsed if elapsed > 0 else 0.0
    facts = (f"{runs:,} inputs in {elapsed:.0f} s ({rate:,.0f}/s), coverage {progress.cov:,} edges"
             f" / {progress.ft:,} features, corpus {progress.corpus:,}, {coverage}")
    stopped = progress.interrupted
    if args.replay and rc != 0 and not stopped and not progress.artifacts and progress.running:
        progress.artifacts.append(progress.running)     # libFuzzer saves no copy of a given file
    if progress.artifacts:
        say(_excerpt(log_path))
        for artifact in progress.artifacts:
            say(f"fuzz {name}: the input is saved in {artifact}")
            say(f"  replay: scripts/fuzz {args.target} --replay {artifact}")
        print(f"fuzz {name}: FINDING: {facts}; log {log_path}", flush=True)
        return 1
    if rc != 0 and not stopped:
        say(_excerpt(log_path))
        print(f"fuzz {name}: ERROR: the fuzzer exited with status {rc} and saved no input; "
              f"log {log_path}", flush=True)
        return 2
    word = "replayed" if args.replay else ("stopped" if stopped else "done")
    print(f"fuzz {name}: {word}, no findings: {facts}", flush=True)
    return 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _follow(child, status_r, log_file, progress, start, name, tty, say) -> None:
    """Copy the child's output to the log, update and show progress, until it exits."""
    sel = selectors.DefaultSelector()
    sel.register(child.stdout, selectors.EVENT_READ, "log")
    sel.register(status_r, selectors.EVENT_READ, "status")
    buffers = {"log": b"", "status": b""}
    last_shown = 0.0
    open_streams = 2
    while open_streams:
        for key, _ in sel.select(timeout=0.5):
            chunk = os.read(key.fd, 65536)
            if not chunk:
                sel.unregister(key.fileobj)
                open_streams -= 1
                continue
            if key.data == "log":
                log_file.write(chunk.decode(errors="replace"))
            buffers[key.data] += chunk
            *lines, buffers[key.data] = buffers[key.data].split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                (progress.log_line if key.data == "log" else progress.status_line)(line)
        now = time.monotonic()
        if now - last_shown >= (0.5 if tty else 30.0):
            last_shown = now
            elapsed = now - start
            rate = progress.runs / elapsed if elapsed > 0 else 0
            line = (f"fuzz {name}: {progress.runs:,} inputs  {rate:,.0f}/s  cov {progress.cov:,}"
                    f"  ft {progress.ft:,}  corpus {progress.corpus:,}  [{_fmt_time(elapsed)}]")
            if tty:
                sys.stderr.write("\r" + line + "\x1b[K")
                sys.stderr.flush()
            elif progress.runs:
                say(line)
    sel.close()


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
