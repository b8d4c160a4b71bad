"""Emulated virtio-blk functions and the block devices (bdevs) behind them:
the `spdk_rpc.py bdev_*` and `snap_rpc.py controller_*` verbs of the seed's
VFE vDPA part, served on the controller's RPC socket (vfe-rpc is the CLI).

Bdevs.  A registry of named block devices: `null` (reads zeros, drops
writes), `malloc` (RAM) and `aio` (a file, served asynchronously by I/O
threads; FLUSH is fdatasync; `direct` for O_DIRECT).
A bdev is *claimed* by the one blk function created on it; a claimed
bdev cannot be deleted (-EBUSY) -- delete the function first.

Blk functions.  `controller_virtio_blk_create IB_DEV --pf_id N [--vf_id M]
--bdev_type spdk --bdev NAME` makes a BlkDeviceModel on the bdev and serves
it on a vhost-user socket `<run_dir>/<VUID>.sock` through the daemon, like a
virtio-net function.  Identity (our convention, mirroring functions.py):

    PF  pf_id N   VUID VBLKS0D<d>F<f>, d,f = divmod(N + 2, 8)   (VBLKS0D0F2 for PF 0)
                  BDF  (0xA0 + N):00.0                          (a0:00.0 for PF 0)
    VF  vf_id M   VUID <the PF's VUID>VF<M + 1>                 (VBLKS0D0F2VF1)
                  BDF  (0xB0 + N):<d>.<f>, d,f = divmod(M, 8)   (b0:00.0 for VF 0 of PF 0)

so PF ids 0..15 and VF ids 0..127; the buses (0xA0..0xBF) are clear of the
net functions' (0x84 static PFs, 0x85.. hot-plug ports, 0x90.. net VFs).
The `VBLK` prefix keeps blk VUIDs apart from the net ones (`VNET...`).  The
emulation manager (IB_DEV, `mlx5_<n>`) is recorded; (pf_id, vf_id) is unique
across managers.  A VF does not need a blk PF to exist.  The controller name
is SNAP's: VblkEmu<n>pf<N> / VblkEmu<n>pf<N>vf<M>, <n> from mlx5_<n>.

`--admin_q` and `--force_in_order` are accepted and shown by controller_list;
the engine's blk queues already complete each queue's requests in order.

In the inventory.  A blk function has a `virtnet list` entry
(BlkFunction.list_entry: the net entries' identity fields, then
"type": "virtio_blk" and blk_* fields; docs/virtnet.md) and is found by
`virtnet query -u VUID`; `register` wraps the service's list, query,
modify, unplug and vf_state handlers for that.

Recovery.  With a blk_recovery.BlkRecoveryStore every bdev and function is
recorded when created (a function's file last, as for net functions: a
failure to write it undoes the creation) and its file removed before it is
deleted; `restore()` recreates them at start (docs/controller.md).

`register(handlers, daemon, paths, store=None)` adds the RPC methods to a
service's handler table (handlers are called `fn(inv, params)`; the
inventory argument is unused by the vfe-rpc verbs) and returns the
BlkRegistry; its `shutdown()` (also hooked on `daemon.on_shutdown`,
idempotent) closes every blk function and keeps their files.
"""
from __future__ import annotations

import errno
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

from vfe.controller.functions import bdf_raw, bdf_str
from vfe.controller.inventory import InventoryError

log = logging.getLogger("vfe.controller.blk")

BLK_PF_BUS = 0xA0
BLK_VF_BUS = 0xB0
BLK_PF_FIRST_FN = 2
MAX_PF_ID = 15
MAX_VF_ID = 127
MAX_QUEUES = 64
MAX_QUEUE_SIZE = 1024
DEFAULT_QUEUE_SIZE = 128
BLOCK_SIZES = (512, 1024, 2048, 4096)
MAX_MALLOC_MB = 16384
KINDS = ("null", "malloc", "aio")
PRODUCT = {"null": "Null disk", "malloc": "Malloc disk", "aio": "AIO disk"}
# names from RPC and recovery files: always fullmatch() (`$` would also
# match before a trailing newline)
IB_DEV_RE = _IB_DEV = re.compile(r"mlx5_(\d+)")
NAME_RE = _NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def err(message: str, code: int = -errno.EINVAL) -> InventoryError:
    return InventoryError(message, code)


