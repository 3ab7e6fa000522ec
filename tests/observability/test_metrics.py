"""`/metrics` and `x-setpoint-overhead-ms` against a real gateway driven by the official SDK."""

from __future__ import annotations

import os
from typing import Any

import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from setpoint.observability.metrics import merge_snapshots, read_peer_snapshots, write_snapshot

MESSAGES = [{"role": "user", "content": "What is a set point?"}]


def scrape(http: Any, gw: Any, **headers: str) -> dict[str, list[Any]]:
    resp = http.get(gw.root_url + "/metrics", headers=headers)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    return {fam.name: fam.samples for fam in text_string_to_metric_families(resp.text)}


def value(fams: dict[str, list[Any]], sample: str, **labels: str) -> float:
    """Sum of the samples named `sample` whose labels include `labels`."""
    family = sample.removesuffix("_total").removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")
    total, found = 0.0, False
    for s in fams.get(family, []):
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
            total += s.value
            found = True
    assert found, f"no sample {sample} with {labels}; have {[(s.name, s.labels) for s in fams.get(family, [])][:10]}"
    return total


def test_request_counters_tokens_cost_and_histograms(gateway, client, http, gateway_rows) -> None:
    for _ in range(3):
        client.chat.completions.create(model="chat-a", messages=MESSAGES)
    chunks = list(client.chat.completions.create(model="chat-a", messages=MESSAGES, stream=True,
                                                 stream_options={"include_usage": True}))
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(model="chat-a", messages=MESSAGES, extra_body={"sim_fault": "server_error"})

    rows = gateway_rows(gateway)
    fams = scrape(http, gateway)

    ok = value(fams, "setpoint_requests_total", model="chat-a", deployment="sim/sim-small", status="200")
    assert ok == 4
    assert value(fams, "setpoint_requests_total", model="no-such-model", code="model_not_found") == 1
    failed = [r for r in rows if r["model"] == "chat-a" and r["status"] >= 500]
    assert len(failed) == 1
    assert value(fams, "setpoint_requests_total", model="chat-a", status=str(failed[0]["status"]),
                 code=failed[0]["error_code"]) == 1

    # Tokens and cost equal what the request log recorded (the same numbers, two views).
    ok_rows = [r for r in rows if r["status"] == 200]
    assert value(fams, "setpoint_tokens_total", model="chat-a", kind="prompt") == sum(r["prompt_tokens"] for r in ok_rows)
    assert value(fams, "setpoint_tokens_total", model="chat-a", kind="completion") == sum(
        r["completion_tokens"] for r in ok_rows)
    cost = value(fams, "setpoint_cost_usd_total", model="chat-a", deployment="sim/sim-small")
    assert cost == pytest.approx(sum(r["cost_micros"] for r in ok_rows) / 1e6)
    assert cost > 0

    # Histograms: every request observed once (4 served + 1 failed upstream); +Inf equals the count.
    assert value(fams, "setpoint_request_duration_seconds_count", model="chat-a", deployment="sim/sim-small") == 5
    assert value(fams, "setpoint_request_duration_seconds_bucket", model="chat-a", deployment="sim/sim-small",
                 le="+Inf") == 5
    assert value(fams, "setpoint_ttft_seconds_count", model="chat-a") == 1  # only the stream has a TTFT
    assert value(fams, "setpoint_overhead_seconds_count", endpoint="chat") == 6
    assert value(fams, "setpoint_upstream_attempts_total", deployment="sim/sim-small") >= 5
    assert len(chunks) > 1

    # Live state: the breaker of the deployment that served is closed, its limiter exists.
    assert value(fams, "setpoint_breaker_state", deployment="sim/sim-small") == 0
    assert value(fams, "setpoint_concurrency_limit", deployment="sim/sim-small") >= 1
    assert value(fams, "setpoint_inflight", deployment="sim/sim-small") == 0
    assert "setpoint_spool_pending_bytes" in fams
    assert 0 <= value(fams, "setpoint_spool_lag_seconds") < 60
    assert value(fams, "setpoint_retry_budget_available") > 0


def test_overhead_header_unary_stream_and_error(gateway, client, http) -> None:
    raw = client.chat.completions.with_raw_response.create(model="chat-a", messages=MESSAGES)
    overhead = float(raw.headers["x-setpoint-overhead-ms"])
    assert overhead >= 0
    # Overhead excludes the upstream wait, so it is below the whole request time the gateway logged.
    with client.chat.completions.with_streaming_response.create(model="chat-a", messages=MESSAGES, stream=True) as s:
        assert float(s.headers["x-setpoint-overhead-ms"]) >= 0
        assert list(s.iter_lines())
    resp = http.post(gateway.base_url + "/chat/completions", content=b"{not json",
                     headers={"Authorization": "Bearer " + client.api_key})
    assert resp.status_code == 400
    assert float(resp.headers["x-setpoint-overhead-ms"]) >= 0


