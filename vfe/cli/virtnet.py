"""`virtnet`: the virtio-net-controller command line interface.

    virtnet [-h] [-v] {hotplug,unplug,list,query,modify,log,version,update,stats} ...

Each sub-command is one JSON-RPC call to the running controller over its Unix
socket (`--socket PATH`, default `$VIRTNET_SOCKET` or
`$VFE_ROOT/run/virtnet/virtnet.sock`): the method is the sub-command's name
(`update` uses update_start / update_status), the params are the long option
names.  Results are printed as JSON (indent 2, in the order the controller
sent the keys); errors go to stderr as `Error: <message> (code N)` with exit
status 1; usage errors exit with 2.  See docs/virtnet.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from typing import Any

import vfe
from vfe import __version__
from vfe.controller.functions import MAX_MTU
from vfe.controller.sf_pool import SF_NUM_MIN
from vfe.macaddr import parse_mac
from vfe.paths import controller_socket
from vfe.rpc.client import DEFAULT_TIMEOUT, RpcConnectionError, call
from vfe.rpc.protocol import METHOD_NOT_FOUND, RpcError
from vfe.virtio.constants import MAX_QUEUE_SIZE, VIRTIO_NET_MTU_MIN

PROG = "virtnet"
COMMANDS = ("hotplug", "unplug", "list", "query", "modify", "log", "version", "update", "stats")
LOG_LEVELS = ("info", "err", "debug")

MTU_MIN, MTU_MAX = VIRTIO_NET_MTU_MIN, MAX_MTU    # the controller's own maximum
QUEUE_SIZE_MIN, QUEUE_SIZE_MAX = 2, MAX_QUEUE_SIZE
MAX_QUEUES_MAX = 65535
MSIX_MAX = 2048
FEATURES_MAX = (1 << 64) - 1

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2

# used with fullmatch() only: `$` would also match before a trailing newline
_DEC_RE = re.compile(r"[0-9]+")
_HEX_RE = re.compile(r"0[xX][0-9A-Fa-f]+")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")


# -- argument types (errors become "argument -x/--long: <message>", exit 2) ---------

def _int(text: str, what: str, allow_hex: bool = False) -> int:
    text = text.strip()
    if _DEC_RE.fullmatch(text):
        return int(text, 10)
    if allow_hex and _HEX_RE.fullmatch(text):
        return int(text, 16)
    kind = "a decimal or 0x-prefixed hex number" if allow_hex else "a non-negative decimal number"
    raise argparse.ArgumentTypeError(f"invalid {what} {text!r}: expected {kind}")


def _ranged(what: str, lo: int, hi: int):
    def parse(text: str) -> int:
        value = _int(text, what)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{what} {value} out of range ({lo}..{hi})")
        return value
    parse.__name__ = what
    return parse


pf_index = _ranged("PF index", 0, 0xFFFF)
vf_index = _ranged("VF index", 0, 0xFFFF)
mtu_value = _ranged("MTU", MTU_MIN, MTU_MAX)
max_queues_value = _ranged("max queues", 1, MAX_QUEUES_MAX)
msix_value = _ranged("MSI-X vector count", 1, MSIX_MAX)
sf_num_value = _ranged("SF number", SF_NUM_MIN, 0x7FFFFFFF)


def queue_size_value(text: str) -> int:
    value = _int(text, "queue size")
    if not QUEUE_SIZE_MIN <= value <= QUEUE_SIZE_MAX or value & (value - 1):
        raise argparse.ArgumentTypeError(
            f"queue size {value} is not a power of two in {QUEUE_SIZE_MIN}..{QUEUE_SIZE_MAX}")
    return value


def features_value(text: str) -> int:
    value = _int(text, "features", allow_hex=True)
    if value > FEATURES_MAX:
        raise argparse.ArgumentTypeError(f"features {text} do not fit in 64 bits")
    return value


def mac_value(text: str) -> str:
    try:
        parse_mac(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid MAC address {text!r}: expected six hex octets like 0C:C4:7A:FF:22:93") from None
    return text


def _name(what: str):
    def parse(text: str) -> str:
        if not _NAME_RE.fullmatch(text) or len(text) > 64:
            raise argparse.ArgumentTypeError(f"invalid {what} {text!r}")
        return text
    parse.__name__ = what
    return parse


ib_device_value = _name("RDMA device name")
vuid_value = _name("VUID")


# -- parser ---------------------------------------------------------------------------

class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Wraps at the terminal width, but never below MIN_WIDTH columns so that
    `virtnet -h` keeps its usage on one line like the seed's."""
    MIN_WIDTH = 88

    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        if width is None:
            width = max(shutil.get_terminal_size().columns - 2, self.MIN_WIDTH)
        super().__init__(prog, indent_increment, max_help_position, width)


