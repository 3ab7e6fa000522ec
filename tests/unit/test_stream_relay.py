"""The stream relay does not depend on how the upstream's bytes are cut.

Random streams (plain events, finish reasons, usage, errors, comments, multi-line events, CRLF,
`[DONE]` anywhere, marker text inside content) go through the relay once whole and once cut into
random chunks. Everything observable must be identical: the bytes sent to the client, the finish
reason, the usage, `[DONE]` seen, the kept payloads, and the error raised, if any (when there is
one, what reached the client before it depends on the cuts, so only the rest is compared)."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from setpoint.clock import ManualClock
from setpoint.errors import ProviderResponseError
from setpoint.proxy.context import RequestContext
from setpoint.proxy.streaming import StreamRelay


def _ctx() -> RequestContext:
    return RequestContext(request_id="r", endpoint="chat", started_at=0.0, started_mono=0.0, headers={}, raw=b"")


def _event(rng: random.Random, i: int) -> bytes:
    kind = rng.choices(["text", "finish", "usage", "both", "error", "comment", "multiline", "tricky"],
                       weights=[60, 6, 6, 2, 1, 2, 2, 4])[0]
    doc: dict[str, Any] = {"id": "c", "object": "chat.completion.chunk",
                           "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}]}
    if kind == "finish":
        doc["choices"][0]["finish_reason"] = rng.choice(["stop", "length", "tool_calls"])
    elif kind == "usage":
        doc = {"id": "c", "choices": [], "usage": {"prompt_tokens": rng.randint(1, 99), "completion_tokens": i}}
    elif kind == "both":
        doc["choices"][0]["finish_reason"] = "stop"
        doc["usage"] = {"prompt_tokens": 7, "completion_tokens": i}
    elif kind == "error":
        doc = {"error": {"message": "overloaded"}}
    elif kind == "comment":
        return b": keep-alive"
    elif kind == "multiline":
        return b"data: " + orjson.dumps(doc)[:10] + b"\ndata: " + orjson.dumps(doc)[10:]
    elif kind == "tricky":  # markers and "data: {" inside the generated text
        doc["choices"][0]["delta"]["content"] = rng.choice(
            ['"usage"', 'data: {"x"', '"finish_reason":"stop"', "data: [DONE]", "\n\n"])
    return b"data: " + orjson.dumps(doc)


def _stream(rng: random.Random) -> bytes:
    events = [_event(rng, i) for i in range(rng.randint(0, 12))]
    if rng.random() < 0.85:
        events.insert(rng.randint(len(events) - 2, len(events)) if len(events) > 2 and rng.random() < 0.1 else len(events),
                      b"data: [DONE]")
    sep = b"\r\n\r\n" if rng.random() < 0.1 else b"\n\n"
    body = b"".join(e.replace(b"\n", sep[: len(sep) // 2]) + sep for e in events)
    if rng.random() < 0.05:
        body = body[: rng.randint(0, len(body))]  # cut anywhere
    return body


def _chunks(rng: random.Random, body: bytes) -> list[bytes]:
    mode = rng.random()
    if mode < 0.4 or not body:
        return [body] if body else []
    if mode < 0.7:  # at event boundaries
        parts = body.split(b"\n\n")
        out = [p + b"\n\n" for p in parts[:-1]]
        return out + ([parts[-1]] if parts[-1] else [])
    cuts = sorted(rng.sample(range(1, len(body)), min(len(body) - 1, rng.randint(1, 6)))) if len(body) > 1 else []
    return [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])]


def _run(chunks: list[bytes]) -> dict[str, Any]:
    ctx = _ctx()
    relay = StreamRelay(ctx, ManualClock())
    out, error = [], None
    try:
        for c in chunks:
            out.append(relay.feed(c))
        relay.finish()
    except ProviderResponseError as exc:
        error = exc.message
    return {"out": b"".join(out), "error": error, "finish": ctx.finish_reason, "usage": vars_of(ctx.usage),
            "done": relay.is_done, "payloads": relay.payloads}


def vars_of(usage: Any) -> tuple[Any, ...]:
    return (usage.prompt_tokens, usage.completion_tokens, usage.is_reported)


@pytest.mark.parametrize("seed", range(40))
def test_relay_result_does_not_depend_on_how_the_stream_is_cut(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(150):
        body = _stream(rng)
        chunks = _chunks(rng, body)
        whole, cut = _run([body] if body else []), _run(chunks)
        if whole["error"] is not None:
            del whole["out"], cut["out"]
        assert cut == whole, chunks


def test_plain_stream_passes_through_byte_for_byte() -> None:
    events = [b'data: {"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}',
              b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}',
              b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}', b"data: [DONE]"]
    body = b"".join(e + b"\n\n" for e in events)
    ctx = _ctx()
    relay = StreamRelay(ctx, ManualClock())
    out = relay.feed(body)
    assert out == body[: -len(b"data: [DONE]\n\n")]
    assert relay.is_done and ctx.finish_reason == "stop"
    assert (ctx.usage.prompt_tokens, ctx.usage.completion_tokens) == (3, 2)
    assert relay.payloads == [e[6:] for e in events[:3]]
    relay.finish()


def test_an_upstream_error_event_raises() -> None:
    body = b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\ndata: {"error":{"message":"boom"}}\n\n'
    relay = StreamRelay(_ctx(), ManualClock())
    with pytest.raises(ProviderResponseError, match="boom"):
        relay.feed(body)
