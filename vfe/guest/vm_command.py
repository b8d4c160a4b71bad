"""The vfe-vm command: boot the test guest with vhost-user NICs and keep it
running until Ctrl-C or SIGTERM (docs/guest.md).

    vfe-vm --socket /tmp/a.sock [--socket /tmp/b.sock] [--mac MAC]... [--qmp] ...
"""
from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
import tempfile
import threading
from pathlib import Path

from vfe.guest.console import GuestTimeout
from vfe.guest.vm import VM, NetDev, VMError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="vfe-vm", description="Boot the vfe test guest with vhost-user NICs "
        "and keep it running until Ctrl-C/SIGTERM.")
    ap.add_argument("--socket", action="append", default=[], metavar="PATH",
                    help="vhost-user socket of a NIC (repeat for more NICs)")
    ap.add_argument("--mac", action="append", default=[], help="MAC of the n-th NIC")
    ap.add_argument("--queues", type=int, default=1, help="queue pairs per NIC")
    ap.add_argument("--queue-size", type=int, default=256)
    ap.add_argument("--server", action="store_true", help="QEMU listens on the sockets")
    ap.add_argument("--smp", type=int, default=None, help="vCPUs (default: --queues)")
    ap.add_argument("--memory", type=int, default=256, help="guest RAM in MiB")
    ap.add_argument("--name", default="vfe-vm")
    ap.add_argument("--workdir", default=None, help="where logs go (default: a temp dir)")
    ap.add_argument("--qmp", action="store_true", help="add a QMP socket")
    ap.add_argument("--setup", action="append", default=[], metavar="CMD",
                    help="guest command to run after boot (repeatable)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="vfe-vm: %(message)s")

    nics = [NetDev(socket=s, mac=args.mac[i] if i < len(args.mac) else None,
                   queues=args.queues, queue_size=args.queue_size, server=args.server)
            for i, s in enumerate(args.socket)]
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="vfe-vm-logs-"))
    vm = VM(name=args.name, workdir=workdir, memory_mb=args.memory,
            smp=args.smp or args.queues, nics=nics, qmp=args.qmp)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        vm.start()
        print(f"command:    {shlex.join(vm.cmdline)}")
        print(f"serial log: {vm.serial_log}")
        print(f"qemu log:   {vm.qemu_log}")
        if vm.monitor:
            print(f"qmp:        {vm.monitor.path}")
        t = vm.wait_booted(timeout=120)
        print(f"booted in {t:.2f}s")
        for cmd in args.setup:
            rc, out = vm.run(cmd, timeout=60)
            print(f"$ {cmd}\n{out}[exit {rc}]")
        print(f"running; follow the guest with: tail -f {vm.serial_log}")
        print("Ctrl-C or SIGTERM stops it")
        while not stop.is_set() and vm.alive():
            stop.wait(0.5)
        if not vm.alive():
            print(f"QEMU exited:\n{vm.qemu_log_tail()}", file=sys.stderr)
            return 1
        return 0
    except (VMError, GuestTimeout) as e:
        print(f"vfe-vm: {e}", file=sys.stderr)
        return 1
    finally:
        vm.shutdown()
        print("stopped")


if __name__ == "__main__":
    sys.exit(main())
