"""The net functions' recovery files: one JSON file per function, named by
its VUID, directly in the recovery directory (the one store: recovery.py).

The seed's example (a hot-plugged PF)::

    {"port_ib_dev": "mlx5_0", "pf_id": 0, "function_type": "pf",
     "bdf_raw": 26624, "device_type": "hotplug", "mac": "0c:c4:7a:ff:22:93",
     "pf_num": 0, "sf_num": 2000, "mq": 1}

vfe writes exactly those fields, in that order (``vf_id`` after ``pf_id``
for VFs only, as the example has none for a PF), then its own: ``vuid``,
``mtu``, ``max_queues``, ``max_queue_size``, ``num_msix``, ``features``,
``legacy``, ``port`` (a hot-plugged PF's emulated switch port).  A
file with only the seed's fields (hand-written, or from the product) loads:
the VUID comes from the file name.

``NetCodec.load`` validates every file and returns the good records and the
problems (files that conflict with each other -- same SF, BDF, function or
switch port -- are problems too); given the configuration, it also refuses
a record that no longer matches it (``check_compat``: LAG switched, NV
config changed), with the seed's instruction to delete the files.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, ClassVar, Mapping, NamedTuple

from vfe.controller.functions import STATIC, VF, NetFunction, bdf_str, queue_pairs
from vfe.controller.nvconfig import Limits, limits
from vfe.controller.recovery import (
    RecoveryError, RecoveryProblem, RecoveryStore, check_bool, check_int, check_str,
)
from vfe.controller.sf_pool import SF_NUM_MIN
from vfe.controller.virtnet_conf import ConfigError, VirtnetConf, check_mac
from vfe.paths import RECOVERY_REL
from vfe.virtio.constants import VIRTIO_NET_MTU_MIN

SEED_RECOVERY_DIR = "/" + RECOVERY_REL          # the product's, named in its instructions
_VUID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

SEED_FIELDS = ("port_ib_dev", "pf_id", "vf_id", "function_type", "bdf_raw", "device_type",
               "mac", "pf_num", "sf_num", "mq")
VFE_FIELDS = ("vuid", "mtu", "max_queues", "max_queue_size", "num_msix", "features", "legacy", "port")
FUNCTION_TYPES = ("pf", "vf")
DEVICE_TYPES = ("static", "hotplug")


def valid_vuid(vuid: str) -> bool:
    return isinstance(vuid, str) and bool(_VUID_RE.fullmatch(vuid)) and not vuid.endswith(".json")


@dataclass
class RecoveryRecord:
    kind: ClassVar[str] = "net"
    vuid: str
    port_ib_dev: str
    pf_id: int
    function_type: str           # "pf" | "vf"
    bdf_raw: int
    device_type: str             # "static" | "hotplug"
    mac: str
    pf_num: int
    sf_num: int
    mq: int
    vf_id: int | None = None     # VFs only
    # vfe's own
    mtu: int | None = None
    max_queues: int | None = None
    max_queue_size: int | None = None
    num_msix: int | None = None
    features: int | None = None
    legacy: bool = False
    port: int | None = None      # a hot-plugged PF's emulated switch port (-1/None: none)
    extra: dict[str, Any] = field(default_factory=dict)   # unknown fields, kept as they were

    @classmethod
    def of(cls, f: NetFunction) -> "RecoveryRecord":
        """The record of a running function (not validated)."""
        return cls(
            vuid=f.vuid, port_ib_dev=f.ib_dev, pf_id=f.pf_id, vf_id=None if f.is_pf else f.vf_id,
            function_type="pf" if f.is_pf else "vf", bdf_raw=f.bdf_raw,
            # the seed's files know static and hotplug; a VF is static (it
            # hangs off a static PF) and its function_type says "vf"
            device_type=STATIC if f.device_type == VF else f.device_type,
            mac=f.mac, pf_num=f.pf_num, sf_num=f.sf_num,
            mq=1 if queue_pairs(f.max_queues) > 1 else 0,
            mtu=f.mtu, max_queues=f.max_queues, max_queue_size=f.max_queue_size,
            num_msix=f.num_msix, features=f.features, legacy=bool(f.legacy), port=f.port)

    @property
    def bdf(self) -> str:
        return bdf_str(self.bdf_raw)

    @property
    def file_name(self) -> str:
        return f"{self.vuid}.json"

    @property
    def slot(self) -> int | None:
        """A hot-plugged PF's switch port: ``port`` when recorded, else
        ``pf_id`` (a file with only the seed's fields); None for others."""
        if self.device_type != "hotplug" or self.function_type != "pf":
            return None
        return self.port if self.port is not None and self.port >= 0 else self.pf_id

    def validate(self) -> "RecoveryRecord":
        """Check every field; raises RecoveryError naming the field."""
        if not valid_vuid(self.vuid):
            raise RecoveryError("vuid", f"{self.vuid!r} is not a VUID (letters, digits, '_', '.', '-')")
        check_str("port_ib_dev", self.port_ib_dev)
        check_int("pf_id", self.pf_id, 0)
        ft = self.function_type
        if ft not in FUNCTION_TYPES:
            raise RecoveryError("function_type", f"{ft!r} is not one of {', '.join(FUNCTION_TYPES)}")
        if ft == "vf":
            if self.vf_id is None:
                raise RecoveryError("vf_id", "missing (a VF's file needs vf_id)")
            check_int("vf_id", self.vf_id, 0)
        elif self.vf_id is not None:
            check_int("vf_id", self.vf_id, 0)
        check_int("bdf_raw", self.bdf_raw, 0, 0xFFFF)
        if self.device_type not in DEVICE_TYPES:
            raise RecoveryError("device_type", f"{self.device_type!r} is not one of {', '.join(DEVICE_TYPES)}")
        try:
            check_mac("mac", self.mac)
        except ConfigError as exc:
            raise RecoveryError("mac", exc.message) from None
        check_int("pf_num", self.pf_num, 0)
        check_int("sf_num", self.sf_num, SF_NUM_MIN)
        check_int("mq", self.mq, 0)
        for name, lo in (("mtu", VIRTIO_NET_MTU_MIN), ("max_queues", 1), ("max_queue_size", 1),
                         ("num_msix", 1), ("port", -1)):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), lo)
        if self.features is not None:
            check_int("features", self.features, 0, (1 << 64) - 1)
        check_bool("legacy", self.legacy)
        return self

    def to_json(self) -> dict:
        """The file's content, in the seed's field order."""
        d: dict[str, Any] = {"port_ib_dev": self.port_ib_dev, "pf_id": self.pf_id}
        if self.vf_id is not None:
            d["vf_id"] = self.vf_id
        d.update(function_type=self.function_type, bdf_raw=self.bdf_raw, device_type=self.device_type,
                 mac=self.mac, pf_num=self.pf_num, sf_num=self.sf_num, mq=self.mq, vuid=self.vuid)
        for name in ("mtu", "max_queues", "max_queue_size", "num_msix"):
            if getattr(self, name) is not None:
                d[name] = getattr(self, name)
        if self.features is not None:
            d["features"] = hex(self.features)
        d["legacy"] = int(self.legacy)
        if self.port is not None:
            d["port"] = self.port
        for k, v in self.extra.items():
            d.setdefault(k, v)
        return d

    @classmethod
    def from_json(cls, data: Mapping[str, Any], vuid: str | None = None) -> "RecoveryRecord":
        """A record from a file's content; ``vuid`` (from the file name) is
        used when the content has none, and must agree when it has one.
        Raises RecoveryError."""
        if not isinstance(data, Mapping):
            raise RecoveryError(None, "not a JSON object")
        missing = [f for f in SEED_FIELDS if f != "vf_id" and f not in data]
        if missing:
            raise RecoveryError(missing[0], f"missing (needed: {', '.join(missing)})")
        file_vuid = data.get("vuid")
        if file_vuid is not None and vuid is not None and file_vuid != vuid:
            raise RecoveryError("vuid", f"{file_vuid!r} but the file is named {vuid}.json")
        the_vuid = file_vuid if file_vuid is not None else vuid
        if the_vuid is None:
            raise RecoveryError("vuid", "missing")
        ft = data["function_type"]
        features = data.get("features")
        if isinstance(features, str):
            try:
                features = int(features, 0)
            except ValueError:
                raise RecoveryError("features", f"{features!r} is not a number") from None
        legacy = data.get("legacy", False)
        if isinstance(legacy, int) and not isinstance(legacy, bool) and legacy in (0, 1):
            legacy = bool(legacy)
        rec = cls(
            vuid=the_vuid, port_ib_dev=data["port_ib_dev"], pf_id=data["pf_id"],
            function_type=ft.lower() if isinstance(ft, str) else ft,
            bdf_raw=data["bdf_raw"],
            device_type=data["device_type"].lower() if isinstance(data["device_type"], str) else data["device_type"],
            mac=data["mac"], pf_num=data["pf_num"], sf_num=data["sf_num"], mq=data["mq"],
            vf_id=data.get("vf_id"), mtu=data.get("mtu"), max_queues=data.get("max_queues"),
            max_queue_size=data.get("max_queue_size"), num_msix=data.get("num_msix"),
            features=features, legacy=legacy, port=data.get("port"),
            extra={k: v for k, v in data.items() if k not in SEED_FIELDS and k not in VFE_FIELDS},
        )
        return rec.validate()


