"""The `budget` stage through the real gateway (simulated upstream, memory:// state unless said
otherwise), the official openai SDK and raw HTTP: hard and soft budgets, stream cut, unary clamp,
run-scoped budgets, degradation to a cheaper alias, store failures and client disconnects.

Prices (from the default test config): chat-a costs 1 micro-dollar per prompt token and 2 per
completion token; chat-cheap (added here) a tenth of that.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from setpoint.policy.stages.budget import period_window
from setpoint.state.base import LedgerLine

MESSAGES = [{"role": "user", "content": "Say something short."}]


@pytest.fixture
def start(make_gateway: Callable[[dict[str, Any]], Any], default_config: Callable[..., dict[str, Any]],
          make_client: Callable[..., openai.OpenAI]) -> Callable[..., tuple[Any, openai.OpenAI]]:
    """`start(budgets, state_url="memory://", provider=None)` -> (gateway, SDK client with ALL_KEY)."""

    def run(budgets: list[dict[str, Any]], state_url: str = "memory://", provider: dict[str, Any] | None = None):
        cfg = default_config()
        cfg["state"] = {"url": state_url}
        if provider is not None:
            cfg["providers"]["sim"] = provider
        cfg["models"]["chat-cheap"] = {"deployments": [{
            "provider": "sim", "model": "sim-cheap", "pricing": {"input_per_mtok": 0.1, "output_per_mtok": 0.2}}]}
        cfg["budgets"] = budgets
        gw = make_gateway(cfg)
        return gw, make_client(gw.base_url)

    return run


def ledger_spent(gw: Any, key: str) -> int:
    """The settled spend of one ledger line, read from the gateway's own store on its own loop."""
    store = gw.server.gateway.runtime.state
    fut = asyncio.run_coroutine_threadsafe(store.spent([LedgerLine(key, None, 86_400.0)], time.time()), gw._loop)
    return fut.result(timeout=5)[0]


def line_key(index: int, scope: str, entity: str, period: str) -> str:
    """The ledger key the budget stage uses for rule `index` (mirrors BudgetStage._matches)."""
    return f"bg:{index}:{scope}:{entity}:{period_window(period, time.time())[0]}"


def annotations(row: dict[str, Any]) -> dict[str, Any]:
    return json.loads(row["annotations"]) if row["annotations"] else {}


def chat_raw(client: openai.OpenAI, model: str = "chat-a", **kw: Any) -> Any:
    return client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES, **kw)


# -- hard budgets ---------------------------------------------------------------------------------


def test_hard_daily_team_budget_refuses_once_spent(start, keys, make_client, gateway_rows) -> None:
    limit_micros = 400
    gw, client = start([{"scope": "team", "period": "daily", "limit_usd": limit_micros / 1e6}])
    served = 0
    err: openai.RateLimitError | None = None
    for _ in range(30):
        try:
            chat_raw(client, max_tokens=20, extra_body={"sim_output_tokens": 20})
            served += 1
        except openai.RateLimitError as exc:
            err = exc
            break
    assert err is not None, "the budget never refused"
    assert served >= 3  # each request costs about 7 + 40 micro-dollars
    assert err.status_code == 429 and err.code == "budget_exceeded"
    body = err.body if isinstance(err.body, dict) else {}
    assert body.get("type") == "insufficient_quota"
    assert "team team-all" in body.get("message", "")
    # Still refused on the next try (nothing was held by the refusal), and by streams too.
    with pytest.raises(openai.RateLimitError) as again:
        client.chat.completions.create(model="chat-a", messages=MESSAGES, stream=True)
    assert again.value.code == "budget_exceeded"
    # Another team is not affected.
    assert make_client(gw.base_url, keys.limited).chat.completions.create(model="chat-a", messages=MESSAGES).choices

    rows = gateway_rows(gw, "WHERE team = ?", ("team-all",))
    spent = sum(r["cost_micros"] or 0 for r in rows)
    assert spent == ledger_spent(gw, line_key(0, "team", "team-all", "daily"))
    assert spent <= limit_micros  # unary requests reserve their worst case: no overshoot
    assert [r["error_code"] for r in rows].count("budget_exceeded") == 2


def test_stream_past_the_budget_is_cut_sdk_raises(start, gateway_rows) -> None:
    limit_micros = 1000
    gw, client = start([{"scope": "team", "period": "daily", "limit_usd": limit_micros / 1e6}])
    stream = client.chat.completions.create(
        model="chat-a", messages=MESSAGES, stream=True, extra_body={"sim_output_tokens": 3000})
    received = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
    assert info.value.code == "budget_exceeded"
    assert 300 < len(received) < 3000  # a good part was streamed, then it was cut

    (row,) = gateway_rows(gw)
    assert row["error_code"] == "budget_exceeded" and row["status"] == 429
    assert annotations(row).get("budget") == "cut"
    assert 300 < row["completion_tokens"] < 3000
    spent = ledger_spent(gw, line_key(0, "team", "team-all", "daily"))
    assert spent == row["cost_micros"]
    one_chunk = 2 * 2  # one chunk is one word: at most 2 tokens at 2 micro-dollars
    assert limit_micros * 0.9 < spent <= limit_micros + one_chunk


