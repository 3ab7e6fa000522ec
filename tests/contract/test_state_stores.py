"""The state-store contract (`setpoint.state.base`): one suite, every backend (memory, SQLite, Redis).

Time is virtual: every operation gets an explicit `now`, so refills, hold expiry and line expiry
are tested without sleeping. Concurrency is tested with many coroutines on one store and, for the
shared backends (SQLite, Redis), with several OS processes on the same file / database.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from setpoint.errors import StateBackendError
from setpoint.state.base import BucketCharge, LedgerLine, StateStore
from setpoint.state.factory import state_from_url
from setpoint.state.memory import MemoryStateStore
from setpoint.state.redis import RedisStateStore
from setpoint.state.sqlite import SqliteStateStore

T0 = 1_700_000_000.0  # virtual epoch seconds
DAY = 86_400.0
HOLD_TTL = 900.0
BACKENDS = ["memory", "sqlite", "redis"]


def make_store(kind: str, target: str) -> StateStore:
    """A store of `kind`; `target` is the SQLite file or the Redis URL (ignored for memory).

    Redis gets a generous per-operation timeout here: these tests check semantics and atomicity,
    not latency on a loaded test machine (the failure tests below use the real 0.5 s default)."""
    if kind == "memory":
        return MemoryStateStore()
    if kind == "sqlite":
        return SqliteStateStore(Path(target))
    if kind == "redis":
        return RedisStateStore(target, timeout_s=10.0)
    raise ValueError(kind)





@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(kind, target) of one backend; the Redis database is fresh (flushed) for every test."""
    kind = request.param
    if kind == "redis":
        return kind, request.getfixturevalue("redis_url")
    if kind == "sqlite":
        return kind, str(tmp_path / "state.db")
    return kind, ""


@pytest.fixture
async def store(backend: tuple[str, str]) -> AsyncIterator[StateStore]:
    s = make_store(*backend)
    await s.start()
    try:
        yield s
    finally:
        await s.aclose()


def bucket(key: str, capacity: float, rate: float, amount: float) -> BucketCharge:
    return BucketCharge(key=key, capacity=capacity, rate_per_s=rate, amount=amount)


async def levels(store: StateStore, charges: list[BucketCharge], now: float) -> list[float]:
    """Current levels, read with a take of 0 (changes nothing; refused only for a bucket in debt)."""
    probe = [bucket(c.key, c.capacity, c.rate_per_s, 0.0) for c in charges]
    res = await store.take(probe, now)
    assert res.ok == all(lv >= 0 for lv in res.levels)
    return res.levels


def line(key: str, limit: int | None, ttl_s: float = 2 * DAY) -> LedgerLine:
    return LedgerLine(key=key, limit=limit, ttl_s=ttl_s)


# -- factory --------------------------------------------------------------------------------------


def test_factory_builds_each_backend(tmp_path: Path) -> None:
    assert isinstance(state_from_url("memory://", tmp_path, 0.5), MemoryStateStore)
    s = state_from_url("sqlite:///state/limits.db", tmp_path, 0.5)
    assert isinstance(s, SqliteStateStore)
    assert (tmp_path / "state" / "limits.db").exists()  # relative to data_dir
    asyncio.run(s.aclose())


# -- token buckets --------------------------------------------------------------------------------


async def test_bucket_starts_full_at_capacity(store: StateStore) -> None:
    b = bucket("b:full", 10, 1.0, 10)
    res = await store.take([b], T0)
    assert res.ok and res.retry_after_s == 0
    assert res.levels == [pytest.approx(0.0)]
    res = await store.take([bucket("b:full", 10, 1.0, 1)], T0)
    assert not res.ok  # it was exactly full, not more
    assert res.retry_after_s == pytest.approx(1.0)


