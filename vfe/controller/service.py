"""virtio-net-controller as a service: the emulated DPU.

Start-up order, as the seed describes the product: apply pending firmware
(NV) configuration -- the "cold reboot" -- and refuse to run unless
VIRTIO_NET_EMULATION_ENABLE is set; read virtnet.conf once; check the
recovery files against the configuration; open the SF pools; create the
static PFs and recover the hot-plugged ones and the blk functions; then
serve `virtnet` on the RPC socket.

``build`` does it in that order, each object made from the ones before it:
the recovery store (a codec per kind), the inventory and its kinds (net,
blk), then the RPC server with the method table they registered.
"""
from __future__ import annotations

import logging
import socket
import types
from dataclasses import dataclass

from vfe.controller import nvconfig
from vfe.controller.blk_kind import BlkKind
from vfe.controller.blk_recovery import BlkCodec, BlkLoad
from vfe.controller.control import ControlServer
from vfe.controller.hostqmp import HostQmp
from vfe.controller.inventory import Inventory
from vfe.controller.kind import InventoryError
from vfe.controller.net_kind import NetKind
from vfe.controller.net_recovery import NetCodec
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
    net: NetKind
    blk: BlkKind
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
    nv, nv1 = firmware(paths, reboot=takeover is None)
    lim = nvconfig.limits(nv)
    conf = virtnet_conf(paths)
    store = RecoveryStore(paths.recovery_dir, [NetCodec(conf, nv), BlkCodec()], enabled=conf.recovery,
                          display_dir=paths.display(paths.recovery_dir))
    net_records, blk_loaded = recovered(store, takeover)
    pools = sf_pools(paths, conf, nv, nv1, net_records, takeover)
    host = HostQmp(host_qmp) if host_qmp else None

    inventory = Inventory()
    net = NetKind(inventory, daemon, paths, lim, conf, pools, store, representors(takeover),
                  datapath=datapath, host=host,
                  plugged={} if takeover is None else
                  {v: e["qmp_id"] for v, e in takeover.extra.items() if e.get("qmp_id")})
    blk = BlkKind(inventory, daemon, paths, store)
    inventory.register(net)
    inventory.register(blk)
    try:
        net.start(net_records)
    except InventoryError as exc:     # a clean refusal, not a traceback
        inventory.shutdown()
        raise ServiceError(f"cannot create the functions: {exc}") from None
    if takeover is not None:
        resume_run_time_state(net, takeover.extra)
    # blk functions come back from their files, in a live update too (the
    # old process wrote them; a malloc bdev, whose data cannot move, refuses
    # the update before it starts)
    n_bdevs, n_blk = blk.restore(blk_loaded)

    control = ControlServer(daemon, paths.rpc_socket, inventory.methods(), argv=argv or [], net=net,
                            bdevs=blk.bdevs,
                            sock=None if takeover is None else socket.socket(fileno=takeover.rpc_fd))
    service = Service(inventory, net, blk, control, pools, host)
    daemon.on_shutdown.append(service.stop)
    log.info("%d static PF(s), %d hot-plug port(s), %d recovered function(s), %d recovered bdev(s) "
             "and %d blk controller(s); virtnet on %s",
             lim.static_pfs, lim.hotplug_ports, len(net_records), n_bdevs, n_blk, paths.rpc_socket)
    return service


def firmware(paths: Paths, reboot: bool) -> tuple[nvconfig.NvConfig, nvconfig.NvConfig]:
    """Both ports' NV configuration; at a (cold) start, their pending values
    applied first (a live update is no reboot).  ServiceError unless
    emulation is enabled."""
    nv = nvconfig.NvConfig.load(paths.state_dir)
    nv1 = nvconfig.NvConfig.load(paths.state_dir, nvconfig.PORT1_DEVICE)
    for dev_nv in (nv, nv1) if reboot else ():
        applied = dev_nv.apply_pending()
        if applied:
            log.info("applied new firmware configuration of %s: %s", dev_nv.device,
                     ", ".join(f"{k}={new}" for k, (_, new) in applied.items()))
    reason = nvconfig.service_check(nv)
    if reason:
        raise ServiceError(reason)
    return nv, nv1


def virtnet_conf(paths: Paths) -> VirtnetConf:
    try:
        return load_virtnet_conf(paths.conf)
    except ConfigError as exc:
        # the message names the file as the seed does; exc's own text repeats the real path
        key = f"{exc.key}: " if exc.key else ""
        raise ServiceError(f"{paths.display(paths.conf)}: {key}{exc.message}") from None


def recovered(store: RecoveryStore, takeover) -> tuple[list[dict], BlkLoad]:
    """The net functions to recreate (their records as their files hold
    them: a live update's are the running ones, as they are now) and the
    blk side's records; every file is checked before anything is created,
    and a bad one stops the start (ServiceError)."""
    blk_loaded = store.load("blk")
    if takeover is not None:
        records = takeover.records
        problems = list(blk_loaded.problems)
    else:
        loaded = store.load("net")
        problems = list(loaded.problems) + list(blk_loaded.problems)
        records = [r.to_json() for r in loaded.records]
    if problems:
        raise ServiceError("; ".join(str(p) for p in problems))
    return records, blk_loaded


def sf_pools(paths: Paths, conf: VirtnetConf, nv, nv1, records: list[dict], takeover) -> dict[str, SfPool]:
    """One SF pool per RDMA device, keeping the SFs the records use."""
    pools = {}
    for dev in conf.sf_devices:
        port_nv = nv if conf.pf_num(dev) == 0 else nv1
        pool = SfPool(paths.state_dir, total=port_nv.current["PF_TOTAL_SF"],
                      percent=conf.sf_pool_percent,
                      force_destroy=bool(conf.sf_pool_force_destroy) and takeover is None,
                      ib_dev=dev)
        report = pool.start(keep={r["sf_num"]: r["vuid"] for r in records if r["port_ib_dev"] == dev})
        if any(report.values()):
            log.info("SF pool of %s: %s", dev, ", ".join(f"{k} {v}" for k, v in report.items() if v))
        pools[dev] = pool
    return pools


def representors(takeover):
    """The representor netdevs (create / attach / exists); in a live update,
    the ones handed over first."""
    real = types.SimpleNamespace(create=representor.Representor.create,
                                 attach=representor.Representor.attach, exists=representor.exists)
    return real if takeover is None else takeover.representor_factory(real)


def resume_run_time_state(net: NetKind, extra: dict[str, dict]) -> None:
    """What the old process of a live update had set at run time."""
    for f in net.functions():
        e = extra.get(f.vuid, {})
        if e.get("lm_state"):
            f.lm_state = e["lm_state"]
        if e.get("paused"):
            f.model.rings.set_paused(True)
