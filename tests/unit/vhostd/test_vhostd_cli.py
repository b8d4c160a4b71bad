"""`vhostmgmt` (vfe/cli/vhostmgmt.py) against a live vfe-vhostd RPC server
(the real service and server over a fake controller and fake relays, on its
Unix socket and an ephemeral TCP port): the reference's argument checks and
messages, the params it sends (printed first, as a Python dict), results
printed as JSON, JSON-RPC errors, an unreachable vhostd and a refused caller,
and the one-command-per-line mode.  Also `vfe-vhostd`'s argument parsing."""
from __future__ import annotations

import io
import json
import os
import selectors
import socket
import sys
import threading

import pytest

from tests.harness.unprivileged import needs_root, public_dir, run_nobody
from tests.unit.vhostd.vhostd_fakes import FakeController, FakeRelay, pf, vf
from vfe.cli import vhostd as vhostd_cli
from vfe.cli import vhostmgmt
from vfe.vhostd.rpc import RpcServer
from vfe.vhostd.service import VhostService

USAGE = "usage: vhostmgmt [-h] {version,mgmtpf,vf} ..."


@pytest.fixture
def vhostd(tmp_path):
    FakeRelay.instances, FakeRelay.fail_with = [], None
    ctl = FakeController([pf(0, "84:00.2", "VNETS0D0F2"), vf(0, 0, "90:00.0", "VNETS0D0F2VF1")])
    sel = selectors.DefaultSelector()
    svc = VhostService(ctl, sel, client=True, relay_factory=FakeRelay)
    methods = svc.methods()
    srv = RpcServer(sel, methods, path=str(tmp_path / "run" / "vfe-vhostd" / "vhostd.sock"),
                    tcp=("127.0.0.1", 0))
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            for key, _ in sel.select(0.05):
                key.data()
    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield srv
    stop.set()
    t.join(5)
    srv.close()
    sel.close()


def run(srv, capsys, *argv, transport: tuple[str, ...] | None = None) -> tuple[int, str]:
    """vhostmgmt ARGV on vfe-vhostd's socket (or the given transport options)."""
    if transport is None:
        transport = ("--socket", srv.path)
    try:
        rc = vhostmgmt.main([*transport, *argv])
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().out


def test_seed_commands_print_params_then_result(vhostd, capsys):
    rc, out = run(vhostd, capsys, "mgmtpf", "-a", "0000:84:00.2")
    assert rc == 0
    assert out == "{'add': True, 'dev': '0000:84:00.2'}\n" + json.dumps({"errno": 0, "errstr": "Success"},
                                                                         indent=2) + "\n"
    rc, out = run(vhostd, capsys, "vf", "-a", "0000:90:00.0", "-v", "/tmp/vfe-net0")
    first, rest = out.split("\n", 1)
    assert first == "{'add': True, 'vfdev': '0000:90:00.0', 'socket_file': '/tmp/vfe-net0', 'uuid': None}"
    assert json.loads(rest) == {"errno": 0, "errstr": "Success"}
    rc, out = run(vhostd, capsys, "mgmtpf", "-l")
    assert out.startswith("{'list': True}\n") and json.loads(out.split("\n", 1)[1]) == \
        {"devices": [{"pf": "0000:84:00.2"}], "errno": 0, "errstr": "Success"}
    rc, out = run(vhostd, capsys, "vf", "-l", "0000:84:00.2")
    assert json.loads(out.split("\n", 1)[1])["devices"][0]["socket_file"] == "/tmp/vfe-net0"
    rc, out = run(vhostd, capsys, "vf", "-i", "0000:90:00.0")
    dev = json.loads(out.split("\n", 1)[1])["device"]
    assert dev["mac"] == "00:00:00:00:33:00" and dev["device_feature"] == {"value": "0x0"}
    rc, out = run(vhostd, capsys, "vf", "-d", "0000:90:00.0", "-o", "1")
    assert out.split("\n", 1)[0] == "{'vfdev': '0000:90:00.0', 'debug': True, 'test_operation': 1, 'size_mode': 2}"
    assert json.loads(out.split("\n", 1)[1]) == {"Success": "0000:90:00.0"}
    rc, out = run(vhostd, capsys, "version")
    assert rc == 0 and json.loads(out)["vfe-vhostd-ha version"] == "virtio-net-controller 9.9.9"


