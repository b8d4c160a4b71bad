"""A synchronous QMP handle built on qemu.qmp's asyncio client.

Why not ``qemu.qmp.legacy``: it runs its coroutines on the calling thread's
event loop, which breaks when the caller already runs a loop (pytest-asyncio,
our own asyncio daemons) and ties every VM to one thread. Here each monitor
owns a private event loop in a daemon thread and callers block on
``run_coroutine_threadsafe`` futures, so it works from any thread.

A leaf: the controller's hot-plug into a running QEMU (controller/hostqmp.py)
and the test guest's VMs (vfe/guest/vm.py) both use it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from qemu.qmp import ConnectError, ExecuteError, QMPClient

__all__ = ["Monitor", "ExecuteError"]


class Monitor:
    def __init__(self, path: str, name: str = "vm"):
        self.path = path
        self.name = name
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name=f"qmp-{name}", daemon=True)
        self._thread.start()
        self._client: QMPClient | None = None

    def _call(self, coro, timeout: float | None) -> Any:
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise

    @property
    def connected(self) -> bool:
        return self._client is not None

    def connect(self, timeout: float = 30.0) -> None:
        """Connect and negotiate. QEMU answers only once its main loop runs
        (e.g. not while a server=on vhost-user netdev waits for its peer), so
        retry until ``timeout``."""
        if self._client is not None:
            return
        deadline = time.monotonic() + timeout

        async def attempt() -> QMPClient:
            client = QMPClient(self.name)
            await client.connect(self.path)
            return client

        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                self._client = self._call(
                    asyncio.wait_for(attempt(), deadline - time.monotonic()),
                    timeout=None)
                return
            except (ConnectError, OSError, asyncio.TimeoutError) as e:
                last = e
                time.sleep(0.05)
        raise TimeoutError(f"QMP {self.path}: no connection within {timeout}s ({last})")

    def command(self, cmd: str, args: dict | None = None, timeout: float | None = 60.0) -> Any:
        """Execute ``cmd``; return its 'return' value or raise ExecuteError."""
        self.connect(timeout=min(timeout or 30.0, 30.0))
        assert self._client is not None
        return self._call(self._client.execute(cmd, args or None), timeout)

    def wait_event(self, name: str | None = None, timeout: float = 60.0) -> dict:
        """Return the next event (named ``name`` if given); raise TimeoutError."""
        self.connect(timeout=min(timeout, 30.0))
        assert self._client is not None
        listener = self._client.events

        async def next_event() -> dict:
            while True:
                ev = await listener.get()
                if name is None or ev["event"] == name:
                    return dict(ev)

        return self._call(asyncio.wait_for(next_event(), timeout), timeout=None)

    def clear_events(self) -> None:
        if self._client is not None:
            self._loop.call_soon_threadsafe(self._client.events.clear)

    def close(self) -> None:
        if self._client is not None:
            try:
                self._call(self._client.disconnect(), timeout=5)
            except Exception:  # QEMU may be gone already: nothing to tidy
                pass
            self._client = None
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        if not self._loop.is_running():
            self._loop.close()
