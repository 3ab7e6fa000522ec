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


def upstream_body(ctx: RequestContext, dep: Deployment) -> dict[str, Any]:
    body = dict(ctx.body)
    if dep.extra_body:
        body.update(dep.extra_body)
    body["model"] = dep.upstream_model
    if ctx.is_stream and dep.supports_stream_usage:
        opts = body.get("stream_options")
        wants = isinstance(opts, dict) and opts.get("include_usage") is True
        ctx.annotations["usage_injected"] = not wants
        if not wants:
            # Ask for usage anyway, for accounting; the relay hides it from the client.
            body["stream_options"] = {**(opts or {}), "include_usage": True}
    return body


def build_upstream_terminal(path: str, clock: Clock) -> Next:
    async def call_upstream(ctx: RequestContext) -> Reply:
        assert ctx.route is not None
        dep = ctx.route.deployments[0]
        ctx.deployment = dep
        call = UpstreamCall(path=path, body=upstream_body(ctx, dep), is_stream=ctx.is_stream, request_id=ctx.request_id)
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
