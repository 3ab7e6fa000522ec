"""The request log's contract, on SQLite and on PostgreSQL (`log_backend`): the writer stores each
record exactly once with its rollups, dead-letters what it cannot store, and the reader's answers
equal brute-force computations over the stored records."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

import orjson
import pytest

from setpoint.errors import InvalidRequestError
from setpoint.logstore import rollups
from setpoint.logstore.reader import RequestFilter, Totals
from setpoint.logstore.sql_schema import RECORD_COLUMNS

from . import reference as ref
from .conftest import NOW, LogBackend

DAY = 86_400


def _load(store: Any, records: list[dict[str, Any]], seed: int = 3, segment: str = "seg-a.jsonl") -> None:
    """Commit records in batches of random sizes, offsets growing like a spool's."""
    rnd = random.Random(seed)
    i, offset = 0, 0
    while i < len(records):
        n = rnd.randint(1, 400)
        offset += n * 100
        store.commit_batch(segment, offset, records[i : i + n])
        i += n


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    return ref.make_records(3000, NOW, seed=11)


@pytest.fixture(scope="module")
def loaded(module_log_backend: LogBackend, records: list[dict[str, Any]]) -> LogBackend:
    """`records` stored once per backend, for the tests that only read."""
    store = module_log_backend.store()
    _load(store, records)
    return module_log_backend


def _ids(b: LogBackend) -> dict[str, int]:
    return {r[0]: r[1] for r in b.sql("SELECT id, COUNT(*) FROM requests GROUP BY id")}


# -- writing ------------------------------------------------------------------------------------


def test_offset_and_rows_commit_together(log_backend: LogBackend) -> None:
    store = log_backend.store()
    recs = ref.make_records(50, NOW, seed=2)
    assert store.offset("s-1.jsonl") == 0
    store.commit_batch("s-1.jsonl", 1234, recs[:20])
    store.commit_batch("s-1.jsonl", 2345, recs[20:])
    assert store.offset("s-1.jsonl") == 2345
    assert store.offset("other.jsonl") == 0
    assert _ids(log_backend) == {r["id"]: 1 for r in recs}
    store.forget_segment("s-1.jsonl")
    assert store.offset("s-1.jsonl") == 0


