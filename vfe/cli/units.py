"""`vfe-systemd-units`: write the systemd units of this installation.

    vfe-systemd-units [--dir /etc/systemd/system] [--bindir DIR]
    vfe-systemd-units --print virtio-net-controller

The units ship as templates (vfe/data/*.service.in) whose ExecStart names
@BINDIR@: installed into a venv, with pip --user or system-wide, the
console scripts live in different places, and a unit that names the wrong
one fails at boot.  The bin directory is this interpreter's scripts
directory (sysconfig), where pip put virtio-net-controller; --bindir
overrides it.  Every entry point a unit starts must exist there.
"""
from __future__ import annotations

import argparse
import os
import sys
import sysconfig
from importlib import resources
from pathlib import Path

UNITS = ("virtio-net-controller", "vfe-vhostd")
DEFAULT_DIR = "/etc/systemd/system"


class UnitError(Exception):
    pass


def template(unit: str) -> str:
    return resources.files("vfe").joinpath("data", f"{unit}.service.in").read_text()


def default_bindir() -> Path:
    return Path(sysconfig.get_path("scripts"))


def render(unit: str, bindir: Path) -> str:
    """The unit's text for console scripts in `bindir` (absolute, and the
    program the unit starts must be an executable there)."""
    if not bindir.is_absolute():
        raise UnitError(f"--bindir {bindir}: systemd needs an absolute path")
    program = bindir / unit
    if not os.access(program, os.X_OK):
        raise UnitError(f"{program} is not an executable: install vfe (pip install .) or give "
                        f"--bindir the directory holding {unit}")
    return template(unit).replace("@BINDIR@", str(bindir))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vfe-systemd-units",
        description="Write virtio-net-controller.service and vfe-vhostd.service for this "
                    "installation's entry points.")
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"where to write them (default {DEFAULT_DIR})")
    p.add_argument("--bindir", type=Path, default=None,
                   help=f"where the console scripts are (default: this python's, {default_bindir()})")
    p.add_argument("--print", dest="show", choices=UNITS, metavar="UNIT",
                   help=f"print one unit ({' or '.join(UNITS)}) instead of writing files")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bindir = args.bindir or default_bindir()
    try:
        if args.show:
            sys.stdout.write(render(args.show, bindir))
            return 0
        texts = {unit: render(unit, bindir) for unit in UNITS}     # all checked before any is written
        out = Path(args.dir)
        for unit, text in texts.items():
            path = out / f"{unit}.service"
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
            print(f"wrote {path} (ExecStart={bindir / unit})")
    except UnitError as exc:
        print(f"vfe-systemd-units: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"vfe-systemd-units: {exc.filename or args.dir}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print("then: systemctl daemon-reload && systemctl enable --now virtio-net-controller")
    return 0


if __name__ == "__main__":
    sys.exit(main())
