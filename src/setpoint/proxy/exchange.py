"""One API request's HTTP side, whichever server parsed it: its headers and body, and the two ways
to answer it (a whole body, or a stream of events).

The API handlers (`routes.py`) are written against `Exchange`; `edge.py` serves the hot endpoints
with its own, and `AiohttpExchange` serves them through aiohttp (connections the edge handed on).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from aiohttp import web

from setpoint.errors import PayloadTooLargeError

__all__ = ["AiohttpExchange", "Exchange", "read_body"]


class Exchange(Protocol):
    headers: Mapping[str, str]

    async def read_body(self, limit: int) -> bytes:
        """The whole body, or `PayloadTooLargeError` (413) past `limit` bytes."""
        ...

    async def respond(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        """A whole answer (`headers` carry its Content-Type)."""
        ...

    async def start_stream(self, status: int, headers: Mapping[str, str]) -> None:
        """A streamed answer; its head may wait for the first `write` (one send instead of two)."""
        ...

    async def write(self, data: bytes) -> None:
        """Part of a streamed answer; raises `ConnectionResetError` once the client has gone."""
        ...

    async def end(self, data: bytes) -> None:
        """The last bytes of a streamed answer and its end (quietly, if the client has gone)."""
        ...


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, or `PayloadTooLargeError` (413) past `limit` bytes, with or without a length."""
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLargeError(f"request body is {length} bytes; the limit is {limit}")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLargeError(f"request body exceeds the limit of {limit} bytes") from None


class _SSEResponse(web.StreamResponse):
    """A stream whose headers leave with its first event: one write and one packet instead of two.
    (aiohttp's own flag; on a version without it, headers are sent on their own as before.)"""

    _send_headers_immediately = False


class AiohttpExchange:
    """An API request that came through aiohttp; `response` is what the aiohttp handler returns."""

    __slots__ = ("_request", "headers", "response")

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.headers: Mapping[str, str] = request.headers
        self.response: web.StreamResponse | None = None

    async def read_body(self, limit: int) -> bytes:
        return await read_body(self._request, limit)

    async def respond(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.response = web.Response(status=status, body=body, headers=headers)

    async def start_stream(self, status: int, headers: Mapping[str, str]) -> None:
        resp = _SSEResponse(status=status, headers=headers)
        await resp.prepare(self._request)
        self.response = resp

    async def write(self, data: bytes) -> None:
        assert self.response is not None
        await self.response.write(data)

    async def end(self, data: bytes) -> None:
        assert self.response is not None
        try:
            await self.response.write_eof(data)  # the last event and the end of the chunked body in one write
        except ConnectionResetError:
            pass
