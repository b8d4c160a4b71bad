"""A minimal writer for Linux initramfs archives (cpio "newc", gzip).

Written in Python rather than driving cpio(1) so that the archive can hold
device nodes and root-owned files without running as root, and so that its
bytes depend only on its inputs (fixed mtimes and inode numbers): a rebuild
with the same inputs gives the same file.
"""

from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath


@dataclass
class _Entry:
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


@dataclass
class Initramfs:
    """An in-memory file tree that serializes to a newc cpio archive."""

    entries: dict[str, _Entry] = field(default_factory=dict)

    @staticmethod
    def _norm(path: str) -> str:
        p = PurePosixPath("/", path)
        return str(p).lstrip("/")

    def _parents(self, path: str) -> None:
        parent = PurePosixPath(path).parent
        if str(parent) not in ("", "."):
            self.mkdir(str(parent))

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        path = self._norm(path)
        if not path or path in self.entries:
            return
        self._parents(path)
        self.entries[path] = _Entry(stat.S_IFDIR | mode)

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        path = self._norm(path)
        self._parents(path)
        self.entries[path] = _Entry(stat.S_IFREG | mode, data)

    def add_host_file(self, path: str, host_path: Path, mode: int | None = None) -> None:
        host_path = Path(host_path)
        if mode is None:
            mode = stat.S_IMODE(host_path.stat().st_mode)
        self.add_file(path, host_path.read_bytes(), mode)

    def symlink(self, path: str, target: str) -> None:
        path = self._norm(path)
        self._parents(path)
        self.entries[path] = _Entry(stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        path = self._norm(path)
        self._parents(path)
        self.entries[path] = _Entry(stat.S_IFCHR | mode, rdev=(major, minor))

    def __contains__(self, path: str) -> bool:
        return self._norm(path) in self.entries

    def to_cpio(self) -> bytes:
        out = bytearray()
        # Directories sort before their contents, so the kernel creates
        # parents first when it unpacks.
        for ino, name in enumerate(sorted(self.entries), start=1):
            e = self.entries[name]
            _append(out, name, e.mode, e.data, ino, e.rdev)
        _append(out, "TRAILER!!!", 0, b"", 0, (0, 0))
        # Pad the archive to a 512-byte block like cpio(1) does.
        out += b"\0" * (-len(out) % 512)
        return bytes(out)

    def write(self, path: Path, compress: bool = True) -> Path:
        blob = self.to_cpio()
        if compress:
            # mtime=0 keeps the gzip header, and so the file, reproducible.
            blob = gzip.compress(blob, compresslevel=6, mtime=0)
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(blob)
        tmp.replace(path)
        return path


def _append(out: bytearray, name: str, mode: int, data: bytes, ino: int,
            rdev: tuple[int, int]) -> None:
    namez = name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(mode) else 1
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(namez), 0)
    out += b"070701" + b"".join(b"%08X" % f for f in fields)
    out += namez
    out += b"\0" * (-len(out) % 4)  # header+name padded to 4 bytes
    out += data
    out += b"\0" * (-len(out) % 4)  # data padded to 4 bytes
