"""`vhostmgmt` (also installed as `vfe-vhost-cli`): vfe-vhostd's command line,
with the reference's sub-commands, flags, messages and output.

    vhostmgmt version
    vhostmgmt mgmtpf [-a | -r | -l] [DEVICE]
    vhostmgmt vf [-a | -r | -l | -i | -d] [-o N] [-b N] [-v SOCKET] [-u VM_UUID] [DEVICE]

Each command is one JSON-RPC call to vfe-vhostd on its Unix socket
($VFE_VHOSTD_SOCKET, default $VFE_ROOT/run/vfe-vhostd/vhostd.sock; or
`--socket PATH`), or with `--tcp` on 127.0.0.1:12190 (another port:
`--port N` or $VFE_VHOSTD_PORT) -- vfe-vhostd answers root only, on both.
These options go before the sub-command and stay out of the reference's
usage line.  The call's params are printed first (as a Python
dict, as the reference does), then the result as JSON with indent 2 -- the
service's own errors are results with a negative "errno" and its "errstr".
A JSON-RPC error prints the request, "Got JSON-RPC error response" and the
error object, and exits 1; so does failing to reach vfe-vhostd (with what
to check: not running, or not root).  Without a
sub-command and with stdin not a terminal, each line of stdin is one
command.  See docs/vfe-vdpa.md.
"""
from __future__ import annotations

import argparse
import copy
import errno
import json
import os
import shlex
import socket
import sys
import time
from typing import Any, TextIO

from vfe import __version__
from vfe.vhostd import DEFAULT_ADDRESS, DEFAULT_PORT, default_port, default_socket

VERSION = f"v{__version__}"
TIMEOUT = 125.0
PROGS = ("vhostmgmt", "vfe-vhost-cli")