async def test_bucket_take_reports_levels_after_the_operation(store: StateStore) -> None:
    a, b = bucket("b:lv:a", 10, 1.0, 3), bucket("b:lv:b", 100, 1.0, 30)
    res = await store.take([a, b], T0)
    assert res.ok
    assert res.levels == [pytest.approx(7.0), pytest.approx(70.0)]
    assert await levels(store, [a, b], T0) == [pytest.approx(7.0), pytest.approx(70.0)]


async def test_bucket_take_is_all_or_nothing(store: StateStore) -> None:
    a = bucket("b:aon:a", 10, 2.0, 4)
    short = bucket("b:aon:short", 5, 0.5, 4)
    c = bucket("b:aon:c", 100, 1.0, 4)
    assert (await store.take([bucket(short.key, 5, 0.5, 3)], T0)).ok  # short: 5 -> 2

    res = await store.take([a, short, c], T0)
    assert not res.ok
    assert res.retry_after_s == pytest.approx((4 - 2) / 0.5)  # shortfall / rate
    # Nothing was taken from the buckets that could have served the amount.
    assert await levels(store, [a, short, c], T0) == [pytest.approx(10.0), pytest.approx(2.0), pytest.approx(100.0)]

    # Once the short bucket has refilled, the same take succeeds everywhere.
    res = await store.take([a, short, c], T0 + 4.0)
    assert res.ok
    assert res.levels == [pytest.approx(6.0), pytest.approx(0.0), pytest.approx(96.0)]


async def test_bucket_retry_after_is_the_longest_wait_of_the_refused_buckets(store: StateStore) -> None:
    a = bucket("b:ra:a", 10, 2.0, 4)  # level 1 after the first take: short 3 at 2/s -> 1.5 s
    b = bucket("b:ra:b", 5, 0.5, 4)  # level 2: short 2 at 0.5/s -> 4 s
    assert (await store.take([bucket(a.key, 10, 2.0, 9), bucket(b.key, 5, 0.5, 3)], T0)).ok
    res = await store.take([a, b], T0)
    assert not res.ok
    assert res.retry_after_s == pytest.approx(4.0)
    res = await store.take([a], T0)
    assert not res.ok and res.retry_after_s == pytest.approx(1.5)


async def test_bucket_refills_over_time_capped_at_capacity(store: StateStore) -> None:
    b = bucket("b:refill", 10, 2.0, 10)
    assert (await store.take([b], T0)).ok
    assert await levels(store, [b], T0) == [pytest.approx(0.0)]
    assert await levels(store, [b], T0 + 1.5) == [pytest.approx(3.0)]
    assert await levels(store, [b], T0 + 3.0) == [pytest.approx(6.0)]
    assert await levels(store, [b], T0 + 1000.0) == [pytest.approx(10.0)]  # never above capacity
    res = await store.take([bucket(b.key, 10, 2.0, 11)], T0 + 2000.0)
    assert not res.ok  # a long idle time does not bank more than capacity


async def test_bucket_adjust_gives_back_capped_at_capacity(store: StateStore) -> None:
    b = bucket("b:give", 10, 1.0, 8)
    assert (await store.take([b], T0)).ok
    await store.adjust([bucket(b.key, 10, 1.0, 5)], T0)
    assert await levels(store, [b], T0) == [pytest.approx(7.0)]
    await store.adjust([bucket(b.key, 10, 1.0, 50)], T0)
    assert await levels(store, [b], T0) == [pytest.approx(10.0)]
    # adjust on a bucket never seen: it starts full, so a give-back cannot exceed capacity.
    await store.adjust([bucket("b:give:new", 4, 1.0, 3)], T0)
    assert await levels(store, [bucket("b:give:new", 4, 1.0, 0)], T0) == [pytest.approx(4.0)]


async def test_bucket_adjust_can_leave_debt_and_take_then_waits(store: StateStore) -> None:
    b = bucket("b:debt", 10, 1.0, 10)
    assert (await store.take([b], T0)).ok
    await store.adjust([bucket(b.key, 10, 1.0, -5)], T0)  # used 5 more than estimated
    assert await levels(store, [b], T0) == [pytest.approx(-5.0)]
    one = bucket(b.key, 10, 1.0, 1)
    res = await store.take([one], T0)
    assert not res.ok
    assert res.retry_after_s == pytest.approx(6.0)  # pay off 5, then 1
    assert not (await store.take([one], T0 + 5.9)).ok
    res = await store.take([one], T0 + 6.0)
    assert res.ok and res.levels == [pytest.approx(0.0)]


