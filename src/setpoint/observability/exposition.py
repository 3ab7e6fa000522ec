"""A metrics snapshot -> the Prometheus text format, through prometheus_client's exposition code."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from setpoint.observability.metrics import COUNTERS, GAUGES, HISTOGRAMS, SHARED_GAUGES, Snapshot, split

__all__ = ["render"]

_MICROS = {"setpoint_cost_usd", "setpoint_cache_saved_usd"}  # kept in integer micro-dollars


class _SnapshotCollector(Collector):
    def __init__(self, snap: Snapshot, per_worker: bool) -> None:
        self._snap = snap
        self._per_worker = per_worker

    def collect(self) -> Iterator[Metric]:
        counters = self._snap.get("counters", {})
        for name, (doc, labels) in COUNTERS.items():
            fam = CounterMetricFamily(name, doc, labels=labels)
            scale = 1e-6 if name in _MICROS else 1
            for key, value in sorted(counters.get(name, {}).items()):
                fam.add_metric(split(key), value * scale)
            yield fam
        hists = self._snap.get("histograms", {})
        for name, (doc, labels, bounds) in HISTOGRAMS.items():
            fam_h = HistogramMetricFamily(name, doc, labels=labels)
            for key, row in sorted(hists.get(name, {}).items()):
                cumulative, buckets = 0.0, []
                for le, n in zip((*(repr(float(b)) for b in bounds), "+Inf"), row[:-1], strict=True):
                    cumulative += n
                    buckets.append((le, cumulative))
                fam_h.add_metric(split(key), buckets, row[-1])
            yield fam_h
        gauges = self._snap.get("gauges", {})
        for name, (doc, labels) in GAUGES.items():
            names = (*labels, "worker") if self._per_worker and name not in SHARED_GAUGES else labels
            fam_g = GaugeMetricFamily(name, doc, labels=names)
            for key, value in sorted(gauges.get(name, {}).items()):
                fam_g.add_metric(split(key), value)
            yield fam_g


def render(snap: Snapshot, *, per_worker: bool) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snap, per_worker))
    return generate_latest(registry)