def test_stream_cut_raw_sse_ends_with_an_error_event_and_no_done(start, keys, gateway_rows) -> None:
    limit_micros = 600
    gw, _ = start([{"scope": "key", "period": "daily", "limit_usd": limit_micros / 1e6}])
    body = {"model": "chat-a", "messages": MESSAGES, "stream": True, "sim_output_tokens": 3000}
    with httpx.Client(timeout=20.0, trust_env=False) as http:
        with http.stream("POST", gw.base_url + "/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {keys.all}"}) as resp:
            assert resp.status_code == 200
            raw = resp.read().decode()
    events = [e[len("data: "):] for e in raw.split("\n\n") if e.startswith("data: ")]
    assert "[DONE]" not in events and "[DONE]" not in raw
    last = json.loads(events[-1])
    assert last["error"]["code"] == "budget_exceeded"
    assert last["error"]["type"] == "insufficient_quota"
    content = [json.loads(e) for e in events[:-1]]
    assert all("error" not in c for c in content)
    assert sum(1 for c in content if c.get("choices") and c["choices"][0]["delta"].get("content")) > 100

    (row,) = gateway_rows(gw)
    assert row["error_code"] == "budget_exceeded"
    spent = ledger_spent(gw, line_key(0, "key", "cfg:all", "daily"))
    assert spent == row["cost_micros"] <= limit_micros + 4


def test_concurrent_streams_together_stay_within_the_budget(start, gateway_rows) -> None:
    """Several streams share one budget: holds are extended atomically, so the total overshoot is
    at most one chunk per stream in flight."""
    limit_micros, n = 1500, 4
    gw, client = start([{"scope": "team", "period": "daily", "limit_usd": limit_micros / 1e6}])

    def one() -> str:
        try:
            for _ in client.chat.completions.create(
                    model="chat-a", messages=MESSAGES, stream=True, extra_body={"sim_output_tokens": 2000}):
                pass
        except openai.APIError as exc:
            return str(exc.code)
        return "done"

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        outcomes = list(pool.map(lambda _: one(), range(n)))
    assert outcomes.count("budget_exceeded") >= 1
    rows = gateway_rows(gw)
    spent = ledger_spent(gw, line_key(0, "team", "team-all", "daily"))
    assert spent == sum(r["cost_micros"] or 0 for r in rows)
    assert spent <= limit_micros + n * 4


def test_unary_request_is_clamped_to_what_the_budget_can_pay(start, gateway_rows) -> None:
    limit_micros = 250  # the prompt (reserved with a margin) plus about 115 output tokens
    gw, client = start([{"scope": "key", "period": "daily", "limit_usd": limit_micros / 1e6}])
    raw = chat_raw(client, max_tokens=100_000, extra_body={"sim_output_tokens": 5000})
    assert raw.http_response.status_code == 200
    clamped = int(raw.headers["x-setpoint-budget-clamped"])
    assert 80 <= clamped <= 125
    resp = raw.parse()
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == clamped

    (row,) = gateway_rows(gw)
    assert row["status"] == 200 and row["finish_reason"] == "length"
    assert annotations(row).get("budget") == f"clamped:{clamped}"
    assert 0 < row["cost_micros"] <= limit_micros
    assert ledger_spent(gw, line_key(0, "key", "cfg:all", "daily")) == row["cost_micros"]

    # What is left cannot pay for a useful answer: refused rather than clamped to a few tokens.
    with pytest.raises(openai.RateLimitError) as info:
        chat_raw(client, max_tokens=100_000)
    assert info.value.code == "budget_exceeded"


def test_unary_request_that_fits_is_not_clamped(start) -> None:
    gw, client = start([{"scope": "key", "period": "daily", "limit_usd": 1.0}])
    raw = chat_raw(client, max_tokens=50)
    assert "x-setpoint-budget-clamped" not in raw.headers
    assert raw.parse().choices[0].finish_reason == "stop"


# -- soft budgets ---------------------------------------------------------------------------------


