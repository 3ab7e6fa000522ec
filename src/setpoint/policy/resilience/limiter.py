"""Adaptive concurrency limit per deployment with priority classes and bounded queues.

The limit follows AIMD driven by what LLM upstreams actually signal (shared research D.4): a 429 or a
time-to-first-token over `ttft_target_s` multiplies it by 0.9; a success while at least half the
limit is in use adds 1. Raw latency is not used (it scales with output length).

By default the limit starts at `max_limit`, not low: AIMD only ever learns from pushback, and an
LLM call lasts seconds, so a low starting limit (it was 64) made a cold gateway queue the 65th
concurrent call on each deployment for a whole upstream call before the additive increase caught
up. Measured at 256 connections on a 100 ms upstream with two workers: 125 of the first 980
requests took 173-224 ms instead of ~101, which alone filled half of the run's slowest 1%. The
upstream says when it is saturated (429, slow first tokens), and the limit comes down from there.

Over the limit, a request waits in a bounded queue ordered by priority (critical > default >
sheddable), then arrival. When the queue is full a newcomer evicts the lowest-priority waiter if it
outranks it, otherwise it is shed. A request whose deadline cannot be met is refused at once. Shed
and refused requests get 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from dataclasses import dataclass, field

from setpoint.clock import Clock
from setpoint.errors import OverloadedError

__all__ = ["AdaptiveLimiter", "LimiterConfigValues", "PRIORITIES", "starting_limit"]

PRIORITIES = {"critical": 0, "default": 1, "sheddable": 2}


@dataclass(slots=True, frozen=True)
class LimiterConfigValues:
    initial: int | None = None  # None: start at max_limit
    min_limit: int = 1
    max_limit: int = 1024
    queue: int = 256
    queue_timeout_s: float = 10.0
    ttft_target_s: float | None = None
    backoff_ratio: float = 0.9


def starting_limit(initial: int | None, max_limit: int) -> int:
    """The limit before any signal: `initial` if set (never above `max_limit`), else `max_limit`."""
    return max_limit if initial is None else min(initial, max_limit)


@dataclass(order=True)
class _Waiter:
    priority: int
    seq: int
    future: asyncio.Future[None] = field(compare=False)


class AdaptiveLimiter:
    def __init__(self, name: str, cfg: LimiterConfigValues, clock: Clock) -> None:
        self.name = name
        self._cfg = cfg
        self._clock = clock
        self.limit = float(starting_limit(cfg.initial, cfg.max_limit))
        self.inflight = 0
        self._queue: list[_Waiter] = []
        self._seq = itertools.count()
        self.shed = 0

    @property
    def queued(self) -> int:
        return sum(1 for w in self._queue if not w.future.done())

    async def acquire(self, priority: str, deadline_s: float | None = None) -> None:
        """Take a slot, waiting in the priority queue if needed; raises OverloadedError when shed."""
        if self.inflight < int(self.limit) and not self.queued:
            self.inflight += 1
            return
        rank = PRIORITIES.get(priority, 1)
        wait_s = self._cfg.queue_timeout_s if deadline_s is None else min(deadline_s, self._cfg.queue_timeout_s)
        if wait_s <= 0:
            self.shed += 1
            raise OverloadedError(f"deployment {self.name} is at its concurrency limit", retry_after_s=1.0)
        if self.queued >= self._cfg.queue:
            worst = max((w for w in self._queue if not w.future.done()), default=None)
            if worst is None or worst.priority <= rank:
                self.shed += 1
                raise OverloadedError(f"deployment {self.name} is overloaded; {priority} traffic is shed", retry_after_s=1.0)
            worst.future.set_exception(
                OverloadedError(f"deployment {self.name} is overloaded; shed for higher-priority traffic", retry_after_s=1.0)
            )
            self.shed += 1
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._queue, _Waiter(rank, next(self._seq), fut))
        try:
            async with self._clock.timeout(wait_s):
                await fut
        except BaseException as exc:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                if isinstance(exc, TimeoutError):
                    return  # granted in the same turn as the timeout fired: keep the slot
                self._release_slot()  # granted just as we gave up: pass it on
            if isinstance(exc, TimeoutError):
                self.shed += 1
                raise OverloadedError(
                    f"deployment {self.name}: no capacity within {wait_s:.1f}s", retry_after_s=1.0
                ) from None
            raise
        # granted: the releaser already counted us in

    def _release_slot(self) -> None:
        self.inflight -= 1
        self._grant()

    def _grant(self) -> None:
        while self._queue and self.inflight < int(self.limit):
            w = heapq.heappop(self._queue)
            if w.future.done():
                continue
            self.inflight += 1
            w.future.set_result(None)

    def release(self, *, rate_limited: bool = False, ttft_s: float | None = None, ok: bool = True) -> None:
        """Give the slot back and adapt the limit from what the call showed."""
        cfg = self._cfg
        slow = cfg.ttft_target_s is not None and ttft_s is not None and ttft_s > cfg.ttft_target_s
        if rate_limited or slow:
            self.limit = max(cfg.min_limit, min(self.limit - 1, self.limit * cfg.backoff_ratio))
        elif ok and self.inflight * 2 >= self.limit:
            self.limit = min(cfg.max_limit, self.limit + 1)
        self._release_slot()
