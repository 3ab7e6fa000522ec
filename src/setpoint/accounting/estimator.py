"""Learned output length per key and model: a high quantile of recent outputs.

Sizes token-limit reservations and stream budget holds, so an agent that asks for a huge
`max_tokens` but writes short answers is not locked out (the hard bound is enforced on the stream).
Per process; a new worker starts from the configured default.
"""

from __future__ import annotations

from collections import deque

__all__ = ["OutputEstimator"]


class OutputEstimator:
    def __init__(self, default_tokens: int, quantile: float, window: int) -> None:
        self._default = default_tokens
        self._q = quantile
        self._window = window
        self._seen: dict[tuple[str, str], deque[int]] = {}
        self._cache: dict[tuple[str, str], int] = {}

    def estimate(self, key_id: str, model: str) -> int:
        k = (key_id, model)
        cached = self._cache.get(k)
        if cached is not None:
            return cached
        seen = self._seen.get(k)
        if not seen:
            return self._default
        ordered = sorted(seen)
        value = ordered[min(len(ordered) - 1, int(self._q * len(ordered)))]
        self._cache[k] = value
        return value

    def observe(self, key_id: str, model: str, output_tokens: int) -> None:
        k = (key_id, model)
        seen = self._seen.get(k)
        if seen is None:
            if len(self._seen) > 50_000:
                self._seen.clear()
                self._cache.clear()
            seen = self._seen[k] = deque(maxlen=self._window)
        seen.append(output_tokens)
        self._cache.pop(k, None)
