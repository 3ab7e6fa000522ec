"""`LogReader` over the request log's tables, written once for SQLite and PostgreSQL.

Aggregates read only the rollup tables, through `windows.plan` (a few indexed bucket ranges per
call, whatever the window). `search` and `get` read `requests`: keyset pages on (ts, id), newest
first, each filter served by an index that yields rows in that order. A backend supplies
`_connection()` (a DB-API connection for one call, from any thread) and its `Dialect`.

Windows are widened to whole rollup buckets (see `windows.py`); `spend_since` is exact (the partial
bucket at its start is summed from the rows). Until the writer has created the tables, every
method answers as for an empty log.
"""

from __future__ import annotations

import base64
import binascii
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Literal

import orjson

from setpoint.errors import InvalidRequestError, StateBackendError
from setpoint.logstore import rollups
from setpoint.logstore.dialect import Dialect
from setpoint.logstore.reader import (
    Breakdown, Dimension, LatencyPoint, RequestFilter, RequestPage, SeriesPoint, Totals,
)
from setpoint.logstore.sql_schema import MEASURES, RECORD_COLUMNS
from setpoint.logstore.windows import Plan, align_step, finest_grain_at, plan

__all__ = ["SqlLogReader"]

# CAST: PostgreSQL's SUM(bigint) is numeric (a Decimal in Python); an int is cheaper to add up.
_SUMS = ", ".join(f"CAST(COALESCE(SUM({m}), 0) AS BIGINT)" for m in MEASURES)
_UNPRICED = MEASURES.index("unpriced")
assert MEASURES[:_UNPRICED] + MEASURES[_UNPRICED + 1 :] == tuple(Totals.__dataclass_fields__)
# group-by -> (rollup dimension over every model, the one split by model, the column holding the group)
_BY: dict[str, tuple[str, str | None, str | None]] = {
    "none": ("all", "all/model", None), "team": ("team", "team/model", "value"), "key": ("key", "key/model", "value"),
    "model": ("all/model", "all/model", "model"), "deployment": ("deployment", "deployment", "value"),
    "user": ("user", None, "value"),
}
_SCOPES = {"key": "key_id", "team": "team", "user": "user_id"}  # spend_since: rollup dim -> requests column
_LIST_COLUMNS = ", ".join(c for c in RECORD_COLUMNS if c != "content")
_MAX_PAGE = 1000
_FAR_S = 366 * 86_400  # "until the end" for windows left open


def _totals(m: Sequence[int]) -> Totals:
    """The sums of every measure, in `MEASURES` order -> Totals."""
    return Totals(*m[:_UNPRICED], *m[_UNPRICED + 1 :])


def _label(value: str) -> str:
    return value if value else "-"


