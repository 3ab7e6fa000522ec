"""Request-log benchmark: seed realistic request records into SQLite and PostgreSQL through the real
writer (`commit_batch`, rollups included), then time every reader method the dashboard uses.

    python bench/logstore_bench.py                       # 1,000,000 rows, SQLite + PostgreSQL
    python bench/logstore_bench.py --rows 200000 --backend sqlite
    python bench/logstore_bench.py --pg-url postgresql://user@host/db   # an existing (empty) database
    python bench/logstore_bench.py --compare-pg-inserts   # COPY vs multi-row VALUES vs unnest

Without --pg-url (or SETPOINT_BENCH_PG_URL) a throwaway PostgreSQL is started from the installed
server binaries (pg_ctl on PATH or /usr/lib/postgresql/*/bin), as the `postgres` user when run as
root, with its default settings, and removed afterwards.

Records: spread over the 30 days before now (busier by day than by night), 6 teams with 5 keys
each, 2,000 end users on a third of the requests, 6 models on 8 deployments (two with a fallback),
half of them streamed, ~3% errors with several codes, ~8% cache hits. Each reader call is timed
`--repeat` times on a warm database; the table shows the median and the slowest.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from setpoint.logstore.reader import LogReader, RequestFilter  # noqa: E402
from setpoint.logstore.sql_store import SqlLogStore  # noqa: E402

DAY = 86_400
MODELS = [  # (model, deployments with weights, $/Mtok in, $/Mtok out, median latency ms)
    ("gpt-4o", [("openai/gpt-4o", 0.9), ("azure/gpt-4o", 0.1)], 2.5, 10.0, 900),
    ("gpt-4o-mini", [("openai/gpt-4o-mini", 1.0)], 0.15, 0.6, 450),
    ("claude-sonnet", [("anthropic/sonnet", 0.85), ("bedrock/sonnet", 0.15)], 3.0, 15.0, 1100),
    ("llama-70b", [("vllm/llama-70b", 1.0)], 0.6, 0.6, 700),
    ("embed-small", [("openai/embed-small", 1.0)], 0.02, 0.0, 60),
    ("o3-mini", [("openai/o3-mini", 1.0)], 1.1, 4.4, 4000),
]
MODEL_WEIGHTS = [0.25, 0.3, 0.15, 0.1, 0.15, 0.05]
ERRORS = [(502, "upstream_error", 0.35), (429, "rate_limited", 0.25), (504, "upstream_timeout", 0.15),
          (402, "budget_exceeded", 0.1), (400, "invalid_request", 0.1), (503, "circuit_open", 0.05)]


def records(n: int, now: float, seed: int = 7, span_s: float = 30 * DAY) -> Iterator[dict[str, Any]]:
    """n request records, oldest first, over the `span_s` (30 days) before `now`."""
    rnd = random.Random(seed)
    teams = [f"team-{t}" for t in ("search", "support", "growth", "platform", "research", "billing")]
    keys = [(f"key_{t}{k:02d}", f"{teams[t].split('-')[1]}-{k}", teams[t]) for t in range(6) for k in range(5)]
    key_weights = [rnd.paretovariate(1.2) for _ in keys]
    users = [f"user-{u:04d}" for u in range(2000)]
    start = now - span_s
    ts: list[float] = []  # arrival times, 3x busier at 14:00 UTC than at 02:00
    while len(ts) < n:
        t = start + span_s * rnd.random()
        if rnd.random() < 0.5 - 0.25 * math.cos(2 * math.pi * ((t % DAY) / DAY - 2 / 24)):
            ts.append(t)
    ts.sort()
    prefix = os.urandom(8).hex()
    cum_keys = _cumulative(key_weights)
    cum_models = _cumulative(MODEL_WEIGHTS)
    for i, t in enumerate(ts):
        t = min(max(t, start), now - 1)
        kid, kname, team = keys[_pick(cum_keys, rnd.random())]
        model, deps, pin, pout, median = MODELS[_pick(cum_models, rnd.random())]
        dep = deps[0][0] if rnd.random() < deps[0][1] else deps[-1][0]
        is_embed = model.startswith("embed")
        stream = not is_embed and rnd.random() < 0.5
        prompt = int(rnd.lognormvariate(6.5, 1.0))
        completion = 0 if is_embed else int(rnd.lognormvariate(5.0, 0.9))
        cached = int(prompt * 0.6) if rnd.random() < 0.2 else 0
        reasoning = int(completion * 0.5) if model == "o3-mini" else 0
        status, code = 200, None
        r = rnd.random()
        if r < 0.03:
            status, code = _error(rnd.random())
        hit = status == 200 and not stream and rnd.random() < 0.08
        cost = round((prompt * pin + completion * pout))  # micro-dollars: $/Mtok * tokens
        overhead = rnd.lognormvariate(-0.7, 0.6)  # ~0.5 ms
        if hit:
            latency, upstream, ttft = overhead + rnd.uniform(0.2, 2.0), None, None
        elif status >= 400:
            latency = overhead + (rnd.lognormvariate(math.log(median), 0.5) if status in (502, 504) else rnd.uniform(0.1, 3))
            upstream, ttft = (latency - overhead if status in (502, 504, 429) else None), None
            prompt, completion, cached, reasoning = (prompt, 0, 0, 0) if status in (502, 504) else (0, 0, 0, 0)
        else:
            up = rnd.lognormvariate(math.log(median), 0.6)
            latency, upstream = up + overhead, up
            ttft = up * rnd.uniform(0.05, 0.3) if stream else None
        yield {
            "id": f"req_{int(t * 1000):012x}{prefix}{i:06x}", "ts": t, "endpoint": "embeddings" if is_embed else "chat",
            "key_id": kid, "key_name": kname, "team": team,
            "user_id": users[int(rnd.paretovariate(1.1)) % len(users)] if rnd.random() < 0.33 else None,
            "model": model, "deployment": dep, "provider": dep.split("/")[0], "is_stream": 1 if stream else 0,
            "status": status, "error_code": code, "prompt_tokens": prompt, "completion_tokens": completion,
            "cached_tokens": cached, "reasoning_tokens": reasoning,
            "cost_micros": 0 if hit else (None if status >= 400 and completion == 0 else cost),
            "latency_ms": round(latency, 3), "ttft_ms": None if ttft is None else round(ttft, 3),
            "upstream_ms": None if upstream is None else round(upstream, 3),
            "finish_reason": None if status >= 400 else "stop",
            "annotations": '{"route":"%s","attempts":1}' % dep, "content": None,
            "cache_status": "hit" if hit else "miss", "saved_micros": cost if hit else None,
        }


def _cumulative(weights: list[float]) -> list[float]:
    total, out = sum(weights), []
    acc = 0.0
    for w in weights:
        acc += w / total
        out.append(acc)
    return out


def _pick(cum: list[float], r: float) -> int:
    for i, c in enumerate(cum):
        if r < c:
            return i
    return len(cum) - 1


def _error(r: float) -> tuple[int, str]:
    acc = 0.0
    for status, code, w in ERRORS:
        acc += w
        if r < acc:
            return status, code
    return ERRORS[-1][0], ERRORS[-1][1]


# -- seeding --------------------------------------------------------------------------------------


def seed(store: SqlLogStore, n: int, now: float, batch: int = 1000, span_s: float = 30 * DAY,
         progress: bool = True) -> tuple[float, float]:
    """Insert n records through commit_batch; returns (wall seconds, writer-process CPU seconds)."""
    it = records(n, now, span_s=span_s)
    wall, cpu = 0.0, 0.0
    offset = 0
    while True:
        chunk = [r for _, r in zip(range(batch), it)]  # generated outside the timed part
        if not chunk:
            break
        offset += len(chunk)
        t0, c0 = time.perf_counter(), time.process_time()
        store.commit_batch("bench-00000000.jsonl", offset, chunk)
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
        if progress and offset % 100_000 == 0:
            print(f"  {offset:>9,} rows  {offset / wall:,.0f} rows/s", flush=True)
    return wall, cpu


# -- reader timings -------------------------------------------------------------------------------


def reader_calls(reader: LogReader, now: float) -> list[tuple[str, Callable[[], Any]]]:
    def window(span: int, bucket: int) -> tuple[float, float]:
        until = (math.floor(now / bucket) + 1) * bucket  # as the dashboard asks
        return until - span, until

    calls: list[tuple[str, Callable[[], Any]]] = []
    for name, span, bucket in (("1h", 3600, 60), ("24h", DAY, 900), ("7d", 7 * DAY, 3600), ("30d", 30 * DAY, 6 * 3600)):
        s, u = window(span, bucket)
        calls += [
            (f"totals {name}", lambda s=s, u=u: reader.totals(s, u)),
            (f"series {name} by team", lambda s=s, u=u, b=bucket: reader.series(s, u, b, "team")),
            (f"series {name} by model", lambda s=s, u=u, b=bucket: reader.series(s, u, b, "model")),
            (f"series {name} by key (top 8)", lambda s=s, u=u, b=bucket: reader.series(s, u, b, "key")),
            (f"latency {name} per {bucket // 60} min", lambda s=s, u=u, b=bucket: reader.latency(s, u, b)),
            (f"latency {name} whole window", lambda s=s, u=u, sp=span: reader.latency(s, u, sp)),
            (f"errors {name}", lambda s=s, u=u: reader.errors(s, u)),
        ]
    s30, u30 = window(30 * DAY, 6 * 3600)
    calls += [
        ("latency 7d model=gpt-4o", lambda: reader.latency(now - 7 * DAY, now, 3600, model="gpt-4o")),
        ("breakdown 30d by key", lambda: reader.breakdown(s30, u30, "key")),
        ("breakdown 30d by user", lambda: reader.breakdown(s30, u30, "user")),
        ("breakdown 30d by day", lambda: reader.breakdown(s30, u30, "day")),
        ("breakdown 1h by deployment", lambda: reader.breakdown(now - 3600, now + 1, "deployment")),
        ("spend_since key 1h", lambda: reader.spend_since("key", "key_000", now - 3600)),
        ("spend_since team 30d", lambda: reader.spend_since("team", "team-search", now - 30 * DAY)),
        ("spend_since user 30d", lambda: reader.spend_since("user", "user-0001", now - 30 * DAY)),
    ]
    filters = {
        "search (no filter)": RequestFilter(),
        "search model+status=error": RequestFilter(model="gpt-4o", status="error"),
        "search team 24h": RequestFilter(team="team-growth", since=now - DAY),
        "search key name": RequestFilter(key="support-2"),
        "search user": RequestFilter(user="user-0003"),
        "search error_code": RequestFilter(error_code="upstream_timeout"),
        "search cache=hit": RequestFilter(cache="hit"),
        "search team+model+cache=miss": RequestFilter(team="team-billing", model="llama-70b", cache="miss"),
    }
    for name, flt in filters.items():
        calls.append((f"{name}, first page", lambda f=flt: reader.search(f, limit=50)))
        calls.append((f"{name}, page 200", lambda f=flt: _deep_page(reader, f, 200)))
    calls.append(("search id prefix", lambda: reader.search(RequestFilter(request_id=_some_id(reader)[:14]))))
    calls.append(("get", lambda: reader.get(_some_id(reader))))
    return calls


_cursors: dict[Any, str | None] = {}
_ids: dict[int, str] = {}


def _deep_page(reader: LogReader, flt: RequestFilter, page: int) -> Any:
    """Page `page` of a filter: the cursor is fetched once, untimed; the timed call is that page."""
    key = (id(reader), flt, page)
    if key not in _cursors:
        cursor = None
        for _ in range(page - 1):
            cursor = reader.search(flt, limit=50, cursor=cursor).next_cursor
            if cursor is None:
                break
        _cursors[key] = cursor
    return reader.search(flt, limit=50, cursor=_cursors[key])


def _some_id(reader: LogReader) -> str:
    if id(reader) not in _ids:
        rows = _deep_page(reader, RequestFilter(), 300).rows
        _ids[id(reader)] = rows[0]["id"]
    return _ids[id(reader)]


def time_calls(reader: LogReader, now: float, repeat: int) -> dict[str, tuple[float, float]]:
    out = {}
    for name, fn in reader_calls(reader, now):
        fn()  # warm: plans, caches, the untimed cursor of deep pages
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
        out[name] = (statistics.median(times), max(times))
    return out


# -- a throwaway PostgreSQL -----------------------------------------------------------------------


class TempPostgres:
    def __init__(self) -> None:
        bindir = _pg_bindir()
        if bindir is None:
            raise SystemExit("no PostgreSQL server binaries found; pass --pg-url or --backend sqlite")
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="setpoint-bench-pg-"))
        self.port = _free_port()
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = "postgres"
            shutil.chown(self.dir, self.user)
        self._run("initdb", "-D", str(self.dir / "data"), "--auth=trust", "--username=postgres", "-E", "UTF8", "--locale=C")
        self._run("pg_ctl", "start", "-w", "-D", str(self.dir / "data"), "-l", str(self.dir / "log"),
                  "-o", f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.dir}")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([os.path.join(self.bindir, tool), *args], check=True, stdout=subprocess.DEVNULL,
                       user=self.user, cwd="/")

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "stop", "-D", str(self.dir / "data"), "-m", "fast")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def _pg_bindir() -> str | None:
    found = shutil.which("pg_ctl")
    if found:
        return os.path.dirname(os.path.realpath(found))
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2].split(".")[0]))
    return dirs[-1] if dirs else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- PostgreSQL: which bulk insert -------------------------------------------------------------------


def compare_pg_inserts(url: str, n: int = 100_000, batch: int = 1000) -> None:
    """Rows into `requests` (all its indexes) three ways, 1,000 per transaction: the COPY path the
    writer uses, a multi-row INSERT ... VALUES, and INSERT ... SELECT FROM unnest(arrays)."""
    import psycopg

    from setpoint.logstore.postgres_store import PostgresLogStore
    from setpoint.logstore.rows import to_row
    from setpoint.logstore.sql_schema import RECORD_COLUMNS, REQUESTS

    store = PostgresLogStore(url)
    conn = store._conn  # noqa: SLF001
    cols = ", ".join(RECORD_COLUMNS)
    tail = " ON CONFLICT (id) DO NOTHING RETURNING id"
    pg_types = {"text": "text", "real": "float8", "int": "int8"}

    def values(rows: list[tuple[Any, ...]]) -> Any:
        row = "(" + ", ".join(["%s"] * len(RECORD_COLUMNS)) + ")"
        return conn.execute(f"INSERT INTO requests ({cols}) VALUES {', '.join([row] * len(rows))}{tail}",
                            [v for r in rows for v in r]).fetchall()

    def unnest(rows: list[tuple[Any, ...]]) -> Any:
        arrays = ", ".join(f"%s::{pg_types[c.kind]}[]" for c in REQUESTS.columns)
        return conn.execute(f"INSERT INTO requests ({cols}) SELECT * FROM unnest({arrays}){tail}",
                            [list(c) for c in zip(*rows, strict=True)]).fetchall()

    def copy(rows: list[tuple[Any, ...]]) -> Any:
        return store._load(REQUESTS, rows, tail)  # noqa: SLF001

    rows = [to_row(r) for r in records(n, time.time())]
    print(f"PostgreSQL bulk insert into requests, {n:,} rows, {batch:,} per transaction:")
    for name, fn in (("COPY + INSERT ... SELECT", copy), ("multi-row INSERT ... VALUES", values),
                     ("INSERT ... SELECT FROM unnest", unnest)):
        conn.execute("TRUNCATE requests")
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(0, n, batch):
            with conn.transaction():
                fn(rows[i : i + batch])
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(f"  {name:<30} {n / wall:>9,.0f} rows/s   client CPU {cpu / n * 1e6:5.1f} us/row")
    store.close()
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("TRUNCATE requests")


# -- main -----------------------------------------------------------------------------------------


Result = tuple[dict[str, str], dict[str, tuple[float, float]]]  # (insert figures, reader timings)


def _sizes(store: SqlLogStore, size_sql: str | None, path: Path | None) -> dict[str, str]:
    count = lambda t: store._execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]  # noqa: E731, SLF001
    if path is not None:  # the file and its write-ahead log
        size = sum(p.stat().st_size for p in (path, path.with_name(path.name + "-wal")) if p.exists())
    else:
        size = store._execute(size_sql).fetchone()[0]  # noqa: SLF001
    return {"rows in rollup / rollup_latency": f"{count('rollup'):,} / {count('rollup_latency'):,}",
            "database size, MB": f"{size / 1e6:,.0f}"}


def run_backend(name: str, open_store: Callable[[], SqlLogStore], open_reader: Callable[[], LogReader],
                open_burst_store: Callable[[], SqlLogStore], args: argparse.Namespace, now: float,
                size_sql: str | None = None, path: Path | None = None) -> Result:
    n = args.rows
    print(f"{name}: seeding {n:,} records through commit_batch ...", flush=True)
    store = open_store()
    try:
        wall, cpu = seed(store, n, now)
        sizes = _sizes(store, size_sql, path)
    finally:
        store.close()
    print(f"{name}: {n / wall:,.0f} rows/s ({wall:.1f} s, writer CPU {cpu / n * 1e6:.0f} us/row); timing readers ...", flush=True)
    reader = open_reader()
    try:
        timings = time_calls(reader, now, args.repeat)
    finally:
        reader.close()
    inserts = {"insert, 30 days of traffic: rows/s": f"{n / wall:,.0f}",
               "insert, 30 days of traffic: writer CPU us/row": f"{cpu / n * 1e6:.0f}", **sizes}
    if args.burst_rows:
        b = args.burst_rows
        span = b / args.burst_rate
        print(f"{name}: a burst of {b:,} records over {span:.0f} s ({args.burst_rate:,} req/s) into an empty log ...", flush=True)
        store = open_burst_store()
        try:
            wall, cpu = seed(store, b, now, span_s=span, progress=False)
        finally:
            store.close()
        inserts[f"insert, a {args.burst_rate:,} req/s burst: rows/s"] = f"{b / wall:,.0f}"
        inserts[f"insert, a {args.burst_rate:,} req/s burst: writer CPU us/row"] = f"{cpu / b * 1e6:.0f}"
    return inserts, timings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    ap.add_argument("--pg-url", default=os.environ.get("SETPOINT_BENCH_PG_URL"))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--burst-rows", type=int, default=200_000, help="also insert this many records at --burst-rate")
    ap.add_argument("--burst-rate", type=int, default=2000, help="requests per second of the burst")
    ap.add_argument("--keep", metavar="DIR", help="keep the SQLite file in DIR")
    ap.add_argument("--compare-pg-inserts", action="store_true",
                    help="only compare COPY, multi-row VALUES and unnest inserts on PostgreSQL")
    args = ap.parse_args()
    if args.compare_pg_inserts:
        _compare_only(args)
        return
    now = time.time()
    results: dict[str, Result] = {}
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="setpoint-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if args.backend in ("sqlite", "both"):
            from setpoint.logstore.sqlite_reader import SqliteLogReader
            from setpoint.logstore.sqlite_store import SqliteLogStore

            db, burst = workdir / "requests.db", workdir / "burst.db"
            db.unlink(missing_ok=True)
            burst.unlink(missing_ok=True)
            results["SQLite"] = run_backend("SQLite", lambda: SqliteLogStore(db), lambda: SqliteLogReader(db),
                                            lambda: SqliteLogStore(burst), args, now, path=db)
        if args.backend in ("postgres", "both"):
            results["PostgreSQL"] = _run_postgres(args, now)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    _print_table(results, args.rows)


def _compare_only(args: argparse.Namespace) -> None:
    import psycopg

    server = None if args.pg_url else TempPostgres()
    base = args.pg_url or server.url  # type: ignore[union-attr]
    try:
        with psycopg.connect(base, autocommit=True) as c:
            c.execute("DROP DATABASE IF EXISTS setpoint_bench_inserts")
            c.execute("CREATE DATABASE setpoint_bench_inserts")
        compare_pg_inserts(base.rsplit("/", 1)[0] + "/setpoint_bench_inserts")
    finally:
        if server is not None:
            server.stop()


def _run_postgres(args: argparse.Namespace, now: float) -> Result:
    import psycopg

    from setpoint.logstore.postgres_reader import PostgresLogReader
    from setpoint.logstore.postgres_store import PostgresLogStore

    server = None if args.pg_url else TempPostgres()
    base = args.pg_url or server.url  # type: ignore[union-attr]
    try:
        with psycopg.connect(base, autocommit=True) as c:
            c.execute("DROP DATABASE IF EXISTS setpoint_bench_burst")
            c.execute("CREATE DATABASE setpoint_bench_burst")
            if server is not None:
                c.execute("CREATE DATABASE bench")
        root = base.rsplit("/", 1)[0]
        url = base if server is None else root + "/bench"
        burst = root + "/setpoint_bench_burst"
        return run_backend("PostgreSQL", lambda: PostgresLogStore(url), lambda: PostgresLogReader(url),
                           lambda: PostgresLogStore(burst), args, now, size_sql="SELECT pg_database_size(current_database())")
    finally:
        if server is not None:
            server.stop()


def _print_table(results: dict[str, Result], n: int) -> None:
    names = list(results)
    print()
    print(f"{n:,} request records (commit_batch, 1,000 per batch, rollups included); reader times in ms, "
          "median / slowest of the runs")
    print()
    print("| | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for line in (next(iter(results.values()))[0] if results else {}):
        print(f"| {line} | " + " | ".join(results[b][0][line] for b in names) + " |")
    calls = list(next(iter(results.values()))[1]) if results else []
    worst = 0.0
    for c in calls:
        cells = []
        for b in names:
            med, mx = results[b][1][c]
            worst = max(worst, med)
            cells.append(f"{med:.1f} / {mx:.1f}")
        print(f"| {c} | " + " | ".join(cells) + " |")
    print()
    print(f"slowest reader call (median): {worst:.1f} ms")


if __name__ == "__main__":
    main()
