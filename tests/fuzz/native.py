"""An instrumented build of the compiled engine (vfe._engine) for fuzzing.

atheris only sees Python coverage unless native code is compiled with
clang's ``-fsanitize=fuzzer-no-link`` (SanitizerCoverage: edge counters and
comparison hooks that libFuzzer reads).  We also add AddressSanitizer, so an
out-of-bounds access to the engine's own heap is a finding even where no
guard page catches it.  The instrumented code calls into the sanitizer
runtimes, which must be in the process before the extension loads: atheris's
wheel ships ``asan_with_fuzzer.so`` (ASan with libFuzzer linked in) for
exactly this, and the fuzz worker is started with it in ``LD_PRELOAD``.

Two variants (``VARIANTS``): "address" (ASan + coverage, the default) and
"none" (coverage only: faster; the UBSan runtime is preloaded only for the
libFuzzer in it).  Each builds into build/fuzz/<variant>/lib/vfe/ -- never
over the normal in-place build -- and the worker puts that directory first
on ``vfe.__path__``, so ``import vfe._engine`` finds it.  It is rebuilt when anything under
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
from dataclasses import dataclass, replace

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMON_FLAGS = "-fno-omit-frame-pointer -g"


@dataclass(frozen=True)
class Variant:
    """One way to build the engine for fuzzing."""

    name: str
    flags: str            # CFLAGS on top of COMMON_FLAGS
    runtime: str          # atheris's sanitizer runtime with libFuzzer in it, for LD_PRELOAD
    env: tuple[tuple[str, str], ...] = ()


VARIANTS = {
    # ASan: an overflow of the engine's own heap is a finding too; ASan's
    # malloc also serves Python, which costs.  CPython's allocations look
    # like leaks to LeakSanitizer, and a fault must reach libFuzzer (it saves
    # the input) rather than end the process on ASan's own.
    "address": Variant("address", "-fsanitize=address,fuzzer-no-link", "asan_with_fuzzer.so",
                       (("ASAN_OPTIONS", "detect_leaks=0:allocator_may_return_null=1:"
                                         "handle_segv=1:handle_sigbus=1"),)),
    # coverage only: faster; out-of-bounds accesses still crash on guard pages.
    # (The UBSan runtime is preloaded only for the libFuzzer inside it.)
    "none": Variant("none", "-fsanitize=fuzzer-no-link", "ubsan_with_fuzzer.so"),
}
@dataclass(frozen=True)
class NativeBuild:
    """What a fuzz worker needs to run on the instrumented engine."""

    overlay: str           # directory to put first on vfe.__path__
    preload: str           # sanitizer runtime (with libFuzzer) for LD_PRELOAD
    module: str            # the instrumented extension file
    env: dict              # more environment for the worker


class NativeUnavailable(Exception):
    """No instrumented build can be made here (the message says why)."""


def _sanitizer_runtime(name: str) -> str:
    try:
        import atheris
    except ImportError as exc:
        raise NativeUnavailable(f"atheris is not installed ({exc})") from None
    path = os.path.join(atheris.path(), name)
    if not os.path.exists(path):
        raise NativeUnavailable(f"atheris has no {name} (built without clang?)")
    return path


def _sources_hash(clang: str, flags: str) -> str:
    h = hashlib.sha256()
    files = sorted(glob.glob(os.path.join(REPO, "cython_ext", "**", "*"), recursive=True))
    for path in files + [os.path.join(REPO, "setup.py")]:
        if os.path.isfile(path) and not path.endswith(".c"):     # engine.c is generated
            h.update(os.path.relpath(path, REPO).encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read())
    version = subprocess.run([clang, "--version"], capture_output=True, text=True).stdout
    h.update(flags.encode() + b"\0" + version.encode() + sys.version.encode())
    return h.hexdigest()


def _built_module(lib_dir: str) -> str | None:
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    path = os.path.join(lib_dir, "vfe", "_engine" + suffix)
    return path if os.path.exists(path) else None


def prepare(variant: str = "address", log=print) -> NativeBuild:
    """Build (or reuse) the instrumented engine; raise NativeUnavailable
    with the reason when it cannot be had here."""
    v = VARIANTS[variant]
    clang = shutil.which("clang")
    if clang is None:
        raise NativeUnavailable("clang is not installed (scripts/setup installs it)")
    preload = _sanitizer_runtime(v.runtime)
    flags = f"{v.flags} {COMMON_FLAGS}"
    build_dir = os.path.join(REPO, "build", "fuzz", v.name)
    lib_dir = os.path.join(build_dir, "lib")
    done = NativeBuild(lib_dir, preload, "", dict(v.env))
    digest = _sources_hash(clang, flags)
    stamp = os.path.join(build_dir, "stamp")
    module = _built_module(lib_dir)
    if module is not None and os.path.exists(stamp):
        with open(stamp) as f:
            if f.read().strip() == digest:
                return replace(done, module=module)
    log(f"fuzz: building the instrumented engine (clang {v.flags}) into "
        f"{os.path.relpath(build_dir, REPO)}/ ...")
    os.makedirs(build_dir, exist_ok=True)
    env = dict(os.environ, CC=clang, LDSHARED=f"{clang} -shared", CFLAGS=flags)
    env.pop("LDFLAGS", None)
    build_log = os.path.join(build_dir, "build.log")
    with open(build_log, "w") as out:
        rc = subprocess.run(
            [sys.executable, "setup.py", "-q", "build_ext", "--force",
             "--build-lib", lib_dir, "--build-temp", os.path.join(build_dir, "tmp")],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    module = _built_module(lib_dir)
    if rc != 0 or module is None:
        with open(build_log) as f:
            tail = "".join(f.readlines()[-3:]).strip()
        raise NativeUnavailable(f"the instrumented build failed (log: {build_log}): {tail}")
    with open(stamp, "w") as f:
        f.write(digest + "\n")
    return replace(done, module=module)
