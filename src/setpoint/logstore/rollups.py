"""Rollups: what a batch of newly inserted rows adds to the aggregate tables, and latency histograms.

Levels. Every row is added to five time grains: 1 minute (kept 2 days), 15 minutes (kept 8 days),
1 hour, 6 hours and 1 day (kept as long as the rows). The grains divide each other, so a window is
covered by whole coarse buckets in its middle and finer ones at its edges (`windows.py`), and a
dashboard chart (1h by minute, 24h by 15 min, 7d by hour, 30d by 6 h) reads at most ~170 buckets.

Dimensions. `rollup` has one row per (grain, dim, bucket, value, model) (see `sql_schema.DIMS`):
all, team, key, error (by code) and user over every model, the same split by model for the
questions about one model, and deployment. A query reads the rows of its own dimension only, so
what it reads grows with the number of teams, or keys, or models, not with their product. A key's
name rides along on its rows. `rollup_latency` has histograms per
(grain, dim, bucket, value, metric, bin) for dim "all" and "model": latency does not depend on who
calls, so they are not split by team or key.

Histograms. Bin b >= 1 holds values in [MIN_MS * G^(b-1), MIN_MS * G^b) with G = (1 + A) / (1 - A),
A = 0.1; bin 0 holds values below MIN_MS (and negative overheads). A percentile is read as the
representative value of the bin holding its rank (nearest-rank definition), 2 * low * G / (1 + G),
which is within A = 10% of every value in that bin: so within 10% of the exact nearest-rank
percentile (within MIN_MS = 0.01 ms absolute below MIN_MS).

Only rows the INSERT really added are passed here (`RETURNING id`), in the same transaction, so a
replayed record is never counted twice.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from operator import add
from typing import Any

from setpoint.logstore.sql_schema import DIMS, RECORD_COLUMNS, ROLLUP, ROLLUP_LATENCY, Table

__all__ = [
    "ALPHA", "DAY", "DIMS", "GRAINS", "LEVELS", "METRICS", "MIN_MS", "Deltas", "Level", "bin_of", "bin_value",
    "deltas", "on_conflict", "percentile", "percentiles",
]

DAY = 86_400


@dataclass(frozen=True, slots=True)
class Level:
    grain: int
    keep_s: int | None  # None: kept as long as the request rows (logging.retention_days)


LEVELS = (Level(60, 2 * DAY), Level(900, 8 * DAY), Level(3600, None), Level(6 * 3600, None), Level(DAY, None))
GRAINS = tuple(lv.grain for lv in LEVELS)

ALPHA = 0.1
GAMMA = (1 + ALPHA) / (1 - ALPHA)
MIN_MS = 0.01
_LOG_GAMMA = math.log(GAMMA)
_REPR = 2 * GAMMA / (1 + GAMMA)
METRICS = ("latency", "ttft", "overhead")  # the `metric` column is the index in this tuple


def bin_of(ms: float) -> int:
    if ms < MIN_MS:
        return 0
    return int(math.log(ms / MIN_MS) / _LOG_GAMMA) + 1


def bin_value(b: int) -> float:
    """The value a bin stands for (within ALPHA of any value in it)."""
    if b <= 0:
        return 0.0
    return MIN_MS * GAMMA ** (b - 1) * _REPR


def percentiles(bins: Sequence[tuple[int, int]], qs: Sequence[float]) -> list[float | None]:
    """Nearest-rank percentiles (qs ascending) from (bin, count) pairs sorted by bin, in one pass."""
    total = sum(n for _, n in bins)
    if total <= 0:
        return [None] * len(qs)
    ranks = [max(1, math.ceil(q * total - 1e-9)) for q in qs]
    out: list[float | None] = []
    seen = 0
    j = 0
    for b, n in bins:
        seen += n
        while j < len(ranks) and seen >= ranks[j]:
            out.append(bin_value(b))
            j += 1
        if j == len(ranks):
            break
    return out


def percentile(bins: Sequence[tuple[int, int]], q: float) -> float | None:
    """Nearest-rank percentile from (bin, count) pairs sorted by bin."""
    return percentiles(bins, (q,))[0]


def on_conflict(t: Table) -> str:
    """The upsert clause that adds a delta row to an existing rollup row."""
    keys = set(t.primary_key)
    sets = []
    for c in t.column_names:
        if c in keys:
            continue
        if c == "key_name":
            sets.append(f"key_name = COALESCE(excluded.key_name, {t.name}.key_name)")
        else:
            sets.append(f"{c} = {t.name}.{c} + excluded.{c}")
    return f"ON CONFLICT ({', '.join(t.primary_key)}) DO UPDATE SET {', '.join(sets)}"


@dataclass(frozen=True, slots=True)
class Deltas:
    """Rows to upsert, in table column order (unsorted: PostgreSQL sorts them before upserting)."""

    rollup: list[tuple[Any, ...]]
    latency: list[tuple[Any, ...]]

    def by_table(self) -> Iterable[tuple[Table, list[tuple[Any, ...]]]]:
        return ((ROLLUP, self.rollup), (ROLLUP_LATENCY, self.latency))


_I = {c: i for i, c in enumerate(RECORD_COLUMNS)}
_TS, _STATUS, _COST, _ERR, _KEYNAME, _USER = (_I[c] for c in ("ts", "status", "cost_micros", "error_code", "key_name", "user_id"))
_TEAM, _KEY, _MODEL, _DEP = (_I[c] for c in ("team", "key_id", "model", "deployment"))
_P, _C, _CA, _RE = (_I[c] for c in ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens"))
_CACHE, _SAVED = _I["cache_status"], _I["saved_micros"]
_LAT, _TTFT, _UP = _I["latency_ms"], _I["ttft_ms"], _I["upstream_ms"]
assert set(DIMS) == {"all", "all/model", "team", "team/model", "key", "key/model", "deployment", "error", "user"}

Measures = tuple[int, ...]
_KEY_DIMS = ("key", "key/model")


def deltas(rows: Iterable[Sequence[Any]], now: float) -> Deltas:
    """Aggregate checked `requests` rows (see `rows.to_row`) into rollup deltas for every level."""
    fine = GRAINS[0]
    # 1. per row: one combination of every dimension, users apart, histogram counts
    combos: dict[tuple[Any, ...], Measures] = {}
    users: dict[tuple[Any, ...], Measures] = {}
    hist: dict[tuple[Any, ...], int] = {}
    names: dict[str, str] = {}
    for r in rows:
        b = int(r[_TS] // fine) * fine
        err = r[_STATUS] >= 400
        cost = r[_COST]
        m = (1, 1 if err else 0, r[_P], r[_C], r[_CA], r[_RE], cost or 0, 1 if cost is None and not err else 0,
             1 if r[_CACHE] == "hit" else 0, r[_SAVED] or 0)
        model, dep, key = r[_MODEL] or "", r[_DEP] or "", r[_KEY] or ""
        k = (b, r[_TEAM] or "", key, model, dep, (r[_ERR] or "-") if err else "")
        acc = combos.get(k)
        combos[k] = m if acc is None else tuple(map(add, acc, m))
        if r[_KEYNAME] is not None:
            names[key] = r[_KEYNAME]
        user = r[_USER]
        if user:
            uk = ("user", b, user, "")
            acc = users.get(uk)
            users[uk] = m if acc is None else tuple(map(add, acc, m))
        lat = r[_LAT]
        if lat is not None:
            hk = (b, model, 0, bin_of(lat))
            hist[hk] = hist.get(hk, 0) + 1
            up = r[_UP]
            if up is not None:
                hk = (b, model, 2, bin_of(lat - up))
                hist[hk] = hist.get(hk, 0) + 1
        ttft = r[_TTFT]
        if ttft is not None:
            hk = (b, model, 1, bin_of(ttft))
            hist[hk] = hist.get(hk, 0) + 1
    # 2. per combination: its row in each dimension (dim, bucket, value, model); '' = unknown, or
    #    every model in the dimensions not split by model
    dims = users  # (user rows are keyed the same way already)
    for (b, team, key, model, dep, code), m in combos.items():
        projections = [("all", b, "", ""), ("all/model", b, "", model), ("team", b, team, ""),
                       ("team/model", b, team, model), ("key", b, key, ""), ("key/model", b, key, model),
                       ("deployment", b, dep, model)]
        if code:
            projections.append(("error", b, code, ""))
        for dk in projections:
            acc = dims.get(dk)
            dims[dk] = m if acc is None else tuple(map(add, acc, m))
    hists: dict[tuple[Any, ...], int] = {}
    for (b, model, metric, bn), n in hist.items():
        for hk in (("all", b, "", metric, bn), ("model", b, model, metric, bn)):
            hists[hk] = hists.get(hk, 0) + n
    # 3. every level, each from the one below
    rollup: list[tuple[Any, ...]] = []
    for g, level in _levels(dims, now):
        for (dim, b, value, model), m in level.items():
            rollup.append((g, dim, b, value, model, names.get(value) if dim in _KEY_DIMS else None, *m))
    latency: list[tuple[Any, ...]] = []
    for g, level in _levels(hists, now):
        latency += [(g, *k, n) for k, n in level.items()]
    return Deltas(rollup, latency)


def _levels(fine: dict[tuple[Any, ...], Any], now: float) -> Iterable[tuple[int, dict[tuple[Any, ...], Any]]]:
    """{(dim, fine bucket, ...): value} -> (grain, {(dim, bucket, ...): value}) for every level, each
    built from the level below. A level kept for a few days only leaves out older buckets."""
    level = fine
    for i, lv in enumerate(LEVELS):
        g = lv.grain
        if i:
            coarser: dict[tuple[Any, ...], Any] = {}
            for k, v in level.items():
                ck = (k[0], k[1] - k[1] % g, *k[2:])
                acc = coarser.get(ck)
                coarser[ck] = v if acc is None else _merge(acc, v)
            level = coarser
        if lv.keep_s is None:
            yield g, level
        else:
            oldest = now - lv.keep_s
            yield g, {k: v for k, v in level.items() if k[1] >= oldest}


def _merge(a: Any, b: Any) -> Any:
    return a + b if type(a) is int else tuple(map(add, a, b))
