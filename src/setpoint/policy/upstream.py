"""The pipeline's terminal: send the request to the chosen deployment and read what accounting needs."""

from __future__ import annotations

from typing import Any

import orjson

from setpoint.clock import Clock
from setpoint.errors import ProviderResponseError
from setpoint.models import Deployment
from setpoint.proxy.context import RequestContext
from setpoint.types import Next, Reply, UpstreamCall

__all__ = ["build_upstream_terminal"]


def upstream_body(ctx: RequestContext, dep: Deployment) -> tuple[dict[str, Any], bytes | None]:
    """The body to send upstream, and the client's raw bytes when nothing needed rewriting."""
    inject_usage = False
    if ctx.is_stream and dep.supports_stream_usage:
        opts = ctx.body.get("stream_options")
        inject_usage = not (isinstance(opts, dict) and opts.get("include_usage") is True)
        # When the client did not ask for usage, ask anyway (for accounting); the relay hides it.
        ctx.annotations["usage_injected"] = inject_usage
    if not (inject_usage or dep.extra_body or ctx.is_body_modified) and ctx.body.get("model") == dep.upstream_model:
        return ctx.body, ctx.raw
    body = dict(ctx.body)
    if dep.extra_body:
        body.update(dep.extra_body)
    body["model"] = dep.upstream_model
    if inject_usage:
        opts = body.get("stream_options")
        body["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
    return body, None


def build_upstream_terminal(path: str, clock: Clock) -> Next:
    async def call_upstream(ctx: RequestContext) -> Reply:
        dep = ctx.deployment
        assert dep is not None
        body, raw = upstream_body(ctx, dep)
        call = UpstreamCall(path=path, body=body, is_stream=ctx.is_stream, request_id=ctx.request_id, raw=raw)
        t0 = ctx.upstream_started = clock.monotonic()
        reply = await dep.provider.send(call)
        if reply.body is not None:
            ctx.upstream_ms = (clock.monotonic() - t0) * 1000
            try:
                doc = orjson.loads(reply.body)
            except orjson.JSONDecodeError:
                raise ProviderResponseError(f"upstream {dep.provider.name} sent a body that is not valid JSON") from None
            if not isinstance(doc, dict):
                raise ProviderResponseError(f"upstream {dep.provider.name} sent JSON that is not an object")
            ctx.usage.update_from(doc.get("usage"))
            choices = doc.get("choices")
            if isinstance(choices, list) and choices and isinstance(choices[0], dict):
                fr = choices[0].get("finish_reason")
                ctx.finish_reason = fr if isinstance(fr, str) else None
                if ctx.output_text is not None:
                    msg = choices[0].get("message")
                    if isinstance(msg, dict) and isinstance(msg.get("content"), str):
                        ctx.output_text.append(msg["content"])
        return reply

    return call_upstream