def test_service_errors_are_printed_results(vhostd, capsys):
    run(vhostd, capsys, "mgmtpf", "-a", "84:00.2")
    rc, out = run(vhostd, capsys, "mgmtpf", "-a", "84:00.2")
    assert rc == 0                                  # as the reference: an errno result is still a result
    assert out.split("\n", 1)[1] == '{\n  "errno": -1008,\n  "errstr": "PF device already add"\n}\n'
    rc, out = run(vhostd, capsys, "vf", "-r", "0000:90:00.0")
    assert json.loads(out.split("\n", 1)[1]) == {"errno": -1003, "errstr": "VF device not found"}
    rc, out = run(vhostd, capsys, "vf", "-d", "0000:90:00.0", "-o", "2")
    assert json.loads(out.split("\n", 1)[1]) == {"Error": "Fail to find VF device"}


@pytest.mark.parametrize("argv, message", [
    (["mgmtpf", "-a"], "Error: No device specified for add/remove action."),
    (["mgmtpf", "-r"], "Error: No device specified for add/remove action."),
    (["mgmtpf"], "Error: invalid action."),
    (["mgmtpf", "0000:84:00.2"], "Error: invalid action."),
    (["vf", "-a"], "Error: No vf device specified for add vf action."),
    (["vf", "-r"], "Error: No vf device specified for remove vf action."),
    (["vf", "-l"], "Error: No pf device specified for list vf action."),
    (["vf", "-i"], "Error: No vf device specified for info vf action."),
    (["vf", "-d"], "Error: No vf device specified for test vf action."),
    (["vf", "-d", "90:00.0"], "Error: invalid debug operation."),
    (["vf", "-d", "90:00.0", "-o", "7"], "Error: invalid debug operation."),
    (["vf", "-d", "90:00.0", "-o", "4", "-b", "3"], "Error: invalid test start_logging parameters."),
    (["vf", "90:00.0"], "Error: invalid action."),
])
def test_reference_argument_checks(vhostd, capsys, argv, message):
    rc, out = run(vhostd, capsys, *argv)
    assert rc == 1
    assert out == f"{message}\n{USAGE}\n"


def test_exclusive_actions_are_argparse_errors(vhostd, capsys):
    with pytest.raises(SystemExit) as e:
        vhostmgmt.main(["vf", "-a", "-r", "90:00.0"])
    assert e.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_json_rpc_error_is_printed_with_the_request(vhostd, capsys):
    vhostd.methods["version"] = lambda p, i: 1 / 0           # -> -32603 Internal error
    rc, out = run(vhostd, capsys, "version")
    assert rc == 1
    assert out == ("request:\n" + json.dumps({"method": "version", "req_id": 1}, indent=2) +
                   "\nGot JSON-RPC error response\nresponse:\n" +
                   json.dumps({"code": -32603, "message": "Internal error."}, indent=2) + "\n")
    client = vhostmgmt.VhostdClient(timeout=5, out=io.StringIO(), path=vhostd.path)
    with pytest.raises(vhostmgmt.JsonRpcError) as e:
        client.call("nosuch", {"a": 1})
    assert e.value.message.endswith('"code": -32601,\n  "message": "Method not found."\n}')
    assert '"method": "nosuch"' in e.value.message and '"a": 1' in e.value.message


def test_unreachable_vhostd_over_tcp(capsys):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(SystemExit) as e:
        vhostmgmt.main(["--tcp", "--port", str(port), "mgmtpf", "-l"])
    assert e.value.code == 1
    out = capsys.readouterr().out
    assert out.splitlines()[1:] == ["ERR: Can't connect to vhostd: [Errno 111] Connection refused",
                                    "     VDPA is not ready to accept commands"]


def test_unreachable_vhostd_on_its_socket(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VFE_ROOT", str(tmp_path))
    monkeypatch.delenv("VFE_VHOSTD_SOCKET", raising=False)
    path = tmp_path / "run" / "vfe-vhostd" / "vhostd.sock"
    with pytest.raises(SystemExit) as e:
        vhostmgmt.main(["mgmtpf", "-l"])                        # the default: $VFE_ROOT's socket
    assert e.value.code == 1
    assert capsys.readouterr().out.splitlines()[1:] == [
        f"ERR: Can't connect to vhostd: socket {path} not found",
        "     VDPA is not ready to accept commands (is vfe-vhostd running?)"]
    path.parent.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))                                       # left by a killed vfe-vhostd
    stale.close()
    with pytest.raises(SystemExit):
        vhostmgmt.main(["mgmtpf", "-l"])
    assert capsys.readouterr().out.splitlines()[1] == f"ERR: Can't connect to vhostd: nothing listens on socket {path}"


