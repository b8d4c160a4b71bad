"""vfe.cli.virtnet: help texts vs the seed's, argv -> RPC calls, validation,
output and errors (against a fake controller on a real socket)."""
import argparse
import json
import sys
import os
import re
import selectors
import threading

import pytest

import vfe
from vfe import __version__
from vfe.cli import virtnet
from vfe.paths import controller_socket
from vfe.rpc import RpcError, RpcServer

# The seed's text ("User Frontend"), whose extraction collapsed the spacing.
SEED_HELP = """\
usage: virtnet [-h] [-v] {hotplug,unplug,list,query,modify,log} ...
Nvidia virtio-net-controller command line interface v1.0.9
positional arguments:
{hotplug,unplug,list,query,modify,log}
** Use -h for sub-command usage
hotplug hotplug virtnet device
unplug unplug virtnet device
list list all virtnet devices
query query all or individual virtnet device(s)
modify modify virtnet device
log set log level
optional arguments:
-h, --help show this help message and exit
-v, --version show program's version number and exit
"""

SEED_LOG_HELP = """\
usage: virtnet log [-h] -l {info,err,debug}
optional arguments:
-h, --help show this help message and exit
-l {info,err,debug}, --level {info,err,debug}
log level: info/err/debug
"""

EXPECTED_HELP = f"""\
usage: virtnet [-h] [-v] {{hotplug,unplug,list,query,modify,log,version,update,stats}} ...

Nvidia virtio-net-controller command line interface v{__version__}

positional arguments:
  {{hotplug,unplug,list,query,modify,log,version,update,stats}}
                        ** Use -h for sub-command usage
    hotplug             hotplug virtnet device
    unplug              unplug virtnet device
    list                list all virtnet devices
    query               query all or individual virtnet device(s)
    modify              modify virtnet device
    log                 set log level
    version             show virtnet version
    update              live update the controller
    stats               show the counters of all or individual device(s)

optional arguments:
  -h, --help            show this help message and exit
  -v, --version         show program's version number and exit
"""

EXPECTED_LOG_HELP = """\
usage: virtnet log [-h] -l {info,err,debug}

optional arguments:
  -h, --help            show this help message and exit
  -l {info,err,debug}, --level {info,err,debug}
                        log level: info/err/debug
"""


def collapse(text: str) -> list[str]:
    return [re.sub(r"\s+", " ", line).strip() for line in text.splitlines() if line.strip()]


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.delenv("VIRTNET_SOCKET", raising=False)
    monkeypatch.setenv("VFE_ROOT", str(tmp_path / "no-controller-here"))


def run(capsys, *argv):
    rc = virtnet.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# -- help texts -----------------------------------------------------------------------

def test_main_help_exact(capsys):
    rc, out, err = run(capsys, "-h")
    assert rc == 0 and err == ""
    assert out == EXPECTED_HELP


def test_main_help_matches_the_seed_line_by_line(capsys):
    _, out, _ = run(capsys, "-h")
    seed = (SEED_HELP.replace("{hotplug,unplug,list,query,modify,log}",
                              "{hotplug,unplug,list,query,modify,log,version,update,stats}")
            .replace("v1.0.9", f"v{__version__}")
            .replace("log set log level\n", "log set log level\nversion show virtnet version\n"
                                            "update live update the controller\n"
                                            "stats show the counters of all or individual device(s)\n"))
    assert collapse(out) == collapse(seed)


@pytest.mark.parametrize("columns", ["40", "80", "200"])
def test_main_usage_stays_on_one_line(capsys, monkeypatch, columns):
    monkeypatch.setenv("COLUMNS", columns)
    _, out, _ = run(capsys, "--help")
    assert out.splitlines()[0] == \
        "usage: virtnet [-h] [-v] {hotplug,unplug,list,query,modify,log,version,update,stats} ..."


def test_log_help_exact_and_matches_the_seed(capsys):
    rc, out, err = run(capsys, "log", "-h")
    assert rc == 0 and err == ""
    assert out == EXPECTED_LOG_HELP
    assert collapse(out) == collapse(SEED_LOG_HELP)


