"""The pipeline's terminal: try the alias's deployments with breakers, concurrency limits, timeouts,
jittered retries under a global retry budget, and degradation when none is healthy.

Per attempt: breaker -> concurrency slot -> timeout -> provider. A stream is "committed" once its
first chunk arrives: failures before that are retried or fall back; after it they end the client's
stream with an explicit error event (never retried). Upstream attempts per client request are capped
by `max_attempts`, and across requests by the retry budget.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from setpoint.accounting.usage_fallback import count_prompt
from setpoint.clock import Clock
from setpoint.config.schema import ResilienceConfig
from setpoint.errors import (
    AllCandidatesFailedError,
    CircuitOpenError,
    InvalidRequestError,
    OverloadedError,
    ProviderRateLimitedError,
    ProviderRejectedError,
    ProviderResponseError,
    ProviderTimeoutError,
    RateLimitedError,
    SetpointError,
    UpstreamError,
)
from setpoint.models import Deployment, ModelRoute
from setpoint.policy.resilience.breaker import BreakerConfigValues, CircuitBreaker
from setpoint.policy.resilience.limiter import AdaptiveLimiter, LimiterConfigValues
from setpoint.policy.resilience.retry_budget import RetryBudget
from setpoint.policy.routing import DeploymentStats, order_deployments
from setpoint.policy.stages.rate_limit import RateLimitStage, Settle, requested_output_tokens
from setpoint.policy.upstream import read_unary, upstream_body
from setpoint.proxy.context import RequestContext
from setpoint.types import Reply, UpstreamCall, UpstreamStream

__all__ = ["Resilience", "UpstreamCaller"]


@dataclass
class Resilience:
    """Process-wide health and capacity state, one entry per deployment (built lazily)."""

    cfg: ResilienceConfig
    clock: Clock
    stats: DeploymentStats = field(default_factory=DeploymentStats)
    breakers: dict[str, CircuitBreaker] = field(default_factory=dict)
    limiters: dict[str, AdaptiveLimiter] = field(default_factory=dict)
    rng: random.Random = field(default_factory=random.Random)
    budget: RetryBudget = field(init=False)

    def __post_init__(self) -> None:
        rb = self.cfg.retry_budget
        self.budget = RetryBudget(self.clock, rb.ratio, rb.min_per_s, rb.window_s)

    cooldowns: dict[str, float] = field(default_factory=dict)  # deployment -> monotonic time

    def cool_down(self, name: str, retry_after_s: float | None) -> None:
        """After an upstream 429, skip the deployment until it said to come back (capped)."""
        wait = min(retry_after_s if retry_after_s is not None else 1.0, self.cfg.max_cooldown_s)
        if wait > 0:
            self.cooldowns[name] = max(self.cooldowns.get(name, 0.0), self.clock.monotonic() + wait)

    def cooldown_s(self, name: str) -> float:
        until = self.cooldowns.get(name)
        return 0.0 if until is None else max(0.0, until - self.clock.monotonic())

    def breaker(self, name: str) -> CircuitBreaker:
        b = self.breakers.get(name)
        if b is None:
            values = BreakerConfigValues(**self.cfg.breaker.model_dump())
            b = self.breakers[name] = CircuitBreaker(name, values, self.clock)
        return b

    def limiter(self, name: str) -> AdaptiveLimiter:
        lim = self.limiters.get(name)
        if lim is None:
            values = LimiterConfigValues(**self.cfg.concurrency.model_dump())
            lim = self.limiters[name] = AdaptiveLimiter(name, values, self.clock)
        return lim


class _PrimedStream:
    """An upstream stream whose first chunk was already read; later chunks under an idle timeout."""

    __slots__ = ("_clock", "_first", "_idle_s", "_inner", "_it", "_name")

    def __init__(self, inner: UpstreamStream, it: AsyncIterator[bytes], first: bytes, clock: Clock,
                 idle_s: float | None, name: str) -> None:
        self._inner, self._it, self._first = inner, it, first
        self._clock, self._idle_s, self._name = clock, idle_s, name

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._first
        while True:
            try:
                if self._idle_s is None:
                    chunk = await anext(self._it)
                else:
                    async with self._clock.timeout(self._idle_s):
                        chunk = await anext(self._it)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise ProviderTimeoutError(f"upstream {self._name} went silent mid-stream for {self._idle_s}s") from None
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


class UpstreamCaller:
    def __init__(
        self, path: str, clock: Clock, resilience: Resilience, routes: dict[str, ModelRoute],
        deployment_limits: RateLimitStage | None = None,
    ) -> None:
        self._path = path
        self._clock = clock
        self._res = resilience
        self._routes = routes
        self._limits = deployment_limits if deployment_limits is not None and deployment_limits.is_active else None

    async def __call__(self, ctx: RequestContext) -> Reply:
        assert ctx.route is not None
        self._res.budget.on_request()
        try:
            return await self._try_route(ctx, ctx.route)
        except (AllCandidatesFailedError, CircuitOpenError, OverloadedError) as err:
            degrade = ctx.route.degrade_to
            if degrade is None or ctx.priority not in ctx.route.degrade_priorities or not _all_unhealthy(err):
                raise
            route = self._routes[degrade]
            ctx.annotations["degraded"] = f"unhealthy:{ctx.route.alias}->{degrade}"
            ctx.response_headers["x-setpoint-degraded"] = f"unhealthy; model={degrade}"
            ctx.route = route
            return await self._try_route(ctx, route)

    async def _try_route(self, ctx: RequestContext, route: ModelRoute) -> Reply:
        res, cfg = self._res, self._res.cfg
        needed = None
        if any(d.context_window for d in route.deployments):
            needed = count_prompt(ctx) + (requested_output_tokens(ctx) or 0)
        deps, skipped = order_deployments(route, res.stats, res.rng, needed)
        if skipped:
            ctx.annotations["context_window_skipped"] = skipped
        if not deps:
            raise InvalidRequestError(
                f"the request needs about {needed} tokens, more than any deployment of '{route.alias}' accepts",
                param="messages",
            )
        errors: list[SetpointError] = []
        attempts: list[str] = ctx.annotations.setdefault("attempts", [])
        rounds = 0
        while len(attempts) < cfg.max_attempts and rounds < cfg.max_attempts:
            rounds += 1
            progressed = False
            for dep in deps:
                if len(attempts) >= cfg.max_attempts:
                    break
                settle = None
                if self._limits is not None:
                    ctx.deployment = dep
                    try:
                        settle = await self._limits.admit(ctx)  # the provider's own limits
                    except RateLimitedError as err:
                        errors.append(err)
                        continue
                left = ctx.deadline_s(self._clock)
                if left is not None and left <= res.stats.ttft_s.get(dep.name, 0.0):
                    await _refund(ctx, settle)
                    errors.append(OverloadedError(
                        f"deployment {dep.name} cannot answer within the request's deadline", retry_after_s=1.0))
                    continue
                cooling = res.cooldown_s(dep.name)
                if cooling > 0:  # the upstream said when to come back (429): do not knock before
                    await _refund(ctx, settle)
                    errors.append(ProviderRateLimitedError(f"deployment {dep.name} is rate limited upstream",
                                                           retry_after_s=cooling))
                    continue
                breaker = res.breaker(dep.name)
                if not breaker.allow():
                    await _refund(ctx, settle)
                    errors.append(CircuitOpenError(f"deployment {dep.name} is open (failing)",
                                                   retry_after_s=breaker.retry_after_s()))
                    continue
                if attempts and not res.budget.try_retry():
                    breaker.abandon()
                    await _refund(ctx, settle)
                    ctx.annotations["retry_budget"] = "exhausted"
                    raise _final(errors)  # the client sees its last real error
                limiter = res.limiter(dep.name)
                try:
                    await limiter.acquire(ctx.priority, left)
                except OverloadedError as err:
                    breaker.abandon()
                    await _refund(ctx, settle)
                    errors.append(err)
                    continue
                except BaseException:
                    breaker.abandon()
                    raise
                progressed = True
                attempts.append(dep.name)
                try:
                    reply = await self._attempt(ctx, dep, limiter, breaker)
                except UpstreamError as err:
                    await _refund(ctx, settle)  # nothing was generated by this attempt
                    errors.append(err)
                    if not err.is_retryable:
                        raise
                    await self._backoff(err, len(attempts), last=dep is deps[-1])
                    continue
                if settle is not None:
                    bound = settle
                    ctx.finalizers.append(lambda c: bound(c, True))
                ctx.response_headers["x-setpoint-route"] = dep.name
                ctx.annotations["route"] = dep.name
                return reply
            if not progressed:
                break
        raise _final(errors)

    async def _backoff(self, err: UpstreamError, n: int, *, last: bool) -> None:
        """Full jitter; an upstream's Retry-After is honoured (up to max_retry_after_s) before
        retrying the same deployments, not before falling back to another one."""
        if not last:
            return
        cfg = self._res.cfg
        wait = self._res.rng.uniform(0, min(cfg.backoff_cap_s, cfg.backoff_base_s * 2 ** (n - 1)))
        ra = getattr(err, "retry_after_s", None)
        if isinstance(ra, (int, float)) and ra <= cfg.max_retry_after_s:
            wait = max(wait, float(ra))
        if wait > 0:
            await self._clock.sleep(wait)

    async def _attempt(
        self, ctx: RequestContext, dep: Deployment, limiter: AdaptiveLimiter, breaker: CircuitBreaker
    ) -> Reply:
        clock = self._clock
        ctx.deployment = dep
        body, raw = upstream_body(ctx, dep)
        call = UpstreamCall(path=self._path, body=body, is_stream=ctx.is_stream, request_id=ctx.request_id, raw=raw)
        t0 = ctx.upstream_started = clock.monotonic()
        stats = self._res.stats
        stats.inflight[dep.name] = stats.inflight.get(dep.name, 0) + 1
        released = False
        trace = ctx.trace
        span = None if trace is None else trace.attempt(ctx, dep, len(ctx.annotations.get("attempts", ())))

        def release(*, ok: bool, rate_limited: bool = False, ttft_s: float | None = None,
                    error: BaseException | None = None) -> None:
            nonlocal released
            if not released:
                released = True
                stats.inflight[dep.name] -= 1
                limiter.release(ok=ok, rate_limited=rate_limited, ttft_s=ttft_s)
                if span is not None:
                    trace.end_attempt(span, ctx, error)  # type: ignore[union-attr]

        try:
            try:
                reply = await self._send(call, dep, ctx)
            finally:
                ctx.upstream_wait_s += clock.monotonic() - t0
        except UpstreamError as err:
            limited = isinstance(err, ProviderRateLimitedError)
            release(ok=False, rate_limited=limited, error=err)
            if limited:
                self._res.cool_down(dep.name, err.retry_after_s)  # type: ignore[attr-defined]
            # 429 lowers concurrency and cools the deployment down; a 4xx the client caused says
            # nothing about the deployment's health. Neither counts as a breaker failure.
            breaker.record(ok=limited or isinstance(err, ProviderRejectedError))
            raise
        except BaseException as exc:
            release(ok=False, error=exc)
            breaker.abandon()  # an unexpected exit (cancellation): give a half-open probe back
            raise
        ttft = clock.monotonic() - t0
        stats.observe_ttft(dep.name, ttft)
        if reply.stream is None:
            ctx.upstream_ms = ttft * 1000
            try:
                read_unary(ctx, dep, reply)  # garbage bodies are the deployment's failure
            except UpstreamError as err:
                breaker.record(ok=False)
                release(ok=False, error=err)
                raise
            breaker.record(ok=True, ttft_s=ttft)
            release(ok=True, ttft_s=ttft)
        else:
            async def settle_stream(ctx: RequestContext) -> None:
                # A stream's health is known only at its end: a cut or broken stream is a failure.
                upstream_failed = ctx.error_code in _STREAM_FAILURES
                breaker.record(ok=not upstream_failed, ttft_s=ttft)
                release(ok=not upstream_failed, ttft_s=ttft,
                        error=_StreamFailure(ctx.error_code) if upstream_failed else None)

            ctx.finalizers.append(settle_stream)
        return reply

    async def _send(self, call: UpstreamCall, dep: Deployment, ctx: RequestContext) -> Reply:
        """One provider call, under the TTFT timeout; for a stream, up to its first chunk."""
        clock, name = self._clock, dep.provider.name
        limit = dep.ttft_timeout_s
        left = ctx.deadline_s(clock)
        if left is not None:
            limit = left if limit is None else min(limit, left)
        try:
            async with clock.timeout(limit):
                reply = await dep.provider.send(call)
                if reply.stream is None:
                    return reply
                it = aiter(reply.stream)
                try:
                    first = await anext(it)
                except StopAsyncIteration:
                    await reply.stream.aclose()
                    raise ProviderResponseError(f"upstream {name} ended the stream without sending anything") from None
                except BaseException:
                    await reply.stream.aclose()
                    raise
        except TimeoutError:
            raise ProviderTimeoutError(f"upstream {name} sent nothing within {limit:.3g}s") from None
        return Reply(status=reply.status, stream=_PrimedStream(reply.stream, it, first, clock, dep.idle_timeout_s, name),
                     headers=reply.headers)


_STREAM_FAILURES = frozenset({"bad_upstream_response", "upstream_timeout", "upstream_unavailable"})


class _StreamFailure(Exception):
    """How a committed stream ended badly, for its attempt span."""

    def __init__(self, code: str | None) -> None:
        super().__init__(code)
        self.wire_code = code


async def _refund(ctx: RequestContext, settle: Settle | None) -> None:
    if settle is not None:
        await settle(ctx, False)


def _all_unhealthy(err: SetpointError) -> bool:
    errors = err.errors if isinstance(err, AllCandidatesFailedError) else [err]
    return bool(errors) and all(isinstance(e, (CircuitOpenError, OverloadedError)) for e in errors)


def _final(errors: list[SetpointError]) -> SetpointError:
    if len(errors) == 1:
        return errors[0]
    last = errors[-1] if errors else None
    return AllCandidatesFailedError(
        f"every deployment failed ({len(errors)} attempts); last: {last.message if last else 'none'}", errors=errors
    )
