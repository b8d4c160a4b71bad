"""The channel of a live update: the running controller and the new one it
started talk over an AF_UNIX SOCK_SEQPACKET socketpair.

One datagram is one message: a JSON object ``{"kind": ..., "body": ...,
"nfds": N}`` with up to ``MAX_FDS`` fds attached (SCM_RIGHTS); a message
with more fds sends the rest in follow-up ``{"kind": "fds"}`` datagrams.
Datagrams keep their fds with them, so nothing here needs the framing that
a vhost-user stream does.  Messages (old -> new unless said):

    hello    new -> old: {"version", "engine_abi", "pid"}: ready to take over
    begin    {"version", "records": N, "endpoints": N, "paused_at"} + the RPC listener
    function {"record", "representor", "extra"} + its representor fd
    endpoint {"state"} + the fds the state names (Endpoint.export)
    end      {}
    done     new -> old: {"pid", "gap_ms"}: everything runs in the new process
    failed   new -> old: {"reason"}
"""
from __future__ import annotations

import array
import json
import select
import socket
import time

from vfe.vhost.transport import close_fds, fds_from_ancdata, wait_ready

MAX_FDS = 250                 # the kernel's SCM_MAX_FD is 253 per message
MAX_DATAGRAM = 1 << 20
_FD_SIZE = array.array("i").itemsize


class HandoverError(Exception):
    """The other controller went away or said something we cannot use."""


def channel() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send(sock: socket.socket, kind: str, body: dict | None = None, fds: list[int] | tuple = ()) -> None:
    fds = list(fds)
    head = json.dumps({"kind": kind, "body": body or {}, "nfds": len(fds)}).encode()
    if len(head) > MAX_DATAGRAM:
        raise HandoverError(f"{kind}: {len(head)} bytes of state in one message")
    socket.send_fds(sock, [head], fds[:MAX_FDS])
    for i in range(MAX_FDS, len(fds), MAX_FDS):
        socket.send_fds(sock, [b'{"kind": "fds"}'], fds[i:i + MAX_FDS])


def _recv_one(sock: socket.socket, deadline: float | None) -> tuple[dict, list[int]]:
    if deadline is not None:
        if not wait_ready(sock, select.POLLIN, deadline - time.monotonic()):
            raise HandoverError("no answer from the other controller in time")
    data, anc, flags, _ = sock.recvmsg(MAX_DATAGRAM, socket.CMSG_SPACE(MAX_FDS * _FD_SIZE),
                                       socket.MSG_CMSG_CLOEXEC)
    fds = fds_from_ancdata(anc)
    if not data:
        close_fds(fds)
        raise HandoverError("the other controller closed the channel")
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        close_fds(fds)
        raise HandoverError("a hand-over message was truncated")
    try:
        msg = json.loads(data)
    except ValueError:
        close_fds(fds)
        raise HandoverError("a hand-over message is not JSON") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("kind"), str):
        close_fds(fds)
        raise HandoverError("a hand-over message has no kind")
    return msg, fds


def recv(sock: socket.socket, timeout: float | None = None) -> tuple[str, dict, list[int]]:
    """(kind, body, fds) of the next message; its fds are the caller's."""
    deadline = None if timeout is None else time.monotonic() + timeout
    msg, fds = _recv_one(sock, deadline)
    want = msg.get("nfds", 0)
    try:
        while len(fds) < want:
            more, extra = _recv_one(sock, deadline)
            fds += extra
            if more.get("kind") != "fds":
                raise HandoverError(f"expected the rest of {msg['kind']}'s fds, got {more.get('kind')}")
        if len(fds) != want:
            raise HandoverError(f"{msg['kind']}: {len(fds)} fds arrived, {want} announced")
    except BaseException:
        close_fds(fds)
        raise
    return msg["kind"], msg.get("body") or {}, fds




class Received:
    """The fds of one message as the new controller got them.  Whoever builds
    an object on one of them claims it; the rest are closed at the end
    (memory and log fds are mapped and dup'ed, not kept)."""

    def __init__(self, fds: list[int]):
        self.fds = fds
        self.claimed: set[int] = set()

    def claim(self, index: int | None) -> int:
        if index is None:
            return -1
        self.claimed.add(index)
        return self.fds[index]

    def close_unclaimed(self) -> None:
        close_fds(fd for i, fd in enumerate(self.fds) if i not in self.claimed)
        self.fds = []

    def close(self) -> None:
        close_fds(self.fds)
        self.fds = []