@pytest.mark.parametrize("cmd", virtnet.COMMANDS)
def test_every_subcommand_has_help(capsys, cmd):
    rc, out, _ = run(capsys, cmd, "-h")
    assert rc == 0
    assert out.startswith(f"usage: virtnet {cmd} [-h]")
    assert "optional arguments:" in out and "options:" not in out
    assert "--socket" not in out


def test_modify_device_help(capsys):
    rc, out, _ = run(capsys, "modify", "-p", "0", "device", "-h")
    assert rc == 0 and out.startswith("usage: virtnet modify device [-h] [-m MAC] [-t MTU]")
    for opt in ("--mac", "--mtu", "--features", "--msix_num", "--max_queue_size", "--link_state"):
        assert opt in out


def test_hotplug_usage_line(capsys):
    _, out, _ = run(capsys, "hotplug", "-h")
    usage = " ".join(collapse(out.split("\n\n")[0]))
    assert usage == ("usage: virtnet hotplug [-h] -i IB_DEVICE [-f FEATURES] -m MAC -t MTU "
                                "-n MAX_QUEUES -s MAX_QUEUE_SIZE [-u SF_NUM] [-l]")


def test_version_flag(capsys):
    for flag in ("-v", "--version"):
        rc, out, _ = run(capsys, flag)
        assert rc == 0 and out == f"virtnet {__version__}\n"


# -- argv -> RPC ----------------------------------------------------------------------

HOTPLUG = {"ib_device": "mlx5_0", "features": 0, "mac": "0C:C4:7A:FF:22:93", "mtu": 1500,
           "max_queues": 3, "max_queue_size": 1024, "sf_num": None, "legacy": False}
MODIFY_NONE = {"pf": None, "vf": None, "vuid": None, "mac": None, "mtu": None, "features": None,
               "msix_num": None, "max_queue_size": None, "link_state": None}
QUERY_NONE = {"all": False, "pf": None, "vf": None, "vuid": None, "brief": False}
# `update --start` names the build this virtnet belongs to: the newly installed controller
UPDATE_FROM_HERE = {"path": os.path.dirname(os.path.dirname(os.path.abspath(vfe.__file__)))}   # no interpreter

