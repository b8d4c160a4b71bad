"""A daemon and engine that record the blk devices the controller's blk kind
makes, without rings or sockets: what the blk kind's unit tests (recovery,
firmware limits, the vfe-rpc methods) run it on."""
from __future__ import annotations

import types

from vfe.controller.nvconfig import blk_limits

# the seed's blk firmware configuration (VIRTIO_BLK_EMULATION_* from its mlxconfig line, SRIOV_EN)
SEED_BLK_LIMITS = blk_limits({"VIRTIO_BLK_EMULATION_ENABLE": 1, "VIRTIO_BLK_EMULATION_NUM_PF": 4,
                              "VIRTIO_BLK_EMULATION_NUM_VF": 16, "VIRTIO_BLK_EMULATION_NUM_MSIX": 64,
                              "NUM_VF_MSIX": 64, "SRIOV_EN": 1})


class FakeRings:
    """A device's engine rings: one queue, idle, never started."""
    num_rings = 1
    logging = False

    def __init__(self):
        self.closed = False

    def ring_state(self, i):
        return {"index": i, "size": 0, "broken": False, "error": "", "ready": False, "enabled": False,
                "last_avail_idx": 0, "last_used_idx": 0}

    def ring_stats(self, i):
        return {"packets": 0, "bytes": 0, "dropped": 0, "errors": 0}

    def close(self):
        self.closed = True


class FakeEngine:
    """Records each new_blk_device call: queues, capacity, block_size, the
    shared storage (kw["backend"]) and the other keywords."""

    def __init__(self):
        self.devices: list[types.SimpleNamespace] = []

    def new_blk_device(self, queues, capacity, block_size, **kw):
        self.devices.append(types.SimpleNamespace(queues=queues, capacity=capacity, block_size=block_size,
                                                  storage=kw["backend"], kw=kw))
        return FakeRings()


class FakeDaemon:
    """Endpoints as plain records; `fail_listen`: the error add_endpoint raises."""

    def __init__(self, fail_listen: BaseException | None = None):
        self.engine = FakeEngine()
        self.endpoints = []
        self.on_shutdown = []
        self.fail_listen = fail_listen

    def add_endpoint(self, device, socket_path, client, name):
        if self.fail_listen is not None:
            raise self.fail_listen
        ep = types.SimpleNamespace(device=device, path=socket_path, name=name, session=None)
        self.endpoints.append(ep)
        return ep

    def remove_endpoint(self, ep):
        self.endpoints.remove(ep)
