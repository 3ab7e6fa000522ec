"""A global retry budget (Finagle's RetryBudget): retries and fallbacks together may add at most
`ratio` extra upstream attempts per client request over a sliding `window_s`, plus a small floor of
`min_per_s` so a quiet gateway can still retry.

Bound: whenever a retry is allowed, the retries of the preceding `window_s` are at most
`ratio x (client requests of that window) + min_per_s x window_s`. Over an arbitrary window W of
length `window_s`, retries are therefore at most `ratio x` the client requests of W and of the
`window_s` before it, plus the floor; over a long period T, upstream attempts <=
(1 + ratio) x client requests + min_per_s x T. Tested in tests/scenarios.
"""

from __future__ import annotations

from collections import deque

from setpoint.clock import Clock

__all__ = ["RetryBudget"]


class RetryBudget:
    def __init__(self, clock: Clock, ratio: float, min_per_s: float, window_s: float) -> None:
        self._clock = clock
        self._ratio = ratio
        self._floor = min_per_s * window_s
        self._window_s = window_s
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()

    def _trim(self, now: float) -> None:
        edge = now - self._window_s
        while self._requests and self._requests[0] <= edge:
            self._requests.popleft()
        while self._retries and self._retries[0] <= edge:
            self._retries.popleft()

    def on_request(self) -> None:
        """A client request arrived (deposits `ratio` retries)."""
        now = self._clock.monotonic()
        self._requests.append(now)
        if len(self._requests) & 0xFF == 0:
            self._trim(now)  # bounded memory under healthy traffic too (amortised)

    def try_retry(self) -> bool:
        """Withdraw one retry (any attempt after a request's first); False when the budget is spent."""
        now = self._clock.monotonic()
        self._trim(now)
        if len(self._retries) + 1 > self._ratio * len(self._requests) + self._floor:
            return False
        self._retries.append(now)
        return True

    def available(self) -> float:
        """Retries that would be allowed right now (for metrics)."""
        self._trim(self._clock.monotonic())
        return max(0.0, self._ratio * len(self._requests) + self._floor - len(self._retries))

    def snapshot(self) -> dict[str, float]:
        """Read-only view (dashboard): client requests and retries in the window, retries allowed."""
        self._trim(self._clock.monotonic())
        return {"requests": len(self._requests), "retries": len(self._retries),
                "allowed": self._ratio * len(self._requests) + self._floor, "window_s": self._window_s}
