"""A private libvirtd for tests, and test guests defined in it.

    with Libvirtd() as lv:
        dom = lv.define(GuestDomain("g0", image, interfaces=[VhostUserNic(sock, mac)]))
        dom.start(); dom.wait_booted(90)
        rc, out = dom.run("ip link")
        dom.destroy(); dom.start()            # `virsh destroy`, `virsh start`
        lv.virsh("dumpxml", "g0")

Why a mount namespace: a libvirtd run by root is the *system* daemon, and
its QEMU driver takes its directories from compile-time paths (/etc/libvirt,
/run/libvirt, /var/lib/libvirt, /var/log/libvirt, /var/cache/libvirt); only
an unprivileged session daemon follows XDG_* variables, and the controller's
sockets are root's.  So the daemon runs under ``unshare --mount`` with
those five directories bind-mounted from a temp dir: its config (our
libvirtd.conf and qemu.conf), state, logs and capability cache are all
private, and nothing of the host's libvirt (if any) is read or touched.
libvirtd.conf puts the client sockets in the temp dir (``unix_sock_dir``),
outside the bind mounts, so ``virsh -c 'qemu:///system?socket=DIR/libvirt-sock'``
reaches it from the host's namespace.  The QEMU processes libvirtd forks
inherit the namespace; everything else they use (the guest image, the
vhost-user sockets under /tmp, the consoles) has the same path in both.

qemu.conf (see docs/libvirt.md for each line): QEMU runs as root (the
controller's sockets are root's), with no security driver, no per-domain
mount namespace, no cgroup controllers and its output to plain files (no
virtlogd): PID 1 here is not systemd, there is no D-Bus, and the container
may not delegate cgroups.

The daemon is our child (PR_SET_PDEATHSIG: it gets SIGTERM if the test
process dies); its QEMUs are daemonized by libvirt, so :meth:`Libvirtd.stop`
destroys every domain, undefines it, stops libvirtd by PID, and kills a QEMU
that is still alive by the PID libvirt recorded for it.  The temp dir goes
unless ``keep=True`` or ``VFE_KEEP_LIBVIRT`` is set.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from vfe.guest import guest_image
from vfe.guest.console import ConsoleError, GuestTimeout, ShellConsole
from vfe.guest.vm import KERNEL_ARGS, QEMU

__all__ = ["Libvirtd", "LibvirtError", "GuestDomain", "VhostUserNic", "VhostUserDisk",
           "libvirtd_available"]

LIBVIRTD = "libvirtd"
# libvirt's fixed directories for the system daemon -> our subdirectory.
PRIVATE_DIRS = {"/etc/libvirt": "etc", "/run/libvirt": "run", "/var/lib/libvirt": "lib",
                "/var/log/libvirt": "log", "/var/cache/libvirt": "cache"}

LIBVIRTD_CONF = """\
unix_sock_dir = {sock_dir}
auth_unix_rw = "none"
auth_unix_ro = "none"
listen_tls = 0
listen_tcp = 0
log_outputs = {log_outputs}
"""

QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
namespaces = []
cgroup_controllers = []
stdio_handler = "file"
"""


def libvirtd_available() -> bool:
    return all(shutil.which(b) for b in (LIBVIRTD, "virsh", "unshare"))


class LibvirtError(RuntimeError):
    pass


