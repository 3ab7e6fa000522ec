"""Injectable time. Everything that reads time or sleeps takes a `Clock`.

`RealClock` is the wall clock; `ManualClock` is virtual time for tests and the simulator:
`sleep()` parks the caller until `advance()` moves time past its deadline.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

__all__ = ["Clock", "ManualClock", "RealClock"]


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the Unix epoch (for timestamps)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a monotonic scale (for durations and deadlines)."""
        ...

    async def sleep(self, seconds: float) -> None: ...

    def timeout(self, seconds: float | None) -> AbstractAsyncContextManager[None]:
        """Raise `TimeoutError` if the block is still running after `seconds` (None: no limit)."""
        ...


class RealClock:
    __slots__ = ()

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.perf_counter()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def timeout(self, seconds: float | None) -> AbstractAsyncContextManager[None]:
        return asyncio.timeout(seconds)


class ManualClock:
    """Virtual time. `advance(dt)` wakes every sleeper whose deadline has passed, in order."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._epoch = start
        self._t = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._epoch + self._t

    def monotonic(self) -> float:
        return self._t

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._t + seconds, next(self._seq), fut))
        await fut

    @asynccontextmanager
    async def timeout(self, seconds: float | None) -> AsyncIterator[None]:
        """Virtual-time timeout: when time is advanced past the deadline the block is cancelled."""
        if seconds is None:
            yield
            return
        task = asyncio.current_task()
        assert task is not None
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fired = False

        def expire(_: asyncio.Future[None]) -> None:
            nonlocal fired
            if not fut.cancelled():
                fired = True
                task.cancel()

        fut.add_done_callback(expire)
        heapq.heappush(self._sleepers, (self._t + seconds, next(self._seq), fut))
        try:
            yield
        except asyncio.CancelledError:
            if fired:
                task.uncancel()
                raise TimeoutError from None
            raise
        finally:
            if not fut.done():
                fut.cancel()

    @property
    def pending(self) -> int:
        return sum(1 for _, _, f in self._sleepers if not f.done())

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking sleepers in deadline order and letting them run."""
        target = self._t + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            when, _, fut = heapq.heappop(self._sleepers)
            self._t = max(self._t, when)
            if not fut.done():
                fut.set_result(None)
            for _ in range(5):
                await asyncio.sleep(0)
        self._t = target
        await asyncio.sleep(0)
