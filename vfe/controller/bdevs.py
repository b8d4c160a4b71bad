"""The block devices (bdevs) behind the virtio-blk functions: a table of
named bdevs and the `spdk_rpc.py bdev_*` verbs of the seed's VFE vDPA part,
served on the controller's RPC socket (vfe-rpc is the CLI).

`null` reads zeros and drops writes, `malloc` is RAM, `aio` a file served
asynchronously by I/O threads (FLUSH is fdatasync; `direct` for O_DIRECT).
A bdev's storage (vfe.engine.BlkBackend: the RAM, the open file) is made
when the bdev is created and shared by every blk function created on it
(blk_kind.py), as SPDK lets several controllers open one bdev: a PF's and
a VF's controller on the same Malloc0 see the same data.  A bdev in use by
a function cannot be deleted (-EBUSY, naming them) -- delete them first.
Every bdev is recorded in the recovery store when created (blk_recovery.py)
and its file removed before it is deleted.
"""
from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field

from vfe.controller.blk_identity import BLOCK_SIZES, MAX_MALLOC_MB, PRODUCT, valid_bdev_name
from vfe.controller.blk_recovery import BdevRecord
from vfe.controller.kind import InventoryError, Method, delete_record, save_record
from vfe.controller.params import int_param, str_param
from vfe.controller.recovery import RecoveryStore
from vfe.engine import BlkBackend
from vfe.engine.bdev_file import probe_backing

log = logging.getLogger("vfe.controller.blk")


@dataclass
class Bdev:
    name: str
    bdev_type: str                  # null | malloc | aio
    size_mb: int
    block_size: int
    filename: str = ""
    direct: bool = False            # aio: O_DIRECT for aligned reads and writes
    storage: BlkBackend | None = field(default=None, repr=False)   # what the functions serve
    users: list[str] = field(default_factory=list)   # the blk functions on it, by name

    @property
    def num_blocks(self) -> int:
        return (self.size_mb << 20) // self.block_size

    def info(self) -> dict:
        """An entry of bdev_get_bdevs, with SPDK's field names; "claimed"
        says it is in use, "claimed_by" by which controllers."""
        out = {"name": self.name, "product_name": PRODUCT[self.bdev_type],
               "block_size": self.block_size, "num_blocks": self.num_blocks,
               "claimed": bool(self.users)}
        if self.users:
            out["claimed_by"] = list(self.users)
        return out


