"""virtnet.conf: the controller's optional JSON configuration file.

Read once when the controller starts (the seed: "Dynamic change of
virtnet.conf is not supported").  A missing file means every default.  Every
rule is enforced with a ``ConfigError`` that names the offending key, so a
user sees e.g.::

    /opt/mellanox/mlnx_virtnet/virtnet.conf: ib_dev_lag: ib_dev_lag and
    ib_dev_p0/ib_dev_p1 cannot be configured simultaneously

Keys: the seed's (ib_dev_p0, ib_dev_p1, ib_dev_lag, ib_dev_for_static_pf,
is_lag, pf_mac, recovery, sf_pool_percent, sf_pool_force_destroy) and
single_port, static_pf {mac_base, features}, vf {mac_base, features,
vfs_per_pf}.  docs/virtnet-conf.md describes each.
"""
from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vfe.macaddr import is_mac, mac_add

MAC_LEN = len("00:11:22:33:44:55")
MAX_VFS_PER_PF = 126
_IB_DEV_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")

TOP_KEYS = ("ib_dev_p0", "ib_dev_p1", "ib_dev_lag", "ib_dev_for_static_pf", "is_lag", "pf_mac",
            "recovery", "sf_pool_percent", "sf_pool_force_destroy", "single_port", "static_pf", "vf")
STATIC_PF_KEYS = ("mac_base", "features")
VF_KEYS = ("mac_base", "features", "vfs_per_pf")


class ConfigError(ValueError):
    """A refused virtnet.conf.  ``key`` names the offending key (dotted for
    sub-keys, e.g. ``vf.mac_base``), or is None for the file as a whole."""

    def __init__(self, key: str | None, message: str, path: str | os.PathLike | None = None):
        self.key = key
        self.message = message
        self.path = None if path is None else str(path)
        super().__init__(self._text())

    def _text(self) -> str:
        parts = [p for p in (self.path, self.key) if p]
        return ": ".join(parts + [self.message])

    def with_path(self, path) -> "ConfigError":
        return ConfigError(self.key, self.message, path)


# -- MAC addresses ----------------------------------------------------------------

def check_mac(key: str, value: Any) -> str:
    """The seed's rule: the controller checks a MAC's length only (17
    characters).  vfe must also add to it (pf_mac+1, ...), so it has to
    parse as six hex octets; it is not checked for being unicast, non-zero or
    unique -- that is the user's job, as the seed warns."""
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a MAC address string like 00:11:22:33:44:55, "
                               f"not {_json_type(value)}")
    if len(value) != MAC_LEN:
        raise ConfigError(key, f"MAC address {value!r} has {len(value)} characters, not {MAC_LEN} "
                               f"(like 00:11:22:33:44:55)")
    if not is_mac(value):
        raise ConfigError(key, f"{value!r} is not six hex octets separated by ':' (like 00:11:22:33:44:55)")
    return value.lower()


# -- the configuration ------------------------------------------------------------

@dataclass(frozen=True)
class StaticPfConf:
    mac_base: str | None = None
    features: int | None = None          # None: the controller's default features


@dataclass(frozen=True)
class VfConf:
    mac_base: str | None = None
    features: int | None = None
    vfs_per_pf: int | None = None        # MAC stride per PF; None: VIRTIO_NET_EMULATION_NUM_VF


