"""Keys created at run time (CLI, admin API) live in SQLite in the data dir; only hashes are stored."""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from setpoint.keys.model import KeyInfo, hash_key, new_key_secret
from setpoint.sqlite_open import open_sqlite

__all__ = ["SqliteKeyStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    hint TEXT NOT NULL,
    name TEXT NOT NULL,
    team TEXT,
    user_id TEXT,
    models TEXT,
    metadata TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    revoked_at REAL
);
"""


def _row_to_info(row: sqlite3.Row) -> KeyInfo:
    models = orjson.loads(row["models"]) if row["models"] else None
    return KeyInfo(
        id=row["id"], name=row["name"], team=row["team"], user=row["user_id"],
        models=None if models is None or "*" in models else frozenset(models),
        metadata=orjson.loads(row["metadata"]), hint=row["hint"],
    )


class SqliteKeyStore:
    """Blocking SQLite access; the data plane calls it from a thread on a cache miss."""

    def __init__(self, path: Path) -> None:
        self._path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._conn() as c:
            c.executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = open_sqlite(self._path, synchronous="FULL", check_same_thread=True)  # a created key is kept
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
        return conn

    def create(
        self, *, name: str, team: str | None = None, user: str | None = None,
        models: list[str] | None = None, metadata: dict[str, str] | None = None,
    ) -> tuple[str, KeyInfo]:
        """Create a key; returns the plaintext secret (shown once) and its record."""
        secret = new_key_secret()
        key_id = "key_" + uuid.uuid4().hex[:16]
        hint = secret[:10] + "…"
        self._conn().execute(
            "INSERT INTO api_keys (id, key_hash, hint, name, team, user_id, models, metadata, created_at)"
            " VALUES (?,?,?,?,?,?,?,?,?)",
            (key_id, hash_key(secret), hint, name, team, user,
             orjson.dumps(models).decode() if models else None,
             orjson.dumps(metadata or {}).decode(), time.time()),
        )
        info = self.get(key_id)
        assert info is not None
        return secret, info

    def find_by_hash(self, key_hash: str) -> KeyInfo | None:
        row = self._conn().execute(
            "SELECT * FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL", (key_hash,)
        ).fetchone()
        return _row_to_info(row) if row else None

    def get(self, key_id: str) -> KeyInfo | None:
        row = self._conn().execute("SELECT * FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        return _row_to_info(row) if row else None

    def list(self) -> list[dict[str, Any]]:
        rows = self._conn().execute("SELECT * FROM api_keys ORDER BY created_at").fetchall()
        return [
            {"id": r["id"], "name": r["name"], "hint": r["hint"], "team": r["team"], "user": r["user_id"],
             "models": orjson.loads(r["models"]) if r["models"] else ["*"], "metadata": orjson.loads(r["metadata"]),
             "created_at": r["created_at"], "revoked": r["revoked_at"] is not None}
            for r in rows
        ]

    def revoke(self, key_id: str) -> bool:
        cur = self._conn().execute(
            "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (time.time(), key_id)
        )
        return cur.rowcount > 0
