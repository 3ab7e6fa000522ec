"""Durability of the request log: Spool -> SpoolDrainer -> SqliteLogStore.

The promise under test: once a client has seen the end of its response, the request's record is
stored in requests.db exactly once, whatever happens to the process or the store in between."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from setpoint.logstore.drainer import SpoolDrainer
from setpoint.logstore.spool import Spool, segment_owner
from setpoint.logstore.sqlite_store import RECORD_COLUMNS, SqliteLogStore

from .conftest import (
    STATIC_KEY,
    ServeProc,
    db_id_counts,
    db_total_rows,
    drain_all,
    drain_and_crash_before_delete,
    make_record,
    segments,
    serve_config,
    spool_bytes,
    spool_of_dead_process,
    wait_for,
)

StartDrainer = Callable[..., SpoolDrainer]


def assert_exactly_once(db: Path, ids: list[str] | set[str]) -> None:
    counts = db_id_counts(db)
    missing = [i for i in ids if i not in counts]
    dupes = {i: c for i, c in counts.items() if c != 1}
    assert not missing, f"{len(missing)} records missing, e.g. {missing[:5]}"
    assert not dupes, f"duplicated records: {dupes}"


# -- (a) all records, exactly once --------------------------------------------------------------


def test_records_are_stored_exactly_once_after_flush(tmp_path: Path, start_drainer: StartDrainer) -> None:
    spool = Spool(tmp_path / "spool", 1 << 20)
    db = tmp_path / "requests.db"
    drainer = start_drainer(spool, db, batch_size=64)
    ids = [f"rec-{i}" for i in range(500)]
    for i in range(500):
        spool.append(make_record(i))
    drain_all(drainer)
    assert_exactly_once(db, ids)
    assert db_total_rows(db) == 500
    assert drainer.last_error is None
    assert drainer.pending_bytes == 0
    # Draining again changes nothing.
    drain_all(drainer)
    assert db_total_rows(db) == 500


def test_stored_columns_roundtrip(tmp_path: Path, start_drainer: StartDrainer) -> None:
    spool = Spool(tmp_path / "spool", 1 << 20)
    db = tmp_path / "requests.db"
    drainer = start_drainer(spool, db)
    rec = {col: None for col in RECORD_COLUMNS}
    rec.update(make_record("full", key_id="cfg:a", key_name="a", team="t", user_id="u", deployment="sim/x",
                           provider="sim", is_stream=1, error_code=None, cached_tokens=1, reasoning_tokens=2,
                           cost_micros=123, ttft_ms=0.5, upstream_ms=1.0, finish_reason="stop",
                           annotations='{"route":"sim/x"}', content='{"request":{}}'))
    rec["unknown_future_field"] = "ignored"
    spool.append(rec)
    drain_all(drainer)
    conn = sqlite3.connect(db)
    try:
        conn.row_factory = sqlite3.Row
        row = dict(conn.execute("SELECT * FROM requests WHERE id = 'full'").fetchone())
    finally:
        conn.close()
    assert row == {col: rec[col] for col in RECORD_COLUMNS}


def test_restarted_drainer_over_same_spool_dir_adds_no_duplicates(tmp_path: Path, start_drainer: StartDrainer) -> None:
    spool_dir, db = tmp_path / "spool", tmp_path / "requests.db"
    s1 = Spool(spool_dir, 4096)
    d1 = start_drainer(s1, db, batch_size=7)
    for i in range(100):
        s1.append(make_record(i))
    drain_all(d1)
    d1.stop()  # graceful: final drain, segments deleted, lock released
    assert segments(spool_dir) == []
    assert list(spool_dir.glob("*.lock")) == []

    s2 = Spool(spool_dir, 4096)
    d2 = start_drainer(s2, db, batch_size=7)
    for i in range(100, 150):
        s2.append(make_record(i))
    drain_all(d2)
    assert_exactly_once(db, [f"rec-{i}" for i in range(150)])
    assert db_total_rows(db) == 150


def test_crash_between_commit_and_segment_delete(tmp_path: Path, start_drainer: StartDrainer) -> None:
    """A drainer commits a segment's records + offset, then dies before deleting the file. The next
    drainer must not store those records a second time."""
    records = [make_record(i) for i in range(120)]
    dead = drain_and_crash_before_delete(tmp_path, records, segment_bytes=4096, batch_size=10)
    spool_dir, db = tmp_path / "spool", tmp_path / "requests.db"
    committed = db_id_counts(db)
    assert committed, "the dead drainer should have committed its first segment"
    assert all(c == 1 for c in committed.values())
    assert len(committed) < 120
    left = segments(spool_dir, dead)
    assert left, "the drained segment should still be on disk (the process died before deleting it)"
    first = left[0]
    conn = sqlite3.connect(db)
    try:
        (offset,) = conn.execute("SELECT byte_offset FROM spool_progress WHERE segment = ?", (first.name,)).fetchone()
    finally:
        conn.close()
    assert offset == first.stat().st_size  # fully committed, but not deleted
    # Make a re-read visible despite INSERT OR IGNORE: rewrite the committed lines in place with
    # other ids of the same length. A drainer that honours the committed offset never sees them.
    first.write_bytes(first.read_bytes().replace(b'"rec-', b'"zzz-'))

    spool = Spool(spool_dir, 4096)
    drainer = start_drainer(spool, db, batch_size=10)
    drain_all(drainer)
    assert_exactly_once(db, [r["id"] for r in records])
    assert not any(i.startswith("zzz-") for i in db_id_counts(db))
    assert db_total_rows(db) == 120
    assert segments(spool_dir, dead) == []
    assert not (spool_dir / f"{dead}.lock").exists()


def test_crash_mid_segment_resumes_at_committed_offset(tmp_path: Path, start_drainer: StartDrainer) -> None:
    """Progress is committed with each batch: a dead owner's half-drained segment resumes exactly
    where the last commit left off (records before it are not re-inserted, none after are lost)."""
    spool_dir, db = tmp_path / "spool", tmp_path / "requests.db"
    records = [make_record(i) for i in range(40)]
    dead = spool_of_dead_process(spool_dir, records)
    (seg,) = segments(spool_dir, dead)
    lines = seg.read_bytes().splitlines(keepends=True)
    assert len(lines) == 40
    # Commit the first 15 lines exactly as a drainer batch would, then "crash".
    committed_bytes = sum(len(x) for x in lines[:15])
    store = SqliteLogStore(db)
    try:
        store.commit_batch(seg.name, committed_bytes, [orjson.loads(x) for x in lines[:15]])
    finally:
        store.close()
    # INSERT OR IGNORE would hide a re-read of the committed part, so make one visible: rewrite
    # those lines in place with different ids of the same length.
    raw = seg.read_bytes()
    seg.write_bytes(raw[:committed_bytes].replace(b'"rec-', b'"zzz-') + raw[committed_bytes:])

    drainer = start_drainer(Spool(spool_dir, 1 << 20), db)
    drain_all(drainer)
    assert_exactly_once(db, [r["id"] for r in records])
    assert not any(i.startswith("zzz-") for i in db_id_counts(db)), "re-read bytes before the committed offset"
    assert db_total_rows(db) == 40
    assert segments(spool_dir, dead) == []


# -- (b) rotation -------------------------------------------------------------------------------


def test_segment_rotation_keeps_every_record_and_deletes_drained_segments(tmp_path: Path, start_drainer: StartDrainer) -> None:
    spool_dir, db = tmp_path / "spool", tmp_path / "requests.db"
    spool = Spool(spool_dir, 1024)
    for i in range(300):
        spool.append(make_record(i, annotations="x" * 50))
    many = segments(spool_dir)
    assert len(many) >= 30, "tiny segment_bytes should have rotated many times"
    assert all(segment_owner(p) == spool.owner for p in many)
    seqs = [int(p.stem.rsplit("-", 1)[1]) for p in many]
    assert seqs == list(range(len(many)))  # consecutive, none skipped
    # Every line is whole: rotation never splits a record across segments.
    lines = [line for p in many for line in p.read_bytes().splitlines()]
    assert [orjson.loads(x)["id"] for x in lines] == [f"rec-{i}" for i in range(300)]

    drainer = start_drainer(spool, db, batch_size=5)
    drain_all(drainer)
    assert_exactly_once(db, [f"rec-{i}" for i in range(300)])
    assert segments(spool_dir) == [spool.current_segment] or segments(spool_dir) == []
    conn = sqlite3.connect(db)
    try:
        progress = [r[0] for r in conn.execute("SELECT segment FROM spool_progress")]
    finally:
        conn.close()
    assert set(progress) <= {spool.current_segment.name}  # progress rows of deleted segments are forgotten

    for i in range(300, 420):
        spool.append(make_record(i, annotations="y" * 50))
    drain_all(drainer)
    assert_exactly_once(db, [f"rec-{i}" for i in range(420)])
    assert db_total_rows(db) == 420
    assert len(segments(spool_dir)) <= 1


def test_graceful_stop_drains_live_segment_and_releases(tmp_path: Path, start_drainer: StartDrainer) -> None:
    spool_dir, db = tmp_path / "spool", tmp_path / "requests.db"
    spool = Spool(spool_dir, 1 << 20)
    drainer = start_drainer(spool, db, interval_s=60)
    for i in range(30):
        spool.append(make_record(i))
    drainer.stop()  # no flush: stop itself must drain
    assert_exactly_once(db, [f"rec-{i}" for i in range(30)])
    assert list(spool_dir.iterdir()) == []
    with pytest.raises(RuntimeError, match="closed"):
        spool.append(make_record(999))


# -- (c) the store is unwritable for a while ----------------------------------------------------


def test_locked_store_spool_grows_nothing_dropped_then_recovers(tmp_path: Path, start_drainer: StartDrainer) -> None:
    """Another connection holds an exclusive write transaction on requests.db (a long admin
    query, a backup, a stuck process): drains block, appends keep going into the spool; once the
    lock goes away everything arrives exactly once."""
    spool_dir, db = tmp_path / "spool", tmp_path / "requests.db"
    spool = Spool(spool_dir, 2048)
    drainer = start_drainer(spool, db, batch_size=50, interval_s=0.05)
    for i in range(50):
        spool.append(make_record(i))
    drain_all(drainer)
    assert_exactly_once(db, [f"rec-{i}" for i in range(50)])

    locker = sqlite3.connect(db, timeout=1, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        sizes = []
        n = 50
        for _ in range(4):
            for _ in range(60):
                spool.append(make_record(n))
                n += 1
            time.sleep(0.15)  # several drain ticks' worth of time
            sizes.append(spool_bytes(spool_dir))
        assert sizes == sorted(sizes) and sizes[-1] > sizes[0], sizes
        assert len(segments(spool_dir)) > 10
        assert not drainer.flush(timeout_s=0.3), "a drain cannot complete while the store is locked"
        stored = locker.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
        assert stored == 50  # nothing got past the lock
    finally:
        locker.execute("ROLLBACK")
        locker.close()

    drain_all(drainer, timeout_s=30)
    assert_exactly_once(db, [f"rec-{i}" for i in range(n)])
    assert db_total_rows(db) == n == 290
    assert len(segments(spool_dir)) <= 1


def test_failing_store_is_retried_and_loses_nothing(
    tmp_path: Path, start_drainer: StartDrainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commits fail (disk I/O error) for a while: every tick records the error and keeps the spool;
    after recovery all records arrive exactly once."""
    spool_dir, db = tmp_path / "spool", tmp_path / "requests.db"
    spool = Spool(spool_dir, 2048)
    drainer = start_drainer(spool, db, batch_size=20, interval_s=0.02)
    broken = threading.Event()
    attempts = {"n": 0}
    real_commit = SqliteLogStore.commit_batch

    def commit_batch(self: SqliteLogStore, segment: str, new_offset: int, records: Any, **kw: Any) -> None:
        if broken.is_set():
            attempts["n"] += 1
            raise sqlite3.OperationalError("disk I/O error")
        real_commit(self, segment, new_offset, records, **kw)

    monkeypatch.setattr(SqliteLogStore, "commit_batch", commit_batch)
    for i in range(40):
        spool.append(make_record(i))
    drain_all(drainer)
    broken.set()
    for i in range(40, 200):
        spool.append(make_record(i))
    wait_for(lambda: attempts["n"] >= 5, 10, "several failed drain attempts")
    assert drainer.last_error is not None and "disk I/O error" in drainer.last_error
    assert len(db_id_counts(db)) == 40
    before = spool_bytes(spool_dir)
    for i in range(200, 260):
        spool.append(make_record(i))
    assert spool_bytes(spool_dir) > before
    broken.clear()
    drain_all(drainer)
    assert drainer.last_error is None
    assert_exactly_once(db, [f"rec-{i}" for i in range(260)])
    assert db_total_rows(db) == 260


