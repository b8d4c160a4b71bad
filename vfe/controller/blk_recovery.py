"""Recovery files of the virtio-blk side (the blk kind's codec in the one
store, recovery.py): one JSON file per bdev and one per blk controller, so
that a restarted controller (SIGKILL, crash, stop/start) recreates them with
the same VUID, BDF and socket and a QEMU with ``reconnect=1`` gets its disk
back.

Layout, under the controller's recovery directory (the seed's
``/opt/mellanox/mlnx_virtnet/recovery``)::

    blk/bdevs/<bdev name>.json        {"name", "bdev_type", "block_size", "num_blocks"[, "filename"]}
    blk/controllers/<VUID>.json       {"name", "emulation_manager", "pf_id"[, "vf_id"], "vuid",
                                       "bdf_raw", "bdev", "num_queues", "queue_size", "admin_q",
                                       "force_in_order", "socket"}

A subdirectory, so that the net functions' files (``<VUID>.json`` directly
in the recovery directory, net_recovery.py) stay exactly the seed's: the net
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

Files are written atomically (by the store) when a bdev or controller is
created and removed when it is deleted; a clean shutdown keeps them.
``BlkCodec.load`` reads and checks every file before anything is
created: JSON, the required fields (others are ignored, for files of a later
version), field types and ranges, the identity (a controller's VUID,
BDF and name follow from its pf_id/vf_id and emulation manager, and must
match the file name), and the references (the controller's bdev has a valid
file, no two controllers on one bdev).  Problems come back as the net
loader's RecoveryProblem, with a complete message; the service refuses to
start with them, like a bad net recovery file, and no file is changed.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, ClassVar, Mapping, NamedTuple

from vfe.controller import blk_identity as bi
from vfe.controller.functions import bdf_str
from vfe.controller.recovery import (
    RecoveryError, RecoveryProblem, RecoveryStore, check_bool, check_int, check_str,
)

BLK_SUBDIR = "blk"
BDEV_DIR = f"{BLK_SUBDIR}/bdevs"              # relative to the recovery directory
CONTROLLER_DIR = f"{BLK_SUBDIR}/controllers"
_BLK_VUID_RE = re.compile(r"VBLK[A-Za-z0-9]{1,60}")


def _object(data: Any, required: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise RecoveryError(None, "not a JSON object")
    missing = [f for f in required if f not in data]
    if missing:
        raise RecoveryError(missing[0], f"missing (needed: {', '.join(missing)})")
    return data


@dataclass
class BdevRecord:
    kind: ClassVar[str] = "blk"
    name: str
    bdev_type: str                  # null | malloc | aio
    block_size: int
    num_blocks: int
    filename: str | None = None     # aio only, absolute
    direct: bool = False            # aio only: O_DIRECT (bdev_aio_create --direct)

    @classmethod
    def of(cls, b) -> "BdevRecord":
        """The record of a bdev (bdevs.Bdev; not validated)."""
        return cls(b.name, b.bdev_type, b.block_size, b.num_blocks,
                   b.filename if b.bdev_type == "aio" else None, b.direct)

    @property
    def size_mb(self) -> int:
        return (self.num_blocks * self.block_size) >> 20

    @property
    def file_name(self) -> str:
        return f"{BDEV_DIR}/{self.name}.json"

    def validate(self) -> "BdevRecord":
        if not bi.valid_bdev_name(self.name):
            raise RecoveryError("name", f"{self.name!r} is not a bdev name (letters, digits, _ . : -)")
        if self.bdev_type not in bi.BDEV_TYPES:
            raise RecoveryError("bdev_type", f"{self.bdev_type!r} is not one of {', '.join(bi.BDEV_TYPES)}")
        check_int("block_size", self.block_size, 0)
        if self.block_size not in bi.BLOCK_SIZES:
            raise RecoveryError("block_size", f"{self.block_size} is not one of "
                                              f"{', '.join(map(str, bi.BLOCK_SIZES))}")
        check_int("num_blocks", self.num_blocks, 1)
        total = self.num_blocks * self.block_size
        if total % (1 << 20):
            raise RecoveryError("num_blocks", f"{self.num_blocks} blocks of {self.block_size} bytes "
                                              f"is not a whole number of MiB")
        if self.bdev_type == "aio":
            check_str("filename", self.filename)
            if not os.path.isabs(self.filename):
                raise RecoveryError("filename", f"{self.filename!r} is not an absolute path")
        elif self.filename is not None:
            raise RecoveryError("filename", f"a {self.bdev_type} bdev has no file")
        if self.bdev_type == "malloc" and self.size_mb > bi.MAX_MALLOC_MB:
            raise RecoveryError("num_blocks", f"a malloc bdev of {self.size_mb} MiB is more than "
                                              f"{bi.MAX_MALLOC_MB} MiB")
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
    kind: ClassVar[str] = "blk"
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

    @classmethod
    def of(cls, f) -> "BlkControllerRecord":
        """The record of a blk function (blk_kind.BlkFunction; not validated)."""
        return cls(f.name, f.emulation_manager, f.pf_id, None if f.is_pf else f.vf_id, f.vuid,
                   f.bdf_raw, f.bdev, f.num_queues, f.queue_size, f.admin_q, f.force_in_order,
                   f.socket)

    @property
    def file_name(self) -> str:
        return f"{CONTROLLER_DIR}/{self.vuid}.json"

    def validate(self) -> "BlkControllerRecord":
        m = bi.IB_DEV_RE.fullmatch(self.emulation_manager) if isinstance(self.emulation_manager, str) else None
        if m is None:
            raise RecoveryError("emulation_manager", f"{self.emulation_manager!r} is not mlx5_<n>")
        check_int("pf_id", self.pf_id, 0, bi.MAX_PF_ID)
        if self.vf_id is not None:
            check_int("vf_id", self.vf_id, 0, bi.MAX_VF_ID)
        name, vuid, raw = bi.blk_identity(m.group(1), self.pf_id, -1 if self.vf_id is None else self.vf_id)
        check_str("vuid", self.vuid)
        if self.vuid != vuid:
            raise RecoveryError("vuid", f"{self.vuid!r}, but pf_id {self.pf_id}"
                                        + (f" vf_id {self.vf_id}" if self.vf_id is not None else "")
                                        + f" is {vuid}")
        check_int("bdf_raw", self.bdf_raw, 0, 0xFFFF)
        if self.bdf_raw != raw:
            raise RecoveryError("bdf_raw", f"{self.bdf_raw}, but {vuid} is at {raw} "
                                           f"({bdf_str(raw)})")
        if self.name != name:
            raise RecoveryError("name", f"{self.name!r}, but the controller of {vuid} on "
                                        f"{self.emulation_manager} is {name}")
        if not bi.valid_bdev_name(self.bdev):
            raise RecoveryError("bdev", f"{self.bdev!r} is not a bdev name")
        check_int("num_queues", self.num_queues, 1, bi.BLK_MAX_QUEUES)
        check_int("queue_size", self.queue_size, 2, bi.BLK_MAX_QUEUE_SIZE)
        if self.queue_size & (self.queue_size - 1):
            raise RecoveryError("queue_size", f"{self.queue_size} is not a power of 2")
        check_bool("admin_q", self.admin_q)
        check_bool("force_in_order", self.force_in_order)
        check_str("socket", self.socket)
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


class BlkCodec:
    """The blk kind's records in the store: BdevRecord and BlkControllerRecord."""

    kind = "blk"

    def file_name(self, record: BdevRecord | BlkControllerRecord) -> str:
        if isinstance(record, BdevRecord):
            if not bi.valid_bdev_name(record.name):
                raise RecoveryError("name", f"{record.name!r} is not a bdev name")
        elif not isinstance(record.vuid, str) or not _BLK_VUID_RE.fullmatch(record.vuid):
            raise RecoveryError("vuid", f"{record.vuid!r} is not a blk VUID")
        return record.file_name

    def encode(self, record: BdevRecord | BlkControllerRecord) -> dict:
        return record.validate().to_json()

    def decode(self, file_name: str, data: Any) -> BdevRecord | BlkControllerRecord:
        path = PurePath(file_name)
        if str(path.parent) == BDEV_DIR:
            return BdevRecord.from_json(data, path.stem)
        if str(path.parent) == CONTROLLER_DIR:
            return BlkControllerRecord.from_json(data, path.stem)
        raise RecoveryError(None, f"{file_name} is not a blk recovery file")

    def load(self, store: RecoveryStore) -> BlkLoad:
        """Every valid record, and a problem for every file that is not."""
        problems: list[RecoveryProblem] = []

        def problem(path: Path, key: str | None, what: str, consequence: str) -> RecoveryProblem:
            rel = path.relative_to(store.dir) if path.is_relative_to(store.dir) else path
            return RecoveryProblem(path, key, f"recovery file {rel} {what}; fix it, or delete it ({path}) "
                                              f"and restart: {consequence}")

        def read(path: Path, consequence: str) -> Any:
            rec, what = store.read(path, self.decode)
            if rec is None:
                problems.append(problem(path, path.stem, what, consequence))
            return rec

        bdevs: list[BdevRecord] = []
        for p in store.json_files(BDEV_DIR):
            if not bi.valid_bdev_name(p.stem):
                problems.append(problem(p, None, "is not named <bdev name>.json",
                                        "that bdev is not recreated"))
                continue
            rec = read(p, f"bdev {p.stem} is then not recreated")
            if rec is not None:
                bdevs.append(rec)
        controllers: list[BlkControllerRecord] = []
        for p in store.json_files(CONTROLLER_DIR):
            rec = read(p, f"controller {p.stem} is then not recreated")
            if rec is not None:
                controllers.append(rec)
        # references: every controller's bdev has a (valid) file (several
        # controllers may share one, as when they were made)
        names = {b.name for b in bdevs}
        bdev_dir = store.dir / BDEV_DIR
        bad_bdev_files = {Path(p.path).stem for p in problems if Path(p.path).parent == bdev_dir}
        good: list[BlkControllerRecord] = []
        for c in controllers:
            path = store.dir / c.file_name
            if c.bdev not in names:
                why = ("whose recovery file is invalid" if c.bdev in bad_bdev_files
                       else f"which has no recovery file ({BDEV_DIR}/{c.bdev}.json)")
                problems.append(problem(path, c.vuid, f"names bdev {c.bdev}, {why}",
                                        f"controller {c.vuid} is then not recreated"))
                continue
            good.append(c)
        return BlkLoad(bdevs, good, problems)
