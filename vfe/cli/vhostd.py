"""`vfe-vhostd`: the host-side VFE vDPA service (the seed's dpdk-vfe-vdpa).

    vfe-vhostd [--client] [--iface PREFIX] [--socket PATH] [--tcp] [--port 12190]
               [--controller-socket PATH]
    vfe-vhostd [EAL options] -- [the options above]    (the seed's dpdk-vfe-vdpa line)

Relays vhost-user between QEMU's sockets and the controller's endpoints of
the provisioned VFs (vfe/vhostd/relay.py) and serves JSON-RPC for
`vhostmgmt` on a Unix socket (mode 0600, default
$VFE_ROOT/run/vfe-vhostd/vhostd.sock) and, with --tcp, also on
127.0.0.1:PORT for the reference's vhostmgmt -- to root only, on both.
Runs in the foreground and logs to stderr; SIGTERM/SIGINT stop it cleanly,
leaving every relayed front-end to the controller (the guests keep running;
provision the VFs again after a restart).  See docs/vfe-vdpa.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import selectors
import signal
import sys

from vfe import __version__
from vfe.journal import LOG_LEVELS, setup_logging
from vfe.paths import controller_socket
from vfe.vhostd import DEFAULT_ADDRESS, DEFAULT_PORT, default_port, default_socket
from vfe.vhostd import eal_args
from vfe.vhostd.controller_client import Controller
from vfe.vhostd.loop import Loop
from vfe.vhostd.rpc import RpcServer
from vfe.vhostd.service import VhostService


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vfe-vhostd",
        usage="%(prog)s [EAL options --] [options]",
        description="VFE vDPA host service: relays QEMU's vhost-user sockets to virtio-net-controller's "
                    "functions and serves JSON-RPC for vhostmgmt.",
        epilog="As dpdk-vfe-vdpa, it takes DPDK EAL options before `--` (e.g. -a 0000:00:00.0 "
               "--log-level=.,8 --vfio-vf-token=UUID -- --client): they are checked and logged, "
               "and change nothing but the log level (8: debug).")
    p.add_argument("-V", "--version", action="version", version=f"%(prog)s v{__version__}")
    p.add_argument("--client", action="store_true",
                   help="connect to the vhost-user sockets (QEMU runs them with server=on); "
                        "default: listen on them")
    p.add_argument("--iface", metavar="PREFIX", default="",
                   help="path prefix of the socket files, e.g. /tmp/vhost-user-: a VF provisioned "
                        "without -v gets PREFIX<VF BDF> (default $VFE_ROOT/run/vfe-vhostd/vf-<VF BDF>)")
    p.add_argument("--socket", metavar="PATH", default=None,
                   help="JSON-RPC Unix socket, what vhostmgmt uses (default $VFE_VHOSTD_SOCKET or "
                        "$VFE_ROOT/run/vfe-vhostd/vhostd.sock)")
    p.add_argument("--tcp", action="store_true",
                   help=f"also serve JSON-RPC on TCP {DEFAULT_ADDRESS}:PORT, for the reference's vhostmgmt "
                        f"(root's connections only, as on the socket)")
    p.add_argument("--port", type=int, default=None,
                   help=f"the TCP port; implies --tcp (default {DEFAULT_PORT}, or $VFE_VHOSTD_PORT)")
    p.add_argument("--address", default=DEFAULT_ADDRESS, help=argparse.SUPPRESS)
    p.add_argument("--controller-socket", metavar="PATH", default=None,
                   help="virtio-net-controller's RPC socket (default $VIRTNET_SOCKET or "
                        "$VFE_ROOT/run/virtnet/virtnet.sock)")
    p.add_argument("--log-level", choices=list(LOG_LEVELS), default=None,
                   help="err, info (default) or debug; wins over the EAL's --log-level")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        eal = eal_args.parse(argv)
    except eal_args.EalError as exc:
        print(f"vfe-vhostd: {exc}", file=sys.stderr)
        return 2                   # a usage error, as argparse's
    args = build_parser().parse_args(eal.app_argv)
    if args.log_level is not None:
        eal.log_level = None          # the application's own option wins
    setup_logging("vfe-vhostd", args.log_level or eal.log_level or "info")
    log = logging.getLogger("vfe.vhostd")
    if eal.note():
        log.info("%s", eal.note())
    if len(args.iface) > 120:                     # the reference's MAX_IF_PATH_LEN
        log.error("Invalid iface length")
        return os.EX_CONFIG        # a bad command line: systemd must not restart it in a loop

    controller = Controller(args.controller_socket or controller_socket())
    sel = selectors.DefaultSelector()
    service = VhostService(controller, sel, client=args.client, iface=args.iface)
    loop = Loop(service)
    path = os.path.abspath(args.socket) if args.socket else default_socket()
    tcp = (args.address, args.port if args.port is not None else default_port()) \
        if args.tcp or args.port is not None else None
    try:
        rpc = RpcServer(sel, service.methods(), path=path, tcp=tcp)
    except OSError as exc:
        where = path + (f" and {tcp[0]}:{tcp[1]}" if tcp else "")
        log.error("cannot serve JSON-RPC on %s: %s", where, exc.strerror or exc)
        loop.close()
        return 1
    signal.signal(signal.SIGTERM, lambda *_: loop.stop())
    signal.signal(signal.SIGINT, lambda *_: loop.stop())
    log.info("v%s serving JSON-RPC on %s%s (%s mode%s), controller %s", __version__, path,
             f" and TCP {args.address}:{rpc.port} (root only)" if tcp else "",
             "client" if args.client else "server",
             f", iface {args.iface}" if args.iface else "", controller.socket_path)
    try:
        loop.run()
    finally:
        # a clean exit leaves the front-ends to the controller, as a crash would
        service.close(handoff=True)
        rpc.close()
        loop.close()
        sel.close()
        log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