SEED_COMMANDS = [
    # every virtnet command line in the seed, verbatim (en dashes included)
    ("virtnet hotplug -i mlx5_0 -f 0x0 -m 0C:C4:7A:FF:22:93 -t 1500 -n 3 -s 1024", "hotplug", HOTPLUG),
    ("virtnet hotplug -i mlx5_0 -f 0x0 -m 0C:C4:7A:FF:22:93 -t 1500 -n 3 -s 1024 -l", "hotplug",
     {**HOTPLUG, "legacy": True}),
    ("virtnet query –p 0", "query", {**QUERY_NONE, "pf": 0}),
    ("virtnet list", "list", {}),
    ("virtnet modify -p 0 device -m 0C:C4:7A:FF:22:98", "modify",
     {**MODIFY_NONE, "pf": 0, "mac": "0C:C4:7A:FF:22:98"}),
    ("virtnet unplug -p 0", "unplug", {"pf": 0, "vuid": None}),
    ("virtnet modify -p 0 –v 0 device -m 0C:C4:7A:FF:22:98", "modify",
     {**MODIFY_NONE, "pf": 0, "vf": 0, "mac": "0C:C4:7A:FF:22:98"}),
    ("virtnet modify -u VNETS0D0F2VF1 device -m 0C:C4:7A:FF:22:98", "modify",
     {**MODIFY_NONE, "vuid": "VNETS0D0F2VF1", "mac": "0C:C4:7A:FF:22:98"}),
    ("virtnet query -p 0 -v 0", "query", {**QUERY_NONE, "pf": 0, "vf": 0}),
    ("virtnet modify -p 0 -v 0 device -m 00:00:00:00:33:00", "modify",
     {**MODIFY_NONE, "pf": 0, "vf": 0, "mac": "00:00:00:00:33:00"}),
    ("virtnet version", "version", {}),
    ("virtnet update --start", "update_start", UPDATE_FROM_HERE),
    ("virtnet update -s", "update_start", UPDATE_FROM_HERE),
    ("virtnet update status", "update_status", {}),
    ("virtnet update -t", "update_status", {}),
    # and the rest of the surface
    ("virtnet log -l debug", "log", {"level": "debug"}),
    ("virtnet log --level err", "log", {"level": "err"}),
    ("virtnet update --status", "update_status", {}),
    ("virtnet update start", "update_start", UPDATE_FROM_HERE),
    ("virtnet unplug -u VNETS1D0F0", "unplug", {"pf": None, "vuid": "VNETS1D0F0"}),
    ("virtnet query -a", "query", {**QUERY_NONE, "all": True}),
    ("virtnet query --all --brief", "query", {**QUERY_NONE, "all": True, "brief": True}),
    ("virtnet query -u VNETS1D0F0 -b", "query", {**QUERY_NONE, "vuid": "VNETS1D0F0", "brief": True}),
    ("virtnet query --pf 1 --vf 3", "query", {**QUERY_NONE, "pf": 1, "vf": 3}),
    ("virtnet hotplug --ib_device mlx5_1 --features 1099511627776 --mac 52:54:00:12:34:56 "
     "--mtu 9000 --max_queues 8 --max_queue_size 256 --sf_num 1005 --legacy", "hotplug",
     {"ib_device": "mlx5_1", "features": 1 << 40, "mac": "52:54:00:12:34:56", "mtu": 9000,
      "max_queues": 8, "max_queue_size": 256, "sf_num": 1005, "legacy": True}),
    ("virtnet hotplug -i mlx5_0 -m 0c:c4:7a:ff:22:93 -t 68 -n 1 -s 2", "hotplug",
     {**HOTPLUG, "features": None, "mac": "0c:c4:7a:ff:22:93", "mtu": 68, "max_queues": 1,
      "max_queue_size": 2}),
    ("virtnet hotplug -i mlx5_0 -f 0X30000 -m 0C:C4:7A:FF:22:93 -t 9216 -n 3 -s 32768", "hotplug",
     {**HOTPLUG, "features": 0x30000, "mtu": 9216, "max_queue_size": 32768}),
    ("virtnet modify -p 2 device -t 9000 -f 0x1 -n 10 -q 512 -e down", "modify",
     {**MODIFY_NONE, "pf": 2, "mtu": 9000, "features": 1, "msix_num": 10, "max_queue_size": 512,
      "link_state": "down"}),
    ("virtnet modify --vuid VNETS1D0F0 device --link_state up", "modify",
     {**MODIFY_NONE, "vuid": "VNETS1D0F0", "link_state": "up"}),
]


@pytest.mark.parametrize("line, method, params", SEED_COMMANDS, ids=[c[0] for c in SEED_COMMANDS])
def test_command_line_to_rpc(line, method, params):
    argv = line.split()[1:]
    ns = virtnet.parse_args(argv)
    m, p = virtnet.build_request(ns)
    assert (m, p) == (method, params)
    assert list(p) == list(params)          # params in the long options' order


def test_normalize_argv():
    assert virtnet.normalize_argv(["query", "–p", "0"]) == ["query", "-p", "0"]
    assert virtnet.normalize_argv(["log", "—level", "info"]) == ["log", "--level", "info"]
    assert virtnet.normalize_argv(["--socket", "/x", "update", "status"]) == \
        ["--socket", "/x", "update", "--status"]
    assert virtnet.normalize_argv(["list", "update", "status"]) == ["list", "update", "status"]
    assert virtnet.normalize_argv(["hotplug", "-i", "mlx5_0"]) == ["hotplug", "-i", "mlx5_0"]


# -- bad input: usage errors, exit 2 --------------------------------------------------

