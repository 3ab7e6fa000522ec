"""What is sent to a deployment, and what accounting reads from a unary answer."""

from __future__ import annotations

from typing import Any

import orjson

from setpoint.errors import ProviderResponseError
from setpoint.models import Deployment
from setpoint.proxy.context import RequestContext
from setpoint.types import Reply

__all__ = ["read_unary", "upstream_body"]


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


def read_unary(ctx: RequestContext, dep: Deployment, reply: Reply) -> None:
    """Check a unary upstream body and read what accounting needs from it."""
    try:
        doc = orjson.loads(reply.body or b"")
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