def blk_pf_location(pf_id: int) -> tuple[str, int]:
    dev, fn = divmod(BLK_PF_FIRST_FN + pf_id, 8)
    return f"VBLKS0D{dev}F{fn}", bdf_raw(BLK_PF_BUS + pf_id, 0, 0)


def blk_vf_location(pf_id: int, vf_id: int) -> tuple[str, int]:
    pf_vuid, _ = blk_pf_location(pf_id)
    dev, fn = divmod(vf_id, 8)
    return f"{pf_vuid}VF{vf_id + 1}", bdf_raw(BLK_VF_BUS + pf_id, dev, fn)


def blk_identity(manager_index: str | int, pf_id: int, vf_id: int) -> tuple[str, str, int]:
    """(controller name, VUID, bdf_raw) of the blk function (pf_id, vf_id;
    -1 for the PF) on emulation manager mlx5_<manager_index>."""
    if vf_id < 0:
        vuid, raw = blk_pf_location(pf_id)
        return f"VblkEmu{manager_index}pf{pf_id}", vuid, raw
    vuid, raw = blk_vf_location(pf_id, vf_id)
    return f"VblkEmu{manager_index}pf{pf_id}vf{vf_id}", vuid, raw


@dataclass
class Bdev:
    name: str
    kind: str                       # null | malloc | aio
    size_mb: int
    block_size: int
    filename: str = ""
    direct: bool = False            # aio: O_DIRECT for aligned reads and writes
    claimed_by: str | None = None   # the blk function's name

    @property
    def num_blocks(self) -> int:
        return (self.size_mb << 20) // self.block_size

    def recovery_record(self):
        from vfe.controller.blk_recovery import BdevRecord
        return BdevRecord(self.name, self.kind, self.block_size, self.num_blocks,
                          self.filename if self.kind == "aio" else None, self.direct)

    def info(self) -> dict:
        """An entry of bdev_get_bdevs, with SPDK's field names."""
        out = {"name": self.name, "product_name": PRODUCT[self.kind],
               "block_size": self.block_size, "num_blocks": self.num_blocks,
               "claimed": self.claimed_by is not None}
        if self.claimed_by is not None:
            out["claimed_by"] = self.claimed_by
        return out


@dataclass
class BlkFunction:
    name: str
    emulation_manager: str
    pf_id: int
    vf_id: int                      # -1 for a PF
    vuid: str
    bdf_raw: int
    bdev: str
    num_queues: int
    queue_size: int
    admin_q: bool
    force_in_order: bool
    socket: str
    model: Any = field(default=None, repr=False)
    endpoint: Any = field(default=None, repr=False)
    # the bdev as served (for virtnet list)
    bdev_type: str = ""
    block_size: int = 0
    num_blocks: int = 0

    @property
    def bdf(self) -> str:
        return bdf_str(self.bdf_raw)

    @property
    def is_pf(self) -> bool:
        return self.vf_id < 0

    def list_entry(self) -> dict:
        """The function's `virtnet list` entry: the net entries' identity
        fields with the same names and meanings (pf_id or vf_id +
        parent_pf_id, function_type, vuid, bdf, max_queues,
        max_queues_size), then "type": "virtio_blk" (net entries have no
        "type") and the blk_* fields."""
        head: dict[str, Any] = ({"pf_id": self.pf_id} if self.is_pf
                                else {"vf_id": self.vf_id, "parent_pf_id": self.pf_id})
        return head | {
            "function_type": "static PF" if self.is_pf else "VF",
            "vuid": self.vuid,
            "bdf": self.bdf,
            "type": "virtio_blk",
            "emulation_manager": self.emulation_manager,
            "max_queues": self.num_queues,
            "max_queues_size": self.queue_size,
            "blk_controller": self.name,
            "blk_bdev": self.bdev,
            "blk_bdev_type": self.bdev_type,
            "blk_block_size": self.block_size,
            "blk_num_blocks": self.num_blocks,
        }

    def recovery_record(self):
        from vfe.controller.blk_recovery import BlkControllerRecord
        return BlkControllerRecord(self.name, self.emulation_manager, self.pf_id,
                                   None if self.is_pf else self.vf_id, self.vuid, self.bdf_raw,
                                   self.bdev, self.num_queues, self.queue_size, self.admin_q,
                                   self.force_in_order, self.socket)

    def bound(self) -> bool:
        ep = self.endpoint
        return ep is not None and ep.session is not None and bool(ep.session.started)

    def entry(self) -> dict:
        return {"name": self.name, "emulation_manager": self.emulation_manager,
                "type": "virtio_blk", "function_type": "PF" if self.vf_id < 0 else "VF",
                "pf_id": self.pf_id, "vf_id": self.vf_id, "vuid": self.vuid,
                "pci_bdf": self.bdf, "bdev_type": "spdk", "bdev": self.bdev,
                "num_queues": self.num_queues, "queue_size": self.queue_size,
                "admin_q": self.admin_q, "force_in_order": self.force_in_order,
                "socket": self.socket, "bound": self.bound()}


