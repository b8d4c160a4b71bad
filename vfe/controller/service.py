"""virtio-net-controller as a service: the emulated DPU.

Start-up order, as the seed describes the product: apply pending firmware
(NV) configuration -- the "cold reboot" -- and refuse to run unless
VIRTIO_NET_EMULATION_ENABLE is set; read virtnet.conf once; check the
recovery files against the configuration; create the static PFs and
recover the hot-plugged ones and the blk functions; then serve `virtnet` on
the RPC socket.

``build`` does it in that order, each object made from the ones before it:
the net kind's SF pools and host VM, the kinds (registered with the
inventory, their codecs with the recovery store), every kind's records
loaded and checked, each kind restoring its own, then the RPC server with
the method table the kinds registered.
"""
from __future__ import annotations

import logging
import socket
import types
from dataclasses import dataclass
from typing import Any, Iterable

from vfe.controller import nvconfig
from vfe.controller.blk_kind import BlkKind
from vfe.controller.control import ControlServer
from vfe.controller.hostqmp import HostQmp
from vfe.controller.inventory import Inventory
from vfe.controller.kind import FunctionKind, InventoryError
from vfe.controller.net_kind import NetKind
from vfe.controller.paths import Paths
from vfe.controller.recovery import RecoveryStore
from vfe.controller.sf_pool import SfPool
from vfe.controller.virtnet_conf import ConfigError, VirtnetConf, load_virtnet_conf
from vfe.ports import representor

log = logging.getLogger("vfe.controller")


class ServiceError(Exception):
    """The service cannot start; the message tells the user what to do."""


@dataclass
class Service:
    """A running controller service, as ``build`` made it."""

    inventory: Inventory
    control: ControlServer
    sf_pools: dict[str, SfPool]
    host: HostQmp | None

    def stop(self) -> None:
        """The daemon's shutdown: stop answering, close every function (their
        files, SFs and representors stay for the next start)."""
        self.control.close()
        self.inventory.shutdown()
        for pool in self.sf_pools.values():
            pool.stop()
        if self.host is not None:
            self.host.close()


def build(daemon, paths: Paths, *, datapath: str = "representor", host_qmp: str | None = None,
          argv: list[str] | None = None, takeover=None) -> Service:
    """Everything but the loop: the service, serving on ``daemon``.

    ``argv`` is the controller's command line (a live update starts the new
    build with it); ``takeover`` (vfe.controller.update.Takeover) makes this
    the new process of a live update: the functions are the old process's,
    served on the sockets, representors and connections it handed over."""
    paths.ensure()
    nv_port0, nv_port1 = firmware(paths, reboot=takeover is None)
    lim = nvconfig.limits(nv_port0)
    conf = virtnet_conf(paths)
    store = RecoveryStore(paths.recovery_dir, enabled=conf.recovery,
                          display_dir=paths.display(paths.recovery_dir))
    # Net only, so named here: the SF pools (one per port, sized by its NV
    # configuration), the host VM's QMP, and the representors -- in a live
    # update the old process's, handed over with its functions' run-time state.
    pools = sf_pools(paths, conf, nv_port0, nv_port1, takeover)
    host = HostQmp(host_qmp) if host_qmp else None
    inventory = Inventory()
    kinds: list[FunctionKind] = [
        NetKind(inventory, daemon, paths, lim, conf, pools, store, representor_factory(takeover),
                datapath=datapath, host=host,
                run_time_state=None if takeover is None else takeover.run_time_state),
        BlkKind(inventory, daemon, paths, store, nvconfig.blk_limits(nv_port0)),
    ]
    for kind in kinds:
        inventory.register(kind)
        store.register(kind.codec)
    try:
        restored = restore(store, kinds, takeover)
    except ServiceError:
        inventory.shutdown()          # the functions made before the one that failed
        if host is not None:
            host.close()
        raise

    control = ControlServer(daemon, paths.rpc_socket, inventory, argv=argv or [],
                            sock=None if takeover is None else socket.socket(fileno=takeover.rpc_fd))
    service = Service(inventory, control, pools, host)
    daemon.on_shutdown.append(service.stop)
    log.info("%s; virtnet on %s", ", ".join(restored), paths.rpc_socket)
    return service


def firmware(paths: Paths, reboot: bool) -> tuple[nvconfig.NvConfig, nvconfig.NvConfig]:
    """Both ports' NV configuration; at a (cold) start, their pending values
    applied first (a live update is no reboot).  ServiceError unless
    emulation is enabled."""
    nv_port0 = nvconfig.NvConfig.load(paths.state_dir)
    nv_port1 = nvconfig.NvConfig.load(paths.state_dir, nvconfig.PORT1_DEVICE)
    for dev_nv in (nv_port0, nv_port1) if reboot else ():
        applied = dev_nv.apply_pending()
        if applied:
            log.info("applied new firmware configuration of %s: %s", dev_nv.device,
                     ", ".join(f"{k}={new}" for k, (_, new) in applied.items()))
    reason = nvconfig.service_check(nv_port0)
    if reason:
        raise ServiceError(reason)
    return nv_port0, nv_port1


def virtnet_conf(paths: Paths) -> VirtnetConf:
    try:
        return load_virtnet_conf(paths.conf)
    except ConfigError as exc:
        # the message names the file as the seed does; exc's own text repeats the real path
        key = f"{exc.key}: " if exc.key else ""
        raise ServiceError(f"{paths.display(paths.conf)}: {key}{exc.message}") from None


def restore(store: RecoveryStore, kinds: list[FunctionKind], takeover) -> list[str]:
    """Every kind's functions back (load_recovery, then each kind's
    restore, in registration order); what each restored, for the log."""
    loaded = load_recovery(store, kinds, takeover)
    try:
        return [kind.restore(loaded[kind.name]) for kind in kinds]
    except InventoryError as exc:     # a clean refusal, not a traceback
        raise ServiceError(f"cannot create the functions: {exc}") from None


def load_recovery(store: RecoveryStore, kinds: Iterable[FunctionKind], takeover) -> dict[str, Any]:
    """Every kind's records, by kind: what its codec loads from the files --
    or, for the kinds a live update hands over, the running functions'
    records as the old process sent them.  Every file is checked before
    anything is created, and a bad one stops the start (ServiceError)."""
    loaded = {}
    for kind in kinds:
        handed = None if takeover is None else takeover.handed_over(kind.name)
        loaded[kind.name] = handed if handed is not None else store.load(kind.name)
    problems = [p for load in loaded.values() for p in load.problems]
    if problems:
        raise ServiceError("; ".join(str(p) for p in problems))
    return loaded


def sf_pools(paths: Paths, conf: VirtnetConf, nv_port0, nv_port1, takeover) -> dict[str, SfPool]:
    """One SF pool per RDMA device (the net kind starts them, keeping the
    SFs its recovered functions use)."""
    pools = {}
    for dev in conf.sf_devices:
        port_nv = nv_port0 if conf.pf_num(dev) == 0 else nv_port1
        pools[dev] = SfPool(paths.state_dir, total=port_nv.current["PF_TOTAL_SF"],
                            percent=conf.sf_pool_percent,
                            force_destroy=bool(conf.sf_pool_force_destroy) and takeover is None,
                            ib_dev=dev)
    return pools


def representor_factory(takeover):
    """The representor netdevs (create / attach / exists); in a live update,
    the ones handed over first."""
    real = types.SimpleNamespace(create=representor.Representor.create,
                                 attach=representor.Representor.attach, exists=representor.exists)
    return real if takeover is None else takeover.representor_factory(real)
