"""Paths: the seed's defaults under VFE_ROOT, explicit overrides, ensure(), atomic writes."""
import json
import os
from pathlib import Path

import pytest

from vfe.controller.paths import Paths, atomic_write_json, atomic_write_text, is_temp_name
from vfe.safepath import SocketPathTooLong


def test_defaults_under_root_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("VFE_ROOT", str(tmp_path))
    p = Paths.from_env()
    assert p.root == tmp_path
    assert p.conf == tmp_path / "opt/mellanox/mlnx_virtnet/virtnet.conf"
    assert p.recovery_dir == tmp_path / "opt/mellanox/mlnx_virtnet/recovery"
    assert p.state_dir == tmp_path / "var/lib/vfe"
    assert p.run_dir == tmp_path / "run/virtnet"
    assert p.rpc_socket == tmp_path / "run/virtnet/virtnet.sock"
    assert p.endpoint_socket("VNETS1D0F0") == tmp_path / "run/virtnet/VNETS1D0F0.sock"


def test_default_root_is_slash(monkeypatch):
    monkeypatch.delenv("VFE_ROOT", raising=False)
    p = Paths.from_env()
    assert p.conf == Path("/opt/mellanox/mlnx_virtnet/virtnet.conf")
    assert p.recovery_dir == Path("/opt/mellanox/mlnx_virtnet/recovery")
    assert p.display(p.recovery_dir) == "/opt/mellanox/mlnx_virtnet/recovery"


def test_empty_env_root_means_slash():
    assert Paths.from_env(env={"VFE_ROOT": ""}).root == Path("/")


def test_explicit_overrides_beat_root(tmp_path, monkeypatch):
    monkeypatch.setenv("VFE_ROOT", str(tmp_path / "r"))
    p = Paths.from_env(conf=tmp_path / "my.conf", recovery=tmp_path / "rec",
                       run_dir=tmp_path / "run", state_dir=tmp_path / "st")
    assert p.conf == tmp_path / "my.conf"
    assert p.recovery_dir == tmp_path / "rec"
    assert p.run_dir == tmp_path / "run"
    assert p.state_dir == tmp_path / "st"
    assert p.root == tmp_path / "r"


def test_explicit_root_beats_env(tmp_path, monkeypatch):
    monkeypatch.setenv("VFE_ROOT", "/nonexistent")
    assert Paths.from_env(root=tmp_path).root == tmp_path


def test_relative_override_is_relative_to_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = Paths.from_env(root="/x", conf="a.conf")
    assert p.conf == tmp_path / "a.conf"


def test_nothing_created_until_ensure(tmp_path):
    p = Paths.from_env(root=tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert p.ensure() is p
    for d in (p.recovery_dir, p.state_dir, p.run_dir, p.conf.parent):
        assert d.is_dir()
    p.ensure()          # idempotent


def test_run_dir_is_root_only_writable(tmp_path):
    """The run dir holds the control sockets: made 0755 whatever the umask,
    refused (with what to fix) when others could write it."""
    old = os.umask(0)
    try:
        p = Paths.from_env(root=tmp_path).ensure()
    finally:
        os.umask(old)
    assert os.stat(p.run_dir).st_mode & 0o777 == 0o755
    os.chmod(p.run_dir.parent, 0o777)
    with pytest.raises(PermissionError, match=rf"the directory {p.run_dir.parent} is writable by others "
                                              rf"\(.*mode 0777\).*run `chmod go-w {p.run_dir.parent}`"):
        p.ensure()


def test_display_names_root(tmp_path):
    p = Paths.from_env(root=tmp_path)
    text = p.display(p.recovery_dir)
    assert text.startswith("/opt/mellanox/mlnx_virtnet/recovery")
    assert str(tmp_path) in text


def test_endpoint_socket_rejects_bad_vuid(tmp_path):
    p = Paths.from_env(root=tmp_path)
    for bad in ("", "../x", "a/b", ".."):
        with pytest.raises(ValueError):
            p.endpoint_socket(bad)


def test_endpoint_socket_length_is_checked():
    """Every kind's endpoint socket comes from endpoint_socket, which
    refuses one the kernel could not bind, saying what to change."""
    root = "/tmp/" + "x" * (107 - len("/tmp//run/virtnet/VNETS1D0F0.sock"))
    assert len(str(Paths.from_env(root=root).endpoint_socket("VNETS1D0F0"))) == 107
    with pytest.raises(SocketPathTooLong, match="--run-dir") as ei:
        Paths.from_env(root=root + "x").endpoint_socket("VNETS1D0F0")
    assert "108 bytes" in str(ei.value)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    f = tmp_path / "d" / "x.json"
    atomic_write_json(f, {"a": 1})
    atomic_write_json(f, {"a": 2})
    assert json.loads(f.read_text()) == {"a": 2}
    assert [q.name for q in f.parent.iterdir()] == ["x.json"]
    assert oct(f.stat().st_mode & 0o777) == oct(0o644)


def test_atomic_write_failure_keeps_old_content(tmp_path, monkeypatch):
    f = tmp_path / "x.txt"
    atomic_write_text(f, "old")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(f, "new")
    assert f.read_text() == "old"
    assert [q.name for q in tmp_path.iterdir()] == ["x.txt"]


def test_temp_names():
    assert is_temp_name(".VNETS1D0F0.json.abc123.tmp")
    assert not is_temp_name("VNETS1D0F0.json")
