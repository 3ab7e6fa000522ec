"""Entries expire after their time to live, measured on the gateway's injected clock (a
ManualClock here, so no test waits): `cache.ttl_s` by default, `x-setpoint-cache-ttl` per request.
The same behaviour on the memory, SQLite and Redis stores."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import redis

from setpoint.clock import ManualClock

from .helpers import CacheGateway, cache_config

STORES = ["memory", "sqlite", "redis"]


@pytest.fixture(params=STORES)
def store_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return "sqlite:///state.db"  # under the gateway's data_dir
    return str(request.getfixturevalue("redis_url"))


@pytest.fixture
def on_clock(cache_gateway: Callable[..., CacheGateway], store_url: str) -> Callable[..., CacheGateway]:
    """`on_clock(ttl_s)` -> a gateway on a ManualClock whose cache (chat-a) keeps entries ttl_s."""

    def start(ttl_s: float, **cache: Any) -> CacheGateway:
        return cache_gateway(cache_config({"ttl_s": ttl_s, **cache}, state_url=store_url), clock=ManualClock())

    return start


def ask(cg: CacheGateway, headers: dict[str, str] | None = None, **body: Any) -> tuple[str, str]:
    """(x-setpoint-cache, answer id); a miss is waited for until written."""
    r = cg.chat(headers=headers, **body)
    assert r.status_code == 200, r.text
    status, rid = r.headers["x-setpoint-cache"], r.json()["id"]
    if status == "miss":
        cg.wait_written(rid)
    return status, rid


def test_entry_expires_after_the_configured_ttl(on_clock: Callable[..., CacheGateway]) -> None:
    cg = on_clock(60)
    status, first = ask(cg)
    assert status == "miss"
    cg.advance(59.5)
    assert ask(cg) == ("hit", first)
    cg.advance(1.0)  # 60.5 s after the write
    status, second = ask(cg)
    assert status == "miss" and second != first
    assert cg.upstream_count == 2
    # The new answer is the entry now, with a fresh time to live from its own write.
    cg.advance(59.0)
    assert ask(cg) == ("hit", second)
    cg.advance(1.5)
    assert ask(cg)[0] == "miss"
    assert cg.upstream_count == 3


def test_ttl_header_shortens_an_entrys_life(on_clock: Callable[..., CacheGateway]) -> None:
    cg = on_clock(3600)
    status, first = ask(cg, {"x-setpoint-cache-ttl": "30"})
    assert status == "miss"
    cg.advance(29)
    assert ask(cg) == ("hit", first)
    cg.advance(2)
    assert ask(cg)[0] == "miss"
    # Another request without the header is stored for the configured hour.
    cg.advance(1800)
    assert ask(cg)[0] == "hit"


def test_ttl_header_lengthens_an_entrys_life(on_clock: Callable[..., CacheGateway]) -> None:
    cg = on_clock(60)
    status, first = ask(cg, {"x-setpoint-cache-ttl": "600.5"})
    assert status == "miss"
    cg.advance(300)  # five times the configured ttl
    assert ask(cg) == ("hit", first)
    cg.advance(301)
    assert ask(cg)[0] == "miss"


def test_a_hit_does_not_extend_the_entry(on_clock: Callable[..., CacheGateway]) -> None:
    cg = on_clock(100)
    _, first = ask(cg)
    cg.advance(50)
    assert ask(cg, {"x-setpoint-cache-ttl": "1000"}) == ("hit", first)  # the ttl header only applies to writes
    cg.advance(51)
    assert ask(cg)[0] == "miss"
    assert cg.write_count == 2


def test_refresh_restarts_the_time_to_live(on_clock: Callable[..., CacheGateway]) -> None:
    cg = on_clock(100)
    ask(cg)
    cg.advance(90)
    status, refreshed = ask(cg, {"x-setpoint-cache": "refresh"})
    assert status == "miss"
    cg.advance(90)  # 180 s after the first write, 90 s after the refresh
    assert ask(cg) == ("hit", refreshed)


def test_streams_expire_alike(on_clock: Callable[..., CacheGateway]) -> None:
    cg = on_clock(10)
    live = cg.chat(stream=True)
    assert live.headers["x-setpoint-cache"] == "miss"
    rid = live.text.split('"id":"', 1)[1].split('"', 1)[0]
    cg.wait_written(rid)
    cg.advance(9)
    assert cg.chat(stream=True).headers["x-setpoint-cache"] == "hit"
    assert cg.chat().headers["x-setpoint-cache"] == "hit"
    cg.advance(2)
    assert cg.chat(stream=True).headers["x-setpoint-cache"] == "miss"


def test_redis_entry_carries_a_garbage_collection_ttl(cache_gateway: Callable[..., CacheGateway], redis_url: str) -> None:
    """On Redis the expiry travels with the value (checked against the injected clock) and Redis'
    own TTL only collects the garbage: it is set, and no longer than the entry's time to live."""
    cg = cache_gateway(cache_config({"ttl_s": 120}, state_url=redis_url), clock=ManualClock())
    _, rid = ask(cg)
    ask(cg, {"x-setpoint-cache-ttl": "45"}, messages=[{"role": "user", "content": "short-lived"}])
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        keys = sorted(client.scan_iter(match="{sp}:c:*"))
        assert len(keys) == 2
        ttls = sorted(client.pttl(k) for k in keys)
        assert 0 < ttls[0] <= 45_000 and 45_000 < ttls[1] <= 120_000
    finally:
        client.close()
