"""Pure parts of the request log: window plans over rollup levels, histogram bins, record checks."""

from __future__ import annotations

import math
import random

import pytest

from setpoint.logstore import rollups
from setpoint.logstore.rows import to_row
from setpoint.logstore.sql_schema import RECORD_COLUMNS
from setpoint.logstore.windows import align_step, finest_grain_at, plan

NOW = 1_790_000_000.0
DAY = 86_400


def _check_plan(since: float, until: float, step: int | None) -> None:
    p = plan(since, until, NOW, step)
    if not p.segments:
        assert until <= since
        return
    # contiguous, aligned, covering exactly [start, end), which contains [since, until)
    assert p.start <= since and p.end >= until
    edge = p.start
    for s in p.segments:
        assert s.lo == edge and s.lo < s.hi
        assert s.lo % s.grain == 0 and s.hi % s.grain == 0
        edge = s.hi
    assert edge == p.end
    # the widening is less than the finest grain kept at each end
    assert since - p.start < finest_grain_at(since, NOW) and p.end - until < finest_grain_at(until, NOW)
    # a grain kept for a few days is only used where it is still kept
    for s in p.segments:
        for lv in rollups.LEVELS:
            if lv.grain == s.grain and lv.keep_s:
                assert s.lo >= NOW - lv.keep_s
    # with a step: every bucket falls inside one chart point, unless only a coarser grain is kept there
    if step:
        for s in p.segments:
            assert step % s.grain == 0 or s.grain == finest_grain_at(s.lo, NOW)
    assert len(p.segments) <= 10


def test_plans_cover_windows_exactly() -> None:
    rnd = random.Random(5)
    for _ in range(3000):
        a = NOW - rnd.uniform(-DAY, 60 * DAY)
        b = a + rnd.choice([rnd.uniform(0, 120), rnd.uniform(0, DAY), rnd.uniform(0, 40 * DAY)])
        _check_plan(a, b, rnd.choice([None, 60, 300, 900, 3600, 7200, 6 * 3600, DAY, 7 * DAY, 30 * DAY]))


def test_long_windows_read_few_buckets() -> None:
    p = plan(NOW - 30 * DAY, NOW, NOW)
    by_grain: dict[int, int] = {}
    for s in p.segments:
        by_grain[s.grain] = by_grain.get(s.grain, 0) + (s.hi - s.lo) // s.grain
    assert sum(by_grain.values()) < 120  # ~29 days + < 24 hours + < 60 minutes at the edges
    assert plan(0, NOW, NOW).segments[0].grain == DAY


def test_align_step() -> None:
    assert [align_step(s) for s in (1, 60, 61, 900, 7 * DAY)] == [60, 60, 120, 900, 7 * DAY]


def test_histogram_bins_bound_the_error() -> None:
    rnd = random.Random(1)
    for _ in range(20000):
        v = math.exp(rnd.uniform(math.log(rollups.MIN_MS), math.log(1e7)))
        est = rollups.bin_value(rollups.bin_of(v))
        assert abs(est - v) <= rollups.ALPHA * v * (1 + 1e-9)
    assert rollups.bin_of(0.0) == rollups.bin_of(-5.0) == 0 and rollups.bin_value(0) == 0.0
    assert rollups.percentile([], 0.5) is None
    assert rollups.percentile([(3, 1), (10, 99)], 0.01) == rollups.bin_value(3)
    assert rollups.percentile([(3, 1), (10, 99)], 0.02) == rollups.bin_value(10)


def test_to_row_checks_and_normalises() -> None:
    rec = {"id": "a", "ts": 5, "endpoint": "chat", "status": 200.0, "is_stream": True, "cost_micros": None,
           "prompt_tokens": None, "user_id": "x\x00y", "unknown": object()}
    row = dict(zip(RECORD_COLUMNS, to_row(rec), strict=True))
    assert row["ts"] == 5.0 and type(row["ts"]) is float
    assert row["status"] == 200 and type(row["status"]) is int and row["is_stream"] == 1
    assert row["prompt_tokens"] == 0 and row["cost_micros"] is None and row["user_id"] == "x\ufffdy"
    positional = [rec["id"], 1.5, "chat"] + [None] * (len(RECORD_COLUMNS) - 5)
    positional[RECORD_COLUMNS.index("status")] = 201
    assert to_row(positional)[RECORD_COLUMNS.index("status")] == 201  # an older, shorter record
    for bad, match in [
        ({"id": "a", "endpoint": "c", "status": 1}, "NOT NULL constraint failed: requests.ts"),
        ({"id": "a", "ts": 1, "endpoint": "c", "status": "ok"}, "status must be an integer"),
        ({"id": "a", "ts": 1, "endpoint": "c", "status": 1, "team": 7}, "team must be a string"),
        ({"id": "a", "ts": float("nan"), "endpoint": "c", "status": 1}, "finite"),
        ({"id": "a", "ts": 1, "endpoint": "c", "status": 1, "cost_micros": 2 ** 64}, "64-bit"),
        ({"id": "a", "ts": 1, "endpoint": "c", "status": 1.5}, "integer"),
        ([1, 2], "positional record has 2 fields"),
        ("text", "JSON object or array"),
    ]:
        with pytest.raises(ValueError, match=match):
            to_row(bad)  # type: ignore[arg-type]
