"""vfe-rpc: the seed's `spdk_rpc.py bdev_*` and `snap_rpc.py controller_*`
verbs against virtio-net-controller's RPC socket.

    vfe-rpc bdev_null_create Null0 1024 512
    vfe-rpc controller_virtio_blk_create mlx5_0 --pf_id 0 --bdev_type spdk --bdev Null0 \\
            --num_queues 1 --admin_q
    vfe-rpc controller_list
    vfe-rpc controller_virtio_blk_delete VblkEmu0pf0
    vfe-rpc bdev_null_delete Null0

Results print as JSON like spdk_rpc.py does (a bdev name as a JSON string,
lists as JSON arrays); deletes print nothing.  An error prints the request
and the controller's error to stderr and exits 1 (2 for bad arguments).
"""
from __future__ import annotations

import argparse
import json
import sys

from vfe.paths import controller_socket
from vfe.rpc.client import RpcConnectionError, call
from vfe.rpc.protocol import RpcError


def _positive(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {v}")
    return v


def _nonneg(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {v}")
    return v


def _num_blocks(size_mb: int, block_size: int) -> int:
    """spdk_rpc.py's conversion: total size in MiB to a block count."""
    return size_mb * 1024 * 1024 // block_size


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vfe-rpc", description="bdev and virtio-blk controller RPCs "
                                "(spdk_rpc.py / snap_rpc.py verbs) for virtio-net-controller")
    p.add_argument("-s", "--server", dest="socket", default=None,
                   help="RPC socket (default $VIRTNET_SOCKET or <$VFE_ROOT>/run/virtnet/virtnet.sock)")
    p.add_argument("-t", "--timeout", type=float, default=60.0, help="seconds to wait for a reply")
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(name: str, help: str, build):
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(build=build)
        return sp

    sp = verb("bdev_null_create", "a null bdev: reads zeros, drops writes",
              lambda a: {"name": a.name, "num_blocks": _num_blocks(a.total_size, a.block_size),
                         "block_size": a.block_size})
    sp.add_argument("name", help="bdev name")
    sp.add_argument("total_size", type=_positive, help="size in MiB")
    sp.add_argument("block_size", type=_positive, help="block size in bytes")

    def malloc(a):
        out = {"num_blocks": _num_blocks(a.total_size, a.block_size), "block_size": a.block_size}
        if a.name:
            out["name"] = a.name
        return out

    sp = verb("bdev_malloc_create", "a RAM bdev", malloc)
    sp.add_argument("total_size", type=_positive, help="size in MiB")
    sp.add_argument("block_size", type=_positive, help="block size in bytes")
    sp.add_argument("-b", "--name", help="bdev name (default Malloc<n>)")

    def aio(a):
        out = {"filename": a.filename, "name": a.name}
        if a.block_size is not None:
            out["block_size"] = a.block_size
        if a.direct:
            out["direct"] = True
        return out

    sp = verb("bdev_aio_create", "a file-backed bdev (asynchronous I/O)", aio)
    sp.add_argument("filename", help="file or block device")
    sp.add_argument("name", help="bdev name")
    sp.add_argument("block_size", nargs="?", type=_positive, help="block size in bytes")
    sp.add_argument("--direct", action="store_true",
                    help="sector-aligned reads and writes bypass the page cache (O_DIRECT)")

    sp = verb("bdev_get_bdevs", "list bdevs", lambda a: {"name": a.name} if a.name else {})
    sp.add_argument("-b", "--name", help="only this bdev")

    for kind in ("null", "malloc", "aio"):
        sp = verb(f"bdev_{kind}_delete", f"delete a {kind} bdev (not while a controller uses it)",
                  lambda a: {"name": a.name})
        sp.add_argument("name", help="bdev name")

    def blk_create(a):
        out = {"emu_manager": a.emu_manager, "pf_id": a.pf_id, "bdev_type": a.bdev_type,
               "bdev": a.bdev}
        for key in ("vf_id", "num_queues", "queue_size"):
            if getattr(a, key) is not None:
                out[key] = getattr(a, key)
        if a.admin_q:
            out["admin_q"] = True
        if a.force_in_order:
            out["force_in_order"] = True
        return out

    sp = verb("controller_virtio_blk_create", "an emulated virtio-blk function on a bdev", blk_create)
    sp.add_argument("emu_manager", metavar="IB_DEV", help="emulation manager, e.g. mlx5_0")
    sp.add_argument("--pf_id", type=_nonneg, required=True, help="PF index")
    sp.add_argument("--vf_id", type=_nonneg, help="VF index (a VF of the PF)")
    sp.add_argument("--bdev_type", choices=["spdk"], required=True, help="backend type (spdk)")
    sp.add_argument("--bdev", required=True, help="bdev name")
    sp.add_argument("--num_queues", type=_positive, help="request queues (default: as many as the function's MSI-X vectors allow, "
                                                              "VIRTIO_BLK_EMULATION_NUM_MSIX - 1)")
    sp.add_argument("--queue_size", type=_positive, help="largest ring (default 128)")
    sp.add_argument("--admin_q", action="store_true", help="with an admin queue")
    sp.add_argument("--force_in_order", action="store_true", help="complete each queue's requests in the order they were taken")

    sp = verb("controller_list", "list blk controllers",
              lambda a: {"name": a.name} if a.name else {})
    sp.add_argument("-c", "--name", help="only this controller (name or VUID)")

    sp = verb("controller_virtio_blk_delete", "delete a blk controller (name or VUID)",
              lambda a: {"name": a.name} | ({"force": True} if a.force else {}))
    sp.add_argument("name", help="controller name (VblkEmu0pf0) or VUID")
    sp.add_argument("-f", "--force", action="store_true", help="even while a guest driver uses it")
    return p


def build_request(argv: list[str]) -> tuple[argparse.Namespace, str, dict]:
    """(args, method, params) for a command line; exits 2 on bad arguments."""
    args = build_parser().parse_args(argv)
    return args, args.verb, args.build(args)


def main(argv: list[str] | None = None) -> int:
    args, method, params = build_request(sys.argv[1:] if argv is None else argv)
    path = args.socket or controller_socket()
    try:
        result = call(path, method, params, timeout=args.timeout)
    except RpcConnectionError as exc:
        print(f"vfe-rpc: {method}: {exc.message}", file=sys.stderr)
        return 1
    except RpcError as exc:
        print("request:", file=sys.stderr)
        print(json.dumps({"method": method, "params": params}, indent=2), file=sys.stderr)
        print("Got JSON-RPC error response", file=sys.stderr)
        print("response:", file=sys.stderr)
        print(json.dumps({"code": exc.code, "message": exc.message}, indent=2), file=sys.stderr)
        return 1
    if result is True and method.endswith("_delete"):
        return 0
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
