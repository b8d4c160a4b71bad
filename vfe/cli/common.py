"""What the command lines that talk to the controller share.

``virtnet``, ``vfe-rpc``, ``vfe-sriov`` and ``vfe-vhostd`` (its
``--controller-socket``) all find the controller's JSON-RPC socket the same
way.
"""
from __future__ import annotations

import os

from vfe.paths import ENV_ROOT, RPC_SOCKET_NAME, RUN_REL

ENV_CONTROLLER_SOCKET = "VIRTNET_SOCKET"


def controller_socket() -> str:
    """``$VIRTNET_SOCKET`` as given, else ``<$VFE_ROOT or />/run/virtnet/virtnet.sock``."""
    env = os.environ.get(ENV_CONTROLLER_SOCKET)
    if env:
        return env
    return os.path.join(os.environ.get(ENV_ROOT) or "/", RUN_REL, RPC_SOCKET_NAME)
