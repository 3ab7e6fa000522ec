"""The cache end to end through the gateway: an identical request is a hit (`x-setpoint-cache: hit`,
no upstream call, the same answer); the key ignores field order and the fields that cannot change
the answer, and changes with every field that can; what is not cached (other models, failures,
non-deterministic requests) and what a hit does not bypass (auth, model permissions)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import orjson
import pytest

from .helpers import ALL_KEY, MESSAGES, CacheGateway, cache_config

WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather for a city",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
}


def miss_then_hit(cg: CacheGateway, **body: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Send the same request twice: a miss (written), then a hit; returns both answers."""
    calls = cg.upstream_count
    first = cg.chat(**body)
    assert first.status_code == 200, first.text
    assert first.headers["x-setpoint-cache"] == "miss"
    assert cg.upstream_count == calls + 1
    cg.wait_written(first.json()["id"])
    second = cg.chat(**body)
    assert second.status_code == 200, second.text
    assert second.headers["x-setpoint-cache"] == "hit"
    assert cg.upstream_count == calls + 1, "a hit must not call the upstream"
    return first.json(), second.json()


def test_identical_request_is_a_hit_with_the_same_answer(cache_gateway: Callable[..., CacheGateway]) -> None:
    cg = cache_gateway()
    first, second = miss_then_hit(cg)
    assert second == first
    third = cg.chat()
    assert third.headers["x-setpoint-cache"] == "hit" and third.json() == first
    assert cg.upstream_count == 1 and cg.write_count == 1

    rows = cg.rows()
    assert [r["cache_status"] for r in rows] == ["miss", "hit", "hit"]
    assert [r["deployment"] for r in rows] == ["sim/sim-small", None, None]
    assert all(r["status"] == 200 and r["model"] == "chat-a" for r in rows)


def test_hit_through_the_openai_sdk(cache_gateway: Callable[..., CacheGateway]) -> None:
    cg = cache_gateway()
    client = cg.client()
    raw1 = client.chat.completions.with_raw_response.create(model="chat-a", messages=MESSAGES, temperature=0)
    first = raw1.parse()
    assert raw1.headers["x-setpoint-cache"] == "miss"
    cg.wait_written(first.id)
    raw2 = client.chat.completions.with_raw_response.create(model="chat-a", messages=MESSAGES, temperature=0)
    second = raw2.parse()
    assert raw2.headers["x-setpoint-cache"] == "hit"
    assert raw2.headers["x-request-id"] != raw1.headers["x-request-id"]  # a new request, an old answer
    assert second.id == first.id
    assert second.choices[0].message.content == first.choices[0].message.content
    assert second.usage == first.usage
    assert cg.upstream_count == 1


def test_field_order_does_not_matter(cache_gateway: Callable[..., CacheGateway]) -> None:
    cg = cache_gateway()
    body = {"model": "chat-a", "temperature": 0, "max_tokens": 50, "seed": 3, "tools": [WEATHER_TOOL],
            "messages": [{"role": "user", "content": "order"}]}
    shuffled = b'{"seed":3,"messages":[{"content":"order","role":"user"}],"tools":[{"function":{"parameters":' \
               b'{"required":["city"],"properties":{"city":{"type":"string"}},"type":"object"},"description":' \
               b'"Weather for a city","name":"get_weather"},"type":"function"}],"max_tokens":50,"temperature":0,' \
               b'"model":"chat-a"}'
    assert orjson.loads(shuffled) == body and shuffled != orjson.dumps(body)
    first = cg.post(body)
    assert first.headers["x-setpoint-cache"] == "miss"
    cg.wait_written(first.json()["id"])
    second = cg.post(shuffled)
    assert second.headers["x-setpoint-cache"] == "hit"
    assert second.json() == first.json()
    assert cg.upstream_count == 1


@pytest.mark.parametrize("extra", [
    {"user": "alice"},
    {"metadata": {"trace": "t-1"}},
    {"store": True},
    {"service_tier": "default"},
    {"stream": False},
    {"user": "bob", "metadata": {"a": "b"}, "store": False, "service_tier": "auto"},
], ids=["user", "metadata", "store", "service_tier", "stream-false", "all"])
def test_fields_that_cannot_change_the_answer_still_hit(cache_gateway: Callable[..., CacheGateway],
                                                         extra: dict[str, Any]) -> None:
    cg = cache_gateway()
    first = cg.chat()
    cg.wait_written(first.json()["id"])
    second = cg.chat(**extra)
    assert second.status_code == 200, second.text
    assert second.headers["x-setpoint-cache"] == "hit"
    assert second.json() == first.json()
    assert cg.upstream_count == 1


