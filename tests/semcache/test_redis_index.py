"""`RedisVectorIndex`: entries shared through Redis, searched in an incrementally synced local mirror."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from setpoint.clock import ManualClock
from setpoint.errors import StateBackendError
from setpoint.semcache.index import MODEL_ID
from setpoint.semcache.redis_index import _SYNC, RedisVectorIndex, _keys
from setpoint.state.resp import RespClient

from .redis_peer import T0, unit

PEER = Path(__file__).with_name("redis_peer.py")


def peer(url: str, action: str, partition: str, *seeds: int) -> list[str]:
    """Run the other process; returns its output lines."""
    out = subprocess.run([sys.executable, str(PEER), url, action, partition, *map(str, seeds)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
async def make_index(redis_url: str, clock: ManualClock) -> AsyncIterator[Callable[..., RedisVectorIndex]]:
    made: list[RedisVectorIndex] = []

    def make(**options: Any) -> RedisVectorIndex:
        idx = RedisVectorIndex(RespClient(redis_url, timeout_s=10.0), clock, **options)
        made.append(idx)
        return idx

    yield make
    for idx in made:
        await idx.aclose()
        await idx._client.aclose()  # built on its own client here (aclose() leaves a passed-in client open)


def count_syncs(idx: RedisVectorIndex, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record, per sync round trip, how many entries Redis sent."""
    sent: list[int] = []
    original = idx._call

    async def spy(script: str, keys: list[str], args: list[Any]) -> Any:
        reply = await original(script, keys, args)
        if script is _SYNC:
            sent.append(len(reply[4]))
        return reply

    monkeypatch.setattr(idx, "_call", spy)
    return sent