def test_store_unavailable_at_startup_is_retried(tmp_path: Path) -> None:
    spool_dir, db = tmp_path / "spool", tmp_path / "requests.db"
    db.mkdir()  # the DB path is a directory: sqlite cannot open it
    spool = Spool(spool_dir, 1 << 20)
    drainer = SpoolDrainer(spool, db, 100, 0.05)
    drainer.start()
    try:
        for i in range(20):
            spool.append(make_record(i))
        assert drainer.flush(timeout_s=5)  # ticks keep running while the store is down...
        assert drainer.last_error is not None  # ...and say why nothing moved
        assert spool_bytes(spool_dir) > 0  # the records are safe in the spool meanwhile
        db.rmdir()  # the store recovers
        for _ in range(20):
            if drainer.flush(timeout_s=1) and drainer.last_error is None and len(db_id_counts(db)) == 20:
                break
        assert_exactly_once(db, [f"rec-{i}" for i in range(20)])
    finally:
        drainer.stop()
        if spool._fd >= 0:  # noqa: SLF001 - the dead thread never closed it
            spool.close()
            spool.release()


def test_records_survive_a_stop_while_the_store_is_failing(
    tmp_path: Path, start_drainer: StartDrainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool_dir, db = tmp_path / "spool", tmp_path / "requests.db"
    spool = Spool(spool_dir, 1 << 20)
    drainer = start_drainer(spool, db, interval_s=60)
    drain_all(drainer)  # the store exists and works

    def failing(self: SqliteLogStore, *args: Any, **kw: Any) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    with monkeypatch.context() as m:
        m.setattr(SqliteLogStore, "commit_batch", failing)
        for i in range(25):
            spool.append(make_record(i))
        drainer.stop()  # graceful shutdown; its final drain fails
    assert segments(spool_dir), "the records must still be in the spool"

    drainer2 = start_drainer(Spool(spool_dir, 1 << 20), db)
    drain_all(drainer2)
    assert_exactly_once(db, [f"rec-{i}" for i in range(25)])


def test_record_larger_than_the_read_window(tmp_path: Path, start_drainer: StartDrainer) -> None:
    spool = Spool(tmp_path / "spool", 64 << 20)
    db = tmp_path / "requests.db"
    drainer = start_drainer(spool, db)
    spool.append(make_record("big", content="x" * (9 << 20)))
    spool.append(make_record("after-big"))
    drain_all(drainer)
    assert_exactly_once(db, ["big", "after-big"])


def test_large_record_within_the_read_window(tmp_path: Path, start_drainer: StartDrainer) -> None:
    spool = Spool(tmp_path / "spool", 64 << 20)
    db = tmp_path / "requests.db"
    drainer = start_drainer(spool, db)
    spool.append(make_record("before"))
    spool.append(make_record("big", content="x" * (2 << 20)))
    spool.append(make_record("after"))
    drain_all(drainer)
    assert_exactly_once(db, ["before", "big", "after"])


# -- flush() semantics --------------------------------------------------------------------------


def test_flush_waits_for_a_tick_that_started_after_the_call(
    tmp_path: Path, start_drainer: StartDrainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path / "spool", 1 << 20)
    db = tmp_path / "requests.db"
    drainer = start_drainer(spool, db)
    drain_all(drainer)

    in_first_commit, release_first, release_rest = threading.Event(), threading.Event(), threading.Event()
    calls = {"n": 0}
    real_commit = SqliteLogStore.commit_batch

    def gated(self: SqliteLogStore, *args: Any, **kw: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            in_first_commit.set()
            release_first.wait(10)
        else:
            release_rest.wait(10)
        real_commit(self, *args, **kw)

    monkeypatch.setattr(SqliteLogStore, "commit_batch", gated)
    results: dict[str, bool] = {}
    try:
        spool.append(make_record("early"))
        t1 = threading.Thread(target=lambda: results.setdefault("first", drainer.flush(10)))
        t1.start()
        assert in_first_commit.wait(10)  # tick 1 has sized the segment and is committing "early"
        spool.append(make_record("late"))
        t2 = threading.Thread(target=lambda: results.setdefault("second", drainer.flush(10)))
        t2.start()
        time.sleep(0.05)
        release_first.set()  # tick 1 finishes; tick 2 (the one that sees "late") is held back
        t2.join(2)
        returned = not t2.is_alive()
        stored = set(db_id_counts(db))
        # Correct behaviour: flush() called after "late" was appended must not have returned yet,
        # or if it has, "late" must be stored.
        assert not returned or "late" in stored, f"flush returned {results.get('second')} with only {stored} stored"
    finally:
        release_first.set()
        release_rest.set()
        t1.join(10)
        t2.join(10)


# -- (d) torn and unreadable lines in a dead owner's segment ------------------------------------


def test_torn_last_line_of_dead_owner_is_skipped(tmp_path: Path, start_drainer: StartDrainer) -> None:
    spool_dir, db = tmp_path / "spool", tmp_path / "requests.db"
    torn = orjson.dumps(make_record("torn")).decode()[:37]  # a partial write, no newline
    dead = spool_of_dead_process(spool_dir, [*(make_record(i) for i in range(30)), torn])
    (seg,) = segments(spool_dir, dead)
    assert not seg.read_bytes().endswith(b"\n")

    drainer = start_drainer(Spool(spool_dir, 1 << 20), db)
    drain_all(drainer)
    counts = db_id_counts(db)
    assert_exactly_once(db, [f"rec-{i}" for i in range(30)])
    assert "torn" not in counts and len(counts) == 30
    assert segments(spool_dir, dead) == []  # the dead segment is finished and gone
    assert not (spool_dir / f"{dead}.lock").exists()
    assert drainer.last_error is None


def test_segment_holding_only_a_torn_line(tmp_path: Path, start_drainer: StartDrainer) -> None:
    spool_dir, db = tmp_path / "spool", tmp_path / "requests.db"
    dead = spool_of_dead_process(spool_dir, ['{"id": "half'])
    drainer = start_drainer(Spool(spool_dir, 1 << 20), db)
    drain_all(drainer)
    assert db_id_counts(db) == {}
    assert segments(spool_dir, dead) == []


def test_unreadable_line_in_the_middle_is_skipped(tmp_path: Path, start_drainer: StartDrainer) -> None:
    spool_dir, db = tmp_path / "spool", tmp_path / "requests.db"
    records: list[Any] = [make_record(i) for i in range(10)]
    records += ["\x00\x00garbage that is not json\n", "[1, 2, 3]\n", "\n"]
    records += [make_record(i) for i in range(10, 20)]
    dead = spool_of_dead_process(spool_dir, records)
    drainer = start_drainer(Spool(spool_dir, 1 << 20), db)
    drain_all(drainer)
    assert_exactly_once(db, [f"rec-{i}" for i in range(20)])
    assert db_total_rows(db) == 20
    assert segments(spool_dir, dead) == []
    # Nothing is dropped silently: what could not be stored is kept verbatim for inspection.
    rejected = [r[0] for r in _rejected(db)]
    assert len(rejected) == 2
    assert "garbage that is not json" in rejected[0] and rejected[1] == "[1,2,3]"


def _rejected(db: Path) -> list[tuple[str, str]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT record, error FROM rejected_records ORDER BY rowid").fetchall()
    finally:
        conn.close()


def test_schema_invalid_record_does_not_block_the_spool(tmp_path: Path, start_drainer: StartDrainer) -> None:
    spool_dir, db = tmp_path / "spool", tmp_path / "requests.db"
    records: list[Any] = [make_record(0), '{"id": "no-ts-or-status"}\n', make_record(1)]
    dead = spool_of_dead_process(spool_dir, records)
    drainer = start_drainer(Spool(spool_dir, 1 << 20), db)
    drain_all(drainer)
    assert_exactly_once(db, ["rec-0", "rec-1"])
    assert segments(spool_dir, dead) == []
    assert drainer.last_error is None
    rejected = _rejected(db)
    assert len(rejected) == 1 and "no-ts-or-status" in rejected[0][0] and "NOT NULL" in rejected[0][1]


def test_record_with_only_required_fields_is_stored(tmp_path: Path) -> None:
    store = SqliteLogStore(tmp_path / "requests.db")
    try:
        store.commit_batch("seg-0.jsonl", 100, [{"id": "minimal", "ts": 1.0, "endpoint": "chat", "status": 200}])
        assert store.offset("seg-0.jsonl") == 100
        rows = store._conn.execute("SELECT id, is_stream, prompt_tokens FROM requests").fetchall()  # noqa: SLF001
    finally:
        store.close()
    assert rows == [("minimal", 0, 0)]


def test_several_dead_owners_with_rotated_segments(tmp_path: Path, start_drainer: StartDrainer) -> None:
    spool_dir, db = tmp_path / "spool", tmp_path / "requests.db"
    owners = []
    all_ids = []
    for k in range(3):
        recs = [make_record(f"o{k}-{i}") for i in range(60)]
        all_ids += [r["id"] for r in recs]
        owners.append(spool_of_dead_process(spool_dir, recs, segment_bytes=2048))
    assert all(len(segments(spool_dir, o)) > 1 for o in owners)
    drainer = start_drainer(Spool(spool_dir, 1 << 20), db, batch_size=13)
    drain_all(drainer)
    assert_exactly_once(db, all_ids)
    assert db_total_rows(db) == 180
    for o in owners:
        assert segments(spool_dir, o) == []
        assert not (spool_dir / f"{o}.lock").exists()


# -- (f) two owners in one directory ------------------------------------------------------------


def test_live_owner_is_not_claimed_but_dead_owner_is(tmp_path: Path, start_drainer: StartDrainer) -> None:
    """Two Spools in one directory, like two workers. B's drainer must leave A's segments alone
    while A holds its lock, and claim and drain them once A's lock is gone (A died)."""
    spool_dir, db = tmp_path / "spool", tmp_path / "requests.db"
    a = Spool(spool_dir, 4096)
    b = Spool(spool_dir, 4096)
    assert a.owner != b.owner
    drainer_b = start_drainer(b, db, batch_size=9)
    for i in range(80):
        a.append(make_record(f"a-{i}"))
        b.append(make_record(f"b-{i}"))
    drain_all(drainer_b)
    counts = db_id_counts(db)
    assert_exactly_once(db, [f"b-{i}" for i in range(80)])
    assert not any(k.startswith("a-") for k in counts), "a live owner's records were taken"
    a_segments = segments(spool_dir, a.owner)
    assert len(a_segments) > 1 and all(p.exists() for p in a_segments)

    # A dies: its descriptors (and so its flock) go away, its lock file stays.
    os.close(a._fd)  # noqa: SLF001
    os.close(a._lock_fd)  # noqa: SLF001
    assert (spool_dir / f"{a.owner}.lock").exists()

    drain_all(drainer_b)
    assert_exactly_once(db, [f"{w}-{i}" for w in "ab" for i in range(80)])
    assert db_total_rows(db) == 160
    assert segments(spool_dir, a.owner) == []
    assert not (spool_dir / f"{a.owner}.lock").exists()
    # B keeps working normally afterwards.
    b.append(make_record("b-late"))
    drain_all(drainer_b)
    assert "b-late" in db_id_counts(db)


def test_two_live_drainers_share_nothing_and_lose_nothing(tmp_path: Path, start_drainer: StartDrainer) -> None:
    spool_dir, db = tmp_path / "spool", tmp_path / "requests.db"
    a, b = Spool(spool_dir, 4096), Spool(spool_dir, 4096)
    da, db_ = start_drainer(a, db, batch_size=11, interval_s=0.01), start_drainer(b, db, batch_size=11, interval_s=0.01)

    def write(spool: Spool, prefix: str) -> None:
        for i in range(300):
            spool.append(make_record(f"{prefix}-{i}"))

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda args: write(*args), [(a, "a"), (b, "b")]))
    drain_all(da)
    drain_all(db_)
    assert_exactly_once(db, [f"{w}-{i}" for w in "ab" for i in range(300)])
    assert db_total_rows(db) == 600


def test_dead_owner_claimed_by_exactly_one_of_two_live_drainers(tmp_path: Path, start_drainer: StartDrainer) -> None:
    spool_dir, db = tmp_path / "spool", tmp_path / "requests.db"
    dead = spool_of_dead_process(spool_dir, [make_record(f"d-{i}") for i in range(200)], segment_bytes=2048)
    d1 = start_drainer(Spool(spool_dir, 4096), db, batch_size=7, interval_s=0.01)
    d2 = start_drainer(Spool(spool_dir, 4096), db, batch_size=7, interval_s=0.01)
    drain_all(d1)
    drain_all(d2)
    wait_for(lambda: not segments(spool_dir, dead), 10, "the dead owner's segments to be drained")
    assert_exactly_once(db, [f"d-{i}" for i in range(200)])
    assert db_total_rows(db) == 200


# -- (e) THE KILL TEST --------------------------------------------------------------------------


def _chat_body(i: int, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "chat", "messages": [{"role": "user", "content": f"request {i}"}]}
    if stream:
        body["stream"] = True
        if i % 3 == 0:
            body["stream_options"] = {"include_usage": True}
    return body


def _one_request(client: httpx.Client, base: str, i: int, slow: bool = False) -> str | None:
    """Send request i; return its x-request-id only if the whole response arrived."""
    kind = i % 8
    try:
        if kind in (0, 4):
            body = _chat_body(i, stream=False)
        elif kind in (1, 5, 6):
            body = _chat_body(i, stream=True)
        elif kind == 2:
            r = client.post(f"{base}/embeddings", json={"model": "embed", "input": [f"doc {i}", "x"]})
            assert r.status_code == 200, r.text
            return r.headers["x-request-id"]
        elif kind == 3:
            body = {**_chat_body(i, stream=False), "sim_fault": "server_error"}  # an error answer is logged too
        else:
            body = {**_chat_body(i, stream=True), "sim_fault": "cut_stream"}
        if slow:
            body["sim_output_tokens"] = 60
        if body.get("stream"):
            with client.stream("POST", f"{base}/chat/completions", json=body) as r:
                rid = r.headers["x-request-id"]
                data = r.read()
            assert r.status_code == 200
            assert data.endswith(b"data: [DONE]\n\n") or b'"error"' in data, data[-200:]
            return rid
        r = client.post(f"{base}/chat/completions", json=body)
        assert r.status_code in (200, 503), r.text
        return r.headers["x-request-id"]
    except httpx.TransportError:
        return None


def _http_client() -> httpx.Client:
    return httpx.Client(headers={"Authorization": f"Bearer {STATIC_KEY}"}, timeout=15.0, trust_env=False,
                        limits=httpx.Limits(max_connections=16, max_keepalive_connections=16))


def _spooled_ids(spool_dir: Path) -> set[str]:
    ids = set()
    for seg in segments(spool_dir):
        for line in seg.read_bytes().splitlines():
            try:
                rec = orjson.loads(line)  # the gateway spools positional records
                ids.add(rec[RECORD_COLUMNS.index("id")] if isinstance(rec, list) else rec["id"])
            except orjson.JSONDecodeError:
                pass
    return ids


def _wait_store_initialised(db: Path) -> None:
    """The server's drainer ticks once at start-up (then every 60 s); let that first tick pass so
    the records of the requests below really sit in the spool."""

    def ready() -> bool:
        if not db.exists():
            return False
        conn = sqlite3.connect(db, timeout=5)
        try:
            return conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'spool_progress'").fetchone() is not None
        finally:
            conn.close()

    wait_for(ready, 20, "requests.db to be created by the drainer")
    time.sleep(0.2)


def _restart_and_wait_for_orphans(serve: Callable[[dict[str, Any]], ServeProc], cfg: dict[str, Any],
                                  spool_dir: Path, dead_owners: list[str]) -> ServeProc:
    second = serve(cfg)
    wait_for(
        lambda: not any(segments(spool_dir, o) or (spool_dir / f"{o}.lock").exists() for o in dead_owners),
        20, "the new server to claim and drain the dead server's spool",
    )
    return second


@pytest.mark.slow
def test_kill9_after_acknowledged_responses(tmp_path: Path, serve: Callable[[dict[str, Any]], ServeProc]) -> None:
    data_dir = tmp_path / "data"
    spool_dir, db = data_dir / "spool", data_dir / "requests.db"
    cfg = serve_config(data_dir)
    first = serve(cfg)
    _wait_store_initialised(db)
    with _http_client() as client, ThreadPoolExecutor(8) as pool:
        acked = [rid for rid in pool.map(lambda i: _one_request(client, first.base_url, i), range(200)) if rid]
    assert len(acked) == 200 and len(set(acked)) == 200
    owners = [p.stem for p in spool_dir.glob("*.lock")]
    assert len(owners) == 1

    first.kill9()
    # Every acknowledged record is in the dead process's segment files...
    assert set(acked) <= _spooled_ids(spool_dir)
    # ...and (flush interval 60 s) practically none had reached the DB: the restart must do the work.
    assert len(set(acked) & set(db_id_counts(db))) <= 10

    second = _restart_and_wait_for_orphans(serve, cfg, spool_dir, owners)
    assert_exactly_once(db, acked)
    rows = db_id_counts(db)
    assert len(rows) == 200  # no phantom records either
    assert second.terminate() == 0


def _kill9_under_load(proc: ServeProc, spool_dir: Path) -> tuple[list[str], list[str]]:
    """Drive `proc` with 12 clients until 150 requests completed, kill -9 it mid-flight, and return
    (acknowledged request ids, spool owners at the kill). Asserts that the kill broke at least one
    request, that no completed answer was wrong and that no id was acknowledged twice."""
    acked: list[str] = []
    unexpected: list[BaseException] = []
    failed = 0
    lock = threading.Lock()
    stop = threading.Event()
    counter = iter(range(10**6))

    def worker() -> None:
        nonlocal failed
        with _http_client() as client:
            while not stop.is_set():
                with lock:
                    i = next(counter)
                try:
                    rid = _one_request(client, proc.base_url, i, slow=True)
                except Exception as exc:  # a complete but wrong answer: report it from the main thread
                    with lock:
                        unexpected.append(exc)
                    return
                with lock:
                    if rid is None:
                        failed += 1
                    else:
                        acked.append(rid)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(12)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(acked) >= 150 or bool(unexpected), 30, "150 completed requests")
        assert unexpected == []
        owners = [p.stem for p in spool_dir.glob("*.lock")]
        proc.kill9()  # while the workers are still sending and streaming
    finally:
        stop.set()
        for t in threads:
            t.join(20)
    assert not any(t.is_alive() for t in threads)
    assert unexpected == []
    with lock:
        acked_at_end = list(acked)
    assert failed >= 1, "the kill should have broken at least one request in flight"
    assert len(set(acked_at_end)) == len(acked_at_end)
    return acked_at_end, owners