async def test_bucket_adjust_refills_before_adding(store: StateStore) -> None:
    b = bucket("b:adj-refill", 10, 1.0, 10)
    assert (await store.take([b], T0)).ok
    await store.adjust([bucket(b.key, 10, 1.0, 2)], T0 + 3.0)  # 3 refilled + 2 given back
    assert await levels(store, [b], T0 + 3.0) == [pytest.approx(5.0)]
    assert await levels(store, [b], T0 + 4.0) == [pytest.approx(6.0)]  # refill not counted twice


async def test_buckets_are_independent_by_key(store: StateStore) -> None:
    assert (await store.take([bucket("b:ind:1", 3, 0.0, 3)], T0)).ok
    assert not (await store.take([bucket("b:ind:1", 3, 0.0, 1)], T0)).ok
    assert (await store.take([bucket("b:ind:2", 3, 0.0, 3)], T0)).ok


# -- ledger ---------------------------------------------------------------------------------------


async def test_ledger_new_line_has_its_whole_limit(store: StateStore) -> None:
    lines = [line("l:new", 1000), line("l:new:soft", None)]
    assert await store.remaining(lines, T0) == [1000, None]
    assert await store.spent(lines, T0) == [0, 0]


async def test_ledger_reserve_holds_on_every_line(store: StateStore) -> None:
    lines = [line("l:h:a", 1000), line("l:h:b", 500), line("l:h:soft", None)]
    res = await store.reserve(lines, "h1", 200, T0, HOLD_TTL)
    assert res.ok and res.refused_key is None
    assert res.remaining == [800, 300, None]
    assert await store.remaining(lines, T0) == [800, 300, None]
    assert await store.spent(lines, T0) == [0, 0, 0]  # held, not spent


async def test_ledger_reserve_is_all_or_nothing(store: StateStore) -> None:
    a, tight, c = line("l:aon:a", 1000), line("l:aon:tight", 300), line("l:aon:c", 1000)
    assert (await store.reserve([tight], "h0", 250, T0, HOLD_TTL)).ok  # tight: 50 left
    res = await store.reserve([a, tight, c], "h1", 100, T0, HOLD_TTL)
    assert not res.ok
    assert res.refused_key == "l:aon:tight"
    assert res.remaining[1] == 50
    # No hold anywhere: the other lines are untouched.
    assert await store.remaining([a, tight, c], T0) == [1000, 50, 1000]
    # A settle of the refused hold id must not find anything to release either.
    await store.settle([a, c], "h1", 0, T0)
    assert await store.remaining([a, tight, c], T0) == [1000, 50, 1000]


async def test_ledger_reserve_exactly_the_remaining_amount_fits(store: StateStore) -> None:
    ln = line("l:exact", 300)
    assert (await store.reserve([ln], "h1", 300, T0, HOLD_TTL)).ok
    assert await store.remaining([ln], T0) == [0]
    res = await store.reserve([ln], "h2", 1, T0, HOLD_TTL)
    assert not res.ok and res.refused_key == "l:exact"


async def test_ledger_soft_line_never_refuses(store: StateStore) -> None:
    soft = line("l:soft", None)
    for i in range(3):
        res = await store.reserve([soft], f"h{i}", 10**12, T0, HOLD_TTL)
        assert res.ok and res.remaining == [None]
        await store.settle([soft], f"h{i}", 10**12, T0)
    assert await store.spent([soft], T0) == [3 * 10**12]
    res = await store.extend([soft], "h9", 10**15, T0, HOLD_TTL)
    assert res.ok


