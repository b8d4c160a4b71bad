"""Scalable functions: the SF numbers of one port (RDMA device).

Each virtio-net function needs a dedicated SF.  The controller only uses SF
numbers >= 1000 (the seed), at most PF_TOTAL_SF of them exist at a time on a
port, and an SF is in one of three states:

    free     not created; any number >= 1000 that is neither of the others
    pooled   created but idle, ready for the next function (the "SF pool")
    in use   attached to a function (the function's VUID is kept, when given)

What the seed says, and how it maps here:

* ``sf_pool_percent`` -- "the initial SF pool size as the percentage of
  PF_TOTAL_SF": ``start()`` creates SFs until ceil(PF_TOTAL_SF * percent /
  100) exist (pooled + in use).
* "Once VFs are destroyed, created SFs ... are not destroyed but are saved
  into the SF pool to be reused later": ``release(n)`` pools the SF.
* ``sf_pool_force_destroy`` -- "destroys the SF pool when stopped/restarted
  (and the SF pool is recreated if sf_pool_percent is not 0 when starting)":
  ``stop()`` destroys the pooled SFs, and so does ``start()`` for a pool left
  behind by a controller that did not stop cleanly.

A user may ask for a number (``virtnet hotplug -u SF_NUM``): ``reserve(n)``
takes it from the pool or creates it (evicting an idle pooled SF if the port
is at PF_TOTAL_SF).  ``cancel(n)`` undoes a ``reserve`` exactly (a function
that failed half-way leaves no stray SF), ``release(n)`` is the normal end of
a function.

The state is persisted (atomically) in ``<state dir>/sf_pool.<ib_dev>.json``
after every change, so a controller killed with -9 knows at restart which SFs
exist.  Optional hooks ``create(n)`` / ``destroy(n)`` let the controller make
and remove whatever backs an SF (e.g. a pooled representor); a ``create``
that raises leaves nothing recorded.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping

from vfe.controller.paths import atomic_write_json

SF_NUM_MIN = 1000
# A representor is named <prefix><pf_num>sf<sf_num>, e.g. en3f0pf0sf1001; with
# the 10-character "en3f0pf0sf" a Linux interface name (15 characters) has
# room for 5 digits.
SF_NUM_MAX = 99999


class SfPoolError(RuntimeError):
    """An SF request that cannot be met (the message says why)."""


class SfPoolExhausted(SfPoolError):
    """Every SF the port may have (PF_TOTAL_SF) is in use."""


class SfInUse(SfPoolError):
    """The requested SF number belongs to another function."""


def pool_target(total: int, percent: int) -> int:
    """SFs ``sf_pool_percent`` pre-creates: rounded up, so any non-zero
    percent reserves at least one."""
    if not 0 <= percent <= 100:
        raise ValueError(f"sf_pool_percent {percent} is out of [0, 100]")
    return min(total, math.ceil(total * percent / 100))


class SfPool:
    def __init__(self, state_dir: str | os.PathLike, total: int, percent: int = 0,
                 force_destroy: bool = False, *, ib_dev: str = "mlx5_0",
                 create: Callable[[int], None] | None = None,
                 destroy: Callable[[int], None] | None = None):
        if total < 0:
            raise ValueError(f"PF_TOTAL_SF {total} is negative")
        self.total = total
        self.percent = percent
        self.target = pool_target(total, percent)
        self.force_destroy = bool(force_destroy)
        self.ib_dev = ib_dev
        self.path = Path(state_dir) / f"sf_pool.{ib_dev}.json"
        self._create_hook = create
        self._destroy_hook = destroy
        self._in_use: dict[int, str | None] = {}
        self._pooled: set[int] = set()
        self._fresh: set[int] = set()        # reserved by creating (cancel destroys them)
        self._batch = 0                       # > 0: inside batch(): saves wait for its end
        self._unsaved = False
        self._load()

    @contextlib.contextmanager
    def batch(self):
        """Many changes, one save at the end (SR-IOV creates or destroys
        hundreds of functions at once; a save is two fsyncs).  A crash in the
        middle leaves the file behind the truth, which start() reconciles
        from the recovery files, as after any crash."""
        self._batch += 1
        try:
            yield self
        finally:
            self._batch -= 1
            if not self._batch and self._unsaved:
                self._save()

    # -- views ---------------------------------------------------------------

    @property
    def in_use(self) -> Mapping[int, str | None]:
        return dict(self._in_use)

    @property
    def pooled(self) -> frozenset[int]:
        return frozenset(self._pooled)

    @property
    def created(self) -> int:
        return len(self._in_use) + len(self._pooled)

    @property
    def available(self) -> int:
        """How many more functions can get an SF (pooled + still creatable)."""
        return len(self._pooled) + max(0, self.total - self.created)

    def user_of(self, n: int) -> str | None:
        """The VUID of the function SF ``n`` is attached to, if known."""
        return self._in_use.get(n)

    def stats(self) -> dict:
        return {"ib_dev": self.ib_dev, "total": self.total, "in_use": len(self._in_use),
                "pooled": len(self._pooled), "available": self.available,
                "pool_target": self.target}

    # -- lifecycle ------------------------------------------------------------

    def start(self, keep: Iterable[int] | Mapping[int, str | None] = ()) -> dict[str, list[int]]:
        """Called once when the controller starts.  ``keep``: the SFs of the
        functions being recovered (a mapping gives their functions' VUIDs); they stay
        (or become) in use.  Every other SF a previous run left in use
        returns to the pool (or is destroyed with sf_pool_force_destroy);
        pooled SFs beyond PF_TOTAL_SF are destroyed; then the pool is filled
        to sf_pool_percent.  Returns what happened, for the log."""
        users = dict(keep) if isinstance(keep, Mapping) else {n: self._in_use.get(n) for n in keep}
        for n in users:
            self._check_number(n)
        report: dict[str, list[int]] = {"kept": [], "pooled": [], "destroyed": [], "created": []}
        for n in sorted(self._in_use):
            if n not in users:
                del self._in_use[n]
                self._pooled.add(n)
                report["pooled"].append(n)
        for n, vuid in sorted(users.items()):
            self._pooled.discard(n)
            self._in_use[n] = vuid if vuid is not None else self._in_use.get(n)
            report["kept"].append(n)
        self._fresh.clear()
        self._save()
        if self.force_destroy:
            report["destroyed"] += self.destroy_pool()
        while self._pooled and self.created > self.total:
            n = max(self._pooled)
            self._destroy(n)
            report["destroyed"].append(n)
        while self.created < self.target:
            n = self._lowest_free()
            self._create(n)
            self._pooled.add(n)
            self._save()
            report["created"].append(n)
        return report

    def stop(self) -> list[int]:
        """Called when the controller stops cleanly: with
        sf_pool_force_destroy the pooled SFs are destroyed (returned)."""
        return self.destroy_pool() if self.force_destroy else []

    # -- functions ------------------------------------------------------------

    def reserve(self, preferred: int | None = None, vuid: str | None = None) -> int:
        """An SF for a new function: ``preferred`` if given (``hotplug -u``),
        else a pooled one (the lowest), else the lowest free number, created.
        Raises SfPoolExhausted, SfInUse or SfPoolError."""
        if preferred is not None:
            self._check_number(preferred)
            n = preferred
            if n in self._in_use:
                by = f" by {self._in_use[n]}" if self._in_use[n] else ""
                raise SfInUse(f"SF {n} on {self.ib_dev} is in use{by}")
            if n in self._pooled:
                self._pooled.discard(n)
            else:
                full = self.created >= self.total
                if full and not self._pooled:
                    raise self._exhausted()
                self._create(n)
                if full:                                   # make room: evict an idle SF
                    try:
                        self._destroy(max(self._pooled))
                    except BaseException:
                        self._destroy_quiet(n)
                        raise
                self._fresh.add(n)
        elif self._pooled:
            n = min(self._pooled)
            self._pooled.discard(n)
        else:
            if self.created >= self.total:
                raise self._exhausted()
            n = self._lowest_free()
            self._create(n)
            self._fresh.add(n)
        self._in_use[n] = vuid
        self._save()
        return n

    def release(self, n: int) -> None:
        """A function is gone: its SF goes back to the pool (not destroyed)."""
        if n not in self._in_use:
            raise SfPoolError(f"SF {n} on {self.ib_dev} is not in use")
        del self._in_use[n]
        self._fresh.discard(n)
        self._pooled.add(n)
        self._save()

    def cancel(self, n: int) -> None:
        """Undo ``reserve(n)`` for a function that could not be created: an
        SF created for it is destroyed, one taken from the pool goes back."""
        if n not in self._in_use:
            raise SfPoolError(f"SF {n} on {self.ib_dev} is not in use")
        del self._in_use[n]
        if n in self._fresh:
            self._fresh.discard(n)
            self._save()
            self._destroy_quiet(n)
        else:
            self._pooled.add(n)
            self._save()

    def destroy_pool(self) -> list[int]:
        """Destroy every pooled (idle) SF; in-use ones are untouched."""
        gone = []
        for n in sorted(self._pooled):
            self._destroy(n)
            gone.append(n)
        return gone

    # -- internals -----------------------------------------------------------

    def _check_number(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int):
            raise SfPoolError(f"SF number {n!r} is not an integer")
        if n < SF_NUM_MIN:
            raise SfPoolError(f"SF number {n} is below {SF_NUM_MIN}: virtio-net-controller only uses "
                              f"SF numbers >= {SF_NUM_MIN}")
        if n > SF_NUM_MAX:
            raise SfPoolError(f"SF number {n} is above {SF_NUM_MAX}: its representor name would not "
                              f"fit a Linux interface name")

    def _exhausted(self) -> SfPoolExhausted:
        return SfPoolExhausted(
            f"no SF left on {self.ib_dev}: all PF_TOTAL_SF={self.total} SFs are in use "
            f"(unplug a device, or raise PF_TOTAL_SF with vfe-mlxconfig and restart the controller)")

    def _lowest_free(self) -> int:
        n = SF_NUM_MIN
        while n in self._in_use or n in self._pooled:
            n += 1
        if n > SF_NUM_MAX:
            raise self._exhausted()
        return n

    def _create(self, n: int) -> None:
        if self._create_hook is not None:
            self._create_hook(n)

    def _destroy(self, n: int) -> None:
        if self._destroy_hook is not None:
            self._destroy_hook(n)
        self._pooled.discard(n)
        self._save()

    def _destroy_quiet(self, n: int) -> None:
        if self._destroy_hook is not None:
            try:
                self._destroy_hook(n)
            except Exception:                    # noqa: BLE001 - cancel must not mask the first error
                pass

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise SfPoolError(f"{self.path}: unreadable SF pool state ({exc}); delete it to start "
                              f"with no SF created") from None
        try:
            in_use = {int(k): (v if isinstance(v, str) else None)
                      for k, v in dict(data.get("in_use", {})).items()}
            pooled = {int(n) for n in data.get("pooled", [])}
        except (TypeError, ValueError, AttributeError):
            raise SfPoolError(f"{self.path}: corrupt SF pool state; delete it to start with no SF "
                              f"created") from None
        for n in list(in_use) + list(pooled):
            if not SF_NUM_MIN <= n <= SF_NUM_MAX:
                raise SfPoolError(f"{self.path}: SF number {n} out of range; delete the file")
        self._in_use = in_use
        self._pooled = pooled - set(in_use)

    def _save(self) -> None:
        if self._batch:
            self._unsaved = True
            return
        self._unsaved = False
        atomic_write_json(self.path, {
            "ib_dev": self.ib_dev,
            "in_use": {str(n): self._in_use[n] for n in sorted(self._in_use)},
            "pooled": sorted(self._pooled),
        })