@dataclass(frozen=True)
class VirtnetConf:
    ib_dev_p0: str = "mlx5_0"
    ib_dev_p1: str = "mlx5_1"
    ib_dev_lag: str = "mlx5_bond_0"
    ib_dev_for_static_pf: str | None = None     # None before load: the EMU manager
    is_lag: bool = False
    pf_mac: str | None = None
    recovery: bool = True
    sf_pool_percent: int = 0
    sf_pool_force_destroy: bool = False
    single_port: bool = False
    static_pf: StaticPfConf = field(default_factory=StaticPfConf)
    vf: VfConf = field(default_factory=VfConf)
    path: str | None = None                      # the file read, None if there was none
    given: frozenset[str] = frozenset()          # top-level keys present in the file

    # -- derived -------------------------------------------------------------

    @property
    def emu_manager(self) -> str:
        """The EMU manager device: ib_dev_lag with LAG, else ib_dev_p0."""
        return self.ib_dev_lag if self.is_lag else self.ib_dev_p0

    @property
    def static_pf_device(self) -> str:
        return self.ib_dev_for_static_pf or self.emu_manager

    @property
    def sf_devices(self) -> tuple[str, ...]:
        """The RDMA devices SFs may be created on (``virtnet hotplug -i``)."""
        if self.is_lag:
            return (self.ib_dev_lag,)
        if self.single_port:
            return (self.ib_dev_p0,)
        return (self.ib_dev_p0, self.ib_dev_p1)

    def pf_num(self, ib_dev: str) -> int:
        """The port (``pf<N>`` of representor names) an SF device belongs to;
        the LAG device is port 0.  ValueError if it is not one of sf_devices."""
        if ib_dev not in self.sf_devices:
            raise ValueError(f"{ib_dev} is not an SF device of this configuration "
                             f"(use {' or '.join(self.sf_devices)})")
        return 1 if (not self.is_lag and ib_dev == self.ib_dev_p1) else 0

    @property
    def static_pf_mac_base(self) -> str | None:
        return self.static_pf.mac_base or self.pf_mac

    def static_pf_mac(self, pf_id: int) -> str | None:
        """pf_mac -> pf 0, pf_mac+1 -> pf 1, ...; None without a base."""
        base = self.static_pf_mac_base
        return None if base is None else mac_add(base, pf_id)

    def vf_mac(self, pf_id: int, vf_id: int, num_vf: int) -> str | None:
        """vf.mac_base + pf_id * vfs_per_pf + vf_id, where vfs_per_pf defaults
        to ``num_vf`` (VIRTIO_NET_EMULATION_NUM_VF); None without a base or
        for a VF beyond vfs_per_pf (its MAC would overlap the next PF's)."""
        if self.vf.mac_base is None:
            return None
        stride = self.vf.vfs_per_pf if self.vf.vfs_per_pf is not None else num_vf
        if vf_id >= stride:
            return None
        return mac_add(self.vf.mac_base, pf_id * stride + vf_id)

    def to_dict(self) -> dict:
        """The effective configuration, as JSON-able values (for the log)."""
        return {
            "ib_dev_p0": self.ib_dev_p0, "ib_dev_p1": self.ib_dev_p1, "ib_dev_lag": self.ib_dev_lag,
            "ib_dev_for_static_pf": self.static_pf_device, "is_lag": int(self.is_lag),
            "pf_mac": self.pf_mac, "recovery": int(self.recovery),
            "sf_pool_percent": self.sf_pool_percent,
            "sf_pool_force_destroy": int(self.sf_pool_force_destroy),
            "single_port": int(self.single_port),
            "static_pf": {"mac_base": self.static_pf.mac_base, "features": _hex(self.static_pf.features)},
            "vf": {"mac_base": self.vf.mac_base, "features": _hex(self.vf.features),
                   "vfs_per_pf": self.vf.vfs_per_pf},
        }


def _hex(v: int | None) -> str | None:
    return None if v is None else hex(v)


# -- parsing ----------------------------------------------------------------------

def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"a boolean ({str(v).lower()})"
    if isinstance(v, (int, float)):
        return f"a number ({v})"
    if isinstance(v, str):
        return f"a string ({v!r})"
    if isinstance(v, list):
        return "a list"
    return "an object"