# -- parameter helpers ---------------------------------------------------------

def _int(p: dict, key: str, default: Any = None, *, lo: int | None = None, hi: int | None = None):
    v = p.get(key, default)
    if v is None:
        if default is None:
            raise err(f"missing parameter {key}")
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        try:
            v = int(str(v), 0)
        except ValueError:
            raise err(f"{key} must be an integer, not {v!r}") from None
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise err(f"{key} {v} out of range {lo}..{hi}")
    return v


def _str(p: dict, key: str, default: str | None = None) -> str:
    v = p.get(key, default)
    if v is None or v == "":
        raise err(f"missing parameter {key}")
    if not isinstance(v, str):
        raise err(f"{key} must be a string")
    return v


def _bool(p: dict, key: str) -> bool:
    v = p.get(key, False)
    if not isinstance(v, bool):
        raise err(f"{key} must be true or false")
    return v


class BlkRegistry:
    """The bdevs and blk functions of one controller.  With a `store`
    (blk_recovery.BlkRecoveryStore) every bdev and function is recorded
    when created and forgotten when deleted, and `restore()` brings them
    back at start."""

    def __init__(self, daemon, paths, store=None):
        self.daemon = daemon
        self.paths = paths
        self.store = store
        self.bdevs: dict[str, Bdev] = {}
        self.functions: dict[str, BlkFunction] = {}     # by controller name
        self._malloc_seq = 0

    # -- recovery files
    def _record(self, what: str, save) -> None:
        """Write a recovery file; a failure is the user's error (disk full,
        permissions), reported as such."""
        if self.store is None:
            return
        try:
            save()
        except OSError as exc:
            raise err(f"{what}: cannot write its recovery file: {exc}", -(exc.errno or errno.EIO)) from None

    def _forget(self, what: str, delete) -> None:
        """Remove a recovery file before the thing it records goes, so that
        a failure leaves both."""
        if self.store is None:
            return
        try:
            delete()
        except OSError as exc:
            raise err(f"{what}: cannot remove its recovery file: {exc}", -(exc.errno or errno.EIO)) from None

    # -- bdevs
    def _size(self, p: dict, block_size: int) -> int:
        """Size in MiB: SPDK's num_blocks, or size_mb; a whole number of MiB."""
        if p.get("num_blocks") is not None:
            nb = _int(p, "num_blocks", lo=1)
            total = nb * block_size
            if total % (1 << 20):
                raise err(f"size {total} bytes is not a whole number of MiB")
            return total >> 20
        return _int(p, "size_mb", lo=1, hi=1 << 20)

    @staticmethod
    def _check_name(name: str) -> None:
        if not _NAME.fullmatch(name) or name in (".", ".."):
            raise err(f"bad bdev name {name!r} (letters, digits, _ . : - ; at most 64)")

    def _add_bdev(self, b: Bdev, save: bool) -> str:
        if save:
            self._record(f"bdev {b.name}", lambda: self.store.save_bdev(b.recovery_record()))
        self.bdevs[b.name] = b
        return b.name

    def _new_bdev(self, kind: str, name: str, p: dict, save: bool = True) -> str:
        self._check_name(name)
        if name in self.bdevs:
            raise err(f"bdev {name} already exists", -errno.EEXIST)
        bs = _int(p, "block_size", 512)
        if bs not in BLOCK_SIZES:
            raise err(f"block_size must be one of {', '.join(map(str, BLOCK_SIZES))}, not {bs}")
        size_mb = self._size(p, bs)
        if kind == "malloc" and size_mb > MAX_MALLOC_MB:
            raise err(f"malloc bdev of {size_mb} MiB is too large (at most {MAX_MALLOC_MB} MiB of RAM)")
        self._add_bdev(Bdev(name, kind, size_mb, bs), save)
        log.info("bdev %s: %s, %d MiB of %d-byte blocks", name, kind, size_mb, bs)
        return name

    def bdev_null_create(self, p: dict) -> str:
        return self._new_bdev("null", _str(p, "name"), p)

    def bdev_malloc_create(self, p: dict) -> str:
        name = p.get("name")
        if not name:
            while f"Malloc{self._malloc_seq}" in self.bdevs:
                self._malloc_seq += 1
            name = f"Malloc{self._malloc_seq}"
        return self._new_bdev("malloc", str(name), p)

    def bdev_aio_create(self, p: dict, *, size_mb: int | None = None, save: bool = True) -> str:
        """A file bdev served by I/O threads (FLUSH is fdatasync; `direct`:
        O_DIRECT); its size is the file's, rounded down to MiB (`size_mb`:
        the size recorded at creation, when recovering: the file must still
        have it).  The file name is kept absolute, so a restart from another
        directory finds the same file."""
        filename, name = _str(p, "filename"), _str(p, "name")
        self._check_name(name)
        if name in self.bdevs:
            raise err(f"bdev {name} already exists", -errno.EEXIST)
        bs = _int(p, "block_size", 512)
        if bs not in BLOCK_SIZES:
            raise err(f"block size {bs} is not one of {', '.join(map(str, BLOCK_SIZES))}", -errno.EINVAL)
        filename = os.path.abspath(filename)
        from vfe.engine.bdev_file import probe_backing
        try:                # a regular file or a block device, not through a symlink
            size = probe_backing(filename)
        except OSError as exc:
            raise err(f"cannot use {exc.strerror}", -(exc.errno or errno.EIO)) from None
        if size < 1 << 20:
            raise err(f"{filename} is smaller than 1 MiB", -errno.EINVAL)
        if size_mb is not None and size >> 20 < size_mb:
            raise err(f"{filename} is {size >> 20} MiB, smaller than the {size_mb} MiB the bdev had",
                      -errno.EINVAL)
        size_mb = size >> 20 if size_mb is None else size_mb
        direct = p.get("direct", False)
        if not isinstance(direct, bool):
            raise err("direct must be true or false", -errno.EINVAL)
        self._add_bdev(Bdev(name, "aio", size_mb, bs, filename=filename, direct=direct), save)
        log.info("bdev %s: file %s, %d MiB of %d-byte blocks%s", name, filename, size_mb, bs,
                 ", O_DIRECT" if direct else "")
        return name

    def bdev_get_bdevs(self, p: dict) -> list:
        name = p.get("name")
        if name:
            if name not in self.bdevs:
                raise err(f"bdev {name} not found", -errno.ENODEV)
            return [self.bdevs[name].info()]
        return [b.info() for b in self.bdevs.values()]

    def _delete_bdev(self, kind: str, p: dict) -> bool:
        name = _str(p, "name")
        b = self.bdevs.get(name)
        if b is None:
            raise err(f"bdev {name} not found", -errno.ENODEV)
        if b.kind != kind:
            raise err(f"bdev {name} is a {b.kind} bdev, not {kind}: use bdev_{b.kind}_delete",
                      -errno.ENODEV)
        if b.claimed_by is not None:
            raise err(f"bdev {name} is in use by controller {b.claimed_by}; "
                      f"delete it first (controller_virtio_blk_delete {b.claimed_by})", -errno.EBUSY)
        self._forget(f"bdev {name}", lambda: self.store.delete_bdev(name))
        del self.bdevs[name]
        log.info("bdev %s deleted", name)
        return True

    # -- functions
    def controller_virtio_blk_create(self, p: dict, *, save: bool = True) -> dict:
        from vfe.devices.blk import BlkConfig, BlkDeviceModel

        ib = _str(p, "emu_manager")
        m = _IB_DEV.fullmatch(ib)
        if not m:
            raise err(f"no emulation manager {ib!r} (expected mlx5_<n>, e.g. mlx5_0)", -errno.ENODEV)
        pf_id = _int(p, "pf_id", lo=0, hi=MAX_PF_ID)
        vf_id = p.get("vf_id")
        vf_id = -1 if vf_id is None else _int(p, "vf_id", lo=0, hi=MAX_VF_ID)
        bdev_type = p.get("bdev_type", "spdk")
        if bdev_type != "spdk":
            raise err(f"bdev_type {bdev_type!r} is not supported (only spdk)", -errno.EOPNOTSUPP)
        bdev_name = _str(p, "bdev")
        nq = _int(p, "num_queues", 1, lo=1, hi=MAX_QUEUES)
        qs = _int(p, "queue_size", DEFAULT_QUEUE_SIZE, lo=2, hi=MAX_QUEUE_SIZE)
        if qs & (qs - 1):
            raise err(f"queue_size must be a power of 2, not {qs}")
        admin_q, in_order = _bool(p, "admin_q"), _bool(p, "force_in_order")

        b = self.bdevs.get(bdev_name)
        if b is None:
            raise err(f"bdev {bdev_name} not found (create it with bdev_null_create or "
                      f"bdev_malloc_create)", -errno.ENODEV)
        if b.claimed_by is not None:
            raise err(f"bdev {bdev_name} is already used by controller {b.claimed_by}", -errno.EBUSY)
        for f in self.functions.values():
            if f.pf_id == pf_id and f.vf_id == vf_id:
                what = f"pf_id {pf_id}" + (f" vf_id {vf_id}" if vf_id >= 0 else "")
                raise err(f"a blk controller for {what} already exists: {f.name}", -errno.EEXIST)

        name, vuid, raw = blk_identity(m.group(1), pf_id, vf_id)
        sock = os.path.join(os.fspath(self.paths.run_dir), f"{vuid}.sock")
        if len(os.fsencode(sock)) > 107:
            raise err(f"socket path {sock} is longer than 107 bytes; use a shorter run dir",
                      -errno.ENAMETOOLONG)
        cfg = BlkConfig(socket=sock, bdev="file" if b.kind == "aio" else b.kind, path=b.filename,
                        direct=b.direct,
                        size_mb=b.size_mb, block_size=b.block_size,
                        queues=nq, queue_size=qs, serial=b.name[:20], name=vuid)
        f = BlkFunction(name, ib, pf_id, vf_id, vuid, raw, b.name, nq, qs, admin_q, in_order,
                        sock, bdev_type=b.kind, block_size=b.block_size, num_blocks=b.num_blocks)
        try:
            f.model = BlkDeviceModel(self.daemon.engine, cfg)
        except OSError as exc:        # its file shrank, was replaced by a symlink or a FIFO...
            raise err(f"cannot create the blk device on {bdev_name}: {exc.strerror or exc}",
                      -(exc.errno or errno.EIO)) from None
        except (ValueError, MemoryError) as exc:
            raise err(f"cannot create the blk device on {bdev_name}: {exc}", -errno.ENOMEM) from None
        try:
            f.endpoint = self.daemon.add_endpoint(f.model, sock, False, vuid)
        except OSError as exc:
            f.model.close()
            raise err(f"cannot listen on {sock}: {exc.strerror or exc}", -(exc.errno or errno.EIO)) from None
        if save:             # the last step, as for a net function: a failure undoes the rest
            try:
                self._record(name, lambda: self.store.save_controller(f.recovery_record()))
            except BaseException:
                self._close(f)
                raise
        self.functions[name] = f
        b.claimed_by = name
        log.info("%s: virtio-blk %s %s on bdev %s, %d queue(s) of %d, socket %s",
                 name, vuid, f.bdf, b.name, nq, qs, sock)
        return {"name": name, "vuid": vuid, "pci_bdf": f.bdf, "socket": sock}

    def _find(self, key: str) -> BlkFunction:
        f = self.functions.get(key)
        if f is None:
            f = next((x for x in self.functions.values() if x.vuid == key), None)
        if f is None:
            raise err(f"no blk controller {key}", -errno.ENODEV)
        return f

    def by_vuid(self, vuid) -> BlkFunction | None:
        return next((f for f in self.functions.values() if f.vuid == vuid), None)

    def sorted_functions(self) -> list[BlkFunction]:
        """PFs, then VFs, by (pf_id, vf_id): the order of `virtnet list`."""
        return sorted(self.functions.values(), key=lambda f: (f.vf_id >= 0, f.pf_id, f.vf_id))

    def controller_list(self, p: dict) -> list:
        key = p.get("name") or p.get("vuid")
        if key:
            return [self._find(key).entry()]
        return [f.entry() for f in self.functions.values()]

    def controller_virtio_blk_delete(self, p: dict) -> bool:
        key = p.get("name") or p.get("vuid")
        if not key:
            raise err("missing parameter name")
        f = self._find(str(key))
        if f.bound() and not _bool(p, "force"):
            raise err(f"{f.name} is in use by a guest driver; stop it first or delete with force",
                      -errno.EBUSY)
        self._forget(f.name, lambda: self.store.delete_controller(f.vuid))
        self._close(f)
        log.info("%s: deleted", f.name)
        return True

    def _close(self, f: BlkFunction) -> None:
        self.functions.pop(f.name, None)
        if f.endpoint is not None:
            try:
                self.daemon.remove_endpoint(f.endpoint)
            except Exception:                          # keep closing the rest
                log.exception("%s: removing its endpoint", f.name)
            f.endpoint = None
        if f.model is not None:
            try:
                f.model.close()
            except Exception:
                log.exception("%s: closing its device", f.name)
            f.model = None
        b = self.bdevs.get(f.bdev)
        if b is not None and b.claimed_by == f.name:
            b.claimed_by = None

    def shutdown(self) -> None:
        """Close every function (a stop: the recovery files stay)."""
        for f in list(self.functions.values()):
            self._close(f)

    # -- recovery
    def restore(self, loaded) -> tuple[int, int]:
        """Recreate the bdevs and controllers of a blk_recovery.BlkLoad
        (already checked), without rewriting their files.  One that cannot
        be recreated (an aio file gone or shrunk, a socket that cannot be
        served) is logged and skipped; its file stays for the next start.
        Returns (bdevs, controllers) recreated."""
        nb = 0
        for r in loaded.bdevs:
            try:
                if r.bdev_type == "aio":
                    self.bdev_aio_create({"name": r.name, "filename": r.filename, "direct": r.direct,
                                          "block_size": r.block_size}, size_mb=r.size_mb, save=False)
                else:
                    self._new_bdev(r.bdev_type, r.name, {"num_blocks": r.num_blocks,
                                                         "block_size": r.block_size}, save=False)
            except (InventoryError, OSError, ValueError) as exc:
                log.error("bdev %s: cannot recover: %s", r.name, exc)
                continue
            nb += 1
            if r.bdev_type == "malloc":
                log.warning("bdev %s: recovered EMPTY: a malloc bdev's contents do not survive a "
                            "controller restart (%d MiB of zeros now)", r.name, r.size_mb)
            else:
                log.info("bdev %s: recovered", r.name)
        nc = 0
        for r in loaded.controllers:
            if r.bdev not in self.bdevs:
                log.error("%s: cannot recover %s: its bdev %s was not recreated", r.vuid, r.name, r.bdev)
                continue
            try:
                made = self.controller_virtio_blk_create(r.create_params(), save=False)
            except (InventoryError, OSError, ValueError) as exc:
                log.error("%s: cannot recover %s: %s", r.vuid, r.name, exc)
                continue
            nc += 1
            if made["socket"] != r.socket:
                log.warning("%s: recovered on %s (it was %s: the run dir changed)", r.vuid,
                            made["socket"], r.socket)
            log.info("%s: recovered %s (%s, bdev %s, socket %s)", r.vuid, r.name, made["pci_bdf"],
                     r.bdev, made["socket"])
        return nb, nc

    # -- the RPC table
    def methods(self) -> dict:
        return {
            "bdev_null_create": self.bdev_null_create,
            "bdev_malloc_create": self.bdev_malloc_create,
            "bdev_aio_create": self.bdev_aio_create,
            "bdev_get_bdevs": self.bdev_get_bdevs,
            "bdev_null_delete": lambda p: self._delete_bdev("null", p),
            "bdev_malloc_delete": lambda p: self._delete_bdev("malloc", p),
            "bdev_aio_delete": lambda p: self._delete_bdev("aio", p),
            "controller_virtio_blk_create": self.controller_virtio_blk_create,
            "controller_list": self.controller_list,
            "controller_virtio_blk_delete": self.controller_virtio_blk_delete,
        }


