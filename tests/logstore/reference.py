"""Brute-force answers to the `LogReader` questions, computed from the raw records in Python, and
the records to ask them about. The reader (rollups) must agree with these exactly (percentiles:
within the stated error bound)."""

from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from setpoint.logstore.reader import Totals
from setpoint.logstore.windows import Plan, align_step, finest_grain_at, plan

DAY = 86_400
ERROR_CODES = ["upstream_error", "rate_limited", "upstream_timeout", "budget_exceeded"]


def make_records(n: int, now: float, *, seed: int = 1, span_s: float = 40 * DAY, prefix: str = "r") -> list[dict[str, Any]]:
    """Varied records over the `span_s` before `now` (some in the last hour, some weeks old)."""
    rnd = random.Random(seed)
    keys = [("k-a1", "alpha", "team-a"), ("k-a2", "beta", "team-a"), ("k-b1", "gamma", "team-b"),
            ("k-b2", "gamma", "team-b"),  # a name two keys share
            ("k-c1", None, None), (None, None, None)]
    models = [("m-big", ["dep-big-1", "dep-big-2"]), ("m-small", ["dep-small"]), (None, [None])]
    out = []
    for i in range(n):
        # a third in the last 3 hours, a third in the last 3 days, the rest over the span
        r = rnd.random()
        age = rnd.uniform(0, 3 * 3600) if r < 0.33 else rnd.uniform(0, 3 * DAY) if r < 0.66 else rnd.uniform(0, span_s)
        kid, kname, team = rnd.choice(keys)
        model, deps = rnd.choices(models, weights=[5, 4, 1])[0]
        err = rnd.random() < 0.12
        status = rnd.choice([429, 500, 502, 504]) if err else 200
        code = rnd.choice(ERROR_CODES) if err and rnd.random() < 0.9 else None
        stream = rnd.random() < 0.5
        hit = not err and rnd.random() < 0.1
        latency = rnd.lognormvariate(5, 1.2) if rnd.random() < 0.97 else rnd.uniform(0, 0.02)
        upstream = None if hit or rnd.random() < 0.1 else max(0.0, latency - rnd.lognormvariate(-1, 1))
        out.append({
            "id": f"{prefix}-{i:06d}-{rnd.getrandbits(32):08x}",
            "ts": now - age,
            "endpoint": "chat",
            "key_id": kid, "key_name": kname, "team": team,
            "user_id": rnd.choice(["u1", "u2", "u3", None, None]),
            "model": model, "deployment": rnd.choice(deps), "provider": "sim",
            "is_stream": 1 if stream else 0, "status": status, "error_code": code,
            "prompt_tokens": rnd.randint(0, 500), "completion_tokens": 0 if err else rnd.randint(0, 300),
            "cached_tokens": rnd.choice([0, 0, 64]), "reasoning_tokens": rnd.choice([0, 10]),
            "cost_micros": None if (err or rnd.random() < 0.05) else rnd.randint(0, 5000),
            "latency_ms": latency, "ttft_ms": latency * rnd.uniform(0.05, 0.5) if stream and not err else None,
            "upstream_ms": upstream, "finish_reason": None if err else "stop",
            "annotations": '{"route": "x"}' if rnd.random() < 0.5 else None,
            "content": '{"request": {"messages": []}, "output": "hi"}' if rnd.random() < 0.2 else None,
            "cache_status": "hit" if hit else rnd.choice(["miss", None]),
            "saved_micros": rnd.randint(1, 900) if hit else None,
        })
    return out


# -- aggregates ------------------------------------------------------------------------------------


def totals(rows: Iterable[dict[str, Any]]) -> Totals:
    t = defaultdict(int)
    for r in rows:
        t["requests"] += 1
        t["errors"] += r["status"] >= 400
        for f in ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens", "cost_micros", "saved_micros"):
            t[f] += r[f] or 0
        t["cache_hits"] += r["cache_status"] == "hit"
    return Totals(**t)


def unpriced(rows: Iterable[dict[str, Any]]) -> int:
    return sum(1 for r in rows if r["cost_micros"] is None and r["status"] < 400)


def window(rows: list[dict[str, Any]], since: float, until: float, now: float, step: int | None = None) -> tuple[Plan, list[dict[str, Any]]]:
    """The rows a rollup query over [since, until) counts: those in the plan's widened window."""
    p = plan(since, until, now, step)
    return p, [r for r in rows if p.start <= r["ts"] < p.end]


def point_of(ts: float, step: int, now: float) -> float:
    """The chart point a row lands in: its bucket at the finest grain kept then, floored to the step."""
    g = finest_grain_at(ts, now)
    b = math.floor(ts / g) * g
    return float(b - b % step)


GROUP = {
    "none": lambda r: "all",
    "team": lambda r: r["team"] or "-",
    "model": lambda r: r["model"] or "-",
    "deployment": lambda r: r["deployment"] or "-",
    "user": lambda r: r["user_id"],
}