async def test_entries_are_shared_between_processes(redis_url: str, make_index: Callable[..., RedisVectorIndex],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    peer(redis_url, "add", "tenant-a", 1, 2, 3)
    idx = make_index()
    sent = count_syncs(idx, monkeypatch)
    for seed in (1, 2, 3):
        assert [h.entry_key for h in await idx.search("tenant-a", unit(seed), 0.99)] == [f"k{seed}"]
    assert sent == [3, 0, 0]  # the first search fetched everything, the next ones nothing

    peer(redis_url, "add", "tenant-a", 4, 5)
    assert [h.entry_key for h in await idx.search("tenant-a", unit(5), 0.99)] == ["k5"]
    assert sent[-1] == 2  # only the two new entries crossed the wire

    await idx.add("tenant-a", unit(6), "k6", "text 6", T0 + 3600)
    assert peer(redis_url, "search", "tenant-a", 6, 1, 99) == ["k6", "k1", ""]


async def test_partitions_are_isolated_across_processes(redis_url: str,
                                                        make_index: Callable[..., RedisVectorIndex]) -> None:
    peer(redis_url, "add", "tenant-a|gpt|sys1", 7)
    idx = make_index()
    for other in ("tenant-b|gpt|sys1", "tenant-a|gpt|sys2", "tenant-a|gpt|sys1 "):
        assert await idx.search(other, unit(7), -1.0, limit=10) == []  # identical vector, other partition
    assert peer(redis_url, "search", "tenant-b|gpt|sys1", 7) == [""]
    assert [h.entry_key for h in await idx.search("tenant-a|gpt|sys1", unit(7), 0.99)] == ["k7"]


async def test_expiry_follows_the_injected_clock(make_index: Callable[..., RedisVectorIndex],
                                                 clock: ManualClock) -> None:
    writer, reader = make_index(), make_index()
    await writer.add("p", unit(1), "short", "t", clock.now() + 10)
    await writer.add("p", unit(2), "long", "t", clock.now() + 100)
    await writer.add("p", unit(3), "dead", "t", clock.now() - 1)  # already expired: not stored
    assert [h.entry_key for h in await reader.search("p", unit(1), 0.99)] == ["short"]
    await clock.advance(10)
    assert await reader.search("p", unit(1), 0.99) == []
    assert [h.entry_key for h in await reader.search("p", unit(2), 0.99)] == ["long"]
    assert await reader.search("p", unit(3), 0.99) == []


async def test_capacity_trims_redis_and_every_mirror(redis_url: str,
                                                     make_index: Callable[..., RedisVectorIndex],
                                                     clock: ManualClock) -> None:
    writer, reader = make_index(capacity=3), make_index(capacity=3)
    for seed in (0, 1, 2):
        await writer.add("p", unit(seed), f"k{seed}", "t", clock.now() + 60)
    assert await reader.sync("p") == 3
    for seed in (3, 4):
        await writer.add("p", unit(seed), f"k{seed}", "t", clock.now() + 60)
    r = redis.Redis.from_url(redis_url)
    try:
        assert r.llen(_keys("p", MODEL_ID)[0]) == 3
        ttl_ms = r.pttl(_keys("p", MODEL_ID)[0])
        assert 0 < ttl_ms <= 61_000  # Redis only collects the garbage, after the last entry expires
    finally:
        r.close()
    for seed in range(5):
        found = [h.entry_key for h in await reader.search("p", unit(seed), 0.99)]
        assert found == ([] if seed < 2 else [f"k{seed}"])


async def test_a_cold_mirror_catches_up_in_batches(make_index: Callable[..., RedisVectorIndex],
                                                   clock: ManualClock, monkeypatch: pytest.MonkeyPatch) -> None:
    writer, reader = make_index(), make_index(fetch_batch=2, search_round_trips=2)
    sent = count_syncs(reader, monkeypatch)
    for seed in range(5):
        await writer.add("p", unit(seed), f"k{seed}", "t", clock.now() + 60)
    # A search never waits for more than `search_round_trips` fetches: the mirror fills over searches.
    assert await reader.search("p", unit(4), 0.99) == []
    assert sent == [2, 2]
    assert [h.entry_key for h in await reader.search("p", unit(4), 0.99)] == ["k4"]
    assert sent == [2, 2, 1]
    other = make_index(fetch_batch=2)
    assert await other.sync("p") == 5  # sync() catches up at once


async def test_concurrent_searches_share_one_sync(make_index: Callable[..., RedisVectorIndex],
                                                  clock: ManualClock, monkeypatch: pytest.MonkeyPatch) -> None:
    writer, reader = make_index(), make_index()
    await writer.add("p", unit(1), "k1", "t", clock.now() + 60)
    sent = count_syncs(reader, monkeypatch)
    results = await asyncio.gather(*(reader.search("p", unit(1), 0.99) for _ in range(10)))
    assert all([h.entry_key for h in r] == ["k1"] for r in results)
    assert sent == [1]


async def test_a_flushed_or_expired_partition_resets_the_mirror(redis_url: str,
                                                                make_index: Callable[..., RedisVectorIndex],
                                                                clock: ManualClock) -> None:
    writer, reader = make_index(), make_index()
    for seed in (1, 2, 3):
        await writer.add("p", unit(seed), f"k{seed}", "t", clock.now() + 60)
    assert await reader.sync("p") == 3
    r = redis.Redis.from_url(redis_url)
    try:
        r.flushdb()
    finally:
        r.close()
    assert await reader.search("p", unit(1), 0.99) == []  # gone from Redis: gone from the mirror
    await writer.add("p", unit(4), "k4", "t", clock.now() + 60)
    assert await reader.sync("p") == 1
    assert [h.entry_key for h in await reader.search("p", unit(4), 0.99)] == ["k4"]


async def test_redis_unreachable_raises_state_backend_error(free_port: Callable[[], int],
                                                            clock: ManualClock) -> None:
    idx = RedisVectorIndex.from_url(f"redis://127.0.0.1:{free_port()}/0", clock, timeout_s=1.0)
    try:
        with pytest.raises(StateBackendError):
            await idx.search("p", unit(1), 0.9)
        with pytest.raises(StateBackendError):
            await idx.add("p", unit(1), "k", "t", clock.now() + 60)
    finally:
        await idx.aclose()


async def test_aclose_leaves_a_shared_client_open(redis_url: str, clock: ManualClock) -> None:
    client = RespClient(redis_url, timeout_s=10.0)
    try:
        idx = RedisVectorIndex(client, clock)  # e.g. the state store's client
        await idx.add("p", unit(1), "k", "t", clock.now() + 60)
        await idx.aclose()
        assert await client.execute("PING") == b"PONG"
    finally:
        await client.aclose()
