"""Adapter for Anthropic's Messages API behind the OpenAI surface.

Requests: an OpenAI chat body becomes a `POST {base_url}/v1/messages` body (system prompt, content
blocks, tool use and tool results, tool choice, sampling, the required `max_tokens`); OpenAI-only
fields are dropped, and what cannot be translated faithfully (`n > 1`, non-function tools, audio or
file parts) is refused with a 400 instead of being changed silently.

Answers: a Message becomes a `chat.completion`; the Messages event stream becomes
`chat.completion.chunk` events, always ending with a usage chunk (`choices: []`) and `[DONE]`, and
only after `message_stop`. An `error` event, or a stream that ends early, raises from the iterator.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar

import orjson

from setpoint.clock import Clock
from setpoint.config.schema import AnthropicProviderConfig
from setpoint.errors import ProviderRejectedError, ProviderResponseError, UpstreamError
from setpoint.providers.base import error_from_status
from setpoint.providers.http_session import HttpSession
from setpoint.types import Reply, UpstreamCall, UpstreamStream
from setpoint.wire.sse import MalformedEventError, SSEFramer, event_data

__all__ = [
    "ANTHROPIC_VERSION",
    "AnthropicProvider",
    "StreamTranslator",
    "to_anthropic_request",
    "to_openai_completion",
]

ANTHROPIC_VERSION = "2023-06-01"

Json = dict[str, Any]

# ---------------------------------------------------------------------------------------------
# request: OpenAI chat body -> Anthropic Messages body
# ---------------------------------------------------------------------------------------------

_SAMPLING = ("temperature", "top_p", "top_k")  # top_k: Anthropic-only, e.g. from a deployment's extra_body
_SYSTEM_ROLES = frozenset({"system", "developer"})
_TOOL_CHOICES: dict[str, str] = {"auto": "auto", "required": "any", "none": "none"}
_DATA_URL = re.compile(r"data:(image/[A-Za-z0-9.+-]+);base64,(.+)", re.DOTALL)


def _reject(message: str) -> ProviderRejectedError:
    return ProviderRejectedError(
        f"cannot translate the request for Anthropic: {message}", upstream_status=400, upstream_code="invalid_request"
    )


def to_anthropic_request(body: Json, default_max_tokens: int, *, stream: bool) -> Json:
    """The Messages API body for an OpenAI chat completion body (`model` already the upstream's)."""
    n = body.get("n")
    if isinstance(n, int) and n > 1:
        raise _reject("'n' > 1 is not supported (Anthropic returns one choice)")
    system, messages = _conversation(body.get("messages"))
    out: Json = {"model": body.get("model"), "max_tokens": _max_tokens(body, default_max_tokens)}
    if system:
        out["system"] = system
    out["messages"] = messages
    out.update({k: body[k] for k in _SAMPLING if body.get(k) is not None})
    stops = _stop_sequences(body.get("stop"))
    if stops:
        out["stop_sequences"] = stops
    out.update(_tools(body))
    user = body.get("user")
    if isinstance(user, str) and user:
        out["metadata"] = {"user_id": user}
    if stream:
        out["stream"] = True
    return out


def _max_tokens(body: Json, default: int) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        v = body.get(name)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return default


def _stop_sequences(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return list(stop)
    raise _reject("'stop' must be a string or an array of strings")


# -- messages -----------------------------------------------------------------------------------


def _conversation(raw: Any) -> tuple[list[Json], list[Json]]:
    """(system blocks, turns): system/developer messages lifted out, same-role neighbours merged."""
    if not isinstance(raw, list):
        raise _reject("'messages' must be an array")
    system: list[Json] = []
    turns: list[Json] = []
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise _reject(f"{where} must be an object")
        role = msg.get("role")
        if role in _SYSTEM_ROLES:
            system.extend(_text_blocks(msg.get("content"), where))
            continue
        build = _TURNS.get(role) if isinstance(role, str) else None
        if build is None:
            raise _reject(f"{where}.role {role!r} is not supported")
        anthropic_role, blocks = build(msg, where)
        _append_turn(turns, anthropic_role, blocks)
    return system, turns


def _append_turn(turns: list[Json], role: str, blocks: list[Json]) -> None:
    """Anthropic alternates roles: consecutive tool results (and a user turn after them) form one turn."""
    if not blocks:
        return
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"].extend(blocks)
    else:
        turns.append({"role": role, "content": blocks})


def _user_turn(msg: Json, where: str) -> tuple[str, list[Json]]:
    return "user", _content_blocks(msg.get("content"), where)


def _assistant_turn(msg: Json, where: str) -> tuple[str, list[Json]]:
    blocks = _content_blocks(msg.get("content"), where)
    calls = msg.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise _reject(f"{where}.tool_calls must be an array")
        blocks.extend(_tool_use_block(c, f"{where}.tool_calls[{k}]") for k, c in enumerate(calls))
    return "assistant", blocks


def _tool_turn(msg: Json, where: str) -> tuple[str, list[Json]]:
    call_id = msg.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise _reject(f"{where}.tool_call_id must be a non-empty string")
    block: Json = {"type": "tool_result", "tool_use_id": call_id}
    content = _text_blocks(msg.get("content"), where)
    if content:
        block["content"] = content
    return "user", [block]


_TURNS: dict[str, Callable[[Json, str], tuple[str, list[Json]]]] = {
    "user": _user_turn,
    "assistant": _assistant_turn,
    "tool": _tool_turn,
}


def _tool_use_block(call: Any, where: str) -> Json:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(call.get("id"), str):
        raise _reject(f"{where} must have an id and a function name")
    return {"type": "tool_use", "id": call["id"], "name": fn["name"], "input": _arguments(fn.get("arguments"), where)}


def _arguments(raw: Any, where: str) -> Json:
    """Anthropic wants the tool input as an object; OpenAI carries it as a JSON string."""
    if raw is None or raw == "":
        return {}
    value = raw
    if isinstance(raw, str):
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise _reject(f"{where}.function.arguments is not valid JSON") from None
    if not isinstance(value, dict):
        raise _reject(f"{where}.function.arguments must be a JSON object")
    return value


# -- content parts ------------------------------------------------------------------------------


def _text_block(text: str, part: Json | None = None) -> list[Json]:
    if not text:
        return []  # Anthropic refuses empty text blocks
    block: Json = {"type": "text", "text": text}
    cache = part.get("cache_control") if part is not None else None
    if isinstance(cache, dict):
        block["cache_control"] = cache  # prompt caching breakpoints pass through
    return [block]


def _text_part(part: Json, where: str) -> list[Json]:
    text = part.get("text")
    if not isinstance(text, str):
        raise _reject(f"{where}.text must be a string")
    return _text_block(text, part)


def _image_part(part: Json, where: str) -> list[Json]:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise _reject(f"{where}.image_url.url must be a string")
    m = _DATA_URL.fullmatch(url)
    if m:
        source: Json = {"type": "base64", "media_type": m.group(1), "data": m.group(2)}
    elif url.startswith(("https://", "http://")):
        source = {"type": "url", "url": url}
    else:
        raise _reject(f"{where}.image_url.url must be an http(s) URL or a base64 data URL")
    return [{"type": "image", "source": source}]


_PARTS: dict[str, Callable[[Json, str], list[Json]]] = {"text": _text_part, "image_url": _image_part}


def _content_blocks(content: Any, where: str) -> list[Json]:
    if content is None:
        return []
    if isinstance(content, str):
        return _text_block(content)
    if not isinstance(content, list):
        raise _reject(f"{where}.content must be a string or an array of content parts")
    blocks: list[Json] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        build = _PARTS.get(kind) if isinstance(kind, str) else None
        if build is None:
            raise _reject(f"{where}.content[{j}]: content part type {kind!r} is not supported")
        blocks.extend(build(part, f"{where}.content[{j}]"))
    return blocks


def _text_blocks(content: Any, where: str) -> list[Json]:
    """Content that may only hold text (system prompts, tool results)."""
    blocks = _content_blocks(content, where)
    if any(b["type"] != "text" for b in blocks):
        raise _reject(f"{where}.content may only contain text for Anthropic")
    return blocks


# -- tools --------------------------------------------------------------------------------------


def _tools(body: Json) -> Json:
    tools = body.get("tools")
    if not tools:
        return {}
    if not isinstance(tools, list):
        raise _reject("'tools' must be an array")
    out: Json = {"tools": [_tool(t, f"tools[{i}]") for i, t in enumerate(tools)]}
    choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
    if choice is not None:
        out["tool_choice"] = choice
    return out


def _tool(tool: Any, where: str) -> Json:
    fn = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise _reject(f"{where}: only function tools with a name are supported")
    params = fn.get("parameters")
    schema = params if isinstance(params, dict) else {"type": "object", "properties": {}}
    out: Json = {"name": fn["name"], "input_schema": schema}
    if isinstance(fn.get("description"), str):
        out["description"] = fn["description"]
    return out


def _tool_choice(choice: Any, parallel: Any) -> Json | None:
    """auto/none/required/named -> auto/none/any/tool; `parallel_tool_calls: false` -> disable_parallel_tool_use."""
    if choice is None and parallel is not False:
        return None  # Anthropic's default is auto, like OpenAI's
    out = _named_choice(choice if choice is not None else "auto")
    if parallel is False and out["type"] != "none":
        out["disable_parallel_tool_use"] = True
    return out


def _named_choice(choice: Any) -> Json:
    if isinstance(choice, str) and choice in _TOOL_CHOICES:
        return {"type": _TOOL_CHOICES[choice]}
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if isinstance(fn, dict) and isinstance(fn.get("name"), str):
        return {"type": "tool", "name": fn["name"]}
    raise _reject("'tool_choice' must be auto, none, required or {type: function, function: {name}}")


# ---------------------------------------------------------------------------------------------
# answers: Anthropic Message -> OpenAI chat.completion
# ---------------------------------------------------------------------------------------------

_FINISH: dict[str, str] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def finish_reason(stop_reason: Any) -> str | None:
    if not isinstance(stop_reason, str):
        return None
    return _FINISH.get(stop_reason, "stop")


def _count(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


def openai_usage(usage: Any) -> Json:
    """Anthropic counts cache reads and writes apart from `input_tokens`; OpenAI's prompt includes them."""
    u = usage if isinstance(usage, dict) else {}
    cached = _count(u.get("cache_read_input_tokens"))
    prompt = _count(u.get("input_tokens")) + cached + _count(u.get("cache_creation_input_tokens"))
    completion = _count(u.get("output_tokens"))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _tool_call(block: Json) -> Json:
    return {
        "id": block.get("id"),
        "type": "function",
        "function": {"name": block.get("name"), "arguments": orjson.dumps(block.get("input", {})).decode()},
    }


def to_openai_completion(provider: str, doc: Any, created: int) -> Json:
    content = doc.get("content") if isinstance(doc, dict) else None
    if not isinstance(content, list):
        raise ProviderResponseError(f"upstream {provider} sent a message without a content array")
    blocks = [b for b in content if isinstance(b, dict)]
    texts = [b["text"] for b in blocks if b.get("type") == "text" and isinstance(b.get("text"), str)]
    calls = [_tool_call(b) for b in blocks if b.get("type") == "tool_use"]
    message: Json = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        message["tool_calls"] = calls
    finish = finish_reason(doc.get("stop_reason")) or "stop"
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    return {
        "id": doc.get("id"),
        "object": "chat.completion",
        "created": created,
        "model": doc.get("model"),
        "choices": [choice],
        "usage": openai_usage(doc.get("usage")),
    }


# ---------------------------------------------------------------------------------------------
# streams: Anthropic events -> OpenAI chunk SSE
# ---------------------------------------------------------------------------------------------

_DONE_EVENT = b"data: [DONE]\n\n"

# An `error` event's type -> the HTTP status Anthropic uses for it, so that `error_from_status`
# stays the one mapping (an overloaded_error before any output is retryable, like a 529).
_ERROR_STATUS: dict[str, int] = {
    "invalid_request_error": 400,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}


def _sse(doc: Json) -> bytes:
    return b"data: " + orjson.dumps(doc) + b"\n\n"


def stream_error(provider: str, data: bytes, doc: Json) -> UpstreamError:
    err = doc.get("error")
    kind = err.get("type") if isinstance(err, dict) else None
    status = _ERROR_STATUS.get(kind) if isinstance(kind, str) else None
    if status is None:
        msg = err.get("message") if isinstance(err, dict) else None
        return ProviderResponseError(f"upstream {provider} failed mid-stream: {msg or kind or 'unknown error'}")
    return error_from_status(provider, status, {}, data)


class StreamTranslator:
    """Feed the `data` of each Anthropic event; get back OpenAI chunk SSE bytes (maybe empty)."""

    __slots__ = ("_created", "_id", "_model", "_provider", "_tools", "_usage", "is_done")

    def __init__(self, provider: str, created: int) -> None:
        self._provider = provider
        self._created = created
        self._id = ""
        self._model = ""
        self._usage: Json = {}
        self._tools: dict[int, int] = {}  # content block index -> OpenAI tool_calls index
        self.is_done = False

    def feed(self, data: bytes) -> bytes:
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise ProviderResponseError(f"upstream {self._provider} sent a stream event that is not JSON") from None
        if not isinstance(doc, dict) or self.is_done:
            return b""
        kind = doc.get("type")
        if kind == "error":
            raise stream_error(self._provider, data, doc)
        handler = self._HANDLERS.get(kind) if isinstance(kind, str) else None
        return handler(self, doc) if handler is not None else b""  # ping, content_block_stop, new types

    def _chunk(self, delta: Json, finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _sse({"id": self._id, "object": "chat.completion.chunk", "created": self._created,
                     "model": self._model, "choices": [choice]})

    def _merge_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):  # message_delta counts are cumulative: later values win
            self._usage.update({k: v for k, v in usage.items() if isinstance(v, int)})

    def _on_message_start(self, doc: Json) -> bytes:
        msg = doc.get("message")
        msg = msg if isinstance(msg, dict) else {}
        self._id = str(msg.get("id") or "")
        self._model = str(msg.get("model") or "")
        self._merge_usage(msg.get("usage"))
        return self._chunk({"role": "assistant", "content": ""})

    def _on_block_start(self, doc: Json) -> bytes:
        block = doc.get("content_block")
        if not isinstance(block, dict):
            return b""
        if block.get("type") == "tool_use":
            k = self._tools[_count(doc.get("index"))] = len(self._tools)
            call = {"index": k, "id": block.get("id"), "type": "function",
                    "function": {"name": block.get("name"), "arguments": ""}}
            return self._chunk({"tool_calls": [call]})
        text = block.get("text") if block.get("type") == "text" else None
        return self._chunk({"content": text}) if isinstance(text, str) and text else b""

    def _on_block_delta(self, doc: Json) -> bytes:
        delta = doc.get("delta")
        if not isinstance(delta, dict):
            return b""
        kind = delta.get("type")
        if kind == "text_delta":
            text = delta.get("text")
            return self._chunk({"content": text}) if isinstance(text, str) and text else b""
        if kind == "input_json_delta":
            return self._tool_arguments(_count(doc.get("index")), delta.get("partial_json"))
        return b""  # thinking, signature and citation deltas have no OpenAI counterpart

    def _tool_arguments(self, index: int, partial: Any) -> bytes:
        k = self._tools.get(index)
        if k is None:
            raise ProviderResponseError(f"upstream {self._provider} streamed tool input for an unknown content block")
        if not isinstance(partial, str) or not partial:
            return b""
        return self._chunk({"tool_calls": [{"index": k, "function": {"arguments": partial}}]})

    def _on_message_delta(self, doc: Json) -> bytes:
        self._merge_usage(doc.get("usage"))
        delta = doc.get("delta")
        reason = finish_reason(delta.get("stop_reason")) if isinstance(delta, dict) else None
        return self._chunk({}, reason) if reason is not None else b""

    def _on_message_stop(self, doc: Json) -> bytes:
        self.is_done = True
        usage = _sse({"id": self._id, "object": "chat.completion.chunk", "created": self._created,
                      "model": self._model, "choices": [], "usage": openai_usage(self._usage)})
        return usage + _DONE_EVENT

    _HANDLERS: ClassVar[dict[str, Callable[[StreamTranslator, Json], bytes]]] = {
        "message_start": _on_message_start,
        "content_block_start": _on_block_start,
        "content_block_delta": _on_block_delta,
        "message_delta": _on_message_delta,
        "message_stop": _on_message_stop,
    }


class _TranslatedStream:
    """The upstream's raw SSE body in, OpenAI chunk SSE out; raises if `message_stop` never came."""

    __slots__ = ("_provider", "_raw", "_translator")

    def __init__(self, provider: str, raw: UpstreamStream, translator: StreamTranslator) -> None:
        self._provider = provider
        self._raw = raw
        self._translator = translator

    async def __aiter__(self) -> AsyncIterator[bytes]:
        framer = SSEFramer()
        async for chunk in self._raw:
            for event in framer.feed(chunk):
                out = self._translate(event)
                if out:
                    yield out  # event by event: what came before an error event reaches the client first
        if not self._translator.is_done:
            raise ProviderResponseError(f"upstream {self._provider} ended the stream before message_stop")

    def _translate(self, event: bytes) -> bytes:
        try:
            data = event_data(event)
        except MalformedEventError as exc:
            raise ProviderResponseError(f"upstream {self._provider} sent a malformed stream event: {exc}") from None
        return self._translator.feed(data) if data is not None else b""

    async def aclose(self) -> None:
        await self._raw.aclose()


# ---------------------------------------------------------------------------------------------
# the adapter
# ---------------------------------------------------------------------------------------------


class AnthropicProvider:

    system: ClassVar[str] = "anthropic"  # gen_ai.system in traces
    def __init__(self, name: str, cfg: AnthropicProviderConfig, clock: Clock) -> None:
        self.name = name
        self._cfg = cfg
        self._clock = clock
        self._url = cfg.base_url + "/v1/messages"
        headers = {"Content-Type": "application/json", "anthropic-version": ANTHROPIC_VERSION}
        if cfg.api_key:
            headers["x-api-key"] = cfg.api_key
        headers.update(cfg.headers)  # names are case-insensitive: a configured header replaces a default
        self._http = HttpSession(name, cfg, headers)

    async def start(self) -> None:
        await self._http.start()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def send(self, call: UpstreamCall) -> Reply:
        if call.path != "/chat/completions":
            raise ProviderRejectedError(
                f"upstream {self.name}: Anthropic has no {call.path.strip('/')} endpoint", upstream_status=400
            )
        payload = orjson.dumps(to_anthropic_request(call.body, self._cfg.default_max_tokens, stream=call.is_stream))
        created = int(self._clock.now())
        resp = await self._http.post(self._url, payload)
        await resp.raise_for_status()
        await resp.expect_content_type(stream=call.is_stream)
        if call.is_stream:
            return Reply(status=200, stream=_TranslatedStream(self.name, resp, StreamTranslator(self.name, created)))
        body = await resp.read()
        return Reply(status=200, body=orjson.dumps(to_openai_completion(self.name, _json(self.name, body), created)))


def _json(provider: str, body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ProviderResponseError(f"upstream {provider} sent a body that is not valid JSON") from None
