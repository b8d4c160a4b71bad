"""What the controller tells Prometheus: every device's counters (the same
numbers `virtnet stats` prints), the controller's own gauges and the
process's, as a prometheus_client collector read on the control thread.

Per queue (labels ``device``, ``queue``, ``direction``: rx is to the guest,
tx from it, req a blk request queue), one metric per counter the engine
keeps, ``vfe_<kind>_<counter>_total``; a counter named ``dropped_<reason>``
becomes ``vfe_<kind>_drops_total{reason=...}`` and ``requests_<type>``
``vfe_<kind>_requests_by_type_total{type=...}``.  Per device (label
``device``), ``vfe_<kind>_device_<counter>_total``.  Gauges are the values
that go down as well as up (GAUGES).  ``device`` is the function's VUID in
service mode and the ``--device`` name otherwise.

Controller gauges: ``vfe_functions{kind,type,state}`` and
``vfe_sf_pool_sfs{ib_dev,state}``; the process: prometheus_client's
``process_*``.
"""
from __future__ import annotations

import re
from typing import Iterable, Iterator

from prometheus_client import ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

from vfe.controller.functions import HOTPLUG, STATIC
from vfe.devices.blk import BlkDeviceModel

# counters that are levels, not totals
GAUGES = frozenset({"inflight", "learned", "aio_threads"})
_LABELS = ("device", "queue", "direction")
_NAME_OK = re.compile(r"[a-z_][a-z0-9_]*")


def device_kind(model) -> str:
    return "blk" if isinstance(model, BlkDeviceModel) else "net"


class _Families:
    """Metric families by name, made on first use (a counter a device kind
    does not keep is not exported at all)."""

    def __init__(self):
        self.by_name: dict[str, Metric] = {}

    def add(self, name: str, gauge: bool, doc: str, labels: tuple[str, ...], values: tuple[str, ...],
            value: float) -> None:
        fam = self.by_name.get(name)
        if fam is None:
            cls = GaugeMetricFamily if gauge else CounterMetricFamily
            fam = self.by_name[name] = cls(name, doc, labels=list(labels))
        fam.add_metric(list(values), value)


def _queue_metric(kind: str, counter: str) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """(metric name, extra label names, extra label values) of a queue counter."""
    for prefix, label, metric in (("dropped_", "reason", "drops"), ("requests_", "type", "requests_by_type")):
        if counter.startswith(prefix):
            return f"vfe_{kind}_{metric}", (label,), (counter[len(prefix):],)
    return f"vfe_{kind}_{counter}", (), ()


class DeviceCollector:
    """Every served device's counters.  ``devices()`` yields (name, model)."""

    def __init__(self, devices):
        self.devices = devices

    def collect(self) -> Iterator[Metric]:
        fams = _Families()
        for name, model in self.devices():
            kind = device_kind(model)
            counters = model.counters()
            for q in counters["queues"]:
                base = (name, str(q["queue"]), q["direction"])
                for counter, value in q.items():
                    if counter in ("queue", "direction") or not _NAME_OK.fullmatch(counter):
                        continue
                    metric, extra, extra_values = _queue_metric(kind, counter)
                    fams.add(metric, counter in GAUGES, f"{kind} queue counter {counter}",
                             _LABELS + extra, base + extra_values, value)
            for counter, value in counters["device"].items():
                if _NAME_OK.fullmatch(counter):
                    fams.add(f"vfe_{kind}_device_{counter}", counter in GAUGES,
                             f"{kind} device counter {counter}", ("device",), (name,), value)
        yield from fams.by_name.values()


class ControllerCollector:
    """Service mode: the functions by kind, type and state, and the SF pools."""

    def __init__(self, functions, sf_pools):
        self.functions = functions          # () -> iterable of functions
        self.sf_pools = sf_pools            # () -> {ib_dev: SfPool}

    def collect(self) -> Iterator[Metric]:
        funcs = GaugeMetricFamily("vfe_functions", "emulated functions by kind, type and state",
                                  labels=["kind", "type", "state"])
        count: dict[tuple[str, str, str], int] = {}
        for f in self.functions():
            key = (f.kind, function_type(f), "bound" if f.bound() else
                   ("connected" if f.endpoint is not None and f.endpoint.session is not None else "waiting"))
            count[key] = count.get(key, 0) + 1
        for key, n in sorted(count.items()):
            funcs.add_metric(list(key), n)
        yield funcs
        sfs = GaugeMetricFamily("vfe_sf_pool_sfs", "scalable functions by RDMA device and state",
                                labels=["ib_dev", "state"])
        for ib_dev, pool in sorted(self.sf_pools().items()):
            s = pool.stats()
            for state in ("in_use", "pooled", "available"):
                sfs.add_metric([ib_dev, state], s[state])
        yield sfs


def function_type(f) -> str:
    """static_pf, hotplug_pf or vf (a blk PF: pf)."""
    if not f.is_pf:
        return "vf"
    return {STATIC: "static_pf", HOTPLUG: "hotplug_pf"}.get(f.device_type, "pf") if f.kind == "net" else "pf"


def registry(collectors: Iterable) -> CollectorRegistry:
    """A private registry (not prometheus_client's global one) with the
    process collector and ``collectors``."""
    reg = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=reg)
    for c in collectors:
        reg.register(c)
    return reg
