"""`vfe-mlxconfig`: the emulated DPU's firmware configuration, like mlxconfig.

    vfe-mlxconfig [-d DEVICE] q [KEY ...]            show Default / Current / Next Boot
    vfe-mlxconfig -d DEVICE [-y] s KEY=VAL [...]     set next-boot values
    vfe-mlxconfig -d DEVICE [-y] r                   next-boot values back to defaults
    vfe-mlxconfig [-d DEVICE] i                      the parameters, their ranges and meaning

New values apply when virtio-net-controller next starts (vfe's "cold
reboot").  The state lives under $VFE_ROOT (default /) in var/lib/vfe, or
--state-dir.  Errors print "-E- ..." to stderr and exit 1 with nothing
written.  The confirmation is read from the terminal, from a pipe
(`yes | vfe-mlxconfig ...`) or answered by -y, as with mlxconfig.
"""
from __future__ import annotations

import argparse
import sys

from vfe.controller.nvconfig import (DEFAULT_DEVICE, DEVICES, NvConfig, NvConfigError, Param,
                                     canonical_device, lookup)
from vfe.controller.paths import Paths

DEVICE_TYPE = "BlueField2"
NAME = "vfe emulated DPU"
DESCRIPTION = "BlueField-2 DPU emulated in software by vfe (virtio-net over vhost-user)"
APPLY_PROMPT = " Apply new Configuration? (y/n) [n] : "
REBOOT_NOTE = "-I- Please reboot machine to load new configurations."
VFE_NOTE = ("-I- vfe: the new values take effect when virtio-net-controller next starts "
            "(systemctl restart virtio-net-controller).")


class UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vfe-mlxconfig",
        description="Query and set the emulated DPU's firmware (NV) configuration, like mlxconfig. "
                    "New values apply when virtio-net-controller next starts.")
    p.add_argument("-d", "--dev", dest="device", metavar="DEVICE",
                   help=f"device: {DEVICES[0]} (port 0, all parameters) or {DEVICES[1]} (port 1, "
                        f"per-port parameters); the PCI address 03:00.0 / 03:00.1 or the RDMA "
                        f"device mlx5_0 / mlx5_1 also work")
    p.add_argument("-y", "--yes", action="store_true", help="answer yes to the confirmation")
    p.add_argument("-e", "--enable_verbosity", action="store_true",
                   help="accepted for mlxconfig compatibility (q always shows Default, Current, Next Boot)")
    p.add_argument("--root", help="prefix for every path (default: $VFE_ROOT or /)")
    p.add_argument("--state-dir", help="the state directory (default: <root>/var/lib/vfe)")
    p.add_argument("command", choices=["q", "query", "s", "set", "r", "reset", "i", "show_confs"],
                   help="q: query; s: set KEY=VAL...; r: reset to defaults; i: describe parameters")
    p.add_argument("params", nargs="*", metavar="KEY[=VAL]")
    return p


def _header(n: int, device: str) -> list[str]:
    return ["", f"Device #{n}:", "-" * (len(f"Device #{n}:")), "",
            f"{'Device type:':<16}{DEVICE_TYPE}", f"{'Name:':<16}{NAME}",
            f"{'Description:':<16}{DESCRIPTION}", f"{'Device:':<16}{device}", ""]


def _table(headers: list[str], rows: list[tuple[str, str, list[str]]]) -> list[str]:
    """rows: (mark, name, values)."""
    name_w = max([len(r[1]) for r in rows] + [30]) + 4
    val_w = max([len(v) for r in rows for v in r[2]] + [len(h) for h in headers]) + 3
    lines = [f"{'Configurations:':<{9 + name_w}}" + "".join(f"{h:<{val_w}}" for h in headers).rstrip()]
    for mark, name, values in rows:
        lines.append(f"{mark:<9}{name:<{name_w}}" + "".join(f"{v:<{val_w}}" for v in values).rstrip())
    return lines


def _query(nv: NvConfig, n: int, keys: list[str]) -> list[str]:
    params = [lookup(k, nv.device) for k in keys] if keys else list(nv.params)
    rows = []
    for p in params:
        d, c, x = p.default, nv.current[p.name], nv.next[p.name]
        mark = "*" if (x != d or x != c) else ""
        rows.append((mark, p.name, [p.show(d), p.show(c), p.show(x)]))
    out = _header(n, nv.device) + _table(["Default", "Current", "Next Boot"], rows)
    if any(r[0] for r in rows):
        out.append("The '*' shows parameters with next value different from default/current value.")
    return out


def _describe(nv: NvConfig) -> list[str]:
    out = [f"Parameters of {nv.device}:", ""]
    for p in nv.params:
        rng = _range(p)
        tag = " [vfe only]" if p.vfe_only else ""
        scope = "per port" if p.port else "global"
        out.append(f"  {p.name}={rng}  (default {p.show(p.default)}, {scope}){tag}")
        if p.help:
            out.append(f"        {p.help}")
    return out


