"""`LogReader` on the PostgreSQL request log: a small pool of read-only, autocommit connections
shared by the calling threads (a broken connection is dropped and replaced on next use)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from setpoint.logstore.dialect import POSTGRES
from setpoint.logstore.postgres_store import connect
from setpoint.logstore.sql_reader import SqlLogReader

__all__ = ["PostgresLogReader"]


class PostgresLogReader(SqlLogReader):
    dialect = POSTGRES
    _unavailable = (psycopg.OperationalError,)  # cannot connect, connection lost, statement timeout

    def __init__(self, url: str, *, pool_size: int = 4, statement_timeout_s: float = 30.0,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(clock=clock)
        self._url = url
        self._timeout_ms = int(statement_timeout_s * 1000)
        self._slots = threading.BoundedSemaphore(pool_size)
        self._lock = threading.Lock()
        self._idle: list[psycopg.Connection[Any]] = []
        self._closed = False

    def _open(self) -> psycopg.Connection[Any]:
        conn = connect(self._url, application_name="setpoint-log-reader")
        conn.execute("SET default_transaction_read_only = on")
        conn.execute(f"SET statement_timeout = {self._timeout_ms}")
        return conn

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        with self._slots:
            with self._lock:
                if self._closed:
                    raise RuntimeError("the request log reader is closed")
                conn = self._idle.pop() if self._idle else None
            if conn is None or conn.closed:
                conn = self._open()
            try:
                yield conn
            finally:
                with self._lock:
                    keep = not (self._closed or conn.broken or conn.closed)  # broken: the server went away
                    if keep:
                        self._idle.append(conn)
                if not keep:
                    conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._idle = self._idle, []
        for c in conns:
            c.close()
