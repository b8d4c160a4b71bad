"""The build identity of a compiled engine, read from its file.

A live update hands rings, guest memory and dirty logs from the running
engine to another build's.  That is only sound if both agree on what a
ring's state means, so before anything moves the running controller reads
the other build's `vfe_engine_abi` symbol (cython_ext/includes/atomics.h)
out of its `vfe/_engine*.so` with pyelftools -- without importing it, which
in this process would be impossible (a module of the same name is loaded)
and would run its code.
"""
from __future__ import annotations

import importlib.machinery
import os

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

SYMBOL = "vfe_engine_abi"
PREFIX = b"vfe-engine-abi="


class AbiError(Exception):
    """The build's engine identity cannot be read."""


def engine_file(package_root: str | os.PathLike) -> str:
    """The compiled engine of the build whose `vfe` package is under
    `package_root` (the directory on sys.path that holds `vfe/`): the file
    `import vfe._engine` would pick, in this interpreter's suffix order."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(os.fspath(package_root), "vfe", "_engine" + suffix)
        if os.path.lexists(path):
            return path
    raise AbiError(f"no compiled engine (vfe/_engine*.so) under {package_root}")


def read_abi(so_path: str | os.PathLike | int, name: str | None = None) -> int:
    """The engine ABI number recorded in the shared object `so_path` (a
    path, or an open fd: read through /proc/self/fd, the very file it is
    open on, its offset untouched); `name` is what messages call it."""
    if name is None:
        name = f"fd {so_path}" if isinstance(so_path, int) else os.fspath(so_path)
    if isinstance(so_path, int):
        so_path = f"/proc/self/fd/{so_path}"
    try:
        with open(so_path, "rb") as f:
            elf = ELFFile(f)
            sym = None
            for section in (".dynsym", ".symtab"):
                table = elf.get_section_by_name(section)
                if table is not None:
                    hits = table.get_symbol_by_name(SYMBOL)
                    if hits:
                        sym = hits[0]
                        break
            if sym is None:
                raise AbiError(f"{name}: no {SYMBOL} symbol (a build older than live update)")
            addr, size = sym["st_value"], sym["st_size"]
            for seg in elf.iter_segments():
                if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= addr < seg["p_vaddr"] + seg["p_filesz"]:
                    f.seek(seg["p_offset"] + addr - seg["p_vaddr"])
                    raw = f.read(size or 64)
                    break
            else:
                raise AbiError(f"{name}: {SYMBOL} is not in a loaded segment")
    except OSError as exc:
        raise AbiError(f"{name}: {exc.strerror or exc}") from None
    except ELFError as exc:
        raise AbiError(f"{name}: not an ELF shared object: {exc}") from None
    text = raw.split(b"\0", 1)[0]
    if not text.startswith(PREFIX) or not text[len(PREFIX):].isdigit():
        raise AbiError(f"{name}: {SYMBOL} holds {text!r}, not {PREFIX.decode()}N")
    return int(text[len(PREFIX):])
