"""Helpers for the `virtnet` service tests (tests/e2e/test_virtnet_service.py).

Every controller runs inside a NetNs the test made, with a private VFE_ROOT
in a short directory under /tmp (unix socket paths must stay < 107 bytes).
The central check of a failed command is `expect_error`: it snapshots what a
half-done operation could leave behind -- representor netdevs in the
namespace, sockets in the run dir, recovery files, the SF pool's state, the
devices `virtnet list` shows -- runs the command, checks its exit status and
message, and asserts that the snapshot did not change.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.harness.service import ControllerService

# The seed's command lines ("Creating Modern Hotplug VirtIO-net PF Device").
SEED_MAC = "0C:C4:7A:FF:22:93"
SEED_MAC_MODIFIED = "0C:C4:7A:FF:22:98"
SEED_HOTPLUG = ("hotplug", "-i", "mlx5_0", "-f", "0x0", "-m", SEED_MAC, "-t", "1500", "-n", "3",
                "-s", "1024")

# The seed's "VirtIO-net PF Device Configuration" (mlxconfig ... s ...).
SEED_PF_NV = ("PCI_SWITCH_EMULATION_ENABLE=1", "PCI_SWITCH_EMULATION_NUM_PORT=16",
              "VIRTIO_NET_EMULATION_ENABLE=1", "VIRTIO_NET_EMULATION_NUM_VF=0",
              "VIRTIO_NET_EMULATION_NUM_PF=0", "VIRTIO_NET_EMULATION_NUM_MSIX=10",
              "ECPF_ESWITCH_MANAGER=1", "ECPF_PAGE_SUPPLIER=1", "SRIOV_EN=0", "PF_SF_BAR_SIZE=10",
              "PF_TOTAL_SF=64")

# The seed's virtnet.conf examples.
SEED_CONF = {"ib_dev_p0": "mlx5_0", "ib_dev_p1": "mlx5_1", "ib_dev_for_static_pf": "mlx5_0",
             "is_lag": 0, "pf_mac": "00:11:22:33:44:55", "recovery": 1, "sf_pool_percent": 0,
             "sf_pool_force_destroy": 0}
SEED_LAG_CONF = {"ib_dev_lag": "mlx5_bond_0", "ib_dev_for_static_pf": "mlx5_bond_0", "is_lag": 1,
                 "pf_mac": "00:11:22:33:44:55", "recovery": 1, "sf_pool_percent": 0,
                 "sf_pool_force_destroy": 0}

# `virtnet list` fields in the seed's order (its VF example; a PF has pf_id
# where a VF has vf_id, parent_pf_id).
SEED_LIST_FIELDS = ("function_type", "vuid", "bdf", "sf_num", "sf_parent_device", "sf_rep_net_device",
                    "sf_rep_net_ifindex", "sf_rdma_device", "sf_vhca_id", "msix_config_vector",
                    "num_msix", "max_queues", "max_queues_size", "net_mac", "net_mtu")
PF_LIST_FIELDS = ("pf_id",) + SEED_LIST_FIELDS
# The seed's recovery file example, in its order.
SEED_RECOVERY_FIELDS = ("port_ib_dev", "pf_id", "function_type", "bdf_raw", "device_type", "mac",
                        "pf_num", "sf_num", "mq")
# The seed's hotplug output, plus "transitional".
HOTPLUG_OUTPUT_FIELDS = ("bdf", "vuid", "id", "transitional", "sf_rep_net_device", "mac")

REP_RE = re.compile(r"^en3f(\d)pf(\d)sf(\d+)$")


def hotplug_args(mac: str = SEED_MAC, *, ib: str = "mlx5_0", n: int = 3, s: int = 1024,
                 mtu: int = 1500, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    return ("hotplug", "-i", ib, "-f", "0x0", "-m", mac, "-t", str(mtu), "-n", str(n),
            "-s", str(s), *extra)


def mac_n(i: int) -> str:
    return f"0C:C4:7A:FF:23:{i:02X}"


def bdf_raw(bdf: str) -> int:
    bus, rest = bdf.split(":")
    dev, fn = rest.split(".")
    return int(bus, 16) << 8 | int(dev, 16) << 3 | int(fn)


# -- starting ------------------------------------------------------------------------

PORT1_DEVICE = "/dev/mst/mt41686_pciconf0.1"


def make_service(root: str | os.PathLike, ns, *, nv: tuple[str, ...] = (),
                 nv_port1: tuple[str, ...] = (), conf: Any = None) -> ControllerService:
    """A ControllerService under `root`, with NV configuration `nv` (port 0,
    ``KEY=VAL`` strings, set with vfe-mlxconfig before the first start) and
    `nv_port1` (port 1's device), and virtnet.conf `conf` (dict or raw text;
    None: no file)."""
    svc = ControllerService(root, ns)
    if nv:
        svc.mlxconfig("s", *nv)
    if nv_port1:
        svc.mlxconfig("-d", PORT1_DEVICE, "s", *nv_port1)      # the last -d wins
    if conf is not None:
        svc.write_conf(conf)
    return svc


def start_log(svc: ControllerService) -> str:
    """The log of the controller's latest start."""
    return svc.log().split(f"--- start {svc.starts}\n")[-1]


