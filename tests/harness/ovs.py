"""A private Open vSwitch instance (userspace datapath) for tests.

    with NetNs() as ns, Ovs(netns=ns) as ovs:
        ovs.add_bridge("br0")              # datapath_type=netdev
        ovs.add_port("br0", "en3f0pf0sf1001")   # -> ofport, checked
        print(ovs.ofctl("dump-flows", "br0"))

It follows facts.md's recipe: OVS_RUNDIR, OVS_DBDIR, OVS_LOGDIR and
OVS_SYSCONFDIR point into a temp dir; ``ovsdb-tool create``; ``ovsdb-server
--remote=punix:$OVS_RUNDIR/db.sock --pidfile --log-file --detach --no-chdir
-vsyslog:off``; ``ovs-vsctl --no-wait init``; ``ovs-vswitchd
unix:$OVS_RUNDIR/db.sock --pidfile --log-file --detach --no-chdir
-vsyslog:off``.  With ``netns=`` both daemons run inside that namespace
(``ip netns exec``), so the bridge's ports are that namespace's netdevs and
nothing touches the host's.  The clients (ovs-vsctl, -ofctl, -appctl) talk to
the daemons over Unix sockets in the temp dir and need no namespace.

Only the userspace datapath works here (no openvswitch kernel module), and a
bridge on the kernel datapath still "succeeds": :meth:`add_bridge` and
:meth:`add_port` therefore check the Interface's ``ofport`` column and raise
:class:`OvsError` (with the ``error`` column and the log's tail) when it is
not a valid port number.

Checksums: userspace OVS forwards frames with their checksum state as it
finds it.  ``userspace_tso=False`` (the default, what the tests use) keeps
OVS out of it: every frame must carry complete checksums.  The tests write
frames with complete checksums (ARP, ICMP, UDP computed in Python, 12-byte
zero virtio-net header) and turn tx checksum offload off on namespace veths
(``NetNs.veth_pair(..., peer_tx_csum=False)``).  In production the engine
finishes checksums of guest frames whose header says NEEDS_CSUM.
``userspace_tso=True`` sets ``other_config:userspace-tso-enable=true`` before
ovs-vswitchd starts (it is read only at start): OVS then reads and writes
virtio-net headers on its system ports and passes partial checksums / TSO
frames between them.

Stop (``__exit__``/:meth:`stop`): ``del-br`` each bridge, ``ovs-appctl -t
ovs-vswitchd exit --cleanup``, ``ovs-appctl -t ovsdb-server exit``; a daemon
still alive after that is killed by the PID from its pidfile.  The temp dir
is removed unless ``keep=True`` (or the ``VFE_KEEP_OVS`` environment variable
is set); :meth:`log` returns ovs-vswitchd's log for failure messages.
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

__all__ = ["Ovs", "OvsError"]

SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"



def pid_alive(pid: int | None) -> bool:
    """A detached daemon's process still runs (a zombie nobody reaped yet
    counts as gone)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False

class OvsError(RuntimeError):
    pass


