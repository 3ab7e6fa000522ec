"""The pooled keep-alive aiohttp session an HTTP adapter owns (one per provider)."""

from __future__ import annotations

import aiohttp

from setpoint.config.schema import TimeoutsConfig

__all__ = ["HttpSession"]


class HttpSession:
    def __init__(self, timeouts: TimeoutsConfig, max_connections: int) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeouts.read_s, sock_connect=timeouts.connect_s)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=60, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, skip_auto_headers=("User-Agent",)
            )

    async def get(self) -> aiohttp.ClientSession:
        if self._session is None:
            await self.start()
        assert self._session is not None
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
