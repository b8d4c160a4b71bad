"""The daemon's control thread: one selector loop over the devices'
vhost-user sockets (listening or connecting), their connections, the
engine's error events and the stop signal.  The data path runs in the
engine's workers; nothing here is per packet."""
from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import time

from vfe.devices.adapter import Session
from vfe.devices.blk import BlkConfig, BlkDeviceModel
from vfe.devices.net import NetConfig, NetDeviceModel
from vfe.rpc.access import allowed, unix_peer
from vfe.safepath import check_dir_chain, make_dirs
from vfe.vhost import transport
from vfe.vhost.actions import Reply
from vfe.vhost.messages import ProtocolError, Request

log = logging.getLogger("vfe.controller")

RECONNECT_INTERVAL = 0.2


class Endpoint:
    """A device's vhost-user socket, in either role, and its one connection.

    That connection is a front-end (QEMU) itself, or vfe-vhostd relaying one
    (VFE vDPA).  A relay opens with VFE_RELAY_HELLO carrying a dup of its
    QEMU-side socket, which we keep: if vfe-vhostd dies we go on serving
    QEMU over it directly -- QEMU never sees a disconnect and the data path
    never stops -- and a restarted vfe-vhostd takes the socket back with
    VFE_RELAY_RESUME on a new connection.  Both are taken from root (or
    our own uid) only -- by SO_PEERCRED -- however the socket's file mode
    was set: RESUME hands out a VM's socket, and HELLO makes the sender the
    relay of a root process.
    """

    def __init__(self, daemon: "Daemon", device, socket_path: str, client: bool, name: str):
        self.daemon = daemon
        self.device = device
        self.path = socket_path
        self.client = client
        self.name = name
        self.listener: transport.Listener | None = None
        self.conn: transport.Connection | None = None
        self.session: Session | None = None
        self.next_attempt = 0.0
        self.connections = 0
        self.adopted_fd: int | None = None   # the QEMU socket a relay handed us
        self.via_relay = False               # self.conn is vfe-vhostd
        self.fresh = False                   # no message yet on self.conn
        self.probes: list[transport.Connection] = []
        self.refused = ""                    # the last unsafe-path error logged (client mode)

    def open(self) -> None:
        inherited = self.daemon.inherited.pop(self.name, None)
        if inherited is not None:
            self._inherit(*inherited)
            return
        if not self.client:
            make_dirs(os.path.dirname(os.path.abspath(self.path)), 0o755)
            self.listener = transport.listen(self.path)        # UnsafePath: a path others control
            self.daemon.sel.register(self.listener, selectors.EVENT_READ, ("accept", self))
            log.info("%s: listening on %s", self.name, self.path)
        else:
            # a directory others write is refused at once; what is in it
            # (another user's socket in /tmp) at every connect (try_connect)
            try:
                check_dir_chain(os.path.dirname(os.path.abspath(self.path)), allow_sticky=True,
                                what="socket path", subject=self.path)
            except FileNotFoundError:
                pass                             # not there yet: retried until it is
            log.info("%s: connecting to %s", self.name, self.path)

    # -- live update (vfe/controller/update.py) ----------------------------------

    def export(self, fds: list[int]) -> dict:
        """Everything the next controller needs to go on serving this socket
        (the session paused first); fds by index in ``fds``."""
        def keep(fd: int | None) -> int | None:
            if fd is None:
                return None
            fds.append(fd)
            return len(fds) - 1
        conn = self.conn
        if conn is not None and not conn.idle:
            raise RuntimeError(f"{self.name}: a vhost-user message is half-received")
        return {
            "name": self.name, "path": self.path, "client": self.client,
            "listener": keep(self.listener.fileno()) if self.listener is not None else None,
            "conn": keep(conn.fileno()) if conn is not None else None,
            "adopted": keep(self.adopted_fd), "via_relay": self.via_relay, "fresh": self.fresh,
            "connections": self.connections,
            "session": self.session.export(fds) if self.session is not None else None,
        }

    def _inherit(self, state: dict, got) -> None:
        """Serve on what the previous controller handed over (``got``: a
        handover.Received): same listening socket, same connection, the
        session restored with its rings running from where they stopped."""
        if (state["path"], state["client"]) != (self.path, self.client):
            raise RuntimeError(f"{self.name}: handed over as {state['path']} "
                               f"(client={state['client']}), declared as {self.path}")
        if state["listener"] is not None:
            sock = socket.socket(fileno=got.claim(state["listener"]))
            self.listener = transport.Listener(self.path, sock=sock)
            self.daemon.sel.register(self.listener, selectors.EVENT_READ, ("accept", self))
        self.connections = state["connections"]
        if state["conn"] is None:
            return
        sock = socket.socket(fileno=got.claim(state["conn"]))
        sock.setblocking(False)
        self.conn = transport.Connection(sock, send_timeout=0.0)
        self.fresh = state["fresh"]
        self.via_relay = state["via_relay"]
        if state["adopted"] is not None:
            self.adopted_fd = got.claim(state["adopted"])
        sess = state["session"]
        if sess is None:
            self.session = Session(self.device, self.name, self._send)
        else:
            for i in sess["protocol_fds"]:
                got.claim(i)
            self.session = Session.restore(self.device, self.name, self._send, sess, got.fds)
        self.daemon.sel.register(self.conn, selectors.EVENT_READ, ("conn", self))
        log.info("%s: took over the front-end on %s", self.name, self.path)

    def try_connect(self, now: float) -> None:
        if self.conn is not None or now < self.next_attempt:
            return
        self.next_attempt = now + RECONNECT_INTERVAL
        try:
            conn = transport.try_connect(self.path)
        except transport.UnsafePath as exc:
            # e.g. another user's socket in /tmp where QEMU's should be:
            # not connected to; said once, tried again (it may go away)
            if str(exc) != self.refused:
                log.error("%s: %s", self.name, exc)
            self.refused = str(exc)
            return
        self.refused = ""
        if conn is not None:
            self._attach(conn)

    def accept(self) -> None:
        conn = self.listener.accept()
        if conn is None:
            return
        if self.conn is None:
            self._attach(conn)
            return
        # one front-end at a time; a second connection may only be a
        # restarted vfe-vhostd taking back the front-end we adopted
        if self.adopted_fd is None:
            log.error("%s: refusing a second front-end on %s (one is connected)", self.name, self.path)
            conn.close()
            return
        conn.send_timeout = 0.0
        self.probes.append(conn)
        self.daemon.sel.register(conn, selectors.EVENT_READ, ("probe", self))

    def _attach(self, conn: transport.Connection) -> None:
        conn.send_timeout = 0.0
        self.conn = conn
        self.fresh = True
        self.session = Session(self.device, self.name, self._send)
        self.connections += 1
        self.daemon.sel.register(self.conn, selectors.EVENT_READ, ("conn", self))
        log.info("%s: front-end connected on %s", self.name, self.path)

    def _send(self, reply) -> None:
        self.conn.send_reply(reply)

    def readable(self) -> None:
        msgs = []
        try:
            msgs = self.conn.recv_messages()
            while msgs:
                msg = msgs.pop(0)
                if self.fresh and msg.request in (Request.VFE_RELAY_HELLO, Request.VFE_RELAY_RESUME):
                    self._check_relay_peer(self.conn, msg)
                if self.fresh and msg.request == Request.VFE_RELAY_HELLO:
                    self._hello(msg)
                elif self.fresh and msg.request == Request.VFE_RELAY_RESUME:
                    # a relay looking for a front-end we adopted: there is none
                    self.conn.send_reply(Reply(Request.VFE_RELAY_RESUME, _u64(-errno.ENOENT)))
                    raise transport.PeerClosed("no adopted front-end to resume")
                else:
                    self.session.handle(msg)
                self.fresh = False
        except transport.PeerClosed as exc:
            if self.via_relay and self.adopted_fd is not None:
                self._serve_directly(exc)
            else:
                summary = self.device.summary()
                self.detach()             # log only once its memory is unmapped and fds closed
                log.info("%s: front-end disconnected (%s); %s", self.name, exc, summary)
        except ProtocolError as exc:
            self.detach()
            log.error("%s: protocol error, dropping the connection: %s", self.name, exc)
        except OSError as exc:
            self.detach()
            log.error("%s: connection failed: %s", self.name, exc)
        finally:
            for msg in msgs:            # not handled: their fds are still ours
                transport.close_fds(msg.fds)

    # -- VFE vDPA relay ---------------------------------------------------------

    def _check_relay_peer(self, conn: transport.Connection, msg) -> None:
        """Refuse (-EPERM, then ProtocolError) a relay request whose sender
        is not root or ourselves."""
        peer = unix_peer(conn.sock)
        if allowed(peer):
            return
        transport.close_fds(msg.fds)          # popped: nobody else closes them
        conn.send_reply(Reply(msg.request, _u64(-errno.EPERM)))
        raise ProtocolError(f"{msg.name} from {peer or 'a peer without credentials'}: "
                            f"only root's vfe-vhostd may relay")

    def _hello(self, msg) -> None:
        if len(msg.fds) != 1:
            transport.close_fds(msg.fds)
            self.conn.send_reply(Reply(Request.VFE_RELAY_HELLO, _u64(-errno.EINVAL)))
            raise ProtocolError("VFE_RELAY_HELLO must carry the front-end's socket")
        self.adopted_fd = msg.fds[0]
        self.via_relay = True
        self.conn.send_reply(Reply(Request.VFE_RELAY_HELLO, _u64(0)))
        log.info("%s: front-end relayed by vfe-vhostd", self.name)

    def _serve_directly(self, why) -> None:
        """vfe-vhostd went away: talk to QEMU over the socket it gave us."""
        self.daemon.sel.unregister(self.conn)
        self.conn.close()
        sock = socket.socket(fileno=os.dup(self.adopted_fd))
        sock.setblocking(False)
        self.conn = transport.Connection(sock, send_timeout=0.0)
        self.via_relay = False
        self.daemon.sel.register(self.conn, selectors.EVENT_READ, ("conn", self))
        log.warning("%s: vfe-vhostd went away (%s); serving the front-end directly, the data path "
                    "keeps running", self.name, why)

    def probe_readable(self, conn: transport.Connection) -> None:
        msgs = []
        try:
            msgs = conn.recv_messages()
            if not msgs:
                return
            msg = msgs.pop(0)
            if msg.request != Request.VFE_RELAY_RESUME:
                raise ProtocolError(f"a front-end is already connected on {self.path}")
            self._check_relay_peer(conn, msg)
            if self.adopted_fd is None or self.via_relay:
                conn.send_reply(Reply(Request.VFE_RELAY_RESUME, _u64(-errno.ENOENT)))
                raise ProtocolError("no adopted front-end to resume")
            conn.send_reply(Reply(Request.VFE_RELAY_RESUME, _u64(0), (self.adopted_fd,)))
            self.daemon.sel.unregister(self.conn)
            self.conn.close()                       # our dup of QEMU's socket; the relay has it now
            self.daemon.sel.unregister(conn)
            self.probes.remove(conn)
            conn.send_timeout = 0.0
            self.conn = conn
            self.via_relay = True
            self.daemon.sel.register(conn, selectors.EVENT_READ, ("conn", self))
            log.info("%s: vfe-vhostd resumed relaying the front-end", self.name)
            while msgs:
                self.session.handle(msgs.pop(0))
        except (ProtocolError, OSError) as exc:
            if conn in self.probes:
                log.error("%s: refusing a second front-end on %s: %s", self.name, self.path, exc)
                self._drop_probe(conn)
        finally:
            for m in msgs:
                transport.close_fds(m.fds)

    def _drop_probe(self, conn) -> None:
        try:
            self.daemon.sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        self.probes.remove(conn)
        conn.close()

    def detach(self) -> None:
        if self.conn is None:
            return
        try:
            self.daemon.sel.unregister(self.conn)
        except (KeyError, ValueError):
            pass
        try:
            self.session.disconnect()
        finally:
            self.conn.close()
            self.conn = None
            self.session = None
            self.via_relay = False
            if self.adopted_fd is not None:
                os.close(self.adopted_fd)
                self.adopted_fd = None
            self.next_attempt = time.monotonic() + RECONNECT_INTERVAL

    def close(self) -> None:
        for conn in list(self.probes):
            self._drop_probe(conn)
        self.detach()
        if self.listener is not None:
            self.daemon.sel.unregister(self.listener)
            self.listener.close()
            self.listener = None