def key_label(rows: list[dict[str, Any]]) -> dict[str | None, str]:
    """Key id -> label as the reader shows it: the name, or the id; "name (id)" when names repeat."""
    names: dict[str | None, str] = {}
    for r in rows:
        names.setdefault(r["key_id"], r["key_name"] or r["key_id"] or "-")
        if r["key_name"]:
            names[r["key_id"]] = r["key_name"]
    count: dict[str, int] = defaultdict(int)
    for label in names.values():
        count[label] += 1
    return {k: (f"{v} ({k})" if count[v] > 1 and k else v) for k, v in names.items()}


def group_fn(by: str, rows: list[dict[str, Any]]):  # type: ignore[no-untyped-def]
    if by == "key":
        labels = key_label(rows)
        return lambda r: labels[r["key_id"]]
    return GROUP[by]


def series(rows: list[dict[str, Any]], since: float, until: float, step: int, by: str, now: float,
           model: str | None = None, top: int = 8) -> dict[tuple[float, str], Totals]:
    step = align_step(step)
    _, inside = window(rows, since, until, now, step)
    if model is not None:
        inside = [r for r in inside if r["model"] == model]
    fn = group_fn(by, inside)
    cost: dict[str, int] = defaultdict(int)
    for r in inside:
        cost[fn(r)] += r["cost_micros"] or 0
    keep = set(sorted(cost, key=lambda g: (-cost[g], g))[:top])
    groups: dict[tuple[float, str], list[dict[str, Any]]] = defaultdict(list)
    for r in inside:
        g = fn(r)
        groups[(point_of(r["ts"], step, now), g if g in keep else "other")].append(r)
    return {k: totals(v) for k, v in groups.items()}


def breakdown(rows: list[dict[str, Any]], since: float, until: float, by: str, now: float) -> dict[str, tuple[Totals, int]]:
    _, inside = window(rows, since, until, now, DAY if by == "day" else None)
    if by == "user":
        inside = [r for r in inside if r["user_id"]]
    if by == "day":
        def fn(r: dict[str, Any]) -> str:
            return time.strftime("%Y-%m-%d", time.gmtime(point_of(r["ts"], DAY, now)))
    else:
        fn = group_fn(by, inside)
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in inside:
        groups[fn(r)].append(r)
    return {g: (totals(v), unpriced(v)) for g, v in groups.items()}


def errors(rows: list[dict[str, Any]], since: float, until: float, now: float) -> list[tuple[str, int]]:
    _, inside = window(rows, since, until, now)
    count: dict[str, int] = defaultdict(int)
    for r in inside:
        if r["status"] >= 400:
            count[r["error_code"] or "-"] += 1
    return sorted(count.items(), key=lambda kv: (-kv[1], kv[0]))


def nearest_rank(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[max(1, math.ceil(q * len(v) - 1e-9)) - 1]


def latency(rows: list[dict[str, Any]], since: float, until: float, step: int, now: float,
            model: str | None = None) -> dict[float, dict[str, Any]]:
    """Exact nearest-rank percentiles per point."""
    step = align_step(step)
    _, inside = window(rows, since, until, now, step)
    if model is not None:
        inside = [r for r in inside if r["model"] == model]
    by_point: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for r in inside:
        if r["latency_ms"] is not None or r["ttft_ms"] is not None:
            by_point[point_of(r["ts"], step, now)].append(r)
    out = {}
    for p, rs in by_point.items():
        lat = [r["latency_ms"] for r in rs if r["latency_ms"] is not None]
        ttft = [r["ttft_ms"] for r in rs if r["ttft_ms"] is not None]
        over = [r["latency_ms"] - r["upstream_ms"] for r in rs if r["latency_ms"] is not None and r["upstream_ms"] is not None]
        out[p] = {
            "requests": len(lat),
            "latency_p50_ms": nearest_rank(lat, 0.5), "latency_p95_ms": nearest_rank(lat, 0.95),
            "latency_p99_ms": nearest_rank(lat, 0.99),
            "ttft_p50_ms": nearest_rank(ttft, 0.5), "ttft_p95_ms": nearest_rank(ttft, 0.95), "ttft_p99_ms": nearest_rank(ttft, 0.99),
            "overhead_p50_ms": nearest_rank(over, 0.5), "overhead_p99_ms": nearest_rank(over, 0.99),
        }
    return out


def within_bound(estimate: float | None, exact: float | None, alpha: float, min_ms: float) -> bool:
    """The stated error bound: relative alpha, or absolute min_ms for values below min_ms."""
    if exact is None or estimate is None:
        return exact is None and estimate is None
    if exact < min_ms:
        return 0 <= estimate <= min_ms
    return abs(estimate - exact) <= alpha * exact * (1 + 1e-9)
