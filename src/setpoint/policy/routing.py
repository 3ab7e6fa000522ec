"""Order an alias's deployments for one request: fallback, weighted, least-latency, least-busy, cost.

Deployments whose `context_window` cannot hold the prompt plus the requested output are dropped
(context-window fallback). Health (open breakers, overload) is applied later, while trying them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping

from setpoint.models import Deployment, ModelRoute

__all__ = ["DeploymentStats", "order_deployments"]


class DeploymentStats:
    """Per-deployment signals for routing: EWMA of time to first token, and calls in flight."""

    def __init__(self, alpha: float = 0.2) -> None:
        self._alpha = alpha
        self.ttft_s: dict[str, float] = {}
        self.inflight: dict[str, int] = {}

    def observe_ttft(self, name: str, seconds: float) -> None:
        prev = self.ttft_s.get(name)
        self.ttft_s[name] = seconds if prev is None else prev + self._alpha * (seconds - prev)


def _weighted(deps: list[Deployment], rng: random.Random) -> list[Deployment]:
    """A weighted random permutation (Efraimidis-Spirakis keys)."""
    return sorted(deps, key=lambda d: -(rng.random() ** (1.0 / d.weight)))


def _cost_key(d: Deployment) -> float:
    p = d.pricing
    return float("inf") if p is None else p.input_pico + p.output_pico


_STRATEGIES: Mapping[str, Callable[[list[Deployment], DeploymentStats, random.Random], list[Deployment]]] = {
    "fallback": lambda deps, stats, rng: deps,
    "weighted": lambda deps, stats, rng: _weighted(deps, rng),
    # Unmeasured deployments first (0.0) so that every one gets measured.
    "least_latency": lambda deps, stats, rng: sorted(deps, key=lambda d: stats.ttft_s.get(d.name, 0.0)),
    "least_busy": lambda deps, stats, rng: sorted(deps, key=lambda d: stats.inflight.get(d.name, 0)),
    "cost": lambda deps, stats, rng: sorted(deps, key=_cost_key),
}


def order_deployments(
    route: ModelRoute, stats: DeploymentStats, rng: random.Random, needed_tokens: int | None
) -> tuple[list[Deployment], list[str]]:
    """(deployments to try in order, names skipped because the request does not fit their window)."""
    fits, skipped = [], []
    for d in route.deployments:
        if needed_tokens is not None and d.context_window is not None and needed_tokens > d.context_window:
            skipped.append(d.name)
        else:
            fits.append(d)
    return _STRATEGIES[route.strategy](fits, stats, rng), skipped
