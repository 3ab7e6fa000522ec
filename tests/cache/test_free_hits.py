"""A hit is free: the cache answers before rate limits and budgets, so a hit takes no request or
token from a bucket and no money from a budget (hits still pass when misses are refused), costs
nothing in the request log, and records what it saved (`saved_micros`, the cost of the answer it
replayed). `/admin/usage` and `setpoint usage` report hits and savings.

Rate limits run on a ManualClock so that no bucket refills while a test runs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from setpoint.clock import ManualClock

from .helpers import ALL_KEY, MASTER_KEY, OTHER_TEAM_KEY, TEAM_MATE_KEY, CacheGateway, cache_config

# 1000 USD per million output tokens: one output token costs 1000 micro-dollars; prompts are free.
PRICEY = {"input_per_mtok": 0.0, "output_per_mtok": 1000.0}


def body(name: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"request {name}"}], **extra}


def expect(cg: CacheGateway, status: int, cache: str | None, **kw: Any) -> httpx.Response:
    r = cg.chat(**kw)
    assert r.status_code == status, r.text
    assert r.headers.get("x-setpoint-cache") == cache
    return r


# -- rate limits ------------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["key", "team", "model"])
def test_hits_take_nothing_from_the_request_rate_limit(cache_gateway: Callable[..., CacheGateway], scope: str) -> None:
    cfg = cache_config()
    cfg["rate_limits"] = [{"scope": scope, "rpm": 2}]
    cg = cache_gateway(cfg, clock=ManualClock())

    a = expect(cg, 200, "miss", **body("a"))  # 1 of 2
    cg.wait_written(a.json()["id"])
    for _ in range(5):
        assert expect(cg, 200, "hit", **body("a")).json() == a.json()
    expect(cg, 200, "hit", stream=True, **body("a"))
    expect(cg, 200, "miss", **body("b"))  # 2 of 2: the six hits took nothing

    refused = expect(cg, 429, "miss", **body("c"))  # a miss over the limit is refused ...
    assert refused.json()["error"]["code"] == "rate_limited"
    assert expect(cg, 200, "hit", **body("a")).json() == a.json()  # ... a hit still passes
    assert cg.upstream_count == 2


def test_hits_take_nothing_from_a_token_rate_limit(cache_gateway: Callable[..., CacheGateway]) -> None:
    cfg = cache_config()
    cfg["rate_limits"] = [{"scope": "key", "tpm": 200}]
    cg = cache_gateway(cfg, clock=ManualClock())
    a = expect(cg, 200, "miss", max_tokens=50, sim_output_tokens=40, **body("a"))
    cg.wait_written(a.json()["id"])
    for _ in range(10):  # 10 x ~45 tokens would be far over 200 if hits were charged
        expect(cg, 200, "hit", max_tokens=50, sim_output_tokens=40, **body("a"))
    expect(cg, 200, "miss", max_tokens=50, sim_output_tokens=40, **body("b"))
    assert cg.upstream_count == 2


def test_team_mates_hit_while_the_team_is_rate_limited(cache_gateway: Callable[..., CacheGateway]) -> None:
    cfg = cache_config()
    cfg["rate_limits"] = [{"scope": "team", "rpm": 1}]
    cg = cache_gateway(cfg, clock=ManualClock())
    a = expect(cg, 200, "miss", **body("a"))
    cg.wait_written(a.json()["id"])
    assert cg.chat(key=TEAM_MATE_KEY, **body("b")).status_code == 429
    r = cg.chat(key=TEAM_MATE_KEY, **body("a"))
    assert r.status_code == 200 and r.headers["x-setpoint-cache"] == "hit"


# -- budgets ----------------------------------------------------------------------------------------


def budget_gateway(cache_gateway: Callable[..., CacheGateway], limit_usd: float) -> CacheGateway:
    cfg = cache_config()
    cfg["models"]["chat-a"]["deployments"][0]["pricing"] = dict(PRICEY)
    cfg["budgets"] = [{"scope": "key", "period": "total", "limit_usd": limit_usd}]
    return cache_gateway(cfg)


def test_hits_spend_nothing_from_a_budget(cache_gateway: Callable[..., CacheGateway]) -> None:
    cg = budget_gateway(cache_gateway, 0.025)  # 25 000 micro-dollars
    a = expect(cg, 200, "miss", max_tokens=20, sim_output_tokens=10, **body("a"))  # costs 10 000
    cg.wait_written(a.json()["id"])
    for _ in range(5):  # would cost 50 000 if charged
        expect(cg, 200, "hit", max_tokens=20, sim_output_tokens=10, **body("a"))
    expect(cg, 200, "hit", stream=True, max_tokens=20, sim_output_tokens=10, **body("a"))
    # 15 000 left: a request that holds 14 000 fits only if the hits spent nothing.
    expect(cg, 200, "miss", max_tokens=14, sim_output_tokens=5, **body("b"))  # costs 5 000

    refused = expect(cg, 429, "miss", max_tokens=20, sim_output_tokens=10, **body("c"))  # 10 000 left
    assert refused.json()["error"]["code"] == "budget_exceeded"
    hit = expect(cg, 200, "hit", max_tokens=20, sim_output_tokens=10, **body("a"))
    assert hit.json() == a.json()
    assert cg.upstream_count == 2

    rows = cg.rows()
    assert sum(r["cost_micros"] or 0 for r in rows) == 15_000
    hits = [r for r in rows if r["cache_status"] == "hit"]
    assert len(hits) == 7
    assert all(r["cost_micros"] == 0 and r["saved_micros"] == 10_000 for r in hits)


def test_saved_micros_is_the_cost_of_the_cached_answer(cache_gateway: Callable[..., CacheGateway]) -> None:
    cg = cache_gateway()  # chat-a: 1 USD / 2 USD per million input / output tokens
    for i, stream in enumerate((False, True)):
        kw: dict[str, Any] = {"sim_output_tokens": 9 + i, **body(f"s{i}")}
        first = expect(cg, 200, "miss", stream=stream, **kw)
        rid = first.json()["id"] if not stream else first.text.split('"id":"', 1)[1].split('"', 1)[0]
        entry = cg.wait_written(rid)
        expect(cg, 200, "hit", stream=not stream, **kw)
        expect(cg, 200, "hit", stream=stream, **kw)
        rows = cg.rows()[-3:]
        miss = rows[0]
        assert miss["cache_status"] == "miss"
        expected_cost = miss["prompt_tokens"] * 1 + miss["completion_tokens"] * 2
        assert miss["completion_tokens"] == 9 + i and miss["cost_micros"] == expected_cost > 0
        assert entry["cost_micros"] == expected_cost
        assert entry["tokens"] == miss["prompt_tokens"] + miss["completion_tokens"]
        for hit in rows[1:]:
            assert hit["cache_status"] == "hit"
            assert hit["saved_micros"] == expected_cost
            assert hit["cost_micros"] == 0
            assert json.loads(hit["annotations"])["saved_tokens"] == entry["tokens"]


# -- usage reports ----------------------------------------------------------------------------------


def make_traffic(cg: CacheGateway) -> dict[str, int]:
    """all: 1 miss + 3 hits; mate (same team): 2 hits; other team: 1 miss. Returns costs by request."""
    a = expect(cg, 200, "miss", **body("a"))
    cg.wait_written(a.json()["id"])
    for _ in range(3):
        expect(cg, 200, "hit", **body("a"))
    for _ in range(2):
        r = cg.chat(key=TEAM_MATE_KEY, **body("a"))
        assert r.headers["x-setpoint-cache"] == "hit"
    r = cg.chat(key=OTHER_TEAM_KEY, **body("a"))
    assert r.headers["x-setpoint-cache"] == "miss"
    rows = cg.rows()
    return {"a": rows[0]["cost_micros"], "other": rows[-1]["cost_micros"]}


def test_admin_usage_reports_hits_and_savings(cache_gateway: Callable[..., CacheGateway], http_client: httpx.Client) -> None:
    cg = cache_gateway()
    cost = make_traffic(cg)
    assert cost["a"] > 0

    def usage(by: str) -> dict[str, dict[str, Any]]:
        r = http_client.get(f"{cg.gw.root_url}/admin/usage", params={"by": by},
                            headers={"Authorization": f"Bearer {MASTER_KEY}"})
        assert r.status_code == 200, r.text
        return {row["group"]: row for row in r.json()["data"]}

    by_key = usage("key")
    assert (by_key["all"]["requests"], by_key["all"]["cache_hits"], by_key["all"]["saved_micros"]) == (4, 3, 3 * cost["a"])
    assert by_key["all"]["cost_micros"] == cost["a"]
    assert (by_key["mate"]["requests"], by_key["mate"]["cache_hits"], by_key["mate"]["saved_micros"]) == (2, 2, 2 * cost["a"])
    assert by_key["mate"]["cost_micros"] == 0
    assert by_key["other"]["cache_hits"] == 0 and by_key["other"]["saved_micros"] == 0

    by_team = usage("team")
    assert by_team["team-all"]["cache_hits"] == 5 and by_team["team-all"]["saved_micros"] == 5 * cost["a"]
    by_model = usage("model")
    assert by_model["chat-a"]["requests"] == 7 and by_model["chat-a"]["cache_hits"] == 5


def test_setpoint_usage_cli_reports_hits_and_savings(cache_gateway: Callable[..., CacheGateway],
                                                     run_cli: Callable[..., Any],
                                                     write_config: Callable[..., Path]) -> None:
    cfg = cache_config()
    cg = cache_gateway(cfg)
    cost = make_traffic(cg)
    assert cg.gw.server is not None
    cli_cfg = {**cfg, "data_dir": str(cg.gw.server.gateway.runtime.data_dir)}
    path = write_config(cli_cfg, name="cli")

    out = run_cli("usage", "--config", str(path), "--by", "team", "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["group"]: r for r in json.loads(out.stdout)}
    assert rows["team-all"]["cache_hits"] == 5
    assert rows["team-all"]["saved_micros"] == 5 * cost["a"]
    assert rows["team-other"]["cache_hits"] == 0

    text = run_cli("usage", "--config", str(path), "--by", "team")
    assert text.returncode == 0, text.stderr
    assert "cache hits" in text.stdout and "saved $" in text.stdout
    team_line = next(line for line in text.stdout.splitlines() if line.startswith("team-all"))
    assert team_line.split()[-2:] == ["5", f"{5 * cost['a'] / 1e6:.6f}"]
    assert f"the cache saved {5 * cost['a']} " in text.stdout
    assert ALL_KEY not in text.stdout
