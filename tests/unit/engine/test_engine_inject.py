"""``NetDevice.inject`` (SEND_RARP after a live migration) sends the frame
where the device's guest frames go: into the switch for a device on it, out
of the representor for a device on one.  A device on a representor has left
the switch, so a RARP switched there would reach nobody, and OVN, which
moves a migrated port's binding on that RARP (activation-strategy=rarp),
would never see it (docs/multi-host.md)."""
import socket

import pytest

from vfe.devices.net import rarp_frame
from vfe.engine import Engine

MAC = bytes.fromhex("0cc47aff3101")


@pytest.fixture
def engine():
    return Engine(workers=1, mode="poll")      # not started: inject runs in the calling thread


def test_rarp_goes_out_of_the_representor(engine):
    dev = engine.new_net_device(2)
    # one datagram per frame, like a TAP fd: the engine writes header + frame
    tap, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tap.setblocking(False)
    kernel.settimeout(2)
    try:
        dev.set_tap(tap.fileno())
        dev.inject(rarp_frame(MAC))
        got = kernel.recv(4096)
        assert got == bytes(12) + rarp_frame(MAC)          # zero vnet header, the frame as built
        dev.set_tap(-1)
    finally:
        dev.close()
        tap.close()
        kernel.close()

