"""One provisioned VF: relay vhost-user between QEMU and the controller.

    QEMU socket  <-- messages + fds -->  Relay  <-- messages + fds -->  <run>/<VUID>.sock
    (we connect with --client,                                         (the controller's
     else we listen and QEMU connects)                                  endpoint of the VF)

Every message is forwarded whole, with the fds that came with it (memory
regions, kick/call eventfds, the back-end request channel, the log), so the
guest's memory and eventfds reach the controller and the data path never
passes through this process.

The controller side starts with a vfe-private request on a fresh connection
to the endpoint (header flags 0x1, payload u64 0; the reply has flags 0x5
and u64 0 for success, else -errno):

- ``VFE_RELAY_HELLO`` (0x7F00) carries exactly one fd: a dup of our QEMU
  socket.  The controller keeps it; if this process dies it goes on serving
  QEMU over it directly (QEMU sees no disconnect, the guest's link stays up).
- ``VFE_RELAY_RESUME`` (0x7F01), no fd: "give me back the front-end you
  adopted".  The reply carries the QEMU socket (SCM_RIGHTS) and the relay
  goes on over that connection; without an adopted front-end the answer is
  -ENOENT (or the controller closes the connection) and we set up QEMU's
  side as usual.

Closing: ``close(handoff=False)`` (``vf -r``, or the VF is gone) shuts the
QEMU socket down before closing, so QEMU sees the link go down and the
controller sees EOF on its dup as well -- a normal disconnect.  Dying, or
``close(handoff=True)`` at a clean exit, closes only our fds: the
controller still holds the QEMU socket and keeps serving it.

The relay is driven by the daemon's selector: every registered object's
``data`` is a callable run when it is readable, and ``tick(now)`` does the
retries (client-mode connects, checking whether the VF still exists).
"""
from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import stat
import time
from typing import Callable

from vfe.rpc.access import allowed, unix_peer
from vfe.safepath import SocketPathTooLong, check_sun_path
from vfe.safepath import check_socket_path as check_unsafe
from vfe.vhost import transport
from vfe.vhost.messages import REPLY, VERSION, Message, ProtocolError, Request
from vfe.vhost.transport import Connection, close_fds

log = logging.getLogger("vfe.vhostd")

#: How long the controller may take to answer HELLO / RESUME.
HANDSHAKE_TIMEOUT = 5.0
#: Client mode: how often we try QEMU's socket (and re-check a lost VF).
RETRY_INTERVAL = 0.5

# The reference's numbers (drivers/common/virtio/virtio_util.h) for the two
# socket-path conditions that exist here too.
ERR_NO_ACCESS_SOCKET_PATH = 1030


