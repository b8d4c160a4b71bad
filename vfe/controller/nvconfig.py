"""The emulated DPU's firmware (NV) configuration, as ``mlxconfig`` shows it.

Each emulated device (the two ECPF ports of a BlueField-2,
``/dev/mst/mt41686_pciconf0`` and ``/dev/mst/mt41686_pciconf0.1``) has one
JSON file under ``<state dir>/nvconfig/`` holding two complete sets of
values: ``current`` (what the "firmware" runs with) and ``next`` (what
``vfe-mlxconfig s`` wrote, applied at the next "cold reboot").  The
controller calls ``apply_pending()`` when it starts, which is vfe's cold
reboot: ``next`` becomes ``current``.

Port 0's device holds every parameter; port 1's only the per-port ones
(``PORT_KEYS``) -- the global ones are set on port 0, and vfe says so rather
than accepting a value it would ignore.

``limits(nv)`` turns the current values into the numbers the function
inventory enforces (see docs/firmware-config.md for each derivation).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from vfe.controller.paths import atomic_write_json

DEFAULT_DEVICE = "/dev/mst/mt41686_pciconf0"
PORT1_DEVICE = "/dev/mst/mt41686_pciconf0.1"
DEVICES = (DEFAULT_DEVICE, PORT1_DEVICE)

# What else mlxconfig's -d accepts for the two ECPFs: the mst name without
# /dev/mst, the PCI address as the DPU's Arm OS sees it (with or without
# the domain), and the RDMA device (mlx5_0 is port 0, mlx5_1 port 1: the
# names virtnet.conf's ib_dev_p0/p1 and the seed's commands use).
_ALIASES = {
    "mt41686_pciconf0": DEFAULT_DEVICE, "03:00.0": DEFAULT_DEVICE, "0000:03:00.0": DEFAULT_DEVICE,
    "mlx5_0": DEFAULT_DEVICE,
    "mt41686_pciconf0.1": PORT1_DEVICE, "03:00.1": PORT1_DEVICE, "0000:03:00.1": PORT1_DEVICE,
    "mlx5_1": PORT1_DEVICE,
}

MAX_HOTPLUG_PORTS = 16       # seed: "hot plug up to 16 virtio-net PCIe PF"
MAX_VFS_PER_PF = 126         # seed: VIRTIO_NET_EMULATION_NUM_VF=126
MAX_TOTAL_VFS = 504          # seed: "or 504 virtio-net PCIe VF"
MAX_STATIC_PFS = 4           # seed: VIRTIO_NET_EMULATION_NUM_PF=4 (4 x 126 = 504)
MAX_MSIX = 2048              # the PCI MSI-X table holds at most 2048 entries
IO_WINDOW_KB = 4             # PCIe bridge I/O window granularity


class NvConfigError(ValueError):
    """A refused device, parameter or value; ``key`` names the parameter
    (None when the problem is not about one)."""

    def __init__(self, key: str | None, message: str):
        super().__init__(message)
        self.key = key
        self.message = message


@dataclass(frozen=True)
class Param:
    name: str
    kind: str                    # "bool" | "int" | "enum"
    default: int
    lo: int = 0
    hi: int = 1
    labels: Mapping[int, str] = field(default_factory=dict)   # enum names
    port: bool = False           # per-port (on both devices) or global (port 0 only)
    step: int = 1
    vfe_only: bool = False
    why: str = ""                # appended to range errors
    help: str = ""

    def show(self, value: int) -> str:
        """The value as mlxconfig prints it: ``True(1)``, ``EMBEDDED_CPU(1)``, ``16``."""
        if self.kind == "bool":
            return f"{'True' if value else 'False'}({int(value)})"
        if self.kind == "enum":
            return f"{self.labels.get(value, 'UNKNOWN')}({value})"
        return str(value)

    def parse(self, raw) -> int:
        """A value from the command line (or a Python int/bool); raises
        NvConfigError naming the parameter."""
        if isinstance(raw, bool):
            value = int(raw)
        elif isinstance(raw, int):
            value = raw
        elif isinstance(raw, str):
            value = self._parse_text(raw.strip())
        else:
            raise NvConfigError(self.name, f"Bad value for {self.name}: {raw!r} is not a number")
        self.check(value)
        return value

    def _parse_text(self, text: str) -> int:
        m = re.fullmatch(r"([A-Za-z_]+)\((\d+)\)", text)     # "True(1)", "EMBEDDED_CPU(1)"
        if m:
            value = int(m.group(2))
            name = m.group(1).upper()
            if self._name_of(value) != name:
                raise NvConfigError(self.name, f"Bad value for {self.name}: {text!r} "
                                               f"({self._choices()})")
            return value
        if self.kind == "bool":
            low = text.lower()
            if low in ("1", "true"):
                return 1
            if low in ("0", "false"):
                return 0
            raise NvConfigError(self.name, f"Bad value for {self.name}: {text!r} (use True/False or 1/0)")
        if self.kind == "enum":
            for v, label in self.labels.items():
                if label.lower() == text.lower():
                    return v
        try:
            return int(text, 0)
        except ValueError:
            raise NvConfigError(self.name, f"Bad value for {self.name}: {text!r} is not a "
                                           f"{'number' if self.kind == 'int' else 'valid value'}"
                                           f" ({self._choices()})") from None

    def _name_of(self, value: int) -> str | None:
        if self.kind == "bool":
            return {0: "FALSE", 1: "TRUE"}.get(value)
        if self.kind == "enum":
            lab = self.labels.get(value)
            return lab.upper() if lab else None
        return None

    def _choices(self) -> str:
        if self.kind == "bool":
            return "True(1) or False(0)"
        if self.kind == "enum":
            return " or ".join(f"{lab}({v})" for v, lab in sorted(self.labels.items()))
        extra = f" in steps of {self.step}" if self.step > 1 else ""
        return f"{self.lo}..{self.hi}{extra}"

    def check(self, value: int) -> None:
        if self.kind == "enum":
            if value not in self.labels:
                raise NvConfigError(self.name, f"Bad value for {self.name}: {value} ({self._choices()})")
            return
        if not self.lo <= value <= self.hi or (value - self.lo) % self.step:
            why = f": {self.why}" if self.why else ""
            raise NvConfigError(self.name, f"Bad value for {self.name}: {value} is out of range "
                                           f"({self._choices()}){why}")


_ECPF = {0: "HOST_PF", 1: "ECPF"}


def _b(name, default, *, port=False, help=""):
    return Param(name, "bool", default, 0, 1, port=port, help=help)


def _i(name, default, lo, hi, *, port=False, why="", step=1, vfe_only=False, help=""):
    return Param(name, "int", default, lo, hi, port=port, why=why, step=step,
                 vfe_only=vfe_only, help=help)


# Defaults: a fresh vfe DPU is what the seed's "VirtIO-net PF Device
# Configuration" produces, plus two static PFs, so that a user can start the
# controller and hot-plug at once (docs/firmware-config.md says why).
PARAMS: tuple[Param, ...] = (
    Param("INTERNAL_CPU_MODEL", "enum", 1, labels={0: "SEPARATED_HOST", 1: "EMBEDDED_CPU"},
          help="EMBEDDED_CPU: the DPU's Arm cores own the eswitch (needed for emulation)"),
    _b("PF_BAR2_ENABLE", 0, port=True, help="legacy BAR2 on the host PFs (off for SFs)"),
    _b("PER_PF_NUM_SF", 1, port=True, help="SFs are counted per PF"),
    _b("PCI_SWITCH_EMULATION_ENABLE", 1, help="emulated PCIe switch for hot-plugged PFs"),
    _i("PCI_SWITCH_EMULATION_NUM_PORT", 16, 0, MAX_HOTPLUG_PORTS,
       why="the emulated PCIe switch has at most 16 downstream ports (one per hot-plugged PF)",
       help="downstream ports = hot-pluggable virtio-net PFs"),
    _b("VIRTIO_NET_EMULATION_ENABLE", 1, help="virtio-net emulation; the controller runs only when True"),
    _i("VIRTIO_NET_EMULATION_NUM_PF", 2, 0, MAX_STATIC_PFS,
       why=f"at most {MAX_STATIC_PFS} static virtio-net PFs", help="static virtio-net PFs"),
    _i("VIRTIO_NET_EMULATION_NUM_VF", 0, 0, MAX_VFS_PER_PF,
       why=f"at most {MAX_VFS_PER_PF} VFs per PF ({MAX_TOTAL_VFS} in total)",
       help="virtio-net VFs per static PF"),
    _i("VIRTIO_NET_EMULATION_NUM_MSIX", 10, 3, MAX_MSIX,
       why="one config vector plus one per data queue: 3 is one queue pair; "
           "the MSI-X table holds at most 2048",
       help="MSI-X vectors per virtio-net PF; bounds its queues"),
    _i("VIRTIO_NET_EMULATION_PF_PCI_LAYOUT", 0, 0, 1,
       help="1: PCI layout that allows transitional (legacy I/O BAR) PFs"),
    _b("VIRTIO_EMULATION_HOTPLUG_TRANS", 0, help="transitional (virtio 0.95) hot-plugged PFs"),
    Param("ECPF_ESWITCH_MANAGER", "enum", 1, labels=_ECPF, help="the ECPF manages the eswitch"),
    Param("ECPF_PAGE_SUPPLIER", "enum", 1, labels=_ECPF, help="the ECPF supplies pages"),
    _b("SRIOV_EN", 0, port=True, help="SR-IOV; virtio-net VFs exist only when True"),
    _i("PF_SF_BAR_SIZE", 10, 0, 16, port=True, help="log2 of the SF BAR size"),
    _i("PF_TOTAL_SF", 64, 0, 2048, port=True,
       help="SFs of this port; every virtio-net function needs one"),
    _i("NUM_OF_VFS", 0, 0, 127, port=True, help="the port's own (non-virtio) VFs; vfe has none"),
    _b("VIRTIO_BLK_EMULATION_ENABLE", 0, help="virtio-blk emulation; no blk function exists without it"),
    _i("VIRTIO_BLK_EMULATION_NUM_PF", 0, 0, MAX_STATIC_PFS, help="virtio-blk PFs (pf_id 0..NUM_PF-1)"),
    _i("VIRTIO_BLK_EMULATION_NUM_VF", 0, 0, MAX_VFS_PER_PF,
       help="virtio-blk VFs per PF (vf_id 0..NUM_VF-1); only when SRIOV_EN"),
    _i("VIRTIO_BLK_EMULATION_NUM_MSIX", 2, 0, MAX_MSIX,
       help="MSI-X vectors per virtio-blk PF; one per queue plus one for config changes"),
    _i("NUM_VF_MSIX", 10, 0, MAX_MSIX, port=True,
       help="MSI-X vectors per VF (a virtio-net VF gets min(this, VIRTIO_NET_EMULATION_NUM_MSIX))"),
    _i("VFE_IO_PORT_SPACE_KB", 64, IO_WINDOW_KB, 64, step=IO_WINDOW_KB, vfe_only=True,
       why="x86 has 64K of I/O ports and bridge windows are 4K",
       help="vfe only: host I/O port space (KB) allocated to the bridge holding the DPU; "
            "transitional PFs = (this - 4) / 4"),
)

PARAM_BY_NAME: Mapping[str, Param] = MappingProxyType({p.name: p for p in PARAMS})
PORT_KEYS = frozenset(p.name for p in PARAMS if p.port)
DEFAULTS: Mapping[str, int] = MappingProxyType({p.name: p.default for p in PARAMS})


def canonical_device(device: str) -> str:
    """The emulated device ``device`` names; NvConfigError if none."""
    d = device.strip()
    if d in DEVICES:
        return d
    if d.lower() in _ALIASES:          # PCI addresses in either case, like lspci -s
        return _ALIASES[d.lower()]
    raise NvConfigError(None, f"Failed to open device: {device}. vfe emulates {DEFAULT_DEVICE} "
                              f"(port 0) and {PORT1_DEVICE} (port 1)")


def params_for(device: str) -> tuple[Param, ...]:
    device = canonical_device(device)
    if device == DEFAULT_DEVICE:
        return PARAMS
    return tuple(p for p in PARAMS if p.port)


def lookup(name: str, device: str = DEFAULT_DEVICE) -> Param:
    """The parameter ``name`` (case-insensitive) on ``device``."""
    device = canonical_device(device)
    p = PARAM_BY_NAME.get(name.strip().upper())
    if p is None:
        raise NvConfigError(name, f"The Device doesn't support {name} parameter")
    if device != DEFAULT_DEVICE and not p.port:
        raise NvConfigError(p.name, f"{p.name} is a global parameter: set it on {DEFAULT_DEVICE}")
    return p


def cross_check(values: Mapping[str, int], device: str = DEFAULT_DEVICE) -> list[str]:
    """Rules between parameters.  Raises NvConfigError for impossible
    combinations; returns warnings for ones that are legal but do not do what
    the user probably wants."""
    warnings: list[str] = []
    if canonical_device(device) != DEFAULT_DEVICE:
        return warnings
    v = values
    for kind in ("NET", "BLK"):
        npf, nvf = v[f"VIRTIO_{kind}_EMULATION_NUM_PF"], v[f"VIRTIO_{kind}_EMULATION_NUM_VF"]
        if npf * nvf > MAX_TOTAL_VFS:
            raise NvConfigError(f"VIRTIO_{kind}_EMULATION_NUM_VF",
                                f"VIRTIO_{kind}_EMULATION_NUM_PF={npf} x VIRTIO_{kind}_EMULATION_NUM_VF="
                                f"{nvf} = {npf * nvf} VFs, more than the {MAX_TOTAL_VFS} supported")
    if not v["VIRTIO_NET_EMULATION_ENABLE"]:
        warnings.append("VIRTIO_NET_EMULATION_ENABLE is False(0): virtio-net-controller will not run")
        return warnings
    if v["INTERNAL_CPU_MODEL"] != 1:
        warnings.append("INTERNAL_CPU_MODEL is SEPARATED_HOST(0): virtio-net emulation needs "
                        "EMBEDDED_CPU(1); virtio-net-controller will not run")
    if v["VIRTIO_NET_EMULATION_NUM_VF"] and not v["SRIOV_EN"]:
        warnings.append(f"VIRTIO_NET_EMULATION_NUM_VF={v['VIRTIO_NET_EMULATION_NUM_VF']} has no effect "
                        "while SRIOV_EN is False(0)")
    if v["VIRTIO_NET_EMULATION_NUM_VF"] and not v["VIRTIO_NET_EMULATION_NUM_PF"]:
        warnings.append("VIRTIO_NET_EMULATION_NUM_VF has no effect with VIRTIO_NET_EMULATION_NUM_PF=0 "
                        "(VFs belong to static PFs only)")
    if v["PCI_SWITCH_EMULATION_NUM_PORT"] and not v["PCI_SWITCH_EMULATION_ENABLE"]:
        warnings.append("PCI_SWITCH_EMULATION_NUM_PORT has no effect while PCI_SWITCH_EMULATION_ENABLE "
                        "is False(0): no PF can be hot-plugged")
    if v["VIRTIO_EMULATION_HOTPLUG_TRANS"] and not v["VIRTIO_NET_EMULATION_PF_PCI_LAYOUT"]:
        warnings.append("VIRTIO_EMULATION_HOTPLUG_TRANS=1 also needs VIRTIO_NET_EMULATION_PF_PCI_LAYOUT=1 "
                        "for transitional devices")
    lim = limits(v)
    need = lim.static_pfs + lim.total_vfs + lim.hotplug_ports
    if need > v["PF_TOTAL_SF"]:
        warnings.append(f"PF_TOTAL_SF={v['PF_TOTAL_SF']} is less than the {need} SFs the functions may need "
                        f"({lim.static_pfs} static PFs + {lim.total_vfs} VFs + {lim.hotplug_ports} "
                        f"hot-plug ports): each virtio-net function needs one SF")
    return warnings


class NvConfig:
    """One emulated device's NV configuration (see the module docstring)."""

    def __init__(self, device: str, path: Path, current: dict[str, int], next_: dict[str, int]):
        self.device = canonical_device(device)
        self.path = Path(path)
        self._current = current
        self._next = next_

    # -- loading -------------------------------------------------------------

    @staticmethod
    def file_for(state_dir: str | os.PathLike, device: str = DEFAULT_DEVICE) -> Path:
        device = canonical_device(device)
        return Path(state_dir) / "nvconfig" / f"{os.path.basename(device)}.json"

    @classmethod
    def load(cls, state_dir: str | os.PathLike, device: str = DEFAULT_DEVICE) -> "NvConfig":
        """The device's configuration; a device never configured has every
        parameter at its default (nothing is written until ``set``)."""
        device = canonical_device(device)
        path = cls.file_for(state_dir, device)
        current, next_ = cls._read(path, device)
        return cls(device, path, current, next_)

    @staticmethod
    def _read(path: Path, device: str) -> tuple[dict[str, int], dict[str, int]]:
        names = [p.name for p in params_for(device)]
        defaults = {n: DEFAULTS[n] for n in names}
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return dict(defaults), dict(defaults)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise NvConfigError(None, f"{path}: corrupt NV configuration (line {exc.lineno} column "
                                      f"{exc.colno}: {exc.msg}); delete it to return to the defaults") from None
        if not isinstance(data, dict):
            raise NvConfigError(None, f"{path}: corrupt NV configuration (not a JSON object)")
        out = []
        for section in ("current", "next"):
            stored = data.get(section, {})
            if not isinstance(stored, dict):
                raise NvConfigError(None, f"{path}: corrupt NV configuration ({section!r} is not an object)")
            vals = dict(defaults)
            for name in names:              # keys vfe no longer knows are dropped
                if name in stored:
                    p = PARAM_BY_NAME[name]
                    raw = stored[name]
                    if not isinstance(raw, int) or isinstance(raw, bool):
                        raise NvConfigError(name, f"{path}: {section} value of {name} is not an integer")
                    try:
                        p.check(raw)
                    except NvConfigError as exc:
                        raise NvConfigError(name, f"{path}: {section}: {exc.message}") from None
                    vals[name] = raw
            out.append(vals)
        return out[0], out[1]

    # -- views ---------------------------------------------------------------

    @property
    def current(self) -> Mapping[str, int]:
        """The values the emulated firmware runs with (read-only)."""
        return MappingProxyType(self._current)

    @property
    def next(self) -> Mapping[str, int]:
        """The values for the next cold reboot (read-only)."""
        return MappingProxyType(self._next)

    @property
    def params(self) -> tuple[Param, ...]:
        return params_for(self.device)

    def show(self, key: str, value: int) -> str:
        return PARAM_BY_NAME[key].show(value)

    def pending(self) -> dict[str, tuple[int, int]]:
        """Parameters whose next-boot value differs: ``{key: (current, next)}``."""
        return {k: (self._current[k], self._next[k]) for k in self._current
                if self._current[k] != self._next[k]}

    def warnings(self, which: str = "next") -> list[str]:
        return cross_check(self._next if which == "next" else self._current, self.device)

    # -- changes ---------------------------------------------------------------

    def check(self, values: Mapping[str, object] | None = None, /, **kv) -> tuple[dict[str, int], list[str]]:
        """Validate an update without writing: returns ``(parsed, warnings)``
        where ``parsed`` maps canonical names to ints.  Raises NvConfigError."""
        updates = dict(values or {})
        updates.update(kv)
        parsed: dict[str, int] = {}
        for name, raw in updates.items():
            p = lookup(name, self.device)
            if p.name in parsed:
                raise NvConfigError(p.name, f"{p.name} is given twice")
            parsed[p.name] = p.parse(raw)
        merged = dict(self._next)
        merged.update(parsed)
        warnings = cross_check(merged, self.device)
        return parsed, warnings

    def set(self, values: Mapping[str, object] | None = None, /, **kv) -> dict[str, tuple[int, int]]:
        """Set next-boot values, e.g. ``nv.set(VIRTIO_NET_EMULATION_NUM_PF=4)``
        or ``nv.set({"SRIOV_EN": "True"})``.  Everything is validated before
        anything is written; the file is replaced atomically.  Returns
        ``{key: (old next, new next)}`` of what changed."""
        with self._locked():
            self._current, self._next = self._read(self.path, self.device)   # another writer?
            parsed, _ = self.check(values, **kv)
            changes = {k: (self._next[k], v) for k, v in parsed.items() if self._next[k] != v}
            new_next = dict(self._next)
            new_next.update(parsed)
            self._write(self._current, new_next)
            self._next = new_next
        return changes

    def reset(self) -> dict[str, tuple[int, int]]:
        """Next-boot values back to the defaults (``mlxconfig r``)."""
        with self._locked():
            self._current, self._next = self._read(self.path, self.device)
            defaults = {p.name: p.default for p in self.params}
            changes = {k: (self._next[k], v) for k, v in defaults.items() if self._next[k] != v}
            self._write(self._current, defaults)
            self._next = defaults
        return changes

    def apply_pending(self) -> dict[str, tuple[int, int]]:
        """vfe's cold reboot: next-boot values become current.  Returns
        ``{key: (old, new)}``; writes only when something changed (or the
        device was never written, so the file then exists)."""
        with self._locked():
            self._current, self._next = self._read(self.path, self.device)
            changes = self.pending()
            if changes or not self.path.exists():
                self._write(dict(self._next), dict(self._next))
            self._current = dict(self._next)
        return changes

    # -- storage -------------------------------------------------------------

    def _write(self, current: Mapping[str, int], next_: Mapping[str, int]) -> None:
        atomic_write_json(self.path, {"device": self.device, "current": dict(current),
                                      "next": dict(next_)})

    @contextlib.contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.parent / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


