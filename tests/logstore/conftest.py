"""Fixtures for the request-log tests: a throwaway PostgreSQL (see `pg.py`), a database per test,
and `log_backend`: the same contract tests on SQLite and on PostgreSQL."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from setpoint.logstore.sql_reader import SqlLogReader
from setpoint.logstore.sql_store import SqlLogStore

from .pg import pg_url_fixture

NOW = 1_790_000_000.0  # 2026-09-21 14:13:20 UTC: the clock of stores and readers in these tests


@dataclass
class LogBackend:
    """One request-log backend under test: open writers and readers on the same (empty) log."""

    name: str
    _store: Callable[..., SqlLogStore]
    _reader: Callable[..., SqlLogReader]
    _sql: Callable[[str, tuple[Any, ...]], list[tuple[Any, ...]]]
    clock: list[float] = field(default_factory=lambda: [NOW])
    _opened: list[Any] = field(default_factory=list)

    def now(self) -> float:
        return self.clock[0]

    def store(self, **kw: Any) -> SqlLogStore:
        s = self._store(clock=self.now, **kw)
        self._opened.append(s)
        return s

    def reader(self) -> SqlLogReader:
        r = self._reader(clock=self.now)
        self._opened.append(r)
        return r

    def sql(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """A query straight on the database (`?` placeholders)."""
        return self._sql(query, params)

    def close_all(self) -> None:
        for x in reversed(self._opened):
            x.close()
        self._opened.clear()


def sqlite_backend(path: Path) -> LogBackend:
    from setpoint.logstore.sqlite_reader import SqliteLogReader
    from setpoint.logstore.sqlite_store import SqliteLogStore

    def sql(query: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(path)
        try:
            return conn.execute(query, params).fetchall()
        finally:
            conn.close()

    return LogBackend("sqlite", lambda **kw: SqliteLogStore(path, **kw), lambda **kw: SqliteLogReader(path, **kw), sql)


def postgres_backend(url: str) -> LogBackend:
    import psycopg

    from setpoint.logstore.dialect import POSTGRES
    from setpoint.logstore.postgres_reader import PostgresLogReader
    from setpoint.logstore.postgres_store import PostgresLogStore

    def sql(query: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with psycopg.connect(url, autocommit=True) as conn:
            cur = conn.execute(POSTGRES.sql(query), params)
            return cur.fetchall() if cur.description else []

    return LogBackend("postgres", lambda **kw: PostgresLogStore(url, **kw), lambda **kw: PostgresLogReader(url, **kw), sql)


@pytest.fixture(params=["sqlite", "postgres"])
def log_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LogBackend]:
    """An empty request log on each backend."""
    b = sqlite_backend(tmp_path / "requests.db") if request.param == "sqlite" else postgres_backend(
        request.getfixturevalue("pg_url"))
    yield b
    b.close_all()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def module_log_backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LogBackend]:
    """An empty request log on each backend, shared by a module's read-only tests."""
    if request.param == "sqlite":
        b = sqlite_backend(tmp_path_factory.mktemp("log") / "requests.db")
        yield b
    else:
        urls = pg_url_fixture(request.getfixturevalue("pg_server"))
        b = postgres_backend(next(urls))
        yield b
        b.close_all()
        urls.close()  # drops the database
        return
    b.close_all()
