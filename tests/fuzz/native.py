"""An instrumented build of the compiled engine (vfe._engine) for fuzzing.

atheris only sees Python coverage unless native code is compiled with
clang's ``-fsanitize=fuzzer-no-link`` (SanitizerCoverage: edge counters and
comparison hooks that libFuzzer reads).  We also add AddressSanitizer, so an
out-of-bounds access to the engine's own heap is a finding even where no
guard page catches it.  The instrumented code calls into the sanitizer
runtimes, which must be in the process before the extension loads: atheris's
wheel ships ``asan_with_fuzzer.so`` (ASan with libFuzzer linked in) for
exactly this, and the fuzz worker is started with it in ``LD_PRELOAD``.

The build goes to build/fuzz/asan/lib/vfe/ -- never over the normal in-place
build -- and the worker puts that directory first on ``vfe.__path__``, so
``import vfe._engine`` finds it.  It is rebuilt when anything under
cython_ext/, setup.py, the flags or the compiler changed (a stamp file holds
a hash of all that).

Needs clang and libclang-rt-*-dev (ASan's static part, linked into every
-fsanitize=address shared object); scripts/setup installs both.  Without
them ``prepare()`` says why and the caller falls back to Python coverage.
"""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD_DIR = os.path.join(REPO, "build", "fuzz", "asan")
LIB_DIR = os.path.join(BUILD_DIR, "lib")
FLAGS = "-fsanitize=address,fuzzer-no-link -fno-omit-frame-pointer -g"
#: ASan inside a Python process: CPython's allocations look like leaks to
#: LeakSanitizer, and a finding must reach libFuzzer (which saves the input)
#: rather than end the process on ASan's own.
ASAN_OPTIONS = "detect_leaks=0:allocator_may_return_null=1:handle_segv=1:handle_sigbus=1"


@dataclass(frozen=True)
class NativeBuild:
    """What a fuzz worker needs to run on the instrumented engine."""

    overlay: str           # directory to put first on vfe.__path__
    preload: str           # sanitizer runtime (with libFuzzer) for LD_PRELOAD
    module: str            # the instrumented extension file


class NativeUnavailable(Exception):
    """No instrumented build can be made here (the message says why)."""


def _sanitizer_runtime() -> str:
    try:
        import atheris
    except ImportError as exc:
        raise NativeUnavailable(f"atheris is not installed ({exc})") from None
    path = os.path.join(atheris.path(), "asan_with_fuzzer.so")
    if not os.path.exists(path):
        raise NativeUnavailable(f"atheris has no {os.path.basename(path)} (built without clang?)")
    return path


def _sources_hash(clang: str) -> str:
    h = hashlib.sha256()
    files = sorted(glob.glob(os.path.join(REPO, "cython_ext", "**", "*"), recursive=True))
    for path in files + [os.path.join(REPO, "setup.py")]:
        if os.path.isfile(path) and not path.endswith(".c"):     # engine.c is generated
            h.update(os.path.relpath(path, REPO).encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read())
    version = subprocess.run([clang, "--version"], capture_output=True, text=True).stdout
    h.update(FLAGS.encode() + b"\0" + version.encode() + sys.version.encode())
    return h.hexdigest()


def _built_module() -> str | None:
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    path = os.path.join(LIB_DIR, "vfe", "_engine" + suffix)
    return path if os.path.exists(path) else None


def prepare(log=print) -> NativeBuild:
    """Build (or reuse) the instrumented engine; raise NativeUnavailable
    with the reason when it cannot be had here."""
    clang = shutil.which("clang")
    if clang is None:
        raise NativeUnavailable("clang is not installed (scripts/setup installs it)")
    preload = _sanitizer_runtime()
    digest = _sources_hash(clang)
    stamp = os.path.join(BUILD_DIR, "stamp")
    module = _built_module()
    if module is not None and os.path.exists(stamp):
        with open(stamp) as f:
            if f.read().strip() == digest:
                return NativeBuild(LIB_DIR, preload, module)
    log("fuzz: building the instrumented engine (clang, ASan + SanitizerCoverage) "
        f"into {os.path.relpath(BUILD_DIR, REPO)}/ ...")
    os.makedirs(BUILD_DIR, exist_ok=True)
    env = dict(os.environ, CC=clang, LDSHARED=f"{clang} -shared", CFLAGS=FLAGS)
    env.pop("LDFLAGS", None)
    build_log = os.path.join(BUILD_DIR, "build.log")
    with open(build_log, "w") as out:
        rc = subprocess.run(
            [sys.executable, "setup.py", "-q", "build_ext", "--force",
             "--build-lib", LIB_DIR, "--build-temp", os.path.join(BUILD_DIR, "tmp")],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    module = _built_module()
    if rc != 0 or module is None:
        with open(build_log) as f:
            tail = "".join(f.readlines()[-3:]).strip()
        raise NativeUnavailable(f"the instrumented build failed (log: {build_log}): {tail}")
    with open(stamp, "w") as f:
        f.write(digest + "\n")
    return NativeBuild(LIB_DIR, preload, module)