def _flag(key: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise ConfigError(key, f"must be 0 or 1, not {_json_type(v)}")


def _ib_dev(key: str, v: Any) -> str:
    if not isinstance(v, str):
        raise ConfigError(key, f"must be an RDMA device name like mlx5_0, not {_json_type(v)}")
    if not _IB_DEV_RE.fullmatch(v):
        raise ConfigError(key, f"{v!r} is not an RDMA device name (like mlx5_0 or mlx5_bond_0)")
    return v


def _features(key: str, v: Any) -> int:
    if isinstance(v, bool):
        raise ConfigError(key, f"must be a number or a hex string like \"0x230047082b\", not {_json_type(v)}")
    if isinstance(v, int):
        n = v
    elif isinstance(v, str):
        try:
            n = int(v.strip(), 0)
        except ValueError:
            raise ConfigError(key, f"{v!r} is not a number or a hex string like \"0x230047082b\"") from None
    else:
        raise ConfigError(key, f"must be a number or a hex string like \"0x230047082b\", not {_json_type(v)}")
    if not 0 <= n < 1 << 64:
        raise ConfigError(key, f"{v!r} does not fit the 64 virtio feature bits")
    return n


def _unknown(key: str, known: tuple[str, ...]) -> ConfigError:
    name = key.split(".")[-1].lower()
    near = [k for k in known if k == name] or [k for k in known if k.startswith(name) or name.startswith(k)] \
        or difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return ConfigError(key, f"unknown key{hint}; known keys: {', '.join(known)}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ConfigError(k, "given twice")
        out[k] = v
    return out


def parse_virtnet_conf(text: str, path: str | os.PathLike | None = None) -> VirtnetConf:
    """Parse and validate virtnet.conf's text.  Raises ConfigError."""
    try:
        return _parse(text, path)
    except ConfigError as exc:
        raise exc.with_path(path) if path is not None and exc.path is None else exc


def _parse(text: str, path) -> VirtnetConf:
    if not text.strip():
        return VirtnetConf(ib_dev_for_static_pf="mlx5_0", path=None if path is None else str(path))
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise ConfigError(None, f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(None, f"must be a JSON object ({{...}}), not {_json_type(data)}")
    for k in data:
        if k not in TOP_KEYS:
            raise _unknown(k, TOP_KEYS)
    given = frozenset(data)
    kw: dict[str, Any] = {}
    for k in ("ib_dev_p0", "ib_dev_p1", "ib_dev_lag", "ib_dev_for_static_pf"):
        if k in data:
            kw[k] = _ib_dev(k, data[k])
    for k in ("is_lag", "recovery", "sf_pool_force_destroy", "single_port"):
        if k in data:
            kw[k] = _flag(k, data[k])
    if "sf_pool_percent" in data:
        v = data["sf_pool_percent"]
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError("sf_pool_percent", f"must be an integer in [0, 100], not {_json_type(v)}")
        if not 0 <= v <= 100:
            raise ConfigError("sf_pool_percent", f"{v} is out of the valid range [0, 100]")
        kw["sf_pool_percent"] = v
    if "pf_mac" in data:
        kw["pf_mac"] = check_mac("pf_mac", data["pf_mac"])
    kw["static_pf"] = _static_pf(data.get("static_pf"))
    kw["vf"] = _vf(data.get("vf"))

    conf = VirtnetConf(**kw, path=None if path is None else str(path), given=given)
    _cross_check(conf, given)
    if conf.ib_dev_for_static_pf is None:
        conf = replace(conf, ib_dev_for_static_pf=conf.emu_manager)
    return conf


def _static_pf(v: Any) -> StaticPfConf:
    if v is None:
        return StaticPfConf()
    if not isinstance(v, dict):
        raise ConfigError("static_pf", f"must be an object {{\"mac_base\": ..., \"features\": ...}}, "
                                       f"not {_json_type(v)}")
    for k in v:
        if k not in STATIC_PF_KEYS:
            raise _unknown(f"static_pf.{k}", STATIC_PF_KEYS)
    return StaticPfConf(
        mac_base=check_mac("static_pf.mac_base", v["mac_base"]) if "mac_base" in v else None,
        features=_features("static_pf.features", v["features"]) if "features" in v else None)


def _vf(v: Any) -> VfConf:
    if v is None:
        return VfConf()
    if not isinstance(v, dict):
        raise ConfigError("vf", f"must be an object {{\"mac_base\": ..., \"features\": ..., "
                                f"\"vfs_per_pf\": ...}}, not {_json_type(v)}")
    for k in v:
        if k not in VF_KEYS:
            raise _unknown(f"vf.{k}", VF_KEYS)
    vfs = None
    if "vfs_per_pf" in v:
        n = v["vfs_per_pf"]
        if isinstance(n, bool) or not isinstance(n, int):
            raise ConfigError("vf.vfs_per_pf", f"must be an integer in [1, {MAX_VFS_PER_PF}], not {_json_type(n)}")
        if not 1 <= n <= MAX_VFS_PER_PF:
            raise ConfigError("vf.vfs_per_pf", f"{n} is out of the valid range [1, {MAX_VFS_PER_PF}]")
        vfs = n
    return VfConf(
        mac_base=check_mac("vf.mac_base", v["mac_base"]) if "mac_base" in v else None,
        features=_features("vf.features", v["features"]) if "features" in v else None,
        vfs_per_pf=vfs)


def _cross_check(c: VirtnetConf, given: frozenset[str]) -> None:
    ports_given = [k for k in ("ib_dev_p0", "ib_dev_p1") if k in given]
    if "ib_dev_lag" in given and ports_given:
        raise ConfigError("ib_dev_lag", f"ib_dev_lag and {'/'.join(ports_given)} cannot be configured "
                                        "simultaneously")
    if c.is_lag and ports_given:
        raise ConfigError("is_lag", f"is_lag is 1 but {'/'.join(ports_given)} is configured instead of a "
                                    f"LAG device: with LAG, SFs are created on ib_dev_lag (default "
                                    f"mlx5_bond_0); remove {'/'.join(ports_given)}")
    if not c.is_lag and "ib_dev_lag" in given:
        raise ConfigError("ib_dev_lag", "ib_dev_lag is set but is_lag is 0: set is_lag to 1 to use LAG, "
                                        "or remove ib_dev_lag")
    if c.single_port and c.is_lag:
        raise ConfigError("single_port", "single_port is 1 but is_lag is 1: LAG bonds both ports")
    if c.single_port and "ib_dev_p1" in given:
        raise ConfigError("ib_dev_p1", "single_port is 1: port 1 is not used, remove ib_dev_p1")
    if not c.is_lag and not c.single_port and c.ib_dev_p0 == c.ib_dev_p1:
        raise ConfigError("ib_dev_p1", f"ib_dev_p0 and ib_dev_p1 are both {c.ib_dev_p0}")
    if c.ib_dev_for_static_pf is not None and c.ib_dev_for_static_pf not in c.sf_devices:
        if c.is_lag:
            why = f"with is_lag 1 the static PFs must be on the LAG device ib_dev_lag ({c.ib_dev_lag})"
        elif c.single_port:
            why = f"with single_port 1 it must be ib_dev_p0 ({c.ib_dev_p0})"
        else:
            why = f"it must be ib_dev_p0 ({c.ib_dev_p0}) or ib_dev_p1 ({c.ib_dev_p1})"
        raise ConfigError("ib_dev_for_static_pf", f"{c.ib_dev_for_static_pf} is not a device of this "
                                                  f"configuration: {why}")
    if c.pf_mac is not None and c.static_pf.mac_base is not None:
        raise ConfigError("static_pf.mac_base", "pf_mac and static_pf.mac_base both set the static PFs' "
                                                "base MAC; keep one")


def load_virtnet_conf(path: str | os.PathLike) -> VirtnetConf:
    """Read virtnet.conf; a missing file gives every default."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        return VirtnetConf(ib_dev_for_static_pf="mlx5_0")
    except IsADirectoryError:
        raise ConfigError(None, "is a directory, not a JSON file", p) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(None, f"is not UTF-8 text ({exc.reason} at byte {exc.start})", p) from None
    except OSError as exc:
        raise ConfigError(None, f"cannot be read: {exc.strerror}", p) from None
    return parse_virtnet_conf(text, p)
