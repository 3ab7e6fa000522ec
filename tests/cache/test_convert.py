"""`wire/convert.py` on its own: a stream's events aggregate into the `chat.completion` a unary call
would have returned, and a completion replays as the SSE events of a stream of the same shape.

The inputs are real answers of the simulated engine (unary bodies and stream events), so the
conversions are checked against the shapes the gateway actually relays."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from setpoint.config.schema import SimulatedProviderConfig
from setpoint.providers.simulated.engine import SimulatedEngine
from setpoint.wire.convert import completion_from_stream, stream_from_completion

WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "number"}}}}}
MESSAGES = [{"role": "user", "content": "What is a set point?"}]


def engine() -> SimulatedEngine:
    return SimulatedEngine(SimulatedProviderConfig(type="simulated", seed=5))


def unary(**body: Any) -> dict[str, Any]:
    plan = engine().plan_chat({"model": "sim", "messages": MESSAGES, **body}, is_stream=False)
    assert plan.body is not None
    return orjson.loads(plan.body)


def live_stream(**body: Any) -> list[bytes]:
    """The payloads (without `data: `) of the engine's stream for this body, [DONE] excluded."""
    plan = engine().plan_chat({"model": "sim", "messages": MESSAGES, "stream": True,
                               "stream_options": {"include_usage": True}, **body}, is_stream=True)
    out = []
    for ev in plan.events:
        assert ev.data.startswith(b"data: ") and ev.data.endswith(b"\n\n")
        payload = ev.data[6:-2]
        if payload != b"[DONE]":
            out.append(payload)
    return out


def replay(doc: dict[str, Any], include_usage: bool) -> tuple[list[dict[str, Any]], list[bytes]]:
    events = stream_from_completion(doc, include_usage=include_usage)
    assert events[-1] == b"data: [DONE]\n\n"
    chunks = []
    for e in events[:-1]:
        assert e.startswith(b"data: ") and e.endswith(b"\n\n") and b"\n" not in e[:-2]
        chunks.append(orjson.loads(e[6:-2]))
    return chunks, events


def text_of(chunks: list[dict[str, Any]], index: int = 0) -> str:
    return "".join(c["delta"].get("content") or "" for ch in chunks for c in ch["choices"] if c["index"] == index)


# -- completion -> stream ---------------------------------------------------------------------------


