"""virtio-net-controller as a service: the emulated DPU.

Start-up order, as the seed describes the product: apply pending firmware
(NV) configuration -- the "cold reboot" -- and refuse to run unless
VIRTIO_NET_EMULATION_ENABLE is set; read virtnet.conf once; open the SF
pool; check the recovery files against the configuration; create the static
PFs and recover the hot-plugged ones; then serve `virtnet` on the RPC socket.
"""
from __future__ import annotations

import logging
import types

from vfe.controller import nvconfig
from vfe.controller.paths import Paths

log = logging.getLogger("vfe.controller")


class ServiceError(Exception):
    """The service cannot start; the message tells the user what to do."""


def representor_factory():
    from vfe.ports import representor as rep
    return types.SimpleNamespace(create=rep.Representor.create, attach=rep.Representor.attach,
                                 exists=rep.exists)


def build(daemon, paths: Paths, *, datapath: str = "representor", host_qmp: str | None = None,
          argv: list[str] | None = None, takeover=None):
    """Everything but the loop: returns the Inventory, serving on daemon.

    ``argv`` is the controller's command line (a live update starts the new
    build with it); ``takeover`` (vfe.controller.update.Takeover) makes this
    the new process of a live update: the functions are the old process's,
    served on the sockets, representors and connections it handed over."""
    from vfe.controller.inventory import Inventory, InventoryError
    from vfe.controller.recovery import RecoveryStore
    from vfe.controller.sf_pool import SfPool
    from vfe.controller.virtnet_conf import ConfigError, load_virtnet_conf
    from vfe.rpc.protocol import RpcError
    from vfe.rpc.server import RpcServer

    paths.ensure()
    nv = nvconfig.NvConfig.load(paths.state_dir)
    nv1 = nvconfig.NvConfig.load(paths.state_dir, nvconfig.PORT1_DEVICE)
    for dev_nv in (nv, nv1):          # the cold reboot applies both ports' pending values
        if takeover is not None:
            break                     # a live update is no reboot
        applied = dev_nv.apply_pending()
        if applied:
            log.info("applied new firmware configuration of %s: %s", dev_nv.device,
                     ", ".join(f"{k}={new}" for k, (_, new) in applied.items()))
    reason = nvconfig.service_check(nv)
    if reason:
        raise ServiceError(reason)
    lim = nvconfig.limits(nv)
    try:
        conf = load_virtnet_conf(paths.conf)
    except ConfigError as exc:
        # the message names the file as the seed does; exc's own text repeats the real path
        key = f"{exc.key}: " if exc.key else ""
        raise ServiceError(f"{paths.display(paths.conf)}: {key}{exc.message}") from None

    store = RecoveryStore(paths.recovery_dir, enabled=conf.recovery,
                          display_dir=paths.display(paths.recovery_dir))
    from vfe.controller import blk_functions
    from vfe.controller.blk_recovery import BlkRecoveryStore
    blk_store = BlkRecoveryStore(paths.recovery_dir, enabled=conf.recovery,
                                 display_dir=paths.display(paths.recovery_dir))
    # blk functions come back from their files, in a live update too (the
    # old process wrote them; a malloc bdev, whose data cannot move, refuses
    # the update before it starts)
    blk_loaded = blk_store.load()     # checked before anything is created, like the net files
    if takeover is not None:
        records = takeover.records     # the running functions, as they are now
        problems = list(blk_loaded.problems)
    else:
        loaded = store.load_compatible(conf, nv)
        problems = list(loaded.problems) + list(blk_loaded.problems)
        records = [r.to_json() | {"vuid": r.vuid} for r in loaded.records]
    if problems:
        raise ServiceError("; ".join(str(p) for p in problems))

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
    host = None
    if host_qmp:
        from vfe.controller.hostqmp import HostQmp
        host = HostQmp(host_qmp)
    reps = representor_factory()
    if takeover is not None:
        reps = takeover.representor_factory(reps)
    inv = Inventory(daemon, paths, lim, conf, pools, store, reps, datapath=datapath, host=host)
    if takeover is not None:
        inv.plugged = {v: e["qmp_id"] for v, e in takeover.extra.items() if e.get("qmp_id")}
    try:
        inv.start(records)
    except InventoryError as exc:     # a clean refusal, not a traceback
        inv.shutdown()
        raise ServiceError(f"cannot create the functions: {exc}") from None

    if takeover is not None:
        for f in inv.functions:           # what the old process had set at run time
            extra = takeover.extra.get(f.vuid, {})
            if extra.get("lm_state"):
                f.lm_state = extra["lm_state"]
            if extra.get("paused"):
                f.model.rings.set_paused(True)

    # vfe-rpc: bdevs and virtio-blk functions, recorded in <recovery>/blk and
    # shown by virtnet list/query (a copy of the table: the wrappers are this run's)
    handlers = dict(HANDLERS)
    blk = blk_functions.register(handlers, daemon, paths, store=blk_store)
    n_bdevs, n_blk = blk.restore(blk_loaded)

    from vfe.controller.update import LiveUpdate
    updater = LiveUpdate(daemon, inv, lambda: rpc, argv or [], blk=blk)
    handlers.update(update_start=lambda inv, p: updater.start(p),
                    update_status=lambda inv, p: updater.status(p),
                    version=lambda inv, p: inv.version(p) | _update_version(updater))

    def handle(method: str, params: dict):
        fn = handlers.get(method)
        if fn is None:
            raise RpcError.method_not_found(method)
        try:
            if updater.moving:
                return updater.answer_while_moving(method, params or {}, lambda: fn(inv, params or {}))
            return fn(inv, params or {})
        except InventoryError as exc:
            raise RpcError(exc.code, str(exc)) from None

    if takeover is not None:
        import socket
        rpc = RpcServer(paths.rpc_socket, handle, daemon.sel, sock=socket.socket(fileno=takeover.rpc_fd))
    else:
        rpc = RpcServer(paths.rpc_socket, handle, daemon.sel)
    inv.rpc = rpc
    inv.updater = updater

    def stop():
        rpc.close()
        inv.shutdown()
        for pool in pools.values():
            pool.stop()
        if host is not None:
            host.close()

    daemon.on_shutdown.append(stop)
    log.info("%d static PF(s), %d hot-plug port(s), %d recovered function(s), %d recovered bdev(s) "
             "and %d blk controller(s); virtnet on %s",
             lim.static_pfs, lim.hotplug_ports, len(records), n_bdevs, n_blk, paths.rpc_socket)
    return inv


def _update_version(updater) -> dict:
    """`virtnet version` during a live update shows the new controller too."""
    st = updater.state
    if st.get("status") in ("in progress", "moving"):
        return {"update": {"version": st["to"], "pid": st["pid"], "status": st["status"]}}
    return {}


def _set_log_level(inv, p: dict) -> dict:
    from vfe.cli.controller import LOG_LEVELS
    level = p.get("level")
    if level not in LOG_LEVELS:
        from vfe.controller.inventory import InventoryError
        raise InventoryError(f"log level must be one of {', '.join(LOG_LEVELS)}")
    logging.getLogger().setLevel(LOG_LEVELS[level])
    log.info("log level set to %s", level)
    return {"level": level, "status": "success"}


HANDLERS = {
    "hotplug": lambda inv, p: inv.hotplug(p),
    "unplug": lambda inv, p: inv.unplug(p),
    "list": lambda inv, p: inv.list(p),
    "query": lambda inv, p: inv.query(p),
    "modify": lambda inv, p: inv.modify(p),
    "log": _set_log_level,
    "version": lambda inv, p: inv.version(p),
    "sriov_numvfs": lambda inv, p: inv.sriov_numvfs(p),
    "vf_state": lambda inv, p: inv.vf_state(p),
}