class RecoveryLoad(NamedTuple):
    records: list[RecoveryRecord]
    problems: list[RecoveryProblem]


def _delete_instruction(directory: str) -> str:
    return f"delete the files under {directory} and restart"


class NetCodec:
    """The net kind's records in the store.  With ``conf`` and ``nv`` (the
    virtnet.conf and NV configuration the controller runs with), ``load``
    also refuses the records that no longer match them (check_compat)."""

    kind = "net"

    def __init__(self, conf: VirtnetConf | None = None, nv=None):
        self.conf = conf
        self.nv = nv

    def file_name(self, record: RecoveryRecord) -> str:
        if not valid_vuid(record.vuid):
            raise RecoveryError("vuid", f"{record.vuid!r} is not a VUID (letters, digits, '_', '.', '-')")
        return record.file_name

    def encode(self, record: RecoveryRecord) -> dict:
        return record.validate().to_json()

    def decode(self, file_name: str, data: Any) -> RecoveryRecord:
        return RecoveryRecord.from_json(data, PurePath(file_name).stem)

    def load(self, store: RecoveryStore) -> RecoveryLoad:
        """Every valid record, and a problem for every file that is not
        (unreadable, invalid, conflicting with another file, or -- with the
        configuration -- not matching it)."""
        records: list[RecoveryRecord] = []
        problems: list[RecoveryProblem] = []
        for p in store.json_files():
            vuid = p.stem
            if not valid_vuid(vuid):
                what = f"is invalid ({p.name} is not named <VUID>.json)"
            else:
                rec, what = store.read(p, self.decode)
                if rec is not None:
                    records.append(rec)
                    continue
            problems.append(RecoveryProblem(p, vuid, f"recovery file {p.name} {what}; fix it or "
                                                     f"{_delete_instruction(store.display_dir)}"))
        records, problems = _drop_conflicts(store, records, problems)
        if self.conf is None:
            return RecoveryLoad(records, problems)
        good = []
        for r in records:
            why = check_compat(r, self.conf, self.nv, recovery_dir=store.display_dir)
            if why is None:
                good.append(r)
            else:
                problems.append(RecoveryProblem(store.dir / r.file_name, r.vuid, why))
        return RecoveryLoad(good, problems)