def _range(p: Param) -> str:
    if p.kind == "bool":
        return "<False|True>"
    if p.kind == "enum":
        return "<" + "|".join(v for _, v in sorted(p.labels.items())) + ">"
    step = f" step {p.step}" if p.step > 1 else ""
    return f"<{p.lo}..{p.hi}{step}>"


def _parse_assignments(params: list[str]) -> list[tuple[str, str]]:
    if not params:
        raise UsageError("s needs at least one KEY=VAL")
    out = []
    for item in params:
        key, eq, val = item.partition("=")
        if not eq or not key or not val:
            raise UsageError(f"Bad configuration format {item!r}: use KEY=VAL")
        out.append((key, val))
    return out


def _piped_answer(args) -> str | None:
    """The answer a pipe gives (`yes | vfe-mlxconfig ... s ...`, as with
    mlxconfig), read before anything is printed: a pipe that ends without
    one is refused up front, so nothing is shown or written.  None when -y
    answers or a person at a terminal will."""
    if args.yes:
        return None
    stdin = sys.stdin
    if stdin is not None and stdin.isatty():
        return None
    answer = stdin.readline() if stdin is not None else ""
    if not answer:
        raise UsageError("no answer to the confirmation on stdin (it is not a terminal and "
                         "ended): pipe one in (yes | vfe-mlxconfig ...) or add -y")
    return answer


def _confirm(args, prompt: str, piped: str | None, out) -> bool:
    if args.yes:
        out.write(prompt + "y\n")
        return True
    if piped is not None:
        answer = piped
        out.write(prompt + answer.strip() + "\n")   # echoed: the transcript reads like a terminal's
    else:
        out.write(prompt)
        out.flush()
        answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out, err = sys.stdout, sys.stderr
    try:
        return _run(args, out)
    except (NvConfigError, UsageError) as exc:
        err.write(f"-E- {exc}\n")
        return 1
    except OSError as exc:
        err.write(f"-E- {exc.filename or ''}: {exc.strerror or exc}\n")
        return 1


def _run(args, out) -> int:
    state_dir = Paths.from_env(root=args.root, state_dir=args.state_dir).state_dir
    cmd = {"query": "q", "set": "s", "reset": "r", "show_confs": "i"}.get(args.command, args.command)
    if args.device is None and cmd in ("s", "r"):
        raise UsageError(f"Please specify a device with -d (e.g. -d {DEFAULT_DEVICE})")
    devices = [canonical_device(args.device)] if args.device else list(DEVICES)

    if cmd == "q":
        lines: list[str] = []
        for n, dev in enumerate(devices, 1):
            lines += _query(NvConfig.load(state_dir, dev), n, args.params)
        out.write("\n".join(lines) + "\n")
        return 0
    if cmd == "i":
        if args.params:
            raise UsageError("i takes no parameters")
        out.write("\n".join(_describe(NvConfig.load(state_dir, devices[0]))) + "\n")
        return 0

    nv = NvConfig.load(state_dir, devices[0])
    if cmd == "r":
        if args.params:
            raise UsageError("r takes no parameters")
        piped = _piped_answer(args)
        out.write("\n".join(_header(1, nv.device)) + "\n")
        if not _confirm(args, f" Reset configuration for device {nv.device}? (y/n) [n] : ", piped, out):
            out.write("-I- Aborted by user.\n")
            return 1
        nv.reset()
        out.write("Applying... Done!\n" + REBOOT_NOTE + "\n" + VFE_NOTE + "\n")
        return 0

    # s: validate everything before showing or writing anything
    pairs = _parse_assignments(args.params)
    updates: dict[str, str] = {}
    errors: list[str] = []
    for key, val in pairs:
        try:
            p = lookup(key, nv.device)
            p.parse(val)
        except NvConfigError as exc:
            errors.append(str(exc))
            continue
        if p.name in updates:
            errors.append(f"{p.name} is given twice")
        updates[p.name] = val
    if errors:
        raise UsageError("\n-E- ".join(errors))
    parsed, warnings = nv.check(updates)
    piped = _piped_answer(args)
    rows = [("", k, [nv.show(k, nv.next[k]), nv.show(k, v)]) for k, v in parsed.items()]
    out.write("\n".join(_header(1, nv.device) + _table(["Next Boot", "New"], rows)) + "\n")
    for w in warnings:
        out.write(f"-W- {w}\n")
    out.write("\n")
    if not _confirm(args, APPLY_PROMPT, piped, out):
        out.write("-I- Aborted by user.\n")
        return 1
    nv.set(parsed)
    out.write("Applying... Done!\n" + REBOOT_NOTE + "\n" + VFE_NOTE + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