# Each: (the base request's fields, the changed fields). The cache is on for non-deterministic
# requests in these tests, so that temperature and top_p can vary too.
RELEVANT = {
    "messages": ({}, {"messages": [{"role": "user", "content": "What is a set point? Briefly."}]}),
    "tools": ({"tools": [WEATHER_TOOL]},
              {"tools": [{**WEATHER_TOOL, "function": {**WEATHER_TOOL["function"], "name": "get_forecast"}}]}),
    "temperature": ({"temperature": 0.7}, {"temperature": 0.8}),
    "top_p": ({"top_p": 1}, {"top_p": 0.5}),
    "max_tokens": ({"max_tokens": 40}, {"max_tokens": 41}),
    "seed": ({"seed": 1}, {"seed": 2}),
    "response_format": ({}, {"response_format": {"type": "json_object"}}),
    "n": ({}, {"n": 2}),
    "model": ({}, {"model": "chat-c"}),  # another cached alias of the same deployment
}


@pytest.mark.parametrize("name", list(RELEVANT))
def test_a_field_that_can_change_the_answer_is_a_miss(cache_gateway: Callable[..., CacheGateway], name: str) -> None:
    cfg = cache_config({"nondeterministic": True})
    cfg["models"]["chat-c"] = {**cfg["models"]["chat-a"]}
    cg = cache_gateway(cfg)
    base, changed = RELEVANT[name]
    miss_then_hit(cg, **base)
    variant = cg.chat(**{**base, **changed})
    assert variant.status_code == 200, variant.text
    assert variant.headers["x-setpoint-cache"] == "miss", f"changing {name} must change the key"
    assert cg.upstream_count == 2
    assert cg.upstream_calls[-1]["model"] == "sim-small"
    # ... and the variant got its own entry: both are hits now.
    cg.wait_written(variant.json()["id"])
    assert cg.chat(**{**base, **changed}).headers["x-setpoint-cache"] == "hit"
    assert cg.chat(**base).headers["x-setpoint-cache"] == "hit"
    assert cg.upstream_count == 2


def test_embeddings_are_cached_without_a_temperature(cache_gateway: Callable[..., CacheGateway]) -> None:
    cg = cache_gateway()
    client = cg.client()
    raw1 = client.embeddings.with_raw_response.create(model="embed", input=["alpha", "beta"])
    assert raw1.headers["x-setpoint-cache"] == "miss"
    cg.wait_writes(1)
    raw2 = client.embeddings.with_raw_response.create(model="embed", input=["alpha", "beta"])
    assert raw2.headers["x-setpoint-cache"] == "hit"
    assert [d.embedding for d in raw2.parse().data] == [d.embedding for d in raw1.parse().data]
    assert cg.upstream_count == 1
    raw3 = client.embeddings.with_raw_response.create(model="embed", input=["alpha"])
    assert raw3.headers["x-setpoint-cache"] == "miss"
    assert cg.upstream_count == 2
    rows = cg.rows()
    assert [(r["endpoint"], r["cache_status"]) for r in rows] == [("embeddings", "miss"), ("embeddings", "hit"),
                                                                     ("embeddings", "miss")]


def test_a_model_without_cache_config_is_never_cached(cache_gateway: Callable[..., CacheGateway]) -> None:
    cg = cache_gateway()
    for _ in range(2):
        r = cg.chat(model="chat-b")
        assert r.status_code == 200
        assert "x-setpoint-cache" not in r.headers
    cg.barrier()  # any write chat-b had scheduled has completed by now
    assert cg.upstream_count == 3  # two chat-b calls and the barrier
    assert cg.write_count == 1  # only the barrier's
    assert all(r["cache_status"] is None for r in cg.rows() if r["model"] == "chat-b")


