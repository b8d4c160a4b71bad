"""The virtio-blk kind of function: the `snap_rpc.py controller_*` verbs of
the seed's VFE vDPA part (and, through bdevs.py, the `bdev_*` ones), served on
the controller's RPC socket (vfe-rpc is the CLI), and what `virtnet` does with
a blk function.

`controller_virtio_blk_create IB_DEV --pf_id N [--vf_id M] --bdev_type spdk
--bdev NAME` makes a BlkDeviceModel on the bdev and serves it on a vhost-user
socket `<run_dir>/<VUID>.sock` through the daemon, like a virtio-net
function; its identity (VUID, BDF, controller name) is blk_identity.py's.
The emulation manager (IB_DEV, `mlx5_<n>`) is recorded; (pf_id, vf_id) is
unique across managers.  A VF does not need a blk PF to exist.  Several
functions may serve one bdev (its storage is shared: bdevs.py).

The firmware decides what may exist (nvconfig.BlkLimits, as for the net
functions): nothing without VIRTIO_BLK_EMULATION_ENABLE, pf_id below
VIRTIO_BLK_EMULATION_NUM_PF, vf_id below VIRTIO_BLK_EMULATION_NUM_VF (with
SRIOV_EN), and as many queues as MSI-X vectors less one
(VIRTIO_BLK_EMULATION_NUM_MSIX, and NUM_VF_MSIX for a VF) -- which is also
the default `--num_queues`, so a QEMU asking fewer (the seed's num-queues=4)
gets them.  A QEMU asking more closes the connection after GET_QUEUE_NUM;
the function's log line then names `--num_queues` (DeviceSpec.queues_hint).
`--admin_q` is accepted and shown by controller_list; `--force_in_order`
makes each queue answer in the order it took requests (a file bdev's I/O
threads finish them in any order).

In `virtnet`.  A blk function has a `virtnet list` entry (BlkFunction.list_entry:
the net entries' identity fields, then "type": "virtio_blk" and blk_* fields;
docs/virtnet.md), listed after the net functions, PFs first; `virtnet query
-u VUID` (or -a) shows it with the net functions' query fields; `virtnet
modify`/`unplug` of it say what to use instead, and vhostmgmt's device
operation answers the status (6) only.  virtnet's -p/-v name net functions
only: a blk PF and a net PF may have the same index.

Recovery.  Every bdev and function is recorded when created (a function's
file last, as for net functions: a failure to write it undoes the creation)
and its file removed before it is deleted; `restore()` recreates them at
start (blk_recovery.py, docs/controller.md).  `shutdown()` closes every blk
function and keeps their files.
"""
from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

from vfe.controller.bdevs import Bdevs
from vfe.controller.blk_identity import (
    BLK_MAX_QUEUE_SIZE, BLK_MAX_QUEUES, DEFAULT_QUEUE_SIZE, IB_DEV_RE, MAX_PF_ID, MAX_VF_ID,
    blk_identity,
)
from vfe.controller.blk_recovery import BlkCodec, BlkControllerRecord, BlkLoad
from vfe.controller.functions import PciIdentity
from vfe.controller.kind import (
    VF_STATE_STATUS, InventoryError, Method, Undo, delete_record, driver_bound, list_head, query_entry,
    save_record,
)
from vfe.controller.nvconfig import DEFAULT_DEVICE, BlkLimits
from vfe.controller.params import bool_param, int_param, str_param
from vfe.controller.recovery import RecoveryStore
from vfe.devices.blk import BlkConfig, BlkDeviceModel
from vfe.safepath import SUN_PATH_MAX, SocketPathTooLong

log = logging.getLogger("vfe.controller.blk")

NOT_NET = ("{vuid} is a virtio-blk function ({name}): virtnet {cmd} manages virtio-net functions; "
           "{hint}")
HINTS = {"modify": "a blk function is changed by deleting and re-creating it "
                   "(vfe-rpc controller_virtio_blk_delete / controller_virtio_blk_create)",
         "unplug": "delete it with vfe-rpc controller_virtio_blk_delete {name}"}


