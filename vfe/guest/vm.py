"""Launch and drive QEMU test guests.

    vm = VM(name="a", workdir=tmp, nics=[NetDev(socket="/run/a.sock")])
    vm.start(); vm.wait_booted(timeout=60)
    rc, out = vm.run("ip link set eth0 up")
    vm.shutdown()

Each VM runs the guest built by vfe.guest.guest_image (Debian kernel + busybox
initramfs). Serial port 1 (ttyS0) is the kernel console, port 2 (ttyS1) the
shell that ``run()`` drives (see vfe/guest/console.py); both are logged, merged
in time order, to ``<workdir>/<name>.serial.log``. QEMU's own stdout/stderr
go to ``<workdir>/<name>.qemu.log``. Sockets live in a private short
directory under /tmp (unix socket paths are limited to 107 bytes, safepath.SUN_PATH_MAX) that
``shutdown()`` removes; the logs stay for post-mortems.

Every started QEMU is tracked by PID and stopped by ``shutdown()``, by
``__exit__`` and, as a last resort, at interpreter exit.
"""

from __future__ import annotations

import atexit
import ctypes
import fcntl
import itertools
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from vfe.guest import guest_image
from vfe.guest.console import ConsoleError, GuestTimeout, ShellConsole, shell_quote
from vfe.macaddr import format_mac
from vfe.qmp import ExecuteError, Monitor
from vfe.safepath import check_sun_path

__all__ = ["VM", "NetDev", "BlkDev", "BgJob", "VMError", "GuestTimeout", "ExecuteError",
           "detect_accel", "KERNEL_ARGS"]

log = logging.getLogger("vfe.guest.vm")

QEMU = os.environ.get("VFE_QEMU", "qemu-system-x86_64")

# qboot is a minimal firmware that jumps straight to the -kernel image
# (Debian ships it in qemu-system-data). Opt-in: it reaches the kernel
# ~0.1 s sooner than SeaBIOS under TCG, but in alternating runs here the
# kernel then took as long or longer, so the total was no better.
QBOOT = "/usr/share/qemu/qboot.rom"

# Kernel options. Measured under TCG here (boot to shell, medians):
#  quiet                 printk to a 16550 is synchronous: ~0.8 s less
#  cryptomgr.notests     skip crypto self-tests at boot: ~0.5-1 s less
# Not measurable in the noise, kept because they are right for a VM:
#  tsc=reliable, no_timer_check  no clocksource watchdog / timer check that
#                        could move a slow TCG guest to an even slower clock
#  panic=-1              reboot at once on panic; with -no-reboot QEMU exits
KERNEL_ARGS = ("console=ttyS0 quiet panic=-1 rdinit=/init cryptomgr.notests "
               "tsc=reliable no_timer_check")


class VMError(RuntimeError):
    pass


# --- devices -----------------------------------------------------------------

def _opt(value: object) -> str:
    """Escape a value for a QEMU -option list (a comma is written ',,')."""
    return str(value).replace(",", ",,")


def _check_ring_size(n: int, what: str, lo: int, hi: int) -> None:
    if n < lo or n > hi or n & (n - 1):
        raise ValueError(f"{what} must be a power of two in [{lo}, {hi}], got {n}")


@dataclass
class NetDev:
    """A virtio-net-pci NIC backed by a vhost-user socket."""
    socket: str
    mac: str | None = None        # default: 52:54:00:<vm hash>:<index>
    queues: int = 1               # queue pairs
    queue_size: int = 256         # rx_queue_size and tx_queue_size
    server: bool = False          # QEMU listens (blocks start until the backend connects)
    mq: bool | None = None        # default: queues > 1
    extra: str = ""               # more virtio-net-pci properties, "a=b,c=d"
    reconnect: int = 0            # client: reconnect N s after the backend goes away (recovery)

    def __post_init__(self) -> None:
        if self.queues < 1:
            raise ValueError("queues must be >= 1")
        # QEMU: rx in [256, 1024]; tx in [256, 1024] for vhost-user.
        _check_ring_size(self.queue_size, "NetDev.queue_size", 256, 1024)


