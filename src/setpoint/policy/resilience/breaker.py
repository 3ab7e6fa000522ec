"""Circuit breaker per deployment: CLOSED -> OPEN -> HALF_OPEN, over a time-based window.

Defaults follow resilience4j's semantics sized for LLM calls (see shared research D.5): a 60 s
window in 6 buckets, at least 20 calls, open at >= 50% failures (or `slow_call_rate` of calls
slower than `slow_call_s` to first token), stay open 30 s, then allow 3 probes: all succeed ->
CLOSED, any fails -> OPEN again. Rate limiting (429) is not a failure here: it lowers the
deployment's concurrency limit instead.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from setpoint.clock import Clock

__all__ = ["BreakerConfigValues", "BreakerState", "CircuitBreaker"]


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(slots=True, frozen=True)
class BreakerConfigValues:
    window_s: float = 60.0
    buckets: int = 6
    min_calls: int = 20
    failure_rate: float = 0.5
    slow_call_s: float | None = None
    slow_call_rate: float = 1.0
    open_s: float = 30.0
    half_open_probes: int = 3


class CircuitBreaker:
    def __init__(self, name: str, cfg: BreakerConfigValues, clock: Clock) -> None:
        self.name = name
        self._cfg = cfg
        self._clock = clock
        self.state = BreakerState.CLOSED
        self._bucket_s = cfg.window_s / cfg.buckets
        self._counts: dict[int, list[int]] = {}  # bucket index -> [calls, failures, slow]
        self._opened_at = 0.0
        self._probes_out = 0
        self._probes_ok = 0
        self.transitions = 0

    def _window(self, now: float) -> tuple[int, int, int]:
        current = int(now // self._bucket_s)
        for idx in [i for i in self._counts if i <= current - self._cfg.buckets]:
            del self._counts[idx]
        calls = fails = slow = 0
        for c, f, s in self._counts.values():
            calls, fails, slow = calls + c, fails + f, slow + s
        return calls, fails, slow

    def _to(self, state: BreakerState, now: float) -> None:
        self.state = state
        self.transitions += 1
        if state is not BreakerState.CLOSED:
            self._opened_at = now
        self._probes_out = self._probes_ok = 0
        if state is BreakerState.CLOSED:
            self._counts.clear()

    def allow(self) -> bool:
        """May a call go to this deployment now? (In HALF_OPEN, takes one probe slot.)"""
        now = self._clock.monotonic()
        if self.state is BreakerState.OPEN:
            if now - self._opened_at < self._cfg.open_s:
                return False
            self._to(BreakerState.HALF_OPEN, now)
        if self.state is BreakerState.HALF_OPEN:
            if self._probes_out >= self._cfg.half_open_probes:
                if now - self._opened_at < 2 * self._cfg.open_s:
                    return False
                self._to(BreakerState.HALF_OPEN, now)  # probes never reported back: start probing afresh
                self._opened_at = now
            self._probes_out += 1
        return True

    def abandon(self) -> None:
        """A call that `allow()` admitted never ran: give its half-open probe slot back."""
        if self.state is BreakerState.HALF_OPEN and self._probes_out > 0:
            self._probes_out -= 1

    def snapshot(self) -> dict[str, object]:
        """Read-only view (dashboard): state and the calls/failures/slow calls in the window."""
        calls, fails, slow = self._window(self._clock.monotonic())
        retry = self.retry_after_s() if self.state is BreakerState.OPEN else 0.0
        return {"state": self.state.value, "calls": calls, "failures": fails, "slow": slow,
                "retry_after_s": retry, "transitions": self.transitions}

    def retry_after_s(self) -> float:
        return max(0.0, self._cfg.open_s - (self._clock.monotonic() - self._opened_at))

    def record(self, *, ok: bool, ttft_s: float | None = None) -> None:
        now = self._clock.monotonic()
        slow = ok and self._cfg.slow_call_s is not None and ttft_s is not None and ttft_s > self._cfg.slow_call_s
        if self.state is BreakerState.HALF_OPEN:
            if not ok:
                self._to(BreakerState.OPEN, now)
                return
            self._probes_ok += 1
            if self._probes_ok >= self._cfg.half_open_probes:
                self._to(BreakerState.CLOSED, now)
            return
        if self.state is BreakerState.OPEN:
            return  # a call admitted before it opened
        b = self._counts.setdefault(int(now // self._bucket_s), [0, 0, 0])
        b[0] += 1
        b[1] += 0 if ok else 1
        b[2] += 1 if slow else 0
        calls, fails, slows = self._window(now)
        if calls >= self._cfg.min_calls and (
            fails / calls >= self._cfg.failure_rate or slows / calls >= self._cfg.slow_call_rate
        ):
            self._to(BreakerState.OPEN, now)
