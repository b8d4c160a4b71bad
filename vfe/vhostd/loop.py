"""vfe-vhostd's event loop: one thread, one selector."""
from __future__ import annotations

import logging
import os
import selectors
import time

from vfe.vhostd.service import VhostService

log = logging.getLogger("vfe.vhostd")


class Loop:
    """vfe-vhostd's one thread: a selector whose keys' data are callables,
    plus the relays' retry timers."""

    def __init__(self, service: VhostService):
        self.service = service
        self.sel = service.sel
        self.stopping = False
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sel.register(self._r, selectors.EVENT_READ, self._drain)

    def _drain(self) -> None:
        try:
            os.read(self._r, 64)
        except OSError:
            pass

    def stop(self) -> None:
        """From a signal handler or another thread."""
        self.stopping = True
        try:
            os.write(self._w, b"x")
        except OSError:
            pass

    def run_once(self, max_wait: float = 1.0) -> None:
        now = time.monotonic()
        timeout = max_wait
        for relay in self.service.relays():
            try:
                due = relay.tick(now)
            except Exception:
                log.exception("%s: retry failed", relay.name)
                continue
            if due is not None:
                timeout = min(timeout, max(0.0, due - now))
        for key, _ in self.sel.select(timeout):
            try:
                key.data()
            except Exception:
                log.exception("event handler failed")

    def run(self) -> None:
        while not self.stopping:
            self.run_once()

    def close(self) -> None:
        try:
            self.sel.unregister(self._r)
        except (KeyError, ValueError):
            pass
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