class JsonRpcError(Exception):
    """A JSON-RPC error response (the reference's JsonRpcSnapException)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class VhostdClient:
    """One call per connection, the request and response one JSON object each."""

    decoder = json.JSONDecoder()

    def __init__(self, address: str = DEFAULT_ADDRESS, port: int = DEFAULT_PORT,
                 timeout: float = TIMEOUT, out: TextIO | None = None, *, path: str | None = None):
        self.path = path                  # a Unix socket; else TCP address:port
        self.address = address
        self.port = int(port)
        self.timeout = timeout
        self.out = out
        self._request_id = 0

    def _print(self, *args: Any) -> None:
        print(*args, file=self.out or sys.stdout)

    def _connect(self) -> socket.socket:
        if self.path is None:
            try:
                return socket.create_connection((self.address, self.port), timeout=self.timeout)
            except OSError as ex:
                self._print("ERR: Can't connect to vhostd: %s" % ex)
                self._print("     VDPA is not ready to accept commands")
                sys.exit(1)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
            return sock
        except OSError as ex:
            sock.close()
            if isinstance(ex, PermissionError):
                self._print(f"ERR: Can't connect to vhostd: permission denied on {self.path}")
                self._print("     vfe-vhostd serves root only: run vhostmgmt as root")
            else:
                why = {errno.ENOENT: f"socket {self.path} not found",
                       errno.ECONNREFUSED: f"nothing listens on socket {self.path}"}.get(
                    ex.errno, f"socket {self.path}: {ex.strerror or ex}")
                self._print(f"ERR: Can't connect to vhostd: {why}")
                self._print("     VDPA is not ready to accept commands (is vfe-vhostd running?)")
            sys.exit(1)

    def call(self, method: str, params: dict | None = None) -> Any:
        params = {} if params is None else params
        if params:
            self._print(params)
        self._request_id += 1
        req: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": self._request_id}
        if params:
            req["params"] = copy.deepcopy(params)
        sock = self._connect()
        try:
            try:
                sock.sendall(json.dumps(req).encode("utf-8"))
            except (BrokenPipeError, ConnectionResetError):
                pass                      # refused at once: its answer says why
            response = self._recv(sock)
        finally:
            sock.close()
        if "error" in response:
            shown = dict(params, method=method, req_id=self._request_id)
            raise JsonRpcError("\n".join([
                "request:", json.dumps(shown, indent=2),
                "Got JSON-RPC error response",
                "response:", json.dumps(response["error"], indent=2)]))
        return response.get("result")

    def _recv(self, sock: socket.socket) -> dict:
        deadline = time.monotonic() + self.timeout
        buf = b""
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise socket.timeout
                sock.settimeout(left)
                data = sock.recv(4096)
            except socket.timeout:
                self._print("ERR: response timeout")
                sys.exit(1)
            except OSError as ex:
                self._print("ERR: Can't connect to vhostd: %s" % ex)
                sys.exit(1)
            if not data:
                self._print("ERR: vhostd closed the connection without a response")
                sys.exit(1)
            buf += data
            try:
                obj, _ = self.decoder.raw_decode(buf.decode("utf-8").lstrip())
            except (ValueError, UnicodeDecodeError):
                continue                         # incomplete: keep reading
            if isinstance(obj, dict):
                return obj


# -- the sub-commands ---------------------------------------------------------------

def cmd_version(args: argparse.Namespace) -> None:
    result = args.client.call("version", {})
    print(json.dumps(result, indent=2))


def cmd_mgmtpf(args: argparse.Namespace) -> None:
    params: dict[str, Any] = {}
    if args.add_pf:
        params["add"] = args.add_pf
        params["dev"] = args.device
    if args.remove_pf:
        params["remove"] = args.remove_pf
        params["dev"] = args.device
    if args.list_pf:
        params["list"] = args.list_pf
    result = args.client.call("mgmtpf", params)
    print(json.dumps(result, indent=2))


def cmd_vf(args: argparse.Namespace) -> None:
    params: dict[str, Any] = {}
    if args.add_vf:
        params["add"] = args.add_vf
        params["vfdev"] = args.pfvfdev
        params["socket_file"] = args.vhost_socket
        params["uuid"] = args.vm_uuid
    if args.remove_vf:
        params["remove"] = args.remove_vf
        params["vfdev"] = args.pfvfdev
    if args.list_vf:
        params["list"] = args.list_vf
        params["mgmtpf"] = args.pfvfdev
    if args.info_vf:
        params["info"] = args.info_vf
        params["vfdev"] = args.pfvfdev
    if args.debug_vf:
        params["vfdev"] = args.pfvfdev
        params["debug"] = args.debug_vf
        if args.test_operation:
            params["test_operation"] = args.test_operation
        if args.test_size_mode:
            params["size_mode"] = args.test_size_mode
    result = args.client.call("vf", params)
    print(json.dumps(result, indent=2))


TRANSPORT_HELP = f"""\
vfe-vhostd is reached on its Unix socket: $VFE_VHOSTD_SOCKET, default
$VFE_ROOT/run/vfe-vhostd/vhostd.sock, or --socket PATH before the command.
--tcp [--port N] uses TCP {DEFAULT_ADDRESS}:{DEFAULT_PORT} instead (vfe-vhostd --tcp; the port
also from $VFE_VHOSTD_PORT).  vfe-vhostd serves root only."""

DEVICE_HELP = """
    Device specified as PCI "domain:bus:slot.func" syntax or "bus:slot.func" syntax.
    """


def build_parser(prog: str = "vhostmgmt") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog,
                                     description="Nvidia vhostd-rpc command line interface " + VERSION,
                                     epilog=TRANSPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    # how to reach vfe-vhostd: out of the usage line, which stays the reference's
    parser.add_argument("--socket", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tcp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--address", default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(help="** Use -h for sub-command usage", dest="called_rpc_name")

    p = sub.add_parser("version", help="show vhostd version info")
    p.set_defaults(func=cmd_version)

    p = sub.add_parser("mgmtpf", help="Management PF device")
    group = p.add_mutually_exclusive_group()
    group.add_argument("-a", "--add", action="store_true", dest="add_pf", help="add a pci device")
    group.add_argument("-r", "--remove", action="store_true", dest="remove_pf", help="remove a pci device")
    group.add_argument("-l", "--list", action="store_true", dest="list_pf", help="list all PF devices")
    p.add_argument("device", metavar="DEVICE", nargs="?", help=DEVICE_HELP)
    p.set_defaults(func=cmd_mgmtpf)

    p = sub.add_parser("vf", help="Management VF device")
    group = p.add_mutually_exclusive_group()
    group.add_argument("-a", "--add", action="store_true", dest="add_vf", help="add a pci device")
    group.add_argument("-r", "--remove", action="store_true", dest="remove_vf", help="remove a pci device")
    group.add_argument("-l", "--list", action="store_true", dest="list_vf",
                       help="list all VF devices of PF device")
    group.add_argument("-i", "--info", action="store_true", dest="info_vf",
                       help="show specified VF device information")
    group.add_argument("-d", "--debug", action="store_true", dest="debug_vf", help="test VF device debug")
    p.add_argument("pfvfdev", metavar="DEVICE", nargs="?", help=DEVICE_HELP)
    p.add_argument("-o", metavar="test_operation", dest="test_operation", type=int,
                   help="Device test operation: 1=running; 2=quiesced; 3=freeze; 4=start_logging; "
                        "5=stop_logging; 6=get_lm_status")
    p.add_argument("-b", metavar="test_size_mode", dest="test_size_mode", type=int,
                   help="Device test mode: 1=bit; 2=byte", default=2)
    p.add_argument("-v", metavar="vhost_socket", dest="vhost_socket", type=str,
                   help="Vhost socket file name")
    p.add_argument("-u", metavar="vm_uuid", dest="vm_uuid", type=str, help="Virtual machine UUID")
    p.set_defaults(func=cmd_vf)
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """The reference's checks before anything is sent: the error line, or None."""
    if args.called_rpc_name == "mgmtpf":
        if (args.add_pf or args.remove_pf) and not args.device:
            return "Error: No device specified for add/remove action."
        if not args.add_pf and not args.remove_pf and not args.list_pf:
            return "Error: invalid action."
    if args.called_rpc_name == "vf":
        if args.add_vf and not args.pfvfdev:
            return "Error: No vf device specified for add vf action."
        if args.remove_vf and not args.pfvfdev:
            return "Error: No vf device specified for remove vf action."
        if args.list_vf and not args.pfvfdev:
            return "Error: No pf device specified for list vf action."
        if args.info_vf and not args.pfvfdev:
            return "Error: No vf device specified for info vf action."
        if args.debug_vf:
            if not args.pfvfdev:
                return "Error: No vf device specified for test vf action."
            if not args.test_operation or not 1 <= args.test_operation <= 6:
                return "Error: invalid debug operation."
            if args.test_operation in (4, 5) and (not args.test_size_mode or not 1 <= args.test_size_mode <= 2):
                return "Error: invalid test start_logging parameters."
        if not (args.add_vf or args.remove_vf or args.list_vf or args.info_vf or args.debug_vf):
            return "Error: invalid action."
    return None


