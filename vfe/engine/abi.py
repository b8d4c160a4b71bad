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

import glob
import os

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

SYMBOL = "vfe_engine_abi"
PREFIX = b"vfe-engine-abi="


class AbiError(Exception):
    """The build's engine identity cannot be read."""


def engine_file(package_root: str | os.PathLike) -> str:
    """The compiled engine of the build whose `vfe` package is under
    `package_root` (the directory on sys.path that holds `vfe/`)."""
    found = sorted(glob.glob(os.path.join(os.fspath(package_root), "vfe", "_engine*.so")))
    if not found:
        raise AbiError(f"no compiled engine (vfe/_engine*.so) under {package_root}")
    return found[0]


def read_abi(so_path: str | os.PathLike) -> int:
    """The engine ABI number recorded in the shared object `so_path`."""
    try:
        with open(so_path, "rb") as f:
            elf = ELFFile(f)
            sym = None
            for name in (".dynsym", ".symtab"):
                table = elf.get_section_by_name(name)
                if table is not None:
                    hits = table.get_symbol_by_name(SYMBOL)
                    if hits:
                        sym = hits[0]
                        break
            if sym is None:
                raise AbiError(f"{so_path}: no {SYMBOL} symbol (a build older than live update)")
            addr, size = sym["st_value"], sym["st_size"]
            for seg in elf.iter_segments():
                if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= addr < seg["p_vaddr"] + seg["p_filesz"]:
                    f.seek(seg["p_offset"] + addr - seg["p_vaddr"])
                    raw = f.read(size or 64)
                    break
            else:
                raise AbiError(f"{so_path}: {SYMBOL} is not in a loaded segment")
    except OSError as exc:
        raise AbiError(f"{so_path}: {exc.strerror or exc}") from None
    except ELFError as exc:
        raise AbiError(f"{so_path}: not an ELF shared object: {exc}") from None
    text = raw.split(b"\0", 1)[0]
    if not text.startswith(PREFIX) or not text[len(PREFIX):].isdigit():
        raise AbiError(f"{so_path}: {SYMBOL} holds {text!r}, not {PREFIX.decode()}N")
    return int(text[len(PREFIX):])
