"""Second controller builds for live-update tests.

A live update refuses a build that anyone but root could change (a
directory on the way others may write -- /tmp is one --, a file of another
uid: vfe/controller/newbuild.py).  So test builds live in a private
directory under a root-owned, non-writable one (``/run`` by default,
``$VFE_TEST_BUILD_DIR`` to choose), made and removed by ``build_dir()``:

    with build_dir() as d:
        b2 = make_build(d / "b2", vfe.__version__ + "+lu2")
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import vfe

HERE = Path(vfe.__file__).resolve().parent.parent       # this build: the directory holding vfe/


@contextlib.contextmanager
def build_dir(prefix: str = "vfe-builds-"):
    base = os.environ.get("VFE_TEST_BUILD_DIR") or "/run"
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=base))          # 0700, ours
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def make_build(dest: Path, version: str, patch: Callable[[Path], None] | None = None) -> Path:
    """A second installed build: a copy of this checkout's vfe package under
    `dest`, its __version__ set to `version`; `patch(root)` may change it on
    purpose (break it, slow it down)."""
    shutil.copytree(HERE / "vfe", dest / "vfe", ignore=shutil.ignore_patterns("__pycache__"))
    init = dest / "vfe" / "__init__.py"
    init.write_text(re.sub(r'__version__ = ".*"', f'__version__ = "{version}"', init.read_text()))
    if patch is not None:
        patch(dest)
    return dest


def set_engine_abi(so: Path, abi: int) -> None:
    """Rewrite the engine ABI recorded in the compiled engine `so` (in place)."""
    data = so.read_bytes()
    assert data.count(b"vfe-engine-abi=") == 1
    so.write_bytes(re.sub(rb"vfe-engine-abi=\d+", b"vfe-engine-abi=%d" % abi, data))


def engine_of(root: Path) -> Path:
    return next((root / "vfe").glob("_engine*.so"))
