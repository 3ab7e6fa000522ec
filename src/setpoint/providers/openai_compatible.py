"""Adapter for OpenAI-compatible upstreams over one pooled keep-alive aiohttp session."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import ClassVar

import aiohttp
import orjson

from setpoint.config.schema import OpenAICompatibleProviderConfig
from setpoint.errors import ProviderResponseError, ProviderTimeoutError, ProviderUnavailableError, UpstreamError
from setpoint.providers.base import error_from_status
from setpoint.providers.http_session import HttpSession
from setpoint.types import Reply, UpstreamCall

__all__ = ["OpenAICompatibleProvider"]


@contextmanager
def map_upstream_errors(provider: str) -> Iterator[None]:
    """The one place where transport exceptions become setpoint errors for this adapter."""
    try:
        yield
    except UpstreamError:
        raise
    except (asyncio.TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise ProviderTimeoutError(f"upstream {provider} timed out") from exc
    except aiohttp.ClientPayloadError as exc:
        raise ProviderResponseError(f"upstream {provider} sent a truncated or malformed body") from exc
    except aiohttp.ClientResponseError as exc:
        raise ProviderResponseError(f"upstream {provider} sent an invalid HTTP response") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise ProviderUnavailableError(f"upstream {provider} is unreachable: {type(exc).__name__}") from exc


class _ResponseStream:
    __slots__ = ("_provider", "_resp")

    def __init__(self, provider: str, resp: aiohttp.ClientResponse) -> None:
        self._provider = provider
        self._resp = resp

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with map_upstream_errors(self._provider):
            async for chunk in self._resp.content.iter_any():
                yield chunk

    async def aclose(self) -> None:
        if not self._resp.content.at_eof():
            self._resp.close()  # drop the connection: the upstream stops generating
        else:
            self._resp.release()


class OpenAICompatibleProvider:
    system: ClassVar[str] = "openai"  # gen_ai.system in traces

    def __init__(self, name: str, cfg: OpenAICompatibleProviderConfig) -> None:
        self.name = name
        self._cfg = cfg
        self._http = HttpSession(cfg.timeouts, cfg.max_connections)
        self._headers = {"Content-Type": "application/json", **cfg.headers}
        if cfg.api_key:
            self._headers["Authorization"] = f"Bearer {cfg.api_key}"

    async def start(self) -> None:
        await self._http.start()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def send(self, call: UpstreamCall) -> Reply:
        session = await self._http.get()
        url = self._cfg.base_url + call.path
        with map_upstream_errors(self.name):
            data = call.raw if call.raw is not None else orjson.dumps(call.body)
            resp = await session.post(url, data=data, headers=self._headers)
            if resp.status >= 300:
                try:
                    body = await resp.read()
                finally:
                    resp.release()
                raise error_from_status(self.name, resp.status, resp.headers, body)
            ctype = resp.content_type
            if call.is_stream:
                if ctype != "text/event-stream":
                    resp.close()
                    raise ProviderResponseError(
                        f"upstream {self.name} answered a stream request with content type {ctype!r}"
                    )
                return Reply(status=200, stream=_ResponseStream(self.name, resp))
            try:
                body = await resp.read()
            finally:
                resp.release()
            if ctype != "application/json":
                raise ProviderResponseError(f"upstream {self.name} answered with content type {ctype!r}, not JSON")
            return Reply(status=200, body=body)
