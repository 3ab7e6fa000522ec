"""`parse`: after auth, turn the raw body into a checked request (400 on anything malformed)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from setpoint.errors import InvalidRequestError
from setpoint.proxy.context import RequestContext
from setpoint.types import Next, Reply
from setpoint.wire.request import parse_json_object

__all__ = ["ParseStage"]


_RANK = {"critical": 0, "default": 1, "sheddable": 2}


def _text_header(headers: Mapping[str, str], name: str) -> str | None:
    """A header value that is kept (in the request record, the loop detector): it must be UTF-8.
    (Servers decode other bytes as surrogate escapes, which no JSON encoder takes.)"""
    value = headers.get(name)
    if value is None:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError(f"header {name} is not valid UTF-8") from None
    return value


def _priority(asked: str | None, allowed: str) -> str:
    """The header may lower a key's priority class, never raise it."""
    if asked is None:
        return allowed
    asked = asked.strip().lower()
    if asked not in _RANK:
        raise InvalidRequestError("header x-setpoint-priority must be critical, default or sheddable")
    return asked if _RANK[asked] >= _RANK[allowed] else allowed


class ParseStage:
    name: ClassVar[str] = "parse"

    def __init__(self, check: Callable[[dict[str, Any]], str], *, allow_stream: bool) -> None:
        self._check = check
        self._allow_stream = allow_stream

    async def __call__(self, ctx: RequestContext, call_next: Next) -> Reply:
        body = parse_json_object(ctx.raw)
        ctx.model = self._check(body)
        ctx.body = body
        ctx.is_stream = body.get("stream") is True
        if ctx.is_stream and not self._allow_stream:
            raise InvalidRequestError("this endpoint does not support streaming", param="stream")
        user = _text_header(ctx.headers, "x-setpoint-user") or body.get("user")
        ctx.user = user if isinstance(user, str) and user else (ctx.key.user if ctx.key else None)
        run_id = _text_header(ctx.headers, "x-setpoint-run-id")
        ctx.run_id = run_id[:200] if run_id else None
        ctx.priority = _priority(ctx.headers.get("x-setpoint-priority"), ctx.key.priority if ctx.key else "default")
        deadline = ctx.headers.get("x-setpoint-deadline-ms")
        if deadline is not None:
            try:
                ms = float(deadline)
            except ValueError:
                raise InvalidRequestError("header x-setpoint-deadline-ms must be a number of milliseconds") from None
            ctx.deadline_at = ctx.started_mono + max(0.0, ms) / 1000
        return await call_next(ctx)
