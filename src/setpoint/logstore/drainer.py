"""Moves spooled records into the log store in batches, on a thread, off the request path.

Each tick: fsync this process's segment, claim segments of dead processes (their lock is free),
read whole lines past the committed offset, and commit them with the new offset in one transaction.
A fully drained segment that is no longer being written is deleted. If the store fails (SQLite
locked, PostgreSQL down), the store is closed, records stay in the spool and the next tick reopens
it and retries: the spool grows, nothing is dropped, `last_error` says why. Every
`maintain_interval_s` (and on every tick while work is left) the store's retention runs, in short
batches, from this same thread.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from setpoint.logstore.spool import Spool, segment_owner
from setpoint.logstore.sql_store import SqlLogStore

__all__ = ["SpoolDrainer"]

log = logging.getLogger("setpoint.logstore")

_READ_WINDOW = 8 * 1024 * 1024
_LOG_REPEAT_S = 60.0  # the same store error is logged with its traceback at most this often

StoreOpener = Callable[[], SqlLogStore]


def _sqlite_at(path: Path) -> StoreOpener:
    from setpoint.logstore.sqlite_store import SqliteLogStore

    return lambda: SqliteLogStore(path)


class SpoolDrainer:
    maintain_interval_s = 60.0

    def __init__(self, spool: Spool, store: Path | StoreOpener, batch_size: int, interval_s: float) -> None:
        """`store`: a function opening the writer (called again after a failure), or the path of a
        SQLite log (kept forever: no retention)."""
        self._spool = spool
        self._open_store = _sqlite_at(store) if isinstance(store, Path) else store
        self._batch_size = batch_size
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._ticks = threading.Condition()
        self._ticks_done = 0
        self._in_tick = False
        self._thread: threading.Thread | None = None
        self._store: SqlLogStore | None = None
        self._claimed: dict[str, int] = {}  # owner -> lock fd, for dead owners we drain
        self._next_maintain = 0.0
        self._logged: tuple[str, float] | None = None  # last error logged, when
        self.pending_bytes = 0
        self.last_error: str | None = None
        self.last_drained_mono = time.monotonic()  # when a tick last left the store up to date

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="setpoint-spool-drainer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Drain what is left, close the spool and give up ownership."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Drain now: wait for a whole tick that started after this call and left nothing behind.

        Returns False on timeout. A failing store still finishes ticks: check `last_error`."""
        with self._ticks:
            # A tick already running may have read the spool before our caller's last append.
            target = self._ticks_done + (2 if self._in_tick else 1)
            self._wake.set()
            ok = self._ticks.wait_for(lambda: self._ticks_done >= target, timeout_s)
        return ok

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._wake.clear()
                self._tick()
                self._wake.wait(self._interval_s)
            self._spool.close()
            self._tick()
            # Keep the lock file if our own segments could not be drained: a later drainer finds
            # orphans through lock files and must still see this one.
            self._spool.release(remove_lock=not self._own_segments())
        finally:
            for fd in self._claimed.values():
                os.close(fd)
            if self._store is not None:
                self._store.close()

    def _own_segments(self) -> list[Path]:
        return list(self._spool.directory.glob(f"{self._spool.owner}-*.jsonl"))

    def _tick(self) -> None:
        with self._ticks:
            self._in_tick = True
        try:
            self._drain_all()
        finally:
            with self._ticks:
                self._in_tick = False
                self._ticks_done += 1
                self._ticks.notify_all()

    def _drain_all(self) -> None:
        try:
            self._spool.sync()
            self._claim_orphans()
            if self._store is None:
                self._store = self._open_store()  # retried every tick until it opens
            store = self._store
            pending = 0
            for seg in sorted(self._spool.directory.glob("*.jsonl")):
                owner = segment_owner(seg)
                if owner != self._spool.owner and owner not in self._claimed:
                    continue
                pending += self._drain_segment(store, seg, is_live=(seg == self._spool.current_segment and not self._stop.is_set()))
            for owner in [o for o in self._claimed if not any(self._spool.directory.glob(f"{o}-*.jsonl"))]:
                (self._spool.directory / f"{owner}.lock").unlink(missing_ok=True)
                os.close(self._claimed.pop(owner))
            self.pending_bytes = pending
            if not self._stop.is_set() and time.monotonic() >= self._next_maintain:
                more = store.maintain()
                self._next_maintain = time.monotonic() + (0.0 if more else self.maintain_interval_s)
            self.last_error = None
            self.last_drained_mono = time.monotonic()
            self._logged = None
        except Exception as exc:  # the background-task boundary: keep the spool, retry next tick
            self.last_error = f"{type(exc).__name__}: {exc}"
            self.pending_bytes = self._spooled_bytes()
            self._report(self.last_error)
            if self._store is not None:  # reopened next tick (a PostgreSQL connection may be gone)
                store, self._store = self._store, None
                try:
                    store.close()
                except Exception:  # noqa: BLE001 - closing a broken connection may fail too
                    pass

    def _spooled_bytes(self) -> int:
        """Bytes in the segments this drainer is responsible for (while the store is failing)."""
        total = 0
        for seg in self._spool.directory.glob("*.jsonl"):
            owner = segment_owner(seg)
            if owner == self._spool.owner or owner in self._claimed:
                try:
                    total += seg.stat().st_size
                except FileNotFoundError:
                    pass
        return total

    def _report(self, error: str) -> None:
        now = time.monotonic()
        if self._logged is None or self._logged[0] != error or now - self._logged[1] >= _LOG_REPEAT_S:
            self._logged = (error, now)
            log.exception("request log drain failed; records stay in the spool and will be retried")
        else:
            log.debug("request log drain failed again: %s", error)

    def _claim_orphans(self) -> None:
        for lock in self._spool.directory.glob("*.lock"):
            owner = lock.stem
            if owner == self._spool.owner or owner in self._claimed:
                continue
            try:
                fd = os.open(lock, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)  # its owner is alive
                continue
            log.info("claiming spool of dead process %s", owner)
            self._claimed[owner] = fd

    def _drain_segment(self, store: SqlLogStore, seg: Path, *, is_live: bool) -> int:
        name = seg.name
        offset = store.offset(name)
        size = seg.stat().st_size
        window = _READ_WINDOW
        while offset < size:
            with seg.open("rb") as f:
                f.seek(offset)
                data = f.read(min(size - offset, window))
            end = data.rfind(b"\n")
            if end < 0:
                if offset + len(data) < size:
                    window *= 2  # one record longer than the window: read further
                    continue
                if not is_live:
                    log.warning("skipping a torn, never-acknowledged line at the end of %s", name)
                    offset = size
                    store.commit_batch(name, offset, [])
                break
            window = _READ_WINDOW
            lines = data[: end + 1].split(b"\n")[:-1]
            for i in range(0, len(lines), self._batch_size):
                chunk = lines[i : i + self._batch_size]
                records, unreadable = [], []
                for line in chunk:
                    if not line:
                        continue  # a blank line holds no record
                    rec = _decode(line)
                    if rec is None:
                        unreadable.append(line)
                    else:
                        records.append(rec)
                offset += sum(len(line) + 1 for line in chunk)
                store.commit_batch(name, offset, records, unreadable=unreadable)
        if not is_live and offset >= size:
            seg.unlink(missing_ok=True)
            store.forget_segment(name)
            return 0
        return max(0, size - offset)


def _decode(line: bytes) -> dict[str, Any] | list[Any] | None:
    try:
        rec = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return rec if isinstance(rec, (dict, list)) else None