def test_soft_budget_never_refuses_but_flags_the_overrun(start, gateway_rows) -> None:
    gw, client = start([{"scope": "team", "period": "daily", "limit_usd": 0.00005, "hard": False}])
    for _ in range(4):
        raw = chat_raw(client, max_tokens=100_000, extra_body={"sim_output_tokens": 30})
        assert raw.http_response.status_code == 200
        assert "x-setpoint-budget-clamped" not in raw.headers  # soft: no clamp either
    rows = gateway_rows(gw)
    key = line_key(0, "team", "team-all", "daily")
    total = ledger_spent(gw, key)
    assert total == sum(r["cost_micros"] for r in rows) > 50 * 4
    flagged = [annotations(r).get("soft_budget_exceeded") for r in rows]
    assert all(f == [key] for f in flagged), flagged


def test_soft_budget_below_its_limit_is_not_flagged(start, gateway_rows) -> None:
    gw, client = start([{"scope": "team", "period": "daily", "limit_usd": 10.0, "hard": False}])
    chat_raw(client)
    (row,) = gateway_rows(gw)
    assert "soft_budget_exceeded" not in annotations(row)


# -- run-scoped budgets ---------------------------------------------------------------------------


def test_run_budget_isolates_runs(start, gateway_rows) -> None:
    gw, client = start([{"scope": "run", "period": "total", "limit_usd": 0.0002}])

    def call(run: str | None) -> str:
        headers = {"X-Setpoint-Run-Id": run} if run else {}
        try:
            chat_raw(client, max_tokens=20, extra_body={"sim_output_tokens": 20}, extra_headers=headers)
            return "ok"
        except openai.RateLimitError as exc:
            return str(exc.code)

    outcomes_a = []
    for _ in range(20):
        outcomes_a.append(call("run-a"))
        if outcomes_a[-1] != "ok":
            break
    assert outcomes_a[-1] == "budget_exceeded" and outcomes_a.count("ok") >= 2
    assert call("run-b") == "ok"  # a fresh run has its own budget
    assert call("run-a") == "budget_exceeded"
    for _ in range(len(outcomes_a) + 1):
        assert call(None) == "ok"  # no run id: the run budget does not apply
    spent_a = ledger_spent(gw, line_key(0, "run", "run-a", "total"))
    spent_b = ledger_spent(gw, line_key(0, "run", "run-b", "total"))
    assert 0 < spent_a <= 200 and 0 < spent_b < spent_a


# -- degradation ----------------------------------------------------------------------------------


def test_degrade_to_a_cheaper_model_when_the_budget_runs_low(start, gateway_rows) -> None:
    gw, client = start([{"scope": "key", "period": "daily", "limit_usd": 0.001,
                         "degrade_to": "chat-cheap", "degrade_below": 0.5}])
    first = chat_raw(client, max_tokens=300, extra_body={"sim_output_tokens": 300})  # ~607 of 1000 micro-dollars
    assert "x-setpoint-degraded" not in first.headers
    assert first.parse().model == "sim-small"
    second = chat_raw(client, max_tokens=300, extra_body={"sim_output_tokens": 300})
    assert second.headers["x-setpoint-degraded"] == "budget; model=chat-cheap"
    assert second.parse().model == "sim-cheap"

    r1, r2 = gateway_rows(gw)
    assert r1["deployment"] == "sim/sim-small" and r2["deployment"] == "sim/sim-cheap"
    assert r2["model"] == "chat-a"  # what the client asked for
    assert annotations(r2)["degraded"] == "budget:chat-a->chat-cheap"
    assert r2["cost_micros"] < r1["cost_micros"] / 5  # billed at the cheaper price


# -- store failures -------------------------------------------------------------------------------


def test_hard_budget_fails_closed_when_the_store_is_down(start, free_port, gateway_rows) -> None:
    gw, client = start([{"scope": "team", "period": "daily", "limit_usd": 1.0}],
                       state_url=f"redis://127.0.0.1:{free_port()}/0")
    t = time.monotonic()
    with pytest.raises(openai.InternalServerError) as info:
        chat_raw(client)
    assert time.monotonic() - t < 5
    assert info.value.status_code == 503 and info.value.code == "state_backend_unavailable"
    (row,) = gateway_rows(gw)
    assert row["status"] == 503 and row["error_code"] == "state_backend_unavailable"


def test_budget_with_on_store_error_open_serves_when_the_store_is_down(start, free_port, gateway_rows) -> None:
    gw, client = start([{"scope": "team", "period": "daily", "limit_usd": 1.0, "on_store_error": "open"}],
                       state_url=f"redis://127.0.0.1:{free_port()}/0")
    raw = chat_raw(client)
    assert raw.http_response.status_code == 200 and raw.parse().choices[0].message.content
    (row,) = gateway_rows(gw)
    assert row["status"] == 200
    assert annotations(row).get("budget") == "store_unavailable"


def test_soft_budget_fails_open_by_default(start, free_port) -> None:
    gw, client = start([{"scope": "team", "period": "daily", "limit_usd": 1.0, "hard": False}],
                       state_url=f"redis://127.0.0.1:{free_port()}/0")
    assert chat_raw(client).http_response.status_code == 200