def _name(dev) -> str:
    """A device's name for the log (its configured name, else its switch port)."""
    model = dev.model
    return model.config.name if model is not None and model.config.name else f"port{dev.port}"


def _u64(v: int) -> bytes:
    return (v & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")


class Daemon:
    """Owns the engine, the devices and their endpoints."""

    def __init__(self, engine):
        self.engine = engine
        self.sel = selectors.DefaultSelector()
        self.endpoints: list[Endpoint] = []
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sel.register(self._stop_r, selectors.EVENT_READ, ("stop", None))
        self.sel.register(engine.event_fd, selectors.EVENT_READ, ("engine", None))
        self.stopping = False
        self.on_shutdown: list = []       # callables run first at shutdown (service mode)
        # name -> (state, handover.Received): endpoints a live update handed
        # us; Endpoint.open() serves on those instead of opening new ones
        self.inherited: dict[str, tuple] = {}

    def add_net_device(self, config: NetConfig) -> Endpoint:
        """A net device declared on the command line: model plus endpoint(s)."""
        config.name = config.name or f"net{len(self.endpoints)}"
        return self._add_declared(NetDeviceModel(self.engine, config), config)

    def add_blk_device(self, config: BlkConfig) -> Endpoint:
        """A virtio-blk device declared on the command line: model plus endpoint(s)."""
        config.name = config.name or f"blk{sum(isinstance(ep.device, BlkDeviceModel) for ep in self.endpoints)}"
        return self._add_declared(BlkDeviceModel(self.engine, config), config)

    def _add_declared(self, device, config) -> Endpoint:
        """Serve a device on its socket, and on its `incoming=` socket (a live
        migration's destination) when it has one."""
        try:
            ep = self.add_endpoint(device, config.socket, config.client, config.name)
            if config.incoming:
                self.add_endpoint(device, config.incoming, config.client, config.name + "/incoming")
            return ep
        except OSError:
            device.close()
            raise

    def add_endpoint(self, device, socket_path: str, client: bool, name: str) -> Endpoint:
        """Serve `device` on a vhost-user socket (the caller owns the device)."""
        ep = Endpoint(self, device, socket_path, client, name)
        ep.open()
        self.endpoints.append(ep)
        return ep

    def remove_endpoint(self, ep: Endpoint) -> None:
        """Stop serving: the front-end (if any) is disconnected, the socket removed."""
        ep.close()
        if ep in self.endpoints:
            self.endpoints.remove(ep)

    def add_reader(self, obj, kind: str) -> None:
        """Register another fd-owning object (RPC server, its clients) with
        the loop; `obj.on_readable()` is called when it is readable."""
        self.sel.register(obj, selectors.EVENT_READ, (kind, obj))

    def stop(self) -> None:
        """Ask the loop to end (callable from a signal handler or another thread)."""
        self.stopping = True
        try:
            os.write(self._stop_w, b"x")
        except OSError:
            pass

    def run(self) -> None:
        self.engine.start()
        try:
            while not self.stopping:
                now = time.monotonic()
                timeout = 1.0
                for ep in self.endpoints:
                    if ep.client and ep.conn is None:
                        ep.try_connect(now)
                        timeout = RECONNECT_INTERVAL
                for key, _ in self.sel.select(timeout):
                    kind, ep = key.data
                    if kind == "accept":
                        ep.accept()
                    elif kind == "conn":
                        if ep.conn is not None:
                            ep.readable()
                    elif kind == "probe":
                        ep.probe_readable(key.fileobj)
                    elif kind in ("rpc", "update", "http"):
                        ep.on_readable()          # the RPC server or a client; a live update's channel; /metrics
                    elif kind == "engine":
                        self._log_engine_events()
                    elif kind == "stop":
                        os.read(self._stop_r, 64)
        finally:
            self.shutdown()

    def _log_engine_events(self) -> None:
        """The engine's events: rings that stopped on a guest error, and the
        switch's port-security notices (each once per front-end)."""
        for dev, index, reason in self.engine.broken_rings():
            log.error("%s: ring %d stopped: %s (the guest must reset the device)", _name(dev),
                      index, reason)
        for dev, text in self.engine.security_notices():
            log.warning("%s: %s", _name(dev), text)

    def shutdown(self) -> None:
        for hook in self.on_shutdown:
            try:
                hook()
            except Exception:              # keep stopping the rest
                log.exception("shutdown hook failed")
        for ep in self.endpoints:
            ep.close()
        self.engine.stop()
        for device in {id(ep.device): ep.device for ep in self.endpoints}.values():
            device.close()
        self.endpoints.clear()
        self.sel.close()
        for fd in (self._stop_r, self._stop_w):
            try:
                os.close(fd)
            except OSError:
                pass
        log.info("stopped")
