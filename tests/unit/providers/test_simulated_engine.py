"""SimulatedEngine plans (deterministic, fault-injecting) and SimulatedProvider playing them on a clock."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import orjson
import pytest

from setpoint.clock import ManualClock
from setpoint.config.schema import FaultsConfig, LatencyConfig, OutputLengthConfig, SimulatedProviderConfig
from setpoint.errors import ProviderTimeoutError, ProviderRateLimitedError, ProviderResponseError, ProviderUnavailableError
from setpoint.providers.simulated.engine import FAULTS, SimPlan, SimulatedEngine, count_prompt_tokens
from setpoint.providers.simulated.provider import SimulatedProvider
from setpoint.types import UpstreamCall
from setpoint.wire.sse import DONE, MalformedEventError, SSEFramer, event_data


def cfg(seed: int = 0, **kw: Any) -> SimulatedProviderConfig:
    return SimulatedProviderConfig(type="simulated", seed=seed, **kw)


def body(**fields: Any) -> dict[str, Any]:
    b: dict[str, Any] = {"model": "sim-mini", "messages": [{"role": "system", "content": "be terse"},
                                                           {"role": "user", "content": "what is a set point"}]}
    b.update(fields)
    return b


def stream_docs(plan: SimPlan) -> tuple[list[dict[str, Any]], bool]:
    """Parse a streamed plan through the real SSE framer: (JSON chunks, saw [DONE])."""
    framer = SSEFramer()
    docs: list[dict[str, Any]] = []
    done = False
    for ev in plan.events:
        for event in framer.feed(ev.data):
            data = event_data(event)
            if data == DONE:
                done = True
            elif data is not None:
                docs.append(orjson.loads(data))
    assert framer.pending == b""
    return docs, done


def content_pieces(docs: list[dict[str, Any]], index: int = 0) -> list[str]:
    return [c["delta"]["content"] for d in docs for c in d["choices"]
            if c["index"] == index and c["delta"].get("content")]


SEQUENCE = [
    (body(), False), (body(stream=True), True), (body(n=2), False),
    ({"model": "e", "input": ["a", "b"]}, None), (body(max_tokens=5), True), (body(), False),
]


def run_sequence(engine: SimulatedEngine) -> list[SimPlan]:
    plans = []
    for b, is_stream in SEQUENCE:
        plans.append(engine.plan_embeddings(b) if is_stream is None else engine.plan_chat(b, is_stream))
    return plans


# -- determinism --------------------------------------------------------------------------------


def test_same_seed_same_sequence_identical_plans() -> None:
    faults = FaultsConfig(rate_limit=0.2, cut_stream=0.2, server_error=0.1)
    a = run_sequence(SimulatedEngine(cfg(seed=42, faults=faults)))
    b = run_sequence(SimulatedEngine(cfg(seed=42, faults=faults)))
    assert a == b
    assert all(isinstance(p, SimPlan) for p in a)


def test_different_seed_different_plans() -> None:
    a = run_sequence(SimulatedEngine(cfg(seed=1)))
    b = run_sequence(SimulatedEngine(cfg(seed=2)))
    assert a != b
    # Not just one field: the unary bodies (ids, words) differ.
    assert a[0].body != b[0].body


def test_plans_depend_on_position_in_sequence() -> None:
    e = SimulatedEngine(cfg(seed=5))
    first, second = e.plan_chat(body(), False), e.plan_chat(body(), False)
    assert first.body != second.body  # same request, next draw


def test_provider_name_does_not_change_plans() -> None:
    a = SimulatedEngine(cfg(seed=9), "a").plan_chat(body(), False)
    b = SimulatedEngine(cfg(seed=9), "b").plan_chat(body(), False)
    assert a == b


# -- faults -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "status"), [("rate_limit", 429), ("server_error", 500), ("unavailable", 503), ("stall", 504)]
)
@pytest.mark.parametrize("is_stream", [False, True])
def test_forced_error_faults(fault: str, status: int, is_stream: bool) -> None:
    e = SimulatedEngine(cfg(faults=FaultsConfig(retry_after_s=2.5, stall_s=7)))
    plan = e.plan_chat(body(sim_fault=fault, stream=is_stream), is_stream)
    assert plan.status == status
    assert plan.events == []
    doc = orjson.loads(plan.body)  # type: ignore[arg-type]
    assert set(doc["error"]) >= {"message", "type", "code"}
    if fault == "rate_limit":
        assert plan.headers["Retry-After"] == "2.5"
        assert plan.headers["x-ratelimit-reset-requests"] == "2.5s"
    if fault == "stall":
        assert plan.delay_s == 7


def test_forced_cut_stream_has_no_done_and_no_finish() -> None:
    e = SimulatedEngine(cfg())
    plan = e.plan_chat(body(stream=True, sim_output_tokens=20), True)
    assert plan.is_cut is False
    full_docs, full_done = stream_docs(plan)
    assert full_done

    cut = SimulatedEngine(cfg()).plan_chat(body(stream=True, sim_output_tokens=20, sim_fault="cut_stream"), True)
    assert cut.is_cut is True
    docs, done = stream_docs(cut)
    assert not done
    assert all(b"[DONE]" not in ev.data for ev in cut.events)
    assert all(c["finish_reason"] is None for d in docs for c in d["choices"])
    assert 2 <= len(cut.events) < len(plan.events)
    assert content_pieces(docs) == content_pieces(full_docs)[: len(content_pieces(docs))]  # a true prefix


def test_forced_malformed_sse_contains_a_bad_event() -> None:
    plan = SimulatedEngine(cfg()).plan_chat(body(stream=True, sim_output_tokens=10, sim_fault="malformed_sse"), True)
    framer = SSEFramer()
    bad = 0
    for ev in plan.events:
        for event in framer.feed(ev.data):
            try:
                event_data(event)
            except MalformedEventError:
                bad += 1
    assert bad == 1
    assert plan.events[-1].data == b"data: [DONE]\n\n"


def test_forced_slow_drip_is_ten_times_slower() -> None:
    lat = LatencyConfig(ttft_ms=10, per_token_ms=3, jitter=0)
    normal = SimulatedEngine(cfg(latency=lat)).plan_chat(body(stream=True, sim_output_tokens=5), True)
    slow = SimulatedEngine(cfg(latency=lat)).plan_chat(body(stream=True, sim_output_tokens=5, sim_fault="slow_drip"), True)
    assert normal.events[0].delay_s == pytest.approx(0.010)
    assert normal.events[1].delay_s == pytest.approx(0.003)
    assert slow.events[1].delay_s == pytest.approx(0.030)


def test_unknown_forced_fault_is_ignored() -> None:
    plan = SimulatedEngine(cfg()).plan_chat(body(sim_fault="meteor_strike"), False)
    assert plan.status == 200 and plan.body is not None
    assert SimulatedEngine(cfg()).plan_chat(body(sim_fault=None), False).status == 200


RATES = {"rate_limit": 0.10, "server_error": 0.05, "unavailable": 0.05, "stall": 0.04,
         "cut_stream": 0.10, "malformed_sse": 0.06, "slow_drip": 0.10}


def classify(plan: SimPlan, slow_delay: float) -> str | None:
    by_status = {429: "rate_limit", 500: "server_error", 503: "unavailable", 504: "stall"}
    if plan.status != 200:
        return by_status[plan.status]
    if plan.is_cut:
        return "cut_stream"
    if any(ev.data.startswith(b"this is not an sse field") for ev in plan.events):
        return "malformed_sse"
    if math.isclose(plan.events[1].delay_s, slow_delay):
        return "slow_drip"
    return None


def test_fault_rates_roughly_respected() -> None:
    n = 2000
    lat = LatencyConfig(ttft_ms=10, per_token_ms=2, jitter=0)
    e = SimulatedEngine(cfg(seed=2024, latency=lat, faults=FaultsConfig(**RATES)))
    counts: dict[str | None, int] = {}
    for _ in range(n):
        kind = classify(e.plan_chat(body(stream=True), True), slow_delay=0.020)
        counts[kind] = counts.get(kind, 0) + 1
    assert set(counts) - {None} == set(FAULTS)
    for name, p in [*RATES.items(), (None, 1 - sum(RATES.values()))]:
        mean, sd = n * p, math.sqrt(n * p * (1 - p))
        got = counts.get(name, 0)
        assert abs(got - mean) <= 5 * sd, f"{name}: {got} vs expected {mean:.0f} ± {5 * sd:.0f}"


def test_zero_rates_never_fault() -> None:
    e = SimulatedEngine(cfg(seed=3))
    for _ in range(300):
        plan = e.plan_chat(body(stream=True), True)
        assert plan.status == 200 and not plan.is_cut
        assert plan.events[-1].data == b"data: [DONE]\n\n"


def test_rate_one_always_faults() -> None:
    e = SimulatedEngine(cfg(faults=FaultsConfig(unavailable=1.0)))
    assert all(e.plan_chat(body(), False).status == 503 for _ in range(50))


# -- lengths, finish reasons, usage -------------------------------------------------------------


def test_forced_output_length() -> None:
    plan = SimulatedEngine(cfg()).plan_chat(body(sim_output_tokens=17), False)
    doc = orjson.loads(plan.body)  # type: ignore[arg-type]
    assert doc["usage"]["completion_tokens"] == 17
    assert len(doc["choices"][0]["message"]["content"].split(" ")) == 17
    assert doc["choices"][0]["finish_reason"] == "stop"
    assert doc["object"] == "chat.completion"


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_truncation_gives_length(field: str) -> None:
    unary = SimulatedEngine(cfg()).plan_chat(body(sim_output_tokens=40, **{field: 6}), False)
    doc = orjson.loads(unary.body)  # type: ignore[arg-type]
    assert doc["choices"][0]["finish_reason"] == "length"
    assert doc["usage"]["completion_tokens"] == 6
    assert len(doc["choices"][0]["message"]["content"].split(" ")) == 6

    streamed = SimulatedEngine(cfg()).plan_chat(body(stream=True, sim_output_tokens=40, **{field: 6}), True)
    docs, done = stream_docs(streamed)
    assert done
    assert len(content_pieces(docs)) == 6
    finishes = [c["finish_reason"] for d in docs for c in d["choices"] if c["finish_reason"]]
    assert finishes == ["length"]


def test_max_completion_tokens_preferred_and_limit_above_length_is_stop() -> None:
    doc = orjson.loads(SimulatedEngine(cfg()).plan_chat(body(sim_output_tokens=30, max_tokens=20, max_completion_tokens=4), False).body)  # type: ignore[arg-type]
    assert doc["usage"]["completion_tokens"] == 4
    doc = orjson.loads(SimulatedEngine(cfg()).plan_chat(body(sim_output_tokens=5, max_tokens=50), False).body)  # type: ignore[arg-type]
    assert doc["choices"][0]["finish_reason"] == "stop"
    assert doc["usage"]["completion_tokens"] == 5


def test_random_lengths_within_configured_range() -> None:
    e = SimulatedEngine(cfg(seed=8, output=OutputLengthConfig(min_tokens=3, max_tokens=9)))
    lengths = {orjson.loads(e.plan_chat(body(), False).body)["usage"]["completion_tokens"] for _ in range(200)}  # type: ignore[arg-type]
    assert lengths <= set(range(3, 10))
    assert len(lengths) >= 5  # actually varies


@pytest.mark.parametrize("n_choices", [1, 3])
def test_include_usage_chunk_equals_unary_usage(n_choices: int) -> None:
    fields = {"sim_output_tokens": 12, "n": n_choices}
    unary = orjson.loads(SimulatedEngine(cfg(seed=1)).plan_chat(body(**fields), False).body)  # type: ignore[arg-type]
    plan = SimulatedEngine(cfg(seed=99)).plan_chat(
        body(stream=True, stream_options={"include_usage": True}, **fields), True)
    docs, done = stream_docs(plan)
    assert done
    usage_chunks = [d for d in docs if d.get("usage")]
    assert len(usage_chunks) == 1
    assert usage_chunks[0] is docs[-1]  # last before [DONE]
    assert usage_chunks[0]["choices"] == []
    assert usage_chunks[0]["usage"] == unary["usage"]
    assert unary["usage"]["completion_tokens"] == 12 * n_choices
    assert unary["usage"]["prompt_tokens"] == count_prompt_tokens(body())
    assert unary["usage"]["total_tokens"] == unary["usage"]["prompt_tokens"] + 12 * n_choices
    for i in range(n_choices):
        assert len(content_pieces(docs, i)) == 12


def test_no_usage_chunk_without_include_usage() -> None:
    for opts in (None, {"include_usage": False}, {}):
        fields: dict[str, Any] = {"stream": True}
        if opts is not None:
            fields["stream_options"] = opts
        docs, done = stream_docs(SimulatedEngine(cfg()).plan_chat(body(**fields), True))
        assert done
        assert not any("usage" in d for d in docs)


def test_count_prompt_tokens() -> None:
    assert count_prompt_tokens(body()) == (4 + 2) + (4 + 5)
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "one two"}, {"type": "image_url"}]}]}
    assert count_prompt_tokens(parts) == 6
    assert count_prompt_tokens({}) == 1


def test_stream_chunks_are_openai_shaped() -> None:
    docs, done = stream_docs(SimulatedEngine(cfg()).plan_chat(body(stream=True, sim_output_tokens=3), True))
    assert done
    assert docs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    ids = {d["id"] for d in docs}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    assert all(d["object"] == "chat.completion.chunk" and d["model"] == "sim-mini" for d in docs)


def test_json_response_format_gives_json_text() -> None:
    doc = orjson.loads(SimulatedEngine(cfg()).plan_chat(body(response_format={"type": "json_object"}), False).body)  # type: ignore[arg-type]
    assert isinstance(orjson.loads(doc["choices"][0]["message"]["content"]), dict)


# -- tool calls ---------------------------------------------------------------------------------


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "number"}}}}},
    {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"q": {"type": "string"}}}}},
]


def test_unary_tool_call_has_valid_json_arguments() -> None:
    doc = orjson.loads(SimulatedEngine(cfg()).plan_chat(body(tools=TOOLS), False).body)  # type: ignore[arg-type]
    choice = doc["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    args = orjson.loads(call["function"]["arguments"])
    assert set(args) == {"city", "days"}
    assert isinstance(args["days"], (int, float)) and isinstance(args["city"], str)


def test_streamed_tool_call_arguments_reassemble_to_valid_json() -> None:
    docs, done = stream_docs(SimulatedEngine(cfg()).plan_chat(body(stream=True, tools=TOOLS), True))
    assert done
    deltas = [tc for d in docs for c in d["choices"] for tc in c["delta"].get("tool_calls", [])]
    assert deltas[0]["function"]["name"] == "get_weather" and deltas[0]["id"].startswith("call_")
    args = "".join(tc["function"].get("arguments", "") for tc in deltas)
    assert set(orjson.loads(args)) == {"city", "days"}
    finishes = [c["finish_reason"] for d in docs for c in d["choices"] if c["finish_reason"]]
    assert finishes == ["tool_calls"]


def test_tool_choice_by_name_and_none() -> None:
    e = SimulatedEngine(cfg())
    doc = orjson.loads(e.plan_chat(body(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "lookup"}}), False).body)  # type: ignore[arg-type]
    call = doc["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "lookup"
    assert orjson.loads(call["function"]["arguments"]) == {"q": "42"}
    doc = orjson.loads(e.plan_chat(body(tools=TOOLS, tool_choice="none"), False).body)  # type: ignore[arg-type]
    assert "tool_calls" not in doc["choices"][0]["message"]
    assert doc["choices"][0]["finish_reason"] == "stop"


# -- embeddings ---------------------------------------------------------------------------------


def _vectors(plan: SimPlan) -> list[list[float]]:
    doc = orjson.loads(plan.body)  # type: ignore[arg-type]
    assert [d["index"] for d in doc["data"]] == list(range(len(doc["data"])))
    return [d["embedding"] for d in doc["data"]]


def test_embeddings_same_text_same_unit_vector() -> None:
    e1, e2 = SimulatedEngine(cfg(seed=4)), SimulatedEngine(cfg(seed=4))
    (a,) = _vectors(e1.plan_embeddings({"model": "e", "input": "hello world"}))
    e2.plan_chat(body(), False)  # a different position in the sequence must not matter
    b, c = _vectors(e2.plan_embeddings({"model": "e", "input": ["hello world", "something else"]}))
    assert a == b
    assert a != c
    assert len(a) == 64
    for v in (a, c):
        assert math.isclose(math.fsum(x * x for x in v), 1.0, rel_tol=1e-9)


def test_embeddings_depend_on_seed_and_dimensions() -> None:
    (a,) = _vectors(SimulatedEngine(cfg(seed=1)).plan_embeddings({"model": "e", "input": "x"}))
    (b,) = _vectors(SimulatedEngine(cfg(seed=2)).plan_embeddings({"model": "e", "input": "x"}))
    assert a != b
    (d,) = _vectors(SimulatedEngine(cfg(seed=1)).plan_embeddings({"model": "e", "input": "x", "dimensions": 8}))
    assert len(d) == 8 and math.isclose(math.fsum(x * x for x in d), 1.0)


def test_embeddings_token_inputs_and_usage() -> None:
    plan = SimulatedEngine(cfg()).plan_embeddings({"model": "e", "input": [[1, 2, 3], [4]]})
    doc = orjson.loads(plan.body)  # type: ignore[arg-type]
    assert len(doc["data"]) == 2
    assert doc["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    single = orjson.loads(SimulatedEngine(cfg()).plan_embeddings({"model": "e", "input": [5, 6]}).body)  # type: ignore[arg-type]
    assert len(single["data"]) == 1


def test_embeddings_forced_fault() -> None:
    plan = SimulatedEngine(cfg()).plan_embeddings({"model": "e", "input": "x", "sim_fault": "rate_limit"})
    assert plan.status == 429 and plan.headers == {"Retry-After": "1"}


# -- SimulatedProvider on a ManualClock ---------------------------------------------------------


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_stream_chunks_arrive_only_as_virtual_time_advances() -> None:
    clock = ManualClock()
    lat = LatencyConfig(ttft_ms=100, per_token_ms=10, jitter=0)
    provider = SimulatedProvider("sim", cfg(latency=lat), clock)
    call = UpstreamCall(path="/chat/completions", body=body(stream=True, sim_output_tokens=5), is_stream=True, request_id="r1")
    reply = await provider.send(call)  # a stream answers at once; its events carry the delays
    assert reply.status == 200 and reply.stream is not None
    got: list[bytes] = []

    async def consume() -> None:
        async for chunk in reply.stream:  # type: ignore[union-attr]
            got.append(chunk)

    task = asyncio.create_task(consume())
    await _settle()
    assert got == [] and clock.pending == 1
    await clock.advance(0.05)
    await _settle()
    assert got == []
    await clock.advance(0.051)  # t = 0.101: the first chunk (role) is due at 0.100
    await _settle()
    assert len(got) == 1 and b'"role":"assistant"' in got[0]
    await clock.advance(0.010)  # t = 0.111: one token (due 0.110)
    await _settle()
    assert len(got) == 2
    await clock.advance(0.025)  # t = 0.136: two more (0.120, 0.130); the 4th is due at 0.140
    await _settle()
    assert len(got) == 4
    assert not task.done()
    await clock.advance(1.0)
    await asyncio.wait_for(task, 1)
    # role + 5 tokens + finish + [DONE]; the last three are zero-delay
    assert len(got) == 8
    assert got[-1] == b"data: [DONE]\n\n"
    assert clock.monotonic() == pytest.approx(1.136)


async def test_unary_reply_waits_for_generation_time() -> None:
    clock = ManualClock()
    lat = LatencyConfig(ttft_ms=100, per_token_ms=10, jitter=0)
    provider = SimulatedProvider("sim", cfg(latency=lat), clock)
    call = UpstreamCall(path="/chat/completions", body=body(sim_output_tokens=5), is_stream=False, request_id="r2")
    task = asyncio.create_task(provider.send(call))
    await _settle()
    await clock.advance(0.149)  # needs 0.100 + 5 * 0.010
    await _settle()
    assert not task.done()
    await clock.advance(0.002)
    reply = await asyncio.wait_for(task, 1)
    assert reply.stream is None and reply.body is not None
    assert orjson.loads(reply.body)["usage"]["completion_tokens"] == 5


async def test_provider_errors_map_through_error_from_status() -> None:
    clock = ManualClock()
    provider = SimulatedProvider("sim", cfg(latency=LatencyConfig(ttft_ms=0, jitter=0)), clock)
    await provider.start()
    cases = [("rate_limit", ProviderRateLimitedError), ("server_error", ProviderUnavailableError),
             ("unavailable", ProviderUnavailableError)]
    for fault, exc in cases:
        with pytest.raises(exc) as info:
            await provider.send(UpstreamCall("/chat/completions", body(sim_fault=fault), False, "r"))
        assert "sim" in info.value.message
    with pytest.raises(ProviderRateLimitedError) as rl:
        await provider.send(UpstreamCall("/chat/completions", body(sim_fault="rate_limit"), False, "r"))
    assert rl.value.retry_after_s == 1.0
    await provider.aclose()


async def test_stall_answers_504_after_virtual_stall_time() -> None:
    clock = ManualClock()
    provider = SimulatedProvider("sim", cfg(faults=FaultsConfig(stall_s=30)), clock)
    task = asyncio.create_task(provider.send(UpstreamCall("/chat/completions", body(sim_fault="stall"), False, "r")))
    await _settle()
    await clock.advance(29.9)
    await _settle()
    assert not task.done()
    await clock.advance(0.2)
    # The stall plays as an upstream 504 (gateway timeout) after stall_s: a retryable timeout.
    with pytest.raises(ProviderTimeoutError) as info:
        await asyncio.wait_for(task, 1)
    assert info.value.status == 504 and info.value.is_retryable


async def test_cut_stream_raises_after_its_last_event() -> None:
    clock = ManualClock()
    provider = SimulatedProvider("sim", cfg(latency=LatencyConfig(ttft_ms=0, per_token_ms=0, jitter=0)), clock)
    reply = await provider.send(UpstreamCall("/chat/completions", body(stream=True, sim_fault="cut_stream", sim_output_tokens=10), True, "r"))
    got: list[bytes] = []
    with pytest.raises(ProviderResponseError, match="closed the stream mid-answer"):
        async for chunk in reply.stream:  # type: ignore[union-attr]
            got.append(chunk)
    assert got and all(b"[DONE]" not in c for c in got)


async def test_aclose_stops_the_stream() -> None:
    clock = ManualClock()
    provider = SimulatedProvider("sim", cfg(latency=LatencyConfig(ttft_ms=0, per_token_ms=0, jitter=0)), clock)
    reply = await provider.send(UpstreamCall("/chat/completions", body(stream=True, sim_output_tokens=10), True, "r"))
    assert reply.stream is not None
    got = []
    async for chunk in reply.stream:
        got.append(chunk)
        if len(got) == 2:
            await reply.stream.aclose()
    assert len(got) == 2


async def test_embeddings_via_provider_are_unary() -> None:
    clock = ManualClock()
    provider = SimulatedProvider("sim", cfg(latency=LatencyConfig(ttft_ms=0, jitter=0)), clock)
    reply = await provider.send(UpstreamCall("/embeddings", {"model": "e", "input": "x", "stream": True}, True, "r"))
    assert reply.stream is None and reply.body is not None
    assert orjson.loads(reply.body)["object"] == "list"
