"""State-store protocols: atomic operations only, never get/set.

Two kinds of shared state:

- **Token buckets** (rate limits). `take` takes `amount` from every bucket or from none; a bucket holds
  at most `capacity` and refills at `rate_per_s`. `adjust` moves tokens without checking (settling an
  estimate: positive gives back, negative takes more and may leave a bucket in debt).
- **Ledger lines** (budgets). A line has a settled `spent` and a set of **holds** (reservations) with
  expiry. `reserve` adds a hold to every line or to none, checking `spent + held + amount <= limit`
  on each line that has a limit; `extend` grows an existing hold under the same check; `settle`
  removes the hold and adds the actual amount to `spent` (always, even past the limit: it was
  already generated). A hold whose process died expires after `hold_ttl_s`, so a crash cannot leak
  budget forever.

Every implementation (memory, SQLite, Redis) passes the same contract suite
(`tests/contract/test_state_stores.py`). Backends raise `StateBackendError` when they cannot answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "BucketCharge",
    "CacheStore",
    "LedgerLine",
    "LedgerStore",
    "LimiterStore",
    "ReserveResult",
    "StateStore",
    "TakeResult",
]


@dataclass(slots=True, frozen=True)
class BucketCharge:
    key: str
    capacity: float
    rate_per_s: float
    amount: float


@dataclass(slots=True)
class TakeResult:
    ok: bool
    retry_after_s: float = 0.0  # when not ok: until every refused bucket could serve the amount
    levels: list[float] = field(default_factory=list)  # per charge, after the operation


@dataclass(slots=True, frozen=True)
class LedgerLine:
    key: str
    limit: int | None  # micro-dollars; None: tracked, never refused (soft budget)
    ttl_s: float  # how long the line is kept after its last change (its period plus a margin)


@dataclass(slots=True)
class ReserveResult:
    ok: bool
    refused_key: str | None = None
    remaining: list[int | None] = field(default_factory=list)  # per line: limit - spent - held


class LimiterStore(Protocol):
    async def take(self, charges: Sequence[BucketCharge], now: float) -> TakeResult: ...

    async def adjust(self, charges: Sequence[BucketCharge], now: float) -> None:
        """Add `amount` to each bucket (capped at capacity; may go negative). No check."""
        ...


class LedgerStore(Protocol):
    async def reserve(
        self, lines: Sequence[LedgerLine], hold_id: str, amount: int, now: float, hold_ttl_s: float
    ) -> ReserveResult: ...

    async def extend(
        self, lines: Sequence[LedgerLine], hold_id: str, amount: int, now: float, hold_ttl_s: float
    ) -> ReserveResult:
        """Grow an existing hold by `amount` (all lines or none); also renews its expiry."""
        ...

    async def settle(self, lines: Sequence[LedgerLine], hold_id: str, actual: int, now: float) -> None: ...

    async def remaining(self, lines: Sequence[LedgerLine], now: float) -> list[int | None]: ...

    async def spent(self, lines: Sequence[LedgerLine], now: float) -> list[int]: ...


class CacheStore(Protocol):
    """Opaque values with a time to live (response cache)."""

    async def cache_get(self, key: str, now: float) -> bytes | None: ...

    async def cache_put(self, key: str, value: bytes, ttl_s: float, now: float) -> None: ...


class StateStore(LimiterStore, LedgerStore, CacheStore, Protocol):
    name: str

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...
