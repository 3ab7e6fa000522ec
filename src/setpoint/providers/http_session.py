"""The pooled keep-alive HTTP client an adapter owns (one per provider), and the one place where
transport failures become setpoint errors. Adapters see only `HttpSession.post` and
`UpstreamResponse`; the transport is `http_pool.HttpPool`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from types import TracebackType

from setpoint.config.schema import HttpUpstreamConfig
from setpoint.errors import ProviderResponseError, ProviderTimeoutError, ProviderUnavailableError
from setpoint.providers.base import error_from_status
from setpoint.providers.http_pool import (
    BodyError,
    BodyTooLargeError,
    ConnectError,
    HttpPool,
    PooledResponse,
    ProtocolError,
    TransportError,
    TransportTimeout,
    encode_headers,
)

__all__ = ["HttpSession", "UpstreamResponse", "map_transport_errors"]

_ERROR_BODY_BYTES = 64 * 1024  # of a non-2xx answer, enough for any error message


class map_transport_errors:  # noqa: N801 - used as a function: `with map_transport_errors(name):`
    """Map the pool's failures into the error tree, once. (A class, not a generator-based
    context manager: it is entered two or three times per request, and this is several times cheaper.)"""

    __slots__ = ("_provider",)

    def __init__(self, provider: str) -> None:
        self._provider = provider

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc is None or not isinstance(exc, TransportError):
            return
        provider = self._provider
        if isinstance(exc, TransportTimeout):
            raise ProviderTimeoutError(f"upstream {provider} timed out") from exc
        if isinstance(exc, BodyTooLargeError):
            raise ProviderResponseError(f"upstream {provider} sent {exc}") from exc
        if isinstance(exc, (BodyError, ProtocolError)):
            raise ProviderResponseError(f"upstream {provider} sent a truncated or malformed response: {exc}") from exc
        if isinstance(exc, ConnectError):
            raise ProviderUnavailableError(f"upstream {provider} is unreachable: {exc}") from exc
        raise ProviderUnavailableError(f"upstream {provider} failed: {exc}") from exc  # a future subclass: never a 500


class UpstreamResponse:
    """One upstream answer: status and headers now, the body read whole or chunk by chunk.

    It is also the adapters' `UpstreamStream` for a raw body: iterating yields chunks as they
    arrive, and `aclose` before the body's end drops the connection (the upstream stops)."""

    __slots__ = ("_max_body", "_provider", "_resp", "content_type", "headers", "status")

    def __init__(self, provider: str, resp: PooledResponse, max_body: int) -> None:
        self._provider = provider
        self._resp = resp
        self._max_body = max_body
        self.status = resp.status
        self.headers: Mapping[str, str] = resp.headers  # lower-case names
        ctype = resp.headers.get("content-type") or ""
        self.content_type = ctype.split(";", 1)[0].strip().lower()

    async def raise_for_status(self) -> None:
        """For a non-2xx answer: read its body (which gives the connection back) and raise it,
        mapped into the error tree."""
        if self.status >= 300:
            with map_transport_errors(self._provider):  # only the message is needed: a long body is cut
                body = await self._resp.read(_ERROR_BODY_BYTES, truncate=True)
            raise error_from_status(self._provider, self.status, self.headers, body)

    async def expect_content_type(self, *, stream: bool) -> None:
        """SSE for a stream request, JSON otherwise; anything else closes the connection and raises."""
        if self.content_type == ("text/event-stream" if stream else "application/json"):
            return
        await self.aclose()
        if stream:
            raise ProviderResponseError(
                f"upstream {self._provider} answered a stream request with content type {self.content_type!r}")
        raise ProviderResponseError(
            f"upstream {self._provider} answered with content type {self.content_type!r}, not JSON")

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self.chunks()

    async def read(self) -> bytes:
        """The whole body, at most the provider's `max_response_bytes` (past it: a 502)."""
        with map_transport_errors(self._provider):
            return await self._resp.read(self._max_body)

    async def chunks(self) -> AsyncIterator[bytes]:
        with map_transport_errors(self._provider):
            async for chunk in self._resp.chunks():
                yield chunk

    async def aclose(self) -> None:
        """Give the connection back; before the body's end this closes it (the upstream stops)."""
        self._resp.release()


class HttpSession:
    def __init__(self, provider: str, cfg: HttpUpstreamConfig, headers: Mapping[str, str]) -> None:
        self._provider = provider
        self._header_block = encode_headers(headers)
        self._max_body = cfg.max_response_bytes
        self._pool = HttpPool(
            max_connections=cfg.max_connections, connect_timeout_s=cfg.timeouts.connect_s,
            total_timeout_s=cfg.timeouts.read_s,
        )

    async def start(self) -> None:
        pass  # connections open on first use

    async def post(self, url: str, body: bytes) -> UpstreamResponse:
        with map_transport_errors(self._provider):
            resp = await self._pool.post(url, self._header_block, body)
        return UpstreamResponse(self._provider, resp, self._max_body)

    async def aclose(self) -> None:
        await self._pool.aclose()