class VirtnetParser(argparse.ArgumentParser):
    """argparse with the seed's "optional arguments:" title (3.10+ says "options:")."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)
        self._optionals.title = "optional arguments"


def _hidden_options(parser: argparse.ArgumentParser) -> None:
    # Accepted before or after the sub-command; not shown in help or usage.
    parser.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", metavar="SECONDS", type=float, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)


def build_parser() -> VirtnetParser:
    parser = VirtnetParser(
        prog=PROG, description=f"Nvidia virtio-net-controller command line interface v{__version__}")
    parser.add_argument("-v", "--version", action="version", version=f"%(prog)s {__version__}")
    _hidden_options(parser)
    # dest=SUPPRESS: a missing sub-command is reported as "{hotplug,unplug,...}";
    # each sub-parser sets `command` itself.
    sub = parser.add_subparsers(dest=argparse.SUPPRESS, help="** Use -h for sub-command usage")
    sub.required = True
    parser._subparsers_action = sub

    def add(name: str, help: str, epilog: str | None = None) -> VirtnetParser:
        p = sub.add_parser(name, help=help, epilog=epilog)
        p.set_defaults(command=name)
        _hidden_options(p)
        return p

    p = add("hotplug", "hotplug virtnet device",
            "example:\n  virtnet hotplug -i mlx5_0 -f 0x0 -m 0C:C4:7A:FF:22:93 -t 1500 -n 3 -s 1024")
    p.add_argument("-i", "--ib_device", required=True, type=ib_device_value,
                   help="RDMA device (e.g. mlx5_0) to create the device's SF on")
    p.add_argument("-f", "--features", type=features_value,
                   help="virtio-net feature bits, hex (0x...) or decimal")
    p.add_argument("-m", "--mac", required=True, type=mac_value, help="MAC address (xx:xx:xx:xx:xx:xx)")
    p.add_argument("-t", "--mtu", required=True, type=mtu_value, help=f"MTU ({MTU_MIN}..{MTU_MAX})")
    p.add_argument("-n", "--max_queues", required=True, type=max_queues_value,
                   help="maximum number of virtio queues")
    p.add_argument("-s", "--max_queue_size", required=True, type=queue_size_value,
                   help="maximum queue depth (a power of two)")
    p.add_argument("-u", "--sf_num", type=sf_num_value,
                   help=f"SF number to use (>= {SF_NUM_MIN}; default: the controller picks one)")
    p.add_argument("-l", "--legacy", action="store_true",
                   help="transitional device (also supports legacy virtio 0.95 drivers)")

    p = add("unplug", "unplug virtnet device", "example:\n  virtnet unplug -p 0")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("-p", "--pf", type=pf_index, help="PF device index")
    g.add_argument("-u", "--vuid", type=vuid_value, help="VUID of the device")

    add("list", "list all virtnet devices")

    p = add("query", "query all or individual virtnet device(s)",
            "examples:\n  virtnet query -a\n  virtnet query -p 0\n  virtnet query -p 0 -v 0\n"
            "  virtnet query -u VNETS1D0F0 -b")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("-a", "--all", action="store_true", help="query all devices")
    g.add_argument("-p", "--pf", type=pf_index, help="PF device index")
    g.add_argument("-u", "--vuid", type=vuid_value, help="VUID of the device")
    p.add_argument("-v", "--vf", type=vf_index, help="VF device index (with -p)")
    p.add_argument("-b", "--brief", action="store_true", help="brief output")

    p = add("modify", "modify virtnet device",
            "examples:\n  virtnet modify -p 0 -v 0 device -m 0C:C4:7A:FF:22:98\n"
            "  virtnet modify -u VNETS1D0F0 device -t 9000\n\n"
            "Changing the MAC, MTU, features, MSI-X number or max queue size needs the\n"
            "device unbound from the guest's virtio-net driver first.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("-p", "--pf", type=pf_index, help="PF device index")
    g.add_argument("-u", "--vuid", type=vuid_value, help="VUID of the device")
    p.add_argument("-v", "--vf", type=vf_index, help="VF device index (with -p)")
    msub = p.add_subparsers(dest=argparse.SUPPRESS, help="** Use -h for sub-command usage")
    msub.required = True
    d = msub.add_parser("device", help="modify device attributes")
    d.set_defaults(target="device")
    _hidden_options(d)
    d.add_argument("-m", "--mac", type=mac_value, help="MAC address (xx:xx:xx:xx:xx:xx)")
    d.add_argument("-t", "--mtu", type=mtu_value, help=f"MTU ({MTU_MIN}..{MTU_MAX})")
    d.add_argument("-f", "--features", type=features_value,
                   help="virtio-net feature bits, hex (0x...) or decimal")
    d.add_argument("-n", "--msix_num", type=msix_value, help="number of MSI-X vectors")
    d.add_argument("-q", "--max_queue_size", type=queue_size_value,
                   help="maximum queue depth (a power of two)")
    d.add_argument("-e", "--link_state", choices=("up", "down"), help="link state: up/down")
    p._device_parser = d

    p = add("log", "set log level")
    p.add_argument("-l", "--level", required=True, choices=LOG_LEVELS, help="log level: info/err/debug")

    add("version", "show virtnet version",
        "Prints this virtnet's version and the running controller's.")

    p = add("update", "live update the controller",
            "examples:\n  virtnet version      # running vs. installed controller\n"
            "  virtnet update --start\n  virtnet update --status")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("-s", "--start", action="store_true", help="start the live update")
    g.add_argument("-t", "--status", action="store_true", help="show the live update status")

    p = add("stats", "show the counters of all or individual device(s)",
            "examples:\n  virtnet stats -a\n  virtnet stats -p 0 -v 0\n  virtnet stats -u VNETS1D0F0\n\n"
            "Per queue (rx: to the guest, tx: from it; req: a blk request queue): packets or\n"
            "requests, bytes, drops, ring errors, interrupts; per device: offloads done in\n"
            "software, port security, blk requests by type. The numbers /metrics serves.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("-a", "--all", action="store_true", help="all devices")
    g.add_argument("-p", "--pf", type=pf_index, help="PF device index")
    g.add_argument("-u", "--vuid", type=vuid_value, help="VUID of the device")
    p.add_argument("-v", "--vf", type=vf_index, help="VF device index (with -p)")
    return parser


# -- argv normalisation -------------------------------------------------------------

_DASHES = {"\u2013": "-", "\u2212": "-", "\u2014": "--"}    # en dash, minus sign, em dash


def normalize_argv(argv: list[str]) -> list[str]:
    """Accept the docs' typography: `–v` (en dash) for `-v`, `—level` (em dash)
    for `--level`; and `virtnet update status|start` for `--status|--start`."""
    out = []
    for arg in argv:
        if arg and arg[0] in _DASHES:
            i = 0
            lead = ""
            while i < len(arg) and arg[i] in _DASHES:
                lead += _DASHES[arg[i]]
                i += 1
            arg = lead + arg[i:]
        out.append(arg)
    # the sub-command is the first positional (skipping hidden option values)
    i = 0
    while i < len(out):
        a = out[i]
        if a in ("--socket", "--timeout"):
            i += 2
            continue
        if a.startswith("-"):
            i += 1
            continue
        if a == "update" and i + 1 < len(out) and out[i + 1] in ("status", "start"):
            out[i + 1] = "--" + out[i + 1]
        break
    return out


# -- requests -------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse (exits 2 with a usage message on bad input, like argparse)."""
    parser = build_parser()
    ns = parser.parse_args(normalize_argv(list(sys.argv[1:] if argv is None else argv)))
    choices = parser._subparsers_action.choices
    if ns.command in ("query", "modify", "stats") and ns.vf is not None and ns.pf is None:
        choices[ns.command].error("argument -v/--vf: needs -p/--pf (the VF's parent PF)")
    if ns.command == "modify":
        fields = ("mac", "mtu", "features", "msix_num", "max_queue_size", "link_state")
        if all(getattr(ns, f) is None for f in fields):
            choices["modify"]._device_parser.error(
                "nothing to modify: give at least one of -m, -t, -f, -n, -q, -e")
    return ns