@pytest.mark.parametrize("include_usage", [False, True])
def test_replayed_stream_has_the_shape_of_a_live_one(include_usage: bool) -> None:
    doc = unary(sim_output_tokens=6)
    chunks, _ = replay(doc, include_usage)

    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert {c["id"] for c in chunks} == {doc["id"]}
    assert {c["created"] for c in chunks} == {doc["created"]}
    assert {c["model"] for c in chunks} == {doc["model"]}
    assert chunks[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
    assert text_of(chunks) == doc["choices"][0]["message"]["content"]
    finishes = [c["finish_reason"] for ch in chunks for c in ch["choices"] if c["finish_reason"]]
    assert finishes == [doc["choices"][0]["finish_reason"]] == ["stop"]
    usage_chunks = [c for c in chunks if c.get("usage") is not None]
    if include_usage:
        assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == doc["usage"]
    else:
        assert usage_chunks == []
        assert all(c["choices"] for c in chunks)

    # Every field a live chunk of the engine carries is in the replayed chunks too.
    live = [orjson.loads(p) for p in live_stream(sim_output_tokens=6)]
    assert set(live[0]) <= set(chunks[0])
    assert set(live[0]["choices"][0]) <= set(chunks[0]["choices"][0])


def test_replay_without_usage_in_the_entry_sends_no_usage_chunk() -> None:
    doc = {**unary(), "usage": None}
    chunks, _ = replay(doc, include_usage=True)
    assert all(c.get("usage") is None for c in chunks)


def test_replay_of_several_choices() -> None:
    doc = unary(n=2, sim_output_tokens=3)
    chunks, _ = replay(doc, include_usage=False)
    assert [c["index"] for c in chunks[0]["choices"]] == [0, 1]
    for i in (0, 1):
        assert text_of(chunks, i) == doc["choices"][i]["message"]["content"]
    last = chunks[-1]["choices"]
    assert [(c["index"], c["finish_reason"]) for c in last] == [(0, "stop"), (1, "stop")]


def test_replay_of_tool_calls() -> None:
    doc = unary(tools=[WEATHER_TOOL])
    call = doc["choices"][0]["message"]["tool_calls"][0]
    chunks, _ = replay(doc, include_usage=False)
    deltas = [c["delta"]["tool_calls"] for ch in chunks for c in ch["choices"] if c["delta"].get("tool_calls")]
    assert deltas == [[{"index": 0, "id": call["id"], "type": "function", "function": call["function"]}]]
    assert text_of(chunks) == ""  # a tool call has no text
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_replay_keeps_logprobs() -> None:
    doc = unary(logprobs=True, sim_output_tokens=3)
    chunks, _ = replay(doc, include_usage=False)
    lp = [c["logprobs"] for ch in chunks for c in ch["choices"] if c.get("logprobs")]
    assert lp == [doc["choices"][0]["logprobs"]]


# -- stream -> completion ---------------------------------------------------------------------------


def test_live_stream_aggregates_into_the_unary_answer() -> None:
    # The same seed and request number: the engine's unary and stream plans say the same words.
    payloads = live_stream(sim_output_tokens=7)
    doc = completion_from_stream(payloads)
    ref = unary(sim_output_tokens=7)
    assert doc is not None
    assert doc["object"] == "chat.completion"
    assert doc["id"] == ref["id"] and doc["model"] == ref["model"] and doc["created"] == ref["created"]
    assert doc["choices"] == ref["choices"]
    assert doc["usage"] == ref["usage"]


def test_aggregation_of_several_choices_and_logprobs() -> None:
    payloads = live_stream(n=2, logprobs=True, sim_output_tokens=4)
    doc = completion_from_stream(payloads)
    ref = unary(n=2, logprobs=True, sim_output_tokens=4)
    assert doc is not None
    assert [c["message"]["content"] for c in doc["choices"]] == [c["message"]["content"] for c in ref["choices"]]
    assert [c["logprobs"] for c in doc["choices"]] == [c["logprobs"] for c in ref["choices"]]
    assert [c["finish_reason"] for c in doc["choices"]] == ["stop", "stop"]


def test_aggregation_of_tool_call_fragments() -> None:
    doc = completion_from_stream(live_stream(tools=[WEATHER_TOOL]))
    ref = unary(tools=[WEATHER_TOOL])
    assert doc is not None
    assert doc["choices"][0]["message"]["tool_calls"] == ref["choices"][0]["message"]["tool_calls"]
    assert doc["choices"][0]["finish_reason"] == "tool_calls"


def test_aggregated_tool_call_answer_has_null_content_like_a_unary_one() -> None:
    doc = completion_from_stream(live_stream(tools=[WEATHER_TOOL]))
    assert doc is not None
    assert doc["choices"][0]["message"]["content"] is None
    assert unary(tools=[WEATHER_TOOL])["choices"][0]["message"]["content"] is None


@pytest.mark.parametrize("bad", [
    [b'{"error": {"message": "boom"}}'],
    [b"not json"],
])
def test_a_stream_that_failed_does_not_aggregate(bad: list[bytes]) -> None:
    assert completion_from_stream([*live_stream()[:2], *bad]) is None


@pytest.mark.parametrize("body", [{}, {"n": 2}, {"logprobs": True}], ids=["plain", "n2", "logprobs"])
def test_round_trip_completion_stream_completion(body: dict[str, Any]) -> None:
    doc = unary(sim_output_tokens=5, **body)
    _, events = replay(doc, include_usage=True)
    back = completion_from_stream([e[6:-2] for e in events[:-1]])
    assert back == doc
