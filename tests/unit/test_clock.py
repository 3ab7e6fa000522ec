"""ManualClock (virtual time) and RealClock."""

from __future__ import annotations

import asyncio
import time

import pytest

from setpoint.clock import Clock, ManualClock, RealClock


async def _settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def test_manual_clock_starts_at_epoch() -> None:
    c = ManualClock()
    assert c.now() == 1_700_000_000.0
    assert c.monotonic() == 0.0
    c2 = ManualClock(start=5.0)
    assert c2.now() == 5.0 and c2.monotonic() == 0.0


async def test_advance_moves_now_and_monotonic_together() -> None:
    c = ManualClock(start=100.0)
    await c.advance(2.5)
    assert c.monotonic() == 2.5
    assert c.now() == 102.5
    await c.advance(0)
    assert c.monotonic() == 2.5
    await c.advance(1)
    assert c.now() - 100.0 == c.monotonic() == 3.5


async def test_sleepers_wake_in_deadline_order() -> None:
    c = ManualClock()
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, s: float) -> None:
        await c.sleep(s)
        woke.append((name, c.monotonic()))

    tasks = [asyncio.create_task(sleeper(n, s)) for n, s in [("c", 3.0), ("a", 1.0), ("b", 2.0), ("d", 10.0)]]
    await _settle()
    assert c.pending == 4
    await c.advance(5)
    # Each sleeper sees the time of its own deadline, not the advance target.
    assert woke == [("a", 1.0), ("b", 2.0), ("c", 3.0)]
    assert c.monotonic() == 5.0
    assert c.pending == 1
    await c.advance(5)
    assert woke[-1] == ("d", 10.0)
    await asyncio.gather(*tasks)


async def test_equal_deadlines_wake_in_sleep_order() -> None:
    c = ManualClock()
    woke: list[int] = []

    async def sleeper(i: int) -> None:
        await c.sleep(1.0)
        woke.append(i)

    tasks = [asyncio.create_task(sleeper(i)) for i in range(6)]
    await _settle()
    await c.advance(1.0)
    assert woke == list(range(6))
    await asyncio.gather(*tasks)


async def test_partial_advance_wakes_only_due_sleepers() -> None:
    c = ManualClock()
    t1 = asyncio.create_task(c.sleep(1.0))
    t2 = asyncio.create_task(c.sleep(2.0))
    await _settle()
    await c.advance(1.5)
    assert t1.done() and not t2.done()
    await c.advance(0.49)
    assert not t2.done()
    await c.advance(0.01)
    assert t2.done()


async def test_sleeper_scheduled_during_advance_is_woken_if_due() -> None:
    c = ManualClock()
    times: list[float] = []

    async def ticker() -> None:
        for _ in range(5):
            await c.sleep(1.0)
            times.append(c.monotonic())

    task = asyncio.create_task(ticker())
    await _settle()
    await c.advance(3.5)
    assert times == [1.0, 2.0, 3.0]
    await c.advance(10)
    assert times == [1.0, 2.0, 3.0, 4.0, 5.0]
    await task


async def test_nothing_wakes_without_advance() -> None:
    c = ManualClock()
    task = asyncio.create_task(c.sleep(0.001))
    await asyncio.sleep(0.05)  # real time passes, virtual time does not
    assert not task.done()
    await c.advance(0.001)
    await asyncio.wait_for(task, 1)


@pytest.mark.parametrize("s", [0, -1, -0.5])
async def test_non_positive_sleep_returns_immediately(s: float) -> None:
    c = ManualClock()
    await asyncio.wait_for(c.sleep(s), 1)
    assert c.pending == 0 and c.monotonic() == 0.0


async def test_cancelled_sleeper_is_not_pending_and_is_skipped() -> None:
    c = ManualClock()
    t1 = asyncio.create_task(c.sleep(1))
    t2 = asyncio.create_task(c.sleep(2))
    await _settle()
    t1.cancel()
    await _settle()
    assert c.pending == 1
    await c.advance(3)  # must not fail on the cancelled future
    assert t2.done() and t1.cancelled()


def test_clocks_satisfy_protocol() -> None:
    def use(clock: Clock) -> float:
        return clock.now() + clock.monotonic()

    assert use(ManualClock()) == 1_700_000_000.0
    assert use(RealClock()) > 0


def test_real_clock_now_and_monotonic() -> None:
    c = RealClock()
    assert abs(c.now() - time.time()) < 1.0
    readings = [c.monotonic() for _ in range(1000)]
    assert readings == sorted(readings)


async def test_real_clock_sleep_takes_real_time() -> None:
    c = RealClock()
    t0 = c.monotonic()
    await c.sleep(0.05)
    elapsed = c.monotonic() - t0
    assert 0.04 <= elapsed < 2.0