def build_request(ns: argparse.Namespace) -> tuple[str, dict]:
    """The RPC (method, params) for parsed arguments."""
    cmd = ns.command
    if cmd == "hotplug":
        return "hotplug", {"ib_device": ns.ib_device, "features": ns.features, "mac": ns.mac,
                           "mtu": ns.mtu, "max_queues": ns.max_queues,
                           "max_queue_size": ns.max_queue_size, "sf_num": ns.sf_num,
                           "legacy": ns.legacy}
    if cmd == "unplug":
        return "unplug", {"pf": ns.pf, "vuid": ns.vuid}
    if cmd == "list":
        return "list", {}
    if cmd == "query":
        return "query", {"all": ns.all, "pf": ns.pf, "vf": ns.vf, "vuid": ns.vuid, "brief": ns.brief}
    if cmd == "stats":
        return "stats", {"all": ns.all, "pf": ns.pf, "vf": ns.vf, "vuid": ns.vuid}
    if cmd == "modify":
        return "modify", {"pf": ns.pf, "vf": ns.vf, "vuid": ns.vuid, "mac": ns.mac, "mtu": ns.mtu,
                          "features": ns.features, "msix_num": ns.msix_num,
                          "max_queue_size": ns.max_queue_size, "link_state": ns.link_state}
    if cmd == "log":
        return "log", {"level": ns.level}
    if cmd == "version":
        return "version", {}
    if cmd == "update":
        if not ns.start:
            return "update_status", {}
        # this virtnet belongs to the newly installed build: that is the
        # controller the running one hands its devices to
        root = os.path.dirname(os.path.dirname(os.path.abspath(vfe.__file__)))
        return "update_start", {"path": root}
    raise ValueError(f"unknown command {cmd!r}")


