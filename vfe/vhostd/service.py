"""vfe-vhostd's registry and RPC methods.

Management PFs (``mgmtpf -a``) are PFs of the controller whose VFs may be
provisioned; a provisioned VF (``vf -a VF -v SOCKET``) is a ``Relay``
between QEMU's socket and the VF's endpoint at the controller, which is
asked over its JSON-RPC socket (vfe/vhostd/controller_client.py).

Results are the reference service's (Mellanox dpdk-vhost-vfe,
app/vfe-vdpa/vdpa_rpc.c): an object that ends with ``errno`` and ``errstr``
(vfe/vhostd/errors.py); malformed parameters give ``{"Error": "Invalid
pf|vf parameters in RPC message", "id": ID}``.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import selectors
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from vfe import __version__
from vfe.paths import endpoint_socket_name, vhostd_run_dir
from vfe.safepath import make_dirs
from vfe.vhostd.controller_client import Controller, function_kind
from vfe.vhostd.errors import (ERR_ADD_PF_ALREADY_ADD, ERR_ADD_PF_DEVICEID_NOT_SUPPORT, ERR_ADD_VF_ALREADY_ADD,
                               ERR_ADD_VF_EXCEED_VPORT_LIMIT, ERR_ADD_VF_VHOST_SOCK_EXIST, ERR_DEVARGS_PARSE,
                               ERR_NO_PF_DEVICE, ERR_NO_PF_NAME, ERR_NO_VF_DEVICE, ERR_NO_VF_NAME,
                               ERR_REMOVE_PF_WITH_VF, VdpaError, with_errno)
from vfe.vhostd.features import feature_info
from vfe.vhostd.relay import Relay, RelayError, check_socket_path

log = logging.getLogger("vfe.vhostd")

# -- PCI addresses ----------------------------------------------------------------

_BDF_RE = re.compile(r"^(?:([0-9a-fA-F]{1,4}):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])$")


def parse_bdf(text: str) -> str:
    """``[domain:]bus:dev.fn`` -> ``dddd:bb:dd.f`` (lower case); VdpaError
    -EINVAL when it is not a PCI address."""
    m = _BDF_RE.match(text.strip()) if isinstance(text, str) else None
    if m is None or int(m.group(3), 16) > 0x1F:
        raise VdpaError(-errno.EINVAL, f"{text!r} is not a PCI address (domain:bus:slot.func)")
    dom = int(m.group(1) or "0", 16)
    return f"{dom:04x}:{int(m.group(2), 16):02x}:{int(m.group(3), 16):02x}.{m.group(4)}"


# -- the registry ------------------------------------------------------------------

@dataclass
class ManagedPF:
    bdf: str                 # dddd:bb:dd.f
    pf_id: int
    vuid: str
    kind: str = "virtio_net"  # or "virtio_blk": a blk PF manages the blk VFs of its pf_id


@dataclass
class ProvisionedVF:
    bdf: str
    pf: str                  # its management PF's bdf
    vuid: str
    socket_file: str
    vm_uuid: str
    relay: Relay = field(repr=False)
    kind: str = "virtio_net"


NULL_UUID = "00000000-0000-0000-0000-000000000000"
#: lm_status of ``vf -d -o 6``: the reference's VIRTIO_S_RUNNING/QUIESCED/FREEZED
LM_STATUS = {"running": 1, "quiesced": 2, "freeze": 3}
MAX_PORTS = 2048             # MAX_VDPA_SAMPLE_PORTS


def build_time() -> str:
    """__DATE__ __TIME__ style ("Jan  5 2025 10:11:12") of this package."""
    try:
        mtime = Path(__file__).stat().st_mtime
    except OSError:
        return "Not Known"
    return time.strftime("%b %e %Y %H:%M:%S", time.localtime(mtime))


class VhostService:
    """The mgmtpf / vf / version methods over a registry of relays."""

    def __init__(self, controller: Controller, sel: selectors.BaseSelector, *,
                 client: bool = False, iface: str = "",
                 relay_factory: Callable[..., Relay] = Relay):
        self.controller = controller
        self.sel = sel
        self.client = client
        self.iface = iface or ""
        self.relay_factory = relay_factory
        self.pfs: dict[str, ManagedPF] = {}
        self.vfs: dict[str, ProvisionedVF] = {}

    # -- JSON-RPC entry points: handler(params, id) -> result ---------------------

    def methods(self) -> dict[str, Callable[[Any, Any], Any]]:
        return {"mgmtpf": self.mgmtpf, "vf": self.vf, "version": self.version}

    def mgmtpf(self, params: Any, rid: Any) -> dict:
        p = params if isinstance(params, dict) else {}
        if p.get("add") and "dev" in p:
            return self._run(self.pf_add, p["dev"])
        if p.get("remove") and "dev" in p:
            return self._run(self.pf_remove, p["dev"])
        if p.get("list"):
            return self._run(self.pf_list)
        return {"Error": "Invalid pf parameters in RPC message", "id": rid}

    def vf(self, params: Any, rid: Any) -> dict:
        p = params if isinstance(params, dict) else {}
        if p.get("add") and "vfdev" in p:
            return self._run(self.vf_add, p["vfdev"], p.get("socket_file"), p.get("uuid"))
        if p.get("remove") and "vfdev" in p:
            return self._run(self.vf_remove, p["vfdev"])
        if p.get("list") and "mgmtpf" in p:
            return self._run(self.vf_list, p["mgmtpf"])
        if p.get("info") and "vfdev" in p:
            return self._run(self.vf_info, p["vfdev"])
        if p.get("debug") and "vfdev" in p:
            op = p.get("test_operation")
            if isinstance(op, bool) or not isinstance(op, int) or not 1 <= op <= 6:
                return {"Error": "Invalid vf parameters in RPC message", "id": rid}
            return self.vf_debug(p["vfdev"], op)
        return {"Error": "Invalid vf parameters in RPC message", "id": rid}

    def version(self, params: Any = None, rid: Any = None) -> dict:
        result = {"vfe-vhostd version": f"vfe {__version__}", "vfe-vhostd build time": build_time()}
        # the reference's HA daemon keeps the devices' fds across restarts;
        # here the controller does (it adopts the QEMU sockets)
        try:
            ctl = self.controller.version().get("controller", {})
            result["vfe-vhostd-ha version"] = f"virtio-net-controller {ctl.get('version', '?')}"
            result["vfe-vhostd-ha build time"] = ctl.get("build_time", "Not Known")
        except VdpaError:
            result["vfe-vhostd-ha version"] = "Not Known Due to HA Disconnected"
            result["vfe-vhostd-ha build time"] = "Not Known Due to HA Disconnected"
        return with_errno(result, 0)

    @staticmethod
    def _run(fn: Callable[..., dict], *args: Any) -> dict:
        try:
            return fn(*args)
        except VdpaError as exc:
            log.error("%s(%s): %s", fn.__name__, ", ".join(map(repr, args)), exc.detail)
            return with_errno({}, exc.code)
        except RelayError as exc:
            log.error("%s(%s): %s", fn.__name__, ", ".join(map(repr, args)), exc.message)
            return with_errno({}, exc.code)

    # -- PFs ---------------------------------------------------------------------------

    def _function(self, bdf: str, functions: list[dict] | None = None) -> dict | None:
        functions = self.controller.functions() if functions is None else functions
        dom, short = bdf[:4], bdf[5:]
        if dom != "0000":
            return None
        return next((f for f in functions if str(f.get("bdf", "")).lower() == short), None)

    def pf_add(self, dev: Any) -> dict:
        if not isinstance(dev, str) or not dev:
            raise VdpaError(ERR_NO_PF_NAME)
        bdf = parse_bdf(dev)
        if bdf in self.pfs:
            raise VdpaError(ERR_ADD_PF_ALREADY_ADD)
        f = self._function(bdf)
        if f is None:
            raise VdpaError(-errno.ENODEV, f"the controller has no function at {bdf}")
        if f.get("function_type") == "VF" or "pf_id" not in f:
            raise VdpaError(ERR_ADD_PF_DEVICEID_NOT_SUPPORT, f"{bdf} ({f.get('vuid')}) is a VF, not a PF")
        self.pfs[bdf] = ManagedPF(bdf, int(f["pf_id"]), str(f["vuid"]), function_kind(f))
        log.info("management PF %s (%s) added", bdf, f["vuid"])
        return with_errno({}, 0)

    def pf_remove(self, dev: Any) -> dict:
        if not isinstance(dev, str) or not dev:
            raise VdpaError(ERR_NO_PF_NAME)
        bdf = parse_bdf(dev)
        if bdf not in self.pfs:
            raise VdpaError(ERR_NO_PF_DEVICE)
        if any(vf.pf == bdf for vf in self.vfs.values()):
            raise VdpaError(ERR_REMOVE_PF_WITH_VF)
        del self.pfs[bdf]
        log.info("management PF %s removed", bdf)
        return with_errno({}, 0)

    def pf_list(self) -> dict:
        if not self.pfs:
            raise VdpaError(ERR_NO_PF_DEVICE)
        return with_errno({"devices": [{"pf": bdf} for bdf in self.pfs]}, 0)

    # -- VFs ---------------------------------------------------------------------------

    def socket_path_for(self, bdf: str, socket_file: str | None) -> str:
        """``-v`` path, else ``<iface><BDF>``, else ``vf-<BDF>`` in root's run
        directory (the reference's /tmp/vf-<BDF> could be squatted by any user)."""
        if socket_file:
            return socket_file
        if self.iface:
            return f"{self.iface}{bdf}"
        return str(vhostd_run_dir() / f"vf-{bdf}")

    def vf_add(self, vfdev: Any, socket_file: Any = None, vm_uuid: Any = None) -> dict:
        if not isinstance(vfdev, str) or not vfdev:
            raise VdpaError(ERR_NO_VF_NAME)
        bdf = parse_bdf(vfdev)
        if socket_file is not None and not isinstance(socket_file, str):
            raise VdpaError(-errno.EINVAL, "socket_file must be a string")
        path = self.socket_path_for(bdf, socket_file or None)
        if any(vf.socket_file == path for vf in self.vfs.values()):
            raise VdpaError(ERR_ADD_VF_VHOST_SOCK_EXIST, f"{path} is the socket of another VF")
        if bdf in self.vfs:
            raise VdpaError(ERR_ADD_VF_ALREADY_ADD)
        if vm_uuid is None or vm_uuid == "":
            vm_uuid = NULL_UUID
        else:
            try:
                vm_uuid = str(uuid.UUID(str(vm_uuid)))
            except ValueError:
                raise VdpaError(ERR_DEVARGS_PARSE, f"bad VM UUID {vm_uuid!r}") from None
        if len(self.vfs) >= MAX_PORTS:
            raise VdpaError(ERR_ADD_VF_EXCEED_VPORT_LIMIT)
        functions = self.controller.functions()
        f = self._function(bdf, functions)
        if f is None:
            raise VdpaError(-errno.ENODEV, f"the controller has no function at {bdf}")
        if f.get("function_type") != "VF":
            raise VdpaError(ERR_NO_PF_DEVICE, f"{bdf} ({f.get('vuid')}) is not a VF: it has no PF")
        # a net PF and a blk PF may both have pf_id N: the VF's PF is the one of its kind
        kind = function_kind(f)
        pf = next((p for p in self.pfs.values() if p.pf_id == f.get("parent_pf_id") and p.kind == kind), None)
        if pf is None:
            what = "blk PF" if kind == "virtio_blk" else "PF"
            raise VdpaError(ERR_NO_PF_DEVICE, f"the {what} of {bdf} (pf_id {f.get('parent_pf_id')}) is not a "
                                              f"management PF: mgmtpf -a it first")
        vuid = str(f["vuid"])
        if not socket_file and not self.iface:      # the default: root's run dir, made here
            make_dirs(os.path.dirname(path), 0o755)
        check_socket_path(path, client=self.client)
        endpoint = self._endpoint(vuid)
        relay = self.relay_factory(
            f"VF {bdf} ({vuid})", path, endpoint, self.client, self.sel,
            vf_exists=lambda: self._vf_exists(vuid, bdf),
            on_gone=lambda r, why: self._vf_gone(bdf, r))
        relay.start()                                  # RelayError -> errno
        self.vfs[bdf] = ProvisionedVF(bdf, pf.bdf, vuid, path, vm_uuid, relay, kind)
        log.info("VF %s (%s) provisioned on %s%s", bdf, vuid, path,
                 " (resumed the controller's front-end)" if relay.resumed else "")
        return with_errno({}, 0)

    def _endpoint(self, vuid: str) -> str:
        try:
            devices = self.controller.query(vuid)
        except VdpaError:
            devices = []
        if devices and devices[0].get("socket"):
            return str(devices[0]["socket"])
        return os.path.join(os.path.dirname(self.controller.socket_path), endpoint_socket_name(vuid))

    def _vf_exists(self, vuid: str, bdf: str) -> bool | None:
        try:
            f = self._function(bdf)
        except VdpaError:
            return None
        return f is not None and f.get("vuid") == vuid

    def _vf_gone(self, bdf: str, relay: Relay) -> None:
        vf = self.vfs.get(bdf)
        if vf is not None and vf.relay is relay:
            del self.vfs[bdf]
        relay.close(handoff=False)

    def vf_remove(self, vfdev: Any) -> dict:
        if not isinstance(vfdev, str) or not vfdev:
            raise VdpaError(ERR_NO_VF_NAME)
        bdf = parse_bdf(vfdev)
        vf = self.vfs.pop(bdf, None)
        if vf is None:
            raise VdpaError(ERR_NO_VF_DEVICE)
        vf.relay.close(handoff=False)
        log.info("VF %s (%s) removed", bdf, vf.vuid)
        return with_errno({}, 0)

    def _device(self, vf: ProvisionedVF, q: dict | None) -> dict:
        if q is None:                       # the reference's form for a VF it cannot probe
            return {"vf": vf.bdf, "probed": False, "vm_uuid": vf.vm_uuid, "socket_file": vf.socket_file}
        try:
            feats = int(str(q.get("negotiated_features", "0")), 0)
        except ValueError:
            feats = 0
        return {
            "vf": vf.bdf,
            "probed": True,
            "msix_num": str(q.get("num_msix", 0)),
            "queue_num": str(q.get("max_queues", 0)),
            "queue_size": str(q.get("max_queues_size", 0)),
            "device_feature": feature_info(feats, vf.kind),
            "mtu": str(q.get("net_mtu", 0)),
            "mac": str(q.get("net_mac", "")).upper(),
            "vm_uuid": vf.vm_uuid,
            "socket_file": vf.socket_file,
            "configured": q.get("status") == "running",
        }

    def vf_list(self, pfdev: Any) -> dict:
        if not isinstance(pfdev, str) or not pfdev:
            raise VdpaError(ERR_NO_PF_NAME)
        bdf = parse_bdf(pfdev)
        if bdf not in self.pfs:
            raise VdpaError(ERR_NO_PF_DEVICE)
        vfs = [vf for vf in self.vfs.values() if vf.pf == bdf]
        if not vfs:
            return with_errno({}, 0)
        try:
            by_vuid = {d.get("vuid"): d for d in self.controller.query(all=True)}
        except VdpaError as exc:
            log.warning("vf -l: cannot query the controller: %s", exc.detail)
            by_vuid = {}
        return with_errno({"devices": [self._device(vf, by_vuid.get(vf.vuid)) for vf in vfs]}, 0)

    def vf_info(self, vfdev: Any) -> dict:
        if not isinstance(vfdev, str) or not vfdev:
            raise VdpaError(ERR_NO_VF_NAME)
        bdf = parse_bdf(vfdev)
        vf = self.vfs.get(bdf)
        if vf is None:
            raise VdpaError(ERR_NO_VF_DEVICE)
        try:
            devices = self.controller.query(vf.vuid)
        except VdpaError as exc:
            log.warning("vf -i: cannot query the controller: %s", exc.detail)
            devices = []
        return with_errno({"device": self._device(vf, devices[0] if devices else None)}, 0)

    def vf_debug(self, vfdev: Any, op: int) -> dict:
        """``vf -d -o OP``: the controller runs the device operation; the
        result is the reference's (``{"Success": VF}``, with ``"device":
        {"vf", "lm_status"}`` first for 6; ``{"Error": "Fail to debug VF
        device"}`` plus errno/errstr on failure).  ``size_mode`` (-b) is not
        passed on: the dirty log is QEMU's, a bitmap."""
        try:
            bdf = parse_bdf(vfdev) if isinstance(vfdev, str) and vfdev else ""
        except VdpaError:
            bdf = ""
        vf = self.vfs.get(bdf)
        if vf is None:
            return {"Error": "Fail to find VF device"}
        try:
            state = self.controller.vf_state(vf.vuid, op)
        except VdpaError as exc:
            log.error("vf -d %s -o %d: %s", bdf, op, exc.detail)
            return with_errno({"Error": "Fail to debug VF device"}, exc.code)
        log.info("VF %s: operation %d: %s", bdf, op, state.get("state"))
        result: dict[str, Any] = {}
        if op == 6:
            result["device"] = {"vf": bdf, "lm_status": str(LM_STATUS.get(state.get("state"), 0))}
        result["Success"] = bdf
        return result

    # -- lifetime -----------------------------------------------------------------------

    def relays(self) -> list[Relay]:
        return [vf.relay for vf in self.vfs.values()]

    def close(self, handoff: bool = True) -> None:
        """At exit: leave every front-end to the controller (``handoff``)."""
        for vf in list(self.vfs.values()):
            vf.relay.close(handoff=handoff)
        self.vfs.clear()
