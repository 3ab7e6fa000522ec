"""A streamed and a unary request share one entry: a stream replayed from the cache has the shape
of a live stream (chunk objects, one id, the role first, the finish reason, a usage chunk exactly
when `stream_options.include_usage` asks for one, `data: [DONE]` last) and says the same thing as
the answer that was cached, whichever way that answer was first produced.

Checked through the official SDK's streaming client and, for the framing, as raw SSE over httpx."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from .helpers import MESSAGES, CacheGateway, sse_events

WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather for a city",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "number"}},
                                "required": ["city"]}},
}


@dataclass
class Streamed:
    cache: str
    chunks: list[Any]  # openai ChatCompletionChunk

    @property
    def ids(self) -> set[str]:
        return {c.id for c in self.chunks}

    def text(self, index: int = 0) -> str:
        return "".join(ch.delta.content or "" for c in self.chunks for ch in c.choices if ch.index == index)

    def finishes(self, index: int = 0) -> list[str]:
        return [ch.finish_reason for c in self.chunks for ch in c.choices if ch.index == index and ch.finish_reason]

    @property
    def usage_chunks(self) -> list[Any]:
        return [c for c in self.chunks if c.usage is not None]

    def tool_calls(self) -> list[dict[str, Any]]:
        """Tool calls accumulated the way SDK users do: by index, id/name once, arguments appended."""
        calls: dict[int, dict[str, Any]] = {}
        for c in self.chunks:
            for ch in c.choices:
                for tc in ch.delta.tool_calls or ():
                    slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                    if tc.id:
                        slot["id"] = tc.id
                    if tc.function is not None:
                        slot["name"] += tc.function.name or ""
                        slot["arguments"] += tc.function.arguments or ""
        return [calls[i] for i in sorted(calls)]


def _sdk_kwargs(body: dict[str, Any]) -> dict[str, Any]:
    """SDK keyword arguments; the simulator's own fields travel in `extra_body`."""
    kw: dict[str, Any] = {"model": "chat-a", "messages": MESSAGES, "temperature": 0}
    extra = {k: body.pop(k) for k in list(body) if k.startswith("sim_")}
    kw.update(body)
    if extra:
        kw["extra_body"] = extra
    return kw


def sdk_stream(cg: CacheGateway, include_usage: bool | None = None, **body: Any) -> Streamed:
    kw = _sdk_kwargs(body)
    if include_usage is not None:
        kw["stream_options"] = {"include_usage": include_usage}
    raw = cg.client().chat.completions.with_raw_response.create(stream=True, **kw)
    chunks = list(raw.parse())
    return Streamed(raw.headers["x-setpoint-cache"], chunks)


def sdk_unary(cg: CacheGateway, **body: Any) -> tuple[str, Any]:
    kw = _sdk_kwargs(body)
    raw = cg.client().chat.completions.with_raw_response.create(**kw)
    return raw.headers["x-setpoint-cache"], raw.parse()


def assert_stream_shape(s: Streamed, *, include_usage: bool, n: int = 1) -> None:
    """What every well-formed chat stream looks like to an SDK user."""
    assert s.chunks, "no chunks"
    assert all(c.object == "chat.completion.chunk" for c in s.chunks)
    assert len(s.ids) == 1, f"one id per stream, got {s.ids}"
    assert len({c.created for c in s.chunks}) == 1 and len({c.model for c in s.chunks}) == 1
    first = s.chunks[0]
    assert sorted(ch.index for ch in first.choices) == list(range(n))
    assert all(ch.delta.role == "assistant" for ch in first.choices), "the role comes first"
    assert all(ch.delta.role is None for c in s.chunks[1:] for ch in c.choices), "and only once"
    for i in range(n):
        assert len(s.finishes(i)) == 1, f"choice {i}: exactly one finish_reason"
    if include_usage:
        assert len(s.usage_chunks) == 1 and s.usage_chunks[0] is s.chunks[-1], "usage is the last chunk"
        assert s.chunks[-1].choices == []
    else:
        assert s.usage_chunks == []
        assert all(c.choices for c in s.chunks), "no usage-only chunk when the client did not ask"


