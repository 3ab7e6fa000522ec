"""What each dashboard page shows, as plain dicts (rendered by templates, or returned as JSON).

Request-log numbers come from a `LogReader` (rollups; synchronous, so every function taking a
reader runs in a worker thread). Live state (breakers, limiters, retry budget, budget ledgers) is
read from the serving process's own objects, on the event loop, without changing them.
"""

from __future__ import annotations

import calendar
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from setpoint.config.schema import BudgetConfig
from setpoint.errors import StateBackendError
from setpoint.logstore.reader import Dimension, LatencyPoint, LogReader, RequestFilter, SeriesPoint, Totals
from setpoint.policy.resilience.limiter import starting_limit
from setpoint.policy.stages.budget import budget_line
from setpoint.state.base import LedgerStore

__all__ = [
    "BY_CHOICES", "RANGES", "REQUEST_RANGES", "BudgetRow", "Dimension", "TimeRange", "budget_rows", "budgets_data",
    "deployment_traffic", "deployments_data", "fill_ledger", "parse_filter", "series_calls", "series_data",
    "summary_calls", "summary_data",
    "time_range",
]


@dataclass(frozen=True, slots=True)
class TimeRange:
    name: str
    span_s: int
    bucket_s: int
    since: float
    until: float


# span and chart bucket per selectable range (about 60-170 points per chart)
RANGES: dict[str, tuple[int, int]] = {
    "1h": (3600, 60),
    "24h": (86_400, 900),
    "7d": (7 * 86_400, 3600),
    "30d": (30 * 86_400, 6 * 3600),
}
BY_CHOICES: tuple[Dimension, ...] = ("team", "key", "model", "deployment")


def time_range(name: str | None, now: float, default: str = "24h") -> TimeRange:
    """The window ending now (up to the end of the current bucket), bucket-aligned at its start."""
    if name not in RANGES:
        name = default
    span, bucket = RANGES[name]
    until = (math.floor(now / bucket) + 1) * bucket
    since = until - span
    return TimeRange(name, span, bucket, float(since), float(until))


def _totals_dict(t: Totals) -> dict[str, Any]:
    d = asdict(t)
    d["error_rate"] = t.errors / t.requests if t.requests else None
    return d


