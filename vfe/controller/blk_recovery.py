"""Recovery files of the virtio-blk side: one JSON file per bdev and one per
blk controller, so that a restarted controller (SIGKILL, crash, stop/start)
recreates them with the same VUID, BDF and socket and a QEMU with
``reconnect=1`` gets its disk back.

Layout, under the controller's recovery directory (the seed's
``/opt/mellanox/mlnx_virtnet/recovery``)::

    blk/bdevs/<bdev name>.json        {"name", "bdev_type", "block_size", "num_blocks"[, "filename"]}
    blk/controllers/<VUID>.json       {"name", "emulation_manager", "pf_id"[, "vf_id"], "vuid",
                                       "bdf_raw", "bdev", "num_queues", "queue_size", "admin_q",
                                       "force_in_order", "socket"}

A subdirectory, so that the net functions' files (``<VUID>.json`` directly
in the recovery directory, recovery.py) stay exactly the seed's: the net
loader reads only the files there, and the seed's advice after an NV change
("delete the files under .../recovery") resets the net functions without
dropping the disks, whose definition does not depend on the net NV values.

What a file stands for:

- ``null``: the whole bdev (it has no content).
- ``aio``: the definition -- file name (absolute), block size and the size
  served; the data is the file's and survives on its own.  At recovery the
  file must still exist and be at least that large, else that bdev (and the
  controller on it) is not recreated and an error is logged.
- ``malloc``: only the definition.  Its content was the dead process's RAM:
  the bdev comes back *empty* (all zeros), with a warning in the log, as
  SPDK's ``load_config`` recreates a malloc bdev.  A guest that had data on
  it sees zeros -- a malloc bdev is scratch space; use an aio bdev for data
  that must survive.

Files are written atomically (paths.atomic_write_text) when a bdev or
controller is created and removed when it is deleted; a clean shutdown
keeps them.  ``load()`` reads and checks every file before anything is
created: JSON, the required fields (others are ignored, for files of a later
version), field types and ranges, the identity (a controller's VUID,
BDF and name follow from its pf_id/vf_id and emulation manager, and must
match the file name), and the references (the controller's bdev has a valid
file, no two controllers on one bdev).  Problems come back as the net
loader's RecoveryProblem, with a complete message; the service refuses to
start with them, like a bad net recovery file, and no file is changed.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NamedTuple

from vfe.controller import blk_functions as bf
from vfe.controller.paths import atomic_write_text, is_temp_name
from vfe.controller.recovery import RecoveryError, RecoveryProblem

BLK_SUBDIR = "blk"
BDEV_FIELDS = ("name", "bdev_type", "block_size", "num_blocks", "filename")
CONTROLLER_FIELDS = ("name", "emulation_manager", "pf_id", "vf_id", "vuid", "bdf_raw", "bdev",
                     "num_queues", "queue_size", "admin_q", "force_in_order", "socket")


def _int(name: str, v: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise RecoveryError(name, f"must be an integer, not {v!r}")
    if v < lo or (hi is not None and v > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise RecoveryError(name, f"{v} is out of range ({rng})")
    return v


def _bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise RecoveryError(name, f"must be true or false, not {v!r}")
    return v


def _str(name: str, v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise RecoveryError(name, f"must be a non-empty string, not {v!r}")
    return v


def _object(data: Any, required: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise RecoveryError(None, "not a JSON object")
    missing = [f for f in required if f not in data]
    if missing:
        raise RecoveryError(missing[0], f"missing (needed: {', '.join(missing)})")
    return data


def valid_bdev_name(name: Any) -> bool:
    return isinstance(name, str) and bool(bf.NAME_RE.fullmatch(name)) and name not in (".", "..")


@dataclass
class BdevRecord:
    name: str
    bdev_type: str                  # null | malloc | aio
    block_size: int
    num_blocks: int
    filename: str | None = None     # aio only, absolute
    direct: bool = False            # aio only: O_DIRECT (bdev_aio_create --direct)

    @property
    def size_mb(self) -> int:
        return (self.num_blocks * self.block_size) >> 20

    @property
    def file_name(self) -> str:
        return f"{BLK_SUBDIR}/bdevs/{self.name}.json"

    def validate(self) -> "BdevRecord":
        if not valid_bdev_name(self.name):
            raise RecoveryError("name", f"{self.name!r} is not a bdev name (letters, digits, _ . : -)")
        if self.bdev_type not in bf.KINDS:
            raise RecoveryError("bdev_type", f"{self.bdev_type!r} is not one of {', '.join(bf.KINDS)}")
        _int("block_size", self.block_size, 0)
        if self.block_size not in bf.BLOCK_SIZES:
            raise RecoveryError("block_size", f"{self.block_size} is not one of "
                                              f"{', '.join(map(str, bf.BLOCK_SIZES))}")
        _int("num_blocks", self.num_blocks, 1)
        total = self.num_blocks * self.block_size
        if total % (1 << 20):
            raise RecoveryError("num_blocks", f"{self.num_blocks} blocks of {self.block_size} bytes "
                                              f"is not a whole number of MiB")
        if self.bdev_type == "aio":
            _str("filename", self.filename)
            if not os.path.isabs(self.filename):
                raise RecoveryError("filename", f"{self.filename!r} is not an absolute path")
        elif self.filename is not None:
            raise RecoveryError("filename", f"a {self.bdev_type} bdev has no file")
        if self.bdev_type == "malloc" and self.size_mb > bf.MAX_MALLOC_MB:
            raise RecoveryError("num_blocks", f"a malloc bdev of {self.size_mb} MiB is more than "
                                              f"{bf.MAX_MALLOC_MB} MiB")
        return self

    def to_json(self) -> dict:
        d: dict[str, Any] = {"name": self.name, "bdev_type": self.bdev_type,
                             "block_size": self.block_size, "num_blocks": self.num_blocks}
        if self.filename is not None:
            d["filename"] = self.filename
        if self.direct:
            d["direct"] = True
        return d

    @classmethod
    def from_json(cls, data: Any, name: str | None = None) -> "BdevRecord":
        d = _object(data, ("name", "bdev_type", "block_size", "num_blocks"))
        if name is not None and d["name"] != name:
            raise RecoveryError("name", f"{d['name']!r} but the file is named {name}.json")
        direct = d.get("direct", False)
        if not isinstance(direct, bool):
            raise RecoveryError("direct", f"{direct!r} is not true or false")
        return cls(d["name"], d["bdev_type"], d["block_size"], d["num_blocks"],
                   d.get("filename"), direct).validate()


@dataclass
class BlkControllerRecord:
    name: str
    emulation_manager: str
    pf_id: int
    vf_id: int | None               # None for a PF
    vuid: str
    bdf_raw: int
    bdev: str
    num_queues: int
    queue_size: int
    admin_q: bool
    force_in_order: bool
    socket: str

    @property
    def file_name(self) -> str:
        return f"{BLK_SUBDIR}/controllers/{self.vuid}.json"

    def validate(self) -> "BlkControllerRecord":
        m = bf.IB_DEV_RE.fullmatch(self.emulation_manager) if isinstance(self.emulation_manager, str) else None
        if m is None:
            raise RecoveryError("emulation_manager", f"{self.emulation_manager!r} is not mlx5_<n>")
        _int("pf_id", self.pf_id, 0, bf.MAX_PF_ID)
        if self.vf_id is not None:
            _int("vf_id", self.vf_id, 0, bf.MAX_VF_ID)
        name, vuid, raw = bf.blk_identity(m.group(1), self.pf_id, -1 if self.vf_id is None else self.vf_id)
        _str("vuid", self.vuid)
        if self.vuid != vuid:
            raise RecoveryError("vuid", f"{self.vuid!r}, but pf_id {self.pf_id}"
                                        + (f" vf_id {self.vf_id}" if self.vf_id is not None else "")
                                        + f" is {vuid}")
        _int("bdf_raw", self.bdf_raw, 0, 0xFFFF)
        if self.bdf_raw != raw:
            raise RecoveryError("bdf_raw", f"{self.bdf_raw}, but {vuid} is at {raw} "
                                           f"({bf.bdf_str(raw)})")
        if self.name != name:
            raise RecoveryError("name", f"{self.name!r}, but the controller of {vuid} on "
                                        f"{self.emulation_manager} is {name}")
        if not valid_bdev_name(self.bdev):
            raise RecoveryError("bdev", f"{self.bdev!r} is not a bdev name")
        _int("num_queues", self.num_queues, 1, bf.MAX_QUEUES)
        _int("queue_size", self.queue_size, 2, bf.MAX_QUEUE_SIZE)
        if self.queue_size & (self.queue_size - 1):
            raise RecoveryError("queue_size", f"{self.queue_size} is not a power of 2")
        _bool("admin_q", self.admin_q)
        _bool("force_in_order", self.force_in_order)
        _str("socket", self.socket)
        return self

    def to_json(self) -> dict:
        d: dict[str, Any] = {"name": self.name, "emulation_manager": self.emulation_manager,
                             "pf_id": self.pf_id}
        if self.vf_id is not None:
            d["vf_id"] = self.vf_id
        d.update(vuid=self.vuid, bdf_raw=self.bdf_raw, bdev=self.bdev, num_queues=self.num_queues,
                 queue_size=self.queue_size, admin_q=self.admin_q, force_in_order=self.force_in_order,
                 socket=self.socket)
        return d

    @classmethod
    def from_json(cls, data: Any, vuid: str | None = None) -> "BlkControllerRecord":
        d = _object(data, ("name", "emulation_manager", "pf_id", "vuid", "bdf_raw", "bdev",
                           "num_queues", "queue_size", "admin_q", "force_in_order", "socket"))
        if vuid is not None and d["vuid"] != vuid:
            raise RecoveryError("vuid", f"{d['vuid']!r} but the file is named {vuid}.json")
        return cls(d["name"], d["emulation_manager"], d["pf_id"], d.get("vf_id"), d["vuid"],
                   d["bdf_raw"], d["bdev"], d["num_queues"], d["queue_size"], d["admin_q"],
                   d["force_in_order"], d["socket"]).validate()

    def create_params(self) -> dict:
        """controller_virtio_blk_create's params that made it."""
        p: dict[str, Any] = {"emu_manager": self.emulation_manager, "pf_id": self.pf_id,
                             "bdev_type": "spdk", "bdev": self.bdev, "num_queues": self.num_queues,
                             "queue_size": self.queue_size, "admin_q": self.admin_q,
                             "force_in_order": self.force_in_order}
        if self.vf_id is not None:
            p["vf_id"] = self.vf_id
        return p


