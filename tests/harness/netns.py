"""Throw-away network namespaces for tests.

    with NetNs() as ns, NetNs() as peer:
        ns.veth_pair("veth0", "veth1", peer=peer, addr_b="10.9.0.2/24")
        ns.run("ip", "-br", "link")
        proc = ns.popen(["python3", "-m", "vfe.cli.controller", ...])

Each NetNs gets a unique name (``vfe-<pid>-<n>-<hex>``), loopback up and,
by default, IPv6 disabled on every device created in it (no autoconfiguration
or MLD noise on representors and veths).  Nothing here touches the host's
namespace: commands run under ``ip netns exec`` / ``ip -n``, and in-process
netlink or sysctl work enters the namespace with :meth:`NetNs.enter` (the
calling thread only).

Deletion (``__exit__``, :meth:`delete`, or at interpreter exit): the
processes started with :meth:`popen` are stopped by PID (SIGTERM, then
SIGKILL), then any other process still inside the namespace (``ip netns
pids``; only processes this harness started can be in a namespace it named
uniquely) is killed by PID, then ``ip netns del``.  The kernel frees the
namespace, and with it its veths and TAPs, once the last fd on it is closed:
close Representor fds before leaving the ``with`` block.
"""
from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import secrets
import shlex
import signal
import subprocess
import time
import weakref
from typing import Iterator, Sequence

from pyroute2 import IPRoute

from vfe.ports.representor import enter_netns

__all__ = ["NetNs", "NsCommandError"]


class NsCommandError(subprocess.CalledProcessError):
    """A command run in a namespace failed; the message includes its stderr."""

    def __str__(self) -> str:
        err = (self.stderr or "").strip()
        return super().__str__() + (f": {err}" if err else "")

_counter = itertools.count()
_live: "weakref.WeakSet[NetNs]" = weakref.WeakSet()


def _cleanup_all() -> None:
    for ns in list(_live):
        with contextlib.suppress(Exception):
            ns.delete()


atexit.register(_cleanup_all)


def _argv(cmd: tuple) -> list[str]:
    if len(cmd) == 1 and isinstance(cmd[0], str):
        return shlex.split(cmd[0])
    if len(cmd) == 1 and isinstance(cmd[0], (list, tuple)):
        return [str(a) for a in cmd[0]]
    return [str(a) for a in cmd]