def test_overhead_is_request_time_minus_upstream_time(make_gateway, default_config, sim_provider, make_client,
                                                      gateway_rows) -> None:
    """With a slow upstream (200 ms to first token) the overhead must not include that wait."""
    cfg = default_config()
    cfg["providers"]["sim"] = sim_provider(latency={"ttft_ms": 200, "per_token_ms": 0.05, "jitter": 0})
    gw = make_gateway(cfg)
    client = make_client(gw.base_url)
    raw = client.chat.completions.with_raw_response.create(model="chat-a", messages=MESSAGES)
    overhead = float(raw.headers["x-setpoint-overhead-ms"])
    row = gateway_rows(gw)[0]
    assert row["latency_ms"] >= 200
    assert overhead < row["latency_ms"] - 150  # the 200 ms upstream wait is not counted


def test_overhead_header_can_be_turned_off(make_gateway, default_config, make_client) -> None:
    cfg = default_config()
    cfg["observability"] = {"overhead_header": False}
    gw = make_gateway(cfg)
    raw = make_client(gw.base_url).chat.completions.with_raw_response.create(model="chat-a", messages=MESSAGES)
    assert "x-setpoint-overhead-ms" not in raw.headers


def test_cache_hits_and_savings_are_counted(make_gateway, default_config, make_client, http) -> None:
    cfg = default_config()
    cfg["models"]["chat-a"]["cache"] = {"ttl_s": 60}
    gw = make_gateway(cfg)
    client = make_client(gw.base_url)
    first = client.chat.completions.create(model="chat-a", messages=MESSAGES, temperature=0)
    for _ in range(2):
        client.chat.completions.create(model="chat-a", messages=MESSAGES, temperature=0)
    assert gw.flush_log(10)
    fams = scrape(http, gw)
    assert value(fams, "setpoint_cache_requests_total", model="chat-a", result="miss") == 1
    assert value(fams, "setpoint_cache_requests_total", model="chat-a", result="hit") == 2
    assert first.usage is not None
    saved = value(fams, "setpoint_cache_saved_usd_total", model="chat-a")
    charged = value(fams, "setpoint_cost_usd_total", model="chat-a")
    assert saved == pytest.approx(2 * charged)  # each hit saved what the one miss cost


def test_metrics_can_require_the_master_key(make_gateway, default_config, http, keys) -> None:
    cfg = default_config()
    cfg["observability"] = {"metrics_auth": "master_key"}
    gw = make_gateway(cfg)
    refused = http.get(gw.root_url + "/metrics")
    assert refused.status_code == 401
    assert refused.json()["error"]["type"]
    wrong = http.get(gw.root_url + "/metrics", headers={"Authorization": "Bearer " + keys.all})
    assert wrong.status_code == 401
    assert "setpoint_requests" in http.get(gw.root_url + "/metrics",
                                           headers={"Authorization": "Bearer " + keys.master}).text


def test_metrics_can_be_turned_off(make_gateway, default_config, http) -> None:
    cfg = default_config()
    cfg["observability"] = {"metrics": False}
    gw = make_gateway(cfg)
    assert http.get(gw.root_url + "/metrics").status_code == 404


def test_worker_snapshots_merge_counters_and_label_gauges(tmp_path) -> None:
    """Two workers' numbers: counters and histogram buckets add up, gauges stay per worker."""
    a = {"counters": {"setpoint_requests": {"m\x1fd\x1f200\x1f": 3}}, "histograms": {"h": {"m": [1, 0, 2, 0.5]}},
         "gauges": {"setpoint_inflight": {"d": 2}}}
    b = {"counters": {"setpoint_requests": {"m\x1fd\x1f200\x1f": 4, "m\x1fd\x1f500\x1fx": 1}},
         "histograms": {"h": {"m": [0, 1, 1, 0.25]}}, "gauges": {"setpoint_inflight": {"d": 5}}}
    merged = merge_snapshots([(11, a), (12, b)])
    assert merged["counters"]["setpoint_requests"] == {"m\x1fd\x1f200\x1f": 7, "m\x1fd\x1f500\x1fx": 1}
    assert merged["histograms"]["h"]["m"] == [1, 1, 3, 0.75]
    assert merged["gauges"]["setpoint_inflight"] == {"d\x1f11": 2, "d\x1f12": 5}

    # Files: our own pid is skipped, a dead pid's file is removed, a live peer is read.
    write_snapshot(tmp_path, a)  # written under our own pid
    (tmp_path / "999999999.json").write_bytes(orjson.dumps(b))  # no such process
    parent = os.getppid()
    (tmp_path / f"{parent}.json").write_bytes(orjson.dumps(b))
    peers = dict(read_peer_snapshots(tmp_path))
    assert list(peers) == [parent]
    assert not (tmp_path / "999999999.json").exists()
    assert (tmp_path / f"{os.getpid()}.json").exists()