def _buckets(tr: TimeRange) -> list[float]:
    return [tr.since + i * tr.bucket_s for i in range(int((tr.until - tr.since) // tr.bucket_s))]


def _index(xs: list[float], bucket_s: int) -> dict[int, int]:
    return {int(x // bucket_s): i for i, x in enumerate(xs)}


# The overview asks the reader a few independent questions; the views run them in parallel threads.
Call = Callable[[LogReader], Any]


def summary_calls(tr: TimeRange) -> list[Call]:
    # Whole-window percentiles: buckets start at multiples of their size (since the epoch), so a
    # bucket of whole days longer than `until` is one bucket (starting at 0) holding the window.
    whole_s = (int(tr.until // 86_400) + 1) * 86_400
    return [
        lambda r: r.totals(tr.since, tr.until),
        lambda r: r.latency(tr.since, tr.until, whole_s),
        lambda r: r.errors(tr.since, tr.until),
    ]


def summary_data(tr: TimeRange, totals: Totals, whole: list[LatencyPoint], errors: list[tuple[str, int]]) -> dict[str, Any]:
    """The overview's tiles and errors by code, from the answers to `summary_calls`."""
    top = max((w for w in whole if w.requests), key=lambda w: w.requests, default=None)
    return {
        "range": tr.name, "since": tr.since, "until": tr.until,
        "totals": _totals_dict(totals),
        "latency": {
            "p50_ms": top.latency_p50_ms if top else None, "p95_ms": top.latency_p95_ms if top else None,
            "p99_ms": top.latency_p99_ms if top else None, "ttft_p50_ms": top.ttft_p50_ms if top else None,
            "ttft_p99_ms": top.ttft_p99_ms if top else None, "overhead_p50_ms": top.overhead_p50_ms if top else None,
        },
        "errors_by_code": [{"code": code, "count": c} for code, c in errors],
    }


def series_calls(tr: TimeRange, by: Dimension) -> list[Call]:
    return [
        lambda r: r.series(tr.since, tr.until, tr.bucket_s, by, top=8),
        lambda r: r.latency(tr.since, tr.until, tr.bucket_s),
    ]


def series_data(tr: TimeRange, by: Dimension, grouped: list[SeriesPoint], lat: list[LatencyPoint]) -> dict[str, Any]:
    """Every chart of the overview as columns over one regular time axis, from `series_calls`.

    Totals per bucket are the sums over the groups (the reader folds groups beyond the top 8 into
    "other", so every request is in exactly one group)."""
    xs = _buckets(tr)
    pos = _index(xs, tr.bucket_s)
    n = len(xs)
    requests, errs, spend, saved, hits = [0] * n, [0] * n, [0] * n, [0] * n, [0] * n
    by_group: dict[str, list[int]] = {}
    group_cost: dict[str, int] = {}
    for p in grouped:
        i = pos.get(int(p.bucket // tr.bucket_s))
        if i is None:
            continue
        t = p.totals
        requests[i] += t.requests
        errs[i] += t.errors
        spend[i] += t.cost_micros
        saved[i] += t.saved_micros
        hits[i] += t.cache_hits
        row = by_group.setdefault(p.group, [0] * n)
        row[i] += t.cost_micros
        group_cost[p.group] = group_cost.get(p.group, 0) + t.cost_micros
    # biggest first, "other" last; groups that spent nothing are left out of the spend chart
    order = sorted((g for g in by_group if group_cost[g] > 0), key=lambda g: (g == "other", -group_cost[g], g))

    cols: dict[str, list[float | None]] = {k: [None] * n for k in ("p50", "p95", "p99", "ttft_p50", "ttft_p95", "ttft_p99")}
    for lp in lat:
        i = pos.get(int(lp.bucket // tr.bucket_s))
        if i is None or not lp.requests:
            continue
        cols["p50"][i], cols["p95"][i], cols["p99"][i] = lp.latency_p50_ms, lp.latency_p95_ms, lp.latency_p99_ms
        cols["ttft_p50"][i], cols["ttft_p95"][i], cols["ttft_p99"][i] = lp.ttft_p50_ms, lp.ttft_p95_ms, lp.ttft_p99_ms

    return {
        "range": tr.name, "since": tr.since, "until": tr.until, "bucket_s": tr.bucket_s, "by": by,
        "x": xs,
        "traffic": {"requests": requests, "errors": errs, "cache_hits": hits},
        "spend": {"total": spend, "saved": saved, "groups": order, "values": [by_group[g] for g in order]},
        "latency": cols,
        "points": sum(1 for r in requests if r),
    }


def deployment_traffic(reader: LogReader, now: float) -> dict[str, Totals]:
    """The last hour's totals per deployment (worker thread)."""
    return {b.group: b.totals for b in reader.breakdown(now - 3600, now + 1, "deployment")}


# -- requests -------------------------------------------------------------------------------------

FILTER_FIELDS = ("model", "team", "key", "user", "status", "error_code", "cache", "id", "range")
REQUEST_RANGES = {"1h": 3600, "24h": 86_400, "7d": 7 * 86_400, "30d": 30 * 86_400}


def parse_filter(query: Mapping[str, str], now: float) -> tuple[RequestFilter, dict[str, str], list[str]]:
    """Query string -> (filter, the values to show back in the form, problems to show the user)."""
    form = {f: (query.get(f) or "").strip()[:200] for f in FILTER_FIELDS}
    problems: list[str] = []
    status = form["status"] if form["status"] in ("ok", "error") else None
    if form["status"] and status is None:
        problems.append("status must be ok or error")
        form["status"] = ""
    cache = form["cache"] if form["cache"] in ("hit", "miss") else None
    if form["cache"] and cache is None:
        problems.append("cache must be hit or miss")
        form["cache"] = ""
    rid = form["id"] or None
    if rid is not None and len(rid) < 6:
        problems.append("a request id prefix needs at least 6 characters")
        rid = None
    since = None
    if form["range"]:
        if form["range"] in REQUEST_RANGES:
            since = now - REQUEST_RANGES[form["range"]]
        else:
            problems.append("unknown time range")
            form["range"] = ""
    flt = RequestFilter(
        since=since, model=form["model"] or None, team=form["team"] or None, key=form["key"] or None,
        user=form["user"] or None, status=status, error_code=form["error_code"] or None, cache=cache,  # type: ignore[arg-type]
        request_id=rid,
    )
    return flt, form, problems


# -- budgets --------------------------------------------------------------------------------------

_ENTITIES_PER_RULE = 25
_SCOPE_DIM = {"key": "key", "team": "team", "user": "user"}


def period_bounds(period: str, now: float) -> tuple[float | None, float | None]:
    """Start and end (UTC) of the budget period containing `now`; (None, None) for "total"."""
    t = time.gmtime(now)
    if period == "daily":
        start = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0))
        return float(start), float(start + 86_400)
    if period == "monthly":
        start = calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0))
        return float(start), float(start + calendar.monthrange(t.tm_year, t.tm_mon)[1] * 86_400)
    return None, None


@dataclass(slots=True)
class BudgetRow:
    index: int
    rule: BudgetConfig
    entity: str | None
    label: str
    since: float | None
    until: float | None
    limit_micros: int
    spent_micros: int | None = None
    held_micros: int | None = None
    burn_micros_per_h: int | None = None

    def as_dict(self, now: float) -> dict[str, Any]:
        remaining = None if self.spent_micros is None else self.limit_micros - self.spent_micros - (self.held_micros or 0)
        exhaust_in = None
        resets_first = False
        if remaining is not None and self.burn_micros_per_h:
            exhaust_in = max(0.0, remaining) / self.burn_micros_per_h * 3600
            resets_first = self.until is not None and now + exhaust_in >= self.until
        return {
            "rule": self.index, "scope": self.rule.scope, "name": self.rule.name, "entity": self.entity,
            "label": self.label, "period": self.rule.period, "hard": self.rule.hard,
            "period_start": self.since, "period_end": self.until,
            "limit_micros": self.limit_micros, "spent_micros": self.spent_micros, "held_micros": self.held_micros,
            "remaining_micros": remaining, "burn_micros_per_h": self.burn_micros_per_h,
            "exhausts_in_s": exhaust_in, "exhausts_at": None if exhaust_in is None else now + exhaust_in,
            "resets_first": resets_first,
            "used_fraction": None if self.spent_micros is None else self.spent_micros / self.limit_micros,
        }


def budget_rows(reader: LogReader, rules: list[BudgetConfig], now: float) -> tuple[list[BudgetRow], list[str]]:
    """The (rule, entity) pairs to show, with burn rates from the log (worker thread).

    A rule with a `name` is one row; a rule for each entity of its scope shows the entities that
    spent in this period, most first (from the log), at most `_ENTITIES_PER_RULE`."""
    rows: list[BudgetRow] = []
    notes: list[str] = []
    for i, rule in enumerate(rules):
        since, until = period_bounds(rule.period, now)
        limit = round(rule.limit_usd * 1_000_000)
        entities: list[tuple[str, str]] = []  # (ledger entity, label)
        if rule.name is not None:
            entities = [(rule.name, rule.name)]
        elif rule.scope in _SCOPE_DIM:
            groups = reader.breakdown(since if since is not None else 0.0, now + 1, _SCOPE_DIM[rule.scope])  # type: ignore[arg-type]
            for b in groups:
                if b.group in ("-", "other", ""):
                    continue
                entity = str(b.extra.get("key_id") or b.group) if rule.scope == "key" else b.group
                label = b.group if entity == b.group else f"{b.group} ({entity})"
                entities.append((entity, label))
            if len(entities) > _ENTITIES_PER_RULE:
                notes.append(f"budget #{i + 1} ({rule.scope}): showing the {_ENTITIES_PER_RULE} biggest spenders "
                             f"of {len(entities)}")
                entities = entities[:_ENTITIES_PER_RULE]
        else:
            notes.append(f"budget #{i + 1} applies to each {rule.scope}; runs are not listed here")
        if not entities:
            rows.append(BudgetRow(i, rule, None, "(no spend yet)" if rule.name is None else rule.name, since, until, limit))
            continue
        for entity, label in entities:
            burn = None
            if rule.scope in ("key", "team", "user"):
                burn = reader.spend_since(rule.scope, entity, now - 3600)  # type: ignore[arg-type]
            rows.append(BudgetRow(i, rule, entity, label, since, until, limit, burn_micros_per_h=burn))
    return rows, notes


async def fill_ledger(rows: list[BudgetRow], store: LedgerStore, now: float) -> bool:
    """Spent and held amounts from the budget ledger (the numbers enforcement uses); False if unavailable."""
    lines = [budget_line(r.index, r.rule, r.entity, now) for r in rows if r.entity is not None]
    if not lines:
        return True
    try:
        spent = await store.spent(lines, now)
        remaining = await store.remaining(lines, now)
    except StateBackendError:
        return False
    it = iter(zip(lines, spent, remaining, strict=True))
    for r in rows:
        if r.entity is None:
            r.spent_micros = 0
            continue
        line, s, rem = next(it)
        r.spent_micros = s
        r.held_micros = None if rem is None or line.limit is None else max(0, line.limit - s - rem)
    return True


def budgets_data(rows: list[BudgetRow], notes: list[str], ledger_ok: bool, now: float) -> dict[str, Any]:
    return {"now": now, "ledger_available": ledger_ok, "notes": notes, "budgets": [r.as_dict(now) for r in rows]}


# -- deployments ----------------------------------------------------------------------------------


def deployments_data(gw: Any, traffic: Mapping[str, Totals]) -> dict[str, Any]:
    """Breaker, concurrency and cooldown state per deployment from this process's `Resilience`.

    `traffic`: the last hour's totals per deployment from the log."""
    res = gw.resilience
    aliases: dict[str, list[str]] = {}
    deps: dict[str, Any] = {}
    for alias, route in gw.runtime.routes.items():
        for d in route.deployments:
            aliases.setdefault(d.name, []).append(alias)
            deps.setdefault(d.name, d)
    out = []
    for name, d in deps.items():
        b = res.breakers.get(name)
        lim = res.limiters.get(name)
        t = traffic.get(name)
        breaker = b.snapshot() if b is not None else {
            "state": "closed", "calls": 0, "failures": 0, "slow": 0, "retry_after_s": 0.0, "transitions": 0}
        out.append({
            "name": name, "provider": d.provider.name, "upstream_model": d.upstream_model, "aliases": aliases[name],
            "breaker": breaker,
            "concurrency": {
                "limit": int(lim.limit) if lim is not None else starting_limit(res.cfg.concurrency.initial, res.cfg.concurrency.max_limit),
                "inflight": lim.inflight if lim is not None else 0,
                "queued": lim.queued if lim is not None else 0,
                "queue_max": res.cfg.concurrency.queue,
                "shed": lim.shed if lim is not None else 0,
            },
            "ttft_ewma_ms": None if name not in res.stats.ttft_s else res.stats.ttft_s[name] * 1000,
            "cooldown_s": res.cooldown_s(name),
            "last_hour": None if t is None else {"requests": t.requests, "errors": t.errors, "cost_micros": t.cost_micros},
        })
    state_rank = {"open": 0, "half_open": 1, "closed": 2}
    out.sort(key=lambda r: (state_rank.get(str(r["breaker"]["state"]), 3), r["name"]))
    return {"deployments": out, "retry_budget": res.budget.snapshot(), "max_attempts": res.cfg.max_attempts}
