"""vfe/safepath.py and where it is applied (issue 11, finding 7): a socket
path another local user could have put something on is refused where we
listen and where we connect; root's own directories and our own socket in
sticky /tmp are fine."""
from __future__ import annotations

import errno
import os
import socket
import stat
import uuid

import pytest

from vfe.rpc.server import RpcServer
from vfe.safepath import (SUN_PATH_MAX, SocketPathTooLong, UnsafePath, check_dir_chain, check_socket_path,
                          check_sun_path)
from vfe.vhost import transport

OTHER_UID = 65534          # nobody

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")


def mkdir(path, mode):
    os.mkdir(path)
    os.chmod(path, mode)            # mkdir's mode is filtered by the umask
    return str(path)


def bound_socket(path, uid=None):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen()
    if uid is not None:
        os.lchown(path, uid, -1)
    return s


@pytest.fixture
def private(tmp_path):
    """A 0700 directory of root's (pytest's tmp_path is one, under sticky /tmp)."""
    return mkdir(tmp_path / "private", 0o700)


@pytest.fixture
def world_writable(tmp_path):
    return mkdir(tmp_path / "ww", 0o777)


@pytest.fixture
def sticky(tmp_path):
    """Like /tmp: everyone may create entries, only their owner remove them."""
    return mkdir(tmp_path / "sticky", 0o1777)


# -- the checks -----------------------------------------------------------------------

def test_a_root_directory_is_fine(private):
    assert check_socket_path(f"{private}/vm.sock") == f"{private}/vm.sock"
    with bound_socket(f"{private}/vm.sock"):
        check_socket_path(f"{private}/vm.sock")             # exists: root put it there


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o775, 0o722])
def test_a_directory_others_write_is_refused(tmp_path, mode):
    d = mkdir(tmp_path / "d", mode)
    with pytest.raises(UnsafePath, match=rf"the directory {d} is writable by .*use a directory only root can write"):
        check_socket_path(f"{d}/vm.sock")


def test_a_directory_others_write_higher_up_is_refused_too(world_writable):
    inner = mkdir(f"{world_writable}/inner", 0o755)         # root's, but its parent can be renamed under it
    with pytest.raises(UnsafePath, match=f"the directory {world_writable} is writable by"):
        check_socket_path(f"{inner}/vm.sock")


@needs_root
def test_a_directory_of_another_uid_is_refused(tmp_path):
    d = mkdir(tmp_path / "theirs", 0o755)
    os.chown(d, OTHER_UID, -1)
    with pytest.raises(UnsafePath, match=f"{d} is owned by uid {OTHER_UID}"):
        check_socket_path(f"{d}/vm.sock")


def test_our_socket_in_a_sticky_directory_is_fine(sticky):
    check_socket_path(f"{sticky}/vfe-net0")                 # not there yet: we create it
    with bound_socket(f"{sticky}/vfe-net0"):
        check_socket_path(f"{sticky}/vfe-net0")             # ours


@needs_root
@pytest.mark.parametrize("kind", ["socket", "file", "symlink"])
def test_another_uids_entry_in_a_sticky_directory_is_refused(sticky, kind):
    path = f"{sticky}/vfe-net0"
    s = None
    if kind == "socket":
        s = bound_socket(path, OTHER_UID)
    elif kind == "file":
        open(path, "w").close()
        os.chown(path, OTHER_UID, -1)
    else:
        os.symlink("/run/virtnet/virtnet.sock", path)
        os.lchown(path, OTHER_UID, -1)
    try:
        with pytest.raises(UnsafePath, match=f"{path} is a {kind} of uid {OTHER_UID}"):
            check_socket_path(path)
    finally:
        if s is not None:
            s.close()


@needs_root
def test_another_uids_socket_in_tmp_itself_is_refused():
    path = f"/tmp/vfe-squat-{uuid.uuid4().hex[:8]}.sock"
    s = bound_socket(path, OTHER_UID)
    try:
        with pytest.raises(UnsafePath, match=f"is a socket of uid {OTHER_UID} in /tmp"):
            check_socket_path(path)
        with pytest.raises(UnsafePath):
            transport.try_connect(path)
        with pytest.raises(UnsafePath):
            transport.listen(path)
        assert os.path.exists(path)                         # and nothing removed it
    finally:
        s.close()
        os.unlink(path)


