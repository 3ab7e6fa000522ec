"""The request log in SQLite (the default): one file, WAL, the drainers of every worker writing to it.

Batches are multi-row INSERTs (one C call per chunk instead of one per row, which keeps the drainer
thread from contending with the event loop). Opening a log written by an older version migrates it
in place: added columns, the (x, ts, id) indexes, and the rollup tables, which `maintain()` then
backfills from the existing rows in batches (resumable, by rowid, never counting a row twice).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from setpoint.logstore.dialect import SQLITE
from setpoint.logstore.rows import to_row
from setpoint.logstore.sql_schema import (
    ADDED_COLUMNS, OLD_INDEXES, RECORD_COLUMNS, REQUESTS, SCHEMA_VERSION, Table,
)
from setpoint.logstore.sql_store import Clock, SqlLogStore
from setpoint.sqlite_open import open_sqlite

__all__ = ["RECORD_COLUMNS", "SqliteLogStore"]

log = logging.getLogger("setpoint.logstore")

# Chunks are powers of two (256, 128, ..., 1) so that few statement texts are ever compiled and
# cached by the sqlite3 module.
_ROWS_PER_STATEMENT = 256
_BACKFILL_ROWS = 20_000

# The sqlite3 module binds int, float and str as they are, but sends every other value, None
# included, through its adapter lookup; a miss there formats two AttributeErrors (`__adapt__`,
# `__conform__`) before binding NULL. A record has about ten NULL columns, so this was 15k
# instructions per record on the drainer thread (callgrind), holding the GIL. An identity adapter
# for None makes the lookup a hit: 3.0 -> 1.3 µs per 10-column row with six NULLs. It binds exactly
# what it did before (NULL); the registry is the module's, so this applies process-wide.
sqlite3.register_adapter(type(None), lambda value: value)


@lru_cache(maxsize=256)
def _insert_sql(table: Table, n: int, tail: str) -> str:
    row = f"({', '.join('?' for _ in table.columns)})"
    return f"INSERT INTO {table.name} ({', '.join(table.column_names)}) VALUES {','.join([row] * n)} {tail}"


class SqliteLogStore(SqlLogStore):
    """Used from the drainer thread only (one connection, not shared across threads)."""

    dialect = SQLITE
    _refused = (sqlite3.IntegrityError,)
    backfill_rows = _BACKFILL_ROWS

    def __init__(self, path: Path, *, retention_days: int = 0, clock: Clock = time.time) -> None:
        super().__init__(retention_days=retention_days, clock=clock)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._conn = open_sqlite(path, synchronous="NORMAL")
        try:
            self._migrate()
        except BaseException:
            self._conn.close()
            raise

    def _migrate(self) -> None:
        """Idempotent; BEGIN IMMEDIATE so that one process migrates and the others then see it done."""
        with self._transaction():
            self._execute(self.dialect.create_table(REQUESTS))
            have = {row[1] for row in self._execute("PRAGMA table_info(requests)")}
            for name in ADDED_COLUMNS:
                if name not in have:  # a log written by an older version
                    col = next(c for c in REQUESTS.columns if c.name == name)
                    self._execute(f"ALTER TABLE requests ADD COLUMN {name} {self.dialect.types[col.kind]}")
            had_rollups = self._execute(self.dialect.table_exists, ("rollup",)).fetchone() is not None
            self._create_schema()
            for name in OLD_INDEXES:
                self._execute(f"DROP INDEX IF EXISTS {name}")
            if not had_rollups:
                # Rows stored so far get their rollups from the backfill; rows inserted from now on
                # (rowid above this mark) get them in their own transaction.
                end = self._execute("SELECT COALESCE(MAX(rowid), 0) FROM requests").fetchone()[0]
                self._set_meta("backfill_next_rowid", 0)
                self._set_meta("backfill_end_rowid", int(end))
                if end:
                    log.info("request log %s: adding rollups for %d existing rows in the background", self.path, end)
            self._set_meta("schema_version", SCHEMA_VERSION)

    # -- hooks ---------------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    @contextmanager
    def _savepoint(self) -> Iterator[None]:
        self._conn.execute("SAVEPOINT batch")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK TO batch")
            self._conn.execute("RELEASE batch")
            raise
        self._conn.execute("RELEASE batch")

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self._conn.execute(sql, params)

    def _load(self, table: Table, rows: Sequence[tuple[Any, ...]], tail: str) -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = []
        i, n = 0, _ROWS_PER_STATEMENT
        while i < len(rows):
            while n > len(rows) - i:
                n >>= 1
            cur = self._conn.execute(_insert_sql(table, n, tail), [v for row in rows[i : i + n] for v in row])
            out += cur.fetchall()
            i += n
        return out

    def close(self) -> None:
        self._conn.close()

    # -- backfill ------------------------------------------------------------------------------

    def _backfill(self, deadline: float) -> bool:
        while True:
            with self._transaction():
                nxt, end = self._meta("backfill_next_rowid"), self._meta("backfill_end_rowid")
                if nxt is None or end is None or nxt >= end:
                    return False
                hi = min(nxt + self.backfill_rows, end)
                cols = ", ".join(RECORD_COLUMNS)
                rows = []
                for raw in self._execute(f"SELECT {cols} FROM requests WHERE rowid > ? AND rowid <= ?", (nxt, hi)):
                    try:
                        rows.append(to_row(list(raw)))
                    except ValueError as exc:  # a row an older version let in: keep it, leave it out of rollups
                        log.warning("request %s left out of the rollups: %s", raw[0], exc)
                if rows:
                    self._add_to_rollups(rows)
                self._set_meta("backfill_next_rowid", hi)
            if hi >= end:
                log.info("request log %s: rollups added for all %d existing rows", self.path, end)
                return False
            if time.monotonic() >= deadline:
                return True