def _usage_error(parser: argparse.ArgumentParser, message: str) -> None:
    print(message)
    parser.print_usage()
    sys.exit(1)


def execute_script(parser: argparse.ArgumentParser, client: VhostdClient, lines: TextIO) -> None:
    executed = ""
    for line in map(str.rstrip, lines):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        executed = "\n".join([executed, line])
        args = parser.parse_args(shlex.split(line))
        if not hasattr(args, "func"):
            _usage_error(parser, "Error: invalid action.")
        problem = check_args(parser, args)
        if problem:
            _usage_error(parser, problem)
        args.client = client
        try:
            args.func(args)
        except JsonRpcError as ex:
            print("Exception:")
            print(executed.strip() + " <<<")
            print(ex.message)
            sys.exit(1)


def make_client(args: argparse.Namespace) -> VhostdClient:
    """The Unix socket unless TCP is asked for (--tcp, --port or --address)."""
    tcp = args.tcp or args.port is not None or args.address is not None
    port = args.port if args.port is not None else default_port()
    path = None if tcp else os.path.abspath(args.socket) if args.socket else default_socket()
    return VhostdClient(args.address or DEFAULT_ADDRESS, port, TIMEOUT, path=path)


def main(argv: list[str] | None = None) -> int:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    parser = build_parser(name if name in PROGS else "vhostmgmt")
    args = parser.parse_args(argv)
    problem = check_args(parser, args)
    if problem:
        _usage_error(parser, problem)
    client = make_client(args)
    args.client = client
    if hasattr(args, "func"):
        try:
            args.func(args)
        except JsonRpcError as ex:
            print(ex)
            return 1
        return 0
    if sys.stdin.isatty():
        # no sub-command and nothing piped through stdin
        parser.print_help()
        return 1
    execute_script(parser, client, sys.stdin)
    return 0


if __name__ == "__main__":
    sys.exit(main())
