"""Build glue for the compiled core: cython_ext/ becomes the module vfe._engine."""
import os

from setuptools import Extension, setup
from Cython.Build import cythonize

# gcc's inliner knob (below); clang (scripts/fuzz's instrumented build) has no such parameter
GCC_ONLY = [] if "clang" in os.environ.get("CC", "") else ["--param=max-inline-insns-single=120"]

# VFE_ENGINE_COUNTERS=0: an engine with its per-queue counters compiled out
# (cython_ext/counters.pxd), for `scripts/bench --counters-ab` to measure
# what counting costs; they all read 0 there (vfe.engine.ENGINE_COUNTERS).
COUNTERS = os.environ.get("VFE_ENGINE_COUNTERS", "1")
if COUNTERS not in ("0", "1"):
    raise SystemExit(f"VFE_ENGINE_COUNTERS={COUNTERS!r}: use 0 or 1")

extensions = [
    Extension(
        "vfe._engine",
        ["cython_ext/engine.pyx"],
        include_dirs=["cython_ext", "cython_ext/includes"],
        define_macros=[("VFE_ENGINE_COUNTERS", COUNTERS)],
        # max-inline-insns-single: gcc's default (70 at -O2) stopped inlining
        # the chain walk's per-descriptor step (vring.pxd chain_add) once the
        # packed rings called it too, and the split path paid ~30 instructions
        # a packet for the calls (callgrind: 544 -> 575 Ir/packet at 64 B);
        # 120 inlines it at every call site again (540) and still leaves the
        # bursts (net_tx_burst, rx_enqueue) functions of their own, which
        # tests/bench/profile_engine.py anchors on.
        extra_compile_args=["-O2", "-Wno-unused-function", *GCC_ONLY],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["cython_ext", "cython_ext/includes"],
        compiler_directives={"language_level": 3, "boundscheck": False, "wraparound": False,
                             "cdivision": True, "initializedcheck": False},
    )
)