@dataclass
class BlkDev:
    """A vhost-user-blk-pci disk."""
    socket: str
    num_queues: int = 1
    queue_size: int = 128
    server: bool = False
    extra: str = ""
    reconnect: int = 0            # client: reconnect N s after the backend goes away (its restart)

    def __post_init__(self) -> None:
        _check_ring_size(self.queue_size, "BlkDev.queue_size", 2, 1024)


# --- accelerator ----------------------------------------------------------------

def detect_accel() -> str:
    """'kvm' when /dev/kvm works and is not PVM (which only runs PVM-built
    guest kernels, facts.md), else 'tcg'. $VFE_ACCEL overrides."""
    forced = os.environ.get("VFE_ACCEL")
    if forced:
        return forced
    if Path("/sys/module/kvm_pvm").exists():
        return "tcg"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return "tcg"
    try:
        KVM_GET_API_VERSION = 0xAE00
        return "kvm" if fcntl.ioctl(fd, KVM_GET_API_VERSION) == 12 else "tcg"
    except OSError:
        return "tcg"
    finally:
        os.close(fd)


# --- process tracking -----------------------------------------------------------

_live: dict[int, "VM"] = {}  # pid -> VM, for the atexit sweep
_live_lock = threading.Lock()


@atexit.register
def _reap_all() -> None:
    with _live_lock:
        vms = list(_live.values())
    for vm in vms:
        try:
            vm.shutdown(timeout=3)
        except Exception:  # at exit, do what we can for the others
            pass


def _pdeathsig() -> None:
    # Runs in the child between fork and exec: if the Python process dies
    # without cleaning up (SIGKILL), the kernel sends QEMU SIGTERM.
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


_names = itertools.count()


@dataclass
class BgJob:
    """A command running in the background in the guest (see VM.run_bg)."""
    vm: "VM"
    id: str
    pid: int
    cmd: str

    @property
    def log(self) -> str:
        return f"/tmp/vfe-bg/{self.id}.log"

    @property
    def rc_file(self) -> str:
        return f"/tmp/vfe-bg/{self.id}.rc"

    def running(self) -> bool:
        rc, _ = self.vm.run(f"test ! -e {self.rc_file} && kill -0 {self.pid} 2>/dev/null")
        return rc == 0

    def output(self) -> str:
        return self.vm.run(f"cat {self.log}", check=True)[1]

    def wait(self, timeout: float = 60.0, poll: float = 0.2) -> int:
        """Wait for the job to end; return its exit status."""
        deadline = time.monotonic() + timeout
        while True:
            rc, out = self.vm.run(f"cat {self.rc_file} 2>/dev/null")
            if rc == 0 and out.strip():
                return int(out.strip())
            if time.monotonic() > deadline:
                raise GuestTimeout(f"background job {self.cmd!r} still running after {timeout}s")
            time.sleep(poll)

    def kill(self, sig: str = "TERM") -> None:
        """Signal the whole job. It is a session and process-group leader
        (setsid), so a negative pid reaches every process of it; the
        rc-writing shell dies too, so record 128+signal as a shell would."""
        self.vm.run(f"kill -s {sig} -- -{self.pid} 2>/dev/null || kill -s {sig} {self.pid}; "
                    f"sleep 0.1; [ -e {self.rc_file} ] || echo $((128 + $(kill -l {sig}))) "
                    f"> {self.rc_file}")


# --- the VM --------------------------------------------------------------------------

