"""The virtio-net kind of function: the seed's static PFs, hot-plugged PFs
and SR-IOV VFs, and what `virtnet` does with them (hotplug, unplug, list,
query, modify, sriov_numvfs, vhostmgmt's device operations).

Creating a function builds its pieces in order -- SF, representor, device
model and engine rings, vhost-user endpoint, representor link, host
hot-plug, recovery file -- and undoes the ones already built if a later one
fails, so a failed command leaves nothing half created.  Removing one takes
its recovery file first, so a failure leaves it whole.  The functions are
the inventory's (inventory.py), beside the other kinds'.
"""
from __future__ import annotations

import errno
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from vfe.controller.functions import (
    DEFAULT_STATIC_PF_MAC_BASE, HOTPLUG, MAX_MTU, STATIC, VF, NetFunction, hotplug_pf_location,
    queue_pairs, static_pf_location, vf_location,
)
from vfe.controller.kind import (
    VF_STATE_OPS, InventoryError, Method, Undo, delete_record, query_entry, save_record,
)
from vfe.controller.net_recovery import NetCodec, RecoveryLoad, RecoveryRecord
from vfe.controller.recovery import RecoveryStore
from vfe.controller.sf_pool import SF_NUM_MIN
from vfe.devices.net import NET_FEATURES, NetConfig, NetDeviceModel
from vfe.macaddr import is_mac, mac_add, random_local_mac
from vfe.rpc import progress
from vfe.virtio.constants import MAX_QUEUE_SIZE, VIRTIO_NET_MTU_MIN, F, bit

log = logging.getLogger("vfe.controller")

# Virtqueues a function may have: the controller's max_virtq, as `virtnet
# list` shows it.  64 gives 32 RX/TX pairs (queue_pairs); the engine's
# NetDevice would take up to 128 (256 rings, cython_ext/net_device.pxi).
MAX_VIRTQ = 64
DEVICE_IN_USE = ("device {vuid} is in use by the guest's virtio driver; unbind it in the "
                 "guest first (echo <bdf> > /sys/bus/pci/drivers/virtio-pci/unbind)")
# the vhost-user bits a user's feature mask never takes away: QEMU needs them
# to talk to us at all
ALWAYS_OFFERED = bit(F.VHOST_USER_PROTOCOL_FEATURES) | bit(F.VHOST_LOG_ALL)


def offered_features(features: int) -> int:
    """The feature bits a function offers: a user's mask (``features``, 0
    for none) narrows the device's set, keeping ALWAYS_OFFERED."""
    return NET_FEATURES & (features | ALWAYS_OFFERED) if features else NET_FEATURES


def _destroy_representors(reps: list) -> None:
    """Delete many representor netdevs at once.  Each deletion waits for an
    RCU grace period in the kernel (the TAP's last close unregisters it);
    waits on several threads overlap, so 126 take a fraction of the time of
    one after the other.  Their data paths are detached already."""
    if len(reps) < 8:
        for rep in reps:
            rep.destroy()
        return
    with ThreadPoolExecutor(max_workers=16, thread_name_prefix="vfe-repdel") as pool:
        for fut in [pool.submit(rep.destroy) for rep in reps]:
            try:
                fut.result()
            except OSError as exc:
                log.error("cannot delete a representor: %s", exc)


