"""`budget`: money budgets per key/team/user/run and period, reserve-then-settle.

Before the call, one hold is placed atomically on every budget the request touches (all or none):

- **unary**: the worst case, prompt (tokenizer count) + `max_tokens` (or the model's
  `max_output_tokens`). If that does not fit but the learned estimate does, `max_tokens` is lowered
  to what the remaining budget can pay for (header `x-setpoint-budget-clamped`), so no unary
  response can overshoot;
- **stream**: prompt + the learned output estimate (p95 of recent outputs for this key and model),
  so agents asking for huge `max_tokens` are not locked out. As output arrives the relay counts it
  and the hold is extended in steps; when a hard budget cannot cover the next chunk the stream is
  cut with an explicit `budget_exceeded` error event.

After the call the hold is released and the actual cost is added (`settle`), before the client sees
the end of the response. Overshoot bound: settled spend <= limit + one stream chunk's cost per
stream in flight (the chunk that crossed the limit was generated, so it is billed, not forwarded).
Soft budgets are tracked and flagged, never refused.
"""

from __future__ import annotations

import calendar
import functools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from setpoint.accounting.estimator import OutputEstimator
from setpoint.accounting.usage_fallback import count_prompt
from setpoint.clock import Clock
from setpoint.config.schema import BudgetConfig
from setpoint.errors import BudgetExceededError, StateBackendError
from setpoint.models import Deployment, ModelRoute
from setpoint.policy.stages.rate_limit import requested_output_tokens
from setpoint.policy.stages.scopes import entity_for
from setpoint.pricing import Pricing
from setpoint.proxy.context import RequestContext
from setpoint.state.base import LedgerLine, LedgerStore, ReserveResult
from setpoint.types import Next, Reply

__all__ = ["BudgetStage", "budget_line", "period_window"]

log = logging.getLogger("setpoint.budget")

_DAY = 86_400.0
_HOLD_TTL_S = 900.0  # a hold of a process that died is released after this long
_MIN_CLAMPED_OUTPUT = 16  # below this a unary request is refused rather than clamped
_SEEN_MAX = 256  # budget entities remembered per process for the budget gauges


def period_window(period: str, now: float) -> tuple[str, float]:
    """(window id, seconds to keep the line) for a calendar-aligned UTC period."""
    if period not in ("daily", "monthly"):
        return "total", 10 * 365 * _DAY
    window, end, slack = _window_of_day(period, int(now // _DAY))
    return window, end - now + slack


@functools.lru_cache(maxsize=16)
def _window_of_day(period: str, day: int) -> tuple[str, float, float]:
    """(window id, end of the window, extra keep) for UTC day number `day`: computed once a day
    per period instead of once per request."""
    t = time.gmtime(day * _DAY)
    if period == "daily":
        end = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0)) + _DAY
        return time.strftime("d%Y-%m-%d", t), end, _DAY
    days = calendar.monthrange(t.tm_year, t.tm_mon)[1]  # monthly
    end = calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0)) + days * _DAY
    return time.strftime("m%Y-%m", t), end, 2 * _DAY


def budget_line(index: int, rule: BudgetConfig, entity: str, now: float) -> LedgerLine:
    """The ledger line of budget rule `index` (its position in the config) for one entity, this period."""
    window, ttl = period_window(rule.period, now)
    limit = round(rule.limit_usd * 1_000_000) if rule.hard else None
    return LedgerLine(f"bg:{index}:{rule.scope}:{entity}:{window}", limit, ttl)


@dataclass(slots=True, frozen=True)
class _Match:
    rule: BudgetConfig
    line: LedgerLine


