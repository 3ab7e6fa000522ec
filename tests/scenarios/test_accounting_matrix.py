"""Gateway accounting equals the upstream's usage, exactly, case by case.

Upstreams: the in-process simulated provider (its usage is deterministic: prompt = words + 4 per
message, completion = the forced `sim_output_tokens` per choice), `setpoint sim-provider` over HTTP,
and tiny aiohttp upstreams in the test (fixed usage with cached and reasoning tokens; a slow stream
that notices when the gateway hangs up). For every case the request record's prompt / completion /
cached tokens equal what the upstream reported (and what the SDK saw, when it sees usage), and
`cost_micros` equals the cost computed here with integer arithmetic from the configured prices.
A cancelled stream never gets usage: it is billed by the gateway's tokenizer count of what was
generated, and the upstream request is cancelled.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from aiohttp import web

from setpoint.accounting.tokens import count_messages, count_text
from setpoint.providers.simulated.engine import count_prompt_tokens

KEY = "sk-matrix-all-models-0123456789"
OTHER_KEY = "sk-matrix-other-team-0123456789"
MASTER = "mk-matrix-master-key-0123456789"
TEAM, OTHER_TEAM = "team-matrix", "team-other"
PICO = 1_000_000  # pico-dollars per micro-dollar

# USD per million tokens; x 1e6 = pico-dollars per token (integers below, so no float in the check).
CHAT_PRICES = {"input_per_mtok": 1.5, "cached_input_per_mtok": 0.75, "output_per_mtok": 6.0}
CHAT_PICO = {"input": 1_500_000, "cached": 750_000, "output": 6_000_000, "reasoning": 6_000_000}
EMBED_PRICES = {"input_per_mtok": 0.5}  # 3 tokens = 1.5 micro-dollars: checks rounding (half up)
EMBED_PICO = {"input": 500_000, "cached": 500_000, "output": 0, "reasoning": 0}
FIXED_PRICES = {"input_per_mtok": 2.5, "cached_input_per_mtok": 1.25, "output_per_mtok": 10.0, "reasoning_per_mtok": 20.0}
FIXED_PICO = {"input": 2_500_000, "cached": 1_250_000, "output": 10_000_000, "reasoning": 20_000_000}

# The fixed upstream's usage: most of the prompt came from the provider's cache, some output was reasoning.
FIXED_USAGE = {
    "prompt_tokens": 1200, "completion_tokens": 300, "total_tokens": 1500,
    "prompt_tokens_details": {"cached_tokens": 1024},
    "completion_tokens_details": {"reasoning_tokens": 100},
}

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Explain a set point in one line."}]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "number"}}},
    },
}


def expected_cost(prices: dict[str, int], prompt: int, completion: int, cached: int = 0, reasoning: int = 0) -> int:
    """Micro-dollars, rounded half up from exact pico-dollars (the documented rule)."""
    pico = ((prompt - cached) * prices["input"] + cached * prices["cached"]
            + (completion - reasoning) * prices["output"] + reasoning * prices["reasoning"])
    return (pico + PICO // 2) // PICO


def sim_usage(body: dict[str, Any]) -> tuple[int, int]:
    """What the simulated upstream reports for a chat body with `sim_output_tokens` (and no max_tokens)."""
    n = body.get("n") or 1
    return count_prompt_tokens(body), body["sim_output_tokens"] * n


def stream_pieces_tokens(text: str) -> int:
    """Tokenizer count of streamed text, one content chunk at a time (how the gateway counts it):
    the upstreams here send one word per chunk, the first without a leading space."""
    return sum(count_text(p) for p in re.findall(r" ?\S+", text))


# -- tiny upstreams -------------------------------------------------------------------------------


@dataclass
class UpstreamLog:
    bodies: list[dict[str, Any]] = field(default_factory=list)
    written: int = 0  # content chunks written by the slow stream
    disconnected: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)


def _chunk(doc: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(doc) + b"\n\n"


def fixed_usage_app(log: UpstreamLog) -> web.Application:
    """Answers every chat request with the same short text and `FIXED_USAGE`."""

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        log.bodies.append(body)
        base = {"id": "chatcmpl-fixed", "created": 1, "model": body.get("model")}
        if not body.get("stream"):
            return web.json_response({**base, "object": "chat.completion", "usage": FIXED_USAGE, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "cached answer"}, "finish_reason": "stop"}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        base["object"] = "chat.completion.chunk"
        await resp.write(_chunk({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}))
        for piece in ("cached", " answer"):
            await resp.write(_chunk({**base, "choices": [{"index": 0, "delta": {"content": piece}}]}))
        await resp.write(_chunk({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(_chunk({**base, "choices": [], "usage": FIXED_USAGE}))
        await resp.write_eof(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


SLOW_CHUNKS = 150
SLOW_CADENCE_S = 0.02


def slow_stream_app(log: UpstreamLog) -> web.Application:
    """A stream of SLOW_CHUNKS one-token words, one every 20 ms (3 s in all); records how many it wrote
    and whether the gateway went away before the end."""

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        log.bodies.append(body)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        base = {"id": "chatcmpl-slow", "object": "chat.completion.chunk", "created": 1, "model": body.get("model")}
        try:
            await resp.write(_chunk({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}))
            for i in range(SLOW_CHUNKS):
                await asyncio.sleep(SLOW_CADENCE_S)
                await resp.write(_chunk({**base, "choices": [{"index": 0, "delta": {"content": "the" if i == 0 else " the"}}]}))
                log.written += 1
            await resp.write(_chunk({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
            usage = {"prompt_tokens": 9, "completion_tokens": SLOW_CHUNKS, "total_tokens": 9 + SLOW_CHUNKS}
            await resp.write(_chunk({**base, "choices": [], "usage": usage}))
            await resp.write_eof(b"data: [DONE]\n\n")
            log.finished.set()
        except (ConnectionResetError, asyncio.CancelledError):
            log.disconnected.set()
            raise
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


# -- the gateway ----------------------------------------------------------------------------------


@dataclass
class Matrix:
    gw: Any
    client: openai.OpenAI
    rows: Callable[[], list[dict[str, Any]]]
    fixed_log: UpstreamLog
    slow_log: UpstreamLog
    config: dict[str, Any]

    def record(self, request_id: str, timeout_s: float = 10.0) -> dict[str, Any]:
        """The record of one request, waiting (bounded) for it to be spooled and stored."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = [r for r in self.rows() if r["id"] == request_id]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no record for {request_id} after {timeout_s}s")
            time.sleep(0.02)