class Ovs:
    """A private ovsdb-server + ovs-vswitchd, started on ``__enter__``/:meth:`start`."""

    def __init__(self, netns=None, *, userspace_tso: bool = False, workdir: str | None = None,
                 keep: bool | None = None, timeout: float = 10.0):
        self.netns = netns  # a NetNs (tests.harness.netns) or a namespace name, or None
        self.userspace_tso = userspace_tso
        self.timeout = timeout
        self.keep = bool(os.environ.get("VFE_KEEP_OVS")) if keep is None else keep
        self._workdir_arg = workdir
        self.dir: Path | None = None
        self.pids: dict[str, int] = {}
        self.bridges: list[str] = []
        self.started = False

    # -- paths and environment -------------------------------------------------
    @property
    def rundir(self) -> Path:
        return self.dir / "run"

    @property
    def db_path(self) -> Path:
        return self.dir / "db" / "conf.db"

    @property
    def db_sock(self) -> str:
        return f"unix:{self.rundir / 'db.sock'}"

    @property
    def env(self) -> dict:
        env = dict(os.environ)
        env.update(OVS_RUNDIR=str(self.rundir), OVS_DBDIR=str(self.dir / "db"),
                   OVS_LOGDIR=str(self.dir / "log"), OVS_SYSCONFDIR=str(self.dir / "etc"))
        return env

    def _ns_name(self) -> str | None:
        if self.netns is None:
            return None
        return getattr(self.netns, "name", self.netns)

    def _in_ns(self, argv: list[str]) -> list[str]:
        ns = self._ns_name()
        return ["ip", "netns", "exec", ns, *argv] if ns else argv

    def _run(self, argv: list[str], *, check: bool = True, timeout: float | None = None) -> str:
        r = subprocess.run(argv, env=self.env, capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=timeout or self.timeout)
        if check and r.returncode != 0:
            raise OvsError(f"{' '.join(argv)} exited {r.returncode}: {r.stderr.strip()}"
                           + self._log_tail())
        return r.stdout

    # -- lifetime --------------------------------------------------------------
    def start(self) -> "Ovs":
        if self.started:
            return self
        if self._workdir_arg:
            self.dir = Path(self._workdir_arg)
            self.dir.mkdir(parents=True, exist_ok=True)
        else:
            self.dir = Path(tempfile.mkdtemp(prefix="vfe-ovs-"))
        for sub in ("run", "db", "log", "etc"):
            (self.dir / sub).mkdir(exist_ok=True)
        self.started = True
        try:
            self._run(["ovsdb-tool", "create", str(self.db_path), SCHEMA])
            self._run(self._in_ns(["ovsdb-server", str(self.db_path),
                                   f"--remote=punix:{self.rundir / 'db.sock'}",
                                   "--pidfile", "--log-file", "--detach", "--no-chdir",
                                   "-vsyslog:off"]))
            self.pids["ovsdb-server"] = self._read_pid("ovsdb-server")
            self.vsctl("--no-wait", "init")
            if self.userspace_tso:
                self.vsctl("--no-wait", "set", "Open_vSwitch", ".",
                           "other_config:userspace-tso-enable=true")
            self._run(self._in_ns(["ovs-vswitchd", self.db_sock, "--pidfile", "--log-file",
                                   "--detach", "--no-chdir", "-vsyslog:off"]))
            self.pids["ovs-vswitchd"] = self._read_pid("ovs-vswitchd")
        except BaseException:
            self.stop()
            raise
        return self

    def _read_pid(self, daemon: str) -> int:
        path = self.rundir / f"{daemon}.pid"
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError, ValueError):
                return int(path.read_text().split()[0])
            time.sleep(0.01)
        raise OvsError(f"{daemon} wrote no pidfile {path}" + self._log_tail(daemon))

    def __enter__(self) -> "Ovs":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Delete the bridges, stop both daemons (politely, then by PID) and
        remove the temp dir.  Idempotent; never raises for a half-started instance."""
        if not self.started:
            return
        vswitchd = self._alive("ovs-vswitchd")
        if vswitchd:
            for br in reversed(self.bridges):
                with contextlib.suppress(Exception):
                    self.vsctl("--if-exists", "del-br", br, timeout=5)
            with contextlib.suppress(Exception):
                self._run(["ovs-appctl", "-t", "ovs-vswitchd", "exit", "--cleanup"],
                          check=False, timeout=5)
        if self._alive("ovsdb-server"):
            with contextlib.suppress(Exception):
                self._run(["ovs-appctl", "-t", "ovsdb-server", "exit"], check=False, timeout=5)
        for daemon in ("ovs-vswitchd", "ovsdb-server"):
            self._kill(daemon)
        self.bridges.clear()
        self.started = False
        if not self.keep and self.dir is not None and not self._workdir_arg:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _alive(self, daemon: str) -> bool:
        return pid_alive(self.pids.get(daemon))

    def _kill(self, daemon: str, grace: float = 3.0) -> None:
        """Wait for ``daemon`` (our own PID from its pidfile) to exit; SIGTERM, then SIGKILL."""
        pid = self.pids.get(daemon)
        if not pid:
            return
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                if not self._alive(daemon):
                    self.pids.pop(daemon, None)
                    return
                time.sleep(0.01)

    # -- clients ---------------------------------------------------------------
    def vsctl(self, *args, timeout: float | None = None, check: bool = True) -> str:
        """``ovs-vsctl --db=unix:... --timeout=N args...`` -> stdout (stripped)."""
        t = timeout or self.timeout
        return self._run(["ovs-vsctl", f"--db={self.db_sock}", f"--timeout={int(max(1, t))}",
                          *map(str, args)], timeout=t + 2, check=check).strip()

    def ofctl(self, *args, timeout: float | None = None) -> str:
        """``ovs-ofctl args...`` (bridge names resolve to $OVS_RUNDIR/BR.mgmt)."""
        return self._run(["ovs-ofctl", *map(str, args)], timeout=timeout)

    def appctl(self, *args, target: str = "ovs-vswitchd", timeout: float | None = None) -> str:
        return self._run(["ovs-appctl", "-t", target, *map(str, args)], timeout=timeout)

    # -- bridges and ports -------------------------------------------------------
    def add_bridge(self, name: str, datapath_type: str = "netdev", *,
                   fail_mode: str | None = None) -> None:
        """Add bridge ``name`` on ``datapath_type`` ("netdev" = userspace) and
        check that the datapath really came up (the LOCAL port got an ofport)."""
        args = ["add-br", name, "--", "set", "bridge", name, f"datapath_type={datapath_type}"]
        if fail_mode:
            args += ["--", "set-fail-mode", name, fail_mode]
        self.vsctl(*args)
        self.bridges.append(name)
        self._check_ofport(name, f"bridge {name} (datapath_type={datapath_type})")

    def del_bridge(self, name: str) -> None:
        self.vsctl("--if-exists", "del-br", name)
        with contextlib.suppress(ValueError):
            self.bridges.remove(name)

    def add_port(self, bridge: str, port: str, *, type: str | None = None, **options) -> int:
        """Add netdev ``port`` to ``bridge`` and return its ofport.  ``add-port``
        exits 0 even when ovs-vswitchd could not open the device, so this
        checks the Interface's ``ofport`` column and raises OvsError with the
        ``error`` column and the log tail when it is -1 or empty."""
        args = ["add-port", bridge, port]
        if type or options:
            args += ["--", "set", "Interface", port]
            if type:
                args.append(f"type={type}")
            args += [f"options:{k}={v}" for k, v in options.items()]
        self.vsctl(*args)
        return self._check_ofport(port, f"port {port} on {bridge}")

    def del_port(self, bridge: str, port: str) -> None:
        self.vsctl("--if-exists", "del-port", bridge, port)

    def ofport(self, iface: str) -> int | None:
        """The Interface's ofport column: its OpenFlow port number, -1 when
        ovs-vswitchd could not open it, None while unset ("[]", which is
        also what a bridge whose datapath failed keeps for ever)."""
        out = self.vsctl("get", "Interface", iface, "ofport")
        return int(out) if out.lstrip("-").isdigit() else None

    def _check_ofport(self, iface: str, what: str, grace: float = 0.5) -> int:
        # ovs-vsctl (without --no-wait) returns once ovs-vswitchd has applied
        # the change, so the column is final by now; a short grace period
        # only covers a slow reconfiguration.
        deadline = time.monotonic() + grace
        while True:
            ofport = self.ofport(iface)
            if ofport is not None and ofport > 0:
                return ofport
            if ofport == -1 or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        err = self.vsctl("get", "Interface", iface, "error", check=False)
        shown = "[] (never assigned)" if ofport is None else ofport
        raise OvsError(f"{what}: ofport={shown}, error={err}" + self._log_tail())

    def ports(self, bridge: str) -> list[str]:
        return self.vsctl("list-ports", bridge).split()

    # -- logs --------------------------------------------------------------------
    def log(self, daemon: str = "ovs-vswitchd") -> str:
        if self.dir is None:
            return ""
        try:
            return (self.dir / "log" / f"{daemon}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _log_tail(self, daemon: str = "ovs-vswitchd", lines: int = 12) -> str:
        """The last warnings/errors of ``daemon``'s log (else its last lines)."""
        all_lines = self.log(daemon).splitlines()
        bad = [ln for ln in all_lines if any(f"|{lvl}|" in ln for lvl in ("WARN", "ERR", "EMER"))]
        tail = (bad or all_lines)[-lines:]
        return ("\n--- " + daemon + ".log ---\n" + "\n".join(tail)) if tail else ""
