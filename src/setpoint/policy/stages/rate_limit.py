"""`rate_limit`: requests and tokens per minute, per key/team/user/model/deployment.

Each limit is a token bucket (capacity = the per-minute limit, refilled at limit/60 per second):
at most `limit` in a burst and, over any window of T seconds, at most `limit x (1 + T/60)`.
All buckets a request touches are taken atomically (all or none). Token limits reserve an
estimate first (prompt tokens counted by the tokenizer + `max_tokens`, or the learned output
estimate when the request sets none) and settle with the real usage afterwards.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import ClassVar

from setpoint.accounting.estimator import OutputEstimator
from setpoint.accounting.usage_fallback import count_prompt
from setpoint.clock import Clock
from setpoint.config.schema import RateLimitConfig
from setpoint.errors import RateLimitedError, StateBackendError
from setpoint.policy.stages.scopes import entity_for
from setpoint.proxy.context import RequestContext
from setpoint.state.base import BucketCharge, LimiterStore
from setpoint.types import Next, Reply

__all__ = ["RateLimitStage", "Settle", "requested_output_tokens"]

log = logging.getLogger("setpoint.rate_limit")

_KINDS = ("rpm", "tpm", "input_tpm", "output_tpm")


@dataclass(slots=True, frozen=True)
class _Charge:
    rule: RateLimitConfig
    kind: str
    bucket: BucketCharge


def requested_output_tokens(ctx: RequestContext) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        v = ctx.body.get(name)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v * (ctx.body["n"] if isinstance(ctx.body.get("n"), int) and ctx.body["n"] > 0 else 1)
    return None


Settle = Callable[[RequestContext, bool], Awaitable[None]]  # (ctx, counts as used) -> None


class RateLimitStage:
    """The stage handles every scope but `deployment`; the caller admits deployment-scope limits per
    attempt through `admit`, since only it knows which deployment serves (fallbacks, strategies)."""

    name: ClassVar[str] = "rate_limit"

    def __init__(
        self, rules: list[RateLimitConfig], store: LimiterStore, clock: Clock, estimator: OutputEstimator,
        *, scopes: frozenset[str],
    ) -> None:
        self._rules = [(i, r) for i, r in enumerate(rules) if r.scope in scopes]
        self._store = store
        self._clock = clock
        self._estimator = estimator
        self._needs_tokens = any(r.tpm or r.input_tpm or r.output_tpm for _, r in self._rules)

    @property
    def is_active(self) -> bool:
        return bool(self._rules)

    def _charges(self, ctx: RequestContext, prompt: int, output: int) -> list[_Charge]:
        out: list[_Charge] = []
        for i, rule in self._rules:
            entity = entity_for(ctx, rule.scope)
            if entity is None or (rule.name is not None and rule.name != entity):
                continue
            for kind in _KINDS:
                limit = getattr(rule, kind)
                if limit is None:
                    continue
                amount = {"rpm": 1, "tpm": prompt + output, "input_tpm": prompt, "output_tpm": output}[kind]
                key = f"rl:{i}:{rule.scope}:{entity}:{kind}"
                out.append(_Charge(rule, kind, BucketCharge(key, float(limit), limit / 60.0, float(amount))))
        return out

    async def admit(self, ctx: RequestContext) -> Settle | None:
        """Take every bucket that applies (all or none); raises RateLimitedError when refused.

        Returns the settle function (None when nothing applied or the store failed open)."""
        if not any(entity_for(ctx, r.scope) is not None for _, r in self._rules):
            return None
        prompt = count_prompt(ctx) if self._needs_tokens else 0
        wanted = requested_output_tokens(ctx)
        key_id = ctx.key.id if ctx.key else "-"
        output = 0 if ctx.endpoint == "embeddings" else (wanted if wanted is not None else self._estimator.estimate(key_id, ctx.model))
        charges = self._charges(ctx, prompt, output)
        if not charges:
            return None
        try:
            res = await self._store.take([c.bucket for c in charges], self._clock.now())
        except StateBackendError:
            if any(c.rule.on_store_error == "closed" for c in charges):
                raise
            log.warning("rate-limit store unavailable; failing open for request %s", ctx.request_id)
            ctx.annotations["rate_limit"] = "store_unavailable"
            return None
        self._headers(ctx, charges, res.levels)
        if not res.ok:
            raise RateLimitedError(
                f"rate limit reached for {charges[0].rule.scope} limits; retry after {res.retry_after_s:.1f}s",
                retry_after_s=res.retry_after_s,
            )

        async def settle(ctx: RequestContext, used: bool) -> None:
            # Give back what was reserved and not used (or take what was used beyond it). A request
            # that never reached the upstream gets its request slot back too.
            actual_in, actual_out = (ctx.usage.prompt_tokens, ctx.usage.completion_tokens) if used else (0, 0)
            deltas = {"rpm": 0 if used else 1, "tpm": prompt + output - actual_in - actual_out,
                      "input_tpm": prompt - actual_in, "output_tpm": output - actual_out}
            moves = [BucketCharge(c.bucket.key, c.bucket.capacity, c.bucket.rate_per_s, float(deltas[c.kind]))
                     for c in charges if deltas[c.kind]]
            if moves:
                await self._store.adjust(moves, self._clock.now())

        return settle

    async def __call__(self, ctx: RequestContext, call_next: Next) -> Reply:
        settle = await self.admit(ctx)
        if settle is not None:
            ctx.finalizers.append(lambda c: settle(c, c.upstream_started is not None))
        return await call_next(ctx)

    @staticmethod
    def _headers(ctx: RequestContext, charges: list[_Charge], levels: list[float]) -> None:
        """OpenAI-style `x-ratelimit-*` headers from the first request and token limits that apply."""
        seen: set[str] = set()
        for c, level in zip(charges, levels, strict=True):
            family = "requests" if c.kind == "rpm" else "tokens"
            if family in seen:
                continue
            seen.add(family)
            cap, rate = c.bucket.capacity, c.bucket.rate_per_s
            ctx.response_headers[f"x-ratelimit-limit-{family}"] = str(int(cap))
            ctx.response_headers[f"x-ratelimit-remaining-{family}"] = str(max(0, math.floor(level)))
            reset = (cap - level) / rate if rate > 0 else 0.0
            ctx.response_headers[f"x-ratelimit-reset-{family}"] = f"{max(0.0, reset):.3f}s"