# -- client disconnect ----------------------------------------------------------------------------


def test_client_disconnect_mid_stream_is_billed_for_what_was_generated(
    start, keys, sim_provider, gateway_rows, wait_until
) -> None:
    slow = sim_provider(latency={"ttft_ms": 1, "per_token_ms": 20, "jitter": 0})
    gw, _ = start([{"scope": "team", "period": "daily", "limit_usd": 10.0}], provider=slow)
    total = 2000  # 40 s at 20 ms per token: the client leaves long before the end
    body = {"model": "chat-a", "messages": MESSAGES, "stream": True, "sim_output_tokens": total}
    seen = 0
    with httpx.Client(timeout=20.0, trust_env=False) as http:
        with http.stream("POST", gw.base_url + "/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {keys.all}"}) as resp:
            assert resp.status_code == 200
            for event_line in resp.iter_lines():
                if event_line.startswith("data: {") and '"content":"' in event_line:
                    seen += 1
                    if seen >= 5:
                        break
    left_at = time.monotonic()  # the connection is closed here

    rows: list[dict[str, Any]] = []

    def recorded() -> bool:
        rows[:] = gateway_rows(gw)
        return bool(rows)

    wait_until(recorded, 10, "the disconnected stream's record")
    assert time.monotonic() - left_at < 5  # noticed promptly, not at the end of the 40 s answer
    (row,) = rows
    assert row["status"] == 499 and row["error_code"] == "client_disconnected"
    assert seen <= row["completion_tokens"] < total // 4
    assert row["cost_micros"] == row["prompt_tokens"] * 1 + row["completion_tokens"] * 2 > 0
    assert annotations(row).get("usage_counted_by_gateway") is True
    assert ledger_spent(gw, line_key(0, "team", "team-all", "daily")) == row["cost_micros"]


# -- the deployment that actually serves ----------------------------------------------------------


def test_unary_reservation_covers_the_deployment_that_actually_serves(
    make_gateway, default_config, make_client, sim_provider, gateway_rows
) -> None:
    cfg = default_config()
    cfg["state"] = {"url": "memory://"}
    cfg["providers"]["down"] = sim_provider(faults={"unavailable": 1.0})
    cfg["models"]["multi"] = {"strategy": "fallback", "deployments": [
        {"provider": "down", "model": "sim-cheap", "pricing": {"input_per_mtok": 0.1, "output_per_mtok": 0.2}},
        {"provider": "sim", "model": "sim-dear", "pricing": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}},
    ]}
    limit_micros = 250
    cfg["budgets"] = [{"scope": "key", "period": "daily", "limit_usd": limit_micros / 1e6}]
    gw = make_gateway(cfg)
    client = make_client(gw.base_url)
    try:
        client.chat.completions.create(model="multi", messages=MESSAGES, max_tokens=500,
                                       extra_body={"sim_output_tokens": 500})
    except openai.RateLimitError as exc:  # refusing it would be correct too
        assert exc.code == "budget_exceeded"
    (row,) = gateway_rows(gw)
    spent = ledger_spent(gw, line_key(0, "key", "cfg:all", "daily"))
    assert spent == (row["cost_micros"] or 0)
    assert spent <= limit_micros, f"a unary request overshot the hard budget: {spent} > {limit_micros}"


# -- budget windows ---------------------------------------------------------------------------------

_JAN_31_2027 = 1_801_353_600.0  # 2027-01-31 00:00:00 UTC


@pytest.mark.parametrize(("now", "daily", "daily_ttl", "monthly", "monthly_ttl"), [
    (_JAN_31_2027, "d2027-01-31", 2 * 86_400, "m2027-01", 3 * 86_400),
    (_JAN_31_2027 + 86_399.5, "d2027-01-31", 86_400.5, "m2027-01", 2 * 86_400 + 0.5),
    (_JAN_31_2027 + 86_400, "d2027-02-01", 2 * 86_400, "m2027-02", 30 * 86_400),  # February 2027: 28 days
    (_JAN_31_2027 - 0.25, "d2027-01-30", 86_400.25, "m2027-01", 3 * 86_400 + 0.25),
])
def test_period_window_at_day_and_month_boundaries(now: float, daily: str, daily_ttl: float, monthly: str,
                                                   monthly_ttl: float) -> None:
    # Twice each: the second answer comes from the per-day memo and must not differ.
    for _ in range(2):
        assert period_window("daily", now) == (daily, pytest.approx(daily_ttl))
        assert period_window("monthly", now) == (monthly, pytest.approx(monthly_ttl))
    assert period_window("total", now) == ("total", 10 * 365 * 86_400)
