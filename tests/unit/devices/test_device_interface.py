"""Both device models implement the whole device interface the vhost adapter
calls (vfe/devices/interface.py), and so do their engine rings."""
import inspect

import pytest

from vfe.devices.blk import BlkConfig, BlkDeviceModel
from vfe.devices.interface import EngineRings, VhostDevice
from vfe.devices.net import NetConfig, NetDeviceModel
from vfe.engine import Engine


def members(protocol: type) -> dict[str, object]:
    """The protocol's attributes (annotated) and methods, by name."""
    out: dict[str, object] = {name: None for name in protocol.__annotations__}
    out.update({name: value for name, value in vars(protocol).items()
                if callable(value) and not name.startswith("_")})
    return out


def missing(obj: object, protocol: type) -> list[str]:
    """What ``obj`` lacks of ``protocol``: absent attributes, and methods
    that are absent, not callable, or take other parameters."""
    out = []
    for name, method in members(protocol).items():
        if not hasattr(obj, name):
            out.append(name)
        elif method is not None:
            value = getattr(obj, name)
            want = list(inspect.signature(method).parameters)[1:]      # without self
            if not callable(value) or list(inspect.signature(value).parameters) != want:
                out.append(name)
    return out


@pytest.fixture(params=["net", "blk"])
def model(request):
    engine = Engine()
    if request.param == "net":
        m = NetDeviceModel(engine, NetConfig(socket="/unused", queues=1))
    else:
        m = BlkDeviceModel(engine, BlkConfig(socket="/unused", bdev="null", size_mb=1))
    yield m
    m.close()


def test_the_interface_is_not_empty():
    assert {"rings", "driving_session", "spec", "set_inflight", "send_rarp"} <= set(members(VhostDevice))
    assert {"start_ring", "stop_ring", "set_memory"} <= set(members(EngineRings))


def test_a_model_implements_the_device_interface(model):
    assert isinstance(model, VhostDevice)
    assert missing(model, VhostDevice) == []


def test_a_models_rings_implement_the_ring_interface(model):
    assert isinstance(model.rings, EngineRings)
    assert missing(model.rings, EngineRings) == []


def test_the_checks_fail_on_a_partial_device(model):
    class Partial:
        rings = model.rings
        driving_session = None
        status = mtu = 0

        def spec(self):
            return model.spec()

        def rearm_notices(self):
            pass

        def forget_learned(self):
            pass

        def set_inflight(self, hva, stride, num_queues, queue_size):     # one parameter short
            pass

    assert not isinstance(Partial(), VhostDevice)                      # no send_rarp
    assert missing(Partial(), VhostDevice) == ["set_inflight", "send_rarp"]