class _Hold:
    """One request's reservation, extended while a stream produces output."""

    def __init__(
        self, stage: BudgetStage, lines: list[LedgerLine], amount: int, prompt: int, pricing: Pricing, *, fails_closed: bool
    ) -> None:
        self._stage = stage
        self._fails_closed = fails_closed
        self.lines = lines
        self.amount = amount
        self._prompt = prompt
        self._pricing = pricing
        self._step = max(1, amount // 2)

    async def on_output(self, ctx: RequestContext, output_tokens: int) -> None:
        cost = self._pricing.ceil_micros(self._prompt, output_tokens)
        if cost <= self.amount:
            return
        need = max(self._step, cost - self.amount)
        st = self._stage
        try:
            res = await st._store.extend(self.lines, ctx.request_id, need, st._clock.now(), _HOLD_TTL_S)
        except StateBackendError:
            if self._fails_closed:
                raise
            return
        if res.ok:
            self.amount += need
            return
        if need > cost - self.amount:  # a full step does not fit: take exactly what is needed
            res = await st._store.extend(self.lines, ctx.request_id, cost - self.amount, st._clock.now(), _HOLD_TTL_S)
            if res.ok:
                self.amount = cost
                return
        ctx.annotations["budget"] = "cut"
        raise BudgetExceededError(f"budget exhausted mid-stream ({res.refused_key}); the answer was cut here")


class BudgetStage:
    name: ClassVar[str] = "budget"

    def __init__(
        self, rules: list[BudgetConfig], store: LedgerStore, clock: Clock, estimator: OutputEstimator,
        routes: Mapping[str, ModelRoute], max_output: Mapping[str, int],
    ) -> None:
        self._rules = list(enumerate(rules))
        self._store = store
        self._clock = clock
        self._estimator = estimator
        self._routes = routes
        self._max_output = max_output
        self.seen: dict[tuple[int, str], None] = {}  # (rule index, entity), most recent last (for metrics)

    def _matches(self, ctx: RequestContext, now: float) -> list[_Match]:
        out = []
        seen = self.seen
        for i, rule in self._rules:
            entity = entity_for(ctx, rule.scope)
            if entity is None or (rule.name is not None and rule.name != entity):
                continue
            if rule.scope != "run":  # runs are many and short: not watched
                k = (i, entity)
                if seen.pop(k, None) is None and len(seen) >= _SEEN_MAX:
                    del seen[next(iter(seen))]  # the least recently used
                seen[k] = None
            out.append(_Match(rule, budget_line(i, rule, entity, now)))
        return out

    def watched(self) -> list[tuple[int, BudgetConfig, str]]:
        """(rule index, rule, entity) for named budgets and the entities this process saw recently."""
        out = {(i, rule.name): rule for i, rule in self._rules if rule.name is not None}
        for i, entity in self.seen:
            out[(i, entity)] = self._rules[i][1]
        return [(i, rule, entity) for (i, entity), rule in out.items()]

    @staticmethod
    def _fails_closed(matches: list[_Match]) -> bool:
        """Hard budgets fail closed and soft ones open, unless `on_store_error` says otherwise."""
        return any((m.rule.on_store_error or ("closed" if m.rule.hard else "open")) == "closed" for m in matches)

    async def _degrade(self, ctx: RequestContext, matches: list[_Match], now: float) -> None:
        candidates = [m for m in matches if m.rule.degrade_to]
        if not candidates:
            return
        remaining = await self._store.remaining([m.line for m in candidates], now)
        for m, left in zip(candidates, remaining, strict=True):
            limit = round(m.rule.limit_usd * 1_000_000)
            spent_left = left if left is not None else limit - (await self._store.spent([m.line], now))[0]
            if spent_left < m.rule.degrade_below * limit and m.rule.degrade_to in self._routes:
                route = self._routes[m.rule.degrade_to]
                ctx.route, ctx.deployment = route, route.deployments[0]
                ctx.annotations["degraded"] = f"budget:{ctx.model}->{route.alias}"
                ctx.annotations["route"] = ctx.deployment.name
                ctx.response_headers["x-setpoint-degraded"] = f"budget; model={route.alias}"
                return

    async def __call__(self, ctx: RequestContext, call_next: Next) -> Reply:
        now = self._clock.now()
        matches = self._matches(ctx, now)
        if not matches:
            return await call_next(ctx)
        lines = [m.line for m in matches]
        try:
            await self._degrade(ctx, matches, now)
        except StateBackendError:
            pass  # degrading is an optimisation; the reservation below applies the failure policy
        # Any deployment of the alias may end up serving (fallback, strategy): hold at the dearest price.
        pricing = _dearest(ctx.route.deployments) if ctx.route is not None else None
        if pricing is None:
            ctx.annotations["budget"] = "unpriced"  # cost unknown: tracked as zero, never refused
            pricing = Pricing(0, 0, 0, 0)
        # Upstream tokenizers differ a little from ours: reserve the prompt with a margin.
        prompt = count_prompt(ctx) * 11 // 10 + 8
        key_id = ctx.key.id if ctx.key else "-"
        wanted = requested_output_tokens(ctx)
        if ctx.endpoint == "embeddings":
            output = 0
        elif ctx.is_stream:
            output = min(wanted or 1 << 30, self._estimator.estimate(key_id, ctx.model))
        else:
            output = wanted or self._max_output.get(ctx.model, 4096)
        amount = pricing.ceil_micros(prompt, output)
        try:
            res = await self._store.reserve(lines, ctx.request_id, amount, now, _HOLD_TTL_S)
            if not res.ok and not ctx.is_stream and ctx.endpoint == "chat":
                res, amount = await self._clamp(ctx, lines, res.remaining, prompt, pricing, now)
        except StateBackendError:
            if self._fails_closed(matches):
                raise
            log.warning("budget store unavailable; failing open for request %s", ctx.request_id)
            ctx.annotations["budget"] = "store_unavailable"
            return await call_next(ctx)
        if not res.ok:
            raise BudgetExceededError(f"budget exceeded ({_describe(res.refused_key)})")
        hold = _Hold(self, lines, amount, prompt, pricing, fails_closed=self._fails_closed(matches))
        if ctx.is_stream:
            ctx.stream_guard = hold

        async def settle(ctx: RequestContext) -> None:
            actual = ctx.cost_micros or 0
            await self._store.settle(lines, ctx.request_id, actual, self._clock.now())
            if ctx.upstream_started is not None and ctx.usage.completion_tokens:
                self._estimator.observe(key_id, ctx.model, ctx.usage.completion_tokens)
            await self._soft_alerts(ctx, matches)

        ctx.finalizers.append(settle)
        return await call_next(ctx)

    async def _clamp(
        self, ctx: RequestContext, lines: list[LedgerLine], remaining: list[int | None], prompt: int,
        pricing: Pricing, now: float,
    ) -> tuple[ReserveResult, int]:
        """Lower a unary request's max_tokens to what the tightest budget can still pay for."""
        left = min((r for r in remaining if r is not None), default=0)
        per_token = max(pricing.output_pico, 1)
        affordable = (left * 1_000_000 - pricing.cost_pico(prompt, 0)) // per_token
        key_id = ctx.key.id if ctx.key else "-"
        if affordable < max(_MIN_CLAMPED_OUTPUT, min(self._estimator.estimate(key_id, ctx.model), 64)):
            refused = next((ln.key for ln, r in zip(lines, remaining, strict=True) if r is not None and r == left), None)
            return ReserveResult(ok=False, refused_key=refused, remaining=remaining), 0
        amount = pricing.ceil_micros(prompt, int(affordable))
        res = await self._store.reserve(lines, ctx.request_id, amount, now, _HOLD_TTL_S)
        if res.ok:
            field_name = "max_completion_tokens" if "max_completion_tokens" in ctx.body else "max_tokens"
            ctx.body[field_name] = int(affordable)
            ctx.is_body_modified = True
            ctx.annotations["budget"] = f"clamped:{int(affordable)}"
            ctx.response_headers["x-setpoint-budget-clamped"] = str(int(affordable))
        return res, amount

    async def _soft_alerts(self, ctx: RequestContext, matches: list[_Match]) -> None:
        soft = [m for m in matches if not m.rule.hard]
        if not soft:
            return
        spent = await self._store.spent([m.line for m in soft], self._clock.now())
        for m, s in zip(soft, spent, strict=True):
            if s > m.rule.limit_usd * 1_000_000:
                ctx.annotations.setdefault("soft_budget_exceeded", []).append(m.line.key)
                log.warning("soft budget exceeded: %s spent %d of %d micro-dollars",
                            m.line.key, s, round(m.rule.limit_usd * 1_000_000))


def _dearest(deployments: tuple[Deployment, ...]) -> Pricing | None:
    """A price no deployment of the route exceeds, per token kind (None if none is priced)."""
    priced = [d.pricing for d in deployments if d.pricing is not None]
    if not priced:
        return None
    return Pricing(
        max(p.input_pico for p in priced), max(p.cached_input_pico for p in priced),
        max(p.output_pico for p in priced),
        max(p.output_pico if p.reasoning_pico < 0 else p.reasoning_pico for p in priced),
    )


def _describe(line_key: str | None) -> str:
    if not line_key:
        return "budget"
    _, _, scope, *entity, window = line_key.split(":")
    return f"{scope} {':'.join(entity)}, period {window}"
