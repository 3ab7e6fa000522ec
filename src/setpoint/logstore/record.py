"""One request -> one log record (a flat dict matching the store's columns)."""

from __future__ import annotations

from typing import Any

import orjson

from setpoint.proxy.context import RequestContext

__all__ = ["build_record"]


def build_record(ctx: RequestContext, latency_ms: float, *, store_content: bool) -> dict[str, Any]:
    key, dep, usage = ctx.key, ctx.deployment, ctx.usage
    rec: dict[str, Any] = {
        "id": ctx.request_id,
        "ts": ctx.started_at,
        "endpoint": ctx.endpoint,
        "key_id": key.id if key else None,
        "key_name": key.name if key else None,
        "team": key.team if key else None,
        "user_id": ctx.user,
        "model": ctx.model or None,
        "deployment": dep.name if dep else None,
        "provider": dep.provider.name if dep else None,
        "is_stream": 1 if ctx.is_stream else 0,
        "status": ctx.status,
        "error_code": ctx.error_code,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cached_tokens": usage.cached_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "cost_micros": ctx.cost_micros,
        "latency_ms": round(latency_ms, 3),
        "ttft_ms": None if ctx.ttft_ms is None else round(ctx.ttft_ms, 3),
        "upstream_ms": None if ctx.upstream_ms is None else round(ctx.upstream_ms, 3),
        "finish_reason": ctx.finish_reason,
        "annotations": orjson.dumps(ctx.annotations).decode() if ctx.annotations else None,
        "content": None,
        "cache_status": ctx.annotations.get("cache"),
        "saved_micros": ctx.annotations.get("saved_micros"),
    }
    if store_content and ctx.body:
        content: dict[str, Any] = {"request": ctx.body}
        if ctx.output_text is not None:
            content["output"] = "".join(ctx.output_text)
        rec["content"] = orjson.dumps(content).decode()
    return rec