def matrix_config(data_dir: Path, fixed_url: str, slow_url: str, *, store_content: bool) -> dict[str, Any]:
    sim = {"type": "simulated", "seed": 11, "latency": {"ttft_ms": 1, "per_token_ms": 0.05, "jitter": 0},
           "output": {"min_tokens": 4, "max_tokens": 12}}
    slow_sim = {**sim, "latency": {"ttft_ms": 1, "per_token_ms": 10, "jitter": 0}}
    return {
        "data_dir": str(data_dir),
        "admin": {"master_key": MASTER},
        "logging": {"store_content": store_content, "flush_interval_ms": 20},
        "providers": {
            "sim": sim,
            "slow-sim": slow_sim,
            "fixed": {"type": "openai_compatible", "base_url": fixed_url + "/v1"},
            "slow": {"type": "openai_compatible", "base_url": slow_url + "/v1"},
        },
        "models": {
            "chat": {"deployments": [{"provider": "sim", "model": "sim-chat", "pricing": CHAT_PRICES}]},
            "slow-chat": {"deployments": [{"provider": "slow-sim", "model": "sim-chat", "pricing": CHAT_PRICES}]},
            "embed": {"kind": "embedding", "deployments": [{"provider": "sim", "model": "sim-embed", "pricing": EMBED_PRICES}]},
            "fixed-chat": {"deployments": [{"provider": "fixed", "model": "fixed-1", "pricing": FIXED_PRICES}]},
            "slow-http": {"deployments": [{"provider": "slow", "model": "slow-1", "pricing": CHAT_PRICES}]},
        },
        "keys": [{"name": "matrix", "key": KEY, "team": TEAM}, {"name": "other", "key": OTHER_KEY, "team": OTHER_TEAM}],
    }


