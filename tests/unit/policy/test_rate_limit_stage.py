"""The `rate_limit` stage through the real gateway (simulated upstream, memory:// state) and the
official openai SDK: request and token buckets per key/team/user/model/deployment, OpenAI-style
headers, reserve-then-settle of token estimates, and refunds for requests that never ran."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import openai
import pytest

MESSAGES = [{"role": "user", "content": "Say something short."}]
SECOND_TEAM_ALL_KEY = "sk-test-second-team-all-0123"  # another key of team-all


@pytest.fixture
def start(make_gateway: Callable[[dict[str, Any]], Any], default_config: Callable[..., dict[str, Any]],
          make_client: Callable[..., openai.OpenAI]) -> Callable[..., tuple[Any, Callable[..., openai.OpenAI]]]:
    """`start(rate_limits, budgets=[])` -> (gateway, client(api_key=ALL_KEY)) on memory:// state."""

    def run(rate_limits: list[dict[str, Any]], budgets: list[dict[str, Any]] | None = None):
        cfg = default_config()
        cfg["state"] = {"url": "memory://"}
        cfg["keys"].append({"name": "all2", "key": SECOND_TEAM_ALL_KEY, "team": "team-all"})
        cfg["rate_limits"] = rate_limits
        cfg["budgets"] = budgets or []
        gw = make_gateway(cfg)

        def client(api_key: str | None = None) -> openai.OpenAI:
            return make_client(gw.base_url, api_key) if api_key else make_client(gw.base_url)

        return gw, client

    return run


def chat(client: openai.OpenAI, model: str = "chat-a", **kw: Any) -> Any:
    """A unary chat through the SDK; returns the raw response (headers + parsed body)."""
    return client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES, **kw)


def refused(client: openai.OpenAI, model: str = "chat-a", **kw: Any) -> openai.RateLimitError:
    with pytest.raises(openai.RateLimitError) as info:
        chat(client, model, **kw)
    return info.value


def ok(client: openai.OpenAI, model: str = "chat-a", **kw: Any) -> Any:
    raw = chat(client, model, **kw)
    assert raw.http_response.status_code == 200
    return raw


# -- requests per minute --------------------------------------------------------------------------


def test_rpm_per_key_refuses_request_n_plus_1_openai_style(start, keys) -> None:
    gw, client = start([{"scope": "key", "rpm": 3}])
    c = client()
    remaining = []
    for _ in range(3):
        raw = ok(c)
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
        remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
        assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
    assert remaining == [2, 1, 0]

    err = refused(c)
    assert err.status_code == 429
    assert err.code == "rate_limited"
    body = err.body if isinstance(err.body, dict) else {}
    assert body.get("type") == "rate_limit_error" and body.get("code") == "rate_limited"
    assert isinstance(body.get("message"), str) and body["message"]
    h = err.response.headers
    retry_after = int(h["Retry-After"])
    assert 1 <= retry_after <= 21  # one request refills in 60/3 = 20 s
    assert h["x-ratelimit-limit-requests"] == "3"
    assert h["x-ratelimit-remaining-requests"] == "0"
    reset = float(h["x-ratelimit-reset-requests"].rstrip("s"))
    assert 0 < reset <= 60
    assert h.get("x-request-id", "").startswith("req_")

    # Another key has its own bucket.
    ok(client(keys.limited))


def test_rpm_refusal_is_recorded(start, gateway_rows) -> None:
    gw, client = start([{"scope": "key", "rpm": 1}])
    c = client()
    ok(c)
    refused(c)
    rows = gateway_rows(gw)
    assert [(r["status"], r["error_code"]) for r in rows] == [(200, None), (429, "rate_limited")]
    assert rows[1]["completion_tokens"] == 0 and not rows[1]["cost_micros"]  # never reached the upstream


def test_rate_limit_headers_on_streams(start) -> None:
    gw, client = start([{"scope": "key", "rpm": 2}])
    c = client()
    with c.chat.completions.with_streaming_response.create(model="chat-a", messages=MESSAGES, stream=True) as resp:
        assert resp.headers["x-ratelimit-remaining-requests"] == "1"
        text = "".join(ch.choices[0].delta.content or "" for ch in resp.parse() if ch.choices)
    assert text
    ok(c)
    err = refused(c, stream=True)
    assert err.code == "rate_limited"


# -- tokens per minute ----------------------------------------------------------------------------


