"""Shared pytest fixtures.  The controller's and the guests' live in plugin
modules of their own (tests/controller_fixtures.py: controller, sockdir;
tests/guest_fixtures.py: guest_image, vm_factory); the fd-leak check is here."""
import os
import time

import pytest

pytest_plugins = ["tests.controller_fixtures", "tests.guest_fixtures"]


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def no_fd_leaks(request):
    """A test marked ``no_fd_leaks`` leaves no fd of this process open that
    was not open before it (looked at 10 ms after the test)."""
    if request.node.get_closest_marker("no_fd_leaks") is None:
        yield
        return
    before = open_fds()
    yield
    time.sleep(0.01)
    assert open_fds() - before == set(), "fds leaked"