def _start(make_gateway, make_client, gateway_rows, serve_app, tmp_path: Path, *, store_content: bool) -> Matrix:
    fixed_log, slow_log = UpstreamLog(), UpstreamLog()
    fixed, slow = serve_app(fixed_usage_app(fixed_log)), serve_app(slow_stream_app(slow_log))
    cfg = matrix_config(tmp_path / ("content" if store_content else "plain"), fixed.url, slow.url, store_content=store_content)
    gw = make_gateway(cfg)
    return Matrix(gw, make_client(gw.base_url, KEY), lambda: gateway_rows(gw), fixed_log, slow_log, cfg)


@pytest.fixture
def matrix(make_gateway, make_client, gateway_rows, serve_app, tmp_path: Path) -> Matrix:
    """The gateway with the default (fast) relay path: no content logging."""
    return _start(make_gateway, make_client, gateway_rows, serve_app, tmp_path, store_content=False)


@pytest.fixture
def content_matrix(make_gateway, make_client, gateway_rows, serve_app, tmp_path: Path) -> Matrix:
    """Content logging on: the record shows exactly what the upstream generated (cancel cases)."""
    return _start(make_gateway, make_client, gateway_rows, serve_app, tmp_path, store_content=True)


def assert_record(rec: dict[str, Any], prices: dict[str, int], prompt: int, completion: int,
                  cached: int = 0, reasoning: int = 0, status: int = 200) -> None:
    got = (rec["status"], rec["prompt_tokens"], rec["completion_tokens"], rec["cached_tokens"], rec["reasoning_tokens"])
    assert got == (status, prompt, completion, cached, reasoning), rec
    assert rec["cost_micros"] == expected_cost(prices, prompt, completion, cached, reasoning), rec


def _stream(client: openai.OpenAI, **kw: Any) -> tuple[str, list[Any]]:
    stream = client.chat.completions.create(stream=True, **kw)
    with stream:
        chunks = list(stream)
    return stream.response.headers["x-request-id"], chunks


# -- chat on the simulated upstream ---------------------------------------------------------------


