"""Unit tests of the resilience primitives on virtual time: CircuitBreaker, AdaptiveLimiter,
RetryBudget (policy/resilience/). No network, no gateway; `ManualClock` drives every duration."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from setpoint.clock import ManualClock, RealClock
from setpoint.errors import OverloadedError
from setpoint.policy.resilience.breaker import BreakerConfigValues, BreakerState, CircuitBreaker
from setpoint.policy.resilience.limiter import AdaptiveLimiter, LimiterConfigValues
from setpoint.policy.resilience.retry_budget import RetryBudget

# -- CircuitBreaker -----------------------------------------------------------------------------


def breaker(clock: ManualClock, **kw: object) -> CircuitBreaker:
    cfg = {"window_s": 60.0, "min_calls": 4, "failure_rate": 0.5, "open_s": 30.0, "half_open_probes": 2, **kw}
    return CircuitBreaker("d", BreakerConfigValues(**cfg), clock)  # type: ignore[arg-type]


def call(b: CircuitBreaker, ok: bool, ttft_s: float | None = None) -> bool:
    """allow() then record(): what the caller does for one attempt. False if not admitted."""
    if not b.allow():
        return False
    b.record(ok=ok, ttft_s=ttft_s)
    return True


def test_breaker_needs_min_calls_before_opening() -> None:
    b = breaker(ManualClock())
    for _ in range(3):
        assert call(b, ok=False)
    assert b.state is BreakerState.CLOSED  # 100% failures, but only 3 calls of the 4 needed
    assert call(b, ok=False)
    assert b.state is BreakerState.OPEN


def test_breaker_opens_at_failure_rate_not_below() -> None:
    b = breaker(ManualClock(), min_calls=10, failure_rate=0.5)
    for i in range(10):
        call(b, ok=i % 3 != 0)  # 4 failures out of 10 = 40%
    assert b.state is BreakerState.CLOSED
    call(b, ok=False)
    call(b, ok=False)  # 6 / 12 = 50%
    assert b.state is BreakerState.OPEN


async def test_breaker_open_rejects_until_open_s_then_half_open_probes_close_it() -> None:
    clock = ManualClock()
    b = breaker(clock)
    for _ in range(4):
        call(b, ok=False)
    assert b.state is BreakerState.OPEN
    assert not b.allow()
    assert b.retry_after_s() == pytest.approx(30.0)
    await clock.advance(29.9)
    assert not b.allow()
    assert b.retry_after_s() == pytest.approx(0.1)
    await clock.advance(0.1)
    # HALF_OPEN: exactly half_open_probes calls are let through.
    assert b.allow()
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow()
    assert not b.allow()
    b.record(ok=True)
    assert b.state is BreakerState.HALF_OPEN  # one probe back, one still out
    assert not b.allow()
    b.record(ok=True)
    assert b.state is BreakerState.CLOSED
    # CLOSED again with a clean window: it takes min_calls new failures to open.
    for _ in range(3):
        call(b, ok=False)
    assert b.state is BreakerState.CLOSED


async def test_breaker_failed_probe_reopens_for_a_full_open_s() -> None:
    clock = ManualClock()
    b = breaker(clock)
    for _ in range(4):
        call(b, ok=False)
    await clock.advance(30)
    assert b.allow() and b.allow()
    b.record(ok=True)
    b.record(ok=False)  # any probe failing -> OPEN
    assert b.state is BreakerState.OPEN
    assert b.retry_after_s() == pytest.approx(30.0)
    await clock.advance(29)
    assert not b.allow()
    await clock.advance(1)
    assert b.allow()
    assert b.state is BreakerState.HALF_OPEN
    assert b.transitions == 4  # CLOSED->OPEN->HALF_OPEN->OPEN->HALF_OPEN


async def test_breaker_abandon_returns_a_probe_slot() -> None:
    clock = ManualClock()
    b = breaker(clock, half_open_probes=1)
    b.abandon()  # CLOSED: nothing to give back, no effect
    assert b.state is BreakerState.CLOSED
    for _ in range(4):
        call(b, ok=False)
    b.abandon()  # OPEN: no effect either
    assert not b.allow()
    await clock.advance(30)
    assert b.allow()
    assert not b.allow()  # the single probe slot is taken
    b.abandon()  # the admitted call never ran (e.g. shed by the limiter)
    assert b.allow()  # so the slot can be used by the next one
    assert not b.allow()
    b.abandon()
    b.abandon()  # never below zero: one abandon per admitted call
    assert b.allow()
    assert not b.allow()
    b.record(ok=True)
    assert b.state is BreakerState.CLOSED


def test_breaker_opens_on_slow_first_tokens() -> None:
    b = breaker(ManualClock(), min_calls=4, slow_call_s=2.0, slow_call_rate=0.75)
    for _ in range(2):
        call(b, ok=True, ttft_s=5.0)
    for _ in range(2):
        call(b, ok=True, ttft_s=0.5)
    assert b.state is BreakerState.CLOSED  # 2 slow of 4 = 50% < 75%
    call(b, ok=True, ttft_s=5.0)
    call(b, ok=True, ttft_s=5.0)  # 4 slow of 6 = 67%
    assert b.state is BreakerState.CLOSED
    call(b, ok=True, ttft_s=5.0)
    call(b, ok=True, ttft_s=5.0)  # 6 of 8 = 75%
    assert b.state is BreakerState.OPEN


async def test_breaker_window_forgets_old_calls() -> None:
    clock = ManualClock()
    b = breaker(clock, window_s=60.0, min_calls=4)
    for _ in range(3):
        call(b, ok=False)
    await clock.advance(61)  # those 3 failures leave the 60 s window (6 buckets of 10 s)
    call(b, ok=False)
    assert b.state is BreakerState.CLOSED
    for _ in range(3):
        call(b, ok=False)
    assert b.state is BreakerState.OPEN


def test_breaker_ignores_results_of_calls_admitted_before_it_opened() -> None:
    b = breaker(ManualClock())
    assert b.allow() and b.allow()  # two calls in flight
    for _ in range(4):
        call(b, ok=False)
    assert b.state is BreakerState.OPEN
    b.record(ok=True)
    b.record(ok=True)
    assert b.state is BreakerState.OPEN


# -- AdaptiveLimiter ----------------------------------------------------------------------------


def limiter(clock: object, **kw: object) -> AdaptiveLimiter:
    cfg = {"initial": 2, "min_limit": 1, "max_limit": 8, "queue": 4, "queue_timeout_s": 5.0, **kw}
    return AdaptiveLimiter("d", LimiterConfigValues(**cfg), clock)  # type: ignore[arg-type]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_limiter_aimd() -> None:
    lim = limiter(ManualClock(), initial=10, min_limit=2, max_limit=12, ttft_target_s=1.0)
    for _ in range(10):
        await lim.acquire("default")
    lim.release(rate_limited=True)  # a 429: x0.9 (at least -1)
    assert lim.limit == pytest.approx(9.0)
    lim.release(ttft_s=3.0)  # a first token slower than the target
    assert lim.limit == pytest.approx(8.0)
    # 8 in flight, limit 8: successes at >= half use add 1 each, up to max_limit.
    for _ in range(4):
        lim.release(ok=True, ttft_s=0.1)
        await lim.acquire("default")
    assert lim.limit == pytest.approx(12.0)
    # Underused (1 in flight of 12): a success does not raise the limit.
    for _ in range(7):
        lim.release(ok=True)
    assert lim.inflight == 1
    before = lim.limit
    lim.release(ok=True)
    assert lim.limit == before
    # A failure (not a 429) leaves it alone; 429s push it down to min_limit, never below.
    await lim.acquire("default")
    lim.release(ok=False)
    assert lim.limit == before
    for _ in range(30):
        await lim.acquire("default")
        lim.release(rate_limited=True)
    assert lim.limit == 2.0
    assert lim.inflight == 0


async def test_limiter_starts_open_and_comes_down_only_on_pushback() -> None:
    """With no `initial`, a cold limiter holds nothing back: a burst of 600 concurrent calls all
    start at once (none queued), and only 429s bring the limit down from max_limit."""
    lim = AdaptiveLimiter("d", LimiterConfigValues(max_limit=1024, queue=4), ManualClock())  # type: ignore[arg-type]
    assert lim.limit == 1024
    waits = [asyncio.ensure_future(lim.acquire("default")) for _ in range(600)]
    await settle()
    assert all(w.done() and w.exception() is None for w in waits)
    assert (lim.inflight, lim.queued, lim.shed) == (600, 0, 0)
    for _ in range(600):
        lim.release(ok=True)
    assert lim.limit == 1024  # successes never raise it past max_limit
    for _ in range(20):
        await lim.acquire("default")
        lim.release(rate_limited=True)
    assert lim.limit == pytest.approx(1024 * 0.9**20)
    # An explicit `initial` still binds, and is never above max_limit.
    assert limiter(ManualClock(), initial=3).limit == 3
    assert limiter(ManualClock(), initial=50, max_limit=8).limit == 8


async def test_limiter_grants_by_priority_then_arrival() -> None:
    clock = ManualClock()
    lim = limiter(clock, initial=1, max_limit=1, queue=8)
    await lim.acquire("default")
    order: list[str] = []

    async def wait(name: str, prio: str) -> None:
        await lim.acquire(prio)
        order.append(name)

    names = [("s1", "sheddable"), ("d1", "default"), ("c1", "critical"), ("s2", "sheddable"), ("c2", "critical"),
             ("d2", "default")]
    tasks = []
    for name, prio in names:
        tasks.append(asyncio.create_task(wait(name, prio)))
        await settle()
    assert lim.queued == 6 and lim.inflight == 1
    for _ in names:
        lim.release()  # each release hands the slot to the best waiter
        await settle()
    await asyncio.gather(*tasks)
    assert order == ["c1", "c2", "d1", "d2", "s1", "s2"]
    assert lim.inflight == 1 and lim.queued == 0


async def test_limiter_full_queue_evicts_lower_priority_or_sheds_newcomer() -> None:
    clock = ManualClock()
    lim = limiter(clock, initial=1, max_limit=1, queue=3)
    await lim.acquire("critical")
    waiting = {name: asyncio.create_task(lim.acquire(prio))
               for name, prio in [("s_old", "sheddable"), ("d", "default"), ("s_new", "sheddable")]}
    await settle()
    assert lim.queued == 3
    # A sheddable or default newcomer does not outrank the worst waiter (sheddable)... a default does.
    with pytest.raises(OverloadedError):
        await lim.acquire("sheddable")
    d2 = asyncio.create_task(lim.acquire("default"))
    await settle()
    # ...it evicted the lowest-priority, most recent waiter.
    assert waiting["s_new"].done()
    with pytest.raises(OverloadedError, match="shed for higher-priority"):
        waiting["s_new"].result()
    assert not waiting["s_old"].done()
    assert lim.queued == 3
    c = asyncio.create_task(lim.acquire("critical"))
    await settle()
    assert waiting["s_old"].done() and isinstance(waiting["s_old"].exception(), OverloadedError)
    assert lim.queued == 3  # never above the bound
    # Now the queue is [d, d2, c]: a default newcomer cannot evict an equal; it is shed.
    with pytest.raises(OverloadedError):
        await lim.acquire("default")
    assert lim.shed == 4
    # Drain: the critical waiter goes first.
    lim.release()
    await settle()
    assert c.done() and not waiting["d"].done()
    for _ in range(3):
        lim.release()
        await settle()
    assert waiting["d"].done() and d2.done()
    assert lim.inflight == 0 and lim.queued == 0


async def test_limiter_queue_timeout_and_deadline_shed() -> None:
    clock = ManualClock()
    lim = limiter(clock, initial=1, max_limit=1, queue=4, queue_timeout_s=5.0)
    await lim.acquire("default")
    # A deadline already spent: refused at once.
    with pytest.raises(OverloadedError):
        await lim.acquire("critical", deadline_s=0.0)
    timed = asyncio.create_task(lim.acquire("default"))
    short = asyncio.create_task(lim.acquire("critical", deadline_s=1.0))
    await settle()
    assert lim.queued == 2
    await clock.advance(1.0)  # the deadline (shorter than queue_timeout_s) bounds the wait
    await settle()
    assert short.done() and isinstance(short.exception(), OverloadedError)
    assert not timed.done()
    await clock.advance(4.0)
    await settle()
    assert timed.done() and isinstance(timed.exception(), OverloadedError)
    assert lim.queued == 0 and lim.shed == 3
    # The slot accounting is intact: after the holder leaves, a newcomer gets in at once.
    lim.release()
    await asyncio.wait_for(lim.acquire("sheddable"), 1)
    assert lim.inflight == 1


async def test_limiter_cancelled_waiter_leaves_no_trace() -> None:
    clock = ManualClock()
    lim = limiter(clock, initial=1, max_limit=1)
    await lim.acquire("default")
    gone = asyncio.create_task(lim.acquire("default"))
    await settle()
    gone.cancel()
    await settle()
    assert lim.queued == 0
    # Granted and cancelled in the same breath: the slot is passed on, not lost.
    late = asyncio.create_task(lim.acquire("default"))
    await settle()
    lim.release()  # grants `late`...
    late.cancel()  # ...which is cancelled before it could run
    await settle()
    assert late.cancelled()
    assert lim.inflight == 0
    await asyncio.wait_for(lim.acquire("default"), 1)


async def test_limiter_grant_racing_the_queue_timeout_does_not_leak_the_slot() -> None:
    lim = limiter(RealClock(), initial=1, max_limit=1, queue=4, queue_timeout_s=0.05)
    await lim.acquire("default")  # the holder
    waiter = asyncio.create_task(lim.acquire("default"))
    await settle()  # parked, its 50 ms queue timeout armed
    assert lim.queued == 1
    # The holder finishes 40 ms later, but the loop is busy for 100 ms: both timers come due in the
    # same iteration, the release first (it is due first), then the timeout.
    asyncio.get_running_loop().call_later(0.04, lim.release)
    time.sleep(0.1)
    try:
        await waiter
        granted = True
    except OverloadedError:
        granted = False
    # Either the waiter holds the slot, or the slot is free again.
    assert lim.inflight == (1 if granted else 0), f"granted={granted}, inflight={lim.inflight}"


# -- RetryBudget --------------------------------------------------------------------------------


async def test_retry_budget_floor_ratio_and_window() -> None:
    clock = ManualClock()
    budget = RetryBudget(clock, ratio=0.2, min_per_s=0.5, window_s=10)  # floor 5
    assert sum(budget.try_retry() for _ in range(20)) == 5  # a quiet gateway can still retry
    for _ in range(10):
        budget.on_request()
    assert sum(budget.try_retry() for _ in range(20)) == 2  # 0.2 x 10 more
    await clock.advance(5)
    for _ in range(20):
        budget.on_request()
    assert sum(budget.try_retry() for _ in range(20)) == 4  # 0.2 x 30 + 5 - 7 used
    await clock.advance(5.01)  # the first 10 requests and the first 7 retries leave the window
    assert sum(budget.try_retry() for _ in range(20)) == 0.2 * 20 + 5 - 4
    await clock.advance(10.01)
    assert sum(budget.try_retry() for _ in range(20)) == 5


def test_retry_budget_zero_means_no_retries() -> None:
    budget = RetryBudget(ManualClock(), ratio=0.0, min_per_s=0.0, window_s=10)
    for _ in range(100):
        budget.on_request()
    assert not budget.try_retry()


@pytest.mark.parametrize("seed", range(3))
async def test_retry_budget_bound_over_sliding_window(seed: int) -> None:
    """Random traffic and failures: at every retry decision, the attempts of the last `window_s`
    (first attempts + retries) stay <= (1 + ratio) x requests + min_per_s x window_s."""
    rng = random.Random(seed)
    ratio, min_per_s, window_s = 0.2, 0.5, 10.0
    clock = ManualClock()
    budget = RetryBudget(clock, ratio, min_per_s, window_s)
    requests: list[float] = []
    retries: list[float] = []
    for _ in range(3000):
        await clock.advance(rng.expovariate(20.0) if rng.random() < 0.9 else rng.uniform(1, 8))
        budget.on_request()
        requests.append(clock.monotonic())
        wanted = rng.choice([0, 0, 0, 1, 2, 2]) if rng.random() < 0.5 else 0  # bursts of failing requests
        for _ in range(wanted):
            if not budget.try_retry():
                break
            retries.append(clock.monotonic())
    assert len(retries) > 100  # the budget was exercised
    worst = 0.0
    for t in retries:
        in_window = lambda xs: sum(1 for x in xs if t - window_s < x <= t)  # noqa: E731
        attempts = in_window(requests) + in_window(retries)
        bound = (1 + ratio) * in_window(requests) + min_per_s * window_s
        assert attempts <= bound + 1e-9
        worst = max(worst, attempts / bound)
    print(f"\nretry budget seed {seed}: {len(requests)} requests, {len(retries)} retries, worst attempts/bound {worst:.3f}")


async def test_retry_budget_bound_over_any_window() -> None:
    """The precise bound (docs/resilience.md): over any window of window_s, retries <= ratio x the client
    requests of that window and of the window_s before it, plus the floor. A healthy burst just before
    an outage lends the outage its budget, so the naive (same-window) bound does not hold; this does."""
    ratio, min_per_s, window_s = 0.2, 0.5, 10.0
    clock = ManualClock()
    budget = RetryBudget(clock, ratio, min_per_s, window_s)
    log: list[tuple[float, str]] = []
    for _ in range(100):  # a healthy burst at t=0
        budget.on_request()
        log.append((clock.monotonic(), "first"))
    await clock.advance(9.5)
    for _ in range(10):  # an outage starts at t=9.5: ten requests, each retried twice
        budget.on_request()
        log.append((clock.monotonic(), "first"))
        for _ in range(2):
            if budget.try_retry():
                log.append((clock.monotonic(), "retry"))
    start, end = 0.5, 10.5  # a window of window_s that starts after the healthy burst
    retries = sum(1 for t, kind in log if start < t <= end and kind == "retry")
    same_window = sum(1 for t, kind in log if start < t <= end and kind == "first")
    lookback = sum(1 for t, kind in log if start - window_s < t <= end and kind == "first")
    assert retries > ratio * same_window + min_per_s * window_s  # the naive bound is exceeded here...
    assert retries <= ratio * lookback + min_per_s * window_s, (retries, lookback)  # ...the stated one holds


async def test_retry_budget_memory_stays_bounded_without_retries() -> None:
    """Healthy traffic never calls try_retry(); the request log must still be trimmed."""
    clock = ManualClock()
    budget = RetryBudget(clock, 0.2, 1.0, 10.0)
    for _ in range(200):
        for _ in range(50):
            budget.on_request()
        await clock.advance(1.0)
    assert len(budget._requests) < 50 * 10 + 300  # noqa: SLF001 - about one window's worth, not 10,000
