"""vfe-vhostd: the host-side service of the VFE vDPA design (the seed's
``dpdk-vfe-vdpa``), and what ``vhostmgmt`` talks to.

    QEMU --vhost-user--> vfe-vhostd --relay--> virtio-net-controller endpoint
                         (JSON-RPC on <root>/run/vfe-vhostd/vhostd.sock;
                          with --tcp also on 127.0.0.1:12190; root only)

- ``relay``   one provisioned VF: the QEMU-side socket (connect with
              ``--client``, else listen), the controller-side connection
              (VFE_RELAY_HELLO / VFE_RELAY_RESUME), and the message-by-message
              relay between them, fds included.  The data path never passes
              through here: guest memory and eventfds go on to the controller.
- ``service`` management PFs and provisioned VFs: the ``mgmtpf`` / ``vf`` /
              ``version`` methods.
- ``errors``  the reference's errno table: the ``errno``/``errstr`` ending
              every result.
- ``features`` the feature-bit names of ``vf -l`` / ``vf -i``.
- ``controller_client`` the controller's JSON-RPC as the service uses it.
- ``loop``    the daemon's one thread: a selector and the relays' timers.
- ``rpc``     JSON-RPC 2.0 on a Unix socket and optionally TCP, one JSON
              object per request/response, for privileged callers only.

The daemon is ``vfe/cli/vhostd.py``, the CLI ``vfe/cli/vhostmgmt.py``; see
docs/vfe-vdpa.md.
"""

import os
from typing import Mapping

from vfe.paths import VHOSTD_SOCKET_NAME, vhostd_run_dir

DEFAULT_PORT = 12190
DEFAULT_ADDRESS = "127.0.0.1"

#: $VFE_VHOSTD_SOCKET names another RPC socket than vfe/paths.py's default
ENV_SOCKET = "VFE_VHOSTD_SOCKET"
ENV_PORT = "VFE_VHOSTD_PORT"


def default_socket(env: Mapping[str, str] | None = None) -> str:
    """$VFE_VHOSTD_SOCKET, else <$VFE_ROOT or />/run/vfe-vhostd/vhostd.sock."""
    env = os.environ if env is None else env
    if env.get(ENV_SOCKET):
        return os.path.abspath(env[ENV_SOCKET])
    return str(vhostd_run_dir(env) / VHOSTD_SOCKET_NAME)


def default_port(env: Mapping[str, str] | None = None) -> int:
    """The TCP port when TCP is asked for: $VFE_VHOSTD_PORT, else 12190."""
    env = os.environ if env is None else env
    return int(env.get(ENV_PORT) or DEFAULT_PORT)
