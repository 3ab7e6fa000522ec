"""In-process state (one worker). Each operation runs without an `await` inside, so it is atomic
with respect to every other coroutine on the event loop."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from setpoint.state.base import BucketCharge, LedgerLine, ReserveResult, TakeResult

__all__ = ["MemoryStateStore"]


@dataclass(slots=True)
class _Bucket:
    level: float
    ts: float


@dataclass(slots=True)
class _Line:
    spent: int = 0
    holds: dict[str, tuple[int, float]] = field(default_factory=dict)  # hold id -> (amount, expires_at)
    expires_at: float = 0.0

    def held(self, now: float) -> int:
        expired = [h for h, (_, exp) in self.holds.items() if exp <= now]
        for h in expired:
            del self.holds[h]
        return sum(a for a, _ in self.holds.values())


class MemoryStateStore:
    name = "memory"

    def __init__(self, cache_entries: int = 10_000) -> None:
        self._buckets: dict[str, _Bucket] = {}
        self._lines: dict[str, _Line] = {}
        self._cache: OrderedDict[str, tuple[bytes, float]] = OrderedDict()  # LRU
        self._cache_entries = cache_entries

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    # -- token buckets --------------------------------------------------------------------------

    def _level(self, c: BucketCharge, now: float) -> _Bucket:
        b = self._buckets.get(c.key)
        if b is None:
            b = self._buckets[c.key] = _Bucket(c.capacity, now)
        elif now > b.ts:
            b.level = min(c.capacity, b.level + (now - b.ts) * c.rate_per_s)
            b.ts = now
        return b

    async def take(self, charges: Sequence[BucketCharge], now: float) -> TakeResult:
        buckets = [self._level(c, now) for c in charges]
        wait = 0.0
        for c, b in zip(charges, buckets, strict=True):
            if b.level < c.amount:
                short = c.amount - b.level
                wait = max(wait, short / c.rate_per_s if c.rate_per_s > 0 else float("inf"))
        if wait > 0:
            return TakeResult(ok=False, retry_after_s=wait, levels=[b.level for b in buckets])
        for c, b in zip(charges, buckets, strict=True):
            b.level -= c.amount
        return TakeResult(ok=True, levels=[b.level for b in buckets])

    async def adjust(self, charges: Sequence[BucketCharge], now: float) -> None:
        for c in charges:
            b = self._level(c, now)
            b.level = min(c.capacity, b.level + c.amount)

    # -- ledger ---------------------------------------------------------------------------------

    def _line(self, line: LedgerLine, now: float, *, write: bool = True) -> _Line:
        """The line's state; a write keeps it for another `ttl_s` (reads do not)."""
        ln = self._lines.get(line.key)
        if ln is None or ln.expires_at <= now:
            ln = self._lines[line.key] = _Line()
            if not write:
                ln.expires_at = now + line.ttl_s
        if write:
            ln.expires_at = now + line.ttl_s
        return ln

    def _check(self, lines: Sequence[LedgerLine], states: list[_Line], amount: int, now: float) -> ReserveResult:
        remaining: list[int | None] = []
        refused = None
        for line, st in zip(lines, states, strict=True):
            if line.limit is None:
                remaining.append(None)
                continue
            left = line.limit - st.spent - st.held(now)
            remaining.append(left)
            if refused is None and amount > left:
                refused = line.key
        return ReserveResult(ok=refused is None, refused_key=refused, remaining=remaining)

    def _hold(
        self, lines: Sequence[LedgerLine], hold_id: str, amount: int, now: float, hold_ttl_s: float, *, grow: bool
    ) -> ReserveResult:
        states = [self._line(ln, now, write=False) for ln in lines]
        res = self._check(lines, states, amount, now)
        if res.ok:
            for ln, st in zip(lines, states, strict=True):
                st.expires_at = now + ln.ttl_s
                current = st.holds.get(hold_id, (0, 0.0))[0] if grow else 0
                st.holds[hold_id] = (current + amount, now + hold_ttl_s)
            res.remaining = [None if r is None else r - amount for r in res.remaining]
        return res

    async def reserve(
        self, lines: Sequence[LedgerLine], hold_id: str, amount: int, now: float, hold_ttl_s: float
    ) -> ReserveResult:
        return self._hold(lines, hold_id, amount, now, hold_ttl_s, grow=False)

    async def extend(
        self, lines: Sequence[LedgerLine], hold_id: str, amount: int, now: float, hold_ttl_s: float
    ) -> ReserveResult:
        return self._hold(lines, hold_id, amount, now, hold_ttl_s, grow=True)

    async def settle(self, lines: Sequence[LedgerLine], hold_id: str, actual: int, now: float) -> None:
        for line in lines:
            st = self._line(line, now)
            st.holds.pop(hold_id, None)
            st.spent += actual

    async def remaining(self, lines: Sequence[LedgerLine], now: float) -> list[int | None]:
        return self._check(lines, [self._line(ln, now, write=False) for ln in lines], 0, now).remaining

    async def spent(self, lines: Sequence[LedgerLine], now: float) -> list[int]:
        return [self._line(ln, now, write=False).spent for ln in lines]

    # -- cache ----------------------------------------------------------------------------------

    async def cache_get(self, key: str, now: float) -> bytes | None:
        hit = self._cache.get(key)
        if hit is None:
            return None
        if hit[1] <= now:
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return hit[0]

    async def cache_put(self, key: str, value: bytes, ttl_s: float, now: float) -> None:
        self._cache[key] = (value, now + ttl_s)
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_entries:
            self._cache.popitem(last=False)