BAD = [
    ("", "the following arguments are required: {hotplug,unplug,list,query,modify,log,version,update,stats}"),
    ("frob", "invalid choice: 'frob'"),
    ("hotplug -i mlx5_0 -m 0C:C4:7A:FF:22:9 -t 1500 -n 3 -s 1024",
     "argument -m/--mac: invalid MAC address '0C:C4:7A:FF:22:9': expected six hex octets"),
    ("hotplug -i mlx5_0 -m 0C-C4-7A-FF-22-93 -t 1500 -n 3 -s 1024", "argument -m/--mac: invalid MAC"),
    ("hotplug -i mlx5_0 -m 0C:C4:7A:FF:22:GG -t 1500 -n 3 -s 1024", "argument -m/--mac: invalid MAC"),
    ("hotplug -i mlx5_0 -m 0C:C4:7A:FF:22:93 -t 67 -n 3 -s 1024", "argument -t/--mtu: MTU 67 out of range (68..9216)"),
    ("hotplug -i mlx5_0 -m 0C:C4:7A:FF:22:93 -t 9217 -n 3 -s 1024", "MTU 9217 out of range (68..9216)"),
    ("hotplug -i mlx5_0 -m 0C:C4:7A:FF:22:93 -t big -n 3 -s 1024",
     "argument -t/--mtu: invalid MTU 'big': expected a non-negative decimal number"),
    ("hotplug -i mlx5_0 -m 0C:C4:7A:FF:22:93 -t 1500 -n 0 -s 1024",
     "argument -n/--max_queues: max queues 0 out of range (1..65535)"),
    ("hotplug -i mlx5_0 -m 0C:C4:7A:FF:22:93 -t 1500 -n -1 -s 1024", "argument -n/--max_queues: invalid max queues '-1'"),
    ("hotplug -i mlx5_0 -m 0C:C4:7A:FF:22:93 -t 1500 -n 3 -s 1000",
     "argument -s/--max_queue_size: queue size 1000 is not a power of two in 2..32768"),
    ("hotplug -i mlx5_0 -m 0C:C4:7A:FF:22:93 -t 1500 -n 3 -s 65536", "queue size 65536 is not a power of two"),
    ("hotplug -i mlx5_0 -m 0C:C4:7A:FF:22:93 -t 1500 -n 3 -s 1", "queue size 1 is not a power of two"),
    ("hotplug -i mlx5_0 -f 0xZZ -m 0C:C4:7A:FF:22:93 -t 1500 -n 3 -s 1024",
     "argument -f/--features: invalid features '0xZZ': expected a decimal or 0x-prefixed hex number"),
    ("hotplug -i mlx5_0 -f 0x10000000000000000 -m 0C:C4:7A:FF:22:93 -t 1500 -n 3 -s 1024",
     "do not fit in 64 bits"),
    ("hotplug -i mlx5_0 -m 0C:C4:7A:FF:22:93 -t 1500 -n 3 -s 1024 -u 999",
     "argument -u/--sf_num: SF number 999 out of range (1000..2147483647)"),
    ("hotplug -i ../etc -m 0C:C4:7A:FF:22:93 -t 1500 -n 3 -s 1024", "argument -i/--ib_device: invalid RDMA device name"),
    ("hotplug -m 0C:C4:7A:FF:22:93 -t 1500 -n 3 -s 1024",
     "the following arguments are required: -i/--ib_device"),
    ("hotplug -i mlx5_0", "the following arguments are required: -m/--mac, -t/--mtu, -n/--max_queues, "
                          "-s/--max_queue_size"),
    ("unplug", "one of the arguments -p/--pf -u/--vuid is required"),
    ("unplug -p 0 -u VNETS1D0F0", "argument -u/--vuid: not allowed with argument -p/--pf"),
    ("unplug -p x", "argument -p/--pf: invalid PF index 'x'"),
    ("unplug -u a/b", "argument -u/--vuid: invalid VUID 'a/b'"),
    ("query", "one of the arguments -a/--all -p/--pf -u/--vuid is required"),
    ("query -a -p 0", "argument -p/--pf: not allowed with argument -a/--all"),
    ("query -u VNETS1D0F0 -v 0", "argument -v/--vf: needs -p/--pf"),
    ("modify -p 0", "the following arguments are required: {device}"),
    ("modify device -m 0C:C4:7A:FF:22:98", "one of the arguments -p/--pf -u/--vuid is required"),
    ("modify -p 0 device", "nothing to modify: give at least one of -m, -t, -f, -n, -q, -e"),
    ("modify -u X1 -v 0 device -t 1500", "argument -v/--vf: needs -p/--pf"),
    ("modify -p 0 device -n 0", "argument -n/--msix_num: MSI-X vector count 0 out of range (1..2048)"),
    ("modify -p 0 device -q 100", "argument -q/--max_queue_size: queue size 100 is not a power of two"),
    ("modify -p 0 device -e sideways", "argument -e/--link_state: invalid choice: 'sideways'"),
    ("modify -p 0 device -m zz", "argument -m/--mac: invalid MAC address 'zz'"),
    ("log", "the following arguments are required: -l/--level"),
    ("log -l verbose", "argument -l/--level: invalid choice: 'verbose' (choose from 'info', 'err', 'debug')"),
    ("update", "one of the arguments -s/--start -t/--status is required"),
    ("update -s -t", "argument -t/--status: not allowed with argument -s/--start"),
    ("list extra", "unrecognized arguments: extra"),
]