def test_unary(matrix: Matrix) -> None:
    body = {"model": "chat", "messages": MESSAGES, "sim_output_tokens": 17}
    raw = matrix.client.chat.completions.with_raw_response.create(
        model="chat", messages=MESSAGES, extra_body={"sim_output_tokens": 17})
    resp = raw.parse()
    prompt, completion = sim_usage(body)
    assert resp.usage is not None and (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (prompt, completion)
    assert_record(matrix.record(raw.headers["x-request-id"]), CHAT_PICO, prompt, completion)


def test_unary_cut_by_max_tokens(matrix: Matrix) -> None:
    raw = matrix.client.chat.completions.with_raw_response.create(
        model="chat", messages=MESSAGES, max_tokens=5, extra_body={"sim_output_tokens": 40})
    resp = raw.parse()
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 5
    assert_record(matrix.record(raw.headers["x-request-id"]), CHAT_PICO, count_prompt_tokens({"messages": MESSAGES}), 5)


def test_stream_with_include_usage(matrix: Matrix) -> None:
    rid, chunks = _stream(matrix.client, model="chat", messages=MESSAGES, stream_options={"include_usage": True},
                          extra_body={"sim_output_tokens": 23})
    prompt, completion = sim_usage({"messages": MESSAGES, "sim_output_tokens": 23})
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and chunks[-1].usage is usage[0], "exactly one usage chunk, last"
    assert (usage[0].prompt_tokens, usage[0].completion_tokens) == (prompt, completion)
    assert_record(matrix.record(rid), CHAT_PICO, prompt, completion)


def test_stream_without_include_usage(matrix: Matrix) -> None:
    rid, chunks = _stream(matrix.client, model="chat", messages=MESSAGES, extra_body={"sim_output_tokens": 29})
    assert all(c.usage is None for c in chunks), "the usage chunk the gateway asked for leaked to the client"
    assert all(c.choices for c in chunks), "a choice-less (usage) chunk reached the client"
    assert sum(1 for c in chunks if c.choices[0].delta.content) == 29
    prompt, completion = sim_usage({"messages": MESSAGES, "sim_output_tokens": 29})
    rec = matrix.record(rid)
    assert_record(rec, CHAT_PICO, prompt, completion)
    assert "usage_counted_by_gateway" not in (rec["annotations"] or ""), "exact usage came from the upstream"


def test_unary_tool_call(matrix: Matrix) -> None:
    raw = matrix.client.chat.completions.with_raw_response.create(
        model="chat", messages=MESSAGES, tools=[WEATHER_TOOL], extra_body={"sim_output_tokens": 13})
    resp = raw.parse()
    assert resp.choices[0].finish_reason == "tool_calls" and resp.choices[0].message.tool_calls
    prompt, completion = sim_usage({"messages": MESSAGES, "sim_output_tokens": 13})
    assert resp.usage is not None and (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (prompt, completion)
    assert_record(matrix.record(raw.headers["x-request-id"]), CHAT_PICO, prompt, completion)


@pytest.mark.parametrize("include_usage", [True, False])
def test_streamed_tool_call(matrix: Matrix, include_usage: bool) -> None:
    kw: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    rid, chunks = _stream(matrix.client, model="chat", messages=MESSAGES, tools=[WEATHER_TOOL],
                          extra_body={"sim_output_tokens": 19}, **kw)
    args = "".join(tc.function.arguments or "" for c in chunks if c.choices
                   for tc in (c.choices[0].delta.tool_calls or ()) if tc.function)
    assert json.loads(args) == {"city": "42", "days": 42}
    prompt, completion = sim_usage({"messages": MESSAGES, "sim_output_tokens": 19})
    if include_usage:
        assert chunks[-1].usage is not None
        assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (prompt, completion)
    else:
        assert all(c.usage is None for c in chunks)
    assert_record(matrix.record(rid), CHAT_PICO, prompt, completion)


def test_n2_unary_and_stream(matrix: Matrix) -> None:
    raw = matrix.client.chat.completions.with_raw_response.create(
        model="chat", messages=MESSAGES, n=2, extra_body={"sim_output_tokens": 11})
    resp = raw.parse()
    assert len(resp.choices) == 2
    prompt, completion = sim_usage({"messages": MESSAGES, "sim_output_tokens": 11, "n": 2})
    assert completion == 22 and resp.usage is not None and resp.usage.completion_tokens == completion
    assert_record(matrix.record(raw.headers["x-request-id"]), CHAT_PICO, prompt, completion)

    rid, chunks = _stream(matrix.client, model="chat", messages=MESSAGES, n=2, extra_body={"sim_output_tokens": 11})
    assert {ch.index for c in chunks for ch in c.choices} == {0, 1}
    assert all(c.usage is None for c in chunks)
    assert_record(matrix.record(rid), CHAT_PICO, prompt, completion)


# -- cancelled streams: no usage ever arrives -----------------------------------------------------


def test_cancel_mid_stream_on_simulated_upstream(content_matrix: Matrix) -> None:
    """200 tokens at 10 ms each (2 s); the client leaves after 3. The record is billed by the
    tokenizer for exactly what was generated (the logged output), far less than 200 tokens."""
    m = content_matrix
    stream = m.client.chat.completions.create(model="slow-chat", messages=MESSAGES, stream=True,
                                              extra_body={"sim_output_tokens": 200})
    rid = stream.response.headers["x-request-id"]
    seen = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            seen.append(chunk.choices[0].delta.content)
        if len(seen) == 3:
            break
    stream.close()
    rec = m.record(rid)
    assert (rec["status"], rec["error_code"]) == (499, "client_disconnected"), rec
    generated = json.loads(rec["content"])["output"]
    assert generated.startswith("".join(seen))
    completion = stream_pieces_tokens(generated)
    assert count_text("".join(seen)) <= completion, rec
    assert 0 < len(generated.split()) < 200, f"the upstream kept generating: {len(generated.split())} words"
    # The whole answer takes 2 s upstream; the gateway let go of it right after the client left.
    # (Not latency_ms: on a gateway without budgets the first tokenizer use loads it, ~0.2-1.5 s.)
    assert rec["upstream_ms"] is not None and rec["upstream_ms"] < 1000, rec
    assert_record(rec, CHAT_PICO, count_messages(MESSAGES), completion, status=499)
    assert json.loads(rec["annotations"])["usage_counted_by_gateway"] is True


def test_cancel_mid_stream_cancels_the_http_upstream(content_matrix: Matrix) -> None:
    """Over HTTP: when the client leaves, the gateway drops the upstream connection, so the upstream
    stops writing (it sees the disconnect) long before its 150 chunks; billed by the tokenizer."""
    m = content_matrix
    stream = m.client.chat.completions.create(model="slow-http", messages=MESSAGES, stream=True)
    rid = stream.response.headers["x-request-id"]
    seen = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            seen += 1
        if seen == 5:
            break
    stream.close()
    assert m.slow_log.disconnected.wait(5), "the upstream never saw the gateway hang up"
    assert not m.slow_log.finished.is_set()
    written = m.slow_log.written
    assert 5 <= written < SLOW_CHUNKS / 2, written
    rec = m.record(rid)
    assert (rec["status"], rec["error_code"]) == (499, "client_disconnected"), rec
    generated = json.loads(rec["content"])["output"]
    completion = stream_pieces_tokens(generated)
    assert completion == generated.count("the") and seen <= completion <= written, (seen, completion, written)
    assert_record(rec, CHAT_PICO, count_messages(MESSAGES), completion, status=499)
    # the gateway asked the upstream for usage on the client's behalf (it never came)
    assert m.slow_log.bodies[-1]["stream_options"] == {"include_usage": True}


# -- embeddings -----------------------------------------------------------------------------------


def test_embeddings(matrix: Matrix) -> None:
    raw = matrix.client.embeddings.with_raw_response.create(model="embed", input=["alpha beta", "gamma"])
    resp = raw.parse()
    assert len(resp.data) == 2
    assert resp.usage.prompt_tokens == 3  # the simulator counts words, at least one per input
    rec = matrix.record(raw.headers["x-request-id"])
    assert_record(rec, EMBED_PICO, 3, 0)
    assert rec["cost_micros"] == 2  # 1.5 micro-dollars, rounded half up


# -- cached and reasoning tokens ------------------------------------------------------------------


def test_cached_and_reasoning_tokens_unary(matrix: Matrix) -> None:
    raw = matrix.client.chat.completions.with_raw_response.create(model="fixed-chat", messages=MESSAGES)
    resp = raw.parse()
    assert resp.usage is not None and resp.usage.prompt_tokens_details is not None
    assert resp.usage.prompt_tokens_details.cached_tokens == 1024
    rec = matrix.record(raw.headers["x-request-id"])
    assert_record(rec, FIXED_PICO, 1200, 300, cached=1024, reasoning=100)
    # 176 x 2.5 + 1024 x 1.25 + 200 x 10 + 100 x 20 = 5720 micro-dollars; without the cache price it
    # would be 1200 x 2.5 + ... = 7000: the discount is applied.
    assert rec["cost_micros"] == 5720


@pytest.mark.parametrize("include_usage", [True, False])
def test_cached_and_reasoning_tokens_stream(matrix: Matrix, include_usage: bool) -> None:
    kw: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    rid, chunks = _stream(matrix.client, model="fixed-chat", messages=MESSAGES, **kw)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "cached answer"
    if include_usage:
        assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens_details.cached_tokens == 1024
    else:
        assert all(c.usage is None for c in chunks)
        assert matrix.fixed_log.bodies[-1]["stream_options"] == {"include_usage": True}  # asked on the client's behalf
    assert_record(matrix.record(rid), FIXED_PICO, 1200, 300, cached=1024, reasoning=100)


# -- `setpoint sim-provider` over HTTP ------------------------------------------------------------


def test_http_sim_provider_usage_matches(sim_provider_proc, make_gateway, make_client, gateway_rows, tmp_path: Path) -> None:
    """Against the simulator as a real HTTP upstream (network chunking, injected include_usage)."""
    gw = make_gateway({
        "data_dir": str(tmp_path / "http-sim"),
        "providers": {"up": {"type": "openai_compatible", "base_url": sim_provider_proc.base_url}},
        "models": {"chat": {"deployments": [{"provider": "up", "model": "sim-http", "pricing": CHAT_PRICES}]}},
        "keys": [{"name": "matrix", "key": KEY, "team": TEAM}],
    })
    client = make_client(gw.base_url, KEY)
    raw = client.chat.completions.with_raw_response.create(
        model="chat", messages=MESSAGES, n=2, tools=[WEATHER_TOOL], extra_body={"sim_output_tokens": 9})
    resp = raw.parse()
    rid_stream, chunks = _stream(client, model="chat", messages=MESSAGES, extra_body={"sim_output_tokens": 31})
    assert all(c.usage is None for c in chunks)
    rows = {r["id"]: r for r in gateway_rows(gw)}
    prompt, completion = sim_usage({"messages": MESSAGES, "sim_output_tokens": 9, "n": 2})
    assert resp.usage is not None and (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (prompt, completion)
    assert_record(rows[raw.headers["x-request-id"]], CHAT_PICO, prompt, completion)
    prompt, completion = sim_usage({"messages": MESSAGES, "sim_output_tokens": 31})
    assert_record(rows[rid_stream], CHAT_PICO, prompt, completion)


# -- totals: `setpoint usage` and GET /admin/usage --------------------------------------------------


def _usage_workload(m: Matrix, make_client) -> dict[str, dict[str, int]]:
    """A few requests on two teams; returns the expected totals per team from the records' inputs."""
    other = make_client(m.gw.base_url, OTHER_KEY)
    m.client.chat.completions.create(model="chat", messages=MESSAGES, extra_body={"sim_output_tokens": 7})
    _stream(m.client, model="chat", messages=MESSAGES, extra_body={"sim_output_tokens": 5})
    m.client.chat.completions.create(model="fixed-chat", messages=MESSAGES)
    m.client.embeddings.create(model="embed", input=["alpha beta", "gamma"])
    other.chat.completions.create(model="chat", messages=MESSAGES, n=2, extra_body={"sim_output_tokens": 3})
    with pytest.raises(openai.NotFoundError):  # an error row: counted as a request and an error, costs 0
        other.chat.completions.create(model="no-such-model", messages=MESSAGES)
    p = count_prompt_tokens({"messages": MESSAGES})
    team = {"requests": 4, "errors": 0, "prompt_tokens": p + p + 1200 + 3, "completion_tokens": 7 + 5 + 300,
            "cached_tokens": 1024, "reasoning_tokens": 100,
            "cost_micros": expected_cost(CHAT_PICO, p, 7) + expected_cost(CHAT_PICO, p, 5)
            + expected_cost(FIXED_PICO, 1200, 300, 1024, 100) + expected_cost(EMBED_PICO, 3, 0)}
    other_team = {"requests": 2, "errors": 1, "prompt_tokens": p, "completion_tokens": 6, "cached_tokens": 0,
                  "reasoning_tokens": 0, "cost_micros": expected_cost(CHAT_PICO, p, 6)}
    return {TEAM: team, OTHER_TEAM: other_team}


def _check_rows(rows: list[dict[str, Any]], expected: dict[str, dict[str, int]]) -> None:
    by_group = {r["group"]: r for r in rows}
    assert set(by_group) == set(expected), rows
    for team, want in expected.items():
        got = {k: by_group[team][k] for k in want}
        assert got == want, f"{team}: {got} != {want}"


def test_usage_cli_totals(matrix: Matrix, make_client, run_cli, write_config) -> None:
    from click.testing import CliRunner

    from setpoint.cli.main import main as cli

    if "usage" not in getattr(cli, "commands", {}):
        pytest.skip("not implemented yet: `setpoint usage`")
    expected = _usage_workload(matrix, make_client)
    rows_in_log = matrix.rows()
    assert sum(r["cost_micros"] or 0 for r in rows_in_log) == sum(t["cost_micros"] for t in expected.values())
    cfg_path = write_config(matrix.config)

    # The real console script once; the other variants in-process (the same click command).
    out = run_cli("usage", "--config", str(cfg_path), "--by", "team", "--json")
    assert out.returncode == 0, out.stderr
    _check_rows(json.loads(out.stdout), expected)

    def usage(*args: str) -> str:
        res = CliRunner().invoke(cli, ["usage", "--config", str(cfg_path), *args])
        assert res.exit_code == 0, res.output
        return res.stdout

    total = sum(t["cost_micros"] for t in expected.values())
    today = time.strftime("%Y-%m-%d", time.gmtime())
    tomorrow = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 86_400))
    day_rows = json.loads(usage("--by", "day", "--since", today, "--json"))
    assert [r["group"] for r in day_rows] == [today] and day_rows[0]["cost_micros"] == total
    key_rows = json.loads(usage("--by", "key", "--json"))
    assert {r["group"]: r["cost_micros"] for r in key_rows} == {
        "matrix": expected[TEAM]["cost_micros"], "other": expected[OTHER_TEAM]["cost_micros"]}
    assert json.loads(usage("--by", "team", "--since", tomorrow, "--json")) == []


def test_usage_cli_text_report(matrix: Matrix, make_client, write_config) -> None:
    """The human-readable table: one line per group and the exact total in micro-dollars."""
    from click.testing import CliRunner

    from setpoint.cli.main import main as cli

    if "usage" not in getattr(cli, "commands", {}):
        pytest.skip("not implemented yet: `setpoint usage`")
    expected = _usage_workload(matrix, make_client)
    matrix.rows()  # flushed
    cfg_path = write_config(matrix.config)
    res = CliRunner().invoke(cli, ["usage", "--config", str(cfg_path), "--by", "team"])
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    lines = res.stdout.splitlines()
    for team in expected:
        assert sum(1 for ln in lines if ln.startswith(team + " ")) == 1, res.stdout
    total = sum(t["cost_micros"] for t in expected.values())
    assert f"total {total} micro-dollars" in res.stdout, res.stdout


def test_admin_usage_totals(matrix: Matrix, make_client) -> None:
    with httpx.Client(timeout=10, trust_env=False) as http:
        url = matrix.gw.root_url + "/admin/usage"
        auth = {"Authorization": f"Bearer {MASTER}"}
        if http.get(url, params={"by": "team"}, headers=auth).status_code == 404:
            pytest.skip("not implemented yet: GET /admin/usage")
        expected = _usage_workload(matrix, make_client)
        resp = http.get(url, params={"by": "team"}, headers=auth)
        assert resp.status_code == 200, resp.text
        _check_rows(resp.json()["data"], expected)
        tomorrow = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 86_400))
        later = http.get(url, params={"by": "team", "since": tomorrow}, headers=auth)
        assert later.status_code == 200 and later.json()["data"] == []
        assert http.get(url, params={"by": "team"}).status_code == 401
        bad = http.get(url, params={"by": "nonsense"}, headers=auth)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "by"
