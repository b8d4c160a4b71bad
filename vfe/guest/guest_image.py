"""Build the vfe test guest: a Debian kernel plus a busybox initramfs.

    python3 -m vfe.guest.guest_image [--dir DIR] [--force]

Cache layout (default <repo>/.guest, or $VFE_GUEST_DIR):

    kernel/<version>/root/...     the unpacked linux-image .deb (+ depmod)
    kernel/<version>/stamp        written last: the kernel step is complete
    vmlinuz                       the bzImage (symlink into root/boot)
    vmlinux                       ELF extracted from it (PVH boot, faster on TCG)
    initrd.img                    gzip'd newc cpio: busybox, virtio modules, /init,
                                  the guest tools (vfe/guest/files/*.c, built static)
    stamp                         builder version + hash of every input

Nothing is installed on the host: the kernel package is only downloaded and
unpacked. Both steps are idempotent; a lock file serializes concurrent
builders (parallel test sessions).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from vfe.guest import initramfs, vmlinux
from vfe.progressline import ProgressLine

# Bump when the layout of the image changes in a way the input hash misses.
BUILDER_VERSION = "vfe-guest-4"

REPO = Path(__file__).resolve().parents[2]
GUEST_FILES = Path(__file__).resolve().parent / "files"
KERNEL_META_PACKAGE = "linux-image-amd64"

# Wanted in the guest, in load order. Some may be built in (=y) in another
# kernel version: those are skipped; dependencies come from modules.dep.
VIRTIO_MODULES = [
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
    "virtio_pci", "failover", "net_failover", "virtio_net", "virtio_blk",
]
BUSYBOX = Path("/bin/busybox")
# C tools of the guest (files/NAME.c -> /bin/NAME), linked static: the
# initramfs has no libc.  Needs gcc and glibc's static libc.a (libc6-dev).
CC = os.environ.get("VFE_GUEST_CC", "gcc")
CFLAGS = ["-O2", "-static", "-pthread", "-s", "-Wall"]


@dataclass(frozen=True)
class GuestImage:
    dir: Path
    kernel_version: str
    bzimage: Path
    vmlinux: Path | None  # None if extraction failed: boot the bzImage then
    initrd: Path
    modules: tuple[str, ...]  # load order, paths relative to lib/modules/<ver>

    def kernel(self, prefer_elf: bool = True) -> Path:
        """The kernel to pass to -kernel: the ELF vmlinux if we have it."""
        if prefer_elf and self.vmlinux is not None and self.vmlinux.exists():
            return self.vmlinux
        return self.bzimage

    def as_dict(self) -> dict:
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def default_dir() -> Path:
    if os.environ.get("VFE_GUEST_DIR"):
        return Path(os.environ["VFE_GUEST_DIR"])
    if (REPO / "pyproject.toml").exists():  # a source checkout (editable install)
        return REPO / ".guest"
    return Path.home() / ".cache" / "vfe" / "guest"


# the build's steps: one terminal line, redrawn; nothing in a log or a pipe
_steps = ProgressLine("guest image", sys.stderr)


def log(msg: str) -> None:
    _steps.step(msg)


def warn(msg: str) -> None:
    """What the user should know whatever stderr is."""
    _steps.close()
    print(f"guest-image: {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], **kw) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


# --- kernel -----------------------------------------------------------------

def resolve_kernel_package() -> str:
    """linux-image-amd64 is a metapackage: return the real image it pulls in."""
    out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE])
    found = re.findall(r"Depends:\s*(linux-image-[0-9][^\s]*-amd64)\b", out)
    if not found:
        raise RuntimeError(f"cannot resolve {KERNEL_META_PACKAGE}; run apt-get update?\n{out}")
    return found[0]


def _installed_kernels(cache: Path) -> list[str]:
    kdir = cache / "kernel"
    if not kdir.is_dir():
        return []
    return sorted(p.name for p in kdir.iterdir() if (p / "stamp").exists())


def fetch_kernel(cache: Path, force: bool = False) -> str:
    """Download and unpack the kernel if needed; return its version (uname -r)."""
    have = _installed_kernels(cache)
    if have and not force:
        return have[-1]
    package = resolve_kernel_package()
    version = package.removeprefix("linux-image-")
    dest = cache / "kernel" / version
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    log(f"downloading {package}")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = ["apt-get", "download", "-q", package]
        if os.geteuid() == 0:
            # apt drops to user _apt, which can't write into our temp dir.
            cmd[1:1] = ["-o", "APT::Sandbox::User=root"]
        _run(cmd, cwd=tmp)
        debs = list(Path(tmp).glob("*.deb"))
        if len(debs) != 1:
            raise RuntimeError(f"apt-get download gave {debs}")
        log(f"unpacking {debs[0].name}")
        _run(["dpkg-deb", "-x", str(debs[0]), str(dest / "root")])
    # The .deb ships no modules.dep; depmod -b works on the unpacked tree.
    _run(["depmod", "-b", str(dest / "root"), version])
    (dest / "stamp").write_text(package + "\n")
    # Drop older kernels so the cache holds one.
    for old in _installed_kernels(cache):
        if old != version:
            shutil.rmtree(cache / "kernel" / old)
    return version


def _module_root(cache: Path, version: str) -> Path:
    root = cache / "kernel" / version / "root"
    for sub in ("lib/modules", "usr/lib/modules"):  # merged-/usr or not
        if (root / sub / version).is_dir():
            return root / sub / version
    raise RuntimeError(f"no modules for {version} under {root}")


def module_load_order(modroot: Path, wanted: list[str]) -> list[str]:
    """Paths (relative to modroot) of ``wanted`` + dependencies, deps first."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (modroot / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[_modname(path)] = path
    builtin = {_modname(line) for line in (modroot / "modules.builtin").read_text().split()}
    order: list[str] = []

    def visit(path: str, chain: tuple[str, ...] = ()) -> None:
        if path in order or path in chain:
            return
        # modules.dep lists all (transitive) deps; visiting them first and in
        # reverse mirrors modprobe, which loads from the end of the list.
        for dep in reversed(deps.get(path, [])):
            visit(dep, chain + (path,))
        order.append(path)

    for name in wanted:
        name = name.replace("-", "_")
        if name in by_name:
            visit(by_name[name])
        elif name not in builtin:
            raise RuntimeError(f"module {name} is neither built in nor in modules.dep")
    return order


