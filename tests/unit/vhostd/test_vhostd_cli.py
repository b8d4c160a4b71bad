"""`vhostmgmt` (vfe/cli/vhostmgmt.py) against a live vfe-vhostd RPC server
(the real service and server over a fake controller and fake relays, on an
ephemeral port): the reference's argument checks and messages, the params it
sends (printed first, as a Python dict), results printed as JSON, JSON-RPC
errors and an unreachable vhostd, and the one-command-per-line mode.  Also
`vfe-vhostd`'s argument parsing."""
from __future__ import annotations

import io
import json
import selectors
import socket
import threading

import pytest

from vhostd_fakes import FakeController, FakeRelay, pf, vf
from vfe.cli import vhostd as vhostd_cli
from vfe.cli import vhostmgmt
from vfe.vhostd.rpc import RpcServer
from vfe.vhostd.service import VhostService

USAGE = "usage: vhostmgmt [-h] {version,mgmtpf,vf} ..."


@pytest.fixture
def vhostd():
    FakeRelay.instances, FakeRelay.fail_with = [], None
    ctl = FakeController([pf(0, "84:00.2", "VNETS0D0F2"), vf(0, 0, "90:00.0", "VNETS0D0F2VF1")])
    sel = selectors.DefaultSelector()
    svc = VhostService(ctl, sel, client=True, relay_factory=FakeRelay)
    methods = svc.methods()
    srv = RpcServer(sel, methods, "127.0.0.1", 0)
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


def run(srv, capsys, *argv) -> tuple[int, str]:
    try:
        rc = vhostmgmt.main(["--port", str(srv.port), *argv])
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
    client = vhostmgmt.VhostdClient("127.0.0.1", vhostd.port, 5, out=io.StringIO())
    with pytest.raises(vhostmgmt.JsonRpcError) as e:
        client.call("nosuch", {"a": 1})
    assert e.value.message.endswith('"code": -32601,\n  "message": "Method not found."\n}')
    assert '"method": "nosuch"' in e.value.message and '"a": 1' in e.value.message


def test_unreachable_vhostd(capsys):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(SystemExit) as e:
        vhostmgmt.main(["--port", str(port), "mgmtpf", "-l"])
    assert e.value.code == 1
    out = capsys.readouterr().out
    assert out.splitlines()[1:] == ["ERR: Can't connect to vhostd: [Errno 111] Connection refused",
                                    "     VDPA is not ready to accept commands"]


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
    assert (a.client, a.iface, a.port, a.controller_socket) == (False, "", 12190, None)
    a = vhostd_cli.build_parser().parse_args(["--client", "--iface", "/tmp/vhost-user-", "--port", "1234",
                                              "--controller-socket", "/x.sock"])
    assert (a.client, a.iface, a.port, a.controller_socket) == (True, "/tmp/vhost-user-", 1234, "/x.sock")
