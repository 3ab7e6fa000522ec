"""`MemoryVectorIndex`: exact search per partition, TTL on the injected clock, capacity, LRU partitions."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from setpoint.clock import ManualClock
from setpoint.semcache.index import Hit, MemoryVectorIndex, Rows


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(384).astype(np.float32)
    return v / np.linalg.norm(v)


def near(v: np.ndarray, cos: float, seed: int = 99) -> np.ndarray:
    """A unit vector with cosine `cos` to `v`."""
    r = np.random.default_rng(seed).standard_normal(384).astype(np.float32)
    r -= (r @ v) * v
    r /= np.linalg.norm(r)
    return (cos * v + np.sqrt(1 - cos**2) * r).astype(np.float32)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


async def test_finds_the_best_entry_above_the_threshold(clock: ManualClock) -> None:
    idx = MemoryVectorIndex(clock)
    q = unit(1)
    await idx.add("p", near(q, 0.97, seed=2), "k97", "t97", clock.now() + 60)
    await idx.add("p", near(q, 0.99, seed=3), "k99", "t99", clock.now() + 60)
    await idx.add("p", near(q, 0.90, seed=4), "k90", "t90", clock.now() + 60)
    hits = await idx.search("p", q, 0.95, limit=5)
    assert [h.entry_key for h in hits] == ["k99", "k97"]
    assert hits[0] == Hit("k99", pytest.approx(0.99, abs=1e-5), "t99")
    assert [h.entry_key for h in await idx.search("p", q, 0.95)] == ["k99"]
    assert await idx.search("p", q, 0.995) == []
    assert await idx.search("p", q[None, :], 0.95)  # a (1, 384) row works too


async def test_partitions_are_isolated(clock: ManualClock) -> None:
    idx = MemoryVectorIndex(clock)
    v = unit(7)
    await idx.add("tenant-a|model|sys", v, "a-key", "text", clock.now() + 60)
    assert await idx.search("tenant-b|model|sys", v, 0.0) == []  # identical vector, other partition
    assert await idx.search("tenant-a|model|sys2", v, -1.0) == []
    assert [h.entry_key for h in await idx.search("tenant-a|model|sys", v, 0.99)] == ["a-key"]


async def test_entries_expire_on_the_injected_clock(clock: ManualClock) -> None:
    idx = MemoryVectorIndex(clock)
    v = unit(3)
    await idx.add("p", v, "short", "t", clock.now() + 10)
    await idx.add("p", near(v, 0.98), "long", "t", clock.now() + 100)
    assert [h.entry_key for h in await idx.search("p", v, 0.9, limit=2)] == ["short", "long"]
    await clock.advance(10)  # expiry is exclusive: at expires_at the entry is gone
    assert [h.entry_key for h in await idx.search("p", v, 0.9, limit=2)] == ["long"]
    await clock.advance(90)
    assert await idx.search("p", v, 0.9) == []
    assert len(idx) == 0  # an all-expired partition is dropped on search
    await idx.add("p", v, "late", "t", clock.now() - 1)  # already expired: not stored
    assert len(idx) == 0


async def test_capacity_evicts_the_oldest(clock: ManualClock) -> None:
    idx = MemoryVectorIndex(clock, capacity=3)
    vs = [unit(i) for i in range(5)]
    for i, v in enumerate(vs):
        await idx.add("p", v, f"k{i}", f"t{i}", clock.now() + 60)
    assert len(idx) == 3
    for i, v in enumerate(vs):
        found = [h.entry_key for h in await idx.search("p", v, 0.99)]
        assert found == ([] if i < 2 else [f"k{i}"])


async def test_re_adding_a_key_replaces_it_in_place(clock: ManualClock) -> None:
    idx = MemoryVectorIndex(clock, capacity=2)
    a, b = unit(1), unit(2)
    await idx.add("p", a, "k", "old", clock.now() + 60)
    await idx.add("p", b, "k", "new", clock.now() + 60)
    assert len(idx) == 1
    assert await idx.search("p", a, 0.99) == []
    assert await idx.search("p", b, 0.99) == [Hit("k", pytest.approx(1.0, abs=1e-5), "new")]


async def test_least_recently_used_partitions_are_dropped(clock: ManualClock) -> None:
    idx = MemoryVectorIndex(clock, max_partitions=2)
    v = unit(5)
    await idx.add("p1", v, "k1", "t", clock.now() + 60)
    await idx.add("p2", v, "k2", "t", clock.now() + 60)
    assert await idx.search("p1", v, 0.9)  # p1 is now the most recently used
    await idx.add("p3", v, "k3", "t", clock.now() + 60)
    assert await idx.search("p2", v, 0.9) == []
    assert await idx.search("p1", v, 0.9) and await idx.search("p3", v, 0.9)


async def test_prune_drops_expired_partitions(clock: ManualClock) -> None:
    idx = MemoryVectorIndex(clock)
    await idx.add("old", unit(1), "k", "t", clock.now() + 5)
    await idx.add("new", unit(2), "k", "t", clock.now() + 50)
    await clock.advance(6)
    assert idx.prune() == 1 and len(idx) == 1


async def test_large_partitions_search_in_a_thread_and_recheck(clock: ManualClock) -> None:
    idx = MemoryVectorIndex(clock, capacity=64, offload_rows=0)  # always offload
    vs = [unit(i) for i in range(64)]
    for i, v in enumerate(vs):
        await idx.add("p", v, f"k{i}", f"t{i}", clock.now() + 60)
    assert [h.entry_key for h in await idx.search("p", vs[10], 0.99)] == ["k10"]

    # Overwrite entries while searches are in flight: a hit always matches the row's current vector.
    async def churn() -> None:
        for j in range(200):
            await idx.add("p", unit(1000 + j), f"n{j}", "t", clock.now() + 60)
            await asyncio.sleep(0)

    async def probe() -> list[list[Hit]]:
        return [await idx.search("p", vs[i % 64], 0.99) for i in range(100)]

    _, results = await asyncio.gather(churn(), probe())
    for i, hits in enumerate(results):
        for h in hits:
            assert h.entry_key == f"k{i % 64}"


async def test_rejects_wrong_dimensions(clock: ManualClock) -> None:
    idx = MemoryVectorIndex(clock)
    with pytest.raises(ValueError, match="384"):
        await idx.add("p", np.zeros(10, dtype=np.float32), "k", "t", clock.now() + 1)
    with pytest.raises(ValueError):
        MemoryVectorIndex(clock, capacity=0)


def test_rows_grow_then_ring() -> None:
    rows = Rows(capacity=100)
    for i in range(150):
        rows.put(unit(i), f"k{i}", "t", 1e12, seq=i)
    assert rows.size == 100 and set(rows.keys) == {f"k{i}" for i in range(50, 150)}
    rows.kill_below(120)
    live = [k for k, e in zip(rows.keys, rows.expires, strict=True) if e > 0]
    assert sorted(live) == sorted(f"k{i}" for i in range(120, 150))
