"""Controller live update (`virtnet update --start` / `--status`).

A newer controller installed beside the running one takes over every device
while QEMU keeps its connections: nothing is renegotiated, links stay up,
and the data path stops only for the moment the rings change hands.

    old (LiveUpdate)                         new (Takeover)
    update_start: check that only root
    can change the build (newbuild.py);
    copy its engine into a sealed memfd,
    read the ABI from that; refuse a
    mismatch before anything moves;
    start it with our interpreter,
    --takeover-fd and --engine-fd   ------>  load the engine from the memfd,
                                             import everything, start engine
                                    <------  hello {version, engine_abi}
    pause every ring (exact indexes),
    detach representors; send begin,
    function x N, endpoint x N, end ------>  build the inventory from the
                                             records, serving on the fds
                                             handed over; restore sessions,
                                             start rings where they stopped
                                    <------  done {gap_ms}   (or failed)
    exit without touching anything           answer virtnet on the same socket
    (on failure or timeout: resume every
    ring, re-attach representors, kill the
    new process; nothing was lost)

Until the hello, the old controller serves virtnet as usual (list, query,
modify, VF creation and deletion): the new one builds from the state as it
is when the devices move, not from files read earlier.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
import types

from vfe import __version__
from vfe.controller import handover, sdnotify
from vfe.controller.functions import NetFunction
from vfe.controller.kind import InventoryError
from vfe.controller.net_recovery import RecoveryLoad, RecoveryRecord
from vfe.controller.newbuild import BuildError, check_build, pin_engine
from vfe.engine import ENGINE_ABI
from vfe.engine.abi import AbiError, read_abi
from vfe.ports.representor import Representor

log = logging.getLogger("vfe.controller")

MOVE_TIMEOUT = 60.0            # the new process builds every function before answering
# The kind whose functions are handed over as they run -- records, representor
# fds, QMP ids, vf_state -- rather than read back from their files: only net
# functions have representors and run-time state (blk functions come back from
# the files the old process wrote; their endpoints move like every endpoint).
HANDED_OVER_KIND = NetFunction.kind

# The seed: an update the running controller cannot do means the other build is wrong
VERSION_HINT = ("the controller version you are trying to install is not compatible with the "
                "running one; reinstalling the proper version will resolve this")


def build_version(root: str) -> str:
    """The __version__ of the build under `root`, read without importing it."""
    try:
        with open(os.path.join(root, "vfe", "__init__.py")) as f:
            m = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', f.read(), re.M)
    except OSError as exc:
        raise InventoryError(f"no controller build under {root}: {exc.strerror}", code=-errno.ENOENT) from None
    if m is None:
        raise InventoryError(f"{root}/vfe/__init__.py has no __version__", code=-errno.EINVAL)
    return m.group(1)


class LiveUpdate:
    """The running controller's side: ``rpc`` is virtnet's RPC server (its
    socket and clients move with the devices), ``inventory`` the functions
    (the net ones' records and representors move; any kind may refuse the
    update: FunctionKind.update_refusal)."""

    def __init__(self, daemon, rpc, argv: list[str], inventory):
        self.daemon = daemon
        self.rpc = rpc
        self.argv = list(argv)             # our own command line, for the new process
        self.inventory = inventory
        self.proc: subprocess.Popen | None = None
        self.chan: socket.socket | None = None
        self.state: dict = {"status": "idle"}

    # -- virtnet ---------------------------------------------------------------

    def status(self, p: dict | None = None) -> dict:
        return dict(self.state)

    def took_over(self, from_version: str, gap_ms: float) -> None:
        """We are the new process of a live update, done: what `virtnet
        update --status` shows here."""
        self.state = {"status": "success", "from": from_version, "to": __version__,
                      "pid": os.getpid(), "gap_ms": round(gap_ms, 3)}

    def start(self, p: dict) -> dict:
        if self.proc is not None:
            raise InventoryError(f"a live update to {self.state.get('to')} is in progress "
                                 f"(pid {self.proc.pid})", code=-errno.EBUSY)
        extra = sorted(set(p) - {"path"})
        if extra:
            # the new build runs with our own interpreter: nobody names what root executes
            raise InventoryError(f"update_start takes only path, not {', '.join(extra)} (the new build "
                                 f"runs with the controller's own interpreter, {sys.executable})",
                                 code=-errno.EINVAL)
        try:
            root = check_build(p.get("path"))
        except BuildError as exc:
            raise InventoryError(f"cannot update: {exc}", code=-errno.EPERM) from None
        for kind in self.inventory.kinds.values():
            refusal = kind.update_refusal()
            if refusal:
                raise InventoryError(refusal, code=-errno.EBUSY)
        version = build_version(root)
        try:
            engine_fd, so = pin_engine(root)       # the bytes checked are the bytes the new process loads
        except BuildError as exc:
            raise InventoryError(f"cannot update to {version}: {exc}", code=-errno.EPERM) from None
        try:
            self._spawn(root, version, engine_fd, so)
        finally:
            os.close(engine_fd)
        log.info("live update to %s: started pid %d (%s)", version, self.proc.pid, root)
        return {"status": "started", "from": __version__, "to": version, "pid": self.proc.pid}

    def _spawn(self, root: str, version: str, engine_fd: int, so: str) -> None:
        try:
            abi = read_abi(engine_fd, name=so)
        except AbiError as exc:
            raise InventoryError(f"cannot update to {version}: {exc}; {VERSION_HINT}",
                                 code=-errno.EPROTONOSUPPORT) from None
        if abi != ENGINE_ABI:
            raise InventoryError(f"cannot update to {version}: its engine ABI is {abi}, the running "
                                 f"controller's is {ENGINE_ABI}; {VERSION_HINT}", code=-errno.EPROTONOSUPPORT)
        ours, theirs = handover.channel()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        # -P: not the current directory first on sys.path -- the build under root is;
        # --engine-fd: its engine comes from the sealed copy checked above, not from root
        argv = [sys.executable, "-P", "-m", "vfe.cli.controller", *self.argv,
                "--takeover-fd", str(theirs.fileno()), "--engine-fd", str(engine_fd)]
        try:
            self.proc = subprocess.Popen(argv, pass_fds=[theirs.fileno(), engine_fd], env=env,
                                         stdin=subprocess.DEVNULL)
        except OSError as exc:
            ours.close()
            raise InventoryError(f"cannot start {sys.executable}: {exc.strerror}",
                                 code=-(exc.errno or errno.EIO)) from None
        finally:
            theirs.close()
        ours.setblocking(False)
        self.chan = ours
        self.daemon.add_reader(self, "update")
        self.state = {"status": "in progress", "from": __version__, "to": version, "pid": self.proc.pid,
                      "engine_abi": abi, "started": time.time()}

    # -- the channel --------------------------------------------------------------

    def fileno(self) -> int:
        return self.chan.fileno()

    def on_readable(self) -> None:
        try:
            kind, body, fds = handover.recv(self.chan, timeout=1.0)
        except (handover.HandoverError, OSError) as exc:
            self._failed(f"the new controller went away before taking over ({exc})")
            return
        handover.close_fds(fds)
        if kind != "hello":
            self._failed(f"the new controller said {kind!r} instead of hello")
            return
        if body.get("engine_abi") != ENGINE_ABI:
            self._failed(f"the new controller's engine ABI is {body.get('engine_abi')}, ours {ENGINE_ABI}")
            return
        self._move()

    def _handed_over(self) -> list:
        return self.inventory.of_kind(HANDED_OVER_KIND)

    def _functions(self):
        for f in self._handed_over():
            record = RecoveryRecord.of(f).validate().to_json()         # as its file has it
            rep = f.representor
            info = None if rep is None or rep.closed else {
                "name": rep.name, "ifindex": rep.ifindex, "mac": rep.mac, "multi_queue": rep.multi_queue}
            extra = {"qmp_id": f.qmp_id, "lm_state": f.lm_state,
                     "paused": bool(f.model.rings.paused) if f.model is not None else False}
            yield f, record, info, extra

    def _move(self) -> None:
        t0 = time.monotonic()
        endpoints = [ep for ep in self.daemon.endpoints]
        busy = [ep.name for ep in endpoints if ep.conn is not None and not ep.conn.idle]
        if busy:
            self._failed(f"a vhost-user message is half-received on {', '.join(busy)}; retry")
            return
        paused = []
        detached = []
        self.chan.settimeout(MOVE_TIMEOUT)     # sends may wait for the new process to read
        try:
            for ep in endpoints:
                if ep.session is not None:
                    ep.session.pause()
                    paused.append(ep)
            for f in self._handed_over():
                if f.model is not None and f.representor is not None:
                    f.model.rings.set_tap(-1)
                    detached.append(f)
            functions = list(self._functions())
            handover.send(self.chan, "begin", {"version": __version__, "records": len(functions),
                                               "endpoints": len(endpoints), "paused_at": t0},
                          [self.rpc.fileno()])
            for f, record, info, extra in functions:
                fds = [f.representor.fd] if info is not None else []
                handover.send(self.chan, "function", {"record": record, "representor": info,
                                                      "extra": extra}, fds)
            for ep in endpoints:
                fds: list[int] = []
                state = ep.export(fds)
                handover.send(self.chan, "endpoint", {"state": state}, fds)
            handover.send(self.chan, "end")
            kind, body = self._await_answer()
            if kind != "done":
                raise handover.HandoverError(body.get("reason") or f"answered {kind!r}")
        except Exception as exc:
            # the new process may have started rings on the same guest
            # memory: it must be gone before ours run again
            self._stop_new()
            for ep in paused:
                try:
                    ep.session.resume()
                except Exception:          # keep resuming the others
                    log.exception("%s: cannot resume its rings", ep.name)
            for f in detached:
                try:
                    f.model.rings.set_tap(f.representor.fd)
                except Exception:
                    log.exception("%s: cannot re-attach its representor", f.vuid)
            self._failed(f"the new controller could not take over: {exc}")
            log.info("live update: every device is still served here (rings resumed after %.1f ms)",
                     (time.monotonic() - t0) * 1e3)
            return
        log.info("live update: pid %d (%s) runs every device now (data path gap %.1f ms); exiting",
                 self.proc.pid, self.state.get("to"), body.get("gap_ms", -1))
        for h in logging.getLogger().handlers:
            h.flush()
        os._exit(0)          # nothing of ours may be torn down: it is all the new process's now

    # -- virtnet while the devices move ----------------------------------------------
    #
    # From the pause until the new process answers, the devices are neither
    # here nor there.  virtnet keeps being answered (by this process, from a
    # private selector: the daemon's also watches the vhost-user sockets,
    # which are no longer ours to read): list and query show every device as
    # "migrating", and commands that would change one are refused with
    # EAGAIN, as the seed describes -- retry once the update is done.

    CHANGES = frozenset({"hotplug", "unplug", "modify", "sriov_numvfs", "vf_state", "update_start"})

    @property
    def moving(self) -> bool:
        return self.state.get("status") == "moving"

    def answer_while_moving(self, method: str, params: dict, call):
        if method in self.CHANGES or method.startswith(("bdev_", "controller_virtio_blk_")):
            raise InventoryError(f"every device is migrating to the new controller (pid "
                                 f"{self.state.get('pid')}, live update); retry in a moment",
                                 code=-errno.EAGAIN)
        result = call()
        if method in ("list", "query") and isinstance(result, dict):
            for entry in result.get("devices", []):
                entry["status"] = "migrating"
        return result

    def _await_answer(self) -> tuple[str, dict]:
        rpc = self.rpc
        moved = [rpc, *rpc.clients]
        own = selectors.DefaultSelector()
        for obj in moved:
            events = self.daemon.sel.get_key(obj).events
            self.daemon.sel.unregister(obj)
            own.register(obj, events, ("rpc", obj))
        rpc.selector = own
        self.daemon.sel.unregister(self)
        own.register(self.chan, selectors.EVENT_READ, ("update", None))
        self.state = dict(self.state, status="moving")
        deadline = time.monotonic() + MOVE_TIMEOUT
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise handover.HandoverError(f"no answer in {MOVE_TIMEOUT:.0f} s")
                for key, _ in own.select(left):
                    kind, obj = key.data
                    if kind == "update":
                        kind, body, fds = handover.recv(self.chan, timeout=1.0)
                        handover.close_fds(fds)
                        return kind, body
                    obj.on_readable()
        finally:
            self.state = dict(self.state, status="in progress")
            own.unregister(self.chan)
            self.daemon.sel.register(self, selectors.EVENT_READ, ("update", self))
            for obj in [rpc, *rpc.clients]:
                key = own.get_key(obj)
                own.unregister(obj)
                self.daemon.sel.register(obj, key.events, ("rpc", obj))
            rpc.selector = self.daemon.sel
            own.close()

    def _failed(self, reason: str) -> None:
        log.error("live update to %s failed: %s", self.state.get("to"), reason)
        try:
            self.daemon.sel.unregister(self)
        except (KeyError, ValueError):
            pass
        if self.chan is not None:
            self.chan.close()
            self.chan = None
        self._stop_new()
        self.state = dict(self.state, status="failed", reason=reason, finished=time.time())

    def _stop_new(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None


class Takeover:
    """The new controller's side: receive everything, then say done."""

    def __init__(self, fd: int):
        self.chan = socket.socket(fileno=fd)
        self.chan.setblocking(True)
        self.from_version = "?"
        self.paused_at = 0.0
        self.records: list[RecoveryRecord] = []
        self.representors: dict[str, tuple[dict, int]] = {}
        self.run_time_state: dict[str, dict] = {}     # by VUID: the "extra" of each function
        self.received: list[handover.Received] = []
        self.rpc_fd = -1

    def hello(self) -> None:
        handover.send(self.chan, "hello", {"version": __version__, "engine_abi": ENGINE_ABI,
                                           "pid": os.getpid()})

    def receive(self, daemon) -> None:
        """Everything the old controller hands over, up to "end"; endpoints
        go to ``daemon.inherited`` (Endpoint.open serves on them)."""
        while True:
            kind, body, fds = handover.recv(self.chan, timeout=MOVE_TIMEOUT)
            got = handover.Received(fds)
            self.received.append(got)
            if kind == "begin":
                self.from_version = body.get("version", "?")
                self.paused_at = body.get("paused_at", 0.0)
                self.rpc_fd = got.claim(0)
            elif kind == "function":
                rec = RecoveryRecord.from_json(body["record"])
                self.records.append(rec)
                self.run_time_state[rec.vuid] = body.get("extra") or {}
                if body.get("representor"):
                    info = body["representor"]
                    self.representors[info["name"]] = (info, got.claim(0))
            elif kind == "endpoint":
                state = body["state"]
                daemon.inherited[state["name"]] = (state, got)
            elif kind == "end":
                return
            else:
                raise handover.HandoverError(f"unexpected {kind!r} message")

    def handed_over(self, kind: str) -> RecoveryLoad | None:
        """The records of ``kind``'s functions as the old process ran them;
        None for a kind whose records come from its files."""
        return RecoveryLoad(list(self.records), []) if kind == HANDED_OVER_KIND else None

    def representor_factory(self, real):
        """`real` (create/attach/exists) for new names; the handed-over
        representors for theirs."""
        def exists(name: str, **kw) -> bool:
            return name in self.representors or real.exists(name, **kw)

        def attach(name: str, **kw):
            if name in self.representors:
                info, fd = self.representors.pop(name)
                return Representor(info["name"], fd, info["ifindex"], info["mac"],
                                   multi_queue=info["multi_queue"])
            return real.attach(name, **kw)

        return types.SimpleNamespace(create=real.create, attach=attach, exists=exists)

    def done(self, daemon, rpc_server) -> float:
        """Everything runs here: take the socket files as ours, tell the old
        controller to go.  Returns the data-path gap in ms."""
        left = sorted(daemon.inherited)
        if left:
            raise RuntimeError(f"handed-over endpoints nobody declared: {', '.join(left)}")
        if self.representors:
            raise RuntimeError(f"handed-over representors of no function: {', '.join(self.representors)}")
        gap_ms = (time.monotonic() - self.paused_at) * 1e3
        sdnotify.notify(mainpid=os.getpid())          # systemd: the service is us before the old one exits
        handover.send(self.chan, "done", {"pid": os.getpid(), "gap_ms": gap_ms})
        for ep in daemon.endpoints:
            if ep.listener is not None:
                ep.listener.owns_path = True
        rpc_server.owns_path = True
        for got in self.received:
            got.close_unclaimed()
        self.chan.close()
        return gap_ms

    def fail(self, reason: str) -> None:
        try:
            handover.send(self.chan, "failed", {"reason": reason})
        except OSError:
            pass