def chunk_keys(sse_text: str) -> list[tuple[frozenset[str], frozenset[str]]]:
    """Per chunk: its fields and the fields of its first choice (empty for a usage chunk)."""
    out = []
    for payload in sse_events(sse_text)[:-1]:
        doc = orjson.loads(payload)
        choice = doc["choices"][0] if doc["choices"] else {}
        out.append((frozenset(doc), frozenset(choice)))
    return out


# -- unary miss, streamed hit -----------------------------------------------------------------------


@pytest.mark.parametrize("include_usage", [None, False, True], ids=["no-options", "usage-false", "usage-true"])
def test_unary_miss_then_streamed_hit(cache_gateway: Callable[..., CacheGateway], include_usage: bool | None) -> None:
    cg = cache_gateway()
    status, original = sdk_unary(cg)
    assert status == "miss"
    cg.wait_written(original.id)

    s = sdk_stream(cg, include_usage)
    assert s.cache == "hit"
    assert cg.upstream_count == 1
    assert_stream_shape(s, include_usage=include_usage is True)
    assert s.ids == {original.id}
    assert s.chunks[0].model == original.model and s.chunks[0].created == original.created
    assert s.text() == original.choices[0].message.content
    assert s.finishes() == [original.choices[0].finish_reason] == ["stop"]
    if include_usage:
        assert s.usage_chunks[0].usage == original.usage


# -- streamed miss, unary hit -----------------------------------------------------------------------


@pytest.mark.parametrize("include_usage", [False, True], ids=["usage-false", "usage-true"])
def test_streamed_miss_then_unary_hit(cache_gateway: Callable[..., CacheGateway], include_usage: bool) -> None:
    cg = cache_gateway()
    live = sdk_stream(cg, include_usage)
    assert live.cache == "miss"
    assert_stream_shape(live, include_usage=include_usage)
    (rid,) = live.ids
    cg.wait_written(rid)

    status, hit = sdk_unary(cg)
    assert status == "hit"
    assert cg.upstream_count == 1
    assert hit.object == "chat.completion"
    assert hit.id == rid
    assert hit.model == live.chunks[0].model and hit.created == live.chunks[0].created
    assert hit.choices[0].message.role == "assistant"
    assert hit.choices[0].message.content == live.text()
    assert hit.choices[0].finish_reason == live.finishes()[0] == "stop"
    # The gateway asked upstream for usage even when the client did not: the entry always has it.
    assert hit.usage is not None
    (row,) = [r for r in cg.rows() if r["cache_status"] == "miss"]
    assert (hit.usage.prompt_tokens, hit.usage.completion_tokens) == (row["prompt_tokens"], row["completion_tokens"])
    if include_usage:
        assert hit.usage == live.usage_chunks[0].usage


# -- streamed miss, streamed hit --------------------------------------------------------------------


@pytest.mark.parametrize("live_usage,replay_usage", [(False, False), (False, True), (True, False), (True, True)])
def test_streamed_miss_then_streamed_hit(cache_gateway: Callable[..., CacheGateway], live_usage: bool,
                                         replay_usage: bool) -> None:
    cg = cache_gateway()
    live = sdk_stream(cg, live_usage)
    assert live.cache == "miss"
    (rid,) = live.ids
    cg.wait_written(rid)

    replay = sdk_stream(cg, replay_usage)
    assert replay.cache == "hit"
    assert cg.upstream_count == 1
    assert_stream_shape(replay, include_usage=replay_usage)
    assert replay.ids == {rid}
    assert replay.text() == live.text()
    assert replay.finishes() == live.finishes() == ["stop"]
    if replay_usage:
        u = replay.usage_chunks[0].usage
        (row,) = [r for r in cg.rows() if r["cache_status"] == "miss"]
        assert (u.prompt_tokens, u.completion_tokens) == (row["prompt_tokens"], row["completion_tokens"])
        if live_usage:
            assert u == live.usage_chunks[0].usage


