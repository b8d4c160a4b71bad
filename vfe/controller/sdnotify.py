"""systemd's notification socket, the few lines of it we need.

The unit is Type=notify with NotifyAccess=all: the controller says READY=1
once it serves, and after a live update the new process says MAINPID=<its
pid> before the old one exits -- otherwise systemd would take the old
process's exit for the service's end and stop the new one with it."""
from __future__ import annotations

import os
import socket


def notify(**fields) -> bool:
    """Send KEY=VALUE lines to $NOTIFY_SOCKET; False when not under systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):                  # abstract namespace
        path = "\0" + path[1:]
    msg = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(path)
            s.send(msg)
        except OSError:
            return False
    return True
