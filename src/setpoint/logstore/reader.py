"""What the dashboard, `setpoint usage` and `/admin/usage` may ask of a request log (SQLite or PostgreSQL).

Times are epoch seconds (UTC). Money is integer micro-dollars. Every method is synchronous and is
called from a worker thread (`asyncio.to_thread`), never on the event loop. Aggregates come from
rollup tables maintained by the writer in the same transaction as the rows, so they cost the same
with 1,000 or 1,000,000 request records; only `search` and `get` touch the `requests` table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

__all__ = [
    "Breakdown", "Dimension", "LatencyPoint", "LogReader", "RequestFilter", "RequestPage", "SeriesPoint", "Totals",
]

# Group-by dimensions of the rollups. "none" = one series for everything.
Dimension = Literal["none", "team", "key", "model", "deployment"]


@dataclass(frozen=True, slots=True)
class Totals:
    requests: int = 0
    errors: int = 0  # status >= 400
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cost_micros: int = 0
    cache_hits: int = 0
    saved_micros: int = 0


@dataclass(frozen=True, slots=True)
class SeriesPoint:
    bucket: float  # start of the time bucket
    group: str  # value of the dimension ("all" for "none"; "-" when unknown)
    totals: Totals


@dataclass(frozen=True, slots=True)
class LatencyPoint:
    bucket: float
    requests: int
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    ttft_p99_ms: float | None
    overhead_p50_ms: float | None  # latency minus upstream time
    overhead_p99_ms: float | None


@dataclass(frozen=True, slots=True)
class RequestFilter:
    since: float | None = None
    until: float | None = None
    model: str | None = None
    team: str | None = None
    key: str | None = None  # key name or id
    user: str | None = None
    status: Literal["ok", "error"] | None = None
    error_code: str | None = None
    cache: Literal["hit", "miss"] | None = None
    request_id: str | None = None  # exact id, or a prefix of at least 6 characters


@dataclass(frozen=True, slots=True)
class RequestPage:
    rows: list[dict[str, Any]]  # `requests` columns, newest first, without `content`
    next_cursor: str | None  # pass back as `cursor` for the next (older) page; None at the end


@dataclass(frozen=True, slots=True)
class Breakdown:
    group: str
    totals: Totals
    extra: dict[str, Any] = field(default_factory=dict)


class LogReader(Protocol):
    def totals(self, since: float, until: float, *, model: str | None = None) -> Totals: ...

    def series(self, since: float, until: float, bucket_s: int, by: Dimension = "none",
               *, model: str | None = None, top: int = 8) -> list[SeriesPoint]:
        """Per bucket and group; groups beyond the `top` by cost are summed into "other"."""
        ...

    def breakdown(self, since: float, until: float, by: Dimension | Literal["user", "day"]) -> list[Breakdown]:
        """One row per group over the window, by cost descending (the `setpoint usage` table)."""
        ...

    def latency(self, since: float, until: float, bucket_s: int, *, model: str | None = None) -> list[LatencyPoint]:
        """Percentiles from the rollups' latency histograms (log-spaced buckets, <= 10% error)."""
        ...

    def errors(self, since: float, until: float) -> list[tuple[str, int]]:
        """(error code, count) over the window, most frequent first."""
        ...

    def spend_since(self, scope: Literal["key", "team", "user"], value: str, since: float) -> int:
        """Micro-dollars spent by one scope since a time (budget burn rate)."""
        ...

    def search(self, flt: RequestFilter, *, limit: int = 50, cursor: str | None = None) -> RequestPage: ...

    def get(self, request_id: str) -> dict[str, Any] | None:
        """One request with every column, `content` and `annotations` decoded from JSON."""
        ...

    def close(self) -> None: ...