def _pdeathsig() -> None:
    # In the child before exec: SIGTERM when the test process dies.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Libvirtd:
    """A private libvirtd, started on ``__enter__``/:meth:`start`."""

    def __init__(self, *, keep: bool | None = None, timeout: float = 60.0):
        self.keep = bool(os.environ.get("VFE_KEEP_LIBVIRT")) if keep is None else keep
        self.timeout = timeout
        self.dir: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.domains: dict[str, "GuestDomain"] = {}
        self.qemu_pids: dict[str, int] = {}      # every QEMU pid libvirt recorded for a domain

    # -- paths
    @property
    def socket(self) -> Path:
        return self.dir / "sock" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.socket}"

    @property
    def log_path(self) -> Path:
        return self.dir / "libvirtd.log"

    def qemu_log(self, name: str) -> str:
        """libvirt's log of a domain: QEMU's command line and its stderr."""
        try:
            return (self.dir / "log" / "qemu" / f"{name}.log").read_text(errors="replace")
        except (FileNotFoundError, TypeError):
            return ""

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except (FileNotFoundError, TypeError):
            return ""

    # -- lifetime
    def start(self) -> "Libvirtd":
        # short: the guests' console sockets live under it (sun_path <= 107 bytes)
        self.dir = Path(tempfile.mkdtemp(prefix="vfe-lv-", dir="/tmp"))
        for sub in (*PRIVATE_DIRS.values(), "sock", "dom"):
            (self.dir / sub).mkdir()
        (self.dir / "etc" / "libvirtd.conf").write_text(LIBVIRTD_CONF.format(
            sock_dir=quote_conf(str(self.dir / "sock")),
            log_outputs=quote_conf(f"3:file:{self.log_path}")))
        (self.dir / "etc" / "qemu.conf").write_text(QEMU_CONF)
        # mkdir -p: /run/libvirt does not exist until something makes it
        mounts = "".join(f'mkdir -p {target} && mount --bind "$1/{sub}" {target} && '
                         for target, sub in PRIVATE_DIRS.items())
        script = f'{mounts}exec {LIBVIRTD} -f "$1/etc/libvirtd.conf" -p "$1/libvirtd.pid"'
        with open(self.dir / "libvirtd.out", "wb") as out:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                 str(self.dir)], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_pdeathsig)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        """Until virsh gets an answer from the QEMU driver (the first one
        probes the QEMU binaries' capabilities: seconds under load)."""
        deadline = time.monotonic() + self.timeout
        while not self.socket.exists():
            if self.proc.poll() is not None:
                raise LibvirtError(f"libvirtd exited {self.proc.returncode}:\n{self._tail()}")
            if time.monotonic() > deadline:
                raise LibvirtError(f"libvirtd made no socket {self.socket}:\n{self._tail()}")
            time.sleep(0.05)
        self.virsh("version", timeout=self.timeout)

    def __enter__(self) -> "Libvirtd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Destroy and undefine every domain, stop libvirtd, kill a QEMU
        left alive (by the PID libvirt recorded), remove the temp dir.
        Idempotent; never raises for a half-started daemon."""
        if self.proc is not None and self.proc.poll() is None:
            for name in list(self.domains):
                self.record_pid(name)
                with contextlib.suppress(Exception):
                    self.domains[name].destroy()
                with contextlib.suppress(Exception):
                    self.virsh("undefine", name, check=False, timeout=10)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for name, pid in self.qemu_pids.items():
            self._kill_qemu(name, pid)
        self.domains.clear()
        self.qemu_pids.clear()
        self.proc = None
        if self.dir is not None and not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    @staticmethod
    def _kill_qemu(name: str, pid: int) -> None:
        try:   # only the QEMU libvirt started for this domain, not a reused pid
            if f"guest={name},".encode() not in Path(f"/proc/{pid}/cmdline").read_bytes():
                return
        except OSError:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + 3
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if not _alive(pid):
                return

    # -- virsh
    def virsh(self, *args: str, check: bool = True, timeout: float = 60.0) -> str:
        r = subprocess.run(["virsh", "-q", "-c", self.uri, *args], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=timeout)
        if check and r.returncode != 0:
            raise LibvirtError(f"virsh {' '.join(args)} exited {r.returncode}: "
                               f"{r.stderr.strip()}{self._tail()}")
        return r.stdout

    def define(self, dom: "GuestDomain") -> "GuestDomain":
        """``virsh define`` the domain's XML (a persistent domain: it can be
        destroyed and started again)."""
        dom.workdir = self.dir / "dom"
        xml = dom.workdir / f"{dom.name}.xml"
        xml.write_text(dom.xml())
        self.virsh("define", str(xml))
        dom.libvirtd = self
        self.domains[dom.name] = dom
        return dom

    def remove(self, dom: "GuestDomain") -> None:
        """Destroy (if running) and undefine ``dom``."""
        try:
            dom.destroy()
        finally:
            self.virsh("undefine", dom.name)
            self.domains.pop(dom.name, None)

    def record_pid(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            self.qemu_pids[name] = int((self.dir / "run" / "qemu" / f"{name}.pid").read_text())

    def _tail(self, lines: int = 15) -> str:
        text = self.log() or ((self.dir / "libvirtd.out").read_text(errors="replace")
                              if self.dir and (self.dir / "libvirtd.out").exists() else "")
        tail = text.splitlines()[-lines:]
        return ("\n--- libvirtd log ---\n" + "\n".join(tail)) if tail else ""


def quote_conf(value: str) -> str:
    """A libvirt .conf string value."""
    if '"' in value or "\\" in value or "\n" in value:
        raise ValueError(f"{value!r}: not writable as a libvirt .conf string")
    return f'"{value}"'


# -- the domain XML ---------------------------------------------------------------------------

@dataclass
class VhostUserNic:
    """``<interface type='vhostuser'>`` on a vhost-user socket (QEMU the client
    by default, as for a controller's endpoint)."""
    socket: str
    mac: str
    mode: str = "client"          # "server": QEMU listens (the back-end connects)
    queues: int = 1
    queue_size: int = 256
    reconnect: int = 1            # client: seconds before QEMU reconnects to a restarted back-end

    def xml(self, alias: str) -> str:
        reconnect = (f"\n        <reconnect enabled='yes' timeout='{self.reconnect}'/>"
                     if self.mode == "client" and self.reconnect else "")
        return f"""\
    <interface type='vhostuser'>
      <mac address={quoteattr(self.mac)}/>
      <source type='unix' path={quoteattr(self.socket)} mode={quoteattr(self.mode)}>{reconnect}
      </source>
      <model type='virtio'/>
      <driver queues='{self.queues}' rx_queue_size='{self.queue_size}' tx_queue_size='{self.queue_size}'/>
      <alias name='{alias}'/>
    </interface>
"""


@dataclass
class VhostUserDisk:
    """``<disk type='vhostuser' device='disk'>`` on a vhost-user-blk socket
    (QEMU is always the client)."""
    socket: str
    dev: str = "vda"
    queues: int = 1
    reconnect: int = 1

    def xml(self, alias: str) -> str:
        reconnect = f"\n        <reconnect enabled='yes' timeout='{self.reconnect}'/>" if self.reconnect else ""
        return f"""\
    <disk type='vhostuser' device='disk'>
      <driver name='qemu' type='raw' queues='{self.queues}'/>
      <source type='unix' path={quoteattr(self.socket)}>{reconnect}
      </source>
      <target dev={quoteattr(self.dev)} bus='virtio'/>
      <alias name='{alias}'/>
    </disk>
"""


@dataclass
class GuestDomain:
    """The project's test guest (direct kernel boot of vfe.guest's image,
    TCG) as a libvirt domain.  Serial 0 (the kernel console) goes to
    ``<name>.console.log``; serial 1, the shell ``run()`` drives, is a unix
    socket QEMU listens on, logged to ``<name>.shell.log``."""
    name: str
    image: guest_image.GuestImage
    interfaces: list[VhostUserNic] = field(default_factory=list)
    disks: list[VhostUserDisk] = field(default_factory=list)
    qemu_args: list[str] = field(default_factory=list)   # <qemu:commandline>, e.g. the seed's block
    memory_mb: int = 256
    kernel_args: str = ""

    # set by Libvirtd.define() and start()
    libvirtd: Libvirtd | None = field(default=None, init=False, repr=False)
    workdir: Path | None = field(default=None, init=False, repr=False)
    console: ShellConsole | None = field(default=None, init=False, repr=False)

    @property
    def shell_socket(self) -> Path:
        return self.workdir / f"{self.name}.sh"

    @property
    def console_log(self) -> Path:
        return self.workdir / f"{self.name}.console.log"

    def xml(self) -> str:
        nics = "".join(nic.xml(f"ua-net{i}") for i, nic in enumerate(self.interfaces))
        disks = "".join(d.xml(f"ua-disk{i}") for i, d in enumerate(self.disks))
        # TCG + vhost-user-net + MSI-X crashes QEMU 7.2 (facts.md): INTx, i.e.
        # virtio-net-pci's vectors=0, which libvirt has no attribute for.
        overrides = "".join(f"""\
    <qemu:device alias='ua-net{i}'>
      <qemu:frontend>
        <qemu:property name='vectors' type='unsigned' value='0'/>
      </qemu:frontend>
    </qemu:device>
""" for i in range(len(self.interfaces)))
        override = f"  <qemu:override>\n{overrides}  </qemu:override>\n" if overrides else ""
        args = "".join(f"    <qemu:arg value={quoteattr(a)}/>\n" for a in self.qemu_args)
        commandline = f"  <qemu:commandline>\n{args}  </qemu:commandline>\n" if args else ""
        cmdline = f"{KERNEL_ARGS} vfe.name={self.name} {self.kernel_args}".strip()
        return f"""\
<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{escape(self.name)}</name>
  <memory unit='MiB'>{self.memory_mb}</memory>
  <vcpu>1</vcpu>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{escape(str(self.image.kernel(True)))}</kernel>
    <initrd>{escape(str(self.image.initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{escape(shutil.which(QEMU) or QEMU)}</emulator>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
    <serial type='file'>
      <source path={quoteattr(str(self.console_log))} append='on'/>
      <target port='0'/>
    </serial>
    <serial type='unix'>
      <source mode='bind' path={quoteattr(str(self.shell_socket))}/>
      <target port='1'/>
      <log file={quoteattr(str(self.workdir / f"{self.name}.shell.log"))} append='on'/>
    </serial>
{nics}{disks}  </devices>
{override}{commandline}</domain>
"""

    # -- lifecycle (virsh)
    def start(self) -> "GuestDomain":
        """``virsh start``, then connect to the shell's socket at once: QEMU
        made it before libvirt let the CPUs run, and a socket chardev drops
        what the guest prints while nobody is connected."""
        try:
            self.libvirtd.virsh("start", self.name)
        finally:                 # a QEMU may run even when virsh gave up waiting for it
            self.libvirtd.record_pid(self.name)
        self.console = ShellConsole(str(self.shell_socket), self.name)
        try:
            self.console.connect(timeout=10)
        except ConsoleError as e:
            raise LibvirtError(f"{self.name}: {e}\n{self.qemu_log_tail()}") from None
        return self

    def wait_booted(self, timeout: float = 90.0) -> None:
        try:
            self.console.wait_ready(timeout)
            self.console.run("true", timeout=max(5.0, timeout / 4))
        except (ConsoleError, GuestTimeout) as e:
            raise LibvirtError(f"{self.name} did not boot: {e}\n{self.qemu_log_tail()}\n"
                               f"--- console tail ---\n{self.console_tail()}") from None

    def destroy(self) -> None:
        """``virsh destroy`` (QEMU is killed, as by pulling the plug)."""
        if self.console is not None:
            self.console.close()
            self.console = None
        if self.state() != "shut off":
            self.libvirtd.virsh("destroy", self.name)

    def state(self) -> str:
        return self.libvirtd.virsh("domstate", self.name).strip()

    # -- the guest's shell
    def run(self, cmd: str, timeout: float = 30.0, check: bool = False) -> tuple[int, str]:
        rc, out = self.console.run(cmd, timeout)
        if check and rc != 0:
            raise LibvirtError(f"{self.name}: {cmd!r} exited {rc}:\n{out}")
        return rc, out

    # -- logs
    def console_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.console_log.read_text(errors="replace").splitlines()[-n:])
        except (FileNotFoundError, TypeError):
            return ""

    def qemu_log_tail(self, n: int = 15) -> str:
        lines = self.libvirtd.qemu_log(self.name).splitlines()[-n:] if self.libvirtd else []
        return "--- libvirt's qemu log tail ---\n" + "\n".join(lines)
