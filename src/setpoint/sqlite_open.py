"""One way to open the SQLite files in the data dir, safe when several workers open them at once.

Switching a fresh file to WAL needs an exclusive lock, and SQLite answers "database is locked"
at once, without waiting on the busy timeout, when another process is switching it at the same
moment (two `serve --workers` children starting together did exactly that). The switch is
retried for as long as the busy timeout would have waited; every other statement waits on the
busy timeout as usual.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

__all__ = ["open_sqlite"]

_BUSY_TIMEOUT_S = 30.0
_RETRY_PAUSE_S = 0.01


def open_sqlite(path: Path, *, synchronous: str, check_same_thread: bool = False) -> sqlite3.Connection:
    """An autocommit connection in WAL mode with a 30 s busy timeout; `synchronous` is
    NORMAL or FULL (FULL where a returned call must be durable)."""
    conn = sqlite3.connect(
        path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=check_same_thread,
    )
    try:
        conn.execute(f"PRAGMA busy_timeout={int(_BUSY_TIMEOUT_S * 1000)}")
        _enter_wal(conn)
        conn.execute(f"PRAGMA synchronous={synchronous}")
    except BaseException:
        conn.close()
        raise
    return conn


def _enter_wal(conn: sqlite3.Connection) -> None:
    deadline = time.monotonic() + _BUSY_TIMEOUT_S
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(_RETRY_PAUSE_S)
