"""The recovery directory: one store for the records of every kind of
function, so that a restarted controller (SIGKILL, crash, stop/start)
recreates each function with the same identity and socket.

What a kind keeps there, and how, is its codec's business (RecordCodec):
net_recovery.NetCodec writes the seed's files, ``<VUID>.json`` directly in
the directory; blk_recovery.BlkCodec writes ``blk/bdevs/<name>.json`` and
``blk/controllers/<VUID>.json``.  A record names its kind (``record.kind``)
and the store hands it to the codec of that kind; a record of a kind no codec
serves is refused (RecoveryError).  The store itself does what is the same
for every kind: files are JSON objects, replaced atomically
(paths.atomic_write_text: a controller killed at any moment leaves each file
old or new, never torn), listed without the temp files a crash may leave,
and read with one wording for what is wrong with them; and the codecs check
their records' fields with the same checks (check_int, check_str,
check_bool), worded alike.

With ``enabled=False`` (virtnet.conf ``"recovery": 0``) nothing is written
and there are no files to load; deletes still remove files, so none goes
stale.  ``display_dir`` is how messages name the directory (default: its
path).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

from vfe.controller.paths import atomic_write_text, is_temp_name


class RecoveryError(ValueError):
    """A record that is not valid; ``field`` names the offending field."""

    def __init__(self, field_: str | None, message: str):
        super().__init__(f"{field_}: {message}" if field_ else message)
        self.field = field_
        self.message = message


def check_int(name: str, v: Any, lo: int, hi: int | None = None) -> int:
    """``v``, an integer (not a bool) in lo..hi (no upper bound without hi)."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise RecoveryError(name, f"must be an integer, not {v!r}")
    if v < lo or (hi is not None and v > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise RecoveryError(name, f"{v} is out of range ({rng})")
    return v


def check_str(name: str, v: Any) -> str:
    """``v``, a non-empty string."""
    if not isinstance(v, str) or not v:
        raise RecoveryError(name, f"must be a non-empty string, not {v!r}")
    return v


def check_bool(name: str, v: Any) -> bool:
    """``v``, true or false (not 0 or 1)."""
    if not isinstance(v, bool):
        raise RecoveryError(name, f"must be true or false, not {v!r}")
    return v


@dataclass(frozen=True)
class RecoveryProblem:
    path: Path
    vuid: str | None
    message: str             # complete, with what to do

    def __str__(self) -> str:
        return self.message


class RecordCodec(Protocol):
    """How one kind of function is kept in the recovery directory."""

    kind: str       # the FunctionKind.name whose records these are

    def file_name(self, record) -> str:
        """Where ``record`` lives, relative to the recovery directory
        (RecoveryError if its key cannot be a file name)."""

    def encode(self, record) -> dict:
        """The file's JSON object (RecoveryError if the record is invalid)."""

    def decode(self, file_name: str, data: Any):
        """The record a file holds (RecoveryError if it is invalid)."""

    def load(self, store: "RecoveryStore"):
        """Every record of the kind in ``store``, checked together; the
        result has ``problems`` (RecoveryProblem) for the files that are not
        good."""


class RecoveryStore:
    """The recovery directory ``directory`` and the codecs of the kinds kept
    there: given here, or each registered by the service as it registers the
    kind (``register``)."""

    def __init__(self, directory: str | os.PathLike, codecs: Iterable[RecordCodec] = (),
                 enabled: bool = True, display_dir: str | None = None):
        self.dir = Path(directory)
        self.codecs: dict[str, RecordCodec] = {}
        self.enabled = enabled
        self.display_dir = display_dir or str(self.dir)
        for c in codecs:
            self.register(c)

    def register(self, codec: RecordCodec) -> None:
        """Keep the records of ``codec.kind`` with ``codec`` (one per kind)."""
        if codec.kind in self.codecs:
            raise ValueError(f"a recovery codec for kind {codec.kind!r} is registered already")
        self.codecs[codec.kind] = codec

    def codec(self, kind: Any) -> RecordCodec:
        codec = self.codecs.get(kind)
        if codec is None:
            raise RecoveryError("kind", f"no recovery files for functions of kind {kind!r} "
                                        f"(known: {', '.join(sorted(self.codecs))})")
        return codec

    # -- writing

    def save(self, record) -> Path | None:
        """Write (atomically) the file of ``record``; returns its path, or
        None when recovery is disabled.  Raises RecoveryError for an invalid
        record (nothing is written)."""
        codec = self.codec(getattr(record, "kind", None))
        data = codec.encode(record)
        path = self.dir / codec.file_name(record)
        if not self.enabled:
            return None
        atomic_write_text(path, json.dumps(data, indent=2) + "\n")
        return path

    def delete(self, record) -> bool:
        """Remove the file of ``record`` (only its key counts); False if
        there was none."""
        codec = self.codec(getattr(record, "kind", None))
        try:
            (self.dir / codec.file_name(record)).unlink()
        except FileNotFoundError:
            return False
        return True

    # -- reading

    def load(self, kind: str):
        """Every record of ``kind`` and the problems of its files (see the
        kind's codec)."""
        return self.codec(kind).load(self)

    def json_files(self, subdir: str = "") -> list[Path]:
        """The ``*.json`` regular files of ``subdir``, sorted, without the
        temp files of atomic_write_text; none when recovery is disabled."""
        d = self.dir / subdir
        if not self.enabled or not d.is_dir():
            return []
        return sorted(p for p in d.iterdir()
                      if p.suffix == ".json" and not is_temp_name(p.name) and p.is_file())

    def read(self, path: Path, decode: Callable[[str, Any], Any]) -> tuple[Any, str | None]:
        """(record, None) from ``decode(file name, JSON)``, or (None, what is
        wrong with the file, worded to follow "recovery file X")."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return decode(str(path.relative_to(self.dir)), data), None
        except json.JSONDecodeError as exc:
            return None, f"is not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})"
        except (RecoveryError, UnicodeDecodeError) as exc:
            return None, f"is invalid ({exc})"
        except OSError as exc:
            return None, f"cannot be read ({exc.strerror})"