@pytest.mark.parametrize("line, message", BAD, ids=[b[0] or "<none>" for b in BAD])
def test_usage_errors(capsys, line, message):
    rc, out, err = run(capsys, *line.split())
    assert rc == 2
    assert out == ""
    assert err.startswith("usage: virtnet")
    assert message in err, err


# -- against a fake controller --------------------------------------------------------

HOTPLUG_RESULT = {"bdf": "85:00.0", "vuid": "VNETS1D0F0", "id": 3, "sf_rep_net_device": "en3f0pf0sf2000",
                  "mac": "0C:C4:7A:FF:22:93"}
LIST_RESULT = {"devices": [{
    "vf_id": 0, "parent_pf_id": 0, "function_type": "VF", "vuid": "VNETS0D0F2VF1", "bdf": "83:00.6",
    "sf_num": 3000, "sf_parent_device": "mlx5_0", "sf_rep_net_device": "en3f0pf0sf3000",
    "sf_rep_net_ifindex": 19, "sf_rdma_device": "mlx5_7", "sf_vhca_id": "0x192",
    "msix_config_vector": "0x0", "num_msix": 10, "max_queues": 4, "max_queues_size": 256,
    "net_mac": "5A:94:07:04:F6:1C", "net_mtu": 1500}]}


class FakeController:
    def __init__(self, path, results, old=False):
        self.calls = []
        self.results = results
        self.old = old
        self.sel = selectors.DefaultSelector()
        self.server = RpcServer(path, self.handle, self.sel)
        self.path = path
        self.stopping = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def handle(self, method, params):
        self.calls.append((method, params))
        if self.old and method.startswith("update"):
            raise RpcError.method_not_found(method)
        result = self.results.get(method)
        if isinstance(result, Exception):
            raise result
        return result

    def run(self):
        while not self.stopping:
            for key, _ in self.sel.select(0.05):
                if key.data[0] == "rpc":
                    key.data[1].on_readable()

    def stop(self):
        self.stopping = True
        self.thread.join(5)
        self.server.close()
        self.sel.close()


@pytest.fixture
def controller(tmp_path):
    made = []

    def make(results=None, old=False, path=None):
        c = FakeController(path or str(tmp_path / "virtnet.sock"), results or {}, old)
        made.append(c)
        return c
    yield make
    for c in made:
        c.stop()


def test_hotplug_prints_seed_result_in_server_order(capsys, controller):
    c = controller({"hotplug": HOTPLUG_RESULT})
    rc, out, err = run(capsys, "--socket", c.path,
                       *"hotplug -i mlx5_0 -f 0x0 -m 0C:C4:7A:FF:22:93 -t 1500 -n 3 -s 1024".split())
    assert (rc, err) == (0, "")
    assert c.calls == [("hotplug", HOTPLUG)]
    assert out == json.dumps(HOTPLUG_RESULT, indent=2) + "\n"
    assert [line.split(":")[0].strip() for line in out.splitlines()[1:-1]] == \
        ['"bdf"', '"vuid"', '"id"', '"sf_rep_net_device"', '"mac"']


def test_list_prints_nested_json(capsys, controller):
    c = controller({"list": LIST_RESULT})
    rc, out, _ = run(capsys, "list", "--socket", c.path)       # --socket after the sub-command too
    assert rc == 0
    assert out == json.dumps(LIST_RESULT, indent=2) + "\n"
    assert out.index('"vf_id"') < out.index('"parent_pf_id"') < out.index('"net_mtu"')
    assert c.calls == [("list", {})]


