"""The cache and the stages after it. The key is computed from the request as the client sent it,
before rate limits, budgets and the caller run; those stages can still change what is asked
upstream (a budget clamps `max_tokens` or degrades to a cheaper model; the caller degrades to
another model when every deployment is unhealthy). An answer shaped that way is not the answer to
the request the key describes, so it must not be stored under that key: otherwise another key of
the team (or the same key, once its budget or the upstream recovered) is served the truncated or
degraded answer for the whole time to live.

Every test here uses a barrier request after the shaped one: the memory store completes writes in
the order they were scheduled, so after the barrier any write of the shaped answer has landed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from .helpers import ALL_KEY, TEAM_MATE_KEY, CacheGateway, cache_config

# 1000 USD per million output tokens: one output token costs 1000 micro-dollars; prompts are free.
PRICEY = {"input_per_mtok": 0.0, "output_per_mtok": 1000.0}
QUESTION = [{"role": "user", "content": "Explain set points at length."}]


def pricey_config(budget: dict[str, Any]) -> dict[str, Any]:
    """chat-a as usual; `pricey` (cached) costs 1000 micro-dollars per output token; a budget on
    the team mate's key only (ALL_KEY, in the same team, has none)."""
    cfg = cache_config()
    cfg["models"]["pricey"] = {"cache": {}, "deployments": [{"provider": "sim", "model": "sim-pricey", "pricing": PRICEY}]}
    cfg["budgets"] = [{"scope": "key", "name": "cfg:mate", "period": "total", **budget}]
    return cfg


def test_a_budget_that_is_not_low_leaves_the_answer_alone(cache_gateway: Callable[..., CacheGateway]) -> None:
    """Control for the two tests below: without clamping or degrading, the team mate's answer is
    cached and shared as usual."""
    cg = cache_gateway(pricey_config({"limit_usd": 10.0, "degrade_to": "chat-b", "degrade_below": 0.1}))
    r = cg.chat(key=TEAM_MATE_KEY, model="pricey", messages=QUESTION, max_tokens=1000, sim_output_tokens=200)
    assert r.status_code == 200 and "x-setpoint-budget-clamped" not in r.headers and "x-setpoint-degraded" not in r.headers
    cg.wait_written(r.json()["id"])
    hit = cg.chat(key=ALL_KEY, model="pricey", messages=QUESTION, max_tokens=1000, sim_output_tokens=200)
    assert hit.headers["x-setpoint-cache"] == "hit" and hit.json() == r.json()


def test_an_answer_clamped_by_a_budget_is_not_served_to_others(cache_gateway: Callable[..., CacheGateway]) -> None:
    cg = cache_gateway(pricey_config({"limit_usd": 0.1}))  # 100 000 micro-dollars: ~100 output tokens
    request = {"model": "pricey", "messages": QUESTION, "max_tokens": 1000, "sim_output_tokens": 200}

    clamped = cg.chat(key=TEAM_MATE_KEY, **request)
    assert clamped.status_code == 200, clamped.text
    assert clamped.headers["x-setpoint-budget-clamped"] == "100"
    assert clamped.json()["choices"][0]["finish_reason"] == "length"
    cg.barrier()

    mine = cg.chat(key=ALL_KEY, **request)  # same team, no budget: asks for (and may get) 1000 tokens
    assert mine.status_code == 200
    assert mine.json()["choices"][0]["finish_reason"] == "stop", (
        f"served the answer clamped for another key ({mine.headers.get('x-setpoint-cache')})")
    assert mine.json()["usage"]["completion_tokens"] == 200


def test_an_answer_degraded_by_a_budget_is_not_served_to_others(cache_gateway: Callable[..., CacheGateway]) -> None:
    cg = cache_gateway(pricey_config({"limit_usd": 0.1, "degrade_to": "chat-b", "degrade_below": 0.9}))
    spend = cg.chat(key=TEAM_MATE_KEY, model="pricey", messages=[{"role": "user", "content": "spend"}],
                    max_tokens=30, sim_output_tokens=20)  # 20 000 of 100 000: under 90% left from now on
    assert spend.status_code == 200 and "x-setpoint-degraded" not in spend.headers

    request = {"model": "pricey", "messages": QUESTION, "max_tokens": 50, "sim_output_tokens": 10}
    degraded = cg.chat(key=TEAM_MATE_KEY, **request)
    assert degraded.status_code == 200
    assert degraded.headers["x-setpoint-degraded"] == "budget; model=chat-b"
    assert degraded.json()["model"] == "sim-large"
    cg.barrier()

    mine = cg.chat(key=ALL_KEY, **request)
    assert mine.status_code == 200
    assert mine.json()["model"] == "sim-pricey", (
        f"served chat-b's answer for model pricey ({mine.headers.get('x-setpoint-cache')})")


def test_an_answer_degraded_for_health_is_not_cached_as_the_original_model(
        cache_gateway: Callable[..., CacheGateway]) -> None:
    cfg = cache_config()
    cfg["models"]["chat-a"]["degrade_to"] = "chat-b"
    cfg["resilience"] = {"max_attempts": 1, "breaker": {"min_calls": 2, "failure_rate": 0.5, "open_s": 600}}
    cg = cache_gateway(cfg)
    for i in range(2):  # trip chat-a's breaker (other bodies: never cached, the faults are not either)
        r = cg.chat(sim_fault="server_error", messages=[{"role": "user", "content": f"fault {i}"}])
        assert r.status_code >= 500
    degraded = cg.chat()
    assert degraded.status_code == 200, degraded.text
    assert degraded.headers["x-setpoint-degraded"] == "unhealthy; model=chat-b"
    assert degraded.json()["model"] == "sim-large"
    cg.embed_barrier()  # chat-a is degraded, so the barrier goes through the embeddings model
    stored = [e["completion"]["model"] for _, e in cg.writes if e["completion"].get("object") == "chat.completion"]
    assert stored == [], f"chat-a's entry holds an answer of {stored}"
