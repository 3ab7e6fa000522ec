"""The drainer runs the store's retention by itself, from its own thread, between batches."""

from __future__ import annotations

from pathlib import Path

from setpoint.logstore.drainer import SpoolDrainer
from setpoint.logstore.spool import Spool

from . import reference as ref
from .conftest import NOW, LogBackend

DAY = 86_400


def test_the_drainer_applies_retention(log_backend: LogBackend, tmp_path: Path) -> None:
    recs = ref.make_records(600, NOW, seed=41, span_s=20 * DAY)
    spool = Spool(tmp_path / "spool", 1 << 20)
    drainer = SpoolDrainer(spool, lambda: log_backend.store(retention_days=5), 64, 60.0)
    drainer.maintain_interval_s = 0.0  # every tick (normally once a minute)
    drainer.start()
    assert drainer.flush(30)  # the first tick (an empty spool) is over
    try:
        for r in recs:
            spool.append(r)
        assert drainer.flush(30) and drainer.flush(30)  # drained, then retention on the next tick
        assert drainer.last_error is None
        cutoff = (NOW - 5 * DAY) // DAY * DAY
        kept = {r["id"] for r in recs if r["ts"] >= cutoff}
        assert 0 < len(kept) < len(recs)
        assert {row[0] for row in log_backend.sql("SELECT id FROM requests")} == kept
        assert log_backend.reader().totals(0, NOW + DAY) == ref.totals(r for r in recs if r["id"] in kept)
    finally:
        drainer.stop()
