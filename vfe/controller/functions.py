"""The emulated virtio-net PCIe functions: their identity (VUID, BDF, SF,
representor, default MACs), the product's limits on them, and the fields
`virtnet list/query` show, in the seed's order (and the BDF arithmetic every
kind uses).  Pure data plus formatting; creating and destroying the pieces
behind a function is the net kind's job (net_kind.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from vfe.controller.kind import driver_bound, list_head

# The largest MTU a function may have: the product's (`virtnet hotplug -t`,
# `modify -t`: 68..9216, docs/virtnet.md), below virtio's VIRTIO_NET_MTU_MAX.
MAX_MTU = 9216
# The static PFs' MACs when virtnet.conf names no base (pf_mac,
# static_pf.mac_base): this base + the PF's index.
DEFAULT_STATIC_PF_MAC_BASE = "00:11:22:33:44:55"

# Emulated PCI topology.  Static PFs sit on bus 0x84 after the two network
# PFs of the DPU's ports (functions 0 and 1), so static PF i is 84:00.(i+2)
# -- the seed's VUIDs name them VNETS0D0F<fn>.  Hot-plugged PFs sit behind
# the emulated PCIe switch, one downstream port each: port p is bus 0x85+p,
# VUID VNETS<p+1>D0F0 (the seed's first hot-plugged device is 85:00.0,
# VNETS1D0F0).  VFs (SR-IOV) are numbered under their PF.
STATIC_PF_BUS = 0x84
STATIC_PF_FIRST_FN = 2
HOTPLUG_FIRST_BUS = 0x85

STATIC, HOTPLUG, VF = "static", "hotplug", "vf"
FUNCTION_TYPE = {STATIC: "static PF", HOTPLUG: "hotplug PF", VF: "VF"}


def bdf_raw(bus: int, dev: int, fn: int) -> int:
    return (bus << 8) | (dev << 3) | fn


def bdf_str(raw: int) -> str:
    return f"{raw >> 8:02x}:{(raw >> 3) & 0x1F:02x}.{raw & 7:x}"


class PciIdentity:
    """What every kind's function derives from its PCI address: the BDF as
    the host shows it, and whether it is a PF (vf_id < 0).  A mixin for the
    kinds' dataclasses, which hold bdf_raw and vf_id."""

    bdf_raw: int
    vf_id: int

    @property
    def bdf(self) -> str:
        return bdf_str(self.bdf_raw)

    @property
    def is_pf(self) -> bool:
        return self.vf_id < 0


def static_pf_location(pf_index: int) -> tuple[str, int]:
    fn = STATIC_PF_FIRST_FN + pf_index
    # more than 6 static PFs spill into device numbers, 8 functions each
    dev, fn = divmod(fn, 8)
    return f"VNETS0D{dev}F{fn}", bdf_raw(STATIC_PF_BUS, dev, fn)


def hotplug_pf_location(port: int) -> tuple[str, int]:
    return f"VNETS{port + 1}D0F0", bdf_raw(HOTPLUG_FIRST_BUS + port, 0, 0)


# SR-IOV VFs of static PF i live on their own bus, 0x90+i, eight functions
# per device number (126 VFs fit in devices 0..15); their VUID is the PF's
# with VF<n> appended, n counting from 1 as in the seed (VNETS0D0F2VF1).
VF_FIRST_BUS = 0x90


def vf_location(pf_vuid: str, pf_index: int, vf_id: int) -> tuple[str, int]:
    dev, fn = divmod(vf_id, 8)
    return f"{pf_vuid}VF{vf_id + 1}", bdf_raw(VF_FIRST_BUS + pf_index, dev, fn)


def representor_name(pf_num: int, sf_num: int) -> str:
    """`<prefix><pf_num>sf<sf_num>`: en3f0pf0sf1001 for DPU port 0, SF 1001."""
    return f"en3f{pf_num}pf{pf_num}sf{sf_num}"


def queue_pairs(max_queues: int) -> int:
    """Data queue pairs of a device with `max_queues` virtqueues (the seed's
    -n counts virtqueues: 3 = one RX/TX pair plus the control queue)."""
    return max(1, max_queues // 2)


@dataclass
class NetFunction(PciIdentity):
    kind: ClassVar[str] = "net"
    pf_id: int
    vf_id: int                       # -1 for a PF
    device_type: str                 # STATIC | HOTPLUG | VF
    vuid: str
    bdf_raw: int
    ib_dev: str                      # sf_parent_device / port_ib_dev
    pf_num: int                      # DPU port (0, 1; 0 with LAG)
    sf_num: int
    mac: str
    mtu: int
    max_queues: int
    max_queue_size: int
    num_msix: int
    features: int                    # virtio feature bits offered (0 = the default set)
    legacy: bool = False
    port: int = -1                   # hot-plug switch port
    socket: str = ""
    ifindex: int = 0
    sf_index: int = 0                # position in the SF pool, for sf_rdma_device / vhca id
    # runtime pieces (not shown, not recorded)
    model: Any = field(default=None, repr=False)
    endpoint: Any = field(default=None, repr=False)
    representor: Any = field(default=None, repr=False)
    qmp_id: str | None = None
    lm_state: str = "running"        # vhostmgmt vf -o: running / quiesced / freeze

    @property
    def rep_name(self) -> str:
        return representor_name(self.pf_num, self.sf_num)

    def bound(self) -> bool:
        """A guest driver is using the device: its rings run."""
        return driver_bound(self.endpoint)

    def list_entry(self) -> dict:
        """The `virtnet list` fields, in the seed's order."""
        return list_head(self) | {
            "function_type": FUNCTION_TYPE[self.device_type],
            "vuid": self.vuid,
            "bdf": self.bdf,
            "sf_num": self.sf_num,
            "sf_parent_device": self.ib_dev,
            "sf_rep_net_device": self.rep_name,
            "sf_rep_net_ifindex": self.ifindex,
            "sf_rdma_device": f"mlx5_{2 + self.sf_index}",
            "sf_vhca_id": f"{0x100 + self.sf_index:#x}",
            "msix_config_vector": "0x0",
            "num_msix": self.num_msix,
            "max_queues": self.max_queues,
            "max_queues_size": self.max_queue_size,
            "net_mac": self.mac,
            "net_mtu": self.mtu,
        }
