"""Request metrics: plain-dict counters and fixed-bucket histograms on the request path, rendered in
the Prometheus text format only when scraped.

The request path pays for a handful of dict updates and one `bisect` per histogram (a few
microseconds); prometheus_client's own metric objects take a lock and a label lookup per update,
which we measured at several times that. Rendering goes through prometheus_client's exposition code
(`generate_latest` over a custom collector), so the format is the library's, not ours.

With `--workers N` every worker keeps its own numbers and writes a snapshot file every few seconds
(`<data_dir>/metrics/<pid>.json`); a scrape, answered by whichever worker the kernel picks, merges
its live numbers with the other live workers' snapshots (counters and histograms summed, gauges
labelled by `worker`).
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson

from setpoint.proxy.context import RequestContext

__all__ = ["Gauge", "RequestMetrics", "Snapshot", "merge_snapshots", "read_peer_snapshots", "write_snapshot"]

# Seconds. Latency and TTFT: LLM calls take 50 ms to minutes. Overhead: tens of microseconds up.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_SEP = "\x1f"  # joins label values into one dict key (never appears in model or deployment names)

Labels = tuple[str, ...]
# name -> (help, label names, {joined label values: value})
Counters = dict[str, dict[str, float]]
# name -> {joined label values: [bucket counts..., +Inf count, sum]}
Histograms = dict[str, dict[str, list[float]]]
Snapshot = dict[str, Any]  # {"counters": Counters, "histograms": Histograms, "gauges": {...}}

COUNTERS: dict[str, tuple[str, Labels]] = {
    "setpoint_requests": ("Requests answered, by model, deployment, HTTP status and error code",
                          ("model", "deployment", "status", "code")),
    "setpoint_tokens": ("Tokens by kind (prompt, completion, cached, reasoning)", ("model", "deployment", "kind")),
    "setpoint_cost_usd": ("Cost charged, in US dollars", ("model", "deployment")),
    "setpoint_cache_requests": ("Requests that consulted the response cache, by result", ("model", "result")),
    "setpoint_cache_saved_usd": ("Upstream cost avoided by cache hits, in US dollars", ("model",)),
    "setpoint_upstream_attempts": ("Upstream attempts (retries and fallbacks included)", ("deployment",)),
    "setpoint_http_refusals": ("Requests refused by the edge before a request existed (malformed HTTP, "
                               "oversize or unterminated heads, bad chunking, no Host): they have no record",
                               ("status", "code")),
}
HISTOGRAMS: dict[str, tuple[str, Labels, tuple[float, ...]]] = {
    "setpoint_request_duration_seconds": ("Whole request time as the client sees it", ("model", "deployment"), LATENCY_BUCKETS),
    "setpoint_ttft_seconds": ("Time to the first streamed byte", ("model", "deployment"), LATENCY_BUCKETS),
    "setpoint_overhead_seconds": ("Gateway time before the response started, excluding upstream waits",
                                  ("endpoint",), OVERHEAD_BUCKETS),
}


class _Hist:
    __slots__ = ("bounds", "series")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.series: dict[str, list[float]] = {}

    def observe(self, key: str, value: float) -> None:
        row = self.series.get(key)
        if row is None:
            row = self.series[key] = [0.0] * (len(self.bounds) + 2)
        row[bisect.bisect_left(self.bounds, value)] += 1
        row[-1] += value


class RequestMetrics:
    """What every finished request adds; one `observe` call per request."""

    def __init__(self) -> None:
        self.counters: Counters = {name: {} for name in COUNTERS}
        self._hists = {name: _Hist(bounds) for name, (_, _, bounds) in HISTOGRAMS.items()}
        c = self.counters
        self._requests, self._tokens, self._cost = c["setpoint_requests"], c["setpoint_tokens"], c["setpoint_cost_usd"]
        self._cache, self._saved = c["setpoint_cache_requests"], c["setpoint_cache_saved_usd"]
        self._attempts = c["setpoint_upstream_attempts"]
        self._refusals = c["setpoint_http_refusals"]
        h = self._hists
        self._latency = h["setpoint_request_duration_seconds"]
        self._ttft = h["setpoint_ttft_seconds"]
        self._overhead = h["setpoint_overhead_seconds"]

    def observe(self, ctx: RequestContext, latency_ms: float) -> None:
        model = ctx.model or "-"
        dep = ctx.deployment.name if ctx.deployment is not None else "-"
        md = model + _SEP + dep
        key = f"{md}{_SEP}{ctx.status}{_SEP}{ctx.error_code or ''}"
        reqs = self._requests
        reqs[key] = reqs.get(key, 0) + 1
        u = ctx.usage
        tokens = self._tokens
        for kind, n in (("prompt", u.prompt_tokens), ("completion", u.completion_tokens),
                        ("cached", u.cached_tokens), ("reasoning", u.reasoning_tokens)):
            if n:
                k = md + _SEP + kind
                tokens[k] = tokens.get(k, 0) + n
        if ctx.cost_micros:
            self._cost[md] = self._cost.get(md, 0) + ctx.cost_micros
        cache = ctx.annotations.get("cache")
        if cache is not None:
            k = model + _SEP + cache
            self._cache[k] = self._cache.get(k, 0) + 1
            saved = ctx.annotations.get("saved_micros")
            if saved:
                self._saved[model] = self._saved.get(model, 0) + saved
        attempts = ctx.annotations.get("attempts")
        if attempts:
            for name in attempts:
                self._attempts[name] = self._attempts.get(name, 0) + 1
        self._latency.observe(md, latency_ms / 1000)
        if ctx.ttft_ms is not None:
            self._ttft.observe(md, ctx.ttft_ms / 1000)
        if ctx.overhead_ms is not None:
            self._overhead.observe(ctx.endpoint, ctx.overhead_ms / 1000)

    def refused(self, status: int, code: str) -> None:
        """A request the edge answered itself, before it could be parsed into a request."""
        key = f"{status}{_SEP}{code}"
        self._refusals[key] = self._refusals.get(key, 0) + 1

    def snapshot(self, gauges: Mapping[str, Mapping[str, float]]) -> Snapshot:
        return {
            "counters": self.counters,
            "histograms": {name: h.series for name, h in self._hists.items()},
            "gauges": gauges,
        }


# name -> (help, label names); gauge values are read from live state at scrape time.
GAUGES: dict[str, tuple[str, Labels]] = {
    "setpoint_breaker_state": ("Circuit breaker: 0 closed, 1 half-open, 2 open", ("deployment",)),
    "setpoint_concurrency_limit": ("Adaptive concurrency limit", ("deployment",)),
    "setpoint_inflight": ("Upstream requests in flight", ("deployment",)),
    "setpoint_queue_depth": ("Requests waiting for a concurrency slot", ("deployment",)),
    "setpoint_shed": ("Requests shed by the concurrency limiter (since start)", ("deployment",)),
    "setpoint_retry_budget_available": ("Retries the global retry budget would allow now", ()),
    "setpoint_spool_pending_bytes": ("Request-log bytes spooled and not yet in the store", ()),
    "setpoint_spool_lag_seconds": ("Seconds since the request log last drained successfully", ()),
    "setpoint_budget_limit_usd": ("Budget limit", ("scope", "entity", "period")),
    "setpoint_budget_remaining_usd": ("Budget remaining (limit minus spend and holds)", ("scope", "entity", "period")),
}
Gauge = dict[str, float]  # joined label values -> value
# Read from shared state by the worker answering the scrape: never labelled per worker.
SHARED_GAUGES = frozenset({"setpoint_budget_limit_usd", "setpoint_budget_remaining_usd"})


def write_snapshot(directory: Path, snap: Snapshot) -> None:
    """Atomically replace this process's snapshot file."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{os.getpid()}.json.tmp"
    tmp.write_bytes(orjson.dumps(snap))
    os.replace(tmp, directory / f"{os.getpid()}.json")


