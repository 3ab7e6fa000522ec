"""The Anthropic Messages adapter behind the OpenAI surface.

Three layers: the request translation as a pure function; the adapter against a local aiohttp
stand-in for api.anthropic.com that plays recorded responses (tests/fixtures/providers/anthropic)
and records what it received; and the whole gateway (`BackgroundGateway`) driven by the official
`openai` SDK with a `type: anthropic` provider pointing at the stand-in.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict

from setpoint.clock import ManualClock
from setpoint.config.load import parse_config
from setpoint.config.schema import AnthropicProviderConfig
from setpoint.errors import (
    ConfigError,
    ProviderRateLimitedError,
    ProviderRejectedError,
    ProviderResponseError,
    ProviderUnavailableError,
    UpstreamError,
)
from setpoint.providers.anthropic import AnthropicProvider, to_anthropic_request, to_openai_completion
from setpoint.types import Reply, UpstreamCall

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "providers" / "anthropic"
API_KEY = "sk-ant-api03-test-upstream-secret"
UPSTREAM_MODEL = "claude-sonnet-4-20250514"
EPOCH = 1_700_000_000
DEFAULT_MAX_TOKENS = 4096

WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "number"}},
    "required": ["city"],
}
WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather for a city", "parameters": WEATHER_PARAMS},
}
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is a set point?"}]


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def fixture_json(name: str) -> dict[str, Any]:
    doc = json.loads(fixture_bytes(name))
    assert isinstance(doc, dict)
    return doc


def translate(body: dict[str, Any], *, stream: bool = False) -> dict[str, Any]:
    return to_anthropic_request({"model": UPSTREAM_MODEL, **body}, DEFAULT_MAX_TOKENS, stream=stream)


def text(s: str) -> dict[str, Any]:
    return {"type": "text", "text": s}


# =============================================================================================
# request translation (pure)
# =============================================================================================


def test_system_and_developer_messages_become_the_system_prompt() -> None:
    out = translate({"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "developer", "content": [{"type": "text", "text": "Cite the manual.",
                                           "cache_control": {"type": "ephemeral"}}]},
        {"role": "user", "content": "hi"},
    ]})
    assert out["system"] == [text("You are terse."),
                             {**text("Cite the manual."), "cache_control": {"type": "ephemeral"}}]
    assert out["messages"] == [{"role": "user", "content": [text("hi")]}]


def test_only_the_translated_fields_are_sent() -> None:
    out = translate({
        "messages": [{"role": "user", "content": "hi"}],
        "n": 1, "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 2,
        "presence_penalty": 0.5, "frequency_penalty": 0.1, "seed": 7, "logit_bias": {"50256": -100},
        "response_format": {"type": "json_object"}, "parallel_tool_calls": False, "store": True,
        "sim_fault": "rate_limit", "sim_output_tokens": 5,
    })
    assert out == {"model": UPSTREAM_MODEL, "max_tokens": DEFAULT_MAX_TOKENS,
                   "messages": [{"role": "user", "content": [text("hi")]}]}


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        pytest.param({}, DEFAULT_MAX_TOKENS, id="default"),
        pytest.param({"max_tokens": 100}, 100, id="max_tokens"),
        pytest.param({"max_completion_tokens": 50, "max_tokens": 100}, 50, id="max_completion_tokens_wins"),
    ],
)
def test_max_tokens(limits: dict[str, int], expected: int) -> None:
    assert translate({"messages": MESSAGES, **limits})["max_tokens"] == expected


def test_default_max_tokens_comes_from_the_config() -> None:
    assert AnthropicProviderConfig(type="anthropic").default_max_tokens == DEFAULT_MAX_TOKENS
    out = to_anthropic_request({"model": UPSTREAM_MODEL, "messages": MESSAGES}, 321, stream=False)
    assert out["max_tokens"] == 321


def test_sampling_stop_user_and_stream() -> None:
    out = translate({"messages": MESSAGES, "temperature": 0.2, "top_p": 0.9, "top_k": 40, "stop": "\n\n",
                     "user": "alice"}, stream=True)
    assert (out["temperature"], out["top_p"], out["top_k"]) == (0.2, 0.9, 40)
    assert out["stop_sequences"] == ["\n\n"]
    assert out["metadata"] == {"user_id": "alice"}
    assert out["stream"] is True
    assert translate({"messages": MESSAGES, "stop": ["END", "STOP"]})["stop_sequences"] == ["END", "STOP"]
    assert "stream" not in translate({"messages": MESSAGES})


def test_function_tools_get_input_schemas() -> None:
    bare = {"type": "function", "function": {"name": "now"}}
    out = translate({"messages": MESSAGES, "tools": [WEATHER_TOOL, bare]})
    assert out["tools"] == [
        {"name": "get_weather", "description": "Weather for a city", "input_schema": WEATHER_PARAMS},
        {"name": "now", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert "tool_choice" not in out  # OpenAI's and Anthropic's default are both auto


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        pytest.param("auto", None, {"type": "auto"}, id="auto"),
        pytest.param("none", None, {"type": "none"}, id="none"),
        pytest.param("required", None, {"type": "any"}, id="required"),
        pytest.param({"type": "function", "function": {"name": "get_weather"}}, None,
                     {"type": "tool", "name": "get_weather"}, id="named"),
        pytest.param(None, False, {"type": "auto", "disable_parallel_tool_use": True}, id="no_parallel"),
        pytest.param("required", False, {"type": "any", "disable_parallel_tool_use": True}, id="required_no_parallel"),
        pytest.param("none", False, {"type": "none"}, id="none_ignores_parallel"),
    ],
)
def test_tool_choice(choice: Any, parallel: bool | None, expected: dict[str, Any]) -> None:
    body: dict[str, Any] = {"messages": MESSAGES, "tools": [WEATHER_TOOL]}
    if choice is not None:
        body["tool_choice"] = choice
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    assert translate(body)["tool_choice"] == expected


def test_tool_calls_and_results_become_tool_use_and_merged_tool_result_turns() -> None:
    out = translate({"messages": [
        {"role": "user", "content": "Weather in Paris and Lyon?"},
        {"role": "assistant", "content": "Checking both.", "tool_calls": [
            {"id": "toolu_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "toolu_2", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'}},
        ]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18C, sunny"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": [{"type": "text", "text": "15C, rain"}]},
        {"role": "user", "content": "Which is warmer?"},
    ]})
    assert out["messages"] == [
        {"role": "user", "content": [text("Weather in Paris and Lyon?")]},
        {"role": "assistant", "content": [
            text("Checking both."),
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Lyon"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [text("18C, sunny")]},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": [text("15C, rain")]},
            text("Which is warmer?"),
        ]},
    ]


def test_assistant_tool_call_without_text_or_arguments() -> None:
    out = translate({"messages": [
        {"role": "user", "content": "time?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "toolu_9", "type": "function", "function": {"name": "now", "arguments": ""}}]},
    ]})
    assert out["messages"][1] == {"role": "assistant",
                                  "content": [{"type": "tool_use", "id": "toolu_9", "name": "now", "input": {}}]}


def test_image_parts() -> None:
    out = translate({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Compare"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "high"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]}]})
    assert out["messages"][0]["content"] == [
        text("Compare"),
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


@pytest.mark.parametrize(
    ("body", "hint"),
    [
        pytest.param({"n": 2}, "'n'", id="n_above_one"),
        pytest.param({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "role", id="function_role"),
        pytest.param({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
                     "input_audio", id="audio_part"),
        pytest.param({"messages": [{"role": "system", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}, *MESSAGES[1:]]},
                     "only contain text", id="image_in_system"),
        pytest.param({"messages": [{"role": "assistant", "tool_calls": [
            {"id": "t", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]},
                     "arguments", id="bad_arguments"),
        pytest.param({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id", id="tool_without_id"),
        pytest.param({"tools": [{"type": "web_search"}]}, "function tools", id="non_function_tool"),
        pytest.param({"tools": [WEATHER_TOOL], "tool_choice": "sometimes"}, "tool_choice", id="bad_tool_choice"),
        pytest.param({"stop": 5}, "stop", id="bad_stop"),
    ],
)
def test_untranslatable_requests_are_400(body: dict[str, Any], hint: str) -> None:
    with pytest.raises(ProviderRejectedError) as info:
        translate({"messages": MESSAGES, **body})
    assert info.value.status == 400
    assert not info.value.is_retryable
    assert hint in info.value.message


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"),
     ("refusal", "content_filter")],
)
def test_stop_reasons(stop_reason: str, finish: str) -> None:
    doc = {**fixture_json("text.json"), "stop_reason": stop_reason}
    assert to_openai_completion("anthropic", doc, EPOCH)["choices"][0]["finish_reason"] == finish


# =============================================================================================
# a local stand-in for api.anthropic.com
# =============================================================================================


@dataclass(frozen=True)
class Canned:
    """One recorded answer: a JSON body, or an SSE body written event by event."""

    body: bytes
    status: int = 200
    is_stream: bool = False
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Seen:
    path: str
    headers: CIMultiDict[str]
    body: dict[str, Any]
    at: float


def canned_json(name: str, status: int = 200, **headers: str) -> Canned:
    return Canned(fixture_bytes(name), status=status, headers={k.replace("_", "-"): v for k, v in headers.items()})


def canned_sse(name: str, drop_last: int = 0) -> Canned:
    events = fixture_bytes(name).split(b"\n\n")[:-1]
    return Canned(b"".join(e + b"\n\n" for e in events[: len(events) - drop_last]), is_stream=True)


class FakeAnthropic:
    """Answers `POST /v1/messages` with the canned answers in order (the last one repeats)."""

    def __init__(self, *answers: Canned) -> None:
        self._answers = answers
        self.seen: list[Seen] = []
        self.url = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/messages", self._messages)
        return app

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(Seen(request.path, request.headers.copy(), await request.json(), time.monotonic()))
        answer = self._answers[min(len(self.seen), len(self._answers)) - 1]
        if not answer.is_stream:
            return web.Response(status=answer.status, body=answer.body, content_type="application/json",
                                headers=answer.headers)
        resp = web.StreamResponse(status=answer.status, headers={"Content-Type": "text/event-stream", **answer.headers})
        await resp.prepare(request)
        for event in answer.body.split(b"\n\n")[:-1]:
            half = len(event) // 2  # split each event across writes: the adapter must reframe
            await resp.write(event[:half])
            await resp.write(event[half:] + b"\n\n")
        await resp.write_eof()
        return resp


@pytest.fixture
def anthropic(serve_app: Callable[[web.Application], Any]) -> Callable[..., FakeAnthropic]:
    """`anthropic(*answers)` -> a started `FakeAnthropic` (`.url`, `.seen`)."""

    def start(*answers: Canned) -> FakeAnthropic:
        fake = FakeAnthropic(*answers)
        fake.url = serve_app(fake.app()).url
        return fake

    return start


@pytest.fixture
async def make_provider() -> AsyncIterator[Callable[..., AnthropicProvider]]:
    made: list[AnthropicProvider] = []

    def make(base_url: str, **overrides: Any) -> AnthropicProvider:
        cfg = AnthropicProviderConfig(type="anthropic", base_url=base_url, api_key=API_KEY, **overrides)
        provider = AnthropicProvider("anthropic", cfg, ManualClock(start=EPOCH))
        made.append(provider)
        return provider

    yield make
    for p in made:
        await p.aclose()


def chat_call(body: dict[str, Any] | None = None, *, stream: bool = False) -> UpstreamCall:
    full = {"model": UPSTREAM_MODEL, "messages": MESSAGES, **(body or {})}
    return UpstreamCall(path="/chat/completions", body=full, is_stream=stream, request_id="req_test")


def payloads(chunks: list[bytes]) -> list[bytes]:
    """The `data:` payloads of OpenAI SSE bytes."""
    events = b"".join(chunks).split(b"\n\n")
    assert events[-1] == b"", "the output must end on an event boundary"
    assert all(e.startswith(b"data: ") for e in events[:-1]), events
    return [e[6:] for e in events[:-1]]


async def drain(reply: Reply, into: list[bytes]) -> None:
    assert reply.stream is not None and reply.body is None
    try:
        async for chunk in reply.stream:
            into.append(chunk)
    finally:
        await reply.stream.aclose()


def stream_text(docs: list[dict[str, Any]]) -> str:
    return "".join(d["choices"][0]["delta"].get("content") or "" for d in docs if d["choices"])


def finishes(docs: list[dict[str, Any]]) -> list[str]:
    return [d["choices"][0]["finish_reason"] for d in docs if d["choices"] and d["choices"][0]["finish_reason"]]


# =============================================================================================
# the adapter against the stand-in
# =============================================================================================


async def test_unary_text_request_and_answer(anthropic, make_provider) -> None:
    fake = anthropic(canned_json("text.json"))
    reply = await make_provider(fake.url).send(chat_call({"max_tokens": 64, "temperature": 0.3}))

    (seen,) = fake.seen
    assert seen.path == "/v1/messages"
    assert seen.headers["x-api-key"] == API_KEY
    assert seen.headers["anthropic-version"] == "2023-06-01"
    assert seen.headers["content-type"] == "application/json"
    assert "authorization" not in seen.headers
    assert seen.body == {
        "model": UPSTREAM_MODEL, "max_tokens": 64, "system": [text("You are terse.")],
        "messages": [{"role": "user", "content": [text("What is a set point?")]}], "temperature": 0.3,
    }

    assert reply.status == 200 and reply.stream is None
    doc = orjson.loads(reply.body or b"")
    assert doc["object"] == "chat.completion"
    assert doc["id"] == "msg_01XFDUDYJgAACzvnptvVoYEL"
    assert doc["model"] == UPSTREAM_MODEL
    assert doc["created"] == EPOCH
    assert doc["choices"] == [{
        "index": 0, "logprobs": None, "finish_reason": "stop",
        "message": {"role": "assistant", "content": "A set point is the target value a control system tries to hold."},
    }]
    # cache writes are prompt tokens too (21 + 1290); none were read from the cache
    assert doc["usage"] == {"prompt_tokens": 1311, "completion_tokens": 17, "total_tokens": 1328,
                            "prompt_tokens_details": {"cached_tokens": 0}}


async def test_unary_tool_use(anthropic, make_provider) -> None:
    fake = anthropic(canned_json("tool_use.json"))
    reply = await make_provider(fake.url).send(chat_call({"tools": [WEATHER_TOOL], "tool_choice": "required"}))

    assert fake.seen[0].body["tools"] == [
        {"name": "get_weather", "description": "Weather for a city", "input_schema": WEATHER_PARAMS}]
    assert fake.seen[0].body["tool_choice"] == {"type": "any"}
    doc = orjson.loads(reply.body or b"")
    choice = doc["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "I'll look up the forecast for Paris."
    (call,) = choice["message"]["tool_calls"]
    assert call["id"] == "toolu_01A09q90qw90lq917835lq9"
    assert call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "days": 2}
    assert doc["usage"] == {"prompt_tokens": 1624, "completion_tokens": 71, "total_tokens": 1695,
                            "prompt_tokens_details": {"cached_tokens": 1536}}


async def test_configured_headers_replace_defaults_case_insensitively(anthropic, make_provider) -> None:
    fake = anthropic(canned_json("text.json"))
    provider = make_provider(fake.url, headers={"Anthropic-Version": "2099-01-01", "anthropic-beta": "x-test"})
    await provider.send(chat_call())
    headers = fake.seen[0].headers
    assert headers.getall("anthropic-version") == ["2099-01-01"]
    assert headers["anthropic-beta"] == "x-test"


async def test_stream_text(anthropic, make_provider) -> None:
    fake = anthropic(canned_sse("stream_text.sse"))
    chunks: list[bytes] = []
    await drain(await make_provider(fake.url).send(chat_call(stream=True)), chunks)

    assert fake.seen[0].body["stream"] is True
    assert "stream_options" not in fake.seen[0].body
    data = payloads(chunks)
    assert data[-1] == b"[DONE]"
    docs = [orjson.loads(d) for d in data[:-1]]
    assert all(d["object"] == "chat.completion.chunk" for d in docs)
    assert {d["id"] for d in docs} == {"msg_01TXpQmR7hV3b6wq1kYc2aGd"}
    assert {d["model"] for d in docs} == {UPSTREAM_MODEL}
    assert docs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert stream_text(docs) == "A set point is the target value a controller holds."
    assert finishes(docs) == ["stop"]
    usage_chunk = docs[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 25, "completion_tokens": 12, "total_tokens": 37,
                                    "prompt_tokens_details": {"cached_tokens": 0}}


async def test_stream_tool_use_arguments_arrive_in_pieces(anthropic, make_provider) -> None:
    fake = anthropic(canned_sse("stream_tool_use.sse"))
    chunks: list[bytes] = []
    await drain(await make_provider(fake.url).send(chat_call({"tools": [WEATHER_TOOL]}, stream=True)), chunks)

    docs = [orjson.loads(d) for d in payloads(chunks)[:-1]]
    calls: dict[int, dict[str, str]] = {}
    for d in docs:
        for tc in (d["choices"][0]["delta"].get("tool_calls") or []) if d["choices"] else []:
            acc = calls.setdefault(tc["index"], {"id": "", "name": "", "arguments": ""})
            acc["id"] += tc.get("id") or ""
            acc["name"] += tc.get("function", {}).get("name") or ""
            acc["arguments"] += tc.get("function", {}).get("arguments") or ""
    assert sorted(calls) == [0, 1]  # content blocks 1 and 2 are OpenAI tool calls 0 and 1
    assert [(c["id"], c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == [
        ("toolu_01T1x1fJ34qAmk2tNTrN7Up6", "get_weather", {"city": "Paris", "days": 2}),
        ("toolu_01Q8hX3cRzv5DkP7mJ2eWn4B", "get_weather", {"city": "Lyon"}),
    ]
    assert stream_text(docs) == "Checking both cities."
    assert finishes(docs) == ["tool_calls"]
    assert docs[-1]["usage"]["prompt_tokens"] == 472 and docs[-1]["usage"]["completion_tokens"] == 89


async def test_stream_usage_counts_cache_reads_and_writes(anthropic, make_provider) -> None:
    fake = anthropic(canned_sse("stream_cached.sse"))
    chunks: list[bytes] = []
    await drain(await make_provider(fake.url).send(chat_call(stream=True)), chunks)
    usage = orjson.loads(payloads(chunks)[-2])["usage"]
    assert usage == {"prompt_tokens": 14 + 312 + 1843, "completion_tokens": 9, "total_tokens": 14 + 312 + 1843 + 9,
                     "prompt_tokens_details": {"cached_tokens": 1843}}


async def test_error_event_mid_stream_raises_after_what_came_before(anthropic, make_provider) -> None:
    fake = anthropic(canned_sse("stream_error.sse"))
    chunks: list[bytes] = []
    reply = await make_provider(fake.url).send(chat_call(stream=True))
    with pytest.raises(ProviderUnavailableError) as info:
        await drain(reply, chunks)
    assert "Overloaded" in info.value.message
    assert info.value.status == 503
    data = payloads(chunks)
    assert b"[DONE]" not in data
    assert stream_text([orjson.loads(d) for d in data]) == "A set point is"


async def test_stream_cut_before_message_stop_never_ends_cleanly(anthropic, make_provider) -> None:
    fake = anthropic(canned_sse("stream_text.sse", drop_last=1))  # everything but message_stop
    chunks: list[bytes] = []
    reply = await make_provider(fake.url).send(chat_call(stream=True))
    with pytest.raises(ProviderResponseError, match="message_stop"):
        await drain(reply, chunks)
    data = payloads(chunks)
    assert b"[DONE]" not in data
    assert not any(b'"usage"' in d for d in data)
    assert stream_text([orjson.loads(d) for d in data]) == "A set point is the target value a controller holds."


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize(
    ("answer", "error", "status", "retryable", "in_message"),
    [
        pytest.param(canned_json("error_429.json", 429, retry_after="7"), ProviderRateLimitedError, 429, True,
                     "50,000 input tokens per minute", id="429"),
        pytest.param(canned_json("error_529.json", 529), ProviderUnavailableError, 503, True, "Overloaded", id="529"),
        pytest.param(canned_json("error_401.json", 401), ProviderResponseError, 502, False, "credentials", id="401"),
        pytest.param(canned_json("error_400.json", 400), ProviderRejectedError, 400, False,
                     "max_tokens: 300000 > 64000", id="400"),
    ],
)
async def test_http_errors(anthropic, make_provider, stream: bool, answer: Canned, error: type[UpstreamError],
                           status: int, retryable: bool, in_message: str) -> None:
    fake = anthropic(answer)
    with pytest.raises(error) as info:
        await make_provider(fake.url).send(chat_call(stream=stream))
    err = info.value
    assert type(err) is error
    assert (err.status, err.is_retryable) == (status, retryable)
    assert in_message in err.message
    assert API_KEY not in err.message
    if isinstance(err, ProviderRateLimitedError):
        assert err.retry_after_s == 7.0
        assert err.headers() == {"Retry-After": "7"}


async def test_embeddings_are_refused_without_calling_anthropic(anthropic, make_provider) -> None:
    fake = anthropic(canned_json("text.json"))
    call = UpstreamCall(path="/embeddings", body={"model": UPSTREAM_MODEL, "input": "x"}, is_stream=False,
                        request_id="req_test")
    with pytest.raises(ProviderRejectedError, match="Anthropic has no embeddings endpoint") as info:
        await make_provider(fake.url).send(call)
    assert info.value.status == 400
    assert fake.seen == []


async def test_untranslatable_request_never_reaches_anthropic(anthropic, make_provider) -> None:
    fake = anthropic(canned_json("text.json"))
    with pytest.raises(ProviderRejectedError):
        await make_provider(fake.url).send(chat_call({"n": 3}))
    assert fake.seen == []


async def test_unreachable_upstream_is_unavailable(make_provider, free_port) -> None:
    with pytest.raises(ProviderUnavailableError, match="unreachable"):
        await make_provider(f"http://127.0.0.1:{free_port()}").send(chat_call())


async def test_bodies_that_are_not_what_was_asked_for(anthropic, make_provider) -> None:
    not_json = anthropic(Canned(b"<html>upstream proxy error</html>"))  # served as application/json
    with pytest.raises(ProviderResponseError, match="not valid JSON"):
        await make_provider(not_json.url).send(chat_call())
    json_for_stream = anthropic(canned_json("text.json"))
    with pytest.raises(ProviderResponseError, match="content type 'application/json'"):
        await make_provider(json_for_stream.url).send(chat_call(stream=True))


# =============================================================================================
# config
# =============================================================================================


def test_config_defaults_and_errors() -> None:
    root = parse_config({"providers": {"claude": {"type": "anthropic", "api_key": "${ANTHROPIC_API_KEY}"}}},
                        env={"ANTHROPIC_API_KEY": "k"})
    cfg = root.providers["claude"]
    assert isinstance(cfg, AnthropicProviderConfig)
    assert (cfg.base_url, cfg.api_key, cfg.default_max_tokens) == ("https://api.anthropic.com", "k", 4096)
    with pytest.raises(ConfigError) as info:
        parse_config({"providers": {"claude": {"type": "anthropic", "base_url": "https://api.anthropic.com/v1",
                                               "bogus": 1}}}, env={})
    problems = info.value.problems
    assert any(p.startswith("providers.claude.base_url: ") and "/v1" in p for p in problems), problems
    assert "providers.claude.bogus: unknown key" in problems


# =============================================================================================
# end to end: openai SDK -> gateway -> adapter -> stand-in
# =============================================================================================


def gateway_config(url: str, key: str, **resilience: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "providers": {"claude": {"type": "anthropic", "base_url": url, "api_key": API_KEY}},
        "models": {
            "claude": {"deployments": [{"provider": "claude", "model": UPSTREAM_MODEL}]},
            "claude-embed": {"kind": "embedding", "deployments": [{"provider": "claude", "model": UPSTREAM_MODEL}]},
        },
        "keys": [{"name": "all", "key": key}],
    }
    if resilience:
        cfg["resilience"] = resilience
    return cfg


@pytest.fixture
def through_gateway(anthropic, make_gateway, make_client, keys) -> Callable[..., tuple[FakeAnthropic, Any, Any]]:
    """`through_gateway(*answers, **resilience)` -> (stand-in, gateway, SDK client)."""

    def start(*answers: Canned, **resilience: Any) -> tuple[FakeAnthropic, Any, openai.OpenAI]:
        fake = anthropic(*answers)
        gw = make_gateway(gateway_config(fake.url, keys.all, **resilience))
        return fake, gw, make_client(gw.base_url, keys.all)

    return start


def test_e2e_unary(through_gateway, gateway_rows) -> None:
    fake, gw, client = through_gateway(canned_json("text.json"))
    resp = client.chat.completions.create(model="claude", messages=MESSAGES, max_tokens=64, user="alice")

    assert resp.choices[0].message.content == "A set point is the target value a control system tries to hold."
    assert resp.choices[0].finish_reason == "stop"
    assert resp.model == UPSTREAM_MODEL
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (1311, 17)
    (seen,) = fake.seen
    assert seen.headers["x-api-key"] == API_KEY
    assert seen.body["model"] == UPSTREAM_MODEL and seen.body["max_tokens"] == 64
    assert seen.body["system"] == [text("You are terse.")]
    assert seen.body["metadata"] == {"user_id": "alice"}
    (row,) = gateway_rows(gw)
    assert (row["provider"], row["status"], row["prompt_tokens"], row["completion_tokens"]) == ("claude", 200, 1311, 17)


def test_e2e_stream_with_usage_counts_cached_tokens(through_gateway, gateway_rows) -> None:
    fake, gw, client = through_gateway(canned_sse("stream_cached.sse"))
    chunks = list(client.chat.completions.create(model="claude", messages=MESSAGES, stream=True,
                                                 stream_options={"include_usage": True}))

    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        "Per the manual you shared, reset the breaker first."
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (2169, 9, 2178)
    assert last.usage.prompt_tokens_details is not None and last.usage.prompt_tokens_details.cached_tokens == 1843
    assert all(c.usage is None for c in chunks[:-1])
    assert fake.seen[0].body["stream"] is True and "stream_options" not in fake.seen[0].body
    (row,) = gateway_rows(gw)
    assert (row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"]) == (2169, 1843, 9)
    assert row["finish_reason"] == "stop"


def test_e2e_stream_without_usage_hides_it_but_accounts_for_it(through_gateway, gateway_rows) -> None:
    _, gw, client = through_gateway(canned_sse("stream_text.sse"))
    chunks = list(client.chat.completions.create(model="claude", messages=MESSAGES, stream=True))

    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        "A set point is the target value a controller holds."
    assert all(c.choices and c.usage is None for c in chunks)
    (row,) = gateway_rows(gw)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (25, 12)


def test_e2e_streamed_tool_calls_reassemble(through_gateway) -> None:
    fake, _, client = through_gateway(canned_sse("stream_tool_use.sse"))
    stream = client.chat.completions.create(model="claude", messages=MESSAGES, tools=[WEATHER_TOOL],
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            parallel_tool_calls=False, stream=True)
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for tc in choice.delta.tool_calls or []:
                acc = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                acc["id"] += tc.id or ""
                acc["name"] += (tc.function.name if tc.function else None) or ""
                acc["arguments"] += (tc.function.arguments if tc.function else None) or ""
    assert finish == "tool_calls"
    assert [(c["id"], c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == [
        ("toolu_01T1x1fJ34qAmk2tNTrN7Up6", "get_weather", {"city": "Paris", "days": 2}),
        ("toolu_01Q8hX3cRzv5DkP7mJ2eWn4B", "get_weather", {"city": "Lyon"}),
    ]
    assert fake.seen[0].body["tool_choice"] == {"type": "tool", "name": "get_weather",
                                                "disable_parallel_tool_use": True}


def test_e2e_429_maps_to_rate_limit_error_with_retry_after(through_gateway) -> None:
    fake, _, client = through_gateway(canned_json("error_429.json", 429, retry_after="3"), max_attempts=1)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="claude", messages=MESSAGES)
    assert info.value.status_code == 429
    assert info.value.response.headers["retry-after"] == "3"
    assert info.value.code == "upstream_rate_limited"
    assert API_KEY not in info.value.response.text
    assert len(fake.seen) == 1


def test_e2e_429_is_retried_after_retry_after(through_gateway) -> None:
    fake, _, client = through_gateway(canned_json("error_429.json", 429, retry_after="1"), canned_json("text.json"))
    resp = client.chat.completions.create(model="claude", messages=MESSAGES)
    assert resp.choices[0].message.content == "A set point is the target value a control system tries to hold."
    assert len(fake.seen) == 2
    assert fake.seen[1].at - fake.seen[0].at >= 0.95  # the gateway waited out Retry-After: 1


def test_e2e_529_is_503_and_400_is_relayed(through_gateway) -> None:
    _, _, client = through_gateway(canned_json("error_529.json", 529), max_attempts=1)
    with pytest.raises(openai.InternalServerError) as unavailable:
        client.chat.completions.create(model="claude", messages=MESSAGES)
    assert unavailable.value.status_code == 503 and unavailable.value.code == "upstream_unavailable"

    _, _, client = through_gateway(canned_json("error_400.json", 400), max_attempts=1)
    with pytest.raises(openai.BadRequestError) as rejected:
        client.chat.completions.create(model="claude", messages=MESSAGES, max_tokens=300000)
    assert "max_tokens: 300000 > 64000" in rejected.value.message


def test_e2e_error_mid_stream(through_gateway, http, keys) -> None:
    fake, gw, client = through_gateway(canned_sse("stream_error.sse"))
    got: list[str] = []
    stream = client.chat.completions.create(model="claude", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError, match="Overloaded"):
        for chunk in stream:
            got.extend(c.delta.content or "" for c in chunk.choices)
    assert "".join(got) == "A set point is"

    raw = http.post(f"{gw.base_url}/chat/completions", headers={"Authorization": f"Bearer {keys.all}"},
                    json={"model": "claude", "messages": MESSAGES, "stream": True})
    assert raw.status_code == 200
    events = [e for e in raw.text.split("\n\n") if e.strip()]
    assert "[DONE]" not in raw.text
    assert json.loads(events[-1].removeprefix("data: "))["error"]["code"] == "upstream_unavailable"
    assert len(fake.seen) == 2  # committed streams are never retried


def test_e2e_embeddings_are_400(through_gateway) -> None:
    fake, _, client = through_gateway(canned_json("text.json"))
    with pytest.raises(openai.BadRequestError, match="no embeddings endpoint"):
        client.embeddings.create(model="claude-embed", input="hello")
    assert fake.seen == []