class RelayError(Exception):
    """Setting up a relay failed; ``code`` is a negative errno (or -10xx)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _u64(value: int) -> bytes:
    return (value & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")


def _s64(payload: bytes) -> int:
    if len(payload) < 8:
        return -errno.EPROTO
    return int.from_bytes(payload[:8], "little", signed=True)


def _oserror_code(exc: OSError) -> int:
    return -(exc.errno or errno.EIO)


def connect_endpoint(path: str, timeout: float = HANDSHAKE_TIMEOUT) -> Connection:
    """A connection (blocking, with ``timeout``, for the handshake) to a
    function's endpoint.  The connect itself never waits: an endpoint that
    does not accept (full backlog) is an error now, retried from tick()."""
    try:
        check_unsafe(path, "the controller's endpoint")   # UnsafePath (EPERM): not the controller's
        sock = transport.connect_nowait(path)
    except OSError as exc:
        raise RelayError(_oserror_code(exc), f"cannot connect to the controller's endpoint {path}: "
                                             f"{exc.strerror or exc}") from None
    # HELLO hands this peer a VM's socket: only the controller -- root, or
    # ourselves -- may be at the other end, whoever managed to bind the path
    server = unix_peer(sock)
    if not allowed(server):
        sock.close()
        raise RelayError(-errno.EPERM, f"{path} is served by {server or 'an unknown user'}, not by root: "
                                       f"not relaying a VM to it")
    sock.settimeout(timeout)
    return Connection(sock)


def handshake(ctrl: Connection, request: int, fds: tuple[int, ...] = (),
              timeout: float = HANDSHAKE_TIMEOUT) -> tuple[int, tuple[int, ...], list[Message]]:
    """Send a relay request on a blocking ``ctrl`` and wait for its reply.

    Returns (value, fds of the reply, messages that came after it); value is
    the reply's u64 as a signed number (0 = ok, else -errno).  Raises
    ``PeerClosed`` if the controller hangs up, ``TimeoutError``, or
    ``ProtocolError`` on a reply that is not ours."""
    ctrl.send_message(request, _u64(0), fds, flags=VERSION)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no answer to request {request:#x} within {timeout:g} s")
        ctrl.sock.settimeout(left)
        try:
            msgs = ctrl.recv_messages()
        except (socket.timeout, TimeoutError):
            raise TimeoutError(f"no answer to request {request:#x} within {timeout:g} s") from None
        if not msgs:
            continue
        first, rest = msgs[0], msgs[1:]
        if first.request != request or not first.flags & REPLY:
            for m in msgs:
                close_fds(m.fds)
            raise ProtocolError(f"expected the reply to {request:#x}, got request {first.request:#x} "
                                f"flags {first.flags:#x}")
        return _s64(first.payload), first.fds, rest


def check_socket_path(path: str, client: bool) -> None:
    """The checks a provisioning request gets before anything is created."""
    try:
        check_sun_path(path)
    except SocketPathTooLong as exc:
        raise RelayError(-errno.ENAMETOOLONG, str(exc)) from None
    try:                   # a directory others write, or another user's socket in /tmp
        check_unsafe(path)
    except transport.UnsafePath as exc:
        raise RelayError(-ERR_NO_ACCESS_SOCKET_PATH, str(exc)) from None
    except FileNotFoundError:
        return             # no directory: listening fails with ENOENT, a client waits for it
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise RelayError(-ERR_NO_ACCESS_SOCKET_PATH, f"{path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise RelayError(-ERR_NO_ACCESS_SOCKET_PATH, f"{path} exists and is not a socket")
    if client:
        return
    # server mode: a socket file that nobody serves is left over (a killed
    # vfe-vhostd): it is replaced; one that answers belongs to someone else
    try:
        live = transport.is_served(path)        # never waits, even on a full backlog
    except OSError as exc:
        raise RelayError(-ERR_NO_ACCESS_SOCKET_PATH, f"{path}: {exc.strerror}") from None
    if not live:
        return
    raise RelayError(-ERR_NO_ACCESS_SOCKET_PATH,
                     f"{path} exists and a live process serves it: remove it or specify another file")


class Relay:
    """The relay of one provisioned VF (see the module docstring).

    ``vf_exists()`` answers True / False / None (unknown: the controller is
    unreachable); it is asked after the controller side went away, and a
    False makes the relay call ``on_gone(relay, why)`` -- the owner then
    closes it and forgets the VF (after SR-IOV is disabled the VF must be
    provisioned again)."""

    WAITING, RELAYING, CLOSED = "waiting for QEMU", "relaying", "closed"

    def __init__(self, name: str, socket_path: str, endpoint: str, client: bool,
                 sel: selectors.BaseSelector, *,
                 vf_exists: Callable[[], bool | None] = lambda: True,
                 on_gone: Callable[["Relay", str], None] | None = None,
                 retry_interval: float = RETRY_INTERVAL,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT):
        self.name = name
        self.socket_path = socket_path
        self.endpoint = endpoint
        self.client = client
        self.sel = sel
        self.vf_exists = vf_exists
        self.on_gone = on_gone
        self.retry_interval = retry_interval
        self.handshake_timeout = handshake_timeout
        self.qemu: Connection | None = None
        self.ctrl: Connection | None = None
        self.listener: transport.Listener | None = None
        self.state = self.WAITING
        self.next_attempt = 0.0
        self.recheck = False           # ask vf_exists() before trying again
        self.resumed = False
        self.sessions = 0              # relayed QEMU connections so far
        self.forwarded = [0, 0]        # messages QEMU->controller, controller->QEMU
        self._last_error = ""

    def __repr__(self) -> str:
        return f"<Relay {self.name} {self.state} {self.socket_path} -> {self.endpoint}>"

    @property
    def relaying(self) -> bool:
        return self.state == self.RELAYING

    # -- start -------------------------------------------------------------------

    def start(self, resume: bool = True) -> "Relay":
        """Bring the relay up; raises RelayError (and leaves nothing behind)
        when the VF cannot be served.

        First RESUME (a previous vfe-vhostd's front-end the controller kept),
        then, in server mode, listen on the socket path; in client mode
        connect to QEMU now if it is there (QEMU waits for us with server=on)
        and keep trying from ``tick`` if it is not."""
        try:
            if resume:
                self._try_resume()
            if not self.client:
                self._listen()
            elif self.qemu is None:
                try:
                    conn = transport.try_connect(self.socket_path)
                except transport.UnsafePath as exc:
                    raise RelayError(-ERR_NO_ACCESS_SOCKET_PATH, str(exc)) from None
                if conn is not None:
                    self._connect_controller(conn)
        except BaseException:
            # a front-end we just took back goes back to the controller
            self.close(handoff=self.resumed)
            raise
        return self

    def _try_resume(self) -> None:
        ctrl = connect_endpoint(self.endpoint, self.handshake_timeout)     # RelayError: the VF is unreachable
        try:
            code, fds, rest = handshake(ctrl, Request.VFE_RELAY_RESUME, (), self.handshake_timeout)
        except (OSError, ProtocolError) as exc:
            # an older controller, or one that took us for a front-end
            log.debug("%s: no front-end to resume (%s)", self.name, exc)
            ctrl.close()
            return
        if code != 0 or len(fds) != 1:
            close_fds(fds)
            for m in rest:
                close_fds(m.fds)
            ctrl.close()
            log.debug("%s: no front-end to resume (%s)", self.name,
                      os.strerror(-code) if code < 0 else f"{len(fds)} fds")
            return
        sock = socket.socket(fileno=fds[0])
        qemu = Connection(sock)
        self.resumed = True
        log.info("%s: resumed the relay of the front-end the controller kept (%s)", self.name,
                 self.socket_path)
        self._attach(ctrl, qemu, rest)

    def _listen(self) -> None:
        check_socket_path(self.socket_path, client=False)
        try:
            self.listener = transport.listen(self.socket_path)
        except FileExistsError as exc:
            raise RelayError(-ERR_NO_ACCESS_SOCKET_PATH, f"{self.socket_path}: {exc.strerror}") from None
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise RelayError(-ERR_NO_ACCESS_SOCKET_PATH,
                                 f"{self.socket_path} is served by a live process") from None
            raise RelayError(_oserror_code(exc), f"cannot listen on {self.socket_path}: "
                                                 f"{exc.strerror or exc}") from None
        self.sel.register(self.listener, selectors.EVENT_READ, self._on_accept)
        log.info("%s: listening on %s", self.name, self.socket_path)

    # -- the two sides ---------------------------------------------------------

    def _connect_controller(self, qemu: Connection) -> None:
        """HELLO with a dup of ``qemu`` (sent as SCM_RIGHTS), then relay.
        On failure ``qemu`` is closed and RelayError raised."""
        try:
            ctrl = connect_endpoint(self.endpoint, self.handshake_timeout)
        except RelayError:
            qemu.close()
            raise
        try:
            code, fds, rest = handshake(ctrl, Request.VFE_RELAY_HELLO, (qemu.fileno(),), self.handshake_timeout)
        except TimeoutError as exc:
            ctrl.close()
            qemu.close()
            raise RelayError(-errno.ETIMEDOUT, f"the controller did not answer VFE_RELAY_HELLO: {exc}") from None
        except (OSError, ProtocolError) as exc:
            ctrl.close()
            qemu.close()
            raise RelayError(-errno.ECONNRESET, f"the controller refused the relay: {exc}") from None
        close_fds(fds)
        if code != 0:
            for m in rest:
                close_fds(m.fds)
            ctrl.close()
            qemu.close()
            raise RelayError(code, f"the controller refused the relay: {os.strerror(-code) if code < 0 else code}")
        self._attach(ctrl, qemu, rest)

    def _attach(self, ctrl: Connection, qemu: Connection, pending: list[Message]) -> None:
        for conn in (ctrl, qemu):
            conn.sock.setblocking(False)
        self.ctrl, self.qemu = ctrl, qemu
        self.state = self.RELAYING
        self.sessions += 1
        self.recheck = False
        self._last_error = ""
        self.sel.register(qemu, selectors.EVENT_READ, self._on_qemu)
        self.sel.register(ctrl, selectors.EVENT_READ, self._on_ctrl)
        log.info("%s: relaying %s <-> %s", self.name, self.socket_path, self.endpoint)
        if pending:
            self._send_all(pending, qemu, to_qemu=True)

    def _on_accept(self) -> None:
        conn = self.listener.accept() if self.listener is not None else None
        if conn is None:
            return
        if self.qemu is not None:
            log.error("%s: refusing a second front-end on %s (one is relayed)", self.name, self.socket_path)
            conn.close()
            return
        log.info("%s: front-end connected on %s", self.name, self.socket_path)
        try:
            self._connect_controller(conn)
        except RelayError as exc:
            log.error("%s: %s; dropping the front-end", self.name, exc.message)
            self.recheck = True

    def _on_qemu(self) -> None:
        if self.qemu is None:
            return
        try:
            msgs = self.qemu.recv_messages()
        except transport.PeerClosed as exc:
            self._qemu_lost(str(exc))
            return
        except ProtocolError as exc:
            log.error("%s: front-end protocol error: %s", self.name, exc)
            self._qemu_lost(str(exc))
            return
        self._send_all(msgs, self.ctrl, to_qemu=False)

    def _on_ctrl(self) -> None:
        if self.ctrl is None:
            return
        try:
            msgs = self.ctrl.recv_messages()
        except (transport.PeerClosed, ProtocolError) as exc:
            self._controller_lost(str(exc))
            return
        self._send_all(msgs, self.qemu, to_qemu=True)

    def _send_all(self, msgs: list[Message], dst: Connection, to_qemu: bool) -> None:
        for i, m in enumerate(msgs):
            try:
                dst.send_message(m.request, m.payload, m.fds, m.flags)
            except OSError as exc:
                for rest in msgs[i:]:
                    close_fds(rest.fds)
                if to_qemu:
                    self._qemu_lost(f"send: {exc}")
                else:
                    self._controller_lost(f"send: {exc}")
                return
            close_fds(m.fds)
            self.forwarded[1 if to_qemu else 0] += 1

    # -- losing a side -----------------------------------------------------------

    def _drop(self, shutdown_qemu: bool) -> None:
        for conn in (self.qemu, self.ctrl):
            if conn is None:
                continue
            try:
                self.sel.unregister(conn)
            except (KeyError, ValueError):
                pass
        if self.qemu is not None:
            if shutdown_qemu:
                try:
                    self.qemu.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.qemu.close()
        if self.ctrl is not None:
            self.ctrl.close()
        self.qemu = self.ctrl = None
        if self.state != self.CLOSED:
            self.state = self.WAITING

    def _qemu_lost(self, why: str) -> None:
        log.info("%s: front-end disconnected (%s)", self.name, why)
        # closing our relay connection: the controller sees EOF on it and on
        # the QEMU socket it holds -- a normal disconnect
        self._drop(shutdown_qemu=True)
        self.next_attempt = time.monotonic() + self.retry_interval

    def _controller_lost(self, why: str) -> None:
        log.warning("%s: the controller closed the relay (%s); disconnecting the front-end", self.name, why)
        self._drop(shutdown_qemu=True)
        self.next_attempt = time.monotonic() + self.retry_interval
        self._check_exists(why)

    def _check_exists(self, why: str) -> bool:
        """False (and on_gone called) when the VF is gone."""
        try:
            exists = self.vf_exists()
        except Exception as exc:              # the owner's query failed: unknown
            log.debug("%s: cannot check the VF: %s", self.name, exc)
            exists = None
        self.recheck = exists is not True
        if exists is False:
            log.warning("%s: the VF is gone from the controller (%s): detached; provision it again "
                        "once it exists again", self.name, why)
            if self.on_gone is not None:
                self.on_gone(self, why)
            return False
        return True

    # -- retries -----------------------------------------------------------------

    def tick(self, now: float) -> float | None:
        """Retries due at ``now``; returns when to call again (None: no timer)."""
        if self.state != self.WAITING:
            return None
        if now < self.next_attempt:
            return self.next_attempt
        self.next_attempt = now + self.retry_interval
        if self.recheck and not self._check_exists("re-check"):
            return None
        if self.recheck:                     # controller unreachable: later
            return self.next_attempt
        if not self.client:
            return None                      # QEMU connects to our listener
        try:
            conn = transport.try_connect(self.socket_path)
        except transport.UnsafePath as exc:      # someone else's socket there now: not ours to join
            if str(exc) != self._last_error:
                log.error("%s: %s; retrying", self.name, exc)
            self._last_error = str(exc)
            return self.next_attempt
        if conn is None:
            return self.next_attempt
        log.info("%s: connected to the front-end's socket %s", self.name, self.socket_path)
        try:
            self._connect_controller(conn)
        except RelayError as exc:
            if exc.message != self._last_error:
                log.error("%s: %s; retrying", self.name, exc.message)
            self._last_error = exc.message
            self.recheck = True
            return self.next_attempt
        return None

    # -- end ---------------------------------------------------------------------

    def close(self, handoff: bool = False) -> None:
        """Stop relaying.  ``handoff``: leave the front-end to the
        controller (clean exit of the daemon); else disconnect it."""
        if self.state == self.CLOSED:
            return
        self._drop(shutdown_qemu=not handoff)
        self.state = self.CLOSED
        if self.listener is not None:
            try:
                self.sel.unregister(self.listener)
            except (KeyError, ValueError):
                pass
            self.listener.close(unlink=True)
            self.listener = None
        log.info("%s: relay closed%s", self.name, " (front-end left to the controller)" if handoff else "")