def test_null_result_prints_nothing(capsys, controller):
    c = controller({"log": None})
    rc, out, err = run(capsys, "--socket", c.path, "log", "-l", "debug")
    assert (rc, out, err) == (0, "", "")
    assert c.calls == [("log", {"level": "debug"})]


def test_socket_from_env(capsys, controller, monkeypatch, tmp_path):
    c = controller({"list": []}, path=str(tmp_path / "env.sock"))
    monkeypatch.setenv("VIRTNET_SOCKET", c.path)
    assert run(capsys, "list") == (0, "[]\n", "")


def test_socket_from_vfe_root(capsys, controller, monkeypatch, tmp_path):
    root = tmp_path / "root"
    monkeypatch.setenv("VFE_ROOT", str(root))
    assert controller_socket() == str(root / "run" / "virtnet" / "virtnet.sock")
    c = controller({"list": [1]}, path=controller_socket())
    assert run(capsys, "list") == (0, "[\n  1\n]\n", "")
    monkeypatch.delenv("VFE_ROOT")
    assert controller_socket() == "/run/virtnet/virtnet.sock"


def test_controller_socket_env():
    """$VIRTNET_SOCKET as given (the CLIs pass it on unchanged), else under
    the absolute $VFE_ROOT, where the controller puts it."""
    assert controller_socket({"VIRTNET_SOCKET": "rel/x.sock", "VFE_ROOT": "/r"}) == "rel/x.sock"
    assert controller_socket({"VFE_ROOT": "/r/"}) == "/r/run/virtnet/virtnet.sock"
    assert controller_socket({"VFE_ROOT": ""}) == "/run/virtnet/virtnet.sock"
    assert controller_socket({"VFE_ROOT": "r"}) == os.path.join(os.getcwd(), "r/run/virtnet/virtnet.sock")


def test_application_error(capsys, controller):
    c = controller({"unplug": RpcError(-19, "no such device: pf 7")})
    rc, out, err = run(capsys, "--socket", c.path, "unplug", "-p", "7")
    assert (rc, out) == (1, "")
    assert err == "Error: no such device: pf 7 (code -19)\n"


def test_error_with_data(capsys, controller):
    c = controller({"modify": RpcError(-16, "device VNETS1D0F0 is migrating", {"vuid": "VNETS1D0F0"})})
    rc, _, err = run(capsys, "--socket", c.path, "modify", "-u", "VNETS1D0F0", "device", "-t", "9000")
    assert rc == 1
    assert err == ('Error: device VNETS1D0F0 is migrating (code -16)\n'
                   'Details: {"vuid": "VNETS1D0F0"}\n')


def test_internal_error(capsys, controller):
    c = controller({"list": ValueError("boom")})
    rc, _, err = run(capsys, "--socket", c.path, "list")
    assert rc == 1 and err.startswith("Error: boom (code -32603)\n")


def test_controller_not_running(capsys, tmp_path):
    path = str(tmp_path / "missing.sock")
    rc, out, err = run(capsys, "--socket", path, "list")
    assert (rc, out) == (1, "")
    assert err == f"Error: is virtio-net-controller running? socket {path} not found\n"


def test_default_socket_not_running(capsys):
    rc, _, err = run(capsys, "query", "-a")
    assert rc == 1
    assert "is virtio-net-controller running? socket" in err
    assert os.path.join("no-controller-here", "run", "virtnet", "virtnet.sock") in err


def test_update_on_an_old_controller(capsys, controller):
    c = controller(old=True)
    rc, out, err = run(capsys, "--socket", c.path, "update", "--start")
    assert (rc, out) == (1, "")
    assert c.calls == [("update_start", UPDATE_FROM_HERE)]
    assert err.startswith('Error: the "update" command is not supported')
    assert "too old" in err and "(code -32601)" in err


def test_update_status(capsys, controller):
    c = controller({"update_status": {"status": "idle"}})
    rc, out, _ = run(capsys, "--socket", c.path, "update", "status")
    assert rc == 0 and json.loads(out) == {"status": "idle"}
    assert c.calls == [("update_status", {})]


