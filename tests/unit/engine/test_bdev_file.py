"""A file bdev's backing file (vfe/engine/bdev_file.py and the engine's
file backend): never through a symlink, only a regular file or a block
device (checked on the opened fd), never grown unless the command line's
documented size= asks for it, and the O_DIRECT fd on the same inode."""
from __future__ import annotations

import errno
import os
import stat

import pytest

from vfe.engine import Engine
from vfe.engine.bdev_file import open_backing, open_direct, probe_backing

MiB = 1 << 20


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.truncate(4 * MiB)
    return p


@pytest.fixture
def engine():
    return Engine()


def _odd_files(tmp_path, image):
    """Paths naming something that is not a disk image (or not directly)."""
    link = tmp_path / "link.img"
    link.symlink_to(image)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    d = tmp_path / "dir"
    d.mkdir()
    return {"a symlink": link, "a FIFO": fifo, "a character device": "/dev/null", "a directory": d}


@pytest.mark.parametrize("what", ["a symlink", "a FIFO", "a character device", "a directory"])
@pytest.mark.parametrize("read_only", [False, True])
def test_only_regular_files_and_block_devices_are_opened(tmp_path, image, what, read_only):
    path = _odd_files(tmp_path, image)[what]
    with pytest.raises(OSError) as ei:
        open_backing(path, read_only=read_only)
    assert f"is {what}, not a regular file or a block device" in ei.value.strerror
    assert ei.value.errno in (errno.ELOOP, errno.EINVAL, errno.EISDIR)
    if what == "a symlink":
        assert "symlinks are not followed" in ei.value.strerror


@pytest.mark.parametrize("what", ["a symlink", "a FIFO", "a character device", "a directory"])
def test_the_engine_refuses_them_too(tmp_path, image, engine, what):
    """The engine's file backend opens through the same checks: a symlink to
    a good image is refused, and a FIFO does not hang the open."""
    path = _odd_files(tmp_path, image)[what]
    with pytest.raises(OSError, match=f"is {what}, not a regular file or a block device"):
        engine.new_blk_device(1, 4 * MiB, 512, backend="file", path=str(path))
    with pytest.raises(OSError, match=f"is {what}"):
        engine.new_blk_device(1, 4 * MiB, 512, backend="file", path=str(path), read_only=True)


def test_a_regular_file_opens_blocking_with_cloexec(image):
    fd, size = open_backing(image, read_only=False)
    try:
        assert size == 4 * MiB
        assert os.get_blocking(fd) and not os.get_inheritable(fd)
    finally:
        os.close(fd)
    assert probe_backing(image) == 4 * MiB


def test_a_shorter_file_is_not_grown(image, engine):
    with pytest.raises(OSError, match=r"smaller than the 8388608 bytes the disk serves \(it is not grown"):
        open_backing(image, read_only=False, need=8 * MiB)
    with pytest.raises(OSError, match="it is not grown"):
        engine.new_blk_device(1, 8 * MiB, 512, backend="file", path=str(image))
    assert os.stat(image).st_size == 4 * MiB


def test_growing_is_only_on_request_and_only_for_a_writable_regular_file(image, engine):
    with pytest.raises(OSError, match="it is not grown"):
        open_backing(image, read_only=True, need=8 * MiB, grow=True)
    dev = engine.new_blk_device(1, 8 * MiB, 512, backend="file", path=str(image), grow=True)
    dev.close()
    assert os.stat(image).st_size == 8 * MiB


def test_direct_fd_is_the_same_inode(image):
    fd, _ = open_backing(image, read_only=False)
    try:
        dfd = open_direct(fd, str(image), False)
    except OSError as exc:           # a file system without O_DIRECT (tmpfs)
        os.close(fd)
        pytest.skip(exc.strerror)
    try:
        a, b = os.fstat(fd), os.fstat(dfd)
        assert (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
        assert os.O_DIRECT & __import__("fcntl").fcntl(dfd, __import__("fcntl").F_GETFL)
    finally:
        os.close(fd)
        os.close(dfd)


def test_a_block_device_is_accepted_with_its_size(tmp_path):
    """A loop device over an image is a block device: served at its size."""
    import shutil
    import subprocess
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup")
    img = tmp_path / "loop.img"
    with open(img, "wb") as f:
        f.truncate(2 * MiB)
    r = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"no loop device here: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        assert stat.S_ISBLK(os.stat(dev).st_mode)
        assert probe_backing(dev) == 2 * MiB
        with pytest.raises(OSError, match="it is not grown"):
            open_backing(dev, read_only=False, need=4 * MiB, grow=True)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