class NetNs:
    """A uniquely named network namespace that exists inside the ``with`` block."""

    RUN_DIR = "/var/run/netns"

    def __init__(self, name: str | None = None, *, ipv6: bool = False, lo_up: bool = True,
                 prefix: str = "vfe"):
        self.name = name or f"{prefix}-{os.getpid()}-{next(_counter)}-{secrets.token_hex(2)}"
        self.ipv6 = ipv6
        self.lo_up = lo_up
        self.path = os.path.join(self.RUN_DIR, self.name)
        self.procs: list[subprocess.Popen] = []
        self.created = False

    # -- lifetime ------------------------------------------------------------
    def create(self) -> "NetNs":
        if self.created:
            return self
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True,
                       text=True)
        self.created = True
        _live.add(self)
        try:
            if not self.ipv6:
                for conf in ("default", "all"):
                    self.sysctl(f"net.ipv6.conf.{conf}.disable_ipv6", 1)
            if self.lo_up:
                with self.ipr() as ipr:
                    ipr.link("set", index=1, state="up")
        except BaseException:
            self.delete()
            raise
        return self

    def __enter__(self) -> "NetNs":
        return self.create()

    def __exit__(self, *exc) -> None:
        self.delete()

    def delete(self, timeout: float = 3.0) -> None:
        """Stop what runs inside (by PID) and delete the namespace.  Idempotent."""
        if not self.created:
            return
        for proc in self.procs:
            self._stop_proc(proc, timeout)
        self.procs.clear()
        for pid in self.pids():
            self._kill_pid(pid, timeout)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, text=True)
        self.created = False
        _live.discard(self)

    @staticmethod
    def _stop_proc(proc: subprocess.Popen, timeout: float) -> None:
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout)

    @staticmethod
    def _kill_pid(pid: int, timeout: float) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    # reap it if it is our child, else just probe
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        return
                except ChildProcessError:
                    pass
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.02)

    def pids(self) -> list[int]:
        """PIDs of the processes whose network namespace is this one."""
        r = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True)
        return [int(p) for p in r.stdout.split() if p.isdigit() and int(p) != os.getpid()]

    # -- running things inside -------------------------------------------------
    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that it runs inside this namespace."""
        return ["ip", "netns", "exec", self.name, *[str(a) for a in argv]]

    def run(self, *cmd, check: bool = True, timeout: float = 30.0, input: str | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
        """Run a command inside and wait: ``run("ip", "-br", "addr")``,
        ``run(["ping", "-c1", ip])`` or ``run("sysctl -w a=b")``; text output captured.
        ``check=True`` raises with the command's stderr on a non-zero exit."""
        argv = _argv(cmd)
        r = subprocess.run(self.exec_argv(argv), capture_output=True, text=True,
                           timeout=timeout, input=input, env=env,
                           stdin=None if input is not None else subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise NsCommandError(r.returncode, argv, r.stdout, r.stderr)
        return r

    def popen(self, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start a process inside; it is stopped by PID when the namespace is deleted."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.exec_argv(argv), **kw)
        self.procs.append(proc)
        return proc

    @contextlib.contextmanager
    def enter(self) -> Iterator[None]:
        """The calling thread runs the body inside this namespace."""
        with enter_netns(self.path):
            yield

    @contextlib.contextmanager
    def ipr(self) -> Iterator[IPRoute]:
        """A pyroute2 IPRoute bound to this namespace."""
        with self.enter():
            ipr = IPRoute()
        try:
            yield ipr
        finally:
            ipr.close()

    # -- configuration helpers -------------------------------------------------
    def sysctl(self, key: str, value) -> None:
        with self.enter():  # /proc/sys/net/* follows the opening thread's namespace
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(str(value))

    def ip(self, *args) -> str:
        """``ip -n NAME args...`` -> stdout."""
        argv = ["ip", "-n", self.name, *_argv(args)]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise NsCommandError(r.returncode, argv, r.stdout, r.stderr)
        return r.stdout

    def link_up(self, dev: str) -> None:
        self.ip("link", "set", dev, "up")

    def addr_add(self, dev: str, cidr: str) -> None:
        self.ip("addr", "add", cidr, "dev", dev)

    def tx_csum_off(self, dev: str) -> None:
        """``ethtool -K dev tx off``: the kernel finishes checksums in software
        before the frame leaves ``dev`` (facts.md, checksum pitfalls)."""
        self.run("ethtool", "-K", dev, "tx", "off")

    def veth_pair(self, name: str, peer_name: str, *, peer: "NetNs | None" = None,
                  addr: str | None = None, peer_addr: str | None = None,
                  mac: str | None = None, peer_mac: str | None = None,
                  mtu: int | None = None, up: bool = True,
                  tx_csum: bool = True, peer_tx_csum: bool = True) -> tuple[str, str]:
        """Create veth ``name`` here and its peer ``peer_name`` in ``peer``
        (another NetNs; default: here too), optionally with addresses
        (CIDR), MACs, MTU, and tx checksum offload off (``*_tx_csum=False``)."""
        other = peer or self
        argv = ["link", "add", name]
        if mac:
            argv += ["address", mac]
        if mtu:
            argv += ["mtu", str(mtu)]
        argv += ["type", "veth", "peer", "name", peer_name]
        if peer_mac:
            argv += ["address", peer_mac]
        if mtu:
            argv += ["mtu", str(mtu)]
        if other is not self:
            argv += ["netns", other.name]
        self.ip(*argv)
        for ns, dev, a, csum in ((self, name, addr, tx_csum), (other, peer_name, peer_addr,
                                                                peer_tx_csum)):
            if a:
                ns.addr_add(dev, a)
            if not csum:
                ns.tx_csum_off(dev)
            if up:
                ns.link_up(dev)
        return name, peer_name

    def __repr__(self) -> str:
        return f"<NetNs {self.name}{'' if self.created else ' (deleted)'}>"