def test_a_failed_batch_leaves_neither_rows_nor_offset_nor_rollups(log_backend: LogBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    store = log_backend.store()
    recs = ref.make_records(30, NOW, seed=4)
    store.commit_batch("s.jsonl", 10, recs[:10])

    def boom(*a: Any, **kw: Any) -> None:
        raise RuntimeError("the database went away mid-batch")

    monkeypatch.setattr(store, "_add_to_rollups", boom)
    with pytest.raises(RuntimeError):
        store.commit_batch("s.jsonl", 20, recs[10:])
    monkeypatch.undo()
    assert store.offset("s.jsonl") == 10
    assert set(_ids(log_backend)) == {r["id"] for r in recs[:10]}
    reader = log_backend.reader()
    assert reader.totals(0, NOW + DAY) == ref.totals(recs[:10])
    store.commit_batch("s.jsonl", 20, recs[10:])  # the retry
    assert reader.totals(0, NOW + DAY) == ref.totals(recs)


def test_replayed_records_are_stored_and_counted_once(log_backend: LogBackend) -> None:
    store = log_backend.store()
    recs = ref.make_records(400, NOW, seed=5)
    _load(store, recs)
    reader = log_backend.reader()
    before = reader.totals(0, NOW + DAY)
    # The same records again: from another segment (a re-claimed spool), in other batch sizes,
    # mixed with new ones, and a record twice within one batch.
    _load(store, recs, seed=99, segment="seg-b.jsonl")
    extra = ref.make_records(10, NOW, seed=6, prefix="extra")
    store.commit_batch("seg-c.jsonl", 1, [*recs[:50], *extra, extra[0], *recs[50:60]])
    assert _ids(log_backend) == {r["id"]: 1 for r in [*recs, *extra]}
    after = reader.totals(0, NOW + DAY)
    assert before == ref.totals(recs)
    assert after == ref.totals([*recs, *extra])
    rolled = log_backend.sql("SELECT SUM(requests) FROM rollup WHERE grain = ? AND dim = 'all'", (rollups.DAY,))
    assert int(rolled[0][0]) == len(recs) + len(extra)
    hist = log_backend.sql("SELECT SUM(n) FROM rollup_latency WHERE grain = ? AND dim = 'all' AND metric = 0", (rollups.DAY,))
    assert int(hist[0][0]) == len(recs) + len(extra)


def test_unreadable_and_refused_records_are_dead_lettered(log_backend: LogBackend) -> None:
    store = log_backend.store()
    good = ref.make_records(5, NOW, seed=7)
    bad: list[Any] = [
        {"id": "no-ts", "endpoint": "chat", "status": 200},  # NOT NULL
        {**good[0], "id": "bad-type", "prompt_tokens": "many"},
        {**good[0], "id": "bad-ts", "ts": "yesterday"},
        {**good[0], "id": "inf", "latency_ms": float("inf")},
        {**good[0], "id": "huge", "cost_micros": 1 << 70},
        [1, 2, 3],  # a positional record of the wrong width
        "just a string",
    ]
    nul = {**good[1], "id": "nul-in-text", "user_id": "a\x00b"}  # stored, NUL replaced (PostgreSQL refuses NUL)
    store.commit_batch("s.jsonl", 99, [good[0], *bad, good[1], nul, *good[2:]],
                       unreadable=[b"\x00garbage\xff", b'{"torn": '])
    assert set(_ids(log_backend)) == {r["id"] for r in good} | {"nul-in-text"}
    assert store.offset("s.jsonl") == 99
    rejected = log_backend.sql("SELECT segment, record, error FROM rejected_records")
    assert len(rejected) == len(bad) + 2
    assert all(seg == "s.jsonl" for seg, _, _ in rejected)
    texts = " ".join(rec for _, rec, _ in rejected)
    for marker in ("no-ts", "bad-type", "bad-ts", '"inf"', "huge", "[1,2,3]", "just a string", "garbage", "torn"):
        assert marker in texts, marker
    errors = {orjson.loads(rec)["id"]: err for _, rec, err in rejected if rec.startswith("{") and "torn" not in rec}
    assert "NOT NULL" in errors["no-ts"] and "prompt_tokens" in errors["bad-type"] and "ts" in errors["bad-ts"]
    assert log_backend.sql("SELECT user_id FROM requests WHERE id = 'nul-in-text'") == [("a\ufffdb",)]
    # only stored rows are counted
    assert log_backend.reader().totals(0, NOW + DAY) == ref.totals([*good, nul])


def test_positional_records_of_an_older_version(log_backend: LogBackend) -> None:
    store = log_backend.store()
    rec = ref.make_records(1, NOW, seed=8)[0]
    old = [rec[c] for c in RECORD_COLUMNS][:-2]  # spooled before cache_status and saved_micros existed
    store.commit_batch("s.jsonl", 1, [old])
    row = log_backend.reader().get(rec["id"])
    assert row is not None and row["cache_status"] is None and row["saved_micros"] is None
    assert row["prompt_tokens"] == rec["prompt_tokens"] and row["ts"] == rec["ts"]


# -- reading: aggregates equal brute force -----------------------------------------------------------

# (since, until, step): dashboard-style windows ending now, and unaligned ones in the past
WINDOWS = [
    (NOW - 3600, NOW + 1, 60),
    (NOW - DAY, NOW + 60, 900),
    (NOW - 7 * DAY, NOW, 3600),
    (NOW - 30 * DAY, NOW, 6 * 3600),
    (NOW - 45 * DAY, NOW + DAY, DAY),
    (NOW - 10 * DAY - 1234.5, NOW - 2 * DAY + 77.7, 3600),  # crosses the 15-minute horizon
    (NOW - 2.5 * DAY + 11, NOW - 0.2 * DAY - 13, 300),  # a 5-minute step around the 1-minute horizon
    (NOW - 20 * DAY + 5, NOW - 9 * DAY, 60),  # minute step where only hours are kept
    (NOW - 600.3, NOW - 0.7, 120),
]


@pytest.mark.parametrize("since,until,step", WINDOWS)
def test_totals_series_and_breakdowns_equal_brute_force(loaded: LogBackend, records: list[dict[str, Any]],
                                                       since: float, until: float, step: int) -> None:
    reader = loaded.reader()
    _, inside = ref.window(records, since, until, NOW)
    assert inside, "the window should hold records"
    assert reader.totals(since, until) == ref.totals(inside)
    assert reader.totals(since, until, model="m-big") == ref.totals(r for r in inside if r["model"] == "m-big")
    for by in ("none", "team", "key", "model", "deployment"):
        for top in (8, 2):
            got = {(p.bucket, p.group): p.totals for p in reader.series(since, until, step, by, top=top)}  # type: ignore[arg-type]
            assert got == ref.series(records, since, until, step, by, NOW, top=top), (by, top)
    for by in ("none", "team", "key", "model", "deployment"):  # about one model
        got = {(p.bucket, p.group): p.totals for p in reader.series(since, until, step, by, model="m-small")}  # type: ignore[arg-type]
        assert got == ref.series(records, since, until, step, by, NOW, model="m-small"), by
    for by in ("team", "key", "model", "deployment", "user", "day"):
        rows = reader.breakdown(since, until, by)  # type: ignore[arg-type]
        assert [b.totals.cost_micros for b in rows] == sorted((b.totals.cost_micros for b in rows), reverse=True)
        got_b = {b.group: (b.totals, b.extra["unpriced_requests"]) for b in rows}
        assert got_b == ref.breakdown(records, since, until, by, NOW), by
    assert reader.errors(since, until) == ref.errors(records, since, until, NOW)


def test_series_points_are_bucket_starts_within_the_window(loaded: LogBackend) -> None:
    reader = loaded.reader()
    until = (NOW // 900 + 1) * 900
    pts = reader.series(until - DAY, until, 900, "team")
    assert pts and all(p.bucket % 900 == 0 and until - DAY <= p.bucket < until for p in pts)
    assert pts == sorted(pts, key=lambda p: (p.bucket, p.group))


def test_breakdown_by_key_names_keys_and_tells_same_names_apart(loaded: LogBackend) -> None:
    rows = {b.group: b.extra["key_id"] for b in loaded.reader().breakdown(0, NOW + DAY, "key")}
    assert rows["alpha"] == "k-a1" and rows["beta"] == "k-a2"
    assert rows["gamma (k-b1)"] == "k-b1" and rows["gamma (k-b2)"] == "k-b2"
    assert rows["k-c1"] == "k-c1"  # no name: its id
    assert rows["-"] is None  # no key


@pytest.mark.parametrize("since,until,step", WINDOWS)
def test_latency_percentiles_within_the_error_bound(loaded: LogBackend, records: list[dict[str, Any]],
                                                   since: float, until: float, step: int) -> None:
    reader = loaded.reader()
    for model in (None, "m-big"):
        exact = ref.latency(records, since, until, step, NOW, model=model)
        got = reader.latency(since, until, step, model=model)
        assert [p.bucket for p in got] == sorted(exact)
        for p in got:
            e = exact[p.bucket]
            assert p.requests == e["requests"]
            for f in ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "ttft_p50_ms", "ttft_p95_ms",
                      "ttft_p99_ms", "overhead_p50_ms", "overhead_p99_ms"):
                assert ref.within_bound(getattr(p, f), e[f], rollups.ALPHA, rollups.MIN_MS), (p.bucket, f, getattr(p, f), e[f])


def test_whole_window_percentiles(loaded: LogBackend, records: list[dict[str, Any]]) -> None:
    """The dashboard asks for one bucket as long as the window."""
    reader = loaded.reader()
    for span in (DAY, 7 * DAY, 30 * DAY):
        got = reader.latency(NOW - span, NOW, span)
        exact = ref.latency(records, NOW - span, NOW, span, NOW)
        assert {p.bucket for p in got} == set(exact) and 1 <= len(got) <= 2
        for p in got:
            assert ref.within_bound(p.latency_p99_ms, exact[p.bucket]["latency_p99_ms"], rollups.ALPHA, rollups.MIN_MS)


@pytest.mark.parametrize("scope,value", [("key", "k-a1"), ("key", "k-b2"), ("team", "team-b"), ("user", "u2")])
def test_spend_since_is_exact(loaded: LogBackend, records: list[dict[str, Any]], scope: str, value: str) -> None:
    reader = loaded.reader()
    col = {"key": "key_id", "team": "team", "user": "user_id"}[scope]
    for since in (NOW - 3600 + 0.123, NOW - 3 * DAY - 17.5, NOW - 25 * DAY + 1, NOW - 60 * DAY, NOW - 59.9):
        want = sum(r["cost_micros"] or 0 for r in records if r[col] == value and r["ts"] >= since)
        assert reader.spend_since(scope, value, since) == want, since  # type: ignore[arg-type]
    assert reader.spend_since(scope, "nobody", NOW - DAY) == 0  # type: ignore[arg-type]


# -- reading: rows ------------------------------------------------------------------------------------


def _expected(records: list[dict[str, Any]], pred: Any) -> list[str]:
    return [r["id"] for r in sorted((r for r in records if pred(r)), key=lambda r: (r["ts"], r["id"]), reverse=True)]


FILTERS: list[tuple[RequestFilter, Any]] = [
    (RequestFilter(), lambda r: True),
    (RequestFilter(since=NOW - DAY, until=NOW - 3600), lambda r: NOW - DAY <= r["ts"] < NOW - 3600),
    (RequestFilter(model="m-big"), lambda r: r["model"] == "m-big"),
    (RequestFilter(team="team-a", status="error"), lambda r: r["team"] == "team-a" and r["status"] >= 400),
    (RequestFilter(key="gamma"), lambda r: r["key_name"] == "gamma"),  # a name two keys share
    (RequestFilter(key="k-a2"), lambda r: r["key_id"] == "k-a2"),
    (RequestFilter(key="no-such-key"), lambda r: False),
    (RequestFilter(user="u1", status="ok"), lambda r: r["user_id"] == "u1" and r["status"] < 400),
    (RequestFilter(error_code="rate_limited"), lambda r: r["error_code"] == "rate_limited"),
    (RequestFilter(cache="hit"), lambda r: r["cache_status"] == "hit"),
    (RequestFilter(cache="miss", model="m-small", since=NOW - 3 * DAY), lambda r: r["cache_status"] == "miss"
     and r["model"] == "m-small" and r["ts"] >= NOW - 3 * DAY),
]


@pytest.mark.parametrize("i", range(len(FILTERS)))
def test_search_pages_through_every_match_newest_first(loaded: LogBackend, records: list[dict[str, Any]], i: int) -> None:
    flt, pred = FILTERS[i]
    reader = loaded.reader()
    want = _expected(records, pred)
    got: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = reader.search(flt, limit=97, cursor=cursor)
        assert len(page.rows) <= 97
        assert all("content" not in row for row in page.rows)
        got += [row["id"] for row in page.rows]
        pages += 1
        cursor = page.next_cursor
        if cursor is None:
            break
    assert got == want
    assert pages == max(1, -(-len(want) // 97))


def test_search_by_request_id(loaded: LogBackend, records: list[dict[str, Any]]) -> None:
    reader = loaded.reader()
    rid = records[123]["id"]
    assert [r["id"] for r in reader.search(RequestFilter(request_id=rid)).rows] == [rid]
    prefix = rid[:8]  # "r-000123" ... matches r-00012x, r-0001230.. ids
    got = [r["id"] for r in reader.search(RequestFilter(request_id=prefix), limit=1000).rows]
    assert got == _expected(records, lambda r: r["id"].startswith(prefix)) and rid in got
    assert reader.search(RequestFilter(request_id="r-00")).rows == []  # too short for a prefix: exact only
    assert reader.search(RequestFilter(request_id="zz-nothing")).rows == []


def test_search_rows_hold_every_column_but_content(loaded: LogBackend, records: list[dict[str, Any]]) -> None:
    rec = max(records, key=lambda r: r["ts"])
    row = loaded.reader().search(RequestFilter(), limit=1).rows[0]
    assert row == {c: rec[c] for c in RECORD_COLUMNS if c != "content"}


def test_a_bad_cursor_is_a_clear_error(loaded: LogBackend) -> None:
    reader = loaded.reader()
    for bad in ("nonsense!", "WzEsMl0", "e30"):
        with pytest.raises(InvalidRequestError) as info:
            reader.search(RequestFilter(), cursor=bad)
        assert info.value.param == "cursor"


def test_get_decodes_content_and_annotations(loaded: LogBackend, records: list[dict[str, Any]]) -> None:
    reader = loaded.reader()
    rec = next(r for r in records if r["content"] and r["annotations"])
    got = reader.get(rec["id"])
    assert got is not None
    assert got["content"] == orjson.loads(rec["content"]) and got["annotations"] == orjson.loads(rec["annotations"])
    assert {k: v for k, v in got.items() if k not in ("content", "annotations")} == {
        c: rec[c] for c in RECORD_COLUMNS if c not in ("content", "annotations")}
    plain = next(r for r in records if not r["content"] and not r["annotations"])
    got = reader.get(plain["id"])
    assert got is not None and got["content"] is None and got["annotations"] is None
    assert reader.get("no-such-id") is None


def test_an_empty_or_missing_log_reads_as_empty(log_backend: LogBackend) -> None:
    reader = log_backend.reader()  # before any writer created the tables
    assert reader.totals(0, NOW) == Totals()
    assert reader.series(0, NOW, 3600, "team") == [] and reader.latency(0, NOW, 3600) == []
    assert reader.breakdown(0, NOW, "key") == [] and reader.errors(0, NOW) == []
    assert reader.spend_since("team", "x", 0) == 0
    assert reader.search(RequestFilter()).rows == [] and reader.get("x") is None
    log_backend.store()  # creates the tables
    assert reader.totals(0, NOW) == Totals() and reader.search(RequestFilter()).next_cursor is None


def test_readers_are_usable_from_many_threads(loaded: LogBackend, records: list[dict[str, Any]]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    reader = loaded.reader()
    want = ref.totals(records)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: reader.totals(0, NOW + DAY), range(40)))
    assert all(r == want for r in results)


# -- retention -----------------------------------------------------------------------------------------


def test_retention_deletes_old_rows_and_rollups_in_batches(log_backend: LogBackend, records: list[dict[str, Any]]) -> None:
    store = log_backend.store(retention_days=10)
    store.prune_batch = 100
    _load(store, records)
    cutoff = (NOW - 10 * DAY) // DAY * DAY  # whole UTC days
    old = [r for r in records if r["ts"] < cutoff]
    kept = [r for r in records if r["ts"] >= cutoff]
    assert len(old) > 300 and kept

    deleted: list[tuple[str, int]] = []
    real = store._delete_batch  # noqa: SLF001

    def spy(table: Any, where: str, params: Any) -> int:
        n = real(table, where, params)
        deleted.append((table.name, n))
        return n

    store._delete_batch = spy  # type: ignore[method-assign]  # noqa: SLF001
    calls = 0
    while store.maintain():
        calls += 1
        assert calls < 1000
    request_batches = [n for t, n in deleted if t == "requests"]
    assert sum(request_batches) == len(old) and max(request_batches) <= 100 and len(request_batches) >= 4
    assert all(n <= 100 for _, n in deleted)

    assert set(_ids(log_backend)) == {r["id"] for r in kept}
    assert log_backend.sql("SELECT COUNT(*) FROM rollup WHERE bucket < ?", (cutoff,)) == [(0,)]
    assert log_backend.sql("SELECT COUNT(*) FROM rollup_latency WHERE bucket < ?", (cutoff,)) == [(0,)]
    # Levels kept a few days only are gone beyond their horizon; the rest still adds up.
    for lv in rollups.LEVELS:
        if lv.keep_s:
            assert log_backend.sql("SELECT COUNT(*) FROM rollup WHERE grain = ? AND bucket < ?",
                                   (lv.grain, NOW - lv.keep_s - lv.grain)) == [(0,)]
    reader = log_backend.reader()
    assert reader.totals(0, NOW + DAY) == ref.totals(kept)
    assert reader.totals(NOW - 7 * DAY, NOW) == ref.totals(ref.window(records, NOW - 7 * DAY, NOW, NOW)[1])
    assert store.maintain() is False  # nothing left


def test_maintain_stops_at_its_time_budget(log_backend: LogBackend, records: list[dict[str, Any]]) -> None:
    store = log_backend.store(retention_days=1)
    _load(store, records)
    store.prune_batch = 10
    store.maintain_budget_s = 0.0
    assert store.maintain() is True  # more to do: it gave up after its budget
    store.maintain_budget_s = 60.0
    while store.maintain():
        pass
    cutoff = (NOW - DAY) // DAY * DAY
    assert set(_ids(log_backend)) == {r["id"] for r in records if r["ts"] >= cutoff}


def test_retention_zero_keeps_everything(log_backend: LogBackend) -> None:
    store = log_backend.store(retention_days=0)
    recs = ref.make_records(200, NOW, seed=12, span_s=400 * DAY)
    _load(store, recs)
    while store.maintain():
        pass
    assert len(_ids(log_backend)) == 200
    assert log_backend.reader().totals(0, NOW + DAY) == ref.totals(recs)


def test_rollup_rows_per_level_add_up(loaded: LogBackend, records: list[dict[str, Any]]) -> None:
    """Every level kept as long as the rows holds every row once, in every dimension."""
    per_dim: dict[str, int] = defaultdict(int)
    for lv in rollups.LEVELS:
        if lv.keep_s is None:
            for dim, n in loaded.sql("SELECT dim, SUM(requests) FROM rollup WHERE grain = ? GROUP BY dim", (lv.grain,)):
                per_dim[f"{lv.grain}:{dim}"] = int(n)
            for dim in ("all", "all/model", "team", "team/model", "key", "key/model", "deployment"):
                assert per_dim[f"{lv.grain}:{dim}"] == len(records)
            assert per_dim[f"{lv.grain}:error"] == sum(r["status"] >= 400 for r in records)
            assert per_dim[f"{lv.grain}:user"] == sum(1 for r in records if r["user_id"])