async def test_ledger_extend_grows_the_hold_under_the_same_check(store: StateStore) -> None:
    a, b = line("l:ext:a", 1000), line("l:ext:b", 600)
    assert (await store.reserve([a, b], "h1", 200, T0, HOLD_TTL)).ok
    res = await store.extend([a, b], "h1", 300, T0, HOLD_TTL)
    assert res.ok and res.remaining == [500, 100]
    assert await store.remaining([a, b], T0) == [500, 100]
    # b has 100 left: extending by 101 is refused on every line, and the hold stays at 500.
    res = await store.extend([a, b], "h1", 101, T0, HOLD_TTL)
    assert not res.ok and res.refused_key == "l:ext:b"
    assert await store.remaining([a, b], T0) == [500, 100]
    assert (await store.extend([a, b], "h1", 100, T0, HOLD_TTL)).ok
    assert await store.remaining([a, b], T0) == [400, 0]
    # settle releases the whole grown hold (600), not just the first reservation.
    await store.settle([a, b], "h1", 550, T0)
    assert await store.remaining([a, b], T0) == [450, 50]
    assert await store.spent([a, b], T0) == [550, 550]


async def test_ledger_settle_releases_hold_and_adds_actual(store: StateStore) -> None:
    ln = line("l:settle", 1000)
    assert (await store.reserve([ln], "h1", 400, T0, HOLD_TTL)).ok
    assert (await store.reserve([ln], "h2", 300, T0, HOLD_TTL)).ok
    assert await store.remaining([ln], T0) == [300]
    await store.settle([ln], "h1", 150, T0 + 1)
    assert await store.spent([ln], T0 + 1) == [150]
    assert await store.remaining([ln], T0 + 1) == [1000 - 150 - 300]  # limit - spent - held
    await store.settle([ln], "h2", 0, T0 + 2)
    assert await store.remaining([ln], T0 + 2) == [850]


async def test_ledger_settle_adds_actual_even_past_the_limit(store: StateStore) -> None:
    ln = line("l:over", 1000)
    assert (await store.reserve([ln], "h1", 900, T0, HOLD_TTL)).ok
    await store.settle([ln], "h1", 1300, T0)  # already generated: billed
    assert await store.spent([ln], T0) == [1300]
    assert await store.remaining([ln], T0) == [-300]
    res = await store.reserve([ln], "h2", 1, T0, HOLD_TTL)
    assert not res.ok and res.refused_key == "l:over"


async def test_ledger_settle_without_hold_still_charges(store: StateStore) -> None:
    ln = line("l:nohold", 1000)
    await store.settle([ln], "never-reserved", 70, T0)
    assert await store.spent([ln], T0) == [70]
    assert await store.remaining([ln], T0) == [930]


async def test_ledger_lines_are_independent_by_key(store: StateStore) -> None:
    a, b = line("l:key:a", 100), line("l:key:b", 100)
    assert (await store.reserve([a], "h1", 100, T0, HOLD_TTL)).ok
    assert await store.remaining([a, b], T0) == [0, 100]
    assert (await store.reserve([b], "h2", 100, T0, HOLD_TTL)).ok


async def test_ledger_hold_expires_after_hold_ttl(store: StateStore) -> None:
    """A holder that crashed (never settles) does not leak budget forever."""
    ln = line("l:crash", 1000)
    assert (await store.reserve([ln], "dead", 800, T0, 60.0)).ok
    assert not (await store.reserve([ln], "h2", 300, T0 + 59.0, 60.0)).ok
    assert await store.remaining([ln], T0 + 59.0) == [200]
    assert await store.remaining([ln], T0 + 60.5) == [1000]
    assert (await store.reserve([ln], "h2", 300, T0 + 61.0, 60.0)).ok
    assert await store.spent([ln], T0 + 61.0) == [0]


