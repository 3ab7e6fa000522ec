"""`LogReader` on the SQLite request log: read-only connections, one per calling thread (WAL lets
them read while the drainers write)."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from setpoint.logstore.dialect import SQLITE
from setpoint.logstore.sql_reader import SqlLogReader

__all__ = ["SqliteLogReader"]


class SqliteLogReader(SqlLogReader):
    dialect = SQLITE
    _unavailable = (sqlite3.OperationalError,)  # locked for longer than the timeout, I/O errors

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(clock=clock)
        self.path = path
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[sqlite3.Connection] = []
        self._closed = False

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            if not self.path.exists():
                raise FileNotFoundError(self.path)
            conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=30, check_same_thread=False)
            conn.execute("PRAGMA query_only = 1")
            with self._lock:
                if self._closed:
                    conn.close()
                    raise RuntimeError("the request log reader is closed")
                self._all.append(conn)
            self._local.conn = conn
        yield conn

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._all = self._all, []
        for c in conns:
            c.close()
