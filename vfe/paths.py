"""Where vfe's files are by default: one table for every layer.

Every default sits under a prefix taken from ``$VFE_ROOT`` (default ``/``),
so that tests and unprivileged users can run a whole emulated DPU inside a
directory.  The controller (vfe/controller/paths.py, which adds the explicit
overrides and creates the directories), vfe-vhostd and the command lines read
the same facts here; this module imports nothing of vfe's, so any layer may.

    conf          <root>/opt/mellanox/mlnx_virtnet/virtnet.conf
    recovery dir  <root>/opt/mellanox/mlnx_virtnet/recovery/
    state dir     <root>/var/lib/vfe/          (NV config, SF pools)
    run dir       <root>/run/virtnet/          (virtnet.sock, <VUID>.sock)
    vfe-vhostd    <root>/run/vfe-vhostd/       (vhostd.sock; vf-<BDF>: a VF's default QEMU socket)

The command lines that talk to the controller (virtnet, vfe-rpc, vfe-sriov,
vfe-vhostd) find its socket with ``controller_socket()``: ``$VIRTNET_SOCKET``
names another.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

ENV_ROOT = "VFE_ROOT"

CONF_REL = "opt/mellanox/mlnx_virtnet/virtnet.conf"
RECOVERY_REL = "opt/mellanox/mlnx_virtnet/recovery"
STATE_REL = "var/lib/vfe"
RUN_REL = "run/virtnet"
VHOSTD_RUN_REL = "run/vfe-vhostd"

#: the controller's JSON-RPC socket in its run dir, where virtnet connects
RPC_SOCKET_NAME = "virtnet.sock"
#: the command lines' way to name the controller's socket instead
ENV_CONTROLLER_SOCKET = "VIRTNET_SOCKET"
#: vfe-vhostd's RPC socket in its run dir ($VFE_VHOSTD_SOCKET names another)
VHOSTD_SOCKET_NAME = "vhostd.sock"


def root(env: Mapping[str, str] | None = None) -> Path:
    """``$VFE_ROOT`` as an absolute path, else ``/``."""
    env = os.environ if env is None else env
    return Path(os.path.abspath(env.get(ENV_ROOT) or "/"))


def endpoint_socket_name(vuid: str) -> str:
    """A function's vhost-user socket in the controller's run dir."""
    return f"{vuid}.sock"


def controller_socket(env: Mapping[str, str] | None = None) -> str:
    """The controller's JSON-RPC socket for a command line:
    ``$VIRTNET_SOCKET`` as given, else ``<root>/run/virtnet/virtnet.sock``."""
    env = os.environ if env is None else env
    given = env.get(ENV_CONTROLLER_SOCKET)
    if given:
        return given
    return str(root(env) / RUN_REL / RPC_SOCKET_NAME)


def vhostd_run_dir(env: Mapping[str, str] | None = None) -> Path:
    """vfe-vhostd's run directory, ``$VFE_ROOT/run/vfe-vhostd`` (root's,
    where no other user can put a socket first -- unlike /tmp)."""
    return root(env) / VHOSTD_RUN_REL
