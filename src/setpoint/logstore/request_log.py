"""The request log as the data plane sees it: `append(ctx)` spools a record; a drainer stores it."""

from __future__ import annotations

from pathlib import Path

from setpoint.logstore.drainer import SpoolDrainer
from setpoint.logstore.record import build_record
from setpoint.logstore.spool import Spool
from setpoint.logstore.sqlite_store import RECORD_COLUMNS
from setpoint.proxy.context import RequestContext

__all__ = ["RequestLog"]


class RequestLog:
    def __init__(
        self, data_dir: Path, *, store_content: bool, batch_size: int, interval_s: float, segment_bytes: int
    ) -> None:
        self.db_path = data_dir / "requests.db"
        self._spool = Spool(data_dir / "spool", segment_bytes)
        self._drainer = SpoolDrainer(self._spool, self.db_path, batch_size, interval_s)
        self._store_content = store_content

    def start(self) -> None:
        self._drainer.start()

    def stop(self) -> None:
        self._drainer.stop()

    def flush(self, timeout_s: float = 30.0) -> bool:
        return self._drainer.flush(timeout_s)

    @property
    def pending_bytes(self) -> int:
        return self._drainer.pending_bytes

    def append(self, ctx: RequestContext, latency_ms: float) -> None:
        rec = build_record(ctx, latency_ms, store_content=self._store_content)
        self._spool.append([rec[c] for c in RECORD_COLUMNS])  # positional: cheaper to store
