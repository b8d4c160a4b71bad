"""The engine's build identity, read from a build's file (vfe/engine/abi.py):
what a live update checks before it moves anything."""
import re
import shutil

import pytest

import vfe
from vfe.engine import ENGINE_ABI
from vfe.engine.abi import AbiError, engine_file, read_abi


def test_the_built_engine_records_the_abi_it_runs_with(tmp_path):
    from pathlib import Path
    root = Path(vfe.__file__).resolve().parent.parent
    assert read_abi(engine_file(root)) == ENGINE_ABI


def test_another_abi_is_read_as_such(tmp_path):
    from pathlib import Path
    so = Path(engine_file(Path(vfe.__file__).resolve().parent.parent))
    copy = tmp_path / so.name
    data = so.read_bytes()
    copy.write_bytes(re.sub(rb"vfe-engine-abi=\d+", b"vfe-engine-abi=7", data))
    assert read_abi(copy) == 7


def test_not_an_engine(tmp_path):
    text = tmp_path / "x.so"
    text.write_text("not an ELF file")
    with pytest.raises(AbiError, match="not an ELF"):
        read_abi(text)
    elf_without = tmp_path / "true.so"
    shutil.copy("/bin/true", elf_without)
    with pytest.raises(AbiError, match="no vfe_engine_abi symbol"):
        read_abi(elf_without)
    with pytest.raises(AbiError, match="no compiled engine"):
        engine_file(tmp_path)
    with pytest.raises(AbiError):
        read_abi(tmp_path / "missing.so")
