"""The poll-mode engine (compiled from cython_ext/ as vfe._engine).

`Engine` owns the worker threads and the in-engine switch; `NetDevice` is a
net device's rings and memory table inside it, `BlkDevice` a virtio-blk
device's request queues and memory table, over a `BlkBackend`: a bdev's
storage (null, malloc, or a file served by I/O threads), which several
devices may share.  See cython_ext/engine.pyx.
"""
from vfe._engine import ENGINE_ABI, ENGINE_COUNTERS, ERROR_NAMES, BlkBackend, BlkDevice, Engine, NetDevice, set_kernels
from vfe.kernels import kernel_addresses    # cheap: numba loads on the first call

__all__ = ["ENGINE_ABI", "ENGINE_COUNTERS", "ERROR_NAMES", "BlkBackend", "BlkDevice", "Engine", "NetDevice", "install_kernels", "set_kernels"]


def install_kernels() -> None:
    """Hand the Numba kernels' C entry points to the engine (software checksum
    and GSO for guests with different offloads).  Call once, before traffic."""
    addrs = kernel_addresses()
    set_kernels(addrs["finish_csum"], addrs["gso_segment"])