def read_peer_snapshots(directory: Path, newer_than: float = 0.0) -> Iterator[tuple[int, Snapshot]]:
    """Snapshots of the other live worker processes, refreshed after `newer_than` (epoch seconds);
    files of dead processes are removed."""
    if not directory.is_dir():
        return
    me = os.getpid()
    for path in directory.glob("*.json"):
        try:
            pid = int(path.stem)
        except ValueError:
            continue
        if pid == me:
            continue
        if not _alive(pid):
            path.unlink(missing_ok=True)
            continue
        try:
            if path.stat().st_mtime < newer_than:
                continue  # not refreshed: a hung worker, or a dead one whose pid was reused
            yield pid, orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue  # being replaced right now: skip it this scrape


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def merge_snapshots(snaps: Iterable[tuple[int, Snapshot]]) -> Snapshot:
    """Counters and histograms summed; gauges kept per worker (a `worker` label is appended)."""
    counters: Counters = {}
    hists: Histograms = {}
    gauges: dict[str, dict[str, float]] = {}
    for pid, snap in snaps:
        for name, series in snap.get("counters", {}).items():
            out = counters.setdefault(name, {})
            for k, v in series.items():
                out[k] = out.get(k, 0) + v
        for name, series in snap.get("histograms", {}).items():
            out_h = hists.setdefault(name, {})
            for k, row in series.items():
                have = out_h.get(k)
                out_h[k] = list(row) if have is None else [a + b for a, b in zip(have, row, strict=True)]
        for name, series in snap.get("gauges", {}).items():
            out_g = gauges.setdefault(name, {})
            for k, v in series.items():
                out_g[(k + _SEP if k else "") + str(pid)] = v
    return {"counters": counters, "histograms": hists, "gauges": gauges}


def split(key: str) -> list[str]:
    return key.split(_SEP) if key else []


def join(*values: str) -> str:
    return _SEP.join(values)
