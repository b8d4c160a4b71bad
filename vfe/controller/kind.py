"""What a kind of function is to the controller: the interface every kind
implements (net_kind.NetKind, blk_kind.BlkKind), the fields the inventory
reads from any function, and how an operation refuses (InventoryError).

A kind registers with the Inventory (inventory.py), which then holds its
functions beside every other kind's.  Registering also registers the kind's
own RPC verbs (`methods()`), as an SPDK module registers its verbs: the net
kind brings `hotplug` and `sriov_numvfs`, the blk kind `bdev_*` and
`controller_*`.  The `virtnet` verbs that name any function -- list, query,
modify, unplug, vf_state -- are the inventory's: it finds the function and
hands it to its kind.  A kind's recovery records go through its codec
(``codec``, registered in the one RecoveryStore, recovery.py); at start the
service loads every kind's records, then hands each kind its own to
``restore``.

What every kind shares lives here too: creation undone step by step on
failure (Undo), whether a guest driver uses a function (driver_bound), the
identity fields that open a `virtnet list` entry (list_head), vhostmgmt's
device operations (VF_STATE_OPS), the `virtnet query` entry (query_entry)
and how a recovery file is written and removed (save_record, delete_record).
"""
from __future__ import annotations

import errno
import logging
from typing import Any, Callable, Mapping, Protocol

from vfe.controller.recovery import RecordCodec

log = logging.getLogger("vfe.controller")

Method = Callable[[dict], Any]          # an RPC verb: params -> result

# vhostmgmt's device operations (`vf -o OP`, the vf_state verb), by number
VF_STATE_OPS = {1: "running", 2: "quiesced", 3: "freeze", 4: "start_logging", 5: "stop_logging",
                6: "get_lm_status"}
VF_STATE_STATUS = 6         # get_lm_status: the one every kind answers


class InventoryError(Exception):
    """An operation the user asked for cannot be done; the message says why."""

    def __init__(self, message: str, code: int = -errno.EINVAL):
        super().__init__(message)
        self.code = code


class Function(Protocol):
    """What the inventory reads from a function of any kind."""

    kind: str           # the name of the FunctionKind that made it
    vuid: str
    pf_id: int
    vf_id: int          # -1 for a PF
    bdf: str
    socket: str         # its vhost-user socket
    model: Any          # the device model (vfe.devices)
    endpoint: Any       # its vfe.controller.daemon.Endpoint

    def bound(self) -> bool:
        """A guest driver is using the device: its rings run (driver_bound)."""

    def list_entry(self) -> dict:
        """Its `virtnet list` entry (opening with list_head)."""


class FunctionKind(Protocol):
    """One kind of emulated function (virtio-net, virtio-blk)."""

    name: str                   # Function.kind of its functions; its codec's kind
    numbered_by_virtnet: bool   # virtnet's -p PF [-v VF] count its functions
    codec: RecordCodec          # its records in the recovery store (codec.kind == name)

    def methods(self) -> Mapping[str, Method]:
        """The RPC verbs this kind serves (beside the inventory's)."""

    def restore(self, loaded) -> str:
        """Recreate the functions of ``loaded`` (what its codec's load
        returned, already checked) at start, without rewriting their files;
        returns what was recreated, worded for the start-up log line."""

    def update_refusal(self) -> str | None:
        """Why a live update cannot take this kind's functions along now
        (None: it can)."""

    def summary(self) -> dict:
        """Its fields of `virtnet list`'s "controller" object."""

    def in_list_order(self, functions: list) -> list:
        """Its functions (all of this kind), in `virtnet list` order."""

    def query_entry(self, f, brief: bool) -> dict:
        """A function's `virtnet query` entry."""

    def modify(self, f, params: dict) -> dict:
        """`virtnet modify` of one of its functions."""

    def unplug(self, f, params: dict) -> dict:
        """`virtnet unplug` of one of its functions."""

    def vf_state(self, f, params: dict) -> dict:
        """vhostmgmt's device operation (1..6) on one of its functions."""

    def shutdown(self) -> None:
        """Close every function of the kind; their recovery files stay."""


class Undo:
    """Steps to take back if creation fails half-way (last in, first out)."""

    def __init__(self):
        self.steps: list[Callable[[], Any]] = []

    def push(self, fn: Callable[[], Any]) -> None:
        self.steps.append(fn)

    def run(self) -> None:
        while self.steps:
            try:
                self.steps.pop()()
            except Exception:             # undo as much as possible
                log.exception("undo step failed")


def driver_bound(endpoint) -> bool:
    """A guest driver is using the device served on ``endpoint`` (a
    daemon.Endpoint, or None): its rings run."""
    return endpoint is not None and endpoint.session is not None and bool(endpoint.session.started)


def list_head(f: Function) -> dict:
    """The fields that open a function's `virtnet list` entry, in every kind:
    pf_id for a PF; vf_id and parent_pf_id for a VF."""
    return {"pf_id": f.pf_id} if f.vf_id < 0 else {"vf_id": f.vf_id, "parent_pf_id": f.pf_id}


def query_entry(f: Function, brief: bool) -> dict:
    """The `virtnet query` fields every kind shares: the list entry, then the
    connection and, unless brief, every queue."""
    out = f.list_entry()
    model = f.model
    sess = f.endpoint.session if f.endpoint is not None else None
    out["status"] = "running" if f.bound() else ("connected" if sess is not None else "not connected")
    out["socket"] = f.socket
    out["negotiated_features"] = f"{sess.protocol.features:#x}" if sess is not None else "0x0"
    out["device_status"] = model.status
    if not brief:
        out["queues"] = [
            {"index": s["index"], "type": s["kind"], "size": s["size"],
             "state": ("error: " + s["error"]) if s["broken"] else
                      ("running" if s["ready"] and s["enabled"] else ("disabled" if s["ready"] else "stopped")),
             "last_avail_idx": s["last_avail_idx"], "last_used_idx": s["last_used_idx"],
             "packets": s["packets"], "bytes": s["bytes"], "dropped": s["dropped"],
             "errors": s["errors"]}
            for s in model.stats()]
    return out


def stats_entry(f: Function) -> dict:
    """A function's `virtnet stats` entry: who it is, then its device
    model's counters (per queue and per device)."""
    return {"vuid": f.vuid, "kind": f.kind, "pf_id": f.pf_id,
            "vf_id": None if f.vf_id < 0 else f.vf_id} | f.model.counters()


def save_record(store, what: str, record) -> None:
    """Write a recovery file; a failure is the user's error (disk full,
    permissions), reported as such."""
    try:
        store.save(record)
    except OSError as exc:
        raise InventoryError(f"{what}: cannot write its recovery file: {exc}",
                             -(exc.errno or errno.EIO)) from None


def delete_record(store, what: str, record) -> None:
    """Remove a recovery file before the thing it records goes, so that a
    failure leaves both."""
    try:
        store.delete(record)
    except OSError as exc:
        raise InventoryError(f"{what}: cannot remove its recovery file: {exc}",
                             -(exc.errno or errno.EIO)) from None
