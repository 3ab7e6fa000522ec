"""A cache write still running when the gateway stops.

The cache writes off the latency path: a task started when the request ends, which nothing awaits.
`Gateway.stop()` then closes the state store, and `SqliteStateStore.aclose()` closes every thread's
connection from the loop thread, including one a worker thread is using for that write. When the
close lands while the worker is inside SQLite, the process dies with a segmentation fault (seen in
this suite's own runs before `cache_gateway` learned to drain writes at teardown: the fault was in
`SqliteStateStore.cache_put`'s DELETE while the loop thread was already past `state.aclose()`).

The test below makes the interleaving deterministic instead of racing it: the write is held just
before its DELETE (in the worker thread, inside the store's transaction) until the store has been
closed; then it runs on the closed connection. A gateway that waits for (or cancels) its cache
writes before closing the store never lets that happen; a fallback lets the held write go after a
few seconds, so a fixed gateway that is waiting for it does not deadlock."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from setpoint.config.compile import compile_config
from setpoint.config.load import parse_config
from setpoint.proxy.background import BackgroundGateway

from .helpers import ALL_KEY, cache_config

FALLBACK_S = 3.0  # only a fixed gateway ever waits this long (it is waiting for the held write)


def test_stopping_the_gateway_never_closes_the_store_under_a_running_cache_write(tmp_path: Path) -> None:
    cfg = cache_config(state_url="sqlite:///state.db")
    cfg["data_dir"] = str(tmp_path / "gw")
    gw = BackgroundGateway(compile_config(parse_config(cfg, env={})))
    gw.__enter__()
    stopped = False
    try:
        assert gw.server is not None
        store: Any = gw.server.gateway.runtime.state
        in_delete, store_closed = threading.Event(), threading.Event()
        failures: list[BaseException] = []
        held = itertools.count()

        class HeldConnection:
            """The worker's real connection; the first cache DELETE waits until the store is closed."""

            def __init__(self, conn: Any) -> None:
                self._conn = conn

            def execute(self, sql: str, *args: Any) -> Any:
                if sql.startswith("DELETE FROM cache") and next(held) == 0:
                    in_delete.set()
                    store_closed.wait(FALLBACK_S)
                return self._conn.execute(sql, *args)

        real_conn, real_aclose, real_put = store._conn, store.aclose, store.cache_put

        async def aclose() -> None:
            await real_aclose()
            store_closed.set()

        async def cache_put(*args: Any) -> None:
            try:
                await real_put(*args)
            except BaseException as exc:
                failures.append(exc)
                raise

        store._conn = lambda: HeldConnection(real_conn())
        store.aclose = aclose
        store.cache_put = cache_put

        with httpx.Client(timeout=20.0, trust_env=False) as http:
            r = http.post(f"{gw.base_url}/chat/completions", headers={"Authorization": f"Bearer {ALL_KEY}"},
                          json={"model": "chat-a", "messages": [{"role": "user", "content": "shutdown"}], "temperature": 0})
        assert r.status_code == 200 and r.headers["x-setpoint-cache"] == "miss"
        assert in_delete.wait(10), "the cache write never reached the store"

        gw.__exit__(None, None, None)  # SIGTERM in production: the write is still running
        stopped = True
        assert not failures, f"the cache write ran on a store closed under it: {failures!r}"
    finally:
        if not stopped:
            gw.__exit__(None, None, None)