def test_tpm_reserves_max_tokens_and_settles_actual_usage(start) -> None:
    tpm = 1000
    gw, client = start([{"scope": "key", "tpm": tpm}])
    c = client()
    raw1 = ok(c, max_tokens=800)
    rem1 = int(raw1.headers["x-ratelimit-remaining-tokens"])
    assert raw1.headers["x-ratelimit-limit-tokens"] == str(tpm)
    reserved1 = tpm - rem1
    assert 800 < reserved1 < 850  # prompt (gateway tokenizer) + max_tokens
    used1 = raw1.parse().usage.total_tokens
    assert used1 < reserved1 - 700  # the simulated answer is short
    t1 = time.monotonic()

    # Without settlement this would not fit (rem1 < 800); with it, the unused 800-odd came back.
    raw2 = ok(c, max_tokens=800)
    elapsed = time.monotonic() - t1
    rem2 = int(raw2.headers["x-ratelimit-remaining-tokens"])
    expected = tpm - used1 - reserved1  # both reservations the same size, the first settled to usage
    assert expected - 1 <= rem2 <= expected + elapsed * tpm / 60 + 1

    # The remaining header goes back up once the second one settles too.
    raw3 = ok(c, max_tokens=1)
    rem3 = int(raw3.headers["x-ratelimit-remaining-tokens"])
    assert rem3 > rem2 + 700


def test_tpm_refuses_what_cannot_fit_and_retry_after_reflects_the_shortfall(start) -> None:
    gw, client = start([{"scope": "key", "tpm": 600}])
    c = client()
    err = refused(c, max_tokens=5000)  # can never fit in one minute's capacity
    assert err.code == "rate_limited"
    assert int(err.response.headers["Retry-After"]) >= 1
    raw = ok(c, max_tokens=100)  # the refused request took nothing
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) >= 600 - 100 - 40


def test_output_tpm_uses_the_learned_estimate_without_max_tokens(start) -> None:
    # No max_tokens: the reservation is the estimator's default (256) until it has history.
    gw, client = start([{"scope": "key", "output_tpm": 1000}])
    c = client()
    raw = ok(c)
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) == 1000 - 256


# -- scopes ---------------------------------------------------------------------------------------


def test_team_scope_is_shared_by_the_team_keys_only(start, keys) -> None:
    gw, client = start([{"scope": "team", "rpm": 2}])
    ok(client(keys.all))
    ok(client(SECOND_TEAM_ALL_KEY))
    assert refused(client(keys.all)).code == "rate_limited"
    assert refused(client(SECOND_TEAM_ALL_KEY)).code == "rate_limited"
    ok(client(keys.limited))  # team-limited has its own bucket


def test_user_scope_from_body_field_and_header(start, make_client) -> None:
    gw, client = start([{"scope": "user", "rpm": 2}])
    c = client()
    ok(c, user="alice")
    # The header names the same user as the body field: one bucket.
    raw = c.chat.completions.with_raw_response.create(
        model="chat-a", messages=MESSAGES, extra_headers={"x-setpoint-user": "alice"})
    assert raw.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused(c, user="alice").code == "rate_limited"
    with pytest.raises(openai.RateLimitError):
        c.chat.completions.create(model="chat-a", messages=MESSAGES, extra_headers={"x-setpoint-user": "alice"})
    # The header wins over the body field.
    raw = c.chat.completions.with_raw_response.create(
        model="chat-a", messages=MESSAGES, user="alice", extra_headers={"x-setpoint-user": "bob"})
    assert raw.headers["x-ratelimit-remaining-requests"] == "1"
    ok(c, user="carol")
    # No user at all: the user scope does not apply (no limit, no headers).
    for _ in range(3):
        raw = ok(c)
        assert "x-ratelimit-limit-requests" not in raw.headers


def test_model_scope_isolates_aliases(start) -> None:
    gw, client = start([{"scope": "model", "rpm": 1}])
    c = client()
    ok(c, "chat-a")
    assert refused(c, "chat-a").code == "rate_limited"
    ok(c, "chat-b")
    assert refused(c, "chat-b").code == "rate_limited"


def test_named_deployment_scope_limits_only_that_deployment(start) -> None:
    gw, client = start([{"scope": "deployment", "name": "sim/sim-small", "rpm": 1}])
    c = client()
    ok(c, "chat-a")  # chat-a -> sim/sim-small
    err = refused(c, "chat-a")
    assert err.code == "rate_limited"
    for _ in range(3):
        raw = ok(c, "chat-b")  # sim/sim-large: not named, not limited
        assert "x-ratelimit-limit-requests" not in raw.headers


def test_deployment_scope_isolates_deployments(start) -> None:
    gw, client = start([{"scope": "deployment", "rpm": 2}])
    c = client()
    ok(c, "chat-a")
    ok(c, "chat-a")
    assert refused(c, "chat-a").code == "rate_limited"
    raw = ok(c, "chat-b")
    assert raw.headers["x-ratelimit-remaining-requests"] == "1"