# -- raw framing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("include_usage", [False, True])
def test_raw_sse_framing_of_a_replay_matches_a_live_stream(cache_gateway: Callable[..., CacheGateway],
                                                           include_usage: bool) -> None:
    cg = cache_gateway()
    body: dict[str, Any] = {"stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    live = cg.chat(**body)
    assert live.status_code == 200 and live.headers["x-setpoint-cache"] == "miss"
    live_events = sse_events(live.text)
    rid = orjson.loads(live_events[0])["id"]
    cg.wait_written(rid)

    hit = cg.chat(**body)
    assert hit.status_code == 200
    assert hit.headers["x-setpoint-cache"] == "hit"
    assert hit.headers["content-type"].startswith("text/event-stream")
    assert hit.headers["content-type"] == live.headers["content-type"]
    assert hit.headers["x-request-id"].startswith("req_") and hit.headers["x-request-id"] != live.headers["x-request-id"]
    events = sse_events(hit.text)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    docs = [orjson.loads(e) for e in events[:-1]]
    assert {d["id"] for d in docs} == {rid}
    assert docs[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [bool(d.get("usage")) for d in docs] == [False] * (len(docs) - 1) + [include_usage]
    # Same framing and same fields as the live stream (a replay may add system_fingerprint, which
    # OpenAI's own chunks carry).
    live_keys, hit_keys = chunk_keys(live.text), chunk_keys(hit.text)
    live_chunk_fields = frozenset().union(*(k for k, _ in live_keys))
    hit_chunk_fields = frozenset().union(*(k for k, _ in hit_keys))
    assert live_chunk_fields <= hit_chunk_fields <= live_chunk_fields | {"system_fingerprint"}
    assert {c for _, c in hit_keys if c} == {c for _, c in live_keys if c}
    assert (live_keys[-1][1] == frozenset()) == (hit_keys[-1][1] == frozenset()) == include_usage


def test_replay_concatenation_equals_the_live_stream_text_exactly(cache_gateway: Callable[..., CacheGateway]) -> None:
    cg = cache_gateway()
    live = cg.chat(stream=True, sim_output_tokens=12)
    live_docs = [orjson.loads(e) for e in sse_events(live.text)[:-1]]
    cg.wait_written(live_docs[0]["id"])
    hit = cg.chat(stream=True, sim_output_tokens=12)
    assert hit.headers["x-setpoint-cache"] == "hit"
    hit_docs = [orjson.loads(e) for e in sse_events(hit.text)[:-1]]

    def text(docs: list[dict[str, Any]]) -> str:
        return "".join(c["delta"].get("content") or "" for d in docs for c in d["choices"])

    assert len([d for d in live_docs if d["choices"] and d["choices"][0]["delta"].get("content")]) == 12
    assert text(hit_docs) == text(live_docs) and len(text(live_docs).split()) == 12


# -- several choices, tool calls --------------------------------------------------------------------


def test_several_choices_unary_to_stream_and_stream_to_unary(cache_gateway: Callable[..., CacheGateway]) -> None:
    cg = cache_gateway()
    status, original = sdk_unary(cg, n=2, sim_output_tokens=5)
    assert status == "miss"
    cg.wait_written(original.id)
    s = sdk_stream(cg, True, n=2, sim_output_tokens=5)
    assert s.cache == "hit"
    assert_stream_shape(s, include_usage=True, n=2)
    assert [s.text(i) for i in (0, 1)] == [c.message.content for c in original.choices]

    live = sdk_stream(cg, False, n=2, sim_output_tokens=6)
    assert live.cache == "miss"
    cg.wait_written(next(iter(live.ids)))
    status, hit = sdk_unary(cg, n=2, sim_output_tokens=6)
    assert status == "hit"
    assert [c.message.content for c in hit.choices] == [live.text(0), live.text(1)]
    assert [c.finish_reason for c in hit.choices] == ["stop", "stop"]
    assert cg.upstream_count == 2


def test_tool_call_unary_miss_then_streamed_hit(cache_gateway: Callable[..., CacheGateway]) -> None:
    cg = cache_gateway()
    status, original = sdk_unary(cg, tools=[WEATHER_TOOL])
    assert status == "miss"
    (call,) = original.choices[0].message.tool_calls
    assert original.choices[0].finish_reason == "tool_calls"
    cg.wait_written(original.id)

    s = sdk_stream(cg, False, tools=[WEATHER_TOOL])
    assert s.cache == "hit"
    assert_stream_shape(s, include_usage=False)
    assert s.tool_calls() == [{"id": call.id, "name": "get_weather", "arguments": call.function.arguments}]
    assert s.text() == ""
    assert s.finishes() == ["tool_calls"]
    assert cg.upstream_count == 1


def test_tool_call_streamed_miss_then_hits(cache_gateway: Callable[..., CacheGateway]) -> None:
    cg = cache_gateway()
    live = sdk_stream(cg, True, tools=[WEATHER_TOOL])
    assert live.cache == "miss"
    (expected,) = live.tool_calls()
    assert expected["name"] == "get_weather" and orjson.loads(expected["arguments"]) == {"city": "42", "days": 42}
    cg.wait_written(next(iter(live.ids)))

    replay = sdk_stream(cg, True, tools=[WEATHER_TOOL])
    assert replay.cache == "hit"
    assert_stream_shape(replay, include_usage=True)
    assert replay.tool_calls() == [expected]
    assert replay.finishes() == ["tool_calls"]

    status, hit = sdk_unary(cg, tools=[WEATHER_TOOL])
    assert status == "hit"
    (call,) = hit.choices[0].message.tool_calls
    assert (call.id, call.type, call.function.name, call.function.arguments) == (
        expected["id"], "function", expected["name"], expected["arguments"])
    assert hit.choices[0].finish_reason == "tool_calls"
    assert cg.upstream_count == 1


def test_tool_call_from_a_stream_replays_as_unary_with_null_content(cache_gateway: Callable[..., CacheGateway]) -> None:
    cg = cache_gateway()
    live_status, live_unary = sdk_unary(cg, tools=[WEATHER_TOOL], sim_output_tokens=3)
    assert live_status == "miss" and live_unary.choices[0].message.content is None  # what a live answer says
    live = sdk_stream(cg, False, tools=[WEATHER_TOOL], seed=9)
    cg.wait_written(next(iter(live.ids)))
    status, hit = sdk_unary(cg, tools=[WEATHER_TOOL], seed=9)
    assert status == "hit"
    assert hit.choices[0].message.content is None


# -- the request records of streamed hits -----------------------------------------------------------


def test_records_of_hits(cache_gateway: Callable[..., CacheGateway]) -> None:
    cg = cache_gateway()
    live = sdk_stream(cg, False)
    cg.wait_written(next(iter(live.ids)))
    sdk_stream(cg, True)
    sdk_unary(cg)
    miss, stream_hit, unary_hit = cg.rows()
    assert miss["cache_status"] == "miss" and miss["is_stream"] == 1 and miss["cost_micros"] > 0
    assert miss["saved_micros"] is None and miss["finish_reason"] == "stop"
    for row, is_stream in ((stream_hit, 1), (unary_hit, 0)):
        assert row["cache_status"] == "hit"
        assert row["is_stream"] == is_stream
        assert row["status"] == 200 and row["error_code"] is None
        assert row["deployment"] is None and row["provider"] is None and row["upstream_ms"] is None
        assert row["cost_micros"] == 0
        assert (row["prompt_tokens"], row["completion_tokens"]) == (0, 0)
        assert row["saved_micros"] == miss["cost_micros"]
    assert stream_hit["finish_reason"] == "stop"


def test_unary_hit_record_has_the_finish_reason(cache_gateway: Callable[..., CacheGateway]) -> None:
    cg = cache_gateway()
    status, original = sdk_unary(cg, max_tokens=2)
    cg.wait_written(original.id)
    assert original.choices[0].finish_reason == "length"
    assert sdk_unary(cg, max_tokens=2)[0] == "hit"
    miss, hit = cg.rows()
    assert miss["finish_reason"] == "length"
    assert hit["finish_reason"] == "length"
