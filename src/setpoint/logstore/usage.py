"""Spend and tokens from the request log, grouped by key, team, user, model or day (UTC): the rows of
`setpoint usage` and `GET /admin/usage`, read from the rollups through a `LogReader`."""

from __future__ import annotations

import calendar
import time
from typing import Any

from setpoint.errors import InvalidRequestError
from setpoint.logstore.reader import LogReader

__all__ = ["GROUPS", "parse_day", "usage_report"]

GROUPS = ("key", "team", "user", "model", "day")
_FAR_S = 366 * 86_400


def parse_day(value: str | None, name: str) -> float | None:
    """'YYYY-MM-DD' (UTC midnight) -> epoch seconds."""
    if not value:
        return None
    try:
        return float(calendar.timegm(time.strptime(value, "%Y-%m-%d")))
    except ValueError:
        raise InvalidRequestError(f"'{name}' must be a date like 2026-11-01", param=name) from None


def usage_report(reader: LogReader, by: str, since: float | None = None, until: float | None = None,
                 *, now: float | None = None) -> list[dict[str, Any]]:
    """One row per group: requests, errors, tokens by kind, cost in micro-dollars (unpriced as 0);
    by cost, biggest first (by day: oldest first)."""
    if by not in GROUPS:
        raise InvalidRequestError(f"'by' must be one of {', '.join(GROUPS)}", param="by")
    now = time.time() if now is None else now
    rows = reader.breakdown(0.0 if since is None else since, now + _FAR_S if until is None else until, by)  # type: ignore[arg-type]
    if by == "day":
        rows = sorted(rows, key=lambda b: b.group)
    return [
        {"group": b.group, "requests": b.totals.requests, "errors": b.totals.errors,
         "prompt_tokens": b.totals.prompt_tokens, "completion_tokens": b.totals.completion_tokens,
         "cached_tokens": b.totals.cached_tokens, "reasoning_tokens": b.totals.reasoning_tokens,
         "cost_micros": b.totals.cost_micros, "unpriced_requests": int(b.extra.get("unpriced_requests", 0)),
         "cache_hits": b.totals.cache_hits, "saved_micros": b.totals.saved_micros}
        for b in rows
    ]
