"""Fixtures that run virtio-net-controller processes (a pytest plugin: tests/conftest.py loads it).

    def test_x(controller):
        ctl = controller(["net,socket=/path/a.sock", ...])    # started, sockets listening

Every controller is stopped by PID at teardown, pass or fail, and its log is
printed (visible when the test failed)."""
from __future__ import annotations

import pytest

from vfe.guest.controller_process import ControllerProcess


@pytest.fixture
def sockdir(tmp_path_factory):
    """A short directory for unix sockets (paths are limited to 107 bytes)."""
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="vfe-s-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def controller(tmp_path):
    procs: list[ControllerProcess] = []

    def make(devices: list[str], start: bool = True, **kw) -> ControllerProcess:
        kw.setdefault("name", f"controller{len(procs)}")
        ctl = ControllerProcess(devices, tmp_path, **kw)
        procs.append(ctl)
        if start:
            ctl.start()
        return ctl

    try:
        yield make
    finally:
        for ctl in procs:
            rc = ctl.stop()
            print(f"--- {ctl.log_path} (exit {rc}) ---")
            print(ctl.log()[-4000:])
