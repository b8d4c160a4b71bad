"""`vfe-sriov`: the host's SR-IOV switch for an emulated static PF -- what
`echo N > /sys/bus/pci/drivers/virtio-pci/<BDF>/sriov_numvfs` does on a real
host, since our "host" has no PCI device to write to.

    vfe-sriov -p 0            # how many VFs PF 0 has (and may have)
    vfe-sriov -p 0 2          # create VFs 0 and 1
    vfe-sriov -b 84:00.2 0    # destroy every VF of that PF
"""
from __future__ import annotations

import argparse
import json
import sys

from vfe.paths import controller_socket
from vfe.progressline import ProgressLine
from vfe.rpc.client import call
from vfe.rpc.protocol import RpcError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vfe-sriov", description=__doc__.split("\n\n")[0])
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("-p", "--pf", type=int, help="static PF id (virtnet list's pf_id)")
    who.add_argument("-b", "--bdf", help="the PF's BDF, e.g. 84:00.2")
    p.add_argument("num_vfs", type=int, nargs="?", help="VFs to have: N > 0 creates, 0 destroys all")
    p.add_argument("-l", "--legacy", action="store_true",
                   help="transitional VFs (refused: not supported, as the seed says)")
    p.add_argument("--socket", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.num_vfs is not None and args.num_vfs < 0:
        p.error("num_vfs must be >= 0")
    params = {"pf": args.pf, "bdf": args.bdf, "num_vfs": args.num_vfs, "legacy": args.legacy}
    # on a terminal, how far the controller is (creating 504 VFs takes seconds)
    bar = ProgressLine("destroying VFs" if args.num_vfs == 0 else "creating VFs")
    try:
        out = call(args.socket or controller_socket(), "sriov_numvfs", params, timeout=600,
                   on_progress=bar.update if bar.active and args.num_vfs is not None else None)
    except RpcError as exc:
        bar.close()
        print(f"Error: {exc.message} (code {exc.code})", file=sys.stderr)
        return 1
    bar.close()
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
