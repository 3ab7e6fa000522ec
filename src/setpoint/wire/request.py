"""Parse and check request bodies cheaply: just enough to route, account and refuse bad input.

Unknown fields are kept and passed through to OpenAI-compatible upstreams.
"""

from __future__ import annotations

from typing import Any

import orjson

from setpoint.errors import InvalidRequestError

__all__ = ["parse_chat", "parse_embeddings", "parse_json_object"]

_NUMBER = (int, float)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise InvalidRequestError("request body is empty; expected a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequestError("request body is not valid UTF-8") from None
        raise InvalidRequestError(f"request body is not valid JSON: {exc.msg} at position {exc.pos}") from None
    if not isinstance(body, dict):
        raise InvalidRequestError(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _type_name(v: object) -> str:
    return "null" if v is None else type(v).__name__


def _want(body: dict[str, Any], name: str, types: type | tuple[type, ...], what: str) -> None:
    v = body.get(name)
    if v is None:
        return
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(v, allowed) or (isinstance(v, bool) and bool not in allowed):
        raise InvalidRequestError(f"'{name}' must be {what}, got {_type_name(v)}", param=name)


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        raise InvalidRequestError("missing required parameter 'model'", param="model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError(f"'model' must be a non-empty string, got {_type_name(model)}", param="model")
    return model


def parse_chat(body: dict[str, Any]) -> str:
    """Check a chat completion request; returns the model name."""
    model = _model(body)
    messages = body.get("messages")
    if messages is None:
        raise InvalidRequestError("missing required parameter 'messages'", param="messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("'messages' must be a non-empty array", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequestError(f"'messages[{i}]' must be an object, got {_type_name(m)}", param=f"messages[{i}]")
        if not isinstance(m.get("role"), str):
            raise InvalidRequestError(f"'messages[{i}].role' must be a string", param=f"messages[{i}].role")
    _want(body, "stream", bool, "a boolean")
    _want(body, "stream_options", dict, "an object")
    _want(body, "n", int, "an integer")
    _want(body, "max_tokens", int, "an integer")
    _want(body, "max_completion_tokens", int, "an integer")
    _want(body, "temperature", _NUMBER, "a number")
    _want(body, "top_p", _NUMBER, "a number")
    _want(body, "tools", list, "an array")
    _want(body, "response_format", dict, "an object")
    _want(body, "logprobs", bool, "a boolean")
    _want(body, "user", str, "a string")
    n = body.get("n")
    if n is not None and n < 1:
        raise InvalidRequestError("'n' must be at least 1", param="n")
    for name in ("max_tokens", "max_completion_tokens"):
        v = body.get(name)
        if v is not None and v < 1:
            raise InvalidRequestError(f"'{name}' must be at least 1", param=name)
    return model


def parse_embeddings(body: dict[str, Any]) -> str:
    """Check an embeddings request; returns the model name."""
    model = _model(body)
    inp = body.get("input")
    if inp is None:
        raise InvalidRequestError("missing required parameter 'input'", param="input")
    ok = isinstance(inp, str) or (
        isinstance(inp, list)
        and bool(inp)
        and (
            all(isinstance(x, str) for x in inp)
            or all(isinstance(x, int) and not isinstance(x, bool) for x in inp)
            or all(isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x) for x in inp)
        )
    )
    if not ok:
        raise InvalidRequestError(
            "'input' must be a string, an array of strings, or an array of token arrays", param="input"
        )
    _want(body, "user", str, "a string")
    _want(body, "dimensions", int, "an integer")
    return model