def test_transport_options(vhostd, capsys, monkeypatch):
    monkeypatch.setenv("VFE_VHOSTD_SOCKET", vhostd.path)
    rc, out = run(vhostd, capsys, "mgmtpf", "-a", "84:00.2", transport=())       # $VFE_VHOSTD_SOCKET
    assert rc == 0 and json.loads(out.split("\n", 1)[1])["errno"] == 0
    rc, out = run(vhostd, capsys, "mgmtpf", "-l", transport=("--tcp", "--port", str(vhostd.port)))
    assert rc == 0 and json.loads(out.split("\n", 1)[1])["devices"] == [{"pf": "0000:84:00.2"}]
    monkeypatch.setenv("VFE_VHOSTD_PORT", str(vhostd.port))
    rc, out = run(vhostd, capsys, "mgmtpf", "-l", transport=("--tcp",))
    assert rc == 0 and json.loads(out.split("\n", 1)[1])["errno"] == 0
    args = vhostmgmt.build_parser().parse_args(["--port", "1", "version"])
    assert vhostmgmt.make_client(args).path is None                                # --port alone means TCP


@needs_root()
def test_unprivileged_user_is_told_why(vhostd):
    """As uid 65534: the socket's mode refuses the connection, and over TCP
    vfe-vhostd refuses the caller; both say so, and nothing is done."""
    with public_dir() as d:
        path = str(d / "vhostd.sock")
        os.link(vhostd.path, path)                              # the same 0600 socket, reachable by all
        r = run_nobody([sys.executable, "-m", "vfe.cli.vhostmgmt", "--socket", path, "mgmtpf", "-a", "84:00.2"])
        assert r.returncode == 1
        assert r.stdout.splitlines()[1:] == [f"ERR: Can't connect to vhostd: permission denied on {path}",
                                             "     vfe-vhostd serves root only: run vhostmgmt as root"]
        r = run_nobody([sys.executable, "-m", "vfe.cli.vhostmgmt", "--tcp", "--port", str(vhostd.port),
                        "mgmtpf", "-a", "84:00.2"])
        assert r.returncode == 1
        assert "Got JSON-RPC error response" in r.stdout
        assert '"message": "Permission denied: vfe-vhostd serves root only, not uid 65534."' in r.stdout
    assert FakeRelay.instances == [] and vhostd.methods["mgmtpf"]({"list": True}, 1)["errno"] == -1001


def test_one_command_per_line_from_stdin(vhostd, capsys, monkeypatch):
    script = "mgmtpf -a 0000:84:00.2\n\n# comment\nvf -a 0000:90:00.0 -v /tmp/s0\nvf -l 0000:84:00.2\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    rc, out = run(vhostd, capsys)
    assert rc == 0
    assert out.count('"errno": 0') == 3 and '"socket_file": "/tmp/s0"' in out
    vhostd.methods["vf"] = lambda p, i: 1 / 0
    monkeypatch.setattr("sys.stdin", io.StringIO("mgmtpf -l\nvf -l 0000:84:00.2\nversion\n"))
    rc, out = run(vhostd, capsys)
    assert rc == 1
    assert "Exception:\nmgmtpf -l\nvf -l 0000:84:00.2 <<<\nrequest:\n" in out
    assert "vfe-vhostd version" not in out                   # stopped at the failing line


def test_help_and_names(capsys, monkeypatch):
    p = vhostmgmt.build_parser()
    assert p.format_usage().strip() == USAGE
    assert "Nvidia vhostd-rpc command line interface v" in p.format_help()
    monkeypatch.setattr("sys.argv", ["/usr/local/bin/vfe-vhost-cli"])
    with pytest.raises(SystemExit):
        vhostmgmt.main(["-h"])
    assert capsys.readouterr().out.startswith("usage: vfe-vhost-cli [-h]")


def test_vhostd_arguments():
    a = vhostd_cli.build_parser().parse_args([])
    assert (a.client, a.iface, a.socket, a.tcp, a.port, a.controller_socket) == (False, "", None, False, None, None)
    a = vhostd_cli.build_parser().parse_args(["--client", "--iface", "/tmp/vhost-user-", "--tcp", "--port", "1234",
                                              "--socket", "/s.sock", "--controller-socket", "/x.sock"])
    assert (a.client, a.iface, a.socket, a.tcp, a.port, a.controller_socket) == \
        (True, "/tmp/vhost-user-", "/s.sock", True, 1234, "/x.sock")


def test_default_socket_follows_vfe_root():
    from vfe.vhostd import default_socket
    assert default_socket({}) == "/run/vfe-vhostd/vhostd.sock"
    assert default_socket({"VFE_ROOT": "/r"}) == "/r/run/vfe-vhostd/vhostd.sock"
    assert default_socket({"VFE_ROOT": "/r", "VFE_VHOSTD_SOCKET": "/s/v.sock"}) == "/s/v.sock"
