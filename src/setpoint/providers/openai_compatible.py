"""Adapter for OpenAI-compatible upstreams over one pooled keep-alive HTTP client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import ClassVar

import orjson

from setpoint.config.schema import OpenAICompatibleProviderConfig
from setpoint.errors import ProviderResponseError
from setpoint.providers.base import error_from_status
from setpoint.providers.http_session import HttpSession, UpstreamResponse
from setpoint.types import Reply, UpstreamCall

__all__ = ["OpenAICompatibleProvider", "ResponseStream"]


class ResponseStream:
    """An upstream body as an `UpstreamStream`: chunks as they arrive; `aclose` drops the connection
    if the body has not ended (the upstream stops generating)."""

    __slots__ = ("_resp",)

    def __init__(self, resp: UpstreamResponse) -> None:
        self._resp = resp

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._resp.chunks()

    async def aclose(self) -> None:
        await self._resp.aclose()


class OpenAICompatibleProvider:
    system: ClassVar[str] = "openai"  # gen_ai.system in traces

    def __init__(self, name: str, cfg: OpenAICompatibleProviderConfig) -> None:
        self.name = name
        self._cfg = cfg
        headers = {"Content-Type": "application/json", **cfg.headers}
        if cfg.api_key:
            headers["Authorization"] = f"Bearer {cfg.api_key}"
        self._http = HttpSession(name, cfg.timeouts, cfg.max_connections, headers)

    async def start(self) -> None:
        await self._http.start()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def send(self, call: UpstreamCall) -> Reply:
        data = call.raw if call.raw is not None else orjson.dumps(call.body)
        resp = await self._http.post(self._cfg.base_url + call.path, data)
        if resp.status >= 300:
            body = await resp.read()
            await resp.aclose()
            raise error_from_status(self.name, resp.status, resp.headers, body)
        ctype = resp.content_type
        if call.is_stream:
            if ctype != "text/event-stream":
                await resp.aclose()
                raise ProviderResponseError(f"upstream {self.name} answered a stream request with content type {ctype!r}")
            return Reply(status=200, stream=ResponseStream(resp))
        if ctype != "application/json":
            await resp.aclose()
            raise ProviderResponseError(f"upstream {self.name} answered with content type {ctype!r}, not JSON")
        return Reply(status=200, body=await resp.read())
