"""Adapter for OpenAI-compatible upstreams over one pooled keep-alive HTTP client."""

from __future__ import annotations

from typing import ClassVar

import orjson

from setpoint.config.schema import OpenAICompatibleProviderConfig
from setpoint.providers.http_session import HttpSession
from setpoint.types import Reply, UpstreamCall

__all__ = ["OpenAICompatibleProvider"]


class OpenAICompatibleProvider:
    system: ClassVar[str] = "openai"  # gen_ai.system in traces

    def __init__(self, name: str, cfg: OpenAICompatibleProviderConfig) -> None:
        self.name = name
        self._cfg = cfg
        headers = {"Content-Type": "application/json", **cfg.headers}
        if cfg.api_key:
            headers["Authorization"] = f"Bearer {cfg.api_key}"
        self._http = HttpSession(name, cfg, headers)

    async def start(self) -> None:
        await self._http.start()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def send(self, call: UpstreamCall) -> Reply:
        data = call.raw if call.raw is not None else orjson.dumps(call.body)
        resp = await self._http.post(self._cfg.base_url + call.path, data)
        await resp.raise_for_status()
        await resp.expect_content_type(stream=call.is_stream)
        if call.is_stream:
            return Reply(status=200, stream=resp)
        return Reply(status=200, body=await resp.read())
