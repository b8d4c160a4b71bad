"""The controller as vfe-vhostd sees it: a client of its JSON-RPC socket
(what ``virtnet`` uses): ``list`` to find BDFs and VUIDs, ``query`` for
``vf -i``/``-l``, ``version``, ``vf_state`` for ``vf -d``."""
from __future__ import annotations

import errno
from typing import Any

from vfe.rpc.client import call
from vfe.rpc.protocol import METHOD_NOT_FOUND, RpcError
from vfe.vhostd.errors import STD_ERR_MAX, VdpaError


class Controller:
    """virtio-net-controller's JSON-RPC, as vfe-vhostd uses it.  Failures
    raise VdpaError with the controller's -errno (or the connection's)."""

    def __init__(self, socket_path: str, timeout: float = 10.0):
        self.socket_path = socket_path
        self.timeout = timeout

    def call(self, method: str, params: dict | None = None) -> Any:
        try:
            return call(self.socket_path, method, params, timeout=self.timeout)
        except RpcError as exc:
            if exc.code == METHOD_NOT_FOUND:          # an older controller
                code = -errno.EOPNOTSUPP
            else:
                code = exc.code if -STD_ERR_MAX < exc.code < 0 else -errno.EIO
            raise VdpaError(code, f"virtio-net-controller: {exc.message}") from None

    def functions(self) -> list[dict]:
        return list(self.call("list", {}).get("devices", []))

    def query(self, vuid: str | None = None, all: bool = False) -> list[dict]:
        params: dict[str, Any] = {"brief": True}
        if all:
            params["all"] = True
        else:
            params["vuid"] = vuid
        return list(self.call("query", params).get("devices", []))

    def version(self) -> dict:
        return self.call("version", {})

    def vf_state(self, vuid: str, op: int) -> dict:
        """The device operations of ``vf -d -o N`` (1 running, 2 quiesced,
        3 freeze, 4/5 start/stop dirty logging, 6 status)."""
        return self.call("vf_state", {"vuid": vuid, "op": op})


def function_kind(f: dict) -> str:
    """"virtio_blk" for the controller's blk functions ("type" in their
    `virtnet list` entry), "virtio_net" for the others (which have none)."""
    return str(f.get("type") or "virtio_net")
