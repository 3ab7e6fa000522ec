"""The request log in PostgreSQL: several replicas' drainers writing to one database.

Bulk loads are a binary COPY into a session-local staging table, then one INSERT ... SELECT ...
ON CONFLICT into the real table. Measured (`bench/logstore_bench.py --compare-pg-inserts`: 1,000-row
batches into `requests` and its 9 indexes): COPY 41k rows/s at 2.5 us of client CPU per row,
INSERT ... SELECT FROM unnest(arrays) 28k at 18 us, a multi-row INSERT ... VALUES 6.6k at 106 us.
Staging rows are inserted in primary-key order, so concurrent writers lock rollup rows in the same
order and cannot deadlock. A connection that fails is closed by the drainer and opened afresh on
its next tick: the records wait in the spool meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict

from setpoint.logstore.dialect import POSTGRES
from setpoint.logstore.sql_schema import REQUESTS, ROLLUP, ROLLUP_LATENCY, SCHEMA_VERSION, Table
from setpoint.logstore.sql_store import Clock, SqlLogStore

__all__ = ["PostgresLogStore", "connect"]

_COPY_TYPES = {"text": "text", "real": "float8", "int": "int8"}
_MIGRATION_LOCK = 0x5E7901  # pg_advisory_xact_lock key: one replica creates the schema at a time


def connect(url: str, *, application_name: str, **overrides: Any) -> psycopg.Connection[Any]:
    """A connection with short connect/keepalive timeouts (settings in the URL win)."""
    params: dict[str, Any] = {
        "connect_timeout": 5, "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
        "keepalives_count": 3, "application_name": application_name,
    }
    params.update(overrides)
    params.update(conninfo_to_dict(url))
    conn = psycopg.connect(autocommit=True, **params)
    conn.execute("SET client_min_messages TO warning")
    return conn


class PostgresLogStore(SqlLogStore):
    """Used from the drainer thread only."""

    dialect = POSTGRES
    _refused = (pg_errors.IntegrityError, pg_errors.DataError)

    def __init__(self, url: str, *, retention_days: int = 0, clock: Clock = time.time) -> None:
        super().__init__(retention_days=retention_days, clock=clock)
        self._conn = connect(url, application_name="setpoint-log-writer")
        try:
            with self._transaction():
                self._execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
                self._create_schema()
                self._set_meta("schema_version", SCHEMA_VERSION)
            for t in (REQUESTS, ROLLUP, ROLLUP_LATENCY):  # COPY staging, emptied at every commit
                self._conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS stage_{t.name} (LIKE {t.name}) ON COMMIT DELETE ROWS")
        except BaseException:
            self._conn.close()
            raise

    def _transaction(self) -> AbstractContextManager[Any]:
        return self._conn.transaction()

    def _savepoint(self) -> AbstractContextManager[Any]:
        return self._conn.transaction()  # nested: a savepoint

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        return self._conn.execute(self.dialect.sql(sql), params)

    def _load(self, table: Table, rows: Sequence[tuple[Any, ...]], tail: str) -> list[tuple[Any, ...]]:
        stage, cols = f"stage_{table.name}", ", ".join(table.column_names)
        with self._conn.cursor() as cur:
            with cur.copy(f"COPY {stage} ({cols}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types([_COPY_TYPES[c.kind] for c in table.columns])
                for row in rows:
                    copy.write_row(row)
            order = ", ".join(table.primary_key)
            cur.execute(f"INSERT INTO {table.name} ({cols}) SELECT {cols} FROM {stage} ORDER BY {order} {tail}")
            out = cur.fetchall() if cur.description else []
            cur.execute(f"DELETE FROM {stage}")  # a table can be loaded twice in one transaction
        return out

    def close(self) -> None:
        self._conn.close()
