"""`virtnet` against the service-mode controller, as the seed documents it.

Every `virtnet` command line of the seed runs here (paths modulo VFE_ROOT),
its output's fields and values are checked, and so are the errors a user
can run into: bad MACs, queue counts over the limits, unknown devices, a
17th hot-plug, SF exhaustion, transitional devices without the NV
configuration or without I/O port space, bad virtnet.conf files, a disabled
emulation, recovery files that no longer match the NV configuration.  After
every failed command nothing may be half created: no new representor netdev
in the controller's namespace, no new socket, no new recovery file, the SF
pool as it was (`expect_error` checks all of it).

Each test runs its controller(s) inside its own network namespace with a
private VFE_ROOT under /tmp; one controller serves many checks.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path

import pytest

import vfe
from tests.harness.netns import NetNs

from tests.e2e.service_helpers import (
    HOTPLUG_OUTPUT_FIELDS, PF_LIST_FIELDS, REP_RE, SEED_CONF, SEED_HOTPLUG, SEED_LAG_CONF, SEED_MAC,
    SEED_MAC_MODIFIED, SEED_PF_NV, SEED_RECOVERY_FIELDS, assert_unchanged, bdf_raw, expect_error,
    hotplug_args, link_info, links, mac_n, make_service, recovery_files, recovery_record, rpc_error,
    run_files, run_virtnet_plain, sf_pool_state, snapshot, squash, start_outcome, wait_exit,
)

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")]

SEED_RECOVERY_DIR = "/opt/mellanox/mlnx_virtnet/recovery"


@pytest.fixture
def short_root():
    d = tempfile.mkdtemp(prefix="vfe-v-", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def ns():
    with NetNs() as n:
        yield n


@pytest.fixture
def services(ns, short_root):
    """make(name, nv=..., conf=...) -> a ControllerService in `ns`; all are
    stopped (by PID) before the namespace goes, and their logs printed."""
    made = []

    def make(name: str = "r", **kw):
        svc = make_service(short_root / name, ns, **kw)
        made.append(svc)
        return svc

    yield make
    for svc in made:
        rc = svc.stop()
        print(f"--- {svc.log_path} (exit {rc}) ---\n{svc.log()[-6000:]}")


def list_devices(svc) -> list[dict]:
    return svc.virtnet_json("list")["devices"]


def by_vuid(svc) -> dict[str, dict]:
    return {d["vuid"]: d for d in list_devices(svc)}


# ---------------------------------------------------------------------------- usage


def test_usage_texts_and_no_controller(short_root):
    """`virtnet -h` and `virtnet log -h` print the seed's texts; usage errors
    exit 2 with argparse's message; without a controller, commands say so."""
    r = run_virtnet_plain("-h")
    assert r.returncode == 0 and r.stderr == ""
    lines = squash(r.stdout)
    assert lines[0].startswith("usage: virtnet [-h] [-v] {hotplug,unplug,list,query,modify,log"), lines[0]
    assert lines[0].endswith("} ...")
    assert f"Nvidia virtio-net-controller command line interface v{vfe.__version__}" in lines
    seed_lines = [
        "positional arguments:",
        "** Use -h for sub-command usage",
        "hotplug hotplug virtnet device",
        "unplug unplug virtnet device",
        "list list all virtnet devices",
        "query query all or individual virtnet device(s)",
        "modify modify virtnet device",
        "log set log level",
        "optional arguments:",
        "-h, --help show this help message and exit",
        "-v, --version show program's version number and exit",
    ]
    positions = [lines.index(s) for s in seed_lines]          # every seed line, in the seed's order
    assert positions == sorted(positions), lines
    # the seed's usage is one line: it must stay one line on a narrow terminal too
    narrow = run_virtnet_plain("-h", env={"COLUMNS": "50"})
    assert narrow.stdout.splitlines()[0].endswith("} ..."), narrow.stdout

    r = run_virtnet_plain("log", "-h")
    assert r.returncode == 0
    assert squash(r.stdout) == [
        "usage: virtnet log [-h] -l {info,err,debug}",
        "optional arguments:",
        "-h, --help show this help message and exit",
        "-l {info,err,debug}, --level {info,err,debug}",
        "log level: info/err/debug",
    ], r.stdout

    r = run_virtnet_plain("-v")
    assert r.returncode == 0 and r.stdout.strip() == f"virtnet {vfe.__version__}"

    usage_errors = [
        ((), r"required|hotplug,unplug"),
        (("bogus",), r"invalid choice: 'bogus'"),
        (("hotplug", "-i", "mlx5_0"), r"the following arguments are required: -m/--mac"),
        (("log", "-l", "warn"), r"argument -l/--level: invalid choice: 'warn'"),
        (("query", "-u", "VNETS1D0F0", "-v", "0"), r"-v/--vf: needs -p/--pf"),
        (("modify", "-p", "0", "device"), r"nothing to modify"),
        (("unplug", "-p", "0", "-u", "VNETS1D0F0"), r"not allowed with argument"),
    ]
    for args, match in usage_errors:
        r = run_virtnet_plain(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert re.search(match, r.stderr), (args, r.stderr)
        assert "usage: virtnet" in r.stderr and "Traceback" not in r.stderr

    # no controller: a clear error (exit 1), `version` still reports virtnet's own
    env = {"VFE_ROOT": str(short_root), "VIRTNET_SOCKET": str(short_root / "virtnet.sock")}
    r = run_virtnet_plain("list", env=env)
    assert r.returncode == 1 and r.stdout == ""
    assert re.search(r"^Error: .*virtio-net-controller running.*virtnet\.sock", r.stderr), r.stderr
    r = run_virtnet_plain("version", env=env)
    assert r.returncode == 0
    assert json.loads(r.stdout) == {"virtnet": vfe.__version__, "controller": "not running"}


# ---------------------------------------------------------------------------- the seed's walkthrough


def test_seed_hotplug_walkthrough_and_errors(services, ns):
    """The seed's "Creating Modern Hotplug VirtIO-net PF Device" with its PF
    NV configuration (no static PF, so the hot-plugged device is index 0 and
    `virtnet query/modify/unplug -p 0` address it as the seed's do), its
    virtnet.conf example, then every error against this one controller."""
    svc = services(nv=SEED_PF_NV + ("VIRTIO_NET_EMULATION_PF_PCI_LAYOUT=1",), conf=SEED_CONF)
    svc.start()
    assert links(ns) == ["lo"]
    lst = svc.virtnet_json("list")
    assert lst["devices"] == []
    ctl = lst["controller"]
    assert ctl["emulation_manager"] == "mlx5_0"
    assert ctl["max_hotplug_devices"] == 16 and ctl["free_switch_ports"] == 16
    assert ctl["max_virtq"] == 64                      # the seed: "max_virtq from the command virtnet list"

    # -- virtnet hotplug -i mlx5_0 -f 0x0 -m 0C:C4:7A:FF:22:93 -t 1500 -n 3 -s 1024
    out = svc.virtnet_json(*SEED_HOTPLUG)
    assert tuple(out) == HOTPLUG_OUTPUT_FIELDS, out
    assert out["bdf"] == "85:00.0" and out["vuid"] == "VNETS1D0F0"      # the seed's own values
    assert out["id"] == 0 and out["transitional"] == 0
    assert out["mac"].upper() == SEED_MAC
    rep = out["sf_rep_net_device"]
    m = REP_RE.match(rep)
    assert m and m.group(1) == m.group(2) == "0", rep            # port 0: en3f0pf0sf<N>
    sf = int(m.group(3))
    assert sf >= 1000                                             # "only uses an SF number >= 1000"

    # -- virtnet list: the seed's fields, in its order, with the hotplug's values
    lst = svc.virtnet_json("list")
    assert lst["controller"]["free_switch_ports"] == 15
    [dev] = lst["devices"]
    assert tuple(dev) == PF_LIST_FIELDS, list(dev)
    expect = {"pf_id": 0, "function_type": "hotplug PF", "vuid": "VNETS1D0F0", "bdf": "85:00.0",
              "sf_num": sf, "sf_parent_device": "mlx5_0", "sf_rep_net_device": rep,
              "max_queues": 3, "max_queues_size": 1024, "net_mtu": 1500}
    assert {k: dev[k] for k in expect} == expect
    assert dev["net_mac"].upper() == SEED_MAC
    assert isinstance(dev["num_msix"], int) and 1 <= dev["num_msix"] <= 10
    for k in ("sf_vhca_id", "msix_config_vector"):
        assert re.fullmatch(r"0x[0-9a-f]+", dev[k]), dev[k]

    # the representor is a real TAP netdev in the controller's namespace, with that ifindex
    info = link_info(ns, rep)
    assert info["ifindex"] == dev["sf_rep_net_ifindex"]
    assert info["linkinfo"]["info_kind"] == "tun" and info["mtu"] == 1500
    assert links(ns) == sorted(["lo", rep])
    # its vhost-user socket, and its recovery file with the seed's fields in the seed's order
    assert run_files(svc) == sorted(["virtnet.sock", "VNETS1D0F0.sock"])
    assert stat.S_ISSOCK(os.stat(svc.socket("VNETS1D0F0")).st_mode)
    assert list(recovery_files(svc)) == ["VNETS1D0F0.json"]
    rec = recovery_record(svc, "VNETS1D0F0")
    assert tuple(rec)[:len(SEED_RECOVERY_FIELDS)] == SEED_RECOVERY_FIELDS, list(rec)
    assert {k: rec[k] for k in ("port_ib_dev", "pf_id", "function_type", "bdf_raw", "device_type",
                                "pf_num", "sf_num")} == {
        "port_ib_dev": "mlx5_0", "pf_id": 0, "function_type": "pf", "bdf_raw": bdf_raw("85:00.0"),
        "device_type": "hotplug", "pf_num": 0, "sf_num": sf}
    assert rec["mac"].lower() == SEED_MAC.lower() and rec["mq"] in (0, 1)

    # -- virtnet query –p 0 (the seed's en dash), -p 0, -u VUID, -a; -b is brief
    for args in (("query", "\u2013p", "0"), ("query", "-p", "0"), ("query", "-u", "VNETS1D0F0"),
                 ("query", "-a")):
        [q] = svc.virtnet_json(*args)["devices"]
        assert tuple(q)[:len(PF_LIST_FIELDS)] == PF_LIST_FIELDS, args
        assert {k: q[k] for k in PF_LIST_FIELDS} == dev, args
        assert q["socket"] == svc.socket("VNETS1D0F0")
        assert [x["type"] for x in q["queues"]] == ["rx", "tx"], args      # -n 3: one pair + ctrl
    [q] = svc.virtnet_json("query", "-u", "VNETS1D0F0", "-b")["devices"]
    assert "queues" not in q and {k: q[k] for k in PF_LIST_FIELDS} == dev

    # -- virtnet modify -p 0 device -m 0C:C4:7A:FF:22:98, and by VUID
    for args, mac in ((("modify", "-p", "0"), SEED_MAC_MODIFIED),
                      (("modify", "-u", "VNETS1D0F0"), "0C:C4:7A:FF:22:99")):
        r = svc.virtnet_json(*args, "device", "-m", mac)
        assert r["status"] == "success" and r["vuid"] == "VNETS1D0F0" and "mac" in r["modified"]
        [d] = list_devices(svc)
        assert d["net_mac"].upper() == mac
        assert {k: d[k] for k in PF_LIST_FIELDS if k != "net_mac"} == \
               {k: dev[k] for k in PF_LIST_FIELDS if k != "net_mac"}
        assert recovery_record(svc, "VNETS1D0F0")["mac"].upper() == mac
    # the seed's `virtnet modify -p 0 –v 0 device -m ...` names a VF; SRIOV_EN=0 here: none
    expect_error(svc, ns, "modify", "-p", "0", "\u2013v", "0", "device", "-m", SEED_MAC_MODIFIED,
                 match=r"^Error: no such device: PF 0 VF 0 \(code -19\)")
    expect_error(svc, ns, "query", "-p", "0", "-v", "0", match=r"no such device: PF 0 VF 0")

    # -- errors: clear message, nothing created or changed
    bad_mac = r"argument -m/--mac: invalid MAC address '0C:C4:7A:FF:22'"
    expect_error(svc, ns, *hotplug_args("0C:C4:7A:FF:22"), rc=2, match=bad_mac)
    expect_error(svc, ns, *hotplug_args("0C:C4:7A:FF:22:9G"), rc=2, match=r"invalid MAC address")
    expect_error(svc, ns, "modify", "-p", "0", "device", "-m", "0C:C4:7A:FF:22", rc=2, match=bad_mac)
    expect_error(svc, ns, *hotplug_args(mac_n(1), s=1000), rc=2,
                 match=r"-s/--max_queue_size: queue size 1000 is not a power of two")
    expect_error(svc, ns, *hotplug_args(mac_n(1), n=0), rc=2, match=r"-n/--max_queues: max queues 0 out of range")
    expect_error(svc, ns, *hotplug_args(mac_n(1), n=11), match=r"max_queues 11 .*VIRTIO_NET_EMULATION_NUM_MSIX")
    expect_error(svc, ns, *hotplug_args(mac_n(1), ib="mlx5_9"), match=r"unknown ib device 'mlx5_9'.*mlx5_0")
    expect_error(svc, ns, *hotplug_args(mac_n(1), extra=("-l",)),
                 match=r"VIRTIO_NET_EMULATION_PF_PCI_LAYOUT=1 and VIRTIO_EMULATION_HOTPLUG_TRANS=1")
    for cmd in (("query",), ("unplug",), ("modify",)):
        tail = ("device", "-t", "9000") if cmd == ("modify",) else ()
        expect_error(svc, ns, *cmd, "-p", "7", *tail, match=r"^Error: no such device: PF 7 \(code -19\)")
        expect_error(svc, ns, *cmd, "-u", "VNETS9D0F0", *tail,
                     match=r"^Error: no such device: VUID VNETS9D0F0 \(code -19\)")
    # the controller checks too, whatever client calls it
    before = snapshot(svc, ns)
    good = {"ib_device": "mlx5_0", "mac": mac_n(1), "mtu": 1500, "max_queues": 3, "max_queue_size": 1024}
    for bad, match in (({"mac": "0C:C4:7A:FF:22"}, r"bad MAC address"),
                       ({"mac": "zz:zz:zz:zz:zz:zz"}, r"bad MAC address"),
                       ({"max_queue_size": 1000}, r"power of two"),
                       ({"max_queues": 0}, r"max_queues 0"),
                       ({"max_queues": 11}, r"max_queues 11")):
        exc = rpc_error(svc, "hotplug", good | bad)
        assert re.search(match, exc.message), (bad, exc.message)
    exc = rpc_error(svc, "modify", {"pf": 0, "mac": "0C:C4:7A:FF:22"})
    assert "bad MAC address" in exc.message
    assert_unchanged(before, snapshot(svc, ns), "direct RPC errors")

    # -- a hotplug that fails half-way leaves nothing behind either:
    # (a) its representor cannot be created (a foreign netdev has the name)
    ns.ip("link", "add", "en3f0pf0sf1010", "type", "veth", "peer", "name", "vfe-peer0")
    expect_error(svc, ns, *hotplug_args(mac_n(2), extra=("-u", "1010")),
                 match=r"cannot create representor en3f0pf0sf1010")
    ns.ip("link", "del", "en3f0pf0sf1010")
    # (b) its recovery file cannot be written (the last step)
    os.mkdir(svc.recovery_dir / "VNETS2D0F0.json")
    expect_error(svc, ns, *hotplug_args(mac_n(2)),
                 match=r"^Error: VNETS2D0F0: cannot write its recovery file: .*VNETS2D0F0\.json.* \(code -21\)")
    os.rmdir(svc.recovery_dir / "VNETS2D0F0.json")

    # -- virtnet log -l debug|info|err: answered, and the controller's log follows it
    for level in ("debug", "info", "err"):
        assert svc.virtnet_json("log", "-l", level) == {"level": level, "status": "success"}
    mark = len(svc.log())
    svc.virtnet_json("modify", "-p", "0", "device", "-t", "1400")          # logs at INFO
    time.sleep(0.2)
    assert "[INFO]" not in svc.log()[mark:] and "[DEBUG]" not in svc.log()[mark:], svc.log()[mark:]
    svc.virtnet_json("log", "-l", "debug")
    mark = len(svc.log())
    svc.virtnet_json("list")
    deadline = time.monotonic() + 5
    while "[DEBUG]" not in svc.log()[mark:] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "[DEBUG]" in svc.log()[mark:]
    svc.virtnet_json("log", "-l", "info")
    mark = len(svc.log())
    svc.virtnet_json("modify", "-p", "0", "device", "-t", "1500")
    assert re.search(r"\[INFO\] .*VNETS1D0F0: modified", svc.log()[mark:])

    # -- virtnet version: virtnet's and the running controller's
    v = svc.virtnet_json("version")
    assert v["virtnet"] == vfe.__version__
    assert v["controller"]["version"] == vfe.__version__ and v["controller"]["pid"] == svc.proc.pid

    # -- virtnet unplug -p 0: representor, socket, recovery file gone; the SF is pooled
    assert svc.virtnet_json("unplug", "-p", "0") == {"id": 0, "vuid": "VNETS1D0F0", "status": "success"}
    assert links(ns) == ["lo"]
    assert run_files(svc) == ["virtnet.sock"]
    assert recovery_files(svc) == {}
    lst = svc.virtnet_json("list")
    assert lst["devices"] == [] and lst["controller"]["free_switch_ports"] == 16
    pool = sf_pool_state(svc)["sf_pool.mlx5_0.json"]
    assert pool["in_use"] == {} and sf in pool["pooled"]
    # the next hot-plug reuses the port and the SF; unplug -u VUID
    again = svc.virtnet_json(*SEED_HOTPLUG)
    assert again["vuid"] == "VNETS1D0F0" and again["sf_rep_net_device"] == rep and again["id"] == 0
    assert links(ns) == sorted(["lo", rep])
    assert svc.virtnet_json("unplug", "-u", "VNETS1D0F0")["status"] == "success"
    assert links(ns) == ["lo"] and run_files(svc) == ["virtnet.sock"] and recovery_files(svc) == {}
    expect_error(svc, ns, "unplug", "-u", "VNETS1D0F0", match=r"no such device: VUID VNETS1D0F0")


# ---------------------------------------------------------------------------- limits


def test_lag_static_pfs_sixteen_hotplugs_then_restart(services, ns):
    """Default NV configuration (2 static PFs, 16 switch ports) with the
    seed's LAG virtnet.conf: static PFs cannot be unplugged, SFs go on the
    LAG device, 16 hot-plugs fill the switch and a 17th is refused; a freed
    port and its SF are reused; a restart recovers all 18 functions."""
    svc = services(conf=SEED_LAG_CONF)
    svc.start()
    lst = svc.virtnet_json("list")
    assert lst["controller"]["emulation_manager"] == "mlx5_bond_0"
    assert lst["controller"]["max_hotplug_devices"] == 16
    statics = lst["devices"]
    assert [d["function_type"] for d in statics] == ["static PF", "static PF"]
    assert [d["pf_id"] for d in statics] == [0, 1]
    assert [d["sf_parent_device"] for d in statics] == ["mlx5_bond_0"] * 2
    assert [d["net_mac"].lower() for d in statics] == ["00:11:22:33:44:55", "00:11:22:33:44:56"]  # pf_mac, +1
    for d in statics:
        assert link_info(ns, d["sf_rep_net_device"])["ifindex"] == d["sf_rep_net_ifindex"]

    expect_error(svc, ns, "unplug", "-p", "0", match=r"static.*only hot-plugged PFs can be unplugged")
    expect_error(svc, ns, "unplug", "-u", statics[1]["vuid"], match=r"only hot-plugged PFs can be unplugged")
    expect_error(svc, ns, *hotplug_args(mac_n(0), ib="mlx5_0"), match=r"mlx5_0.*LAG device 'mlx5_bond_0'")
    expect_error(svc, ns, *hotplug_args(mac_n(0), ib="mlx5_bond_0", extra=("-l",)),
                 match=r"VIRTIO_NET_EMULATION_PF_PCI_LAYOUT=1 and VIRTIO_EMULATION_HOTPLUG_TRANS=1")

    for i in range(16):
        out = svc.virtnet_json(*hotplug_args(mac_n(i), ib="mlx5_bond_0"))
        assert out["vuid"] == f"VNETS{i + 1}D0F0" and out["bdf"] == f"{0x85 + i:02x}:00.0", out
        assert out["id"] == 2 + i and REP_RE.match(out["sf_rep_net_device"]).group(1) == "0"
    lst = svc.virtnet_json("list")
    devs = lst["devices"]
    assert lst["controller"]["free_switch_ports"] == 0 and len(devs) == 18
    for key in ("pf_id", "vuid", "bdf", "sf_num", "sf_rep_net_device", "sf_rep_net_ifindex"):
        assert len({d[key] for d in devs}) == 18, key
    assert links(ns) == sorted(["lo"] + [d["sf_rep_net_device"] for d in devs])
    assert len(recovery_files(svc)) == 18

    # the 17th
    expect_error(svc, ns, *hotplug_args(mac_n(16), ib="mlx5_bond_0"),
                 match=r"all 16 hot-plug switch ports are in use.*PCI_SWITCH_EMULATION_NUM_PORT")

    # a freed port and its SF are what the next hot-plug gets
    victim = by_vuid(svc)["VNETS5D0F0"]
    svc.virtnet_json("unplug", "-u", "VNETS5D0F0")
    assert victim["sf_rep_net_device"] not in links(ns)
    out = svc.virtnet_json(*hotplug_args(mac_n(20), ib="mlx5_bond_0"))
    assert out["vuid"] == "VNETS5D0F0" and out["bdf"] == victim["bdf"]
    assert out["sf_rep_net_device"] == victim["sf_rep_net_device"]

    # restart: every function back, same identity, same representor netdev
    before = by_vuid(svc)
    assert svc.stop() == 0
    rc, log = start_outcome(svc)
    assert rc is None, f"restart refused:\n{log}"
    assert by_vuid(svc) == before
    for d in before.values():
        assert link_info(ns, d["sf_rep_net_device"])["ifindex"] == d["sf_rep_net_ifindex"]


def test_sf_exhaustion_transitional_and_max_virtq(services, ns):
    """PF_TOTAL_SF=5 on port 0 (2 static PFs + 3) and 1 on port 1 (set on
    its own device, as the seed's SR-IOV setup does), 2048 MSI-X vectors (so
    max_virtq is the bound), transitional devices enabled with 12K of I/O
    port space ((12K - 4K) / 4K = 2 transitional devices)."""
    svc = services(nv=("PF_TOTAL_SF=5", "VIRTIO_NET_EMULATION_NUM_MSIX=2048",
                       "VIRTIO_NET_EMULATION_PF_PCI_LAYOUT=1", "VIRTIO_EMULATION_HOTPLUG_TRANS=1",
                       "VFE_IO_PORT_SPACE_KB=12"),
                   nv_port1=("PF_TOTAL_SF=1",))
    svc.start()
    lst = svc.virtnet_json("list")
    assert lst["controller"]["max_virtq"] == 64
    assert [d["max_queues"] for d in lst["devices"]] == [64, 64]

    expect_error(svc, ns, *hotplug_args(mac_n(1), n=65), match=r"max_queues 65 .*max_virtq 64")

    t1 = svc.virtnet_json(*hotplug_args(mac_n(1), n=64, extra=("-l",)))
    assert t1["transitional"] == 1
    assert by_vuid(svc)[t1["vuid"]]["max_queues"] == 64
    assert recovery_record(svc, t1["vuid"])["legacy"] == 1
    t2 = svc.virtnet_json(*hotplug_args(mac_n(2), extra=("--legacy",)))
    assert t2["transitional"] == 1
    expect_error(svc, ns, *hotplug_args(mac_n(3), extra=("-l",)),
                 match=r"no I/O port space for another transitional device \(2 of 2")
    h3 = svc.virtnet_json(*hotplug_args(mac_n(3)))
    assert h3["transitional"] == 0
    sfs = [d["sf_num"] for d in list_devices(svc)]
    assert len(set(sfs)) == 5 and min(sfs) >= 1000

    # the 6th SF does not exist
    expect_error(svc, ns, *hotplug_args(mac_n(4)),
                 match=r"no SF left on mlx5_0: all PF_TOTAL_SF=5 SFs are in use")
    # unplugging returns the SF to the pool; the next hot-plug takes exactly that one
    t2_sf = by_vuid(svc)[t2["vuid"]]["sf_num"]
    svc.virtnet_json("unplug", "-u", t2["vuid"])
    assert t2["sf_rep_net_device"] not in links(ns)
    pool = sf_pool_state(svc)["sf_pool.mlx5_0.json"]
    assert pool["pooled"] == [t2_sf]
    h4 = svc.virtnet_json(*hotplug_args(mac_n(4)))
    assert h4["sf_rep_net_device"] == t2["sf_rep_net_device"]
    assert by_vuid(svc)[h4["vuid"]]["sf_num"] == t2_sf
    expect_error(svc, ns, *hotplug_args(mac_n(5)), match=r"no SF left.*PF_TOTAL_SF=5")

    # port 1 has SFs of its own: its PF_TOTAL_SF=1, whatever port 0 has
    p1 = svc.virtnet_json(*hotplug_args(mac_n(6), ib="mlx5_1"))
    m1 = REP_RE.match(p1["sf_rep_net_device"])
    assert m1 and m1.group(1) == m1.group(2) == "1", p1
    d1 = by_vuid(svc)[p1["vuid"]]
    assert d1["sf_parent_device"] == "mlx5_1"
    rec1 = recovery_record(svc, p1["vuid"])
    assert (rec1["port_ib_dev"], rec1["pf_num"], rec1["sf_num"]) == ("mlx5_1", 1, d1["sf_num"])
    expect_error(svc, ns, *hotplug_args(mac_n(7), ib="mlx5_1"),
                 match=r"no SF left on mlx5_1: all PF_TOTAL_SF=1 SFs are in use")


def test_one_queue_pair_device_fits_the_minimum_msix(services, ns):
    """The seed: "The maximum number of virtio-net queues is bound by the
    minimum of VIRTIO_NET_EMULATION_NUM_MSIX [and] max_virtq".  At the
    smallest NUM_MSIX, 3 ("one queue pair" in vfe's nvconfig), the seed's
    own `-n 3` -- one RX/TX pair plus the control queue, the device gets
    queues rx and tx -- is within that bound and must be accepted; -n 4
    must not."""
    svc = services(nv=("VIRTIO_NET_EMULATION_NUM_MSIX=3", "VIRTIO_EMULATION_HOTPLUG_TRANS=1"))
    svc.start()
    # (and, while here: HOTPLUG_TRANS=1 without PF_PCI_LAYOUT=1 is no transitional support)
    expect_error(svc, ns, *hotplug_args(mac_n(0), n=2, extra=("-l",)),
                 match=r"VIRTIO_NET_EMULATION_PF_PCI_LAYOUT=1 and VIRTIO_EMULATION_HOTPLUG_TRANS=1")
    r = svc.virtnet(*SEED_HOTPLUG)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    [q] = svc.virtnet_json("query", "-u", out["vuid"])["devices"]
    assert [x["type"] for x in q["queues"]] == ["rx", "tx"]
    expect_error(svc, ns, *hotplug_args(mac_n(1), n=4), match=r"max_queues 4 .*VIRTIO_NET_EMULATION_NUM_MSIX")


# ---------------------------------------------------------------------------- refusing to start


def test_bad_virtnet_conf_and_disabled_emulation_refuse_to_start(services, ns):
    """A bad virtnet.conf, VIRTIO_NET_EMULATION_ENABLE=0, or a static PF
    that cannot be built: the controller exits non-zero with an error naming
    the file and the key (or the cause), no traceback, and leaves nothing
    (no representor, no socket, no recovery file, no SF)."""
    # the seed's path (with the test's VFE_ROOT noted), then the key
    conf = r"/opt/mellanox/mlnx_virtnet/virtnet\.conf(?: \(under VFE_ROOT=[^)]*\))?: "
    cases = {
        "json": (dict(conf='{\n  "ib_dev_p0": "mlx5_0",\n'), conf + r"invalid JSON at line \d+"),
        "lag": (dict(conf={"ib_dev_lag": "mlx5_bond_0", "ib_dev_p0": "mlx5_0", "is_lag": 1}),
                conf + r"ib_dev_lag: ib_dev_lag and ib_dev_p0 cannot be configured simultaneously"),
        "pct": (dict(conf=dict(SEED_CONF, sf_pool_percent=101)),
                conf + r"sf_pool_percent: 101 is out of the valid range \[0, 100\]"),
        "mac": (dict(conf=dict(SEED_CONF, pf_mac="00:11:22:33:44:5")),
                conf + r"pf_mac: MAC address '00:11:22:33:44:5' has 16 characters"),
        "off": (dict(nv=("VIRTIO_NET_EMULATION_ENABLE=0",)),
                r"VIRTIO_NET_EMULATION_ENABLE is False\(0\).*VIRTIO_NET_EMULATION_ENABLE=1"),
        # a static PF that cannot be built (a foreign netdev holds its representor's name)
        "rep": (dict(), r"cannot create representor en3f0pf0sf1000: .*(already exists|not a TAP representor)"),
    }
    ns.ip("link", "add", "en3f0pf0sf1000", "type", "veth", "peer", "name", "vfe-peer0")
    svcs = {name: services(name, **kw) for name, (kw, _) in cases.items()}
    for svc in svcs.values():                         # all at once: they must all fail fast
        svc.start(wait=False)
    for name, svc in svcs.items():
        rc, log = wait_exit(svc)
        assert rc == os.EX_CONFIG, (name, log)   # the units' RestartPreventExitStatus
        assert re.search(r"\[ERROR\] .*" + cases[name][1], log), (name, log)
        assert "Traceback" not in log and "serving" not in log, (name, log)
        assert run_files(svc) == [] and recovery_files(svc) == {}, name
        # no SF was left created
        assert all(not p["in_use"] and not p["pooled"] for p in sf_pool_state(svc).values()), name
    assert links(ns) == ["en3f0pf0sf1000", "lo", "vfe-peer0"]


def test_recovery_files_not_matching_nv_config_refused_then_deleted(services, ns):
    """The seed: after changing PCI_SWITCH_EMULATION_NUM_PORT the recovery
    files must be deleted.  The controller refuses to start, names the file
    and tells the user to delete them, changing nothing; once the user did,
    it starts."""
    svc = services()
    svc.start()
    a = svc.virtnet_json(*hotplug_args(mac_n(1)))
    b = svc.virtnet_json(*hotplug_args(mac_n(2)))
    assert (a["vuid"], b["vuid"]) == ("VNETS1D0F0", "VNETS2D0F0")          # switch ports 0 and 1
    assert svc.stop() == 0
    svc.mlxconfig("s", "PCI_SWITCH_EMULATION_NUM_PORT=1")
    before = snapshot(svc, ns, with_list=False)
    rc, log = start_outcome(svc)
    assert rc is not None and rc != 0, f"started with a recovery file for a port that is gone:\n{log}"
    assert re.search(r"\[ERROR\] .*VNETS2D0F0\.json.*PCI_SWITCH_EMULATION_NUM_PORT.*"
                     rf"delete the files under {SEED_RECOVERY_DIR}", log), log
    assert "Traceback" not in log
    assert_unchanged(before, snapshot(svc, ns, with_list=False), "refused start")

    # as the seed says: delete the files, restart
    for p in svc.recovery_dir.iterdir():
        p.unlink()
    rc, log = start_outcome(svc)
    assert rc is None, f"the controller does not start after the recovery files were deleted:\n{log}"
    lst = svc.virtnet_json("list")
    assert [d["function_type"] for d in lst["devices"]] == ["static PF", "static PF"]
    assert lst["controller"]["free_switch_ports"] == 1
    out = svc.virtnet_json(*hotplug_args(mac_n(3)))
    assert out["vuid"] == "VNETS1D0F0"
    assert link_info(ns, out["sf_rep_net_device"])["ifindex"] == by_vuid(svc)["VNETS1D0F0"]["sf_rep_net_ifindex"]
    assert len(recovery_files(svc)) == 3
    expect_error(svc, ns, *hotplug_args(mac_n(4)), match=r"all 1 hot-plug switch ports are in use")


def test_static_pf_count_change_with_recovery_files(services, ns):
    """The seed lists VIRTIO_NET_EMULATION_NUM_PF among the changes that
    need the recovery files deleted.  With a hot-plugged PF recorded as
    device index 2, adding a third static PF must not yield two devices with
    index 2: the controller refuses (with the seed's instruction), or
    recovers them with distinct indexes."""
    svc = services()
    svc.start()
    hp = svc.virtnet_json(*hotplug_args(mac_n(1)))
    assert hp["id"] == 2
    assert svc.stop() == 0
    svc.mlxconfig("s", "VIRTIO_NET_EMULATION_NUM_PF=3")
    rc, log = start_outcome(svc)
    if rc is not None:
        assert rc != 0 and "Traceback" not in log
        assert re.search(rf"\[ERROR\] .*delete the files under {SEED_RECOVERY_DIR}", log), log
        return
    devs = list_devices(svc)
    ids = [d["pf_id"] for d in devs]
    assert len(set(ids)) == len(ids), f"duplicate device indexes {ids}: " + \
        ", ".join(f"{d['vuid']}={d['pf_id']}" for d in devs)


def test_recovery_disabled_restarts(services, ns):
    """virtnet.conf "recovery": 0 -- no recovery file is written, and the
    controller restarts (without the hot-plugged PF)."""
    svc = services(conf={"recovery": 0})
    svc.start()
    svc.virtnet_json(*hotplug_args(mac_n(1)))
    assert recovery_files(svc) == {}
    assert svc.stop() == 0
    rc, log = start_outcome(svc)
    assert rc is None, f"restart with recovery disabled failed:\n{log}"
    assert [d["function_type"] for d in list_devices(svc)] == ["static PF", "static PF"]
    out = svc.virtnet_json(*hotplug_args(mac_n(2)))
    assert out["vuid"] == "VNETS1D0F0"
    assert recovery_files(svc) == {}