def start_outcome(svc: ControllerService, timeout: float = 30.0) -> tuple[int | None, str]:
    """Start and wait until the controller either serves (returns None, log)
    or exits (returns its exit status, log)."""
    svc.start(wait=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rc = svc.proc.poll()
        if rc is not None:
            svc.proc = None
            return rc, start_log(svc)
        if "serving" in start_log(svc):
            return None, start_log(svc)
        time.sleep(0.05)
    raise TimeoutError(f"controller neither served nor exited:\n{start_log(svc)[-3000:]}")


def wait_exit(svc: ControllerService, timeout: float = 30.0) -> tuple[int, str]:
    """For a controller started with wait=False that must refuse to run."""
    try:
        rc = svc.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"controller did not exit:\n{start_log(svc)[-3000:]}") from None
    svc.proc = None
    return rc, start_log(svc)


# -- the state a failed command must not change ---------------------------------------

def links(ns) -> list[str]:
    """Netdev names in the namespace (``ip -br link``)."""
    return sorted(line.split()[0].split("@")[0] for line in ns.ip("-br", "link").splitlines()
                  if line.strip())


def link_info(ns, name: str) -> dict:
    return json.loads(ns.ip("-d", "-j", "link", "show", "dev", name))[0]


def run_files(svc: ControllerService) -> list[str]:
    d = svc.run_dir
    return sorted(os.listdir(d)) if d.is_dir() else []


def recovery_files(svc: ControllerService) -> dict[str, str]:
    d = svc.recovery_dir
    if not d.is_dir():
        return {}
    return {p.name: (p.read_text() if p.is_file() else "<not a file>") for p in sorted(d.iterdir())}


def recovery_record(svc: ControllerService, vuid: str) -> dict:
    return json.loads((svc.recovery_dir / f"{vuid}.json").read_text())


def state_dir(svc: ControllerService) -> Path:
    return svc.root / "var/lib/vfe"


def sf_pool_state(svc: ControllerService) -> dict[str, dict]:
    """The SF pools' persisted state ({file: {in_use, pooled}})."""
    return {p.name: json.loads(p.read_text()) for p in sorted(state_dir(svc).glob("sf_pool.*.json"))}


@dataclass(frozen=True)
class State:
    links: tuple
    run_files: tuple
    recovery: tuple
    sf_pool: str
    devices: tuple

    def diff(self, other: "State") -> str:
        out = []
        for k in ("links", "run_files", "recovery", "sf_pool", "devices"):
            a, b = getattr(self, k), getattr(other, k)
            if a != b:
                out.append(f"{k}:\n  before {a}\n  after  {b}")
        return "\n".join(out)


def snapshot(svc: ControllerService, ns, *, with_list: bool = True) -> State:
    devices: tuple = ()
    if with_list:          # the controller's list, over its RPC socket (cheaper than a virtnet process)
        from vfe.rpc.client import call
        listed = call(str(svc.rpc_socket), "list", {}, timeout=20)["devices"]
        devices = tuple(json.dumps(d, sort_keys=True) for d in listed)
    return State(links=tuple(links(ns)), run_files=tuple(run_files(svc)),
                 recovery=tuple(sorted(recovery_files(svc).items())),
                 sf_pool=json.dumps(sf_pool_state(svc), sort_keys=True), devices=devices)


def assert_unchanged(before: State, after: State, what: str = "") -> None:
    assert before == after, f"{what}: state changed\n{before.diff(after)}"


def expect_error(svc: ControllerService, ns, *args: str, rc: int = 1, match: str,
                 with_list: bool = True) -> str:
    """Run `virtnet *args`, which must fail with exit status `rc` and a
    stderr matching `match` (regex, case-insensitive), print nothing on
    stdout, and leave no trace.  Returns stderr."""
    before = snapshot(svc, ns, with_list=with_list)
    r = svc.virtnet(*args)
    cmd = "virtnet " + " ".join(args)
    assert r.returncode == rc, f"{cmd}: exit {r.returncode}, expected {rc}\n{r.stdout}{r.stderr}"
    assert r.stdout == "", f"{cmd}: printed {r.stdout!r}"
    assert re.search(match, r.stderr, re.I | re.S), f"{cmd}: stderr {r.stderr!r} !~ {match!r}"
    assert "Traceback" not in r.stderr, r.stderr
    assert_unchanged(before, snapshot(svc, ns, with_list=with_list), cmd)
    return r.stderr


def rpc_error(svc: ControllerService, method: str, params: dict):
    """Call the controller directly (as another client than virtnet could),
    expecting an RpcError, which is returned."""
    from vfe.rpc.client import call
    from vfe.rpc.protocol import RpcError
    try:
        result = call(str(svc.rpc_socket), method, params, timeout=20)
    except RpcError as exc:
        return exc
    raise AssertionError(f"{method}({params}) succeeded: {result}")


def run_virtnet_plain(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`virtnet` with no controller involved (usage texts)."""
    return subprocess.run([sys.executable, "-m", "vfe.cli.virtnet", *args], capture_output=True,
                          text=True, timeout=30, env=dict(os.environ, **(env or {})))


def squash(text: str) -> list[str]:
    """Lines with runs of whitespace collapsed and blank lines dropped: the
    seed's help texts lost their indentation."""
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]
