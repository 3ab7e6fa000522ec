"""Formatting and query parsing of the dashboard, without a server."""

from __future__ import annotations

import calendar

import pytest

from setpoint.dashboard import data
from setpoint.dashboard.fmt import count, duration, ms, usd, utc


@pytest.mark.parametrize(("micros", "text"), [
    (None, "—"), (0, "$0.00"), (1, "$0.000001"), (835, "$0.000835"), (9_999, "$0.009999"), (10_000, "$0.01"),
    (1_234_567_890, "$1,234.57"), (-2_500_000, "-$2.50"), (4_200, "$0.0042"),
])
def test_usd(micros, text) -> None:
    assert usd(micros) == text


def test_other_formats() -> None:
    assert (ms(None), ms(3.04), ms(231.4), ms(1500), ms(12_345)) == ("—", "3.0 ms", "231 ms", "1.50 s", "12.3 s")
    assert (count(None), count(1234567)) == ("—", "1,234,567")
    assert utc(0) == "1970-01-01 00:00:00Z"
    assert (duration(30), duration(600), duration(5 * 3600), duration(3 * 86400)) == ("30 s", "10 min", "5.0 h", "3.0 d")


def test_time_range_is_bucket_aligned() -> None:
    now = 1_800_000_123.4
    for name, (span, bucket) in data.RANGES.items():
        tr = data.time_range(name, now)
        assert tr.since % bucket == 0 and tr.until % bucket == 0
        assert tr.until - tr.since == span and tr.since < now < tr.until
    assert data.time_range("bogus", now).name == "24h"


def test_parse_filter() -> None:
    flt, form, problems = data.parse_filter(
        {"model": " chat-a ", "status": "error", "cache": "hit", "id": "req_0123", "range": "24h", "junk": "x"}, 1000.0)
    assert (flt.model, flt.status, flt.cache, flt.request_id, flt.since) == ("chat-a", "error", "hit", "req_0123", 1000.0 - 86400)
    assert problems == [] and form["model"] == "chat-a" and "junk" not in form
    flt, form, problems = data.parse_filter({"status": "maybe", "cache": "warm", "id": "abc", "range": "1y"}, 0.0)
    assert (flt.status, flt.cache, flt.request_id, flt.since) == (None, None, None, None)
    assert len(problems) == 4 and form["status"] == form["cache"] == form["range"] == ""


def test_period_bounds() -> None:
    t = calendar.timegm((2026, 2, 14, 15, 30, 0))
    assert data.period_bounds("daily", t) == (calendar.timegm((2026, 2, 14, 0, 0, 0)), calendar.timegm((2026, 2, 15, 0, 0, 0)))
    assert data.period_bounds("monthly", t) == (calendar.timegm((2026, 2, 1, 0, 0, 0)), calendar.timegm((2026, 3, 1, 0, 0, 0)))
    assert data.period_bounds("total", t) == (None, None)
