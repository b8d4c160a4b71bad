"""Two (or more) hypervisor hosts on one machine, joined by OVN, for tests.

    with OvnCentral() as central, NetNs() as ns_a, NetNs() as ns_b:
        a = OvnHost("host-a", central, ns_a, "172.31.0.1").start()
        b = OvnHost("host-b", central, ns_b, "172.31.0.2").start()
        underlay(a, b)                      # veth pair, Geneve runs over it
        central.nbctl("ls-add", "ls0")
        central.nbctl("lsp-add", "ls0", "vm-a", "--", "lsp-set-addresses", "vm-a", "MAC IP")
        a.bind("en3f0pf0sf2000", "vm-a")    # representor -> br-int, iface-id=vm-a
        central.wait_hv()                   # every ovn-controller has caught up
        ...
        b.stop(); a.stop()

:class:`OvnCentral` is the central node: an ovsdb-server for the
OVN_Northbound database and one for OVN_Southbound, each on a Unix socket in
a temp dir, and ovn-northd between them.  Unix sockets are not tied to a
network namespace, so the hosts' ovn-controllers (each in its own namespace)
reach the southbound database without any network of their own.

:class:`OvnHost` is one hypervisor: a network namespace (the test's NetNs,
where the host's controller also runs, so the representors land there), a
private Open vSwitch in it (tests/harness/ovs.py: userspace datapath), and
an ovn-controller with ``external_ids`` ``system-id`` (the chassis name),
``ovn-remote`` (the southbound socket), ``ovn-encap-type=geneve`` and
``ovn-encap-ip`` (the host's underlay address).  Two bridges:

* ``br-int``, the integration bridge ovn-controller programs (fail_mode
  secure): representors are added to it with ``external_ids:iface-id`` = the
  logical switch port's name, and ovn-controller adds the Geneve tunnel
  ports to the other chassis.
* ``br-phy``, the underlay: the host's end of the veth pair is its port and
  the underlay address sits on the bridge's own (internal) port.  OVS's
  userspace datapath encapsulates in software and sends the tunnel packet
  out of the bridge its route points to, so the underlay address must be on
  an OVS bridge, not on the bare veth (the standard OVS-DPDK tunnel layout).

MTU: a tunnelled frame grows by 58 bytes (outer Ethernet 14, IPv4 20, UDP 8,
Geneve 8, and OVN's 8-byte option).  The guests keep their 1500-byte MTU;
the underlay (both veth ends and br-phy) gets :data:`UNDERLAY_MTU` = 1600,
what an operator does on the fabric.  Without it a full-size frame's
encapsulation (1558 bytes of IP) is refused by the veth and TCP stalls
after the handshake while pings still pass.

Every daemon writes its pidfile, log and control socket into the temp dir;
stop (``__exit__``/:meth:`stop`) asks each to exit through its control
socket (ovn-controller's plain ``exit`` also removes its chassis and its
tunnel ports), then kills it by the PID from its pidfile, and removes the
temp dirs (kept with ``VFE_KEEP_OVN=1`` for a post-mortem).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.harness.ovs import Ovs, pid_alive

__all__ = ["OvnCentral", "OvnHost", "OvnError", "UNDERLAY_MTU", "underlay"]

SCHEMAS = {"nb": "/usr/share/ovn/ovn-nb.ovsschema", "sb": "/usr/share/ovn/ovn-sb.ovsschema"}
UNDERLAY_MTU = 1600
BINARIES = ("ovn-northd", "ovn-controller", "ovn-nbctl", "ovn-sbctl", "ovn-appctl", "ovsdb-server",
            "ovsdb-tool", "ovs-vswitchd", "ovs-vsctl")


class OvnError(RuntimeError):
    pass


def missing_binaries() -> list[str]:
    """The OVN/OVS programs not on PATH (a test skips when any is missing)."""
    return [b for b in BINARIES if shutil.which(b) is None]


class Daemon:
    """One detached daemon: its pidfile, log and control socket in ``dir``.
    ovn-controller has no ``--unixctl`` option: its socket is
    ``$OVN_RUNDIR/ovn-controller.PID.ctl`` (``named_ctl=False``; the caller
    sets OVN_RUNDIR to ``dir``)."""

    def __init__(self, name: str, dir: Path, *, named_ctl: bool = True):
        self.name = name
        self.dir = dir
        self.named_ctl = named_ctl
        self.pidfile = dir / f"{name}.pid"
        self.log_file = dir / f"{name}.log"
        self.pid: int | None = None

    @property
    def ctl(self) -> Path:
        return self.dir / (f"{self.name}.ctl" if self.named_ctl else f"{self.name}.{self.pid}.ctl")

    def options(self) -> list[str]:
        return [f"--pidfile={self.pidfile}", f"--log-file={self.log_file}",
                *([f"--unixctl={self.ctl}"] if self.named_ctl else []),
                "--detach", "--no-chdir", "-vsyslog:off", "-vfile:info"]

    def read_pid(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError, ValueError):
                self.pid = int(self.pidfile.read_text().split()[0])
                return self.pid
            time.sleep(0.01)
        raise OvnError(f"{self.name} wrote no pidfile {self.pidfile}\n{self.log_tail()}")

    def alive(self) -> bool:
        return pid_alive(self.pid)

    def stop(self, grace: float = 3.0) -> None:
        """``ovs-appctl -t CTL exit``, then SIGTERM, then SIGKILL, by our PID."""
        if not self.alive():
            return
        with contextlib.suppress(Exception):
            subprocess.run(["ovs-appctl", "-t", str(self.ctl), "exit"], capture_output=True,
                           timeout=grace, stdin=subprocess.DEVNULL)
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                if not self.alive():
                    self.pid = None
                    return
                time.sleep(0.01)

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 15) -> str:
        all_lines = self.log().splitlines()
        bad = [ln for ln in all_lines if any(f"|{lvl}|" in ln for lvl in ("WARN", "ERR", "EMER"))]
        tail = (bad or all_lines)[-lines:]
        return f"--- {self.log_file.name} ---\n" + "\n".join(tail) if tail else ""


def run(argv: list[str], *, timeout: float, env: dict | None = None,
        what: str = "", logs: tuple[Daemon, ...] = ()) -> str:
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL, env=env)
    if r.returncode != 0:
        tails = "\n".join(d.log_tail() for d in logs)
        raise OvnError(f"{what or argv[0]}: {' '.join(map(str, argv))} exited {r.returncode}: "
                       f"{r.stderr.strip()}\n{tails}")
    return r.stdout


class OvnCentral:
    """ovsdb-server (NB), ovsdb-server (SB) and ovn-northd, private."""

    def __init__(self, *, timeout: float = 20.0, keep: bool | None = None):
        self.timeout = timeout
        self.keep = bool(os.environ.get("VFE_KEEP_OVN")) if keep is None else keep
        self.dir: Path | None = None
        self.daemons: dict[str, Daemon] = {}

    def sock(self, db: str) -> str:
        """``unix:PATH`` of the ``nb`` or ``sb`` database."""
        return f"unix:{self.dir / (db + '.sock')}"

    def start(self) -> "OvnCentral":
        self.dir = Path(tempfile.mkdtemp(prefix="vfe-ovn-"))
        try:
            for db, schema in SCHEMAS.items():
                dbfile = self.dir / f"{db}.db"
                run(["ovsdb-tool", "create", dbfile, schema], timeout=self.timeout)
                d = self.daemons[f"{db}-ovsdb"] = Daemon(f"{db}-ovsdb", self.dir)
                run(["ovsdb-server", dbfile, f"--remote=punix:{self.dir / (db + '.sock')}",
                     *d.options()], timeout=self.timeout, logs=(d,))
                d.read_pid(self.timeout)
            d = self.daemons["ovn-northd"] = Daemon("ovn-northd", self.dir)
            run(["ovn-northd", f"--ovnnb-db={self.sock('nb')}", f"--ovnsb-db={self.sock('sb')}",
                 *d.options()], timeout=self.timeout, logs=(d,))
            d.read_pid(self.timeout)
            self.nbctl("init")
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> "OvnCentral":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        for name in ("ovn-northd", "sb-ovsdb", "nb-ovsdb"):
            if name in self.daemons:
                self.daemons.pop(name).stop()
        if self.dir is not None and not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None

    def nbctl(self, *args, timeout: float | None = None) -> str:
        t = timeout or self.timeout
        return run(["ovn-nbctl", f"--db={self.sock('nb')}", f"--timeout={int(t)}", *args],
                   timeout=t + 5, logs=tuple(self.daemons.values())).strip()

    def sbctl(self, *args, timeout: float | None = None) -> str:
        t = timeout or self.timeout
        return run(["ovn-sbctl", f"--db={self.sock('sb')}", f"--timeout={int(t)}", *args],
                   timeout=t + 5, logs=tuple(self.daemons.values())).strip()

    def wait_hv(self, timeout: float | None = None) -> None:
        """Until northd has compiled the NB changes and every chassis has
        installed them (``ovn-nbctl --wait=hv sync``)."""
        self.nbctl("--wait=hv", "sync", timeout=timeout)

    def logs(self) -> str:
        return "\n".join(d.log_tail(30) for d in self.daemons.values())


class OvnHost:
    """One hypervisor: a private OVS (br-int, br-phy) and ovn-controller in ``netns``."""

    def __init__(self, chassis: str, central: OvnCentral, netns, encap_ip: str, *,
                 prefix_len: int = 24, timeout: float = 20.0):
        self.chassis = chassis
        self.central = central
        self.netns = netns
        self.encap_ip = encap_ip
        self.prefix_len = prefix_len
        self.timeout = timeout
        self.ovs = Ovs(netns=netns, timeout=timeout)
        self.controller: Daemon | None = None

    def start(self) -> "OvnHost":
        ovs = self.ovs.start()
        try:
            ovs.add_bridge("br-phy")
            ovs.vsctl("set", "Interface", "br-phy", f"mtu_request={UNDERLAY_MTU}")
            self.netns.addr_add("br-phy", f"{self.encap_ip}/{self.prefix_len}")
            self.netns.link_up("br-phy")
            ovs.add_bridge("br-int", fail_mode="secure")
            ovs.vsctl("set", "Bridge", "br-int", "other_config:disable-in-band=true")
            ovs.vsctl("set", "Open_vSwitch", ".", f"external_ids:system-id={self.chassis}",
                      f"external_ids:ovn-remote={self.central.sock('sb')}",
                      "external_ids:ovn-encap-type=geneve",
                      f"external_ids:ovn-encap-ip={self.encap_ip}",
                      "external_ids:ovn-bridge=br-int")
            self.controller = Daemon("ovn-controller", ovs.dir, named_ctl=False)
            run(self.netns.exec_argv(["ovn-controller", ovs.db_sock, *self.controller.options()]),
                timeout=self.timeout, env=dict(ovs.env, OVN_RUNDIR=str(ovs.dir)),
                logs=(self.controller,))
            self.controller.read_pid(self.timeout)
            self.wait_chassis()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_chassis(self) -> None:
        """Until this host's chassis (with its Geneve encap) is in the SB database."""
        deadline = time.monotonic() + self.timeout
        while True:
            out = self.central.sbctl("--bare", "--columns=encaps", "find", "Chassis",
                                     f"name={self.chassis}")
            if out:
                return
            if time.monotonic() > deadline:
                raise OvnError(f"chassis {self.chassis} never registered\n"
                               f"{self.controller.log_tail()}\n{self.central.logs()}")
            time.sleep(0.05)

    def __enter__(self) -> "OvnHost":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
        self.ovs.stop()

    def bind(self, iface: str, lport: str) -> int:
        """Put netdev ``iface`` (a representor, in this host's namespace) on
        br-int as logical switch port ``lport``; bring it up; its ofport."""
        self.netns.link_up(iface)
        ofport = self.ovs.add_port("br-int", iface)
        self.ovs.vsctl("set", "Interface", iface, f"external_ids:iface-id={lport}")
        return ofport

    def unbind(self, iface: str) -> None:
        self.ovs.del_port("br-int", iface)

    def tunnel_ports(self) -> list[str]:
        """The Geneve ports ovn-controller made on br-int (one per other chassis)."""
        return [p for p in self.ovs.ports("br-int")
                if self.ovs.vsctl("get", "Interface", p, "type") == "geneve"]

    def logs(self) -> str:
        parts = [self.ovs.log()[-3000:]]
        if self.controller is not None:
            parts.append(self.controller.log_tail(30))
        return "\n".join(parts)


def underlay(a: OvnHost, b: OvnHost, *, mtu: int = UNDERLAY_MTU) -> None:
    """A veth pair between the two hosts' namespaces, each end a port of its
    host's br-phy; checked with a ping over the underlay addresses (which
    also fills OVS's neighbour cache for the tunnel)."""
    a_end, b_end = f"ul-{b.chassis}"[:15], f"ul-{a.chassis}"[:15]
    a.netns.veth_pair(a_end, b_end, peer=b.netns, mtu=mtu)
    a.ovs.add_port("br-phy", a_end)
    b.ovs.add_port("br-phy", b_end)
    for src, dst in ((a, b), (b, a)):
        # one reply within 10 s (-w: ping goes on sending until then)
        r = src.netns.run("ping", "-c", "1", "-w", "10", dst.encap_ip, check=False, timeout=20)
        if r.returncode != 0:
            raise OvnError(f"underlay {src.encap_ip} -> {dst.encap_ip} does not ping: "
                           f"{r.stdout}{r.stderr}\n{src.logs()}")
