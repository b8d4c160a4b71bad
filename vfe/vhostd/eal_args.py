"""The DPDK EAL part of dpdk-vfe-vdpa's command line, so that the seed's

    dpdk-vfe-vdpa -a 0000:00:00.0 --log-level=.,8 --vfio-vf-token=UUID -- --client

runs as `vfe-vhostd` with only the program's name changed.  Like any DPDK
application, the options before `--` are the EAL's and those after it the
application's.  vfe has no PCI device to probe, no hugepages or lcores to
set up, so the EAL options are checked (an unknown one is refused, as the
EAL refuses it) and noted, but change nothing -- except --log-level, whose
global level becomes ours.  Without `--`, every argument is the
application's.  Sans-I/O: parse() only looks at strings.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# EAL options that take a value (short and long spellings) and those that do not
_WITH_VALUE = {
    "-a", "--allow", "-b", "--block", "-c", "-l", "--lcores", "-n", "-r", "-m", "-d",
    "--log-level", "--vfio-vf-token", "--vfio-intr", "--file-prefix", "--socket-mem",
    "--socket-limit", "--huge-dir", "--iova-mode", "--proc-type", "--main-lcore",
    "--master-lcore", "--service-lcores", "-s", "--service-coremask", "--vdev",
    "--base-virtaddr", "--mbuf-pool-ops-name", "--trace", "--trace-dir", "--trace-bufsz",
    "--trace-mode", "--huge-worker-stack", "--force-max-simd-bitwidth", "--syslog",
}
_FLAGS = {
    "--no-huge", "--in-memory", "--no-pci", "--no-shconf", "--no-hpet", "--no-telemetry",
    "--legacy-mem", "--single-file-segments", "--match-allocations", "--create-uio-dev",
    "-v", "--telemetry", "--huge-unlink",
}

# DPDK log levels (RTE_LOG_*) -> ours: 8 debug; 6 info and 7 notice... info; below, errors
_DEBUG, _INFO = 8, 6


class EalError(ValueError):
    """An EAL option the EAL itself would refuse."""


@dataclass
class Eal:
    app_argv: list[str]                          # what follows `--` (or everything)
    options: list[str] = field(default_factory=list)   # the EAL options seen, by name
    log_level: str | None = None                 # "debug" / "info" / "err" from --log-level

    def note(self) -> str:
        """One log line for what was accepted and not used ("" if nothing)."""
        if not self.options:
            return ""
        level = f"; --log-level: logging at {self.log_level}" if self.log_level else ""
        return (f"EAL options accepted, not used (vfe has no PCI device, hugepages or lcores to "
                f"set up): {' '.join(dict.fromkeys(self.options))}{level}")


def _level(value: str) -> str | None:
    """The global level of a --log-level value: "8", ".,8", "*:8" or
    "lib.eal:8" (a per-type level: not ours, None)."""
    for sep in (",", ":"):
        if sep in value:
            pattern, _, value = value.rpartition(sep)
            if pattern not in (".", "*", ".*"):
                return None
    if not value.isdigit() or not 1 <= int(value) <= 8:
        raise EalError(f"invalid log level {value!r} (1..8)")
    n = int(value)
    return "debug" if n >= _DEBUG else "info" if n >= _INFO else "err"


def parse(argv: list[str]) -> Eal:
    if "--" not in argv:
        return Eal(app_argv=list(argv))
    cut = argv.index("--")
    eal = Eal(app_argv=argv[cut + 1:])
    args = argv[:cut]
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if name not in _WITH_VALUE and name not in _FLAGS and not arg.startswith("--") \
                and len(arg) > 2 and arg[:2] in _WITH_VALUE:
            name, eq, value = arg[:2], "=", arg[2:]          # -a0000:00:00.0
        if name in _FLAGS:
            if eq:
                raise EalError(f"EAL option {name} takes no value")
        elif name in _WITH_VALUE:
            if not eq:
                if i + 1 >= len(args):
                    raise EalError(f"EAL option {name} needs a value")
                i += 1
                value = args[i]
            if name == "--log-level":
                eal.log_level = _level(value) or eal.log_level
        else:
            raise EalError(f"unknown EAL option {arg!r} (the options before `--` are DPDK's EAL's)")
        eal.options.append(name)
        i += 1
    return eal