async def test_ledger_extend_renews_the_hold_expiry(store: StateStore) -> None:
    ln = line("l:renew", 1000)
    assert (await store.reserve([ln], "h1", 100, T0, 60.0)).ok
    assert (await store.extend([ln], "h1", 100, T0 + 50.0, 60.0)).ok  # now expires at T0 + 110
    assert await store.remaining([ln], T0 + 100.0) == [800]
    assert await store.remaining([ln], T0 + 111.0) == [1000]


async def test_ledger_line_expires_after_ttl(
    store: StateStore, backend: tuple[str, str], request: pytest.FixtureRequest
) -> None:
    """A line is kept `ttl_s` after its last change; after that a new period starts at 0."""
    before, after = line("l:ttl:before", 1000, ttl_s=100.0), line("l:ttl:after", 1000, ttl_s=100.0)
    for ln in (before, after):  # the same history; last change at T0 + 10, kept until T0 + 110
        assert (await store.reserve([ln], "h1", 600, T0, HOLD_TTL)).ok
        await store.settle([ln], "h1", 600, T0 + 10.0)
    assert await store.spent([before], T0 + 109.0) == [600]
    assert await store.remaining([before], T0 + 109.0) == [400]
    assert await store.spent([after], T0 + 111.0) == [0]
    assert await store.remaining([after], T0 + 111.0) == [1000]
    res = await store.reserve([after], "h2", 1000, T0 + 111.0, HOLD_TTL)
    assert res.ok and res.remaining == [0]


async def test_ledger_reads_do_not_extend_a_line(
    store: StateStore, backend: tuple[str, str], request: pytest.FixtureRequest
) -> None:
    """Reading remaining/spent is not a change: the line still ends ttl_s after the last write."""
    ln = line("l:ttl:read", 1000, ttl_s=100.0)
    await store.settle([ln], "h1", 600, T0)
    for t in (50.0, 90.0):
        assert await store.remaining([ln], T0 + t) == [400]
        assert await store.spent([ln], T0 + t) == [600]
    assert await store.spent([ln], T0 + 101.0) == [0]


async def test_ledger_writes_extend_a_line(store: StateStore) -> None:
    ln = line("l:ttl:write", 1000, ttl_s=100.0)
    await store.settle([ln], "h1", 100, T0)
    await store.settle([ln], "h2", 100, T0 + 80.0)  # a change: kept until T0 + 180
    assert await store.spent([ln], T0 + 150.0) == [200]


# -- concurrency ----------------------------------------------------------------------------------

LIMIT, AMOUNT = 1000, 7  # floor(1000 / 7) = 142 of 200 attempts fit
CAPACITY, TAKE = 90, 3  # 30 of 200 takes fit


@pytest.mark.parametrize("n", [90, 200])
async def test_concurrent_reserves_admit_exactly_what_fits(
    store: StateStore, backend: tuple[str, str], request: pytest.FixtureRequest, n: int
) -> None:
    amount = AMOUNT if n > LIMIT // AMOUNT else 13  # always more attempts than fit
    ln = line("l:race", LIMIT)
    results = await asyncio.gather(*(store.reserve([ln], f"h{i}", amount, T0, HOLD_TTL) for i in range(n)))
    ok = sum(r.ok for r in results)
    assert ok == LIMIT // amount < n
    assert all(r.refused_key == "l:race" for r in results if not r.ok)
    assert await store.remaining([ln], T0) == [LIMIT - ok * amount]


@pytest.mark.parametrize("n", [90, 200])
async def test_concurrent_takes_admit_exactly_capacity(
    store: StateStore, backend: tuple[str, str], request: pytest.FixtureRequest, n: int
) -> None:
    b = bucket("b:race", CAPACITY, 0.0, TAKE)
    results = await asyncio.gather(*(store.take([b], T0) for _ in range(n)))
    assert sum(r.ok for r in results) == CAPACITY // TAKE
    assert await levels(store, [b], T0 + 100.0) == [pytest.approx(CAPACITY % TAKE)]  # rate 0: no refill


