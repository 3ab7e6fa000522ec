"""Spend and tokens from the request log, grouped by key, team, user, model or day (UTC)."""

from __future__ import annotations

import calendar
import sqlite3
import time
from pathlib import Path
from typing import Any

from setpoint.errors import InvalidRequestError

__all__ = ["GROUPS", "parse_day", "usage_report"]

GROUPS = {
    "key": "COALESCE(key_name, key_id, '-')",
    "team": "COALESCE(team, '-')",
    "user": "COALESCE(user_id, '-')",
    "model": "COALESCE(model, '-')",
    "day": "date(ts, 'unixepoch')",
}


def parse_day(value: str | None, name: str) -> float | None:
    """'YYYY-MM-DD' (UTC midnight) -> epoch seconds."""
    if not value:
        return None
    try:
        return float(calendar.timegm(time.strptime(value, "%Y-%m-%d")))
    except ValueError:
        raise InvalidRequestError(f"'{name}' must be a date like 2026-11-01", param=name) from None


def usage_report(db: Path, by: str, since: float | None = None, until: float | None = None) -> list[dict[str, Any]]:
    """One row per group: requests, errors, tokens by kind, cost in micro-dollars (unpriced as 0)."""
    if by not in GROUPS:
        raise InvalidRequestError(f"'by' must be one of {', '.join(GROUPS)}", param="by")
    if not db.exists():
        return []
    where, params = [], []
    if since is not None:
        where.append("ts >= ?")
        params.append(since)
    if until is not None:
        where.append("ts < ?")
        params.append(until)
    sql = (
        f"SELECT {GROUPS[by]} AS grp, COUNT(*), SUM(status >= 400), SUM(prompt_tokens), SUM(completion_tokens), "
        "SUM(cached_tokens), SUM(reasoning_tokens), COALESCE(SUM(cost_micros), 0), SUM(cost_micros IS NULL AND status < 400), "
        "COALESCE(SUM(cache_status = 'hit'), 0), COALESCE(SUM(saved_micros), 0) "
        f"FROM requests {'WHERE ' + ' AND '.join(where) if where else ''} GROUP BY grp ORDER BY grp"
    )
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = conn.execute(sql, params).fetchall()
    finally:
        conn.close()
    return [
        {"group": r[0], "requests": r[1], "errors": r[2], "prompt_tokens": r[3], "completion_tokens": r[4],
         "cached_tokens": r[5], "reasoning_tokens": r[6], "cost_micros": r[7], "unpriced_requests": r[8],
         "cache_hits": r[9], "saved_micros": r[10]}
        for r in rows
    ]