class NetKind:
    """The net functions of one controller.  ``limits``: the NV
    configuration's (nvconfig.Limits); ``conf``: virtnet.conf; ``sf_pools``:
    {ib_dev: SfPool}; ``representors``: create(name) / attach(name) /
    exists(name); ``datapath``: "representor" or "switch"; ``host``: a
    hostqmp.HostQmp or None; ``run_time_state``: in a live update, what the
    old process had set at run time, by VUID -- ``qmp_id`` of a hot-plugged
    PF already in the host VM (the old controller plugged it; plugging again
    would fail), ``lm_state`` and ``paused`` (vf_state)."""

    name = "net"
    numbered_by_virtnet = True

    def __init__(self, inventory, daemon, paths, limits, conf, sf_pools, store: RecoveryStore,
                 representors, *, datapath: str = "representor", host=None,
                 run_time_state: dict[str, dict] | None = None):
        self.inventory = inventory
        self.daemon = daemon
        self.paths = paths
        self.limits = limits
        self.conf = conf
        self.sf_pools = sf_pools
        self.store = store
        self.representors = representors
        self.datapath = datapath
        self.host = host
        self.run_time_state = dict(run_time_state or {})
        self.plugged = {v: e["qmp_id"] for v, e in self.run_time_state.items() if e.get("qmp_id")}
        # with the configuration, the codec refuses the records it no longer matches
        self.codec = NetCodec(conf, limits)

    def functions(self) -> list[NetFunction]:
        return self.inventory.of_kind(self.name)

    def methods(self) -> dict[str, Method]:
        return {"hotplug": self.hotplug, "sriov_numvfs": self.sriov_numvfs}

    # ------------------------------------------------------------------ lookup

    def static_ib_dev(self) -> str:
        return self.conf.static_pf_device

    def pf_num_for(self, ib_dev: str) -> int:
        c = self.conf
        if c.is_lag:
            if ib_dev != c.ib_dev_lag:
                raise InventoryError(f"ib device {ib_dev!r} is not the LAG device {c.ib_dev_lag!r} (is_lag is 1)")
            return 0
        if ib_dev == c.ib_dev_p0:
            return 0
        if ib_dev == c.ib_dev_p1 and not c.single_port:
            return 1
        names = [c.ib_dev_p0] + ([] if c.single_port else [c.ib_dev_p1])
        raise InventoryError(f"unknown ib device {ib_dev!r} (this controller has {', '.join(names)})",
                             code=-errno.ENODEV)

    # ------------------------------------------------------------------ limits

    def max_queues_limit(self) -> int:
        # -n counts virtqueues including the control queue (seed: bound by
        # VIRTIO_NET_EMULATION_NUM_MSIX and max_virtq)
        return min(self.limits.pf_max_queues + 1, MAX_VIRTQ)

    def check_geometry(self, max_queues: int, max_queue_size: int, mtu: int) -> None:
        lim = self.max_queues_limit()
        if not 1 <= max_queues <= lim:
            raise InventoryError(
                f"max_queues {max_queues} is out of range 1..{lim} (bound by VIRTIO_NET_EMULATION_NUM_MSIX "
                f"and max_virtq {MAX_VIRTQ})", code=-errno.ERANGE)
        if not 2 <= max_queue_size <= MAX_QUEUE_SIZE or max_queue_size & (max_queue_size - 1):
            raise InventoryError(f"max_queue_size {max_queue_size} is not a power of two in "
                                 f"2..{MAX_QUEUE_SIZE}", code=-errno.ERANGE)
        if not VIRTIO_NET_MTU_MIN <= mtu <= MAX_MTU:
            raise InventoryError(f"mtu {mtu} is out of range {VIRTIO_NET_MTU_MIN}..{MAX_MTU}",
                                 code=-errno.ERANGE)

    @staticmethod
    def check_mac(mac: str) -> str:
        if not is_mac(mac):
            raise InventoryError(f"bad MAC address {mac!r} (expected xx:xx:xx:xx:xx:xx)")
        return mac

    def free_ports(self) -> list[int]:
        used = {f.port for f in self.functions() if f.device_type == HOTPLUG}
        return [p for p in range(self.limits.hotplug_ports) if p not in used]

    # ------------------------------------------------------------------ building

    def _build(self, f: NetFunction, undo: Undo, recovered: bool) -> None:
        """Create the pieces behind a function record (SF already reserved)."""
        rep = None
        if self.datapath == "representor":
            # A representor that exists already was left by an earlier run: the
            # recovered function's, or a pooled SF's whose function was not
            # recovered (recovery files deleted, recovery disabled): re-open it.
            stale = self.representors.exists(f.rep_name)
            try:
                rep = (self.representors.attach(f.rep_name) if stale
                       else self.representors.create(f.rep_name, mtu=f.mtu))
            except OSError as exc:
                raise InventoryError(f"cannot create representor {f.rep_name}: {exc}",
                                     code=-(exc.errno or errno.EIO))
            undo.push(rep.close if stale else rep.destroy)
            if stale and not recovered:
                rep.set_mtu(f.mtu)
            f.representor = rep
            f.ifindex = rep.ifindex
        cfg = NetConfig(socket=str(self.paths.endpoint_socket(f.vuid)), queues=queue_pairs(f.max_queues),
                        queue_size=f.max_queue_size, mtu=f.mtu, mac=f.mac, name=f.vuid)
        model = NetDeviceModel(self.daemon.engine, cfg)
        undo.push(model.close)
        model.features = offered_features(f.features)
        f.model = model
        f.socket = cfg.socket
        ep = self.daemon.add_endpoint(model, cfg.socket, False, f.vuid)
        undo.push(lambda: self.daemon.remove_endpoint(ep))
        f.endpoint = ep
        if rep is not None:
            model.rings.set_tap(rep.fd)
            undo.push(lambda: model.rings.set_tap(-1))

    def _save(self, f: NetFunction) -> None:
        if self.store.enabled:
            save_record(self.store, f.vuid, RecoveryRecord.of(f))

    def _remove(self, f: NetFunction, later: list | None = None) -> None:
        """Take a function away for good (unplug, VFs gone): its recovery
        file first -- if that cannot go, the function stays whole and the
        error says why, where a file left behind would bring the function
        back at the next start -- then its pieces, representor and SF."""
        delete_record(self.store, f.vuid, RecoveryRecord.of(f))
        self._teardown(f, destroy=True, later=later)
        self.inventory.discard(f)

    def _teardown(self, f: NetFunction, destroy: bool, later: list | None = None) -> None:
        """Take a function's pieces apart; `destroy` also takes it out of
        the host VM and removes its representor and SF (its recovery file
        is gone already: _remove), else they stay for the next start
        (shutdown).  `later`: collect the representors to delete instead of
        deleting them here (see _destroy_representors)."""
        if destroy and self.host is not None and f.qmp_id:
            self.host.unplug(f)
        if f.model is not None:
            f.model.rings.set_tap(-1)
        if f.endpoint is not None:
            self.daemon.remove_endpoint(f.endpoint)
        if f.model is not None:
            f.model.close()
        if f.representor is not None:
            if destroy and later is not None:
                later.append(f.representor)
            else:
                (f.representor.destroy if destroy else f.representor.close)()
        if destroy:
            self.sf_pools[f.ib_dev].release(f.sf_num)

    # ------------------------------------------------------------------ start / stop

    def restore(self, loaded: RecoveryLoad) -> str:
        """The SF pools keep the SFs of the recovered functions; then static
        PFs (taking back their recovered identity), recovered hot-plugged
        PFs, recovered VFs; then, in a live update, what the old process had
        set at run time.  ``loaded``: the records of the recovery files, or a
        live update's (the old process's functions as they run)."""
        records = loaded.records
        for dev, pool in self.sf_pools.items():
            report = pool.start(keep={r.sf_num: r.vuid for r in records if r.port_ib_dev == dev})
            if any(report.values()):
                log.info("SF pool of %s: %s", dev, ", ".join(f"{k} {v}" for k, v in report.items() if v))
        self._create_all(records)
        for f in self.functions():
            e = self.run_time_state.get(f.vuid, {})
            if e.get("lm_state"):
                f.lm_state = e["lm_state"]
            if e.get("paused"):
                f.model.rings.set_paused(True)
        return (f"{self.limits.static_pfs} static PF(s), {self.limits.hotplug_ports} hot-plug port(s), "
                f"{len(records)} recovered function(s)")

    def _create_all(self, records: list[RecoveryRecord]) -> None:
        by_vuid = {r.vuid: r for r in records}
        ib = self.static_ib_dev()
        pf_num = self.pf_num_for(ib)
        for i in range(self.limits.static_pfs):
            vuid, raw = static_pf_location(i)
            rec = by_vuid.pop(vuid, None)
            if rec is not None:
                self._restore(rec)
                continue
            self._create(NetFunction(
                pf_id=i, vf_id=-1, device_type=STATIC, vuid=vuid, bdf_raw=raw, ib_dev=ib,
                pf_num=pf_num, sf_num=0, mtu=1500,
                mac=self.conf.static_pf_mac(i) or mac_add(DEFAULT_STATIC_PF_MAC_BASE, i),
                max_queues=self.max_queues_limit(), max_queue_size=1024,
                num_msix=self.limits.pf_msix, features=0), preferred_sf=None)
        for rec in by_vuid.values():
            if rec.device_type == HOTPLUG:
                self._restore(rec)
        for rec in sorted(by_vuid.values(), key=lambda r: (r.pf_id, r.vf_id or 0)):
            if rec.function_type == "vf":
                self._restore(rec)

    def _restore(self, rec: RecoveryRecord) -> None:
        """Recreate a recorded function; a field its file lacks (the seed's
        files have none of vfe's) takes vfe's default."""
        f = NetFunction(
            pf_id=rec.pf_id, vf_id=-1 if rec.vf_id is None else rec.vf_id,
            device_type=VF if rec.function_type == "vf" else rec.device_type,
            vuid=rec.vuid, bdf_raw=rec.bdf_raw, ib_dev=rec.port_ib_dev, pf_num=rec.pf_num,
            sf_num=rec.sf_num, mac=rec.mac, mtu=rec.mtu or 1500,
            max_queues=rec.max_queues or 2, max_queue_size=rec.max_queue_size or 256,
            num_msix=self.limits.pf_msix if rec.num_msix is None else rec.num_msix,
            features=rec.features or 0, legacy=rec.legacy, port=-1 if rec.port is None else rec.port)
        try:
            self._create(f, preferred_sf=f.sf_num, recovered=True)
            log.info("%s: recovered (%s, SF %d, MAC %s)", f.vuid, f.bdf, f.sf_num, f.mac)
        except (InventoryError, OSError, ValueError) as exc:
            log.error("%s: cannot recover: %s", f.vuid, exc)

    def _create(self, f: NetFunction, preferred_sf: int | None, recovered: bool = False) -> NetFunction:
        undo = Undo()
        try:
            if not recovered:                      # a recovered SF was kept in use by SfPool.start
                try:
                    pool = self.sf_pools[f.ib_dev]
                    f.sf_num = pool.reserve(preferred_sf, vuid=f.vuid)
                except RuntimeError as exc:       # SfPoolExhausted, SfInUse, SfPoolError
                    raise InventoryError(str(exc), code=-errno.ENOSPC) from None
                # a failed creation gives the SF back as it was (cancel, not release)
                undo.push(lambda: pool.cancel(f.sf_num))
            f.sf_index = f.sf_num - SF_NUM_MIN
            self._build(f, undo, recovered)
            if f.vuid in self.plugged:
                f.qmp_id = self.plugged.pop(f.vuid)
            elif f.device_type == HOTPLUG and self.host is not None:
                f.qmp_id = self.host.plug(f)
                undo.push(lambda: self.host.unplug(f))
            self._save(f)
        except BaseException:
            undo.run()
            raise
        self.inventory.add(f)
        return f

    def shutdown(self) -> None:
        for f in self.functions():
            try:
                self._teardown(f, destroy=False)
            except Exception:
                log.exception("%s: teardown failed", f.vuid)
            self.inventory.discard(f)

    def update_refusal(self) -> None:
        return None        # a live update hands every net function over (update.py)

    # ------------------------------------------------------------------ virtnet operations

    def hotplug(self, p: dict) -> dict:
        ib_dev = p.get("ib_device")
        if not ib_dev:
            raise InventoryError("hotplug needs -i IB_DEVICE")
        pf_num = self.pf_num_for(ib_dev)
        mac = self.check_mac(p.get("mac", ""))
        mtu = int(p.get("mtu", 1500))
        max_queues = int(p.get("max_queues", 2))
        max_queue_size = int(p.get("max_queue_size", 256))
        self.check_geometry(max_queues, max_queue_size, mtu)
        legacy = bool(p.get("legacy"))
        if legacy:
            if not self.limits.transitional:
                raise InventoryError("transitional (legacy) devices are not enabled: set "
                                     "VIRTIO_NET_EMULATION_PF_PCI_LAYOUT=1 and VIRTIO_EMULATION_HOTPLUG_TRANS=1 "
                                     "with vfe-mlxconfig and restart the controller", code=-errno.EOPNOTSUPP)
            n_legacy = sum(1 for f in self.functions() if f.legacy)
            if n_legacy >= self.limits.transitional_max:
                raise InventoryError(
                    f"no I/O port space for another transitional device ({n_legacy} of "
                    f"{self.limits.transitional_max}: (allocated I/O space - 4K) / 4K)", code=-errno.ENOSPC)
        free = self.free_ports()
        if not free:
            raise InventoryError(f"all {self.limits.hotplug_ports} hot-plug switch ports are in use "
                                 f"(PCI_SWITCH_EMULATION_NUM_PORT)", code=-errno.ENOSPC)
        port = free[0]
        vuid, raw = hotplug_pf_location(port)
        pf_id = max([f.pf_id for f in self.functions() if f.is_pf], default=-1) + 1
        sf = p.get("sf_num")
        f = NetFunction(
            pf_id=pf_id, vf_id=-1, device_type=HOTPLUG, vuid=vuid, bdf_raw=raw, ib_dev=ib_dev,
            pf_num=pf_num, sf_num=0, mac=mac, mtu=mtu, max_queues=max_queues,
            max_queue_size=max_queue_size, num_msix=min(self.limits.pf_msix, max_queues + 1),
            features=int(p.get("features") or 0), legacy=legacy, port=port)
        self._create(f, preferred_sf=None if sf is None else int(sf))
        log.info("%s: hot-plugged at %s (id %d, SF %d, representor %s)", f.vuid, f.bdf, f.pf_id,
                 f.sf_num, f.rep_name)
        return {"bdf": f.bdf, "vuid": f.vuid, "id": f.pf_id, "transitional": int(f.legacy),
                "sf_rep_net_device": f.rep_name, "mac": f.mac}

    def unplug(self, f: NetFunction, p: dict) -> dict:
        if f.device_type != HOTPLUG:
            raise InventoryError(f"{f.vuid} is a {f.device_type} function: only hot-plugged PFs can be "
                                 f"unplugged", code=-errno.EPERM)
        self._remove(f)
        log.info("%s: unplugged", f.vuid)
        return {"id": f.pf_id, "vuid": f.vuid, "status": "success"}

    def summary(self) -> dict:
        return {
            "emulation_manager": self.static_ib_dev(),
            "max_hotplug_devices": self.limits.hotplug_ports,
            "max_virt_net_devices": self.limits.static_pfs + self.limits.hotplug_ports,
            "max_virtq": MAX_VIRTQ,
            "free_switch_ports": len(self.free_ports()),
            "supported_features": f"{NET_FEATURES:#x}",
            "datapath": self.datapath,
        }

    def in_list_order(self, functions: list[NetFunction]) -> list[NetFunction]:
        return functions                  # as created: the seed's order

    def query_entry(self, f: NetFunction, brief: bool) -> dict:
        out = query_entry(f, brief)
        if not brief and self.datapath == "switch":
            out["switch"] = f.model.switch_stats()      # port security (its MAC is net_mac)
        return out

    def modify(self, f: NetFunction, p: dict) -> dict:
        changes: dict[str, Any] = {}
        if p.get("mac") is not None:
            changes["mac"] = self.check_mac(p["mac"])
        if p.get("mtu") is not None:
            changes["mtu"] = int(p["mtu"])
        if p.get("features") is not None:
            changes["features"] = int(p["features"])
        if p.get("msix_num") is not None:
            changes["num_msix"] = int(p["msix_num"])
            if not 1 <= changes["num_msix"] <= self.limits.pf_msix:
                raise InventoryError(f"msix_num {changes['num_msix']} is out of range 1..{self.limits.pf_msix}",
                                     code=-errno.ERANGE)
        if p.get("max_queue_size") is not None:
            changes["max_queue_size"] = int(p["max_queue_size"])
        if p.get("link_state") is not None and not changes:
            raise InventoryError("link state follows the guest's vhost-user connection here; it cannot be "
                                 "forced with modify -e", code=-errno.EOPNOTSUPP)
        if not changes:
            raise InventoryError("nothing to modify: give at least one of -m -t -f -n -q")
        self.check_geometry(f.max_queues, changes.get("max_queue_size", f.max_queue_size),
                            changes.get("mtu", f.mtu))
        if f.bound():
            raise InventoryError(DEVICE_IN_USE.format(vuid=f.vuid), code=-errno.EBUSY)
        old = {k: getattr(f, k) for k in changes}
        for k, v in changes.items():
            setattr(f, k, v)
        try:
            self._apply_modify(f, changes)
            self._save(f)
        except BaseException:
            for k, v in old.items():
                setattr(f, k, v)
            raise
        log.info("%s: modified %s", f.vuid, ", ".join(f"{k}={v}" for k, v in changes.items()))
        return {"vuid": f.vuid, "modified": sorted(changes), "status": "success"}

    def _apply_modify(self, f: NetFunction, changes: dict) -> None:
        m = f.model
        if "mtu" in changes:
            m.mtu = f.mtu
        if "max_queue_size" in changes:
            m.config.queue_size = f.max_queue_size
        if "features" in changes:
            m.features = offered_features(f.features)
        if "mac" in changes:
            m.set_mac(f.mac)
        if self.host is not None and f.qmp_id and ({"mac", "mtu"} & set(changes)):
            # the guest reads MAC and MTU from the PCI function's config space,
            # which QEMU owns: re-create the function with the new values
            self.host.replug(f)

    # ------------------------------------------------------------------ SR-IOV

    def vfs_of(self, pf: NetFunction) -> list[NetFunction]:
        return sorted((f for f in self.functions() if f.device_type == VF and f.pf_id == pf.pf_id),
                      key=lambda f: f.vf_id)

    def sriov_numvfs(self, p: dict) -> dict:
        """The host's `echo N > .../sriov_numvfs` on a static PF: create VFs
        0..N-1 (N > 0, none existing) or destroy them all (N = 0).  Without
        num_vfs, report the current count."""
        pf = self.inventory.pick({"pf": p.get("pf"), "vuid": p.get("vuid")}, kind=self.name) \
            if p.get("bdf") is None else \
            next((f for f in self.functions() if f.bdf == p["bdf"] and f.is_pf), None)
        if pf is None:
            raise InventoryError(f"no PF at {p['bdf']}", code=-errno.ENODEV)
        vfs = self.vfs_of(pf)
        n = p.get("num_vfs")
        if n is None:
            return {"pf_id": pf.pf_id, "bdf": pf.bdf, "sriov_numvfs": len(vfs),
                    "sriov_totalvfs": self.limits.vfs_per_pf}
        n = int(n)
        if p.get("legacy"):
            raise InventoryError("Transitional VirtIO-net VF devices are not currently supported",
                                 code=-errno.EOPNOTSUPP)
        if pf.device_type != STATIC:
            raise InventoryError(f"{pf.vuid} is a hot-plugged PF: SR-IOV VFs are only supported on "
                                 f"static PFs", code=-errno.EOPNOTSUPP)
        pool = self.sf_pools[pf.ib_dev]
        if n == 0:
            reps: list = []
            try:
                with pool.batch():
                    for k, f in enumerate(reversed(vfs), 1):
                        self._remove(f, later=reps)
                        progress.report(k, len(vfs))
            finally:                          # the VFs gone so far, if one could not go
                _destroy_representors(reps)
            log.info("PF(%d): Unload (%d) VFs finished", pf.pf_id, len(vfs))
            return {"pf_id": pf.pf_id, "sriov_numvfs": 0, "destroyed": len(vfs)}
        if vfs:
            raise InventoryError(f"PF {pf.pf_id} already has {len(vfs)} VFs: write 0 first",
                                 code=-errno.EBUSY)
        if n > self.limits.vfs_per_pf:
            raise InventoryError(f"{n} VFs is more than VIRTIO_NET_EMULATION_NUM_VF="
                                 f"{self.limits.vfs_per_pf} allows for a PF (SRIOV_EN must be 1)",
                                 code=-errno.ERANGE)
        total = sum(1 for f in self.functions() if f.device_type == VF)
        if total + n > self.limits.total_vfs:
            raise InventoryError(f"{n} more VFs would exceed {self.limits.total_vfs} VFs in all",
                                 code=-errno.ENOSPC)
        created: list[NetFunction] = []
        with pool.batch():
            self._create_vfs(pf, n, created)
        log.info("PF(%d): Load (%d) VFs finished", pf.pf_id, n)
        return {"pf_id": pf.pf_id, "sriov_numvfs": n,
                "vfs": [{"vf_id": f.vf_id, "vuid": f.vuid, "bdf": f.bdf} for f in created]}

    def _create_vfs(self, pf: NetFunction, n: int, created: list[NetFunction]) -> None:
        try:
            for vf_id in range(n):
                vuid, raw = vf_location(pf.vuid, pf.pf_id, vf_id)
                mac = self.conf.vf_mac(pf.pf_id, vf_id, self.limits.vfs_per_pf) or random_local_mac()
                f = NetFunction(
                    pf_id=pf.pf_id, vf_id=vf_id, device_type=VF, vuid=vuid, bdf_raw=raw,
                    ib_dev=pf.ib_dev, pf_num=pf.pf_num, sf_num=0, mac=mac, mtu=1500,
                    max_queues=min(self.limits.vf_max_queues + 1, MAX_VIRTQ), max_queue_size=1024,
                    num_msix=self.limits.vf_msix, features=self.conf.vf.features or 0)
                created.append(self._create(f, preferred_sf=None))
                progress.report(len(created), n)
        except BaseException:
            for f in reversed(created):       # all or nothing, like the PCI core's enable
                self._remove(f)
            raise

    # ------------------------------------------------------------------ device state (vhostmgmt vf -o)

    def vf_state(self, f: NetFunction, p: dict) -> dict:
        """The VFE vDPA device operations: 1 running, 2 quiesced, 3 freeze
        (the data path stops: guest TX waits in its ring, nothing is lost),
        4/5 start/stop dirty logging into the log the front-end mapped
        (QEMU's SET_LOG_BASE), 6 the status."""
        op = int(p.get("op", 6))
        if op not in VF_STATE_OPS:
            raise InventoryError(f"operation {op} is not one of 1..6 "
                                 f"({', '.join(f'{k} {v}' for k, v in VF_STATE_OPS.items())})")
        rings = f.model.rings
        sess = f.endpoint.session if f.endpoint is not None else None
        if op in (1, 2, 3):
            rings.set_paused(op != 1)
            f.lm_state = VF_STATE_OPS[op]
            log.info("%s: data path %s", f.vuid, f.lm_state)
        elif op in (4, 5):
            if sess is None or sess.log_region is None:
                raise InventoryError(f"{f.vuid}: no dirty log: the front-end maps one (SET_LOG_BASE) when "
                                     f"a migration starts", code=-errno.ENODATA)
            if not sess.drives_device():
                raise InventoryError(f"{f.vuid}: this front-end does not run the device", code=-errno.EBUSY)
            rings.set_features(sess.features | bit(F.VHOST_LOG_ALL) if op == 4 else sess.features)
            log.info("%s: dirty logging %s", f.vuid, "started" if op == 4 else "stopped")
        return {"vuid": f.vuid, "bdf": f.bdf, "state": f.lm_state,
                "logging": rings.logging,
                "log_size": sess.log_region.size if sess is not None and sess.log_region else 0}