class Bdevs:
    """The bdevs of one controller, by name; each recorded in ``store``."""

    def __init__(self, store: RecoveryStore):
        self.store = store
        self.by_name: dict[str, Bdev] = {}
        self._malloc_seq = 0

    def methods(self) -> dict[str, Method]:
        return {
            "bdev_null_create": self.bdev_null_create,
            "bdev_malloc_create": self.bdev_malloc_create,
            "bdev_aio_create": self.bdev_aio_create,
            "bdev_get_bdevs": self.bdev_get_bdevs,
            "bdev_null_delete": lambda p: self.delete("null", p),
            "bdev_malloc_delete": lambda p: self.delete("malloc", p),
            "bdev_aio_delete": lambda p: self.delete("aio", p),
        }

    # -- creation

    @staticmethod
    def _size(p: dict, block_size: int) -> int:
        """Size in MiB: SPDK's num_blocks, or size_mb; a whole number of MiB."""
        if p.get("num_blocks") is not None:
            nb = int_param(p, "num_blocks", lo=1)
            total = nb * block_size
            if total % (1 << 20):
                raise InventoryError(f"size {total} bytes is not a whole number of MiB")
            return total >> 20
        return int_param(p, "size_mb", lo=1, hi=1 << 20)

    def _check_new_name(self, name: str) -> None:
        if not valid_bdev_name(name):
            raise InventoryError(f"bad bdev name {name!r} (letters, digits, _ . : - ; at most 64)")
        if name in self.by_name:
            raise InventoryError(f"bdev {name} already exists", -errno.EEXIST)

    def _add(self, b: Bdev, save: bool) -> str:
        if save:
            save_record(self.store, f"bdev {b.name}", BdevRecord.of(b))
        self.by_name[b.name] = b
        return b.name

    def _new(self, bdev_type: str, name: str, p: dict, save: bool = True) -> str:
        """A null or malloc bdev."""
        self._check_new_name(name)
        bs = int_param(p, "block_size", 512)
        if bs not in BLOCK_SIZES:
            raise InventoryError(f"block_size must be one of {', '.join(map(str, BLOCK_SIZES))}, not {bs}")
        size_mb = self._size(p, bs)
        if bdev_type == "malloc" and size_mb > MAX_MALLOC_MB:
            raise InventoryError(f"malloc bdev of {size_mb} MiB is too large (at most {MAX_MALLOC_MB} "
                                 f"MiB of RAM)")
        try:
            storage = BlkBackend(bdev_type, size_mb << 20)
        except MemoryError:
            raise InventoryError(f"cannot allocate the {size_mb} MiB of malloc bdev {name}",
                                 -errno.ENOMEM) from None
        self._add(Bdev(name, bdev_type, size_mb, bs, storage=storage), save)
        log.info("bdev %s: %s, %d MiB of %d-byte blocks", name, bdev_type, size_mb, bs)
        return name

    def bdev_null_create(self, p: dict) -> str:
        return self._new("null", str_param(p, "name"), p)

    def bdev_malloc_create(self, p: dict) -> str:
        name = p.get("name")
        if not name:
            while f"Malloc{self._malloc_seq}" in self.by_name:
                self._malloc_seq += 1
            name = f"Malloc{self._malloc_seq}"
        return self._new("malloc", str(name), p)

    def bdev_aio_create(self, p: dict, *, size_mb: int | None = None, save: bool = True) -> str:
        """A file bdev served by I/O threads (FLUSH is fdatasync; `direct`:
        O_DIRECT); its size is the file's, rounded down to MiB (`size_mb`:
        the size recorded at creation, when recovering: the file must still
        have it).  The file name is kept absolute, so a restart from another
        directory finds the same file."""
        filename, name = str_param(p, "filename"), str_param(p, "name")
        self._check_new_name(name)
        bs = int_param(p, "block_size", 512)
        if bs not in BLOCK_SIZES:
            raise InventoryError(f"block size {bs} is not one of {', '.join(map(str, BLOCK_SIZES))}",
                                 -errno.EINVAL)
        filename = os.path.abspath(filename)
        direct = p.get("direct", False)
        if not isinstance(direct, bool):
            raise InventoryError("direct must be true or false", -errno.EINVAL)
        try:                # a regular file or a block device, not through a symlink
            size = probe_backing(filename)
            if size < 1 << 20:
                raise InventoryError(f"{filename} is smaller than 1 MiB", -errno.EINVAL)
            if size_mb is not None and size >> 20 < size_mb:
                raise InventoryError(f"{filename} is {size >> 20} MiB, smaller than the {size_mb} MiB "
                                     f"the bdev had", -errno.EINVAL)
            size_mb = size >> 20 if size_mb is None else size_mb
            # opened once, here: every function on the bdev serves this very file
            storage = BlkBackend("file", size_mb << 20, filename, direct)
        except OSError as exc:
            raise InventoryError(f"cannot use {exc.strerror}", -(exc.errno or errno.EIO)) from None
        self._add(Bdev(name, "aio", size_mb, bs, filename=filename, direct=direct, storage=storage), save)
        log.info("bdev %s: file %s, %d MiB of %d-byte blocks%s", name, filename, size_mb, bs,
                 ", O_DIRECT" if direct else "")
        return name

    # -- the rest

    def bdev_get_bdevs(self, p: dict) -> list:
        name = p.get("name")
        if name:
            if name not in self.by_name:
                raise InventoryError(f"bdev {name} not found", -errno.ENODEV)
            return [self.by_name[name].info()]
        return [b.info() for b in self.by_name.values()]

    def delete(self, bdev_type: str, p: dict) -> bool:
        """bdev_<type>_delete."""
        name = str_param(p, "name")
        b = self.by_name.get(name)
        if b is None:
            raise InventoryError(f"bdev {name} not found", -errno.ENODEV)
        if b.bdev_type != bdev_type:
            raise InventoryError(f"bdev {name} is a {b.bdev_type} bdev, not {bdev_type}: use "
                                 f"bdev_{b.bdev_type}_delete", -errno.ENODEV)
        if b.users:
            what = (f"controller {b.users[0]}; delete it first" if len(b.users) == 1 else
                    f"controllers {', '.join(b.users)}; delete them first")
            raise InventoryError(f"bdev {name} is in use by {what} (controller_virtio_blk_delete "
                                 f"{' / '.join(b.users)})", -errno.EBUSY)
        delete_record(self.store, f"bdev {name}", BdevRecord.of(b))
        del self.by_name[name]
        b.storage = None            # the RAM is freed, the file closed (no function holds them)
        log.info("bdev %s deleted", name)
        return True

    def malloc_names(self) -> list[str]:
        """The malloc bdevs (their data lives in this process only)."""
        return sorted(n for n, b in self.by_name.items() if b.bdev_type == "malloc")

    def restore(self, records: list[BdevRecord]) -> int:
        """Recreate recorded bdevs (already checked), without rewriting their
        files; one that cannot be (an aio file gone or shrunk) is logged and
        skipped, its file kept.  Returns how many were recreated."""
        n = 0
        for r in records:
            try:
                if r.bdev_type == "aio":
                    self.bdev_aio_create({"name": r.name, "filename": r.filename, "direct": r.direct,
                                          "block_size": r.block_size}, size_mb=r.size_mb, save=False)
                else:
                    self._new(r.bdev_type, r.name, {"num_blocks": r.num_blocks,
                                                    "block_size": r.block_size}, save=False)
            except (InventoryError, OSError, ValueError) as exc:
                log.error("bdev %s: cannot recover: %s", r.name, exc)
                continue
            n += 1
            if r.bdev_type == "malloc":
                log.warning("bdev %s: recovered EMPTY: a malloc bdev's contents do not survive a "
                            "controller restart (%d MiB of zeros now)", r.name, r.size_mb)
            else:
                log.info("bdev %s: recovered", r.name)
        return n
