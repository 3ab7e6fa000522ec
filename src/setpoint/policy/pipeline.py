"""Build one pipeline per endpoint, once, at startup. Later stages slot in between route and upstream."""

from __future__ import annotations

from collections.abc import Callable

from setpoint.config.compile import Runtime
from setpoint.policy.caller import Resilience, UpstreamCaller
from setpoint.policy.stage import compose
from setpoint.policy.stages.auth import AuthStage
from setpoint.policy.stages.budget import BudgetStage
from setpoint.policy.stages.cache import CacheStage
from setpoint.policy.stages.parse import ParseStage
from setpoint.policy.stages.rate_limit import RateLimitStage
from setpoint.policy.stages.route import RouteStage
from setpoint.policy.stages.semantic import build_semantic
from setpoint.types import Next, Stage
from setpoint.wire.request import parse_chat, parse_embeddings

__all__ = ["build_pipelines"]


def build_pipelines(
    auth: AuthStage, runtime: Runtime, resilience: Resilience, on_stage: Callable[[Stage], None] | None = None
) -> dict[str, Next]:
    """auth -> parse -> route -> cache -> rate_limit -> budget -> caller (breaker -> concurrency -> retry ->
    timeout -> provider, per candidate); stages without rules are left out."""
    cfg, clock, routes = runtime.config, runtime.clock, runtime.routes
    policy: list[Stage] = []
    caches = {alias: m.cache for alias, m in cfg.models.items() if m.cache is not None}
    if caches:
        semantic = build_semantic({a: c.semantic for a, c in caches.items() if c.semantic is not None}, runtime.state, clock)
        policy.append(CacheStage(runtime.state, clock, caches, semantic))  # before limits and budgets: a hit is free
    request_limits = RateLimitStage(cfg.rate_limits, runtime.state, clock, runtime.estimator,
                                    scopes=frozenset({"key", "team", "user", "model"}))
    deployment_limits = RateLimitStage(cfg.rate_limits, runtime.state, clock, runtime.estimator,
                                       scopes=frozenset({"deployment"}))
    if request_limits.is_active:
        policy.append(request_limits)
    if cfg.budgets:
        max_output = {alias: m.max_output_tokens for alias, m in cfg.models.items()}
        policy.append(BudgetStage(cfg.budgets, runtime.state, clock, runtime.estimator, routes, max_output))
    if on_stage is not None:
        for stage in policy:
            on_stage(stage)
    return {
        "chat": compose(
            [auth, ParseStage(parse_chat, allow_stream=True), RouteStage(routes, "chat"), *policy],
            UpstreamCaller("/chat/completions", clock, resilience, routes, deployment_limits),
        ),
        "embeddings": compose(
            [auth, ParseStage(parse_embeddings, allow_stream=False), RouteStage(routes, "embedding"), *policy],
            UpstreamCaller("/embeddings", clock, resilience, routes, deployment_limits),
        ),
    }
