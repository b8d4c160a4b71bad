"""Shared pytest fixtures; each part lives in its own module."""
from tests.conftest_daemon_part import *  # noqa: F401,F403  (controller, sockdir)
from tests.conftest_qemu_part import *  # noqa: F401,F403  (guest_image, vm_factory)