# -- limits ---------------------------------------------------------------------

def queue_pairs_for_msix(msix: int) -> int:
    """Queue pairs a function with ``msix`` vectors can serve with a vector
    per data queue: one vector goes to config changes, the control queue
    needs none (Linux's virtio_net gives it no callback), and the rest is
    rounded down to rx/tx pairs."""
    return max(0, (msix - 1) // 2)


@dataclass(frozen=True)
class Limits:
    """What the current NV configuration allows.  Every count is 0 when
    VIRTIO_NET_EMULATION_ENABLE is false.  Queue limits here are the
    firmware's; the inventory further bounds them by the engine's max_virtq."""

    enabled: bool
    disabled_reason: str | None
    static_pfs: int            # VIRTIO_NET_EMULATION_NUM_PF
    hotplug_ports: int         # PCI_SWITCH_EMULATION_NUM_PORT, if the switch is enabled
    vfs_per_pf: int            # VIRTIO_NET_EMULATION_NUM_VF, if SRIOV_EN
    total_vfs: int             # static_pfs * vfs_per_pf (<= 504)
    pf_msix: int               # VIRTIO_NET_EMULATION_NUM_MSIX
    vf_msix: int               # min(NUM_VF_MSIX, VIRTIO_NET_EMULATION_NUM_MSIX)
    pf_max_queue_pairs: int
    vf_max_queue_pairs: int
    transitional: bool         # PF_PCI_LAYOUT=1 and HOTPLUG_TRANS=1
    io_port_space_kb: int      # VFE_IO_PORT_SPACE_KB
    transitional_max: int      # min(hotplug_ports, (io - 4K) / 4K) if transitional
    pf_total_sf: int           # PF_TOTAL_SF of this device

    @property
    def pf_max_queues(self) -> int:
        """Data virtqueues of a PF (2 per pair)."""
        return 2 * self.pf_max_queue_pairs

    @property
    def vf_max_queues(self) -> int:
        return 2 * self.vf_max_queue_pairs


@dataclass(frozen=True)
class BlkLimits:
    """What the current NV configuration allows virtio-blk functions
    (controller_virtio_blk_create): nothing without
    VIRTIO_BLK_EMULATION_ENABLE.  Queue limits are the firmware's (a vector
    per queue, one for config changes); the blk kind further bounds them by
    the engine's."""

    enabled: bool              # VIRTIO_BLK_EMULATION_ENABLE
    static_pfs: int            # VIRTIO_BLK_EMULATION_NUM_PF (0 when disabled)
    vfs_per_pf: int            # VIRTIO_BLK_EMULATION_NUM_VF, if SRIOV_EN and enabled
    sriov: bool                # SRIOV_EN
    pf_msix: int               # VIRTIO_BLK_EMULATION_NUM_MSIX
    vf_msix: int               # min(NUM_VF_MSIX, VIRTIO_BLK_EMULATION_NUM_MSIX)

    @property
    def pf_max_queues(self) -> int:
        return max(0, self.pf_msix - 1)

    @property
    def vf_max_queues(self) -> int:
        return max(0, self.vf_msix - 1)


def blk_limits(nv) -> BlkLimits:
    """The virtio-blk limits of port 0's device's current configuration
    (``nv``: an NvConfig or a mapping of values)."""
    v = _values(nv)
    on = bool(v["VIRTIO_BLK_EMULATION_ENABLE"])
    pf_msix = v["VIRTIO_BLK_EMULATION_NUM_MSIX"]
    return BlkLimits(enabled=on, static_pfs=v["VIRTIO_BLK_EMULATION_NUM_PF"] if on else 0,
                     vfs_per_pf=v["VIRTIO_BLK_EMULATION_NUM_VF"] if on and v["SRIOV_EN"] else 0,
                     sriov=bool(v["SRIOV_EN"]), pf_msix=pf_msix, vf_msix=min(v["NUM_VF_MSIX"], pf_msix))


def _values(nv) -> Mapping[str, int]:
    if isinstance(nv, NvConfig):
        if nv.device != DEFAULT_DEVICE:
            raise ValueError(f"limits come from {DEFAULT_DEVICE}'s configuration, not {nv.device}'s")
        nv = nv.current
    merged = dict(DEFAULTS)
    merged.update(nv)
    return merged


def service_check(nv) -> str | None:
    """Why virtio-net-controller must not run with this configuration, or
    None.  ``nv`` is an NvConfig (its current values) or a mapping."""
    v = _values(nv)
    if not v["VIRTIO_NET_EMULATION_ENABLE"]:
        return ("VIRTIO_NET_EMULATION_ENABLE is False(0): virtio-net emulation is disabled "
                f"(vfe-mlxconfig -d {DEFAULT_DEVICE} s VIRTIO_NET_EMULATION_ENABLE=1, then restart)")
    if v["INTERNAL_CPU_MODEL"] != 1:
        return ("INTERNAL_CPU_MODEL is SEPARATED_HOST(0): virtio-net emulation needs EMBEDDED_CPU(1) "
                f"(vfe-mlxconfig -d {DEFAULT_DEVICE} s INTERNAL_CPU_MODEL=1, then restart)")
    return None


def limits(nv) -> Limits:
    """The limits of the current configuration of port 0's device (``nv``
    is an NvConfig or a mapping of values)."""
    v = _values(nv)
    reason = service_check(v)
    on = reason is None
    static_pfs = v["VIRTIO_NET_EMULATION_NUM_PF"] if on else 0
    hotplug = v["PCI_SWITCH_EMULATION_NUM_PORT"] if on and v["PCI_SWITCH_EMULATION_ENABLE"] else 0
    vfs_per_pf = v["VIRTIO_NET_EMULATION_NUM_VF"] if on and v["SRIOV_EN"] and static_pfs else 0
    total_vfs = min(static_pfs * vfs_per_pf, MAX_TOTAL_VFS)
    pf_msix = v["VIRTIO_NET_EMULATION_NUM_MSIX"]
    vf_msix = min(v["NUM_VF_MSIX"], pf_msix)
    trans = bool(on and v["VIRTIO_NET_EMULATION_PF_PCI_LAYOUT"] and v["VIRTIO_EMULATION_HOTPLUG_TRANS"])
    io_kb = v["VFE_IO_PORT_SPACE_KB"]
    trans_max = min(hotplug, max(0, (io_kb - IO_WINDOW_KB) // IO_WINDOW_KB)) if trans else 0
    return Limits(
        enabled=on, disabled_reason=reason,
        static_pfs=static_pfs, hotplug_ports=hotplug,
        vfs_per_pf=vfs_per_pf, total_vfs=total_vfs,
        pf_msix=pf_msix, vf_msix=vf_msix,
        pf_max_queue_pairs=queue_pairs_for_msix(pf_msix) if on else 0,
        vf_max_queue_pairs=queue_pairs_for_msix(vf_msix) if on and vfs_per_pf else 0,
        transitional=trans, io_port_space_kb=io_kb, transitional_max=trans_max,
        pf_total_sf=v["PF_TOTAL_SF"],
    )
