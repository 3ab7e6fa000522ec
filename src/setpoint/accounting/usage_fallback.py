"""When an upstream reports no usage (a stream the client cancelled, a server that sends none),
count it with the tokenizer from what was actually sent and generated."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from setpoint.accounting.tokens import count_messages, count_text
from setpoint.proxy.context import RequestContext

__all__ = ["count_prompt", "fill_missing_usage", "stream_delta_text", "unary_output_text"]


def count_prompt(ctx: RequestContext) -> int:
    """Prompt tokens by the tokenizer; counted once per request (limits, budgets and routing all ask)."""
    if ctx.prompt_tokens_counted is None:
        ctx.prompt_tokens_counted = _count_prompt(ctx)
    return ctx.prompt_tokens_counted


def _count_prompt(ctx: RequestContext) -> int:
    if ctx.endpoint == "embeddings":
        inp = ctx.body.get("input")
        items = [inp] if isinstance(inp, str) else inp if isinstance(inp, list) else []
        return sum(count_text(x) if isinstance(x, str) else len(x) if isinstance(x, list) else 1 for x in items)
    return count_messages(ctx.body.get("messages"))


def _choice_text(part: Any) -> str:
    """Text of a message or a delta: content plus tool-call names and arguments."""
    if not isinstance(part, dict):
        return ""
    out = part.get("content") if isinstance(part.get("content"), str) else ""
    for call in part.get("tool_calls") or ():
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            out += str(fn.get("name") or "") + str(fn.get("arguments") or "")
    return out


def stream_delta_text(data: bytes) -> str:
    """The generated text carried by one stream event's payload (all choices)."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return ""
    choices = doc.get("choices") if isinstance(doc, dict) else None
    if not isinstance(choices, list):
        return ""
    return "".join(_choice_text(c.get("delta")) for c in choices if isinstance(c, dict))


def unary_output_text(body: bytes | None) -> list[str]:
    try:
        doc = orjson.loads(body or b"")
    except orjson.JSONDecodeError:
        return []
    choices = doc.get("choices") if isinstance(doc, dict) else None
    if not isinstance(choices, list):
        return []
    return [_choice_text(c.get("message")) for c in choices if isinstance(c, dict)]


def fill_missing_usage(ctx: RequestContext, outputs: Iterable[str]) -> None:
    u = ctx.usage
    u.prompt_tokens = count_prompt(ctx)
    u.completion_tokens = sum(count_text(t) for t in outputs)
    ctx.annotations["usage_counted_by_gateway"] = True