_WHAT = {"sf_num": "SF", "bdf_raw": "PCI address (bdf_raw)", "function": "function",
         "slot": "hot-plug switch port"}


def _drop_conflicts(store: RecoveryStore, records: list[RecoveryRecord],
                    problems: list[RecoveryProblem]) -> RecoveryLoad:
    keys = {
        "sf_num": lambda r: (r.port_ib_dev, r.sf_num),
        "bdf_raw": lambda r: r.bdf_raw,
        "function": lambda r: (r.device_type, r.function_type, r.pf_id, r.vf_id),
        "slot": lambda r: ("slot", r.slot) if r.slot is not None else ("no slot", r.vuid),
    }
    bad: dict[str, str] = {}
    for what, key in keys.items():
        seen: dict[Any, list[RecoveryRecord]] = {}
        for r in records:
            seen.setdefault(key(r), []).append(r)
        for group in seen.values():
            if len(group) > 1:
                names = " and ".join(g.file_name for g in group)
                for g in group:
                    bad.setdefault(g.vuid, f"recovery files {names} describe the same {_WHAT[what]}; "
                                           f"{_delete_instruction(store.display_dir)}")
    good = [r for r in records if r.vuid not in bad]
    problems = problems + [RecoveryProblem(store.dir / f"{v}.json", v, m) for v, m in bad.items()]
    return RecoveryLoad(good, problems)


