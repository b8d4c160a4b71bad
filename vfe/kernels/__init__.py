"""Numba packet kernels for the data path (checksums, software TSO, RSS hash).

Importing this package is cheap: it does not import numba. The @njit kernels
(``finish_csum``, ``gso_segment``, ``ipv4_header_ok``, ``ipv4_fix_csum``,
``toeplitz_hash``) are loaded on first attribute access, and the C entry points
the Cython poll loop calls are built on the first ``kernel_addresses()`` call
(or first access to ``ADDRESSES``), from numba's on-disk cache when it is warm.

    from vfe.kernels import kernel_addresses, E_BOUNDS
    addr = kernel_addresses()["finish_csum"]   # int, a C function pointer

The @njit versions take numpy uint8 arrays (writable, C-contiguous) and
Python ints, with the same argument order as the C functions; other argument
types work but compile one more specialisation each.

See docs/kernels.md for the C signatures and return codes.
"""
import threading

from .codes import *  # noqa: F401,F403  (E_* and GSO_* constants)
from .codes import ERROR_NAMES, __all__ as _codes_all

NJIT_KERNELS = ("finish_csum", "gso_segment", "ipv4_header_ok", "ipv4_fix_csum",
                "toeplitz_hash")

# Only the cheap names: a star-import must not import numba or build cfuncs.
# The lazy ones (NJIT_KERNELS, ADDRESSES, C_SIGNATURES) are plain attributes.
__all__ = list(_codes_all) + ["ERROR_NAMES", "NJIT_KERNELS", "kernel_addresses",
                              "kernel_cfuncs"]

# ADDRESSES: {"finish_csum": int, "gso_segment": int, ...}, created on first
# access through __getattr__ below (PEP 562) or by kernel_addresses().
_lock = threading.Lock()


def kernel_cfuncs():
    """{name: numba CFunc} of every C entry point (compiled or cache-loaded once)."""
    from . import _numba
    return _numba.build_cfuncs()


def kernel_addresses():
    """{name: address} of every C entry point; also published as ``ADDRESSES``.

    The addresses stay valid for the life of the process. Call this from
    Python (it may compile, and takes the GIL) before handing pointers to the
    engine's workers.
    """
    g = globals()
    with _lock:
        addrs = g.get("ADDRESSES")
        if addrs is None:
            addrs = {name: int(cf.address) for name, cf in kernel_cfuncs().items()}
            g["ADDRESSES"] = addrs
    return addrs


def __getattr__(name):
    if name == "ADDRESSES":
        return kernel_addresses()
    if name == "C_SIGNATURES":
        from . import _numba
        return {k: v[2] for k, v in _numba.C_KERNELS.items()}
    if name in NJIT_KERNELS:
        from . import _numba
        return getattr(_numba, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(NJIT_KERNELS) | {"ADDRESSES", "C_SIGNATURES"})