class VM:
    def __init__(self, name: str | None = None, workdir: str | Path | None = None,
                 memory_mb: int = 256, smp: int = 1,
                 nics: Sequence[NetDev] = (), blks: Sequence[BlkDev] = (),
                 extra_args: Sequence[str] = (), *, qmp: bool = False,
                 incoming: str | None = None, hotplug_ports: int = 0,
                 machine: str = "q35", accel: str | None = None,
                 image: guest_image.GuestImage | None = None,
                 kernel_args: str = "", prefer_elf: bool = True,
                 firmware: str | None = None):
        self.name = name or f"vm{next(_names)}"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ValueError(f"VM name {self.name!r}: use letters, digits, _ . -")
        # Without a workdir, start() makes a temp dir and shutdown() removes it.
        self._own_workdir = workdir is None
        self.workdir: Path | None = Path(workdir) if workdir else None
        self.memory_mb = memory_mb
        self.smp = smp
        self.nics = list(nics)
        self.blks = list(blks)
        self.extra_args = list(extra_args)
        self.qmp_enabled = qmp or incoming is not None
        self.incoming = incoming
        self.hotplug_ports = hotplug_ports
        self.machine = machine
        self.accel = accel or detect_accel()
        self.image = image
        self.kernel_args = kernel_args
        self.prefer_elf = prefer_elf
        # "seabios" (QEMU's default) or "qboot".
        self.firmware = firmware or os.environ.get("VFE_FIRMWARE") or "seabios"
        if self.firmware not in ("qboot", "seabios"):
            raise ValueError(f"firmware must be 'qboot' or 'seabios', not {self.firmware!r}")
        if hotplug_ports and not machine.startswith("q35"):
            raise ValueError("hotplug_ports needs a PCIe machine (q35)")
        for nic in self.nics:
            if (nic.mq if nic.mq is not None else nic.queues > 1) and nic.queues > smp:
                log.warning("%s: NIC with %d queue pairs but -smp %d: Linux enables only "
                            "min(pairs, CPUs) pairs", self.name, nic.queues, smp)

        self.rundir: Path | None = None  # short private dir for sockets
        self.proc: subprocess.Popen | None = None
        self.cmdline: list[str] = []
        self.console: ShellConsole | None = None
        self.monitor: Monitor | None = None
        self.boot_time: float | None = None
        self._t_start = 0.0
        self._bg_ids = itertools.count(1)

    def __repr__(self) -> str:
        state = "running" if self.alive() else "stopped"
        return f"<VM {self.name} pid={self.pid} {state} accel={self.accel}>"

    # --- command line ------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def serial_log(self) -> Path:
        """Everything the guest printed: kernel console and shell, merged."""
        assert self.workdir is not None, "not started"
        return self.workdir / f"{self.name}.serial.log"

    @property
    def qemu_log(self) -> Path:
        """QEMU's command line, stdout and stderr."""
        assert self.workdir is not None, "not started"
        return self.workdir / f"{self.name}.qemu.log"

    def _mac(self, index: int) -> str:
        # Distinct per VM name and test process; 52:54:00 is QEMU's prefix.
        h = zlib.crc32(f"{self.name}/{os.getpid()}".encode())
        return format_mac(bytes((0x52, 0x54, 0x00, h >> 8 & 0xFF, h & 0xFF, index & 0xFF)))

    def build_args(self) -> list[str]:
        """The QEMU command line (needs self.rundir and the image)."""
        assert self.rundir is not None and self.image is not None
        img, run = self.image, self.rundir
        accel = ["-accel", "kvm", "-cpu", "host"] if self.accel == "kvm" else \
            ["-accel", "tcg,thread=multi" if self.smp > 1 else "tcg"]
        a = [QEMU, "-name", self.name, "-nodefaults", "-no-user-config",
             "-display", "none", "-no-reboot",
             "-machine", self.machine, *accel,
             *(["-bios", QBOOT] if self.firmware == "qboot" else []),
             "-smp", str(self.smp), "-m", f"{self.memory_mb}M",
             # vhost-user backends map guest RAM: it must be a shareable fd.
             "-object", f"memory-backend-memfd,id=mem0,size={self.memory_mb}M,share=on",
             "-numa", "node,memdev=mem0",
             "-kernel", str(img.kernel(self.prefer_elf)), "-initrd", str(img.initrd),
             "-append", f"{KERNEL_ARGS} vfe.name={self.name} {self.kernel_args}".strip(),
             # ttyS0: kernel console, logged only. ttyS1: the driven shell.
             "-chardev", f"file,id=con0,path={_opt(self.serial_log)},append=on",
             "-serial", "chardev:con0",
             "-chardev", f"socket,id=sh0,path={_opt(run / 'shell.sock')},server=on,wait=off,"
                         f"logfile={_opt(self.serial_log)},logappend=on",
             "-serial", "chardev:sh0"]
        if self.qmp_enabled:
            a += ["-chardev", f"socket,id=qmp0,path={_opt(run / 'qmp.sock')},server=on,wait=off",
                  "-mon", "chardev=qmp0,mode=control"]
        for i in range(self.hotplug_ports):
            a += ["-device", f"pcie-root-port,id=hp{i},bus=pcie.0,chassis={i + 1},"
                             f"port={0x10 + i},addr={0x10 + i:#x}"]
        for i, nic in enumerate(self.nics):
            a += self._nic_args(i, nic)
        for i, blk in enumerate(self.blks):
            srv = (",server=on,wait=off" if blk.server
                   else (f",reconnect={blk.reconnect}" if blk.reconnect else ""))
            a += ["-chardev", f"socket,id=vblk{i},path={_opt(blk.socket)}{srv}",
                  "-device", f"vhost-user-blk-pci,id=blk{i},chardev=vblk{i},"
                             f"num-queues={blk.num_queues},queue-size={blk.queue_size}"
                             + (f",{blk.extra}" if blk.extra else "")]
        if self.incoming:
            a += ["-incoming", self.incoming]
        return a + self.extra_args

    def _nic_args(self, i: int, nic: NetDev) -> list[str]:
        mq = nic.mq if nic.mq is not None else nic.queues > 1
        # TCG + vhost-user-net + MSI-X crashes QEMU 7.2 (facts.md): INTx there.
        vectors = 2 * nic.queues + 2 if self.accel == "kvm" else 0
        srv = ",server=on,wait=off" if nic.server else (f",reconnect={nic.reconnect}" if nic.reconnect else "")
        dev = (f"virtio-net-pci,id=nic{i},netdev=net{i},mac={nic.mac or self._mac(i)},"
               f"mq={'on' if mq else 'off'},vectors={vectors},"
               f"rx_queue_size={nic.queue_size},tx_queue_size={nic.queue_size},romfile=")
        if nic.extra:
            dev += "," + nic.extra
        return ["-chardev", f"socket,id=vnet{i},path={_opt(nic.socket)}{srv}",
                "-netdev", f"vhost-user,id=net{i},chardev=vnet{i},queues={nic.queues}",
                "-device", dev]

    # --- lifecycle ----------------------------------------------------------------

    def start(self) -> "VM":
        if self.proc is not None:
            raise VMError(f"{self.name} already started")
        if self.image is None:
            self.image = guest_image.build()
        for nic in self.nics:
            check_sun_path(nic.socket)          # SocketPathTooLong, a ValueError
            if not nic.server and not os.path.exists(nic.socket):
                # QEMU as vhost-user client fails at once without it (facts.md).
                log.warning("%s: %s does not exist yet; QEMU will fail to connect",
                            self.name, nic.socket)
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"vfe-{self.name}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        for f in (self.serial_log, self.qemu_log):
            f.unlink(missing_ok=True)
        self.rundir = Path(tempfile.mkdtemp(prefix=f"vfe-vm-{self.name[:20]}-", dir="/tmp"))
        self.cmdline = self.build_args()
        log.info("%s: %s", self.name, shlex.join(self.cmdline))
        try:
            with open(self.qemu_log, "wb") as qlog:
                qlog.write(f"# {shlex.join(self.cmdline)}\n".encode())
                qlog.flush()
                self._t_start = time.monotonic()
                main_thread = threading.current_thread() is threading.main_thread()
                # PDEATHSIG fires when the forking *thread* exits, so only
                # from the main thread (a VM started from a pool must outlive it).
                self.proc = subprocess.Popen(
                    self.cmdline, stdin=subprocess.DEVNULL, stdout=qlog,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # ^C in a terminal reaches us, not QEMU
                    preexec_fn=_pdeathsig if main_thread else None)
        except OSError as e:
            self.shutdown()
            raise VMError(f"{self.name}: cannot run {QEMU}: {e}") from None
        with _live_lock:
            _live[self.proc.pid] = self
        self.console = ShellConsole(str(self.rundir / "shell.sock"), self.name)
        try:
            self.console.connect(timeout=30, alive=lambda: self.proc.poll() is None)
        except ConsoleError as e:
            tail = self.qemu_log_tail()  # before shutdown() may remove the workdir
            self.shutdown()
            raise VMError(f"{self.name}: {e}\n{tail}") from None
        if self.qmp_enabled:
            self.monitor = Monitor(str(self.rundir / "qmp.sock"), self.name)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_booted(self, timeout: float = 60.0) -> float:
        """Wait for the guest shell; return seconds since start()."""
        if self.console is None:
            raise VMError(f"{self.name} not started")
        try:
            self.console.wait_ready(timeout)
            self.console.run("true", timeout=max(5.0, timeout / 4))
        except (ConsoleError, GuestTimeout) as e:
            raise VMError(f"{self.name} did not boot: {e}\n{self.qemu_log_tail()}\n"
                          f"--- serial log tail ---\n{self.serial_tail()}") from None
        self.boot_time = time.monotonic() - self._t_start
        log.info("%s: booted in %.2fs", self.name, self.boot_time)
        return self.boot_time

    def shutdown(self, timeout: float = 10.0) -> int | None:
        """Stop the VM: poweroff in the guest if it runs, else QMP quit, then
        SIGTERM and SIGKILL by PID. Removes sockets; keeps logs (unless the
        workdir was our own temp dir). Returns QEMU's exit status."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            self._stop_gently(proc, timeout)
            for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
                if proc.poll() is not None:
                    break
                log.info("%s: sending %s to QEMU %d", self.name, sig.name, proc.pid)
                try:
                    os.kill(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(wait)
                except subprocess.TimeoutExpired:
                    pass
        if proc is not None:
            with _live_lock:
                _live.pop(proc.pid, None)
        if self.console is not None:
            self.console.close()
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
        if self.rundir is not None:
            shutil.rmtree(self.rundir, ignore_errors=True)
            self.rundir = None
        if self._own_workdir and self.workdir and not os.environ.get("VFE_KEEP_VM_FILES"):
            shutil.rmtree(self.workdir, ignore_errors=True)
        return proc.returncode if proc is not None else None

    def _stop_gently(self, proc: subprocess.Popen, timeout: float) -> None:
        running = self.boot_time is not None
        qmp_answers = False
        if self.monitor is not None:
            # A paused VM (migration source, -incoming destination) cannot
            # run poweroff: ask QEMU itself. No answer at all (QEMU blocked
            # waiting for a server=on vhost-user peer): leave it to signals.
            try:
                running = self.monitor.command("query-status", timeout=2)["status"] == "running"
                qmp_answers = True
            except Exception:
                pass
        if running and self.boot_time is not None and self.console and not self.console.closed:
            try:
                # poweroff -f: no process teardown, straight to ACPI S5.
                self.console.send(b"poweroff -f\n")
                proc.wait(timeout)
                return
            except (ConsoleError, OSError, subprocess.TimeoutExpired):
                pass
        if qmp_answers:
            try:
                self.monitor.command("quit", timeout=2)
            except Exception:  # the reply races QEMU's exit
                pass
            try:
                proc.wait(min(timeout, 5))
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self) -> "VM":
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # --- guest commands ------------------------------------------------------------

    def run(self, cmd: str, timeout: float = 30.0, check: bool = False) -> tuple[int, str]:
        """Run ``cmd`` with the guest's sh; return (exit status, output).

        stdout and stderr are merged; stdin is /dev/null; each call runs in
        its own ``sh -c`` (no state such as cd or variables carries over).
        Raises GuestTimeout after ``timeout`` s (the command is then killed
        with ^C and the guest shell restarted), VMError with check=True
        and a non-zero status."""
        if self.console is None:
            raise VMError(f"{self.name} not started")
        try:
            rc, out = self.console.run(cmd, timeout)
        except ConsoleError as e:
            raise VMError(f"{self.name}: {e}\n{self.qemu_log_tail()}") from None
        log.debug("%s$ %s -> %d", self.name, cmd, rc)
        if check and rc != 0:
            raise VMError(f"{self.name}: {cmd!r} exited {rc}:\n{out}")
        return rc, out

    def run_bg(self, cmd: str, console: bool = False) -> BgJob:
        """Start ``cmd`` in the background in its own session (a run() that
        times out cannot hit it). Its output goes to a file in the guest
        (BgJob.output()), and also to the serial log with console=True, so
        ``wait_for`` can watch it. stdin is /dev/null, which makes busybox
        ``nc -l`` hang up at once: use the guest's ``vfe-recv`` for that."""
        jid = f"{os.getpid()}-{next(self._bg_ids)}"
        job = BgJob(self, jid, 0, cmd)
        done = f"echo $? > {job.rc_file}.tmp; mv {job.rc_file}.tmp {job.rc_file}"
        if console:
            body = f"set -o pipefail\n( {cmd}\n) 2>&1 | tee {job.log} > /dev/console\n{done}"
            redirect = ">/dev/null 2>&1"
        else:
            body = f"( {cmd}\n)\n{done}"  # a subshell: an exit in cmd still records rc
            redirect = f">{job.log} 2>&1"
        # setsid: own session and process group, so the ^C that aborts a
        # timed-out run() does not reach it, and BgJob.kill() gets it all.
        launch = f"setsid sh -c {shell_quote(body)} </dev/null {redirect} & echo $!"
        rc, out = self.run(f"mkdir -p /tmp/vfe-bg && {launch}", check=True)
        job.pid = int(out.strip().splitlines()[-1])
        return job

    # --- logs ----------------------------------------------------------------------------

    def log_mark(self) -> int:
        """Current size of the serial log, to pass as wait_for(since=...)."""
        if self.workdir is None:
            return 0
        try:
            return self.serial_log.stat().st_size
        except FileNotFoundError:
            return 0

    def wait_for(self, pattern: str | re.Pattern, timeout: float = 30.0,
                 since: int = 0) -> re.Match:
        """Wait until ``pattern`` (regex) appears in the serial log after
        byte offset ``since``; return the match."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            try:
                with open(self.serial_log, "rb") as f:
                    f.seek(since)
                    text = f.read().decode(errors="replace").replace("\r", "")
            except FileNotFoundError:
                text = ""
            m = rx.search(text)
            if m:
                return m
            if not self.alive():
                raise VMError(f"{self.name}: QEMU exited while waiting for {rx.pattern!r}\n"
                              f"{self.qemu_log_tail()}")
            if time.monotonic() > deadline:
                raise GuestTimeout(f"{self.name}: {rx.pattern!r} not in serial log "
                                   f"after {timeout}s", text[-2000:])
            time.sleep(0.05)

    def serial_tail(self, n: int = 30) -> str:
        if self.workdir is None:
            return ""
        try:
            lines = self.serial_log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-n:])

    def qemu_log_tail(self, n: int = 20) -> str:
        if self.workdir is None:
            return ""
        try:
            lines = self.qemu_log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "--- qemu log tail ---\n" + "\n".join(lines[-n:])

    # --- QMP -----------------------------------------------------------------------------

    def qmp_command(self, cmd: str, **args: Any) -> Any:
        """Run a QMP command; hyphenated argument names go in as
        ``**{"max-bandwidth": n}``. Raises ExecuteError on a QMP error."""
        if self.monitor is None:
            raise VMError(f"{self.name}: started without qmp=True")
        return self.monitor.command(cmd, args)

    def qmp_wait_event(self, name: str | None = None, timeout: float = 60.0) -> dict:
        if self.monitor is None:
            raise VMError(f"{self.name}: started without qmp=True")
        return self.monitor.wait_event(name, timeout)
