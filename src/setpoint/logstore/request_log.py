"""The request log as the data plane sees it: `append(ctx)` spools a record; a drainer stores it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from setpoint.config.schema import LoggingConfig
from setpoint.logstore.backends import open_reader, store_opener
from setpoint.logstore.drainer import SpoolDrainer
from setpoint.logstore.reader import LogReader
from setpoint.logstore.record import build_record
from setpoint.logstore.spool import Spool
from setpoint.logstore.sql_schema import RECORD_COLUMNS
from setpoint.proxy.context import RequestContext

__all__ = ["RequestLog"]


class RequestLog:
    def __init__(self, data_dir: Path, cfg: LoggingConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.db_path = data_dir / "requests.db"  # the SQLite store's file (unused with PostgreSQL)
        self._cfg = cfg
        self._data_dir = data_dir
        self._clock = clock
        self._spool = Spool(data_dir / "spool", cfg.spool_segment_bytes)
        self._drainer = SpoolDrainer(self._spool, store_opener(cfg, data_dir, clock), cfg.batch_size,
                                     cfg.flush_interval_ms / 1000)
        self._store_content = cfg.store_content
        self._reader: LogReader | None = None
        self._reader_lock = threading.Lock()

    def start(self) -> None:
        self._drainer.start()

    def stop(self) -> None:
        self._drainer.stop()
        with self._reader_lock:
            reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()

    def flush(self, timeout_s: float = 30.0) -> bool:
        return self._drainer.flush(timeout_s)

    @property
    def pending_bytes(self) -> int:
        return self._drainer.pending_bytes

    @property
    def lag_s(self) -> float:
        """Seconds since the drainer last left the store up to date (grows while the store is down)."""
        return max(0.0, time.monotonic() - self._drainer.last_drained_mono)

    @property
    def last_error(self) -> str | None:
        return self._drainer.last_error

    def open_reader(self) -> LogReader:
        """A new reader on this log (the caller closes it)."""
        return open_reader(self._cfg, self._data_dir, self._clock)

    @property
    def reader(self) -> LogReader:
        """A reader shared by the process's own callers (admin API), closed by `stop()`."""
        with self._reader_lock:
            if self._reader is None:
                self._reader = self.open_reader()
            return self._reader

    def append(self, ctx: RequestContext, latency_ms: float) -> None:
        rec = build_record(ctx, latency_ms, store_content=self._store_content)
        self._spool.append([rec[c] for c in RECORD_COLUMNS])  # positional: cheaper to store
