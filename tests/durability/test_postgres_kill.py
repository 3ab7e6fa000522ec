"""THE KILL TEST with `logging.store: postgres`: a real `setpoint serve` writing its request log to
PostgreSQL is SIGKILLed in the middle of load; after a restart on the same data dir every request
whose response completed is in PostgreSQL exactly once (the spool carried it across the kill)."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest

from .conftest import ServeProc, segments, serve_config, wait_for
from .test_spool import _http_client, _kill9_under_load, _one_request, _restart_and_wait_for_orphans


def _pg_id_counts(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        try:
            return {r[0]: r[1] for r in conn.execute("SELECT id, COUNT(*) FROM requests GROUP BY id")}
        except psycopg.errors.UndefinedTable:
            return {}


def _assert_exactly_once(url: str, ids: list[str]) -> None:
    counts = _pg_id_counts(url)
    missing = [i for i in ids if i not in counts]
    dupes = {i: c for i, c in counts.items() if c != 1}
    assert not missing, f"{len(missing)} acknowledged records missing from PostgreSQL, e.g. {missing[:5]}"
    assert not dupes, f"duplicated records: {dupes}"


def _wait_schema(url: str) -> None:
    def ready() -> bool:
        with psycopg.connect(url) as conn:
            return conn.execute("SELECT to_regclass('spool_progress')").fetchone()[0] is not None

    wait_for(ready, 20, "the drainer to create the request log in PostgreSQL")
    time.sleep(0.2)


def _config(data_dir: Path, url: str) -> dict[str, Any]:
    return serve_config(data_dir, store="postgres", postgres_url=url)


@pytest.mark.slow
def test_kill9_with_load_in_flight_postgres(tmp_path: Path, pg_url: str, serve: Callable[[dict[str, Any]], ServeProc]) -> None:
    data_dir = tmp_path / "data"
    spool_dir = data_dir / "spool"
    cfg = _config(data_dir, pg_url)
    cfg["providers"]["sim"]["latency"] = {"ttft_ms": 2, "per_token_ms": 1.5, "jitter": 0}
    first = serve(cfg)
    _wait_schema(pg_url)
    assert not (data_dir / "requests.db").exists()  # the log is in PostgreSQL, not SQLite
    acked_at_end, owners = _kill9_under_load(first, spool_dir)
    # flush interval 60 s: practically nothing had reached PostgreSQL; the spool holds the rest
    assert len(set(acked_at_end) & set(_pg_id_counts(pg_url))) <= 10
    assert segments(spool_dir, owners[0])

    second = _restart_and_wait_for_orphans(serve, cfg, spool_dir, owners)
    _assert_exactly_once(pg_url, acked_at_end)
    assert all(c == 1 for c in _pg_id_counts(pg_url).values())

    # More load through the restarted server, then a clean stop: all of it in PostgreSQL too.
    with _http_client() as client, ThreadPoolExecutor(8) as pool:
        more = [rid for rid in pool.map(lambda i: _one_request(client, second.base_url, i), range(10**5, 10**5 + 80)) if rid]
    assert len(more) == 80
    assert second.terminate() == 0
    _assert_exactly_once(pg_url, acked_at_end + more)
    assert not (data_dir / "requests.db").exists()
