"""A closed device model is freed by its last reference, not by a later GC
pass: the engine device (rings, memory table, a malloc bdev's RAM) points
back at its model, and that pair must not stay a reference cycle after
close() -- a controller that hot-plugs and unplugs functions would otherwise
hold every dead one's C memory until CPython's next full collection."""
import gc
import weakref

import pytest

from vfe.devices.blk import BlkConfig, BlkDeviceModel
from vfe.devices.net import NetConfig, NetDeviceModel
from vfe.engine import Engine


@pytest.fixture
def no_gc():
    """Only reference counts free anything while the test runs."""
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def vm_size_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))


def test_a_closed_net_device_is_freed_at_once(no_gc):
    engine = Engine()
    model = NetDeviceModel(engine, NetConfig(socket="/unused", queues=2))
    gone = weakref.ref(model)
    model.close()
    del model
    assert gone() is None, "the closed net device model outlived its last reference"


def test_a_deleted_malloc_bdev_gives_its_ram_back_at_once(no_gc):
    engine = Engine()
    model = BlkDeviceModel(engine, BlkConfig(socket="/unused", bdev="malloc", size_mb=256))
    gone = weakref.ref(model)
    with_bdev = vm_size_kib()
    model.close()
    del model
    assert gone() is None, "the closed blk device model outlived its last reference"
    assert with_bdev - vm_size_kib() >= 256 << 10, "the malloc bdev's 256 MiB are still mapped"