def check_compat(record: RecoveryRecord, conf: VirtnetConf, nv,
                 recovery_dir: str | os.PathLike | None = None) -> str | None:
    """None if ``record`` can be recovered under the current virtnet.conf
    and NV configuration (``nv``: an NvConfig, a mapping of its values, or
    a Limits); else the seed's instruction, naming the file and the reason."""
    reason = _incompatibility(record, conf, nv)
    if reason is None:
        return None
    directory = str(recovery_dir) if recovery_dir is not None else SEED_RECOVERY_DIR
    return (f"recovery file {record.file_name} does not match the current configuration ({reason}); "
            f"{_delete_instruction(directory)}")


def _incompatibility(r: RecoveryRecord, conf: VirtnetConf, nv) -> str | None:
    lim = nv if isinstance(nv, Limits) else limits(nv)
    if not lim.enabled:
        return lim.disabled_reason
    dev = r.port_ib_dev
    if dev not in conf.sf_devices:
        if conf.is_lag:
            return f"port_ib_dev {dev}, but is_lag is 1 and SFs are on the LAG device {conf.ib_dev_lag}"
        if dev == conf.ib_dev_lag:
            return f"port_ib_dev {dev} is the LAG device, but is_lag is 0"
        return f"port_ib_dev {dev} is not {' or '.join(conf.sf_devices)}"
    port = conf.pf_num(dev)
    if r.pf_num != port:
        return f"pf_num {r.pf_num}, but {dev} is port {port}"
    if r.function_type == "vf":
        if r.device_type != "static":
            return "a VF of a hot-plugged PF (VFs exist on static PFs only)"
        if r.pf_id >= lim.static_pfs:
            return f"VF of static PF {r.pf_id}, but VIRTIO_NET_EMULATION_NUM_PF={lim.static_pfs}"
        if lim.vfs_per_pf == 0:
            return "a VF, but VIRTIO_NET_EMULATION_NUM_VF is 0 or SRIOV_EN is False"
        if r.vf_id >= lim.vfs_per_pf:
            return f"vf_id {r.vf_id}, but VIRTIO_NET_EMULATION_NUM_VF={lim.vfs_per_pf}"
        if dev != conf.static_pf_device:
            return f"a VF on {dev}, but ib_dev_for_static_pf is {conf.static_pf_device}"
        return None
    if r.device_type == "static":
        if r.pf_id >= lim.static_pfs:
            return f"static pf_id {r.pf_id}, but VIRTIO_NET_EMULATION_NUM_PF={lim.static_pfs}"
        if dev != conf.static_pf_device:
            return f"a static PF on {dev}, but ib_dev_for_static_pf is {conf.static_pf_device}"
        return None
    # hot-plugged PF: it needs its emulated switch port
    if lim.hotplug_ports == 0:
        return "a hot-plugged PF, but PCI switch emulation is off (PCI_SWITCH_EMULATION_ENABLE/NUM_PORT)"
    if r.slot >= lim.hotplug_ports:
        return (f"a hot-plugged PF on switch port {r.slot}, but PCI_SWITCH_EMULATION_NUM_PORT="
                f"{lim.hotplug_ports}")
    if r.port is not None and r.pf_id < lim.static_pfs:
        # vfe numbers hot-plugged PFs after the static ones (a file written by
        # vfe has "port"; the seed's own numbering is the slot): more static PFs
        # now would give two functions the same device index
        return (f"a hot-plugged PF with device index {r.pf_id}, but VIRTIO_NET_EMULATION_NUM_PF="
                f"{lim.static_pfs}")
    if r.legacy and not lim.transitional:
        return ("a transitional device, but VIRTIO_NET_EMULATION_PF_PCI_LAYOUT and "
                "VIRTIO_EMULATION_HOTPLUG_TRANS are not both 1")
    return None
