"""virtnet's RPC socket: one method table -- the inventory's verbs and every
kind's (Inventory.methods()), and the controller's own: `log`, `version`,
`update_start`, `update_status` -- served by one RpcServer in the daemon's
loop.  An InventoryError becomes the JSON-RPC error of its code and message;
while a live update moves every device, the answers are the LiveUpdate's
(update.py), which hands this very socket to the new controller.
"""
from __future__ import annotations

import logging
import os
import socket
from typing import Any

from vfe import __version__
from vfe.controller.inventory import Inventory
from vfe.controller.kind import InventoryError, Method
from vfe.controller.update import LiveUpdate
from vfe.engine import ENGINE_ABI
from vfe.journal import LOG_LEVELS
from vfe.rpc.protocol import RpcError
from vfe.rpc.server import RpcServer

log = logging.getLogger("vfe.controller")


def set_log_level(p: dict) -> dict:
    """`virtnet log --level err|info|debug`."""
    level = p.get("level")
    if level not in LOG_LEVELS:
        raise InventoryError(f"log level must be one of {', '.join(LOG_LEVELS)}")
    logging.getLogger().setLevel(LOG_LEVELS[level])
    log.info("log level set to %s", level)
    return {"level": level, "status": "success"}


class ControlServer:
    """The RPC server on ``path`` (or on the listening socket ``sock`` a live
    update handed over), serving the verbs of ``inventory`` and its kinds and
    the controller's own.  ``argv`` and ``inventory`` are for the LiveUpdate
    (update.py) too."""

    def __init__(self, daemon, path, inventory: Inventory, *, argv: list[str],
                 sock: socket.socket | None = None):
        self.methods: dict[str, Method] = dict(inventory.methods(), log=set_log_level,
                                               version=self.version, update_start=self.update_start,
                                               update_status=self.update_status)
        self.rpc = RpcServer(path, self.handle, daemon.sel, sock=sock)
        self.updater = LiveUpdate(daemon, self.rpc, argv, inventory)

    def close(self) -> None:
        self.rpc.close()

    def handle(self, method: str, params: dict) -> Any:
        fn = self.methods.get(method)
        if fn is None:
            raise RpcError.method_not_found(method)
        params = params or {}
        try:
            if self.updater.moving:
                return self.updater.answer_while_moving(method, params, lambda: fn(params))
            return fn(params)
        except InventoryError as exc:
            raise RpcError(exc.code, str(exc)) from None

    # -- the controller's own verbs

    def version(self, p: dict) -> dict:
        """This controller; during a live update, the new one too."""
        out: dict = {"controller": {"version": __version__, "engine_abi": ENGINE_ABI, "pid": os.getpid()}}
        st = self.updater.state
        if st.get("status") in ("in progress", "moving"):
            out["update"] = {"version": st["to"], "pid": st["pid"], "status": st["status"]}
        return out

    def update_start(self, p: dict) -> dict:
        return self.updater.start(p)

    def update_status(self, p: dict) -> dict:
        return self.updater.status(p)
