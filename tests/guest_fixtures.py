"""Fixtures for tests that boot QEMU guests (a pytest plugin: tests/conftest.py loads it).

    def test_x(vm_factory):
        vm = vm_factory(name="a", nics=[NetDev(socket=sock)])   # started
        vm.wait_booted()
        rc, out = vm.run("uname -r")

``guest_image`` builds the guest once per session (a no-op when the cache is
up to date). ``vm_factory`` hands out started VMs and shuts every one of
them down after the test, pass or fail; for a failed test pytest shows the
tails of their serial and QEMU logs (printed at teardown). For fixtures of a
wider scope use ``vm_pool`` directly.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Callable, Iterator

import pytest

from vfe.guest import guest_image as _guest_image
from vfe.guest.vm import QEMU, VM


def qemu_available() -> bool:
    return shutil.which(QEMU) is not None


@contextlib.contextmanager
def vm_pool(image: _guest_image.GuestImage, workdir: Path) -> Iterator[Callable[..., VM]]:
    """Yield make(name=None, start=True, **VM kwargs) -> VM; shut all down on exit."""
    vms: list[VM] = []

    def make(name: str | None = None, start: bool = True, **kw) -> VM:
        kw.setdefault("workdir", workdir)
        kw.setdefault("image", image)
        vm = VM(name=name or f"vm{len(vms)}", **kw)
        vms.append(vm)
        if start:
            vm.start()
        return vm

    try:
        yield make
    finally:
        for vm in reversed(vms):
            try:
                vm.shutdown()
            finally:
                # Only visible when the test failed (captured output).
                print(f"--- {vm.name}: serial log {vm.serial_log} (tail) ---")
                print(vm.serial_tail(40))
                print(vm.qemu_log_tail(10))


@pytest.fixture(scope="session")
def guest_image() -> _guest_image.GuestImage:
    if not qemu_available():
        pytest.skip(f"{QEMU} not installed (run scripts/setup)")
    return _guest_image.build()


@pytest.fixture
def vm_factory(guest_image, tmp_path) -> Iterator[Callable[..., VM]]:
    with vm_pool(guest_image, tmp_path) as make:
        yield make
