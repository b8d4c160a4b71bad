"""The virtio-net device model: what it offers through vhost-user, and its
rings inside the engine (a VhostDevice, vfe/devices/interface.py)."""
from __future__ import annotations

from dataclasses import dataclass

from vfe.virtio.constants import F, mask
from vfe.vhost.actions import DeviceSpec
from vfe.vhost.messages import ProtocolFeature

# Offered to every net front-end.  QEMU passes through only the bits it knows
# for vhost-user net (its user_feature_bits); CTRL_VQ, MQ, STATUS and MAC are
# QEMU's own, but MQ also needs the MQ protocol feature from us.
NET_FEATURES = mask(
    F.NET_CSUM, F.NET_GUEST_CSUM, F.NET_MTU, F.NET_MAC,
    F.NET_GUEST_TSO4, F.NET_GUEST_TSO6, F.NET_GUEST_ECN,
    F.NET_HOST_TSO4, F.NET_HOST_TSO6, F.NET_HOST_ECN,
    F.NET_MRG_RXBUF, F.NET_STATUS, F.NET_CTRL_VQ, F.NET_MQ,
    F.NET_GUEST_ANNOUNCE,
    F.NOTIFY_ON_EMPTY, F.ANY_LAYOUT, F.RING_INDIRECT_DESC, F.RING_EVENT_IDX,
    F.VERSION_1, F.RING_PACKED, F.VHOST_LOG_ALL, F.VHOST_USER_PROTOCOL_FEATURES,
)

NET_PROTOCOL_FEATURES = mask(
    ProtocolFeature.MQ, ProtocolFeature.LOG_SHMFD, ProtocolFeature.RARP,
    ProtocolFeature.REPLY_ACK, ProtocolFeature.MTU,
    ProtocolFeature.CONFIGURE_MEM_SLOTS, ProtocolFeature.STATUS,
)


@dataclass
class NetConfig:
    """A net device as declared on the command line or by the controller."""

    socket: str
    client: bool = False
    mac: str | None = None     # the device's MAC: on the in-engine switch, the only source
                               # MAC its guest may send from (port security)
    queues: int = 1            # queue pairs
    queue_size: int = 1024     # largest ring the device accepts
    mtu: int = 1500
    name: str = ""
    incoming: str | None = None  # a second socket of the same device: where a migration's
                                 # destination QEMU connects while the source still runs


class NetDeviceModel:
    """One virtio-net device: its offer and its engine rings."""

    def __init__(self, engine, config: NetConfig):
        self.config = config
        self.rings = engine.new_net_device(2 * config.queues)
        self.rings.model = self
        if config.mac:
            self.rings.set_port_mac(config.mac)
        self.features = NET_FEATURES
        self.status = 0
        self.mtu = config.mtu
        self.driving_session = None   # the Session driving the engine (vfe/devices/adapter.py)

    def spec(self) -> DeviceSpec:
        return DeviceSpec(
            features=self.features,
            protocol_features=NET_PROTOCOL_FEATURES,
            queue_num=self.config.queues,
            max_queues=2 * self.config.queues,
            max_queue_size=self.config.queue_size,
        )

    # -- the rest of VhostDevice (vfe/devices/interface.py)

    def rearm_notices(self) -> None:
        self.rings.rearm_notices()    # a new front-end: its security events are logged anew

    def forget_learned(self) -> None:
        self.rings.forget_learned()   # the guest's MACs left with it

    def set_inflight(self, hva: int, stride: int, num_queues: int, queue_size: int,
                     length: int) -> None:
        """Nothing to track: net does not offer INFLIGHT_SHMFD, so the
        protocol never accepts a region for it (this only hears "none")."""

    def send_rarp(self, mac: bytes) -> None:
        # through the switch, as if the guest had sent it: learned, then flooded
        self.rings.inject(rarp_frame(mac))

    def set_mac(self, mac: str | None) -> None:
        """A new configured MAC (None: none): the switch's port security follows."""
        self.rings.set_port_mac(mac or None)
        self.config.mac = mac

    def switch_stats(self) -> dict:
        """Port security: spoofed frames dropped, source MACs not learned
        (limit, full table window), entries learned (cython_ext/switch.pxd)."""
        return self.rings.switch_stats()

    def stats(self) -> list[dict]:
        out = []
        for i in range(self.rings.num_rings):
            s = self.rings.ring_state(i) | self.rings.ring_stats(i)
            s["kind"] = "rx" if i % 2 == 0 else "tx"
            out.append(s)
        return out

    def counters(self) -> dict:
        """What `virtnet stats` and /metrics show: per queue, the engine's
        counters of the ring (rx: to the guest, tx: from it); per device,
        the software offloads, port security and representor counters."""
        queues = [{"queue": i, "direction": "rx" if i % 2 == 0 else "tx"} | self.rings.ring_stats(i)
                  for i in range(self.rings.num_rings)]
        device = self.rings.offload_stats() | self.rings.switch_stats() | self.rings.tap_stats()
        return {"queues": queues, "device": device}

    def summary(self) -> str:
        """One line of totals for the log (at disconnect and shutdown)."""
        tot = {"rx": [0, 0, 0], "tx": [0, 0, 0]}
        for s in self.stats():
            t = tot[s["kind"]]
            t[0] += s["packets"]
            t[1] += s["bytes"]
            t[2] += s["dropped"]
        off = self.rings.offload_stats()
        sw = self.rings.switch_stats()
        return (f"rx {tot['rx'][0]} packets {tot['rx'][1]} bytes {tot['rx'][2]} dropped, "
                f"tx {tot['tx'][0]} packets {tot['tx'][1]} bytes {tot['tx'][2]} dropped, "
                f"spoofed {sw['spoofed']}, macs learned {sw['learned']}, "
                f"not learned {sw['learn_capped']} (limit) {sw['table_full']} (table full), "
                f"software csum {off['sw_csum']}, software gso {off['sw_gso']}")

    def close(self) -> None:
        self.rings.close()
        # rings.model points back at us: without this the pair is a reference
        # cycle, and the engine device's C memory waits for a full GC pass
        self.rings.model = None


def rarp_frame(mac: bytes) -> bytes:
    """A RARP request "from" mac, as QEMU's announce sends (ethertype 0x8035)."""
    bcast = b"\xff" * 6
    body = (b"\x00\x01" b"\x08\x00" b"\x06\x04" b"\x00\x03"
            + mac + b"\x00" * 4 + mac + b"\x00" * 4)
    frame = bcast + mac + b"\x80\x35" + body
    return frame + b"\x00" * (60 - len(frame))
