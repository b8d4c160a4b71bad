"""`virtio-net-controller`: the daemon's command line.

    virtio-net-controller --device net,socket=PATH[,client=on][,mac=MAC][,queues=N][,queue-size=N]
                          --device blk,socket=PATH,bdev=null|malloc,size=MB,block-size=512
                                   [,queues=N][,ro=on][,serial=STR][,client=on][,in-order=on]
                          --device blk,socket=PATH,bdev=file,path=FILE[,size=MB][,direct=on]...
                          [--device ...] [--mode poll|adaptive] [--workers N]

Runs in the foreground, logs to stderr, stops cleanly on SIGTERM/SIGINT.
"""
from __future__ import annotations

import argparse
import logging
import sys

from vfe import __version__, macaddr
from vfe.controller.metrics_http import parse_address
from vfe.controller.newbuild import load_engine
from vfe.controller.paths import Paths
from vfe.devices.blk import BlkConfig
from vfe.devices.net import NetConfig
from vfe.journal import LOG_LEVELS, setup_logging
from vfe.virtio.constants import MAX_QUEUE_SIZE, VIRTIO_NET_MTU_MAX, VIRTIO_NET_MTU_MIN

_BOOL = {"on": True, "yes": True, "true": True, "1": True,
         "off": False, "no": False, "false": False, "0": False}


def parse_mac(text: str) -> str:
    """``text`` in lower case, if it is a MAC address (vfe/macaddr.py)."""
    try:
        macaddr.parse_mac(text)
    except ValueError:
        raise ValueError(f"bad MAC address {text!r} (expected six hex octets like 52:54:00:12:34:56)") from None
    return text.lower()


def parse_device(text: str) -> NetConfig | BlkConfig:
    """Parse a QEMU-style `net,socket=PATH,...` or `blk,socket=PATH,...` device option."""
    kind, _, rest = text.partition(",")
    if kind not in ("net", "blk"):
        raise argparse.ArgumentTypeError(f"unknown device type {kind!r} (supported: net, blk)")
    opts: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"device option {item!r} needs a value (key=value)")
        if key in opts:
            raise argparse.ArgumentTypeError(f"device option {key!r} given twice")
        opts[key] = value
    if kind == "blk":
        return _parse_blk(opts)
    known = {"socket", "client", "mac", "queues", "queue-size", "mtu", "name", "incoming"}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown device option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    if not opts.get("socket"):
        raise argparse.ArgumentTypeError("device needs socket=PATH")
    try:
        cfg = NetConfig(socket=opts["socket"], name=opts.get("name", ""))
        if "client" in opts:
            if opts["client"].lower() not in _BOOL:
                raise ValueError(f"client={opts['client']!r}: use on or off")
            cfg.client = _BOOL[opts["client"].lower()]
        if "mac" in opts:
            cfg.mac = parse_mac(opts["mac"])
        if opts.get("incoming"):
            cfg.incoming = opts["incoming"]
        if "queues" in opts:
            cfg.queues = _int_in(opts["queues"], "queues", 1, 64)
        if "queue-size" in opts:
            cfg.queue_size = _int_in(opts["queue-size"], "queue-size", 2, MAX_QUEUE_SIZE)
            if cfg.queue_size & (cfg.queue_size - 1):
                raise ValueError(f"queue-size={cfg.queue_size} is not a power of two")
        if "mtu" in opts:
            cfg.mtu = _int_in(opts["mtu"], "mtu", VIRTIO_NET_MTU_MIN, VIRTIO_NET_MTU_MAX)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return cfg


def metrics_address(text: str) -> tuple[str, int]:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parse_blk(opts: dict[str, str]) -> BlkConfig:
    known = {"socket", "client", "bdev", "size", "block-size", "queues", "queue-size", "ro",
             "serial", "name", "incoming", "path", "direct", "in-order"}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown blk option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    if opts.get("bdev") == "file" and opts.get("path") and not opts.get("size"):
        # not at the top: importing vfe.engine loads the engine, which a live
        # update's new process (no --device) must load from --engine-fd first
        from vfe.engine.bdev_file import probe_backing
        try:                                  # a file bdev is as large as its file by default
            opts["size"] = str(max(1, probe_backing(opts["path"]) >> 20))
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"path={opts['path']!r}: {exc.strerror}") from None
    for need in ("socket", "bdev", "size") + (("path",) if opts.get("bdev") == "file" else ()):
        if not opts.get(need):
            raise argparse.ArgumentTypeError(f"blk device needs {need}=")
    try:
        cfg = BlkConfig(socket=opts["socket"], name=opts.get("name", ""))
        for key, attr in (("client", "client"), ("ro", "read_only"), ("direct", "direct"),
                          ("in-order", "in_order")):
            if key in opts:
                if opts[key].lower() not in _BOOL:
                    raise ValueError(f"{key}={opts[key]!r}: use on or off")
                setattr(cfg, attr, _BOOL[opts[key].lower()])
        if opts["bdev"] not in ("null", "malloc", "file"):
            raise ValueError(f"bdev={opts['bdev']!r}: use null, malloc or file")
        cfg.bdev = opts["bdev"]
        cfg.path = opts.get("path", "")
        cfg.grow = True          # documented: the image is grown to size= if it is shorter
        if cfg.direct and cfg.bdev != "file":
            raise ValueError("direct=on is for file bdevs")
        cfg.size_mb = _int_in(opts["size"], "size", 1, 1 << 24)
        if "block-size" in opts:
            cfg.block_size = _int_in(opts["block-size"], "block-size", 512, 4096)
            if cfg.block_size & (cfg.block_size - 1):
                raise ValueError(f"block-size={cfg.block_size} is not a power of two")
        if "queues" in opts:
            cfg.queues = _int_in(opts["queues"], "queues", 1, 64)
        if "queue-size" in opts:
            cfg.queue_size = _int_in(opts["queue-size"], "queue-size", 2, MAX_QUEUE_SIZE)
            if cfg.queue_size & (cfg.queue_size - 1):
                raise ValueError(f"queue-size={cfg.queue_size} is not a power of two")
        if opts.get("incoming"):
            cfg.incoming = opts["incoming"]
        if "serial" in opts:
            if len(opts["serial"].encode()) > 20:
                raise ValueError(f"serial={opts['serial']!r} is longer than 20 bytes")
            cfg.serial = opts["serial"]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return cfg


