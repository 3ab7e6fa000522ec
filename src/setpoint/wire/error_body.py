"""The one renderer for errors: any `SetpointError` -> OpenAI's error envelope."""

from __future__ import annotations

import orjson

from setpoint.errors import SetpointError

__all__ = ["error_body", "error_event"]


def _envelope(err: SetpointError) -> dict[str, dict[str, str | None]]:
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.wire_code}}


def error_body(err: SetpointError) -> bytes:
    """JSON body for a non-streamed error response."""
    return orjson.dumps(_envelope(err))


def error_event(err: SetpointError) -> bytes:
    """An SSE event that ends a broken stream explicitly (the openai SDK raises on it)."""
    return b"data: " + orjson.dumps(_envelope(err)) + b"\n\n"