# -- blk functions in the virtnet commands --------------------------------------

NOT_NET = ("{vuid} is a virtio-blk function ({name}): virtnet {cmd} manages virtio-net functions; "
           "{hint}")
HINTS = {"modify": "a blk function is changed by deleting and re-creating it "
                   "(vfe-rpc controller_virtio_blk_delete / controller_virtio_blk_create)",
         "unplug": "delete it with vfe-rpc controller_virtio_blk_delete {name}"}
VF_STATE_STATUS = 6


def _inventory_wrappers(handlers: dict, reg: BlkRegistry) -> None:
    """Blk functions in the `virtnet` methods: `list` and `query` show them
    after the net functions (query: by VUID, or all with -a; -p/-v name net
    functions only, as a blk PF and a net PF may have the same index),
    `modify`/`unplug` of a blk VUID say what to use instead, `vf_state`
    (vhostmgmt vf -d) answers the status (6) and refuses the rest."""
    orig = {k: handlers[k] for k in ("list", "query", "modify", "unplug", "vf_state") if k in handlers}

    def blk_target(p) -> BlkFunction | None:
        vuid = p.get("vuid") if isinstance(p, dict) else None
        return reg.by_vuid(vuid) if vuid else None

    def query_one(inv, f: BlkFunction, brief: bool) -> dict:
        return inv._query_one(f, brief)          # the same fields as a net function's

    if "list" in orig:
        def list_(inv, p):
            out = orig["list"](inv, p)
            out["devices"] = list(out.get("devices", [])) + [f.list_entry() for f in reg.sorted_functions()]
            return out
        handlers["list"] = list_

    if "query" in orig:
        def query(inv, p):
            brief = bool(p.get("brief"))
            f = blk_target(p)
            if f is not None:
                return {"devices": [query_one(inv, f, brief)]}
            out = orig["query"](inv, p)
            if p.get("all"):
                out["devices"] = list(out.get("devices", [])) + [query_one(inv, f, brief)
                                                                 for f in reg.sorted_functions()]
            return out
        handlers["query"] = query

    for cmd in ("modify", "unplug"):
        if cmd in orig:
            def refuse(inv, p, cmd=cmd):
                f = blk_target(p)
                if f is not None:
                    raise err(NOT_NET.format(vuid=f.vuid, name=f.name, cmd=cmd,
                                             hint=HINTS[cmd].format(name=f.name)), -errno.EOPNOTSUPP)
                return orig[cmd](inv, p)
            handlers[cmd] = refuse

    if "vf_state" in orig:
        def vf_state(inv, p):
            f = blk_target(p)
            if f is None:
                return orig["vf_state"](inv, p)
            op = _int(p, "op", VF_STATE_STATUS)
            if op != VF_STATE_STATUS:
                raise err(f"{f.vuid}: device operation {op} (quiesce, freeze, dirty logging) is not "
                          f"supported for virtio-blk functions yet; only 6 (status)", -errno.EOPNOTSUPP)
            rings = f.model.rings if f.model is not None else None
            return {"vuid": f.vuid, "bdf": f.bdf, "state": "running",
                    "logging": bool(getattr(rings, "logging", False)), "log_size": 0}
        handlers["vf_state"] = vf_state


def register(handlers: dict, daemon, paths, store=None) -> BlkRegistry:
    """Add the bdev and blk-controller methods to `handlers` (service.py's
    table: called `fn(inv, params)`), and the blk functions to its `list`,
    `query`, `modify`, `unplug` and `vf_state` (when there); `store` (a
    blk_recovery.BlkRecoveryStore) records them.  The registry's shutdown
    runs at the daemon's shutdown."""
    reg = BlkRegistry(daemon, paths, store)

    def wrap(fn):
        def handler(_inv, params):
            if params is None:
                params = {}
            if not isinstance(params, dict):
                raise err("params must be an object")
            return fn(params)
        return handler

    for method, fn in reg.methods().items():
        handlers[method] = wrap(fn)
    _inventory_wrappers(handlers, reg)
    hooks = getattr(daemon, "on_shutdown", None)
    if isinstance(hooks, list):
        hooks.append(reg.shutdown)
    return reg