def test_symlinked_directories_are_checked_where_they_lead(tmp_path, world_writable, private):
    link = tmp_path / "to-ww"
    link.symlink_to(world_writable)
    with pytest.raises(UnsafePath, match="is writable by"):
        check_dir_chain(link, allow_sticky=True)
    ok = tmp_path / "to-private"
    ok.symlink_to(private)
    check_dir_chain(ok, allow_sticky=True)


def test_sticky_is_only_allowed_where_asked(sticky):
    check_dir_chain(sticky, allow_sticky=True)
    with pytest.raises(UnsafePath, match=r"is writable by others \(its group and everyone, mode 1777\)"):
        check_dir_chain(sticky, allow_sticky=False)


# -- where it is applied: listening and connecting -------------------------------------

def test_listen_and_connect_refuse_a_world_writable_directory(world_writable, private):
    bad = f"{world_writable}/vm.sock"
    with pytest.raises(UnsafePath):
        transport.listen(bad)
    assert not os.path.exists(bad)
    srv = bound_socket(bad)                                   # e.g. someone else's QEMU socket there
    try:
        with pytest.raises(UnsafePath):
            transport.try_connect(bad)
    finally:
        srv.close()
    good = f"{private}/vm.sock"
    with transport.listen(good):
        conn = transport.try_connect(good)
        assert conn is not None
        conn.close()


def test_the_rpc_server_refuses_a_world_writable_run_dir(world_writable, private):
    with pytest.raises(UnsafePath, match=f"{world_writable} is writable by others"):
        RpcServer(f"{world_writable}/virtnet.sock", lambda m, p: None)
    srv = RpcServer(f"{private}/virtnet.sock", lambda m, p: None)
    srv.close()


def test_refusals_are_oserrors_with_the_path(world_writable):
    with pytest.raises(OSError) as ei:
        check_socket_path(f"{world_writable}/x.sock")
    assert ei.value.filename == f"{world_writable}/x.sock" and ei.value.errno == 1
    assert str(ei.value) == ei.value.strerror                # the whole message, once
    assert stat.S_IMODE(os.stat(world_writable).st_mode) == 0o777


def test_directories_we_make_are_not_writable_by_others_whatever_the_umask(tmp_path):
    from vfe.controller.paths import Paths
    from vfe.safepath import make_dirs
    old = os.umask(0o002)
    try:
        make_dirs(tmp_path / "a" / "b" / "c")
        paths = Paths.from_env(root=tmp_path / "root").ensure()
    finally:
        os.umask(old)
    for d in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "c", paths.run_dir,
              paths.run_dir.parent, paths.state_dir, paths.recovery_dir):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o755, d
    check_socket_path(paths.rpc_socket)


def test_a_directory_swapped_for_a_symlink_before_its_chmod_changes_nothing_else(tmp_path, monkeypatch):
    """ensure_private_dir makes a directory, then sets its mode.  Under a
    directory others write, the new one can be renamed away and replaced by
    a symlink in between; the mode must not land on what the link names
    (root would make e.g. /etc/shadow 0755), and the directory is refused."""
    from vfe import safepath
    open_dir = mkdir(tmp_path / "open", 0o777)
    victim = tmp_path / "secret"
    victim.write_text("x")
    os.chmod(victim, 0o600)
    real_mkdir = os.mkdir

    def mkdir_then_swapped(path, mode=0o777, **kw):
        real_mkdir(path, mode, **kw)
        if os.path.dirname(path) == open_dir:          # the other user's move
            os.rename(path, f"{path}.moved")
            os.symlink(victim, path)
    monkeypatch.setattr(safepath.os, "mkdir", mkdir_then_swapped)
    with pytest.raises(UnsafePath, match=f"{open_dir}/run, just made, is not a directory any more"):
        safepath.ensure_private_dir(f"{open_dir}/run")
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o600


def test_sun_path_limit_counts_bytes():
    """sockaddr_un.sun_path holds 107 bytes and a NUL: a path of 107 bytes
    fits, one more does not -- bytes, so 54 two-byte characters don't."""
    assert SUN_PATH_MAX == 107
    check_sun_path("/" + "x" * 106)
    with pytest.raises(SocketPathTooLong) as ei:
        check_sun_path("/" + "\u00e9" * 54, "vhost-user socket")
    exc = ei.value
    assert isinstance(exc, OSError) and isinstance(exc, ValueError)
    assert exc.errno == errno.ENAMETOOLONG and exc.filename == "/" + "\u00e9" * 54
    assert exc.strerror == "vhost-user socket is 109 bytes, longer than the 107 a Unix socket allows"
    assert str(exc) == f"vhost-user socket {exc.filename} is 109 bytes, longer than the 107 a Unix socket allows"

