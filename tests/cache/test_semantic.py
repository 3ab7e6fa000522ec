"""The semantic cache through the gateway: a paraphrase is served from the cache, a negation or a
different number is not, tenants and system prompts stay apart, a streamed paraphrase is replayed
as a stream, and two gateway processes share the index through Redis."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from .helpers import ALL_KEY, OTHER_TEAM_KEY, TEAM_MATE_KEY, CacheGateway, cache_config, sse_events

pytest.importorskip("onnxruntime", reason="the semantic extra is not installed: pip install 'setpoint[semantic]'")

LOOPBACK = "127.0.0.1"
SYSTEM = {"role": "system", "content": "You are a support assistant."}


def semantic_config(**sem: Any) -> dict[str, Any]:
    return cache_config({"ttl_s": 600, "semantic": sem})


def ask(cg: CacheGateway, text: str, key: str = ALL_KEY, system: dict[str, str] | None = SYSTEM,
        **extra: Any) -> httpx.Response:
    messages = ([system] if system else []) + [{"role": "user", "content": text}]
    r = cg.chat(key=key, model="chat-a", messages=messages, temperature=0, **extra)
    assert r.status_code == 200, r.text
    return r


def test_a_paraphrase_is_served_from_the_cache(cache_gateway: Callable[..., CacheGateway]) -> None:
    cg = cache_gateway(semantic_config())
    first = ask(cg, "How do I reset my password?")
    assert first.headers["x-setpoint-cache"] == "miss"
    cg.wait_written(first.json()["id"])
    calls = cg.upstream_count
    second = ask(cg, "How can I reset my password?", key=TEAM_MATE_KEY)
    assert second.headers["x-setpoint-cache"] == "hit"
    assert float(second.headers["x-setpoint-cache-similarity"]) >= 0.95
    assert second.json()["choices"] == first.json()["choices"]
    assert cg.upstream_count == calls  # no upstream call for the paraphrase
    rows = {r["id"]: r for r in cg.rows()}
    hit = rows[second.headers["x-request-id"]]
    assert hit["cache_status"] == "hit" and hit["cost_micros"] == 0
    assert hit["saved_micros"] == rows[first.headers["x-request-id"]]["cost_micros"] > 0
    assert '"cache_match":"semantic"' in hit["annotations"]


@pytest.mark.parametrize(("stored", "asked"), [
    ("How do I enable two-factor authentication?", "How do I disable two-factor authentication?"),
    ("Show me the top 5 customers by revenue", "Show me the top 10 customers by revenue"),
    ("What is the capital of France?", "What is the capital of Germany?"),
])
def test_near_misses_are_not_served(cache_gateway: Callable[..., CacheGateway], stored: str, asked: str) -> None:
    cg = cache_gateway(semantic_config())
    first = ask(cg, stored)
    cg.wait_written(first.json()["id"])
    calls = cg.upstream_count
    other = ask(cg, asked)
    assert other.headers["x-setpoint-cache"] == "miss"
    assert cg.upstream_count == calls + 1


def test_tenants_system_prompts_and_parameters_partition_the_index(cache_gateway: Callable[..., CacheGateway]) -> None:
    cg = cache_gateway(semantic_config())
    first = ask(cg, "How do I reset my password?")
    cg.wait_written(first.json()["id"])
    # The very same words: another team, another system prompt, other sampling parameters -> misses.
    assert ask(cg, "How do I reset my password?", key=OTHER_TEAM_KEY).headers["x-setpoint-cache"] == "miss"
    assert ask(cg, "How can I reset my password?",
               system={"role": "system", "content": "Answer in French."}).headers["x-setpoint-cache"] == "miss"
    assert ask(cg, "How can I reset my password?", max_tokens=7).headers["x-setpoint-cache"] == "miss"
    assert ask(cg, "How can I reset my password?").headers["x-setpoint-cache"] == "hit"


def test_multi_turn_and_tools_are_exact_only_by_default(cache_gateway: Callable[..., CacheGateway]) -> None:
    cg = cache_gateway(semantic_config())
    convo = [SYSTEM, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}
    for extra in ({"messages": convo + [{"role": "user", "content": "How do I reset my password?"}]},
                  {"messages": [SYSTEM, {"role": "user", "content": "How do I reset my password?"}], "tools": [tool]}):
        first = cg.chat(model="chat-a", temperature=0, **extra)
        cg.wait_written(first.json()["id"])
        para = dict(extra, messages=extra["messages"][:-1] + [{"role": "user", "content": "How can I reset my password?"}])
        assert cg.chat(model="chat-a", temperature=0, **para).headers["x-setpoint-cache"] == "miss"


def test_multi_turn_when_enabled_needs_the_same_earlier_turns(cache_gateway: Callable[..., CacheGateway]) -> None:
    cg = cache_gateway(semantic_config(multi_turn=True))
    convo = [SYSTEM, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    first = cg.chat(model="chat-a", temperature=0, messages=convo + [{"role": "user", "content": "How do I reset my password?"}])
    cg.wait_written(first.json()["id"])
    same = cg.chat(model="chat-a", temperature=0, messages=convo + [{"role": "user", "content": "How can I reset my password?"}])
    assert same.headers["x-setpoint-cache"] == "hit"
    other = convo[:-1] + [{"role": "assistant", "content": "hey"}]
    diff = cg.chat(model="chat-a", temperature=0, messages=other + [{"role": "user", "content": "How can I reset my password?"}])
    assert diff.headers["x-setpoint-cache"] == "miss"


def test_a_streamed_paraphrase_is_replayed_as_a_stream(cache_gateway: Callable[..., CacheGateway]) -> None:
    cg = cache_gateway(semantic_config())
    first = ask(cg, "How do I reset my password?")
    cg.wait_written(first.json()["id"])
    r = cg.chat(model="chat-a", temperature=0, stream=True,
                messages=[SYSTEM, {"role": "user", "content": "How can I reset my password?"}])
    assert r.headers["x-setpoint-cache"] == "hit"
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    import orjson

    text = "".join((orjson.loads(e)["choices"][0]["delta"].get("content") or "") for e in events[:-1]
                   if orjson.loads(e)["choices"])
    assert text == first.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize(("stored", "asked"), [
    ("Why is the build not failing when the tests fail?", "Why is the build failing when the tests fail?"),
    ("What were our sales in Q3 2023?", "What were our sales in Q3 2024?"),
])
def test_the_guard_is_what_refuses_a_near_duplicate(cache_gateway: Callable[..., CacheGateway], stored: str,
                                                    asked: str) -> None:
    """These pairs score above 0.98 cosine: without the guard the wrong answer would be served."""
    off = cache_gateway(semantic_config(guard=False))
    first = ask(off, stored)
    off.wait_written(first.json()["id"])
    assert ask(off, asked).headers["x-setpoint-cache"] == "hit"
    on = cache_gateway(semantic_config())
    first = ask(on, stored)
    on.wait_written(first.json()["id"])
    refused = ask(on, asked)
    assert refused.headers["x-setpoint-cache"] == "miss"
    row = next(r for r in on.rows() if r["id"] == refused.headers["x-request-id"])
    assert "semantic_refused" in row["annotations"]


@pytest.mark.timeout(120)
def test_two_processes_share_the_semantic_index_through_redis(
    redis_url: str, spawn: Callable[..., Any], free_port: Callable[[], int], write_config: Callable[..., Path],
    wait_until: Callable[..., None], http_client: httpx.Client, tmp_path: Path,
) -> None:
    bases = []
    procs = []
    for name, seed in (("a", 1), ("b", 2)):
        cfg = cache_config({"ttl_s": 600, "semantic": {}}, state_url=redis_url, seed=seed)
        cfg["data_dir"] = str(tmp_path / f"{name}-data")
        port = free_port()
        procs.append(spawn(["serve", "--config", str(write_config(cfg, name=name)), "--host", LOOPBACK,
                            "--port", str(port)], name=f"gw-{name}"))
        bases.append(f"http://{LOOPBACK}:{port}")
    for proc, base in zip(procs, bases, strict=True):
        proc.wait_http(f"{base}/health", timeout_s=90)

    def post(base: str, text: str, key: str) -> httpx.Response:
        body = {"model": "chat-a", "temperature": 0, "messages": [SYSTEM, {"role": "user", "content": text}]}
        return http_client.post(f"{base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})

    first = post(bases[0], "How do I reset my password?", ALL_KEY)
    assert first.headers["x-setpoint-cache"] == "miss", first.text

    def hit_on_b() -> bool:
        return post(bases[1], "How can I reset my password?", TEAM_MATE_KEY).headers["x-setpoint-cache"] == "hit"

    wait_until(hit_on_b, 15, "process B to serve A's answer to a paraphrase")
    on_b = post(bases[1], "How can I reset my password?", TEAM_MATE_KEY)
    assert on_b.json()["choices"] == first.json()["choices"]  # B's own upstream (seed 2) would differ
    assert post(bases[1], "How can I reset my password?", OTHER_TEAM_KEY).headers["x-setpoint-cache"] == "miss"
