"""The request-log writer, whatever the database: what the drainer calls, written once.

`commit_batch` inserts a batch of rows, adds what the INSERT really added to the rollups, and
advances the spool segment's offset, all in one transaction: a batch is stored exactly once, and a
replayed record (same id) changes neither the rows nor the rollups. `maintain` runs retention (and,
on SQLite, the backfill of rollups for a log written by an older version) in short batches.

A backend (`sqlite_store.py`, `postgres_store.py`) supplies the connection, the transaction and
savepoint, the bulk load (`_load`), the errors that mean "the schema refuses this record", and its
`Dialect`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

import orjson

from setpoint.logstore import rollups
from setpoint.logstore.dialect import Dialect
from setpoint.logstore.rows import Record, to_row
from setpoint.logstore.sql_schema import (
    DIMS, LATENCY_DIMS, META, REJECTED, REQUESTS, ROLLUP, ROLLUP_LATENCY, SPOOL_PROGRESS, Table,
)

__all__ = ["Clock", "SqlLogStore"]

log = logging.getLogger("setpoint.logstore")

Clock = Callable[[], float]

_INSERT_REQUESTS_TAIL = "ON CONFLICT (id) DO NOTHING RETURNING id"
_ROLLUP_TABLES = (ROLLUP, ROLLUP_LATENCY)


class SqlLogStore:
    """Used from one thread (the drainer's). Subclasses open `self._conn` and set the hooks."""

    dialect: Dialect
    _refused: tuple[type[BaseException], ...] = ()
    prune_batch = 5000  # rows per DELETE statement
    maintain_budget_s = 0.5  # time for retention/backfill per `maintain` call (the rest waits for the next)

    def __init__(self, *, retention_days: int = 0, clock: Clock = time.time) -> None:
        self.retention_days = retention_days
        self._clock = clock
        self._upserts = {t.name: rollups.on_conflict(t) for t in _ROLLUP_TABLES}

    # -- hooks ---------------------------------------------------------------------------------

    def _transaction(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _savepoint(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _load(self, table: Table, rows: Sequence[tuple[Any, ...]], tail: str) -> list[tuple[Any, ...]]:
        """INSERT `rows` (all of `table`'s columns, in order) followed by `tail` (ON CONFLICT ...
        [RETURNING ...]); returns the RETURNING rows."""
        raise NotImplementedError

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement (written with `?`); returns a cursor."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # -- the drainer's interface ---------------------------------------------------------------

    def offset(self, segment: str) -> int:
        row = self._execute("SELECT byte_offset FROM spool_progress WHERE segment = ?", (segment,)).fetchone()
        return int(row[0]) if row else 0

    def forget_segment(self, segment: str) -> None:
        with self._transaction():
            self._execute("DELETE FROM spool_progress WHERE segment = ?", (segment,))

    def commit_batch(
        self, segment: str, new_offset: int, records: Sequence[Record], *, unreadable: Sequence[bytes] = ()
    ) -> None:
        """Insert records, their rollups and the segment's new offset in one transaction (exactly once).

        `unreadable` spool lines (not JSON) and records the schema refuses are kept verbatim in
        `rejected_records`: never dropped, and never blocking the spool."""
        rows: dict[str, tuple[Any, ...]] = {}
        refused = [(raw.decode("utf-8", "backslashreplace"), "not a JSON record") for raw in unreadable]
        for r in records:
            try:
                row = to_row(r)
            except ValueError as exc:
                refused.append((_as_text(r), str(exc)))
                continue
            rows.setdefault(row[0], row)  # the same id twice in a batch: the first one stands
        with self._transaction():
            batch = list(rows.values())
            if batch:
                try:
                    with self._savepoint():
                        inserted = self._insert(batch)
                except self._refused:
                    inserted = self._insert_one_by_one(batch, refused)
                if inserted:
                    self._add_to_rollups(inserted)
            self._reject(segment, refused)
            self._execute(
                "INSERT INTO spool_progress (segment, byte_offset) VALUES (?, ?) "
                "ON CONFLICT (segment) DO UPDATE SET byte_offset = excluded.byte_offset",
                (segment, new_offset),
            )

    def _insert(self, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """Insert rows; returns those that were new (not already stored under their id)."""
        new = {r[0] for r in self._load(REQUESTS, rows, _INSERT_REQUESTS_TAIL)}
        return rows if len(new) == len(rows) else [r for r in rows if r[0] in new]

    def _insert_one_by_one(self, rows: list[tuple[Any, ...]], refused: list[tuple[str, str]]) -> list[tuple[Any, ...]]:
        """A batch the database refused as a whole: store the good rows, dead-letter the bad ones."""
        inserted: list[tuple[Any, ...]] = []
        for row in rows:
            try:
                with self._savepoint():
                    inserted += self._insert([row])
            except self._refused as exc:
                refused.append((_as_text(dict(zip(REQUESTS.column_names, row, strict=True))), str(exc)))
        return inserted

    def _reject(self, segment: str, refused: list[tuple[str, str]]) -> None:
        now = self._clock()
        for record, error in refused:
            log.error("request record refused (%s); kept in rejected_records", error)
            self._execute(
                "INSERT INTO rejected_records (segment, record, error, rejected_at) VALUES (?, ?, ?, ?)",
                (segment, record.replace("\x00", "\\x00"), error.replace("\x00", "\\x00"), now),  # as backslashreplace would
            )

    def _add_to_rollups(self, rows: Sequence[tuple[Any, ...]]) -> None:
        d = rollups.deltas(rows, self._clock())
        for table, delta in d.by_table():
            if delta:
                self._load(table, delta, self._upserts[table.name])

    # -- retention and other background work --------------------------------------------------

    def maintain(self) -> bool:
        """Backfill, then retention, in short transactions, for about `maintain_budget_s` (at least
        one batch). Returns True if work is left for the next call."""
        deadline = time.monotonic() + self.maintain_budget_s
        if self._backfill(deadline):
            return True
        for table, where, params in self._expired(self._clock()):
            while self._delete_batch(table, where, params) >= self.prune_batch:
                if time.monotonic() >= deadline:  # (always one batch: progress whatever the budget)
                    return True
        return False

    def _expired(self, now: float) -> Iterator[tuple[Table, str, tuple[Any, ...]]]:
        """(table, condition, parameters) of everything that retention removes now (each served by
        the start of the table's primary key or an index)."""
        cutoff = None
        if self.retention_days > 0:
            # Whole UTC days, so that rows and every rollup level end at the same instant.
            cutoff = int(now - self.retention_days * rollups.DAY) // rollups.DAY * rollups.DAY
            yield REQUESTS, "ts < ?", (float(cutoff),)
        for lv in rollups.LEVELS:
            level_cutoff = cutoff
            if lv.keep_s is not None:
                short = int(now - lv.keep_s) // lv.grain * lv.grain
                level_cutoff = short if cutoff is None else max(short, cutoff)
            if level_cutoff is None:
                continue
            for table, dims in ((ROLLUP, DIMS), (ROLLUP_LATENCY, LATENCY_DIMS)):
                for dim in dims:
                    yield table, "grain = ? AND dim = ? AND bucket < ?", (lv.grain, dim, level_cutoff)

    def _delete_batch(self, table: Table, where: str, params: tuple[Any, ...]) -> int:
        with self._transaction():
            return int(self._execute(self.dialect.delete_batch(table, where, self.prune_batch), params).rowcount)

    def _backfill(self, deadline: float) -> bool:
        """Add rollups for rows stored before rollups existed (SQLite logs of older versions)."""
        return False

    # -- schema --------------------------------------------------------------------------------

    def _create_schema(self) -> None:
        for t in (REQUESTS, ROLLUP, ROLLUP_LATENCY, SPOOL_PROGRESS, REJECTED, META):
            self._execute(self.dialect.create_table(t))
            for ix in t.indexes:
                self._execute(self.dialect.create_index(t, ix))

    def _meta(self, name: str) -> int | None:
        row = self._execute("SELECT value FROM log_meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else row[0]

    def _set_meta(self, name: str, value: int) -> None:
        self._execute(
            "INSERT INTO log_meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (name, value),
        )


def _as_text(record: Any) -> str:
    """A refused record as JSON text, whatever it holds (ints beyond 64 bits, NaN...)."""
    try:
        return orjson.dumps(record).decode()
    except TypeError:
        return json.dumps(record, default=repr)