def _modname(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    base = re.sub(r"\.ko(\.(xz|zst|gz))?$", "", base)
    return base.replace("-", "_")


# --- initramfs --------------------------------------------------------------

def _busybox_applets() -> list[str]:
    out = _run([str(BUSYBOX), "--list-full"])
    return [line.strip() for line in out.splitlines() if line.strip()]


def _check_static(path: Path, hint: str = "install busybox-static") -> None:
    # An initramfs without a libc needs static programs (busybox-static).
    data = path.read_bytes()[:4096]
    if b"/lib64/ld-linux" in data or b"/lib/ld-linux" in data:
        raise RuntimeError(f"{path} is dynamically linked: {hint}")


def guest_tool_sources() -> list[Path]:
    return sorted(GUEST_FILES.glob("*.c"))


def compiler_identity() -> str:
    """The C compiler's version line (part of the inputs hash)."""
    if shutil.which(CC) is None:
        names = ", ".join(p.name for p in guest_tool_sources())
        raise RuntimeError(f"{CC} not found: the guest tools ({names}) need gcc and a static "
                           f"libc (apt-get install gcc libc6-dev; scripts/setup does)")
    return _run([CC, "--version"]).splitlines()[0]


def build_tool(src: Path, out: Path) -> None:
    """Compile one guest tool, statically linked; fail with the reason."""
    proc = subprocess.run([CC, *CFLAGS, "-o", str(out), str(src)], capture_output=True, text=True)
    if proc.returncode != 0:
        err = proc.stderr.strip()
        hint = ""
        if "cannot find -lc" in err or "cannot find -lpthread" in err:
            hint = "\nno static libc: apt-get install libc6-dev (scripts/setup does)"
        elif "No such file or directory" in err and "#include" in err:
            hint = "\nmissing headers: apt-get install libc6-dev linux-libc-dev"
        raise RuntimeError(f"building guest tool {src.name} failed "
                           f"({CC} {' '.join(CFLAGS)}):\n{err}{hint}")
    _check_static(out, f"{CC} ignored -static")


def build_initramfs(out: Path, modroot: Path, modules: list[str]) -> None:
    _check_static(BUSYBOX)
    tools: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="vfe-guest-tools-") as tmp:
        for src in guest_tool_sources():
            exe = Path(tmp) / src.stem
            build_tool(src, exe)
            tools[src.stem] = exe.read_bytes()
    fs = initramfs.Initramfs()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp",
              "run", "root", "etc/vfe", "var/tmp", "mnt"):
        fs.mkdir(d)
    # The kernel opens /dev/console for init's stdio before devtmpfs exists.
    fs.chardev("dev/console", 5, 1)
    fs.chardev("dev/null", 1, 3, 0o666)
    fs.add_host_file("bin/busybox", BUSYBOX, 0o755)
    for applet in _busybox_applets():
        if applet.lstrip("/") not in ("bin/busybox", "init", "linuxrc"):
            fs.symlink(applet, "/bin/busybox")
    fs.add_host_file("init", GUEST_FILES / "init", 0o755)
    for script in sorted(GUEST_FILES.glob("vfe-*")):
        if script.suffix != ".c":
            fs.add_host_file(f"bin/{script.name}", script, 0o755)
    for name, data in tools.items():
        fs.add_file(f"bin/{name}", data, 0o755)
    version = modroot.name
    for rel in modules:
        fs.add_host_file(f"lib/modules/{version}/{rel}", modroot / rel, 0o644)
    fs.add_file("etc/vfe/modules", "".join(m + "\n" for m in modules).encode())
    fs.add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    fs.add_file("etc/group", b"root:x:0:\n")
    fs.add_file("etc/hosts", b"127.0.0.1 localhost\n")
    fs.write(out)