# -- non-deterministic requests ---------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [None, 0.7, 1], ids=["missing", "0.7", "1"])
def test_non_deterministic_requests_are_not_cached_by_default(cache_gateway: Callable[..., CacheGateway],
                                                              temperature: float | None) -> None:
    cg = cache_gateway()
    body = {"model": "chat-a", "messages": MESSAGES}
    if temperature is not None:
        body["temperature"] = temperature
    answers = []
    for _ in range(2):
        r = cg.post(body)
        assert r.status_code == 200
        assert "x-setpoint-cache" not in r.headers  # the cache stayed out of it entirely
        answers.append(r.json()["id"])
    cg.barrier()
    assert cg.write_count == 1  # the barrier's only
    assert cg.upstream_count == 3
    assert answers[0] != answers[1]  # two real upstream answers
    assert [r["cache_status"] for r in cg.rows()[:2]] == [None, None]


@pytest.mark.parametrize("temperature", [0, 0.0], ids=["int", "float"])
def test_temperature_zero_is_deterministic(cache_gateway: Callable[..., CacheGateway], temperature: float) -> None:
    cg = cache_gateway()
    miss_then_hit(cg, temperature=temperature)


@pytest.mark.parametrize("temperature", [None, 0.7])
def test_nondeterministic_true_caches_them_too(cache_gateway: Callable[..., CacheGateway],
                                               temperature: float | None) -> None:
    cg = cache_gateway(cache_config({"nondeterministic": True}))
    body = {"model": "chat-a", "messages": MESSAGES}
    if temperature is not None:
        body["temperature"] = temperature
    first = cg.post(body)
    assert first.headers["x-setpoint-cache"] == "miss"
    cg.wait_written(first.json()["id"])
    second = cg.post(body)
    assert second.headers["x-setpoint-cache"] == "hit"
    assert second.json() == first.json()
    assert cg.upstream_count == 1


# -- what is not cached ---------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["server_error", "unavailable"])
def test_an_upstream_failure_is_not_cached(cache_gateway: Callable[..., CacheGateway], fault: str) -> None:
    cfg = cache_config()
    cfg["resilience"] = {"max_attempts": 1}
    cg = cache_gateway(cfg)
    for i in range(2):
        r = cg.chat(sim_fault=fault)
        assert r.status_code >= 400, r.text
        assert "error" in r.json()
        assert cg.upstream_count == i + 1, "a failure must not be replayed from the cache"
    cg.barrier()
    assert cg.write_count == 1  # only the barrier's


def test_a_stream_cut_mid_answer_is_not_cached(cache_gateway: Callable[..., CacheGateway]) -> None:
    cfg = cache_config()
    cfg["resilience"] = {"max_attempts": 1}
    cg = cache_gateway(cfg)
    for i in range(2):
        r = cg.chat(stream=True, sim_fault="cut_stream")
        assert r.status_code == 200  # the stream had started
        assert "data: [DONE]" not in r.text and '"error"' in r.text
        assert r.headers["x-setpoint-cache"] == "miss"
        assert cg.upstream_count == i + 1
    cg.barrier()
    assert cg.write_count == 1


def test_a_hit_needs_a_valid_key(cache_gateway: Callable[..., CacheGateway]) -> None:
    cg = cache_gateway()
    first = cg.chat()
    cg.wait_written(first.json()["id"])
    r = cg.chat(key="sk-not-a-real-key-0123456789")
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert "x-setpoint-cache" not in r.headers
    assert cg.upstream_count == 1


def test_a_hit_does_not_bypass_model_permissions(cache_gateway: Callable[..., CacheGateway],
                                                 make_client: Callable[..., openai.OpenAI]) -> None:
    restricted = "sk-cache-restricted-0123456789"
    cfg = cache_config()
    cfg["keys"].append({"name": "restricted", "key": restricted, "team": "team-all", "models": ["chat-b"]})
    cg = cache_gateway(cfg)
    first = cg.chat()
    cg.wait_written(first.json()["id"])
    r = cg.chat(key=restricted)  # same team, same request: the entry exists, the key may not use chat-a
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "permission_denied"
    assert "x-setpoint-cache" not in r.headers
    assert cg.upstream_count == 1
    assert cg.chat(key=ALL_KEY).headers["x-setpoint-cache"] == "hit"
