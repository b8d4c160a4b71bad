"""The controller process: the engine and its workers, the daemon's loop,
the signals that stop it, and what it serves -- the devices of the command
line, the service (service.py), or, as the new process of a live update,
the service the old process hands over (update.Takeover).

vfe.cli.controller parses the command line and calls ``main``; it imports
this module only after a live update's checked engine is loaded (newbuild.py),
since everything here imports vfe.engine.  Importing it also imports all a
take-over needs, before the old process pauses a single ring.
"""
from __future__ import annotations

import gc
import logging
import os
import resource
import signal
import time
from dataclasses import dataclass, field

from vfe import __version__
from vfe.controller import sdnotify, service
from vfe.controller.daemon import Daemon
from vfe.controller.paths import Paths
from vfe.controller.update import HANDED_OVER_KIND, Takeover
from vfe.devices.blk import BlkConfig
from vfe.devices.net import NetConfig
from vfe.engine import Engine, install_kernels
from vfe.safepath import UnsafePath

log = logging.getLogger("vfe.controller")


@dataclass
class Options:
    """What the command line asks for (vfe.cli.controller)."""

    workers: int = 1
    mode: str = "adaptive"             # poll | adaptive
    spin_us: int = 50
    devices: list[NetConfig | BlkConfig] = field(default_factory=list)    # --device: no service
    paths: Paths | None = None         # service mode
    datapath: str = "representor"
    host_qmp: str | None = None
    argv: list[str] = field(default_factory=list)    # our own, for a live update's new process
    takeover_fd: int | None = None     # we are a live update's new process


def freeze_startup_heap() -> None:
    """Move what start-up built (numba, llvmlite, pyroute2, ...: ~135k objects
    that live as long as the process) out of the cyclic GC's sight.

    CPython runs a full collection only when the objects promoted since the
    last one reach a quarter of the long-lived heap.  Against that heap the
    reference cycles each hot-plug leaves behind (pyroute2's request and
    message objects) piled up for ~1100 hot-plug/unplug cycles -- 7 MB, three
    obmalloc arenas -- before a 0.2 s pass freed them.  Frozen, start-up no
    longer counts (nor is it scanned): a full pass comes every ~130 cycles,
    takes a millisecond at most, and memory stays flat.  (A frozen object is still
    freed by its refcount; only a frozen cycle would never be.)"""
    gc.collect()          # start-up's own garbage is freed, not frozen
    gc.freeze()
    gc.collect()          # the full-collection threshold now counts only what comes after


def raise_fd_limit() -> None:
    """Hundreds of functions hold a representor fd and a socket each."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(opts: Options) -> int:
    """Serve until SIGTERM/SIGINT; the process's exit status."""
    raise_fd_limit()
    install_kernels()
    engine = Engine(workers=opts.workers, mode=opts.mode, spin_us=opts.spin_us)
    daemon = Daemon(engine)
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    signal.signal(signal.SIGINT, lambda *_: daemon.stop())
    if opts.takeover_fd is not None:
        return take_over(opts, daemon, engine)
    try:
        if opts.devices:
            for cfg in opts.devices:
                if isinstance(cfg, BlkConfig):
                    daemon.add_blk_device(cfg)
                else:
                    daemon.add_net_device(cfg)
        else:
            service.build(daemon, opts.paths, datapath=opts.datapath, host_qmp=opts.host_qmp,
                          argv=opts.argv)
    except OSError as exc:
        if isinstance(exc, UnsafePath):             # the message names the path and what is wrong
            log.error("%s", exc)
        else:
            log.error("cannot open %s: %s", exc.filename or "socket", exc.strerror or exc)
        daemon.shutdown()
        return 1
    except service.ServiceError as exc:
        log.error("%s", exc)
        daemon.shutdown()
        return os.EX_CONFIG        # refused configuration: systemd must not restart it in a loop
    freeze_startup_heap()
    log.info("v%s serving %d device(s), %d worker(s), %s mode",
             __version__, len(daemon.endpoints), opts.workers, opts.mode)
    sdnotify.notify(ready=1)
    daemon.run()
    return 0


def take_over(opts: Options, daemon: Daemon, engine: Engine) -> int:
    """The new process of a live update: everything is ready (modules
    imported, engine running) before the old process pauses a single ring;
    then build from what it hands over, and serve."""
    takeover = Takeover(opts.takeover_fd)
    engine.start()
    freeze_startup_heap()     # now: its full collection must not fall into the data path's gap
    try:
        takeover.hello()
        takeover.receive(daemon)
        received = time.monotonic()
        svc = service.build(daemon, opts.paths, datapath=opts.datapath, host_qmp=opts.host_qmp,
                            argv=opts.argv, takeover=takeover)
        gap_ms = takeover.done(daemon, svc.control.rpc)
    except Exception as exc:
        log.error("live update: cannot take over: %s", exc)
        takeover.fail(str(exc))
        os._exit(1)       # tear nothing down: every socket and netdev is still the old process's
    svc.control.updater.took_over(takeover.from_version, gap_ms)
    log.info("live update from %s: took over %d function(s) (data path gap %.1f ms: %.1f receiving, "
             "%.1f building)", takeover.from_version, len(svc.inventory.of_kind(HANDED_OVER_KIND)), gap_ms,
             (received - takeover.paused_at) * 1e3, gap_ms - (received - takeover.paused_at) * 1e3)
    log.info("v%s serving %d device(s), %d worker(s), %s mode",
             __version__, len(daemon.endpoints), opts.workers, opts.mode)
    sdnotify.notify(ready=1)
    daemon.run()
    return 0
