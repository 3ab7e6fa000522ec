"""The gateway through the official `openai` SDK: chat (unary and streamed), tools, JSON mode,
n, logprobs, embeddings, model listing, and pass-through of unknown fields to an OpenAI-compatible
upstream."""

from __future__ import annotations

import json
import math
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is a set point?"}]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "number"}},
            "required": ["city"],
        },
    },
}


def only_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(rows) == 1, rows
    return rows[0]


# -- chat ---------------------------------------------------------------------------------------


def test_unary_chat(gateway, client, gateway_rows) -> None:
    resp = client.chat.completions.create(model="chat-a", messages=MESSAGES, user="alice")

    assert resp.object == "chat.completion"
    assert len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content.strip()
    assert choice.finish_reason == "stop"
    assert resp.model == "sim-small"  # the deployment's upstream model answered
    assert resp.usage is not None
    assert resp.usage.prompt_tokens > 0 and resp.usage.completion_tokens > 0

    row = only_row(gateway_rows(gateway))
    assert row["endpoint"] == "chat"
    assert row["status"] == 200 and row["error_code"] is None
    assert row["model"] == "chat-a"
    assert row["deployment"] == "sim/sim-small"
    assert row["provider"] == "sim"
    assert row["key_name"] == "all" and row["team"] == "team-all"
    assert row["user_id"] == "alice"
    assert row["is_stream"] == 0
    assert row["prompt_tokens"] == resp.usage.prompt_tokens
    assert row["completion_tokens"] == resp.usage.completion_tokens
    assert row["finish_reason"] == "stop"
    # chat-a is priced at $1 / $2 per Mtok: cost in micro-dollars, rounded.
    expected_cost = round(resp.usage.prompt_tokens * 1.0 + resp.usage.completion_tokens * 2.0)
    assert row["cost_micros"] == expected_cost


def test_unary_chat_respects_max_tokens(client) -> None:
    resp = client.chat.completions.create(model="chat-a", messages=MESSAGES, max_tokens=2)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 2


def test_unary_response_has_request_id(client) -> None:
    raw = client.chat.completions.with_raw_response.create(model="chat-a", messages=MESSAGES)
    assert raw.headers.get("x-request-id", "").startswith("req_")
    assert raw.parse().choices[0].message.content


def test_stream_with_include_usage(gateway, client, gateway_rows) -> None:
    stream = client.chat.completions.create(
        model="chat-a", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)

    assert chunks, "no chunks"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1
    assert usage_chunks[0] is chunks[-1], "usage must arrive on the last chunk"
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0

    row = only_row(gateway_rows(gateway))
    assert row["is_stream"] == 1 and row["status"] == 200
    assert row["prompt_tokens"] == usage.prompt_tokens
    assert row["completion_tokens"] == usage.completion_tokens
    assert row["finish_reason"] == "stop"
    assert row["ttft_ms"] is not None and row["ttft_ms"] >= 0


def test_stream_without_include_usage_hides_usage_but_logs_it(gateway, client, gateway_rows) -> None:
    chunks = list(client.chat.completions.create(model="chat-a", messages=MESSAGES, stream=True))

    assert chunks
    assert all(c.usage is None for c in chunks), "the client did not ask for usage"
    assert all(c.choices for c in chunks), "no usage-only (empty choices) chunk may reach the client"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.strip()

    row = only_row(gateway_rows(gateway))
    assert row["status"] == 200 and row["is_stream"] == 1
    assert row["prompt_tokens"] > 0
    assert row["completion_tokens"] > 0
    assert json.loads(row["annotations"]).get("usage_injected") is True


def test_stream_usage_matches_unforced_token_count(gateway, client, gateway_rows) -> None:
    chunks = list(
        client.chat.completions.create(model="chat-a", messages=MESSAGES, stream=True,
                                       extra_body={"sim_output_tokens": 7})
    )
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) == 7
    row = only_row(gateway_rows(gateway))
    assert row["completion_tokens"] == 7