# -- output ---------------------------------------------------------------------------

def print_result(result: Any, out=None) -> None:
    """JSON, indent 2, keys in the order received; nothing for a null result."""
    if result is None:
        return
    out = sys.stdout if out is None else out
    out.write(json.dumps(result, indent=2) + "\n")


def print_error(exc: RpcError, err=None) -> None:
    err = sys.stderr if err is None else err
    if isinstance(exc, RpcConnectionError):
        err.write(f"Error: {exc.message}\n")
    else:
        err.write(f"Error: {exc.message} (code {exc.code})\n")
    if exc.data is not None:
        err.write(f"Details: {json.dumps(exc.data)}\n")


UPDATE_TOO_OLD = ('the "update" command is not supported by the running controller: '
                  "the controller version you are trying to install is too old; "
                  "reinstalling the proper version will resolve this")


def _version(path: str, timeout: float) -> int:
    info: dict[str, Any] = {"virtnet": __version__}
    try:
        result = call(path, "version", {}, timeout=timeout)
    except RpcConnectionError as exc:
        info["controller"] = "not running"
        print_result(info)
        sys.stderr.write(f"Warning: {exc.message}\n")
        return EXIT_OK
    except RpcError as exc:
        info["controller"] = "unknown"
        print_result(info)
        sys.stderr.write(f"Warning: the controller did not report its version: {exc.message} "
                         f"(code {exc.code})\n")
        return EXIT_OK
    if isinstance(result, dict) and "controller" in result:      # {"controller": {...}, ...}
        info.update((k, v) for k, v in result.items() if k != "virtnet")
    elif isinstance(result, dict) and "version" in result:      # {"version": "x", ...}
        info["controller"] = result["version"]
        info.update((k, v) for k, v in result.items() if k != "version" and k not in info)
    else:                                                       # "x"
        info["controller"] = result
    print_result(info)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    try:
        ns = parse_args(argv)
    except SystemExit as exc:       # -h, -v, usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    path = getattr(ns, "socket", None) or controller_socket()
    timeout = getattr(ns, "timeout", None) or DEFAULT_TIMEOUT
    if ns.command == "version":
        return _version(path, timeout)
    method, params = build_request(ns)
    try:
        result = call(path, method, params, timeout=timeout)
    except RpcError as exc:
        if ns.command == "update" and exc.code == METHOD_NOT_FOUND:
            sys.stderr.write(f"Error: {UPDATE_TOO_OLD} (code {exc.code})\n")
            return EXIT_ERROR
        print_error(exc)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    try:
        print_result(result)
        sys.stdout.flush()
    except BrokenPipeError:         # virtnet list | head
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