def test_two_workers_one_scrape_counts_every_request(serve_gateway, default_config, make_client, keys, http,
                                                     wait_until) -> None:
    """`serve --workers 2`: whichever worker answers the scrape reports both workers' requests."""
    from concurrent.futures import ThreadPoolExecutor

    srv = serve_gateway(default_config(), workers=2)
    client = make_client(srv.base_url, keys.all, timeout=30.0)
    n = 40
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda i: client.chat.completions.create(
            model="chat-a", messages=[{"role": "user", "content": f"q {i}"}], extra_body={"sim_output_tokens": 2}),
            range(n)))

    def total() -> float:
        text = http.get(srv.root_url + "/metrics").text
        fams = {f.name: f.samples for f in text_string_to_metric_families(text)}
        return sum(s.value for s in fams["setpoint_requests"] if s.name == "setpoint_requests_total")

    def workers() -> set[str]:
        text = http.get(srv.root_url + "/metrics").text
        return {s.labels.get("worker", "") for f in text_string_to_metric_families(text)
                if f.name == "setpoint_retry_budget_available" for s in f.samples}

    # Snapshots are published every 2 s; every scrape, from either worker, converges on n and on
    # gauges labelled by both workers (a worker may still be starting when the load begins).
    seen: list[tuple[float, int]] = []

    def converged() -> bool:
        seen.append((total(), len(workers())))
        return seen[-1] == (n, 2)

    try:
        wait_until(converged, 45, f"a scrape to report all {n} requests from 2 workers")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; (total, workers) seen: {seen[-10:]}; log: {srv.proc.output()[-2000:]}") from None
    for _ in range(6):
        assert total() == n
        assert len(workers()) == 2


def test_budget_gauges_show_limit_and_remaining(make_gateway, default_config, make_client, http, gateway_rows,
                                                keys) -> None:
    cfg = default_config()
    cfg["budgets"] = [{"scope": "team", "period": "daily", "limit_usd": 5.0},
                      {"scope": "key", "name": "limited", "period": "monthly", "limit_usd": 2.0}]
    gw = make_gateway(cfg)
    make_client(gw.base_url, keys.all).chat.completions.create(model="chat-a", messages=MESSAGES)
    rows = gateway_rows(gw)
    fams = scrape(http, gw)
    spent = rows[0]["cost_micros"]
    assert spent > 0
    assert value(fams, "setpoint_budget_limit_usd", scope="team", entity="team-all", period="daily") == 5.0
    assert value(fams, "setpoint_budget_remaining_usd", scope="team", entity="team-all", period="daily") == (
        pytest.approx((5_000_000 - spent) / 1e6))
    # A named budget is reported before it is used.
    assert value(fams, "setpoint_budget_remaining_usd", scope="key", entity="limited", period="monthly") == 2.0


def test_requests_the_edge_refuses_before_parsing_are_counted(gateway, http) -> None:
    """Malformed HTTP never becomes a request (so it has no record); the edge counts each refusal by
    status and code instead, so garbage traffic is visible."""
    import socket  # noqa: PLC0415

    port = int(gateway.root_url.rsplit(":", 1)[1])
    garbage = {
        b"GET /v1/models HTTP/1.1\r\nX-Foo bar\r\n\r\n": 1,  # a header line without a colon: 400
        b"GET /v1/models HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n": 1,  # 431
        b"GET /v1/models HTTP/1.1\r\n\r\n": 2,  # HTTP/1.1 without Host: 400
    }
    for data, times in garbage.items():
        for _ in range(times):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(data)
                answer = b""
                while chunk := s.recv(65536):
                    answer += chunk
                assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 431")), answer[:100]
    fams = scrape(http, gateway)
    assert value(fams, "setpoint_http_refusals_total", status="400", code="invalid_request") == 3
    assert value(fams, "setpoint_http_refusals_total", status="431", code="request_headers_too_large") == 1
