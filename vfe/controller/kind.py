"""What a kind of function is to the controller: the interface every kind
implements (net_kind.NetKind, blk_kind.BlkKind), the fields the inventory
reads from any function, and how an operation refuses (InventoryError).

A kind registers with the Inventory (inventory.py), which then holds its
functions beside every other kind's.  Registering also registers the kind's
own RPC verbs (`methods()`), as an SPDK module registers its verbs: the net
kind brings `hotplug` and `sriov_numvfs`, the blk kind `bdev_*` and
`controller_*`.  The `virtnet` verbs that name any function -- list, query,
modify, unplug, vf_state -- are the inventory's: it finds the function and
hands it to its kind.  A kind's recovery records go through the codec of the
same name in the one RecoveryStore (recovery.py).
"""
from __future__ import annotations

import errno
from typing import Any, Callable, Mapping, Protocol

Method = Callable[[dict], Any]          # an RPC verb: params -> result


class InventoryError(Exception):
    """An operation the user asked for cannot be done; the message says why."""

    def __init__(self, message: str, code: int = -22):   # -EINVAL
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
        """A guest driver is using the device: its rings run."""

    def list_entry(self) -> dict:
        """Its `virtnet list` entry."""


class FunctionKind(Protocol):
    """One kind of emulated function (virtio-net, virtio-blk)."""

    name: str                   # Function.kind of its functions; its codec's kind
    numbered_by_virtnet: bool   # virtnet's -p PF [-v VF] count its functions

    def methods(self) -> Mapping[str, Method]:
        """The RPC verbs this kind serves (beside the inventory's)."""

    def summary(self) -> dict:
        """Its fields of `virtnet list`'s "controller" object."""

    def in_list_order(self, functions: list) -> list:
        """Its functions (all of this kind), in `virtnet list` order."""

    def list_entry(self, f) -> dict:
        """A function's `virtnet list` entry."""

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