async def test_concurrent_extends_never_overcommit(store: StateStore) -> None:
    """Many streams growing their holds at once: the sum of holds never passes the limit."""
    ln = line("l:ext-race", LIMIT)
    assert all([(await store.reserve([ln], f"s{i}", 10, T0, HOLD_TTL)).ok for i in range(10)])
    results = await asyncio.gather(
        *(store.extend([ln], f"s{i % 10}", 13, T0, HOLD_TTL) for i in range(100))
    )
    ok = sum(r.ok for r in results)
    assert ok == (LIMIT - 100) // 13 < 100
    assert await store.remaining([ln], T0) == [LIMIT - 100 - ok * 13]


def _mp_worker(kind: str, target: str, op: str, n: int, proc_idx: int, barrier: Any, out: Any) -> None:
    """In a child process: `n` concurrent reserves (or takes) against the shared store."""

    async def main() -> int:
        s = make_store(kind, target)
        try:
            if kind == "redis":
                await s.remaining([line("l:warmup", None)], T0)  # connect before the race starts
            barrier.wait(timeout=60)
            if op == "reserve":
                ln = line("l:mp", LIMIT)
                coros = [s.reserve([ln], f"p{proc_idx}-{i}", AMOUNT, T0, HOLD_TTL) for i in range(n)]
            else:
                b = bucket("b:mp", CAPACITY, 0.0, TAKE)
                coros = [s.take([b], T0) for _ in range(n)]
            return sum(r.ok for r in await asyncio.gather(*coros))
        finally:
            await s.aclose()

    try:
        out.put((proc_idx, asyncio.run(main())))
    except BaseException as exc:
        out.put((proc_idx, f"error: {exc!r}"))


def run_in_processes(kind: str, target: str, op: str, procs: int = 4, per_proc: int = 50) -> list[int]:
    # fork: the children start in milliseconds with everything imported (spawn would re-import
    # setpoint in each, seconds on a busy machine). Called from a plain (non-async) test, so no
    # event loop is running in the forking thread; the children only build fresh stores.
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(procs)
    out = ctx.Queue()
    workers = [ctx.Process(target=_mp_worker, args=(kind, target, op, per_proc, i, barrier, out)) for i in range(procs)]
    for w in workers:
        w.start()
    results: dict[int, int | str] = {}
    try:
        deadline = time.monotonic() + 60
        while len(results) < procs:
            try:
                idx, value = out.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"only {len(results)} of {procs} processes reported within 60 s") from None
            results[idx] = value
        for w in workers:
            w.join(timeout=10)
    finally:
        for w in workers:
            if w.is_alive():
                w.kill()
                w.join(timeout=5)
        out.close()
        out.join_thread()
    errors = [v for v in results.values() if isinstance(v, str)]
    assert not errors, errors
    return [int(results[i]) for i in range(procs)]


@pytest.fixture(params=["sqlite", "redis"])
def shared_backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    if request.param == "redis":
        return "redis", request.getfixturevalue("redis_url")
    target = str(tmp_path / "shared.db")
    asyncio.run(SqliteStateStore(Path(target)).aclose())  # schema in place before the race
    return "sqlite", target


def test_reserves_from_several_processes_admit_exactly_what_fits(shared_backend: tuple[str, str]) -> None:
    kind, target = shared_backend
    counts = run_in_processes(kind, target, "reserve")
    total = sum(counts)
    assert total * AMOUNT <= LIMIT
    assert total == LIMIT // AMOUNT, counts

    async def check() -> None:
        s = make_store(kind, target)
        try:
            assert await s.remaining([line("l:mp", LIMIT)], T0) == [LIMIT - total * AMOUNT]
        finally:
            await s.aclose()

    asyncio.run(check())


def test_takes_from_several_processes_admit_exactly_capacity(shared_backend: tuple[str, str]) -> None:
    kind, target = shared_backend
    counts = run_in_processes(kind, target, "take")
    assert sum(counts) == CAPACITY // TAKE, counts


# -- failure and recovery (Redis) -----------------------------------------------------------------

Op = Callable[[StateStore], Awaitable[object]]

