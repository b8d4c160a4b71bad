"""`virtio-net-controller`: the daemon's command line.

    virtio-net-controller --device net,socket=PATH[,client=on][,mac=MAC][,queues=N][,queue-size=N]
                          [--device ...] [--mode poll|adaptive] [--workers N]

Runs in the foreground, logs to stderr, stops cleanly on SIGTERM/SIGINT.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys

from vfe import __version__
from vfe.devices.net import NetConfig

LOG_LEVELS = {"err": logging.ERROR, "info": logging.INFO, "debug": logging.DEBUG}
_BOOL = {"on": True, "yes": True, "true": True, "1": True,
         "off": False, "no": False, "false": False, "0": False}


def parse_mac(text: str) -> str:
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"bad MAC address {text!r} (expected six hex octets like 52:54:00:12:34:56)")
    try:
        [int(p, 16) for p in parts]
    except ValueError:
        raise ValueError(f"bad MAC address {text!r} (expected six hex octets like 52:54:00:12:34:56)") from None
    return text.lower()


def parse_device(text: str) -> NetConfig:
    """Parse a QEMU-style `net,socket=PATH,...` device option."""
    kind, _, rest = text.partition(",")
    if kind != "net":
        raise argparse.ArgumentTypeError(f"unknown device type {kind!r} (supported: net)")
    opts: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"device option {item!r} needs a value (key=value)")
        if key in opts:
            raise argparse.ArgumentTypeError(f"device option {key!r} given twice")
        opts[key] = value
    known = {"socket", "client", "mac", "queues", "queue-size", "mtu", "name"}
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
        if "queues" in opts:
            cfg.queues = _int_in(opts["queues"], "queues", 1, 64)
        if "queue-size" in opts:
            cfg.queue_size = _int_in(opts["queue-size"], "queue-size", 2, 32768)
            if cfg.queue_size & (cfg.queue_size - 1):
                raise ValueError(f"queue-size={cfg.queue_size} is not a power of two")
        if "mtu" in opts:
            cfg.mtu = _int_in(opts["mtu"], "mtu", 68, 65535)
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
                   help="net,socket=PATH[,client=on][,mac=MAC][,queues=N][,queue-size=N] (repeatable)")
    p.add_argument("--mode", choices=["poll", "adaptive"], default="adaptive",
                   help="poll: busy-poll like DPDK; adaptive: poll while busy, then sleep on kicks (default)")
    p.add_argument("--workers", type=int, default=1, help="data-path worker threads (default 1)")
    p.add_argument("--spin-us", type=int, default=50,
                   help="adaptive mode: idle microseconds before a worker sleeps (default 50)")
    p.add_argument("--log-level", choices=list(LOG_LEVELS), default="info")
    return p


def setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr, level=LOG_LEVELS[level],
        format="virtio-net-controller[%(process)d]: [%(levelname)s] %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.device:
        build_parser().error("at least one --device is needed")
    if not 1 <= args.workers <= 64:
        build_parser().error("--workers must be in 1..64")
    setup_logging(args.log_level)
    log = logging.getLogger("vfe.controller")

    from vfe.controller.daemon import Daemon
    from vfe.engine import Engine
    from vfe.engine import install_kernels

    install_kernels()
    engine = Engine(workers=args.workers, mode=args.mode, spin_us=args.spin_us)
    daemon = Daemon(engine)
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    signal.signal(signal.SIGINT, lambda *_: daemon.stop())
    try:
        for cfg in args.device:
            daemon.add_net_device(cfg)
    except OSError as exc:
        log.error("cannot open %s: %s", exc.filename or "socket", exc.strerror or exc)
        daemon.shutdown()
        return 1
    log.info("v%s serving %d device(s), %d worker(s), %s mode",
             __version__, len(args.device), args.workers, args.mode)
    daemon.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