def test_version_with_controller(capsys, controller):
    c = controller({"version": {"version": "0.0.9", "pid": 1234}})
    rc, out, err = run(capsys, "--socket", c.path, "version")
    assert (rc, err) == (0, "")
    assert out == json.dumps({"virtnet": __version__, "controller": "0.0.9", "pid": 1234}, indent=2) + "\n"


def test_version_with_nested_controller_info(capsys, controller):
    c = controller({"version": {"controller": {"version": "0.1.0", "engine_abi": 3, "pid": 42}}})
    rc, out, err = run(capsys, "--socket", c.path, "version")
    assert (rc, err) == (0, "")
    assert out == json.dumps({"virtnet": __version__,
                              "controller": {"version": "0.1.0", "engine_abi": 3, "pid": 42}}, indent=2) + "\n"


def test_version_with_plain_string(capsys, controller):
    c = controller({"version": "0.1.0"})
    _, out, _ = run(capsys, "--socket", c.path, "version")
    assert json.loads(out) == {"virtnet": __version__, "controller": "0.1.0"}


def test_version_without_controller(capsys, tmp_path):
    path = str(tmp_path / "gone.sock")
    rc, out, err = run(capsys, "--socket", path, "version")
    assert rc == 0
    assert json.loads(out) == {"virtnet": __version__, "controller": "not running"}
    assert err == f"Warning: is virtio-net-controller running? socket {path} not found\n"


def test_version_on_a_controller_without_it(capsys, controller):
    c = controller({"version": RpcError.method_not_found("version")})
    rc, out, err = run(capsys, "--socket", c.path, "version")
    assert rc == 0 and json.loads(out)["controller"] == "unknown"
    assert "did not report its version" in err


def test_seed_lines_end_to_end(capsys, controller):
    c = controller({"query": {"sf_rep_net_device": "en3f0pf0sf3000"}, "modify": None})
    for line, method, params in SEED_COMMANDS:
        c.calls.clear()
        rc, out, err = run(capsys, "--socket", c.path, *line.split()[1:])
        assert rc == 0, (line, err)
        if method == "version":
            assert c.calls == [("version", {})]
        else:
            assert c.calls == [(method, params)], line


def test_timeout_option(capsys, tmp_path):
    import socket as _socket
    path = str(tmp_path / "mute.sock")
    lsock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(1)                     # accepts (in the backlog), never answers
    try:
        rc, _, err = run(capsys, "--socket", path, "--timeout", "0.2", "list")
        assert rc == 1 and "no answer from virtio-net-controller" in err
    finally:
        lsock.close()


def test_console_entry_point_exits_with_main_rc(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    repo = str(Path(virtnet.__file__).resolve().parents[2])
    env = dict(os.environ, VIRTNET_SOCKET=str(tmp_path / "x.sock"), COLUMNS="80", PYTHONPATH=repo)
    p = subprocess.run([sys.executable, "-m", "vfe.cli.virtnet", "list"], capture_output=True, text=True,
                       env=env, cwd=repo)
    assert p.returncode == 1 and "is virtio-net-controller running?" in p.stderr
    p = subprocess.run([sys.executable, "-m", "vfe.cli.virtnet", "log", "-h"], capture_output=True,
                       text=True, env=env, cwd=repo)
    assert p.returncode == 0 and p.stdout == EXPECTED_LOG_HELP


@pytest.mark.parametrize("parse, text", [
    (virtnet.mac_value, "00:11:22:33:44:55\n"), (virtnet.ib_device_value, "mlx5_0\n"),
    (virtnet.vuid_value, "VNETS0D0F2\n"), (virtnet.vuid_value, "ok;junk"),
])
def test_names_and_macs_are_matched_whole(parse, text):
    """`$` also matches before a trailing newline: every check is a fullmatch."""
    with pytest.raises(argparse.ArgumentTypeError):
        parse(text)


def test_the_controller_matches_macs_whole():
    from vfe.controller.kind import InventoryError
    from vfe.controller.net_kind import NetKind
    assert NetKind.check_mac("00:11:22:33:44:55") == "00:11:22:33:44:55"
    with pytest.raises(InventoryError, match="bad MAC address"):
        NetKind.check_mac("00:11:22:33:44:55\n")
