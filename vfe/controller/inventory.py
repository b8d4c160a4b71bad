"""The controller's inventory: every function of every kind, the kinds that
made them, and the `virtnet` verbs that name a function of any kind -- list,
query, modify, unplug, vf_state -- answered by finding the function and
handing it to its kind (kind.FunctionKind).

Registering a kind (net_kind.NetKind, blk_kind.BlkKind) also registers its
own RPC verbs; ``methods()`` is the inventory's and every kind's, the table
the controller's RPC server is built with (control.py).  Every operation runs
on the daemon's control thread.
"""
from __future__ import annotations

import errno
from typing import Any

from vfe.controller.kind import FunctionKind, InventoryError, Method, stats_entry


class Inventory:
    def __init__(self):
        self.functions: list[Any] = []                 # every kind's, in creation order
        self.kinds: dict[str, FunctionKind] = {}       # in registration order
        self._methods: dict[str, Method] = {"list": self.list, "query": self.query, "modify": self.modify,
                                            "unplug": self.unplug, "vf_state": self.vf_state,
                                            "stats": self.stats}

    def register(self, kind: FunctionKind) -> None:
        """Add a kind of function and its RPC verbs (each verb has one owner)."""
        if kind.name in self.kinds:
            raise ValueError(f"a function kind named {kind.name!r} is registered already")
        verbs = dict(kind.methods())
        taken = sorted(set(verbs) & set(self._methods))
        if taken:
            raise ValueError(f"function kind {kind.name!r}: RPC method(s) {', '.join(taken)} "
                             f"registered already")
        self.kinds[kind.name] = kind
        self._methods.update(verbs)

    def methods(self) -> dict[str, Method]:
        """The RPC verbs: the virtnet ones, then every kind's."""
        return dict(self._methods)

    # -- the functions

    def add(self, f) -> None:
        if f.kind not in self.kinds:
            raise ValueError(f"{f.vuid}: no function kind {f.kind!r} is registered")
        self.functions.append(f)

    def discard(self, f) -> None:
        """Forget ``f`` (nothing if it is not here)."""
        self.functions = [x for x in self.functions if x is not f]

    def of_kind(self, name: str) -> list:
        return [f for f in self.functions if f.kind == name]

    def find(self, pf: int | None = None, vf: int | None = None, vuid: str | None = None,
             kind: str | None = None):
        """The function with that VUID (of ``kind``, or any), or -- virtnet's
        -p PF [-v VF] -- with that index among the functions of a kind
        virtnet numbers."""
        if vuid is not None:
            found = next((f for f in self.functions
                          if f.vuid == vuid and (kind is None or f.kind == kind)), None)
        else:
            want = -1 if vf is None else vf
            found = next((f for f in self.functions
                          if self.kinds[f.kind].numbered_by_virtnet and (kind is None or f.kind == kind)
                          and f.pf_id == pf and f.vf_id == want), None)
        if found is None:
            what = (f"VUID {vuid}" if vuid is not None
                    else f"PF {pf}" + (f" VF {vf}" if vf is not None else ""))
            raise InventoryError(f"no such device: {what}", code=-errno.ENODEV)
        return found

    def pick(self, params: dict, kind: str | None = None):
        """The function ``params`` name: -u VUID, or -p PF [-v VF]."""
        if params.get("vuid"):
            return self.find(vuid=params["vuid"], kind=kind)
        if params.get("pf") is None:
            raise InventoryError("give a device: -p PF [-v VF] or -u VUID")
        return self.find(pf=int(params["pf"]), vf=None if params.get("vf") is None else int(params["vf"]),
                         kind=kind)

    def shutdown(self) -> None:
        """Every kind closes its functions (the last registered first)."""
        for kind in reversed(list(self.kinds.values())):
            kind.shutdown()

    # -- the virtnet verbs

    def _listed(self) -> list[tuple[FunctionKind, Any]]:
        """(kind, function) of every function, in `virtnet list` order: kind
        by kind, each in its own order."""
        return [(kind, f) for kind in self.kinds.values()
                for f in kind.in_list_order(self.of_kind(kind.name))]

    def list(self, p: dict) -> dict:
        controller: dict = {}
        for kind in self.kinds.values():
            controller |= kind.summary()
        return {"controller": controller, "devices": [f.list_entry() for _, f in self._listed()]}

    def query(self, p: dict) -> dict:
        brief = bool(p.get("brief"))
        if p.get("all"):
            return {"devices": [kind.query_entry(f, brief) for kind, f in self._listed()]}
        f = self.pick(p)
        return {"devices": [self.kinds[f.kind].query_entry(f, brief)]}

    def stats(self, p: dict) -> dict:
        """`virtnet stats`: the counters of every function (all) or of one,
        the same numbers /metrics serves (metrics.py)."""
        chosen = [f for _, f in self._listed()] if p.get("all") else [self.pick(p)]
        return {"devices": [stats_entry(f) for f in chosen]}

    def modify(self, p: dict) -> dict:
        f = self.pick(p)
        return self.kinds[f.kind].modify(f, p)

    def unplug(self, p: dict) -> dict:
        f = self.pick(p)
        return self.kinds[f.kind].unplug(f, p)

    def vf_state(self, p: dict) -> dict:
        f = self.pick(p)
        return self.kinds[f.kind].vf_state(f, p)
