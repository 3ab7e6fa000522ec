"""The cache in Redis: shared by gateway processes (a miss on one is a hit on another, tenants
still apart), and failing open when Redis is down (requests are served as misses; caching resumes
when Redis is back)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis

from .helpers import ALL_KEY, OTHER_TEAM_KEY, TEAM_MATE_KEY, CacheGateway, cache_config, sse_events

LOOPBACK = "127.0.0.1"
MESSAGES = [{"role": "user", "content": "shared across processes"}]


def entries(redis_url: str) -> int:
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        return sum(1 for _ in client.scan_iter(match="{sp}:c:*"))
    finally:
        client.close()


def post(http: httpx.Client, base: str, key: str, **extra: Any) -> httpx.Response:
    body = {"model": "chat-a", "messages": MESSAGES, "temperature": 0, **extra}
    return http.post(f"{base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})


@pytest.mark.timeout(90)
def test_a_miss_on_one_process_is_a_hit_on_another(
    redis_url: str, spawn: Callable[..., Any], free_port: Callable[[], int], write_config: Callable[..., Path],
    wait_until: Callable[..., None], http_client: httpx.Client, tmp_path: Path,
    read_rows: Callable[..., list[dict[str, Any]]],
) -> None:
    gateways = []
    for name, seed in (("a", 1), ("b", 2)):  # different seeds: their own upstream answers differ
        cfg = cache_config(state_url=redis_url, seed=seed)
        cfg["data_dir"] = str(tmp_path / f"{name}-data")
        path = write_config(cfg, name=name)
        port = free_port()
        proc = spawn(["serve", "--config", str(path), "--host", LOOPBACK, "--port", str(port)], name=f"gw-{name}")
        gateways.append((proc, f"http://{LOOPBACK}:{port}", tmp_path / f"{name}-data" / "requests.db"))
    for proc, base, _ in gateways:
        proc.wait_http(f"{base}/health", timeout_s=60)
    (proc_a, a, db_a), (proc_b, b, db_b) = gateways

    first = post(http_client, a, ALL_KEY)
    assert first.status_code == 200 and first.headers["x-setpoint-cache"] == "miss", first.text
    wait_until(lambda: entries(redis_url) == 1, 10, "A's cache entry in Redis")

    on_b = post(http_client, b, TEAM_MATE_KEY)  # another process, another key of the same team
    assert on_b.status_code == 200
    assert on_b.headers["x-setpoint-cache"] == "hit"
    assert on_b.json() == first.json()

    streamed = post(http_client, b, ALL_KEY, stream=True, stream_options={"include_usage": True})
    assert streamed.headers["x-setpoint-cache"] == "hit"
    docs = [orjson.loads(e) for e in sse_events(streamed.text)[:-1]]
    assert {d["id"] for d in docs} == {first.json()["id"]}
    assert "".join(c["delta"].get("content") or "" for d in docs for c in d["choices"]) == \
        first.json()["choices"][0]["message"]["content"]
    assert docs[-1]["usage"] == first.json()["usage"]

    # Tenants stay apart across processes: another team misses on B, and B's entry is A's hit.
    other_b = post(http_client, b, OTHER_TEAM_KEY)
    assert other_b.headers["x-setpoint-cache"] == "miss"
    assert other_b.json()["id"] != first.json()["id"]
    wait_until(lambda: entries(redis_url) == 2, 10, "B's cache entry in Redis")
    other_a = post(http_client, a, OTHER_TEAM_KEY)
    assert other_a.headers["x-setpoint-cache"] == "hit"
    assert other_a.json() == other_b.json()

    for proc, _, _ in gateways:
        assert proc.terminate() == 0, proc.output()
    rows_a, rows_b = read_rows(db_a), read_rows(db_b)
    assert [(r["key_name"], r["cache_status"], r["deployment"]) for r in rows_a] == [
        ("all", "miss", "sim/sim-small"), ("other", "hit", None)]
    assert [(r["key_name"], r["cache_status"], r["deployment"], r["is_stream"]) for r in rows_b] == [
        ("mate", "hit", None, 0), ("all", "hit", None, 1), ("other", "miss", "sim/sim-small", 0)]
    assert rows_b[0]["saved_micros"] == rows_a[0]["cost_micros"] > 0
    assert rows_a[1]["saved_micros"] == rows_b[2]["cost_micros"] > 0


def test_redis_outage_fails_open(cache_gateway: Callable[..., CacheGateway], redis_url: str, redis_control: Any) -> None:
    cg = cache_gateway(cache_config(state_url=redis_url))
    first = cg.chat()
    assert first.headers["x-setpoint-cache"] == "miss"
    cg.wait_written(first.json()["id"])
    assert cg.chat().headers["x-setpoint-cache"] == "hit"
    assert entries(redis_url) == 1

    redis_control.stop()
    served = []
    for kw in ({}, {}, {"stream": True}, {"messages": [{"role": "user", "content": "new"}]}):
        r = cg.chat(**kw)
        assert r.status_code == 200, r.text
        assert r.headers["x-setpoint-cache"] == "miss"  # the entry is unreachable, never an error
        if kw.get("stream"):
            assert sse_events(r.text)[-1] == "[DONE]"
        else:
            served.append(r.json()["id"])
    assert first.json()["id"] not in served
    assert cg.upstream_count == 5  # the first miss and all four during the outage
    # The writes were attempted and failed quietly (StateBackendError, logged, not raised).
    with cg.cond:
        assert cg.cond.wait_for(lambda: len(cg.write_errors) == 4, 10), cg.write_errors
        assert {type(e).__name__ for e in cg.write_errors} == {"StateBackendError"}
        cg.write_errors.clear()

    redis_control.start()  # an empty Redis (no persistence): caching resumes
    again = cg.chat()
    assert again.status_code == 200 and again.headers["x-setpoint-cache"] == "miss"
    cg.wait_written(again.json()["id"])
    hit = cg.chat()
    assert hit.headers["x-setpoint-cache"] == "hit" and hit.json() == again.json()

    rows = cg.rows()
    assert [r["status"] for r in rows] == [200] * 8
    assert [r["cache_status"] for r in rows] == ["miss", "hit", "miss", "miss", "miss", "miss", "miss", "hit"]