@pytest.mark.slow
def test_kill9_with_load_in_flight(tmp_path: Path, serve: Callable[[dict[str, Any]], ServeProc]) -> None:
    data_dir = tmp_path / "data"
    spool_dir, db = data_dir / "spool", data_dir / "requests.db"
    cfg = serve_config(data_dir)
    cfg["providers"]["sim"]["latency"] = {"ttft_ms": 2, "per_token_ms": 1.5, "jitter": 0}
    first = serve(cfg)
    _wait_store_initialised(db)
    acked_at_end, owners = _kill9_under_load(first, spool_dir)

    _restart_and_wait_for_orphans(serve, cfg, spool_dir, owners)
    assert_exactly_once(db, acked_at_end)
    # Requests cut by the kill may or may not have been logged, but never twice.
    assert all(c == 1 for c in db_id_counts(db).values())
    assert db_total_rows(db) >= len(acked_at_end)


def test_append_does_not_wait_for_a_slow_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The drainer fsyncs the live segment every tick; on a busy disk that takes hundreds of ms.
    Appends (the event loop's) must not queue behind it. The disk is made slow by delaying fsync;
    the segment must still be the one synced, and every appended line must be in it."""
    spool = Spool(tmp_path / "spool", 1 << 20)
    synced: list[int] = []
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        time.sleep(0.5)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    try:
        syncing = threading.Thread(target=spool.sync)
        syncing.start()
        time.sleep(0.05)  # the sync is inside its fsync now
        start = time.monotonic()
        for i in range(100):
            spool.append({"i": i})
        waited = time.monotonic() - start
        syncing.join()
        assert waited < 0.25, f"100 appends took {waited:.3f}s behind an fsync"
        assert synced == [os.stat(spool.current_segment).st_ino]
    finally:
        monkeypatch.setattr(os, "fsync", real_fsync)
        spool.close()
        spool.release()
    lines = spool.current_segment.read_bytes().splitlines()
    assert [orjson.loads(line)["i"] for line in lines] == list(range(100))


def test_a_record_with_a_string_that_is_not_utf8_is_kept(tmp_path: Path, start_drainer: StartDrainer) -> None:
    """A lone surrogate (how servers pass on header bytes that are not UTF-8) cannot be encoded as
    JSON; the record is still spooled and stored, with "?" in its place, never dropped."""
    spool = Spool(tmp_path / "spool", 1 << 20)
    db = tmp_path / "requests.db"
    drainer = start_drainer(spool, db, batch_size=64)
    rec = make_record(0)
    rec["user_id"] = "u\udcffser"
    rec["annotations"] = '{"run_id": "run-\ud800", "tags": ["\udcfe"]}'
    spool.append(rec)
    spool.append(make_record(1))
    drain_all(drainer)
    assert_exactly_once(db, ["rec-0", "rec-1"])
    with sqlite3.connect(db) as conn:
        user, annotations = conn.execute("SELECT user_id, annotations FROM requests WHERE id = 'rec-0'").fetchone()
    assert user == "u?ser"
    assert orjson.loads(annotations) == {"run_id": "run-?", "tags": ["?"]}
    assert drainer.last_error is None
