"""The fuzzing process itself: loads one target and hands it to atheris.

Started by the runner (tests/fuzz/runner.py), never by hand:

    python3 -m tests.fuzz.worker TARGET_FILE [libFuzzer arguments...]

Environment (set by the runner):
    VFE_FUZZ_OVERLAY     directory holding an instrumented vfe/_engine*.so
                         (put first on vfe.__path__); empty: the normal build
    VFE_FUZZ_STATUS_FD   a pipe: the worker writes "runs <n>" lines to it
                         about twice a second, and "native <path>" once

A target file defines ``fuzz_one(data: bytes) -> None`` and may define
``setup() -> None`` (called once before fuzzing) and ``MAX_LEN`` (the
largest input worth generating; default 4096).  Any exception out of
``fuzz_one``, or a crash, is a finding.
"""
from __future__ import annotations

import importlib.util
import os
import pkgutil
import sys
import time

# Instrumented: the project.  Not numpy/numba etc. (slow to instrument, and
# not what is under test), nor the test harnesses and targets themselves:
# their branches only cost time (a third of it for the protocol target).
INSTRUMENT = ["vfe"]


def _not_instrumented() -> list[str]:
    """vfe.testing and its modules (atheris excludes by exact name)."""
    import vfe.testing
    return ["vfe.testing"] + [f"vfe.testing.{m.name}"
                              for m in pkgutil.iter_modules(vfe.testing.__path__)]


def _status_writer():
    fd = int(os.environ.get("VFE_FUZZ_STATUS_FD", "-1"))
    if fd < 0:
        return lambda line: None
    out = os.fdopen(fd, "w", buffering=1)

    def write(line: str) -> None:
        try:
            out.write(line + "\n")
        except OSError:
            pass                      # the runner went away: keep fuzzing quietly
    return write


def _use_overlay() -> None:
    overlay = os.environ.get("VFE_FUZZ_OVERLAY", "")
    if overlay:
        import vfe                    # only its trivial __init__ runs here
        vfe.__path__.insert(0, os.path.join(overlay, "vfe"))


def _load_target(path: str):
    name = "tests.fuzz." + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    target_path, fuzzer_args = sys.argv[1], sys.argv[2:]
    status = _status_writer()
    _use_overlay()
    import atheris
    with atheris.instrument_imports(include=INSTRUMENT, exclude=_not_instrumented()):
        import tests.fuzz            # noqa: F401  (the package, so the target's name resolves)
        target = _load_target(target_path)
    engine = sys.modules.get("vfe._engine")
    status(f"native {getattr(engine, '__file__', '') if engine else ''}")
    if hasattr(target, "setup"):
        target.setup()
    fuzz_one = target.fuzz_one
    runs = 0
    next_report = time.monotonic()

    def one_input(data: bytes) -> None:
        nonlocal runs, next_report
        fuzz_one(data)
        runs += 1
        now = time.monotonic()
        if now >= next_report:
            next_report = now + 0.5
            status(f"runs {runs}")

    if not any(a.startswith("-max_len=") for a in fuzzer_args):
        fuzzer_args.append(f"-max_len={getattr(target, 'MAX_LEN', 4096)}")
    atheris.Setup([sys.argv[0]] + fuzzer_args, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
