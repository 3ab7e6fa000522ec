"""Shared state in one SQLite file, for several worker processes on one machine.

Each operation is one `BEGIN IMMEDIATE` transaction (SQLite's write lock serialises them across
processes), run on a worker thread with a connection per thread.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from setpoint.errors import StateBackendError
from setpoint.sqlite_open import open_sqlite
from setpoint.state.base import BucketCharge, LedgerLine, ReserveResult, TakeResult

__all__ = ["SqliteStateStore"]

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS buckets (key TEXT PRIMARY KEY, level REAL NOT NULL, ts REAL NOT NULL);
CREATE TABLE IF NOT EXISTS ledger (key TEXT PRIMARY KEY, spent INTEGER NOT NULL, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS cache (key TEXT PRIMARY KEY, value BLOB NOT NULL, expires_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS cache_expiry ON cache (expires_at);
CREATE TABLE IF NOT EXISTS holds (
    key TEXT NOT NULL, hold_id TEXT NOT NULL, amount INTEGER NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (key, hold_id)
);
"""


class SqliteStateStore:
    name = "sqlite"

    def __init__(self, path: Path) -> None:
        self._path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._idle = threading.Condition(self._conns_lock)  # signalled when an operation ends
        self._busy = 0
        self._closed = False
        self._conn().executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = open_sqlite(self._path, synchronous="FULL")  # a settled charge is durable when settle returns
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        """Refuse new operations, wait (bounded) for those in flight, then close every connection:
        closing a connection another thread is using crashes the interpreter."""

        def close() -> None:
            with self._idle:
                self._closed = True
                self._idle.wait_for(lambda: self._busy == 0, timeout=30)
                for c in self._conns:
                    c.close()
                self._conns.clear()

        await asyncio.to_thread(close)

    def _run(self, op: Callable[[], T]) -> T:
        """Run `op` on this thread's connection, counted as in flight; sqlite errors -> StateBackendError."""
        with self._idle:
            if self._closed:
                raise StateBackendError("sqlite state store is closed")
            self._busy += 1
        try:
            return op()
        except sqlite3.Error as exc:
            raise StateBackendError(f"sqlite state store unavailable: {exc}") from exc
        finally:
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()

    async def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                out = fn(conn)
                conn.execute("COMMIT")
                return out
            except BaseException:
                conn.execute("ROLLBACK")
                raise

        return await asyncio.to_thread(self._run, run)

    # -- token buckets --------------------------------------------------------------------------

    @staticmethod
    def _level(conn: sqlite3.Connection, c: BucketCharge, now: float) -> float:
        row = conn.execute("SELECT level, ts FROM buckets WHERE key = ?", (c.key,)).fetchone()
        if row is None:
            return c.capacity
        level, ts = row
        return min(c.capacity, level + (now - ts) * c.rate_per_s) if now > ts else level

    async def take(self, charges: Sequence[BucketCharge], now: float) -> TakeResult:
        def op(conn: sqlite3.Connection) -> TakeResult:
            levels = [self._level(conn, c, now) for c in charges]
            wait = 0.0
            for c, lvl in zip(charges, levels, strict=True):
                if lvl < c.amount:
                    wait = max(wait, (c.amount - lvl) / c.rate_per_s if c.rate_per_s > 0 else 1e9)
            if wait > 0:
                return TakeResult(ok=False, retry_after_s=wait, levels=levels)
            after = [lvl - c.amount for c, lvl in zip(charges, levels, strict=True)]
            conn.executemany(
                "INSERT INTO buckets (key, level, ts) VALUES (?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET level = excluded.level, ts = max(buckets.ts, excluded.ts)",
                [(c.key, lvl, now) for c, lvl in zip(charges, after, strict=True)],
            )
            return TakeResult(ok=True, levels=after)

        return await self._tx(op)

    async def adjust(self, charges: Sequence[BucketCharge], now: float) -> None:
        def op(conn: sqlite3.Connection) -> None:
            for c in charges:
                lvl = min(c.capacity, self._level(conn, c, now) + c.amount)
                conn.execute(
                    "INSERT INTO buckets (key, level, ts) VALUES (?, ?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET level = excluded.level, ts = max(buckets.ts, excluded.ts)",
                    (c.key, lvl, now),
                )

        await self._tx(op)

    # -- ledger ---------------------------------------------------------------------------------

    @staticmethod
    def _left(conn: sqlite3.Connection, line: LedgerLine, now: float) -> int | None:
        conn.execute("DELETE FROM holds WHERE key = ? AND expires_at <= ?", (line.key, now))
        row = conn.execute("SELECT spent, expires_at FROM ledger WHERE key = ?", (line.key,)).fetchone()
        spent = row[0] if row is not None and row[1] > now else 0
        if line.limit is None:
            return None
        held = conn.execute("SELECT COALESCE(SUM(amount), 0) FROM holds WHERE key = ?", (line.key,)).fetchone()[0]
        return int(line.limit - spent - held)

    @staticmethod
    def _touch(conn: sqlite3.Connection, line: LedgerLine, now: float, add_spent: int) -> None:
        conn.execute(
            "INSERT INTO ledger (key, spent, expires_at) VALUES (?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
            "spent = CASE WHEN ledger.expires_at <= ? THEN excluded.spent ELSE ledger.spent + excluded.spent END, "
            "expires_at = excluded.expires_at",
            (line.key, add_spent, now + line.ttl_s, now),
        )

    async def _hold(
        self, lines: Sequence[LedgerLine], hold_id: str, amount: int, now: float, hold_ttl_s: float, *, grow: bool
    ) -> ReserveResult:
        def op(conn: sqlite3.Connection) -> ReserveResult:
            remaining = [self._left(conn, ln, now) for ln in lines]
            for ln, left in zip(lines, remaining, strict=True):
                if left is not None and amount > left:
                    return ReserveResult(ok=False, refused_key=ln.key, remaining=remaining)
            for ln in lines:
                self._touch(conn, ln, now, 0)
                conn.execute(
                    "INSERT INTO holds (key, hold_id, amount, expires_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(key, hold_id) DO UPDATE SET expires_at = excluded.expires_at, amount = "
                    + ("holds.amount + excluded.amount" if grow else "excluded.amount"),
                    (ln.key, hold_id, amount, now + hold_ttl_s),
                )
            return ReserveResult(ok=True, remaining=[None if r is None else r - amount for r in remaining])

        return await self._tx(op)

    async def reserve(
        self, lines: Sequence[LedgerLine], hold_id: str, amount: int, now: float, hold_ttl_s: float
    ) -> ReserveResult:
        return await self._hold(lines, hold_id, amount, now, hold_ttl_s, grow=False)

    async def extend(
        self, lines: Sequence[LedgerLine], hold_id: str, amount: int, now: float, hold_ttl_s: float
    ) -> ReserveResult:
        return await self._hold(lines, hold_id, amount, now, hold_ttl_s, grow=True)

    async def settle(self, lines: Sequence[LedgerLine], hold_id: str, actual: int, now: float) -> None:
        def op(conn: sqlite3.Connection) -> None:
            for ln in lines:
                conn.execute("DELETE FROM holds WHERE key = ? AND hold_id = ?", (ln.key, hold_id))
                self._touch(conn, ln, now, actual)

        await self._tx(op)

    async def remaining(self, lines: Sequence[LedgerLine], now: float) -> list[int | None]:
        return await self._tx(lambda conn: [self._left(conn, ln, now) for ln in lines])

    async def spent(self, lines: Sequence[LedgerLine], now: float) -> list[int]:
        def op(conn: sqlite3.Connection) -> list[int]:
            out = []
            for ln in lines:
                row = conn.execute("SELECT spent, expires_at FROM ledger WHERE key = ?", (ln.key,)).fetchone()
                out.append(int(row[0]) if row is not None and row[1] > now else 0)
            return out

        return await self._tx(op)

    # -- cache ----------------------------------------------------------------------------------

    async def cache_get(self, key: str, now: float) -> bytes | None:
        def op() -> bytes | None:
            row = self._conn().execute("SELECT value FROM cache WHERE key = ? AND expires_at > ?", (key, now)).fetchone()
            return bytes(row[0]) if row else None

        return await asyncio.to_thread(self._run, op)

    async def cache_put(self, key: str, value: bytes, ttl_s: float, now: float) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO cache (key, value, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
                (key, value, now + ttl_s),
            )
            conn.execute("DELETE FROM cache WHERE rowid IN (SELECT rowid FROM cache WHERE expires_at <= ? LIMIT 100)", (now,))

        await self._tx(op)
