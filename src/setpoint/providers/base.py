"""Helpers every adapter shares: map an upstream HTTP status and body into the error tree."""

from __future__ import annotations

import re
from collections.abc import Mapping

import orjson

from setpoint.errors import (
    ProviderRateLimitedError,
    ProviderRejectedError,
    ProviderResponseError,
    ProviderTimeoutError,
    ProviderUnavailableError,
    UpstreamError,
)

__all__ = ["error_from_status", "parse_retry_after"]


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait, from `Retry-After` (seconds) or OpenAI's `x-ratelimit-reset-*` (e.g. '1s', '20ms')."""
    ra = headers.get("retry-after") or headers.get("Retry-After")
    if ra:
        try:
            return max(0.0, float(ra))
        except ValueError:
            pass  # an HTTP date: fall back to the x-ratelimit-* headers
    for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
        v = headers.get(name)
        if v:
            return _duration_s(v)
    return None


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration_s(v: str) -> float | None:
    """'20ms', '1s', '6m0s', '1h2m3.5s' (Go durations, as OpenAI sends them) or plain seconds."""
    v = v.strip()
    try:
        return float(v)
    except ValueError:
        pass
    parts = _DURATION_PART.findall(v)
    if not parts or "".join(n + u for n, u in parts) != v:
        return None
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def _upstream_message(body: bytes) -> tuple[str | None, str | None]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict):
        msg, code = err.get("message"), err.get("code")
        return (msg if isinstance(msg, str) else None), (code if isinstance(code, str) else None)
    if isinstance(err, str):
        return err, None
    return None, None


def error_from_status(provider: str, status: int, headers: Mapping[str, str], body: bytes) -> UpstreamError:
    """The one status -> error mapping. Upstream credential failures never surface as the client's 401."""
    msg, code = _upstream_message(body)
    if status == 429:
        return ProviderRateLimitedError(
            f"upstream {provider} is rate limiting: {msg or 'too many requests'}",
            retry_after_s=parse_retry_after(headers),
        )
    if status in (401, 403):
        return ProviderResponseError(f"upstream {provider} rejected the gateway's credentials (HTTP {status})")
    if status in (408, 504):
        return ProviderTimeoutError(f"upstream {provider} timed out (HTTP {status})")
    if status >= 500:
        return ProviderUnavailableError(
            f"upstream {provider} failed with HTTP {status}: {msg or 'no details'}", upstream_status=status
        )
    if 400 <= status < 500:
        return ProviderRejectedError(
            f"upstream {provider} rejected the request: {msg or f'HTTP {status}'}",
            upstream_status=status,
            upstream_code=code,
        )
    return ProviderResponseError(f"upstream {provider} answered with unexpected HTTP {status}")