class BlkLoad(NamedTuple):
    bdevs: list[BdevRecord]
    controllers: list[BlkControllerRecord]
    problems: list[RecoveryProblem]


class BlkRecoveryStore:
    """``<recovery dir>/blk``.  With ``enabled=False`` (virtnet.conf
    ``"recovery": 0``) nothing is written or loaded; deletes still remove
    files so none goes stale.  ``display_dir`` names the recovery directory
    in messages (default: its path)."""

    def __init__(self, recovery_dir: str | os.PathLike, enabled: bool = True,
                 display_dir: str | None = None):
        self.recovery_dir = Path(recovery_dir)
        self.dir = self.recovery_dir / BLK_SUBDIR
        self.enabled = enabled
        self.display_dir = display_dir or str(self.recovery_dir)

    @property
    def bdev_dir(self) -> Path:
        return self.dir / "bdevs"

    @property
    def controller_dir(self) -> Path:
        return self.dir / "controllers"

    def bdev_path(self, name: str) -> Path:
        if not valid_bdev_name(name):
            raise RecoveryError("name", f"{name!r} is not a bdev name")
        return self.bdev_dir / f"{name}.json"

    def controller_path(self, vuid: str) -> Path:
        if not isinstance(vuid, str) or not re.fullmatch(r"VBLK[A-Za-z0-9]{1,60}", vuid):
            raise RecoveryError("vuid", f"{vuid!r} is not a blk VUID")
        return self.controller_dir / f"{vuid}.json"

    # -- writing
    def save_bdev(self, rec: BdevRecord) -> Path | None:
        rec.validate()
        path = self.bdev_path(rec.name)
        if not self.enabled:
            return None
        atomic_write_text(path, json.dumps(rec.to_json(), indent=2) + "\n")
        return path

    def save_controller(self, rec: BlkControllerRecord) -> Path | None:
        rec.validate()
        path = self.controller_path(rec.vuid)
        if not self.enabled:
            return None
        atomic_write_text(path, json.dumps(rec.to_json(), indent=2) + "\n")
        return path

    def delete_bdev(self, name: str) -> bool:
        try:
            self.bdev_path(name).unlink()
        except FileNotFoundError:
            return False
        return True

    def delete_controller(self, vuid: str) -> bool:
        try:
            self.controller_path(vuid).unlink()
        except FileNotFoundError:
            return False
        return True

    # -- reading
    @staticmethod
    def _files(d: Path) -> list[Path]:
        if not d.is_dir():
            return []
        return sorted(p for p in d.iterdir()
                      if p.suffix == ".json" and not is_temp_name(p.name) and p.is_file())

    def _problem(self, path: Path, key: str | None, what: str, consequence: str) -> RecoveryProblem:
        rel = path.relative_to(self.recovery_dir) if path.is_relative_to(self.recovery_dir) else path
        return RecoveryProblem(path, key, f"recovery file {rel} {what}; fix it, or delete it ({path}) "
                                          f"and restart: {consequence}")

    def _read(self, path: Path, parse, consequence: str, problems: list) -> Any:
        try:
            return parse(json.loads(path.read_text(encoding="utf-8")), path.stem)
        except json.JSONDecodeError as exc:
            what = f"is not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})"
        except (RecoveryError, UnicodeDecodeError) as exc:
            what = f"is invalid ({exc})"
        except OSError as exc:
            what = f"cannot be read ({exc.strerror})"
        problems.append(self._problem(path, path.stem, what, consequence))
        return None

    def load(self) -> BlkLoad:
        """Every valid record, and a problem for every file that is not."""
        if not self.enabled:
            return BlkLoad([], [], [])
        problems: list[RecoveryProblem] = []
        bdevs: list[BdevRecord] = []
        for p in self._files(self.bdev_dir):
            if not valid_bdev_name(p.stem):
                problems.append(self._problem(p, None, "is not named <bdev name>.json",
                                              "that bdev is not recreated"))
                continue
            rec = self._read(p, BdevRecord.from_json, f"bdev {p.stem} is then not recreated", problems)
            if rec is not None:
                bdevs.append(rec)
        controllers: list[BlkControllerRecord] = []
        for p in self._files(self.controller_dir):
            rec = self._read(p, BlkControllerRecord.from_json,
                             f"controller {p.stem} is then not recreated", problems)
            if rec is not None:
                controllers.append(rec)
        # references: every controller's bdev has a (valid) file; one controller per bdev
        names = {b.name for b in bdevs}
        bad_bdev_files = {Path(p.path).stem for p in problems if Path(p.path).parent == self.bdev_dir}
        users: dict[str, list[BlkControllerRecord]] = {}
        good: list[BlkControllerRecord] = []
        for c in controllers:
            path = self.controller_path(c.vuid)
            if c.bdev not in names:
                why = ("whose recovery file is invalid" if c.bdev in bad_bdev_files
                       else f"which has no recovery file ({BLK_SUBDIR}/bdevs/{c.bdev}.json)")
                problems.append(self._problem(path, c.vuid, f"names bdev {c.bdev}, {why}",
                                              f"controller {c.vuid} is then not recreated"))
                continue
            users.setdefault(c.bdev, []).append(c)
            good.append(c)
        for bdev, group in users.items():
            if len(group) > 1:
                files = " and ".join(c.file_name for c in group)
                for c in group:
                    problems.append(RecoveryProblem(
                        self.controller_path(c.vuid), c.vuid,
                        f"recovery files {files} both use bdev {bdev} (a bdev serves one controller); "
                        f"delete one of them and restart"))
                good = [c for c in good if c.bdev != bdev]
        return BlkLoad(bdevs, good, problems)
