"""A gateway on its own event loop in a background thread (for `setpoint demo` and tests)."""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType

from setpoint.config.compile import Runtime
from setpoint.proxy.server import RunningServer, start_server

__all__ = ["BackgroundGateway"]


class BackgroundGateway:
    def __init__(self, runtime: Runtime, host: str = "127.0.0.1", port: int = 0) -> None:
        self._runtime = runtime
        self._host = host
        self._port = port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="setpoint-gateway", daemon=True)
        self.server: RunningServer | None = None

    def __enter__(self) -> BackgroundGateway:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(start_server(self._runtime, self._host, self._port), self._loop)
        self.server = fut.result(timeout=30)
        return self

    @property
    def base_url(self) -> str:
        assert self.server is not None
        return self.server.base_url

    @property
    def root_url(self) -> str:
        return self.base_url[: -len("/v1")]

    def flush_log(self, timeout_s: float = 30.0) -> bool:
        assert self.server is not None
        return self.server.gateway.request_log.flush(timeout_s)

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