def _int_in(text: str, name: str, lo: int, hi: int) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a number") from None
    if not lo <= v <= hi:
        raise ValueError(f"{name}={v} is out of range {lo}..{hi}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="virtio-net-controller",
        description="Emulated virtio-net devices served to QEMU over vhost-user.")
    p.add_argument("-v", "--version", action="version", version=f"%(prog)s v{__version__}")
    p.add_argument("--device", action="append", type=parse_device, default=[], metavar="SPEC",
                   help="net,socket=PATH[,client=on][,mac=MAC][,queues=N][,queue-size=N][,incoming=PATH] "
                        "(repeatable; incoming= is a second socket of the same device for the "
                        "destination QEMU of a live migration), or "
                        "blk,socket=PATH,bdev=null|malloc,size=MB[,block-size=512][,queues=N]"
                        "[,ro=on][,serial=STR][,client=on][,in-order=on], or blk,socket=PATH,bdev=file,path=FILE"
                        "[,size=MB][,direct=on] and the same options (a file bdev is as large as "
                        "its file unless size= says)")
    p.add_argument("--mode", choices=["poll", "adaptive"], default="adaptive",
                   help="poll: busy-poll like DPDK; adaptive: poll while busy, then sleep on kicks (default)")
    p.add_argument("--workers", type=int, default=1, help="data-path worker threads (default 1)")
    p.add_argument("--spin-us", type=int, default=50,
                   help="adaptive mode: idle microseconds before a worker sleeps (default 50)")
    p.add_argument("--log-level", choices=list(LOG_LEVELS), default="info")
    p.add_argument("--metrics", metavar="HOST:PORT", type=metrics_address, default=None,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (per-queue counters, "
                        "functions, SF pools, the process), e.g. 127.0.0.1:9100")
    svc = p.add_argument_group("service mode (no --device): the emulated DPU managed with virtnet")
    svc.add_argument("--root", help="prefix of every default path (default: $VFE_ROOT or /)")
    svc.add_argument("--config", help="virtnet.conf (default <root>/opt/mellanox/mlnx_virtnet/virtnet.conf)")
    svc.add_argument("--recovery-dir", help="recovery files (default <root>/opt/mellanox/mlnx_virtnet/recovery)")
    svc.add_argument("--state-dir", help="NV config and SF pool (default <root>/var/lib/vfe)")
    svc.add_argument("--run-dir", help="RPC and endpoint sockets (default <root>/run/virtnet)")
    svc.add_argument("--datapath", choices=["representor", "switch"], default="representor",
                     help="where a function's packets go: its SF representor netdev (default) "
                          "or the in-engine switch between functions")
    svc.add_argument("--host-qmp", metavar="PATH",
                     help="QMP socket of a running QEMU: hot-plugged PFs appear in that VM")
    # set by a running controller that starts this one for a live update (virtnet update --start)
    svc.add_argument("--takeover-fd", type=int, help=argparse.SUPPRESS)
    # with it: the sealed memfd of the engine the running controller checked (newbuild.py)
    svc.add_argument("--engine-fd", type=int, help=argparse.SUPPRESS)
    return p


_HANDOVER_ARGS = ("--takeover-fd", "--engine-fd")


def _own_argv(argv: list[str]) -> list[str]:
    """The command line without --takeover-fd / --engine-fd (what a live
    update passes on)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in _HANDOVER_ARGS:
            skip = True
        elif not a.startswith(tuple(f"{h}=" for h in _HANDOVER_ARGS)):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if not 1 <= args.workers <= 64:
        build_parser().error("--workers must be in 1..64")
    if args.takeover_fd is not None and args.device:
        build_parser().error("--takeover-fd is for service mode")
    setup_logging("virtio-net-controller", args.log_level)
    if args.engine_fd is not None:
        # first of all: nothing may import vfe.engine from the build's
        # directory before the checked engine is loaded
        if args.takeover_fd is None:
            build_parser().error("--engine-fd is for a live update's --takeover-fd")
        try:
            load_engine(args.engine_fd)
        except Exception as exc:
            logging.getLogger("vfe.controller").error("live update: cannot load the engine: %s", exc)
            return 1
    # Only now: the controller imports vfe.engine, which must be the checked
    # one in a live update's new process (above; vfe/controller/newbuild.py)
    from vfe.controller import run
    paths = None if args.device else Paths.from_env(
        root=args.root, conf=args.config, recovery=args.recovery_dir, run_dir=args.run_dir,
        state_dir=args.state_dir)
    return run.main(run.Options(
        workers=args.workers, mode=args.mode, spin_us=args.spin_us, devices=args.device, paths=paths,
        datapath=args.datapath, host_qmp=args.host_qmp, argv=_own_argv(raw_argv),
        takeover_fd=args.takeover_fd, metrics=args.metrics))


if __name__ == "__main__":
    sys.exit(main())