def _inputs_hash(version: str, modroot: Path, modules: list[str]) -> str:
    h = hashlib.sha256()
    h.update(f"{BUILDER_VERSION}\n{version}\n".encode())
    if guest_tool_sources():  # the sources are among GUEST_FILES below
        h.update(f"{compiler_identity()} {' '.join(CFLAGS)}\n".encode())
    files = [BUSYBOX, *sorted(GUEST_FILES.iterdir()), Path(initramfs.__file__)]
    files += [modroot / m for m in modules]
    for f in files:
        h.update(f"{f.name}\n".encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


# --- orchestration ----------------------------------------------------------

def build(directory: Path | str | None = None, force: bool = False,
          extra_modules: list[str] | None = None) -> GuestImage:
    """Build (or reuse) the guest image in ``directory``; return its paths."""
    cache = Path(directory) if directory else default_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock, contextlib.closing(_steps):
        fcntl.flock(lock, fcntl.LOCK_EX)
        version = fetch_kernel(cache, force=force)
        modroot = _module_root(cache, version)
        kroot = cache / "kernel" / version / "root"
        bz_src = next((kroot / "boot").glob(f"vmlinuz-{version}"))

        bzimage = cache / "vmlinuz"
        if not bzimage.exists() or bzimage.resolve() != bz_src.resolve():
            bzimage.unlink(missing_ok=True)
            bzimage.symlink_to(bz_src.relative_to(cache))

        elf = _ensure_vmlinux(cache, bz_src, version, force)

        modules = module_load_order(modroot, VIRTIO_MODULES + list(extra_modules or []))
        initrd = cache / "initrd.img"
        stamp = cache / "stamp"
        digest = _inputs_hash(version, modroot, modules)
        if force or not initrd.exists() or not stamp.exists() or stamp.read_text().strip() != digest:
            log(f"building initramfs ({len(modules)} modules)")
            build_initramfs(initrd, modroot, modules)
            stamp.write_text(digest + "\n")
        return GuestImage(dir=cache, kernel_version=version, bzimage=bzimage,
                          vmlinux=elf, initrd=initrd, modules=tuple(modules))


def _ensure_vmlinux(cache: Path, bz_src: Path, version: str, force: bool) -> Path | None:
    """Extract the ELF kernel once per kernel version; None if impossible."""
    elf = cache / "vmlinux"
    stamp = cache / "vmlinux.stamp"
    if not force and elf.exists() and stamp.exists() and stamp.read_text() == version:
        return elf
    if stamp.exists() and stamp.read_text() == f"none {version}" and not force:
        return None  # tried before for this kernel: it has no usable ELF
    log("extracting ELF vmlinux from the bzImage")
    try:
        vmlinux.extract_file(bz_src, elf)
        if not vmlinux.has_pvh_note(elf.read_bytes()):
            raise vmlinux.ExtractError("vmlinux has no PVH entry note (CONFIG_PVH=n)")
    except vmlinux.ExtractError as e:
        warn(f"no ELF vmlinux ({e}); guests will boot the bzImage")
        elf.unlink(missing_ok=True)
        stamp.write_text(f"none {version}")
        return None
    stamp.write_text(version)
    return elf


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m vfe.guest.guest_image",
                                 description="Build the vfe test guest (kernel + initramfs).")
    ap.add_argument("--dir", type=Path, default=None, help=f"cache dir (default {default_dir()})")
    ap.add_argument("--force", action="store_true", help="re-download and rebuild everything")
    ap.add_argument("--json", action="store_true", help="print the paths as JSON")
    args = ap.parse_args(argv)
    img = build(args.dir, force=args.force)
    if args.json:
        print(json.dumps(img.as_dict(), indent=2))
    else:
        print(f"kernel version: {img.kernel_version}")
        print(f"vmlinux (ELF):  {img.vmlinux or '(none, using bzImage)'}")
        print(f"bzImage:        {img.bzimage}")
        print(f"initrd:         {img.initrd}")
        print(f"modules:        {' '.join(Path(m).stem for m in img.modules)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