def test_all_buckets_of_a_request_are_taken_together(start, keys) -> None:
    # A key limit and a model limit: a request refused by the model limit takes nothing from the key.
    gw, client = start([{"scope": "key", "rpm": 3}, {"scope": "model", "name": "chat-b", "rpm": 1}])
    c = client()
    ok(c, "chat-b")
    assert refused(c, "chat-b").code == "rate_limited"
    assert refused(c, "chat-b").code == "rate_limited"
    raw = ok(c, "chat-a")
    assert raw.headers["x-ratelimit-remaining-requests"] == "1"  # 3 - chat-b - this one
    ok(c, "chat-a")
    assert refused(c, "chat-a").code == "rate_limited"


# -- store failures -------------------------------------------------------------------------------


def _down_store_gateway(make_gateway, default_config, free_port, rule: dict[str, Any]) -> Any:
    cfg = default_config()
    cfg["state"] = {"url": f"redis://127.0.0.1:{free_port()}/0"}  # nothing listens there
    cfg["rate_limits"] = [rule]
    return make_gateway(cfg)


def test_rate_limit_fails_open_by_default_when_the_store_is_down(
    make_gateway, default_config, free_port, make_client, gateway_rows
) -> None:
    gw = _down_store_gateway(make_gateway, default_config, free_port, {"scope": "key", "rpm": 1})
    c = make_client(gw.base_url)
    for _ in range(3):  # more than the limit: nothing can be counted, everything is served
        raw = ok(c)
        assert "x-ratelimit-limit-requests" not in raw.headers
    rows = gateway_rows(gw)
    assert [json.loads(r["annotations"]).get("rate_limit") for r in rows] == ["store_unavailable"] * 3


def test_rate_limit_on_store_error_closed_refuses_with_503(
    make_gateway, default_config, free_port, make_client
) -> None:
    gw = _down_store_gateway(make_gateway, default_config, free_port,
                             {"scope": "key", "rpm": 100, "on_store_error": "closed"})
    with pytest.raises(openai.InternalServerError) as info:
        chat(make_client(gw.base_url))
    assert info.value.status_code == 503 and info.value.code == "state_backend_unavailable"


# -- interplay with budgets -----------------------------------------------------------------------


def test_request_refused_by_a_budget_does_not_consume_the_rpm_slot(start, gateway_rows) -> None:
    # User "broke" has a budget that cannot pay for any request; the key has 2 requests per minute.
    gw, client = start(
        [{"scope": "key", "rpm": 2}],
        budgets=[{"scope": "user", "name": "broke", "period": "daily", "limit_usd": 0.00001}],
    )
    c = client()
    for _ in range(5):
        err = refused(c, user="broke")
        assert err.code == "budget_exceeded"  # not rate_limited: each refusal gave its slot back
    ok(c)
    ok(c)
    assert refused(c).code == "rate_limited"
    codes = [r["error_code"] for r in gateway_rows(gw)]
    assert codes == ["budget_exceeded"] * 5 + [None, None, "rate_limited"]


def test_deployment_scope_charges_the_deployment_that_actually_serves(
    make_gateway, default_config, make_client, gateway_rows
) -> None:
    """Regression: the deployment-scope bucket must be the one of the deployment that serves, not
    route.deployments[0] (here the `cost` strategy tries the cheap deployment, listed second, first)."""
    cfg = default_config()
    cfg["state"] = {"url": "memory://"}
    cfg["models"]["multi"] = {"strategy": "cost", "deployments": [
        {"provider": "sim", "model": "sim-dear", "pricing": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}},
        {"provider": "sim", "model": "sim-cheap", "pricing": {"input_per_mtok": 0.1, "output_per_mtok": 0.2}},
    ]}
    cfg["rate_limits"] = [{"scope": "deployment", "name": "sim/sim-cheap", "rpm": 1}]
    gw = make_gateway(cfg)
    c = make_client(gw.base_url)
    outcomes = []
    for _ in range(3):
        try:
            ok(c, "multi")
            outcomes.append("ok")
        except openai.RateLimitError as exc:
            outcomes.append(str(exc.code))
    rows = gateway_rows(gw)
    served_by = [r["deployment"] for r in rows if r["status"] == 200]
    assert served_by[0] == "sim/sim-cheap"  # the strategy's first choice
    # One request per minute on sim-cheap: the others were refused or went to another deployment.
    assert served_by.count("sim/sim-cheap") == 1, served_by
    assert all(o in ("ok", "rate_limited") for o in outcomes)
