"""PostgreSQL as the shared log of several replicas: many processes, each with its own spool and
drainer, write to one database (every record once, rollups that add up, no deadlocks); and a
drainer rides out an outage of the database (the spool grows, then drains)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
import orjson
import psycopg
import pytest

from setpoint.errors import StateBackendError
from setpoint.logstore.drainer import SpoolDrainer
from setpoint.logstore.postgres_reader import PostgresLogReader
from setpoint.logstore.postgres_store import PostgresLogStore
from setpoint.logstore.spool import Spool

from . import reference as ref
from .pg import PgServer

SRC_DIR = str(Path(__file__).resolve().parents[2] / "src")
DAY = 86_400

_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import orjson
    from setpoint.logstore.drainer import SpoolDrainer
    from setpoint.logstore.postgres_store import PostgresLogStore
    from setpoint.logstore.spool import Spool

    spec = orjson.loads(Path(sys.argv[1]).read_bytes())
    spool = Spool(Path(spec["dir"]), 64 * 1024)
    drainer = SpoolDrainer(spool, lambda: PostgresLogStore(spec["url"]), spec["batch"], 0.005)
    drainer.start()
    while time.time() < spec["start_at"]:  # all writers start together
        time.sleep(0.001)
    for rec in spec["records"]:
        spool.append(rec)
    for _ in range(2):
        assert drainer.flush(60), "no tick"
    drainer.stop()
    print(drainer.last_error or "ok")
    """
)


def _ids(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        return {r[0]: r[1] for r in conn.execute("SELECT id, COUNT(*) FROM requests GROUP BY id")}


def test_several_processes_write_one_database(pg_url: str, tmp_path: Path) -> None:
    now = time.time()
    writers = 4
    per_writer = 1500
    # Overlapping times, teams, keys and models: the writers upsert the same rollup rows at once.
    records = [ref.make_records(per_writer, now, seed=100 + w, span_s=2 * 3600, prefix=f"w{w}") for w in range(writers)]
    PostgresLogStore(pg_url).close()  # the schema, once (the writers would race to create it otherwise too)
    start_at = time.time() + 3
    env = {**os.environ, "PYTHONPATH": SRC_DIR + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = []
    for w in range(writers):
        spec = tmp_path / f"writer{w}.json"
        spec.write_bytes(orjson.dumps({"dir": str(tmp_path / f"host{w}" / "spool"), "url": pg_url,
                                       "records": records[w], "batch": 97 + 50 * w, "start_at": start_at}))
        procs.append(subprocess.Popen([sys.executable, "-c", _WRITER, str(spec)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env))
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
        assert out.decode().strip() == "ok", err.decode()
        assert b"drain failed" not in err, err.decode()  # not even once (e.g. a deadlock, then a retry)
    everything = [r for rs in records for r in rs]
    assert _ids(pg_url) == {r["id"]: 1 for r in everything}
    for w in range(writers):  # every spool drained, every segment forgotten
        assert not list((tmp_path / f"host{w}" / "spool").glob("*.jsonl"))
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT COUNT(*) FROM spool_progress").fetchone() == (0,)
    reader = PostgresLogReader(pg_url, clock=lambda: now)
    try:
        assert reader.totals(0, now + DAY) == ref.totals(everything)
        got = {(p.bucket, p.group): p.totals for p in reader.series(now - 3 * 3600, now, 60, "key", top=100)}
        assert got == ref.series(everything, now - 3 * 3600, now, 60, "key", now, top=100)
    finally:
        reader.close()


def test_spool_segment_names_do_not_collide_across_hosts(tmp_path: Path) -> None:
    """Progress is keyed by segment name in a database every host shares: the name carries 64
    random bits besides the pid (which containers repeat)."""
    owners = {Spool(tmp_path / f"h{i}", 4096).owner for i in range(200)}
    assert len(owners) == 200
    assert all(len(o.split("-")[1]) == 16 for o in owners)


@pytest.fixture
def pg_control(pg_server: PgServer) -> PgServer:
    if not pg_server.can_stop:
        pytest.skip("outage tests need a PostgreSQL they own; SETPOINT_TEST_POSTGRES_URL cannot be stopped")
    return pg_server


def _spooled(spool_dir: Path) -> int:
    return sum(p.stat().st_size for p in spool_dir.glob("*.jsonl"))


def test_the_drainer_rides_out_a_postgres_outage(pg_url: str, pg_control: PgServer, tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    spool = Spool(spool_dir, 1 << 20)
    drainer = SpoolDrainer(spool, lambda: PostgresLogStore(pg_url), 100, 60.0)
    drainer.start()
    try:
        now = time.time()
        recs = ref.make_records(900, now, seed=31, span_s=3600)
        for r in recs[:300]:
            spool.append(r)
        assert drainer.flush(30) and drainer.flush(30)
        assert drainer.last_error is None and drainer.pending_bytes == 0

        pg_control.stop()  # the database goes away
        try:
            for r in recs[300:600]:
                spool.append(r)
            t0 = time.monotonic()
            assert drainer.flush(30) and drainer.flush(30)  # ticks still finish...
            assert time.monotonic() - t0 < 25
            assert drainer.last_error is not None and "Operational" in drainer.last_error  # ...and say why
            first = drainer.pending_bytes
            assert first > 0 and first == _spooled(spool_dir)
            for r in recs[600:]:
                spool.append(r)
            assert drainer.flush(30)
            assert drainer.pending_bytes > first  # the spool grows; nothing is dropped
        finally:
            pg_control.start()

        assert drainer.flush(30) and drainer.flush(30)  # the next ticks reconnect and drain
        assert drainer.last_error is None and drainer.pending_bytes == 0
        assert _ids(pg_url) == {r["id"]: 1 for r in recs}
        reader = PostgresLogReader(pg_url, clock=lambda: now)
        try:
            assert reader.totals(0, now + DAY) == ref.totals(recs)
        finally:
            reader.close()
    finally:
        drainer.stop()


def test_a_reader_reconnects_after_an_outage(pg_url: str, pg_control: PgServer) -> None:
    store = PostgresLogStore(pg_url)
    recs = ref.make_records(50, time.time(), seed=32)
    store.commit_batch("s.jsonl", 1, recs)
    store.close()
    reader = PostgresLogReader(pg_url)
    try:
        assert reader.totals(0, time.time() + DAY).requests == 50
        pg_control.stop()
        try:
            with pytest.raises(StateBackendError, match="the request log is unavailable"):
                reader.totals(0, time.time() + DAY)
        finally:
            pg_control.start()
        assert reader.totals(0, time.time() + DAY).requests == 50
    finally:
        reader.close()