@dataclass
class BlkFunction(PciIdentity):
    kind: ClassVar[str] = "blk"
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

    def list_entry(self) -> dict:
        """The function's `virtnet list` entry: the net entries' identity
        fields with the same names and meanings (pf_id or vf_id +
        parent_pf_id, function_type, vuid, bdf, max_queues,
        max_queues_size), then "type": "virtio_blk" (net entries have no
        "type") and the blk_* fields."""
        return list_head(self) | {
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

    def bound(self) -> bool:
        return driver_bound(self.endpoint)

    def controller_list_entry(self) -> dict:
        """Its controller_list entry."""
        return {"name": self.name, "emulation_manager": self.emulation_manager,
                "type": "virtio_blk", "function_type": "PF" if self.vf_id < 0 else "VF",
                "pf_id": self.pf_id, "vf_id": self.vf_id, "vuid": self.vuid,
                "pci_bdf": self.bdf, "bdev_type": "spdk", "bdev": self.bdev,
                "num_queues": self.num_queues, "queue_size": self.queue_size,
                "admin_q": self.admin_q, "force_in_order": self.force_in_order,
                "socket": self.socket, "bound": self.bound()}


class BlkKind:
    """The blk functions (in ``inventory``) and their bdevs (``bdevs``),
    served through ``daemon`` on sockets in ``paths.run_dir``, recorded in
    ``store``, within the firmware's ``limits``."""

    name = "blk"
    numbered_by_virtnet = False

    def __init__(self, inventory, daemon, paths, store: RecoveryStore, limits: BlkLimits):
        self.inventory = inventory
        self.daemon = daemon
        self.paths = paths
        self.store = store
        self.limits = limits
        self.codec = BlkCodec()
        self.bdevs = Bdevs(store)

    def functions(self) -> list[BlkFunction]:
        return self.inventory.of_kind(self.name)

    def methods(self) -> dict[str, Method]:
        return self.bdevs.methods() | {
            "controller_virtio_blk_create": self.controller_virtio_blk_create,
            "controller_list": self.controller_list,
            "controller_virtio_blk_delete": self.controller_virtio_blk_delete,
        }

    # -- the controller_* verbs

    def controller_virtio_blk_create(self, p: dict, *, save: bool = True) -> dict:
        ib = str_param(p, "emu_manager")
        m = IB_DEV_RE.fullmatch(ib)
        if not m:
            raise InventoryError(f"no emulation manager {ib!r} (expected mlx5_<n>, e.g. mlx5_0)",
                                 -errno.ENODEV)
        pf_id = int_param(p, "pf_id", lo=0, hi=MAX_PF_ID)
        vf_id = p.get("vf_id")
        vf_id = -1 if vf_id is None else int_param(p, "vf_id", lo=0, hi=MAX_VF_ID)
        bdev_type = p.get("bdev_type", "spdk")
        if bdev_type != "spdk":
            raise InventoryError(f"bdev_type {bdev_type!r} is not supported (only spdk)", -errno.EOPNOTSUPP)
        bdev_name = str_param(p, "bdev")
        max_nq = self._check_firmware(pf_id, vf_id)
        nq = max_nq if p.get("num_queues") is None else int_param(p, "num_queues", lo=1)
        if nq > max_nq:
            raise InventoryError(self._too_many_queues(nq, max_nq, vf_id), -errno.EINVAL)
        qs = int_param(p, "queue_size", DEFAULT_QUEUE_SIZE, lo=2, hi=BLK_MAX_QUEUE_SIZE)
        if qs & (qs - 1):
            raise InventoryError(f"queue_size must be a power of 2, not {qs}")
        admin_q, in_order = bool_param(p, "admin_q"), bool_param(p, "force_in_order")

        b = self.bdevs.by_name.get(bdev_name)
        if b is None:
            raise InventoryError(f"bdev {bdev_name} not found (create it with bdev_null_create or "
                                 f"bdev_malloc_create)", -errno.ENODEV)
        for f in self.functions():
            if f.pf_id == pf_id and f.vf_id == vf_id:
                what = f"pf_id {pf_id}" + (f" vf_id {vf_id}" if vf_id >= 0 else "")
                raise InventoryError(f"a blk controller for {what} already exists: {f.name}", -errno.EEXIST)

        name, vuid, raw = blk_identity(m.group(1), pf_id, vf_id)
        try:
            sock = str(self.paths.endpoint_socket(vuid))
        except SocketPathTooLong as exc:
            raise InventoryError(f"socket path {exc.filename} is longer than {SUN_PATH_MAX} bytes; "
                                 f"use a shorter run dir", -errno.ENAMETOOLONG) from None
        cfg = BlkConfig(socket=sock, bdev="file" if b.bdev_type == "aio" else b.bdev_type, path=b.filename,
                        direct=b.direct, size_mb=b.size_mb, block_size=b.block_size,
                        queues=nq, queue_size=qs, serial=b.name[:20], name=vuid, in_order=in_order,
                        queues_hint=f"controller {name} was created with --num_queues {nq}; delete it "
                                    f"and create it again with --num_queues N, N at least QEMU's "
                                    f"num-queues (at most {max_nq} here)")
        f = BlkFunction(name, ib, pf_id, vf_id, vuid, raw, b.name, nq, qs, admin_q, in_order,
                        sock, bdev_type=b.bdev_type, block_size=b.block_size, num_blocks=b.num_blocks)
        undo = Undo()
        try:
            self._build(f, cfg, b.storage, undo)
            if save:         # the last step, as for a net function: a failure undoes the rest
                save_record(self.store, name, BlkControllerRecord.of(f))
        except BaseException:
            undo.run()
            raise
        self.inventory.add(f)
        b.users.append(name)
        log.info("%s: virtio-blk %s %s on bdev %s, %d queue(s) of %d%s, socket %s", name, vuid, f.bdf,
                 b.name, nq, qs, ", in order" if in_order else "", sock)
        return {"name": name, "vuid": vuid, "pci_bdf": f.bdf, "socket": sock}

    def _check_firmware(self, pf_id: int, vf_id: int) -> int:
        """Refuse a function the NV configuration does not have (as the
        firmware would not expose it); the most queues it may have."""
        lim, fix = self.limits, f"vfe-mlxconfig -d {DEFAULT_DEVICE} s"
        if not lim.enabled:
            raise InventoryError(f"virtio-blk emulation is disabled: VIRTIO_BLK_EMULATION_ENABLE is False(0) "
                                 f"({fix} VIRTIO_BLK_EMULATION_ENABLE=1 VIRTIO_BLK_EMULATION_NUM_PF=1, then "
                                 f"restart the controller)", -errno.ENODEV)
        if pf_id >= lim.static_pfs:
            raise InventoryError(f"no virtio-blk PF with pf_id {pf_id}: VIRTIO_BLK_EMULATION_NUM_PF="
                                 f"{lim.static_pfs} ({fix} VIRTIO_BLK_EMULATION_NUM_PF={pf_id + 1}, then "
                                 f"restart the controller)", -errno.ENODEV)
        if vf_id >= 0 and not lim.sriov:
            raise InventoryError(f"no virtio-blk VFs: SRIOV_EN is False(0) ({fix} SRIOV_EN=1, then restart "
                                 f"the controller)", -errno.ENODEV)
        if vf_id >= lim.vfs_per_pf:
            raise InventoryError(f"no virtio-blk VF with vf_id {vf_id}: VIRTIO_BLK_EMULATION_NUM_VF="
                                 f"{lim.vfs_per_pf} ({fix} VIRTIO_BLK_EMULATION_NUM_VF={vf_id + 1}, then "
                                 f"restart the controller)", -errno.ENODEV)
        max_nq = min(BLK_MAX_QUEUES, lim.pf_max_queues if vf_id < 0 else lim.vf_max_queues)
        if max_nq < 1:
            raise InventoryError(f"a virtio-blk {'PF' if vf_id < 0 else 'VF'} has no MSI-X vector for a "
                                 f"queue: {self._msix_params(vf_id)}", -errno.ENODEV)
        return max_nq

    def _msix_params(self, vf_id: int) -> str:
        lim = self.limits
        if vf_id < 0:
            return f"VIRTIO_BLK_EMULATION_NUM_MSIX={lim.pf_msix}"
        return (f"a VF has the lesser of VIRTIO_BLK_EMULATION_NUM_MSIX and NUM_VF_MSIX, "
                f"{lim.vf_msix} vectors")

    def _too_many_queues(self, nq: int, max_nq: int, vf_id: int) -> str:
        why = ("the engine's limit" if max_nq == BLK_MAX_QUEUES
               else f"one MSI-X vector per queue plus one: {self._msix_params(vf_id)}")
        return f"--num_queues {nq} is more than the {max_nq} this function may have ({why})"

    def _build(self, f: BlkFunction, cfg: BlkConfig, storage, undo: Undo) -> None:
        """The device model on the bdev's ``storage`` and its vhost-user endpoint."""
        try:
            f.model = BlkDeviceModel(self.daemon.engine, cfg, storage)
        except OSError as exc:        # its file shrank, was replaced by a symlink or a FIFO...
            raise InventoryError(f"cannot create the blk device on {f.bdev}: {exc.strerror or exc}",
                                 -(exc.errno or errno.EIO)) from None
        except (ValueError, MemoryError) as exc:
            raise InventoryError(f"cannot create the blk device on {f.bdev}: {exc}",
                                 -errno.ENOMEM) from None
        undo.push(f.model.close)
        try:
            f.endpoint = self.daemon.add_endpoint(f.model, f.socket, False, f.vuid)
        except OSError as exc:
            raise InventoryError(f"cannot listen on {f.socket}: {exc.strerror or exc}",
                                 -(exc.errno or errno.EIO)) from None
        undo.push(lambda: self.daemon.remove_endpoint(f.endpoint))

    def find(self, key: str) -> BlkFunction:
        """The blk function named ``key`` (its controller name or VUID)."""
        fs = self.functions()
        f = next((x for x in fs if x.name == key), None) or next((x for x in fs if x.vuid == key), None)
        if f is None:
            raise InventoryError(f"no blk controller {key}", -errno.ENODEV)
        return f

    def controller_list(self, p: dict) -> list:
        key = p.get("name") or p.get("vuid")
        if key:
            return [self.find(key).controller_list_entry()]
        return [f.controller_list_entry() for f in self.functions()]

    def controller_virtio_blk_delete(self, p: dict) -> bool:
        key = p.get("name") or p.get("vuid")
        if not key:
            raise InventoryError("missing parameter name")
        f = self.find(str(key))
        if f.bound() and not bool_param(p, "force"):
            raise InventoryError(f"{f.name} is in use by a guest driver; stop it first or delete with force",
                                 -errno.EBUSY)
        delete_record(self.store, f.name, BlkControllerRecord.of(f))
        self._close(f)
        log.info("%s: deleted", f.name)
        return True

    def _close(self, f: BlkFunction) -> None:
        self.inventory.discard(f)
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
        b = self.bdevs.by_name.get(f.bdev)
        if b is not None and f.name in b.users:
            b.users.remove(f.name)

    def shutdown(self) -> None:
        """Close every function (a stop: the recovery files stay)."""
        for f in self.functions():
            self._close(f)

    def restore(self, loaded: BlkLoad) -> str:
        """Recreate the bdevs and controllers of a BlkLoad (already checked),
        without rewriting their files.  One that cannot be recreated (an aio
        file gone or shrunk, a socket that cannot be served) is logged and
        skipped; its file stays for the next start.  Returns how many bdevs
        and controllers were recreated, for the start-up log line."""
        nb = self.bdevs.restore(loaded.bdevs)
        nc = 0
        for r in loaded.controllers:
            if r.bdev not in self.bdevs.by_name:
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
        return f"{nb} recovered bdev(s) and {nc} blk controller(s)"

    def update_refusal(self) -> str | None:
        malloc = self.bdevs.malloc_names()
        if not malloc:
            return None
        return (f"cannot update while malloc bdev(s) {', '.join(malloc)} exist: their data lives in this "
                f"process only; delete them (or use aio bdevs) first")

    # -- in the virtnet verbs (the inventory's)

    def summary(self) -> dict:
        return {}

    def in_list_order(self, functions: list[BlkFunction]) -> list[BlkFunction]:
        """PFs, then VFs, by (pf_id, vf_id)."""
        return sorted(functions, key=lambda f: (f.vf_id >= 0, f.pf_id, f.vf_id))

    def query_entry(self, f: BlkFunction, brief: bool) -> dict:
        return query_entry(f, brief)          # the same fields as a net function's

    def modify(self, f: BlkFunction, p: dict) -> dict:
        raise self._not_net(f, "modify")

    def unplug(self, f: BlkFunction, p: dict) -> dict:
        raise self._not_net(f, "unplug")

    @staticmethod
    def _not_net(f: BlkFunction, cmd: str) -> InventoryError:
        return InventoryError(NOT_NET.format(vuid=f.vuid, name=f.name, cmd=cmd,
                                             hint=HINTS[cmd].format(name=f.name)), -errno.EOPNOTSUPP)

    def vf_state(self, f: BlkFunction, p: dict) -> dict:
        """The status (6) only: quiesce, freeze and dirty logging are not
        there for blk functions yet."""
        op = int_param(p, "op", VF_STATE_STATUS)
        if op != VF_STATE_STATUS:
            raise InventoryError(f"{f.vuid}: device operation {op} (quiesce, freeze, dirty logging) is not "
                                 f"supported for virtio-blk functions yet; only 6 (status)", -errno.EOPNOTSUPP)
        return {"vuid": f.vuid, "bdf": f.bdf, "state": "running",
                "logging": f.model is not None and bool(f.model.rings.logging), "log_size": 0}
