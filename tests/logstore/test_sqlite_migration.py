"""An existing requests.db (written by an older version) keeps working: opening it adds the new
columns, indexes and rollup tables, and the rollups are backfilled from its rows in batches,
without counting a row twice, while new batches keep arriving."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from setpoint.logstore.reader import RequestFilter
from setpoint.logstore.sql_schema import RECORD_COLUMNS
from setpoint.logstore.sqlite_reader import SqliteLogReader
from setpoint.logstore.sqlite_store import SqliteLogStore

from . import reference as ref
from .conftest import NOW

DAY = 86_400

# The schema of the first releases (cache_status and saved_micros came later: `with_cache_columns`).
_V1 = """
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY, ts REAL NOT NULL, endpoint TEXT NOT NULL,
    key_id TEXT, key_name TEXT, team TEXT, user_id TEXT, model TEXT, deployment TEXT, provider TEXT,
    is_stream INTEGER NOT NULL DEFAULT 0, status INTEGER NOT NULL, error_code TEXT,
    prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens INTEGER NOT NULL DEFAULT 0, reasoning_tokens INTEGER NOT NULL DEFAULT 0,
    cost_micros INTEGER, latency_ms REAL, ttft_ms REAL, upstream_ms REAL, finish_reason TEXT,
    annotations TEXT, content TEXT {cache_columns}
);
CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts);
CREATE INDEX IF NOT EXISTS requests_team_ts ON requests (team, ts);
CREATE INDEX IF NOT EXISTS requests_key_ts ON requests (key_id, ts);
CREATE INDEX IF NOT EXISTS requests_model_ts ON requests (model, ts);
CREATE TABLE IF NOT EXISTS rejected_records (
    segment TEXT NOT NULL, record TEXT NOT NULL, error TEXT NOT NULL,
    rejected_at REAL NOT NULL DEFAULT (strftime('%s', 'now'))
);
CREATE TABLE IF NOT EXISTS spool_progress (segment TEXT PRIMARY KEY, byte_offset INTEGER NOT NULL);
"""


def _old_log(path: Path, records: list[dict[str, Any]], *, with_cache_columns: bool) -> None:
    cols = RECORD_COLUMNS if with_cache_columns else RECORD_COLUMNS[:-2]
    conn = sqlite3.connect(path)
    try:
        conn.executescript(_V1.format(cache_columns=", cache_status TEXT, saved_micros INTEGER" if with_cache_columns else ""))
        conn.executemany(f"INSERT INTO requests ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
                         [tuple(r[c] for c in cols) for r in records])
        conn.execute("INSERT INTO spool_progress VALUES ('123-abcdef01-00000000.jsonl', 4096)")
        conn.commit()
    finally:
        conn.close()


def _indexes(path: Path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND name NOT LIKE 'sqlite_%'")}
    finally:
        conn.close()


def test_an_old_log_is_migrated_and_backfilled_in_batches(tmp_path: Path) -> None:
    db = tmp_path / "requests.db"
    old = ref.make_records(2500, NOW, seed=21)
    for r in old:  # written before the cache columns existed
        r["cache_status"] = r["saved_micros"] = None
    _old_log(db, old, with_cache_columns=False)

    store = SqliteLogStore(db, clock=lambda: NOW)
    store.backfill_rows = 300
    store.maintain_budget_s = 0.0  # one backfill batch per call
    names = {row[1] for row in store._conn.execute("PRAGMA table_info(requests)")}  # noqa: SLF001
    assert {"cache_status", "saved_micros"} <= names
    assert store.offset("123-abcdef01-00000000.jsonl") == 4096  # spool progress survives
    idx = _indexes(db)
    assert not idx & {"requests_ts", "requests_team_ts", "requests_key_ts", "requests_model_ts"}
    assert {"requests_ts_id", "requests_team_ts_id", "requests_key_ts_id", "requests_model_ts_id"} <= idx

    reader = SqliteLogReader(db, clock=lambda: NOW)
    try:
        assert store.maintain() is True  # one batch of 300 so far
        partial = reader.totals(0, NOW + DAY).requests
        assert 0 < partial < len(old)
        # New batches meanwhile: new records, and replays of rows already stored (not counted again).
        new = ref.make_records(400, NOW, seed=22, prefix="new")
        store.commit_batch("456-abcdef02-00000000.jsonl", 100, [*new[:200], *old[:100], *old[-100:]])
        # A second process opening the same log neither migrates nor backfills it again.
        SqliteLogStore(db, clock=lambda: NOW).close()
        calls = 1
        while store.maintain():
            calls += 1
        assert calls >= len(old) // 300
        store.commit_batch("456-abcdef02-00000000.jsonl", 200, new[200:])
        everything = [*old, *new]
        assert reader.totals(0, NOW + DAY) == ref.totals(everything)
        for since, until, step in [(NOW - DAY, NOW, 900), (NOW - 30 * DAY, NOW, 6 * 3600)]:
            got = {(p.bucket, p.group): p.totals for p in reader.series(since, until, step, "key")}
            assert got == ref.series(everything, since, until, step, "key", NOW)
        got_b = {b.group: (b.totals, b.extra["unpriced_requests"]) for b in reader.breakdown(0, NOW + DAY, "user")}
        assert got_b == ref.breakdown(everything, 0, NOW + DAY, "user", NOW)
        assert reader.errors(NOW - 7 * DAY, NOW) == ref.errors(everything, NOW - 7 * DAY, NOW, NOW)
        assert len(reader.search(RequestFilter(team="team-a"), limit=1000).rows) == sum(
            r["team"] == "team-a" for r in everything)
    finally:
        reader.close()
        store.close()

    # Reopened later: nothing to backfill, nothing counted twice.
    again = SqliteLogStore(db, clock=lambda: NOW)
    try:
        assert again.maintain() is False
    finally:
        again.close()
    reader = SqliteLogReader(db, clock=lambda: NOW)
    try:
        assert reader.totals(0, NOW + DAY) == ref.totals([*old, *new])
    finally:
        reader.close()


def test_a_log_with_the_cache_columns_but_no_rollups(tmp_path: Path) -> None:
    db = tmp_path / "requests.db"
    old = ref.make_records(300, NOW, seed=23)
    _old_log(db, old, with_cache_columns=True)
    store = SqliteLogStore(db, clock=lambda: NOW)
    try:
        while store.maintain():
            pass
    finally:
        store.close()
    reader = SqliteLogReader(db, clock=lambda: NOW)
    try:
        assert reader.totals(0, NOW + DAY) == ref.totals(old)
        got = {(p.bucket, p.group): p.totals for p in reader.series(NOW - 3600, NOW, 60, "model")}
        assert got == ref.series(old, NOW - 3600, NOW, 60, "model", NOW)
    finally:
        reader.close()


def test_a_new_log_has_nothing_to_backfill(tmp_path: Path) -> None:
    store = SqliteLogStore(tmp_path / "requests.db", clock=lambda: NOW)
    try:
        assert store.maintain() is False
        store.commit_batch("s.jsonl", 1, ref.make_records(5, NOW, seed=24))
        assert store.maintain() is False
    finally:
        store.close()