OPERATIONS: dict[str, Op] = {
    "take": lambda s: s.take([bucket("b:out", 10, 1.0, 1)], T0),
    "adjust": lambda s: s.adjust([bucket("b:out", 10, 1.0, 1)], T0),
    "reserve": lambda s: s.reserve([line("l:out", 1000)], "h1", 10, T0, HOLD_TTL),
    "extend": lambda s: s.extend([line("l:out", 1000)], "h1", 10, T0, HOLD_TTL),
    "settle": lambda s: s.settle([line("l:out", 1000)], "h1", 10, T0),
    "remaining": lambda s: s.remaining([line("l:out", 1000)], T0),
    "spent": lambda s: s.spent([line("l:out", 1000)], T0),
}


async def _assert_all_fail_fast(s: StateStore) -> None:
    for name, op in OPERATIONS.items():
        t = time.monotonic()
        with pytest.raises(StateBackendError) as info:
            await asyncio.wait_for(op(s), timeout=10)
        took = time.monotonic() - t
        assert took < 1.5, f"{name} took {took:.2f}s to fail"
        assert info.value.status_code == 503 and info.value.code == "state_backend_unavailable"


async def _wait_recovered(s: StateStore) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            await s.remaining([line("l:probe", 1)], T0)
            return
        except StateBackendError:
            assert time.monotonic() < deadline, "the store did not recover within 10 s of the restart"
            await asyncio.sleep(0.05)


async def test_redis_down_raises_state_backend_error_fast_and_recovers(redis_control: Any, redis_url: str) -> None:
    s = RedisStateStore(redis_url, timeout_s=0.5)
    try:
        assert (await s.reserve([line("l:out", 1000)], "h0", 1, T0, HOLD_TTL)).ok  # connected, scripts loaded
        redis_control.stop()
        await _assert_all_fail_fast(s)
        redis_control.start()
        await _wait_recovered(s)  # same store object: it reconnects (and reloads its scripts) by itself
        for name, op in OPERATIONS.items():
            await op(s)  # every operation works again
        res = await s.reserve([line("l:after", 100)], "h2", 100, T0, HOLD_TTL)
        assert res.ok and res.remaining == [0]
        assert not (await s.reserve([line("l:after", 100)], "h3", 1, T0, HOLD_TTL)).ok
    finally:
        await s.aclose()


async def test_redis_line_expires_after_ttl_in_wall_clock_time(redis_url: str) -> None:
    """What Redis implements today: a line disappears ttl_s of real time after its last write."""
    s = RedisStateStore(redis_url, timeout_s=10.0)
    try:
        ln = line("l:ttl-real", 1000, ttl_s=1.0)
        await s.settle([ln], "h1", 600, T0)
        assert await s.spent([ln], T0) == [600]
        await asyncio.sleep(1.3)  # the ttl itself is what is being tested
        assert await s.spent([ln], T0) == [0]
        assert await s.remaining([ln], T0) == [1000]
    finally:
        await s.aclose()


async def test_redis_unreachable_from_the_start_fails_fast(free_port: Callable[[], int]) -> None:
    s = RedisStateStore(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)
    try:
        await _assert_all_fail_fast(s)
    finally:
        await s.aclose()


async def test_redis_hung_server_times_out_and_recovers(redis_control: Any, redis_url: str) -> None:
    """A server that accepts but never answers (SIGSTOP): each call fails after about timeout_s."""
    s = RedisStateStore(redis_url, timeout_s=0.3)
    proc = redis_control.proc
    try:
        assert (await s.take([bucket("b:hung", 10, 0.0, 3)], T0)).ok
        proc.send_signal(signal.SIGSTOP)
        try:
            await _assert_all_fail_fast(s)
        finally:
            proc.send_signal(signal.SIGCONT)
        await _wait_recovered(s)
        res = await s.take([bucket("b:hung", 10, 0.0, 1)], T0)
        assert res.ok and res.levels == [pytest.approx(6.0)]  # state survived the pause
    finally:
        await s.aclose()