# -- tools --------------------------------------------------------------------------------------


def test_unary_tool_call(client) -> None:
    resp = client.chat.completions.create(model="chat-a", messages=MESSAGES, tools=[WEATHER_TOOL])

    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    call = calls[0]
    assert call.type == "function"
    assert call.id
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert set(args) == {"city", "days"}
    assert isinstance(args["city"], str)
    assert isinstance(args["days"], (int, float))


def test_tool_choice_selects_named_function(client) -> None:
    other = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}
    resp = client.chat.completions.create(
        model="chat-a", messages=MESSAGES, tools=[WEATHER_TOOL, other],
        tool_choice={"type": "function", "function": {"name": "lookup"}},
    )
    call = resp.choices[0].message.tool_calls[0]
    assert call.function.name == "lookup"
    assert json.loads(call.function.arguments) == {"q": "42"}


def test_streamed_tool_call_deltas_reassemble(gateway, client, gateway_rows) -> None:
    stream = client.chat.completions.create(model="chat-a", messages=MESSAGES, tools=[WEATHER_TOOL], stream=True)

    calls: dict[int, dict[str, Any]] = {}
    finish = None
    n_arg_deltas = 0
    for chunk in stream:
        for choice in chunk.choices:
            if choice.finish_reason:
                finish = choice.finish_reason
            for tc in choice.delta.tool_calls or ():
                slot = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
                if tc.id:
                    slot["id"] = tc.id
                if tc.function and tc.function.name:
                    slot["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    slot["arguments"] += tc.function.arguments
                    n_arg_deltas += 1

    assert finish == "tool_calls"
    assert list(calls) == [0]
    call = calls[0]
    assert call["id"] and call["name"] == "get_weather"
    assert n_arg_deltas >= 2, "arguments should arrive in pieces"
    args = json.loads(call["arguments"])
    assert set(args) == {"city", "days"}

    row = only_row(gateway_rows(gateway))
    assert row["status"] == 200 and row["finish_reason"] == "tool_calls"


# -- JSON mode, n, logprobs ---------------------------------------------------------------------


def test_response_format_json_object(client) -> None:
    resp = client.chat.completions.create(
        model="chat-a", messages=MESSAGES, response_format={"type": "json_object"}
    )
    content = resp.choices[0].message.content
    assert content is not None
    doc = json.loads(content)
    assert isinstance(doc, dict) and doc


def test_n_two_choices(gateway, client, gateway_rows) -> None:
    resp = client.chat.completions.create(model="chat-a", messages=MESSAGES, n=2, extra_body={"sim_output_tokens": 5})
    assert [c.index for c in resp.choices] == [0, 1]
    assert all(c.message.content for c in resp.choices)
    assert resp.usage is not None and resp.usage.completion_tokens == 10
    assert only_row(gateway_rows(gateway))["completion_tokens"] == 10


def test_n_two_choices_streamed(client) -> None:
    chunks = list(client.chat.completions.create(model="chat-a", messages=MESSAGES, n=2, stream=True))
    texts = {0: "", 1: ""}
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts[0].strip() and texts[1].strip()


def test_logprobs_passthrough(client) -> None:
    resp = client.chat.completions.create(model="chat-a", messages=MESSAGES, logprobs=True, top_logprobs=0)
    lp = resp.choices[0].logprobs
    assert lp is not None and lp.content
    assert all(isinstance(t.logprob, float) and t.logprob <= 0 for t in lp.content)
    assert "".join(t.token for t in lp.content) == resp.choices[0].message.content


def test_logprobs_streamed(client) -> None:
    chunks = list(client.chat.completions.create(model="chat-a", messages=MESSAGES, logprobs=True, stream=True))
    with_lp = [c for c in chunks if c.choices and c.choices[0].logprobs and c.choices[0].logprobs.content]
    assert with_lp
    for c in with_lp:
        assert c.choices[0].logprobs.content[0].token == c.choices[0].delta.content


def test_no_logprobs_unless_asked(client) -> None:
    resp = client.chat.completions.create(model="chat-a", messages=MESSAGES)
    assert resp.choices[0].logprobs is None


# -- embeddings ---------------------------------------------------------------------------------


def test_embeddings_single_string(gateway, client, gateway_rows) -> None:
    resp = client.embeddings.create(model="embed", input="hello world")
    assert len(resp.data) == 1
    vec = resp.data[0].embedding
    assert len(vec) == 64
    assert math.isclose(math.fsum(x * x for x in vec), 1.0, rel_tol=1e-6)
    assert resp.usage.prompt_tokens > 0

    row = only_row(gateway_rows(gateway))
    assert row["endpoint"] == "embeddings" and row["status"] == 200
    assert row["model"] == "embed" and row["deployment"] == "sim/sim-embed"
    assert row["prompt_tokens"] == resp.usage.prompt_tokens


def test_embeddings_list_input(client) -> None:
    inputs = ["first document", "second document here", "first document"]
    resp = client.embeddings.create(model="embed", input=inputs)
    assert [d.index for d in resp.data] == [0, 1, 2]
    assert all(len(d.embedding) == 64 for d in resp.data)
    assert resp.data[0].embedding == resp.data[2].embedding  # same text, same vector
    assert resp.data[0].embedding != resp.data[1].embedding


def test_embeddings_float_format_and_dimensions(client) -> None:
    resp = client.embeddings.create(model="embed", input=["a b c"], encoding_format="float", dimensions=16)
    assert len(resp.data[0].embedding) == 16


def test_embeddings_list_input_matches_single(client) -> None:
    single = client.embeddings.create(model="embed", input="same text").data[0].embedding
    batch = client.embeddings.create(model="embed", input=["other", "same text"]).data[1].embedding
    assert single == batch


# -- models -------------------------------------------------------------------------------------


def test_models_list_all_key(client) -> None:
    ids = sorted(m.id for m in client.models.list())
    assert ids == ["chat-a", "chat-b", "embed"]


def test_models_list_limited_key(gateway, make_client, keys) -> None:
    limited = make_client(gateway.base_url, keys.limited)
    ids = sorted(m.id for m in limited.models.list())
    assert ids == ["chat-a", "embed"]
    assert limited.models.retrieve("chat-a").id == "chat-a"
    with pytest.raises(openai.NotFoundError):
        limited.models.retrieve("chat-b")  # exists, but not for this key


def test_limited_key_may_use_its_models_only(gateway, make_client, keys) -> None:
    limited = make_client(gateway.base_url, keys.limited)
    assert limited.chat.completions.create(model="chat-a", messages=MESSAGES).choices
    with pytest.raises(openai.PermissionDeniedError):
        limited.chat.completions.create(model="chat-b", messages=MESSAGES)


# -- pass-through to an OpenAI-compatible upstream ----------------------------------------------

UPSTREAM_KEY = "upstream-provider-secret-123"


def recording_upstream_app(received: list[dict[str, Any]]) -> web.Application:
    """An OpenAI-compatible upstream that records each request and answers with a fixed completion."""

    async def chat(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        received.append({"body": body, "headers": dict(request.headers), "path": request.path})
        usage = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
        if body.get("stream") is True:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            base = {"id": "chatcmpl-rec", "object": "chat.completion.chunk", "created": 1, "model": body["model"]}
            for delta, fr in (({"role": "assistant", "content": ""}, None), ({"content": "hi"}, None),
                              ({"content": " there"}, None), ({}, "stop")):
                doc = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": fr}]}
                await resp.write(b"data: " + orjson.dumps(doc) + b"\n\n")
            opts = body.get("stream_options") or {}
            if opts.get("include_usage") is True:
                await resp.write(b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        doc = {
            "id": "chatcmpl-rec", "object": "chat.completion", "created": 1, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "recorded"}, "finish_reason": "stop"}],
            "usage": usage,
        }
        return web.Response(body=orjson.dumps(doc), content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


@pytest.fixture
def recording(serve_app, make_gateway, make_client, default_config, keys) -> tuple[list[dict[str, Any]], Any, openai.OpenAI]:
    received: list[dict[str, Any]] = []
    upstream = serve_app(recording_upstream_app(received))
    cfg = default_config()
    cfg["providers"]["rec"] = {"type": "openai_compatible", "base_url": upstream.url + "/v1", "api_key": UPSTREAM_KEY}
    cfg["models"]["passthru"] = {"deployments": [{"provider": "rec", "model": "upstream-model-x",
                                                  "extra_body": {"deployment_extra": 3}}]}
    gw = make_gateway(cfg)
    return received, gw, make_client(gw.base_url, keys.all)


def test_unknown_fields_pass_through_and_model_is_rewritten(recording, gateway_rows, keys) -> None:
    received, gw, client = recording
    unknown = {"nested": [1, "two", None, {"three": 3.5}], "flag": True}
    resp = client.chat.completions.create(
        model="passthru", messages=MESSAGES, temperature=0.25,
        extra_body={"foo_bar": unknown, "top_k": 40},
    )
    assert resp.choices[0].message.content == "recorded"

    assert len(received) == 1
    got = received[0]
    assert got["path"] == "/v1/chat/completions"
    body = got["body"]
    assert body["model"] == "upstream-model-x"
    assert body["foo_bar"] == unknown
    assert body["top_k"] == 40
    assert body["temperature"] == 0.25
    assert body["messages"] == MESSAGES
    assert body["deployment_extra"] == 3  # the deployment's extra_body is merged in
    assert "stream_options" not in body  # nothing injected on a unary call

    # The upstream sees the provider's credentials, never the client's virtual key.
    assert got["headers"].get("Authorization") == f"Bearer {UPSTREAM_KEY}"
    assert all(keys.all not in v for v in got["headers"].values())

    row = only_row(gateway_rows(gw))
    assert row["deployment"] == "rec/upstream-model-x" and row["status"] == 200
    assert (row["prompt_tokens"], row["completion_tokens"]) == (11, 3)


def test_stream_asks_upstream_for_usage_and_hides_it(recording, gateway_rows) -> None:
    received, gw, client = recording
    chunks = list(client.chat.completions.create(
        model="passthru", messages=MESSAGES, stream=True, extra_body={"foo_bar": "baz"}
    ))

    body = received[0]["body"]
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["foo_bar"] == "baz"
    assert body["model"] == "upstream-model-x"

    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hi there"
    assert all(c.usage is None for c in chunks)
    row = only_row(gateway_rows(gw))
    assert row["status"] == 200
    assert (row["prompt_tokens"], row["completion_tokens"]) == (11, 3)


def test_stream_with_client_include_usage_is_forwarded_untouched(recording, gateway_rows) -> None:
    received, gw, client = recording
    chunks = list(client.chat.completions.create(
        model="passthru", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    ))
    assert received[0]["body"]["stream_options"] == {"include_usage": True}
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (11, 3)
    row = only_row(gateway_rows(gw))
    assert json.loads(row["annotations"]).get("usage_injected") is False


def test_stream_include_usage_false_still_accounted(recording, gateway_rows) -> None:
    received, gw, client = recording
    chunks = list(client.chat.completions.create(
        model="passthru", messages=MESSAGES, stream=True, stream_options={"include_usage": False},
    ))
    # The client said False; the gateway still asks upstream (for accounting) and hides the answer.
    assert received[0]["body"]["stream_options"]["include_usage"] is True
    assert all(c.usage is None for c in chunks)
    assert only_row(gateway_rows(gw))["completion_tokens"] == 3