class SqlLogReader:
    """Raises `StateBackendError` (503) when the database cannot be reached; `InvalidRequestError`
    (400) for a bad dimension, scope or cursor."""

    dialect: Dialect
    _unavailable: tuple[type[BaseException], ...] = ()  # the driver's "cannot reach the database" errors

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._is_ready = False

    # -- hooks ---------------------------------------------------------------------------------

    def _connection(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # -- plumbing ------------------------------------------------------------------------------

    @contextmanager
    def _db(self) -> Iterator[Any]:
        try:
            with self._connection() as conn:
                yield conn
        except self._unavailable as exc:
            raise StateBackendError(f"the request log is unavailable: {exc}") from exc

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._db() as conn:
            return list(conn.execute(self.dialect.sql(sql), params).fetchall())

    def _ready(self) -> bool:
        if not self._is_ready:
            try:
                self._is_ready = bool(self._query(self.dialect.table_exists, ("rollup",)))
            except FileNotFoundError:  # SQLite: no log file yet
                return False
        return self._is_ready

    def _plan(self, since: float, until: float, step: int | None = None) -> Plan:
        return plan(since, until, self._clock(), step)

    # -- aggregates ----------------------------------------------------------------------------

    def totals(self, since: float, until: float, *, model: str | None = None) -> Totals:
        if not self._ready():
            return Totals()
        rows = self._grouped("none", since, until, None, model)
        return _totals(rows[0][3]) if rows else Totals()

    def _grouped(self, by: str, since: float, until: float, step: int | None,
                 model: str | None = None) -> list[tuple[int, str, str | None, tuple[int, ...]]]:
        """(point, group, a key name, sums of `MEASURES`) per chart point (0 without a step) and group."""
        every_model, per_model, group = _BY[by]
        dim = every_model if model is None else per_model
        assert dim is not None, by
        where, params = self._plan(since, until, step).where(dim)
        if model is not None:
            where += " AND model = ?"
            params.append(model)
        point, point_params = ("bucket - bucket % ?", [step]) if step else ("0", [])
        grp, group_by = (group, "1, 2") if group else ("''", "1")
        rows = self._query(
            f"SELECT {point} AS point, {grp} AS grp, MAX(key_name), {_SUMS} FROM rollup WHERE {where} GROUP BY {group_by}",
            point_params + params,
        )
        return [(r[0], r[1], r[2], r[3:]) for r in rows]

    def series(self, since: float, until: float, bucket_s: int, by: Dimension = "none",
               *, model: str | None = None, top: int = 8) -> list[SeriesPoint]:
        if not self._ready():
            return []
        if by not in _BY or by == "user":
            raise InvalidRequestError(f"unknown dimension {by!r}", param="by")
        rows = self._grouped(by, since, until, align_step(bucket_s), model)
        labels = _labels(by, rows)
        cost: dict[str, int] = {}
        c = MEASURES.index("cost_micros")
        for _, g, _, m in rows:
            cost[labels[g]] = cost.get(labels[g], 0) + m[c]
        keep = set(sorted(cost, key=lambda g: (-cost[g], g))[: max(top, 0)])
        points: dict[tuple[int, str], Sequence[int]] = {}
        for b, g, _, m in rows:
            label = labels[g] if labels[g] in keep else "other"
            prev = points.get((b, label))
            points[(b, label)] = m if prev is None else [x + y for x, y in zip(prev, m, strict=True)]
        return [SeriesPoint(float(b), g, _totals(m)) for (b, g), m in sorted(points.items())]

    def breakdown(self, since: float, until: float, by: Dimension | Literal["user", "day"]) -> list[Breakdown]:
        if not self._ready():
            return []
        if by == "day":
            out = [Breakdown(time.strftime("%Y-%m-%d", time.gmtime(b)), _totals(m), {"unpriced_requests": m[_UNPRICED]})
                   for b, _, _, m in self._grouped("none", since, until, rollups.DAY)]
        elif by in _BY:
            rows = self._grouped(by, since, until, None)
            labels = _labels(by, rows)
            out = []
            for _, g, _, m in rows:
                extra: dict[str, Any] = {"unpriced_requests": m[_UNPRICED]}
                if by == "key":
                    extra["key_id"] = g or None
                out.append(Breakdown(labels[g], _totals(m), extra))
        else:
            raise InvalidRequestError(f"unknown dimension {by!r}", param="by")
        out.sort(key=lambda b: (-b.totals.cost_micros, b.group))
        return out

    def latency(self, since: float, until: float, bucket_s: int, *, model: str | None = None) -> list[LatencyPoint]:
        if not self._ready():
            return []
        step = align_step(bucket_s)
        where, params = self._plan(since, until, step).where(*(("all", "") if model is None else ("model", model)))
        rows = self._query(
            f"SELECT bucket - bucket % ? AS point, metric, bin, CAST(SUM(n) AS BIGINT) FROM rollup_latency "
            f"WHERE {where} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3", [step, *params],
        )
        out: list[LatencyPoint] = []
        i = 0
        while i < len(rows):  # rows come sorted by point, metric, bin: one point at a time
            point = rows[i][0]
            bins: list[list[tuple[int, int]]] = [[], [], []]
            while i < len(rows) and rows[i][0] == point:
                bins[rows[i][1]].append((rows[i][2], rows[i][3]))
                i += 1
            (l50, l95, l99), (t50, t95, t99), (o50, o99) = (
                rollups.percentiles(bins[0], (0.5, 0.95, 0.99)), rollups.percentiles(bins[1], (0.5, 0.95, 0.99)),
                rollups.percentiles(bins[2], (0.5, 0.99)))
            out.append(LatencyPoint(float(point), sum(n for _, n in bins[0]), l50, l95, l99, t50, t95, t99, o50, o99))
        return out

    def errors(self, since: float, until: float) -> list[tuple[str, int]]:
        if not self._ready():
            return []
        where, params = self._plan(since, until).where("error")
        rows = self._query(f"SELECT value, SUM(requests) FROM rollup WHERE {where} GROUP BY value", params)
        return sorted(((code, int(n)) for code, n in rows if n), key=lambda r: (-r[1], r[0]))

    def spend_since(self, scope: Literal["key", "team", "user"], value: str, since: float) -> int:
        if not self._ready():
            return 0
        if scope not in _SCOPES:
            raise InvalidRequestError(f"unknown scope {scope!r}", param="scope")
        now = self._clock()
        grain = finest_grain_at(since, now)
        edge = math.ceil(since / grain) * grain
        (raw,) = self._query(  # the partial bucket at the start, from the rows
            f"SELECT COALESCE(SUM(cost_micros), 0) FROM requests WHERE {_SCOPES[scope]} = ? AND ts >= ? AND ts < ?",
            (value, since, float(edge)),
        )
        where, params = plan(edge, max(now, since) + _FAR_S, now).where(scope, value)
        (rolled,) = self._query(f"SELECT COALESCE(SUM(cost_micros), 0) FROM rollup WHERE {where}", params)
        return int(raw[0]) + int(rolled[0])

    # -- rows ----------------------------------------------------------------------------------

    def search(self, flt: RequestFilter, *, limit: int = 50, cursor: str | None = None) -> RequestPage:
        if not self._ready():
            return RequestPage([], None)
        limit = min(max(int(limit), 1), _MAX_PAGE)
        where, params = self._filter(flt)
        if cursor:
            ts, rid = _decode_cursor(cursor)
            where.append("(ts, id) < (?, ?)")
            params += [ts, rid]
        sql = (f"SELECT {_LIST_COLUMNS} FROM requests {'WHERE ' + ' AND '.join(where) if where else ''} "
               f"ORDER BY ts DESC, id DESC LIMIT {limit + 1}")
        with self._db() as conn:
            cur = conn.execute(self.dialect.sql(sql), params)
            names = [d[0] for d in cur.description]
            rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        more = len(rows) > limit
        rows = rows[:limit]
        return RequestPage(rows, _encode_cursor(rows[-1]["ts"], rows[-1]["id"]) if more else None)

    def _filter(self, flt: RequestFilter) -> tuple[list[str], list[Any]]:
        where: list[str] = []
        params: list[Any] = []

        def eq(col: str, value: Any) -> None:
            where.append(f"{col} = ?")
            params.append(value)

        if flt.since is not None:
            where.append("ts >= ?")
            params.append(float(flt.since))
        if flt.until is not None:
            where.append("ts < ?")
            params.append(float(flt.until))
        for col, value in (("model", flt.model), ("team", flt.team), ("user_id", flt.user), ("error_code", flt.error_code)):
            if value is not None:
                eq(col, value)
        if flt.key is not None:
            ids = self._key_ids(flt.key)
            if len(ids) == 1:
                eq("key_id", ids[0])
            elif ids:
                where.append(f"key_id IN ({', '.join('?' for _ in ids)})")
                params += ids
            else:  # not in the rollups (yet): match the rows themselves
                where.append("(key_id = ? OR key_name = ?)")
                params += [flt.key, flt.key]
        # Literal terms, so that the partial indexes (same terms) can serve them.
        if flt.status is not None:
            where.append({"ok": "status < 400", "error": "status >= 400"}[flt.status])
        if flt.cache is not None:
            where.append({"hit": "cache_status = 'hit'", "miss": "cache_status = 'miss'"}[flt.cache])
        if flt.request_id:
            rid = flt.request_id
            if len(rid) < 6:
                eq("id", rid)
            else:  # a prefix (or a whole id): a range on the primary key
                where.append("id >= ? AND id < ?")
                params += [rid, rid[:-1] + chr(ord(rid[-1]) + 1)]
        return where, params

    def _key_ids(self, key: str) -> list[str]:
        """Key ids whose id or name is `key` (from the daily rollups, which cover every stored row)."""
        rows = self._query(
            "SELECT DISTINCT value FROM rollup WHERE grain = ? AND dim = 'key' AND (value = ? OR key_name = ?)",
            (rollups.DAY, key, key))
        return sorted(r[0] for r in rows)

    def get(self, request_id: str) -> dict[str, Any] | None:
        if not self._ready():
            return None
        with self._db() as conn:
            cur = conn.execute(self.dialect.sql(f"SELECT {', '.join(RECORD_COLUMNS)} FROM requests WHERE id = ?"),
                               (request_id,))
            row = cur.fetchone()
        if row is None:
            return None
        out = dict(zip(RECORD_COLUMNS, row, strict=True))
        for col in ("content", "annotations"):
            if isinstance(out[col], str):
                try:
                    out[col] = orjson.loads(out[col])
                except orjson.JSONDecodeError:
                    pass  # kept as stored
        return out


def _labels(by: str, rows: Iterator[Any] | list[Any]) -> dict[str, str]:
    """Group value -> label. Keys are grouped by id and shown by name; two keys with the same name
    are told apart by their ids."""
    if by == "none":
        return {r[1]: "all" for r in rows}
    if by != "key":
        return {r[1]: _label(r[1]) for r in rows}
    names: dict[str, str] = {}
    for r in rows:
        names[r[1]] = r[2] or names.get(r[1]) or _label(r[1])
    seen: dict[str, int] = {}
    for label in names.values():
        seen[label] = seen.get(label, 0) + 1
    return {kid: (f"{label} ({kid})" if seen[label] > 1 and kid else label) for kid, label in names.items()}


def _encode_cursor(ts: float, rid: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([ts, rid])).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        ts, rid = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(rid, str) or isinstance(ts, bool) or not isinstance(ts, (int, float)):
            raise ValueError
        return float(ts), rid
    except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError):
        raise InvalidRequestError("invalid cursor", param="cursor") from None
