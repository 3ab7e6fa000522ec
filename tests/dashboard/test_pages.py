"""Dashboard pages and JSON over a real request log: `seeded_gateway` starts on a SQLite log holding
`log_records`, stored by the real writer, and its dashboard reads it through the real reader
(rollups). Every expected number is computed here from those records: sums, counts and filters
exactly; percentiles within the rollups' stated bound (10%, docs/request-log.md)."""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter, defaultdict
from dataclasses import asdict
from html import unescape
from typing import Any

import pytest

import setpoint.dashboard as dashboard_pkg
from setpoint.dashboard import fmt
from setpoint.dashboard.data import RANGES, REQUEST_RANGES, period_bounds
from setpoint.logstore.rollups import ALPHA, MIN_MS
from setpoint.logstore.sql_schema import RECORD_COLUMNS
from setpoint.logstore.sqlite_reader import SqliteLogReader

from logstore import reference as ref

from .conftest import dashboard_config, seed_log

PAGE = 50  # rows per page of the request list


def _in(rows: list[dict[str, Any]], since: float, until: float) -> list[dict[str, Any]]:
    return [r for r in rows if since <= r["ts"] < until]


def _newest_first(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (r["ts"], r["id"]), reverse=True)


def _listed(r: dict[str, Any]) -> dict[str, Any]:
    """A record as the request list returns it (every column but `content`)."""
    return {k: v for k, v in r.items() if k != "content"}


def _cost(rows: list[dict[str, Any]]) -> int:
    return sum(r["cost_micros"] or 0 for r in rows)


def _cells(html: str, col: str) -> list[str]:
    return [unescape(m).strip() for m in re.findall(rf'<td[^>]*data-col="{col}"[^>]*>(.*?)</td>', html, re.S)]


def _within_bound(estimate: float | None, exact: float | None) -> bool:
    return ref.within_bound(estimate, exact, ALPHA, MIN_MS)


def _error_counts(rows: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """(code, count) of the error records, most frequent first; "-" for an error without a code."""
    c = Counter(r["error_code"] or "-" for r in rows if r["status"] >= 400)
    return sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))


def test_summary_matches_the_records(seeded_gateway, ui, log_records) -> None:
    c = ui(seeded_gateway)
    for range_, (span, _) in RANGES.items():
        s = c.get("/ui/api/summary", params={"range": range_}).json()
        assert (s["range"], s["until"] - s["since"]) == (range_, span)
        rows = _in(log_records, s["since"], s["until"])
        t = s["totals"]
        assert {k: v for k, v in t.items() if k != "error_rate"} == asdict(ref.totals(rows))
        assert t["requests"] == len(rows) > 0
        assert t["errors"] == sum(r["status"] >= 400 for r in rows) > 0
        assert t["cost_micros"] == _cost(rows) > 0
        assert t["saved_micros"] == sum(r["saved_micros"] or 0 for r in rows) > 0
        assert t["cache_hits"] == sum(r["cache_status"] == "hit" for r in rows) > 0
        assert t["error_rate"] == pytest.approx(t["errors"] / t["requests"])
        assert [(e["code"], e["count"]) for e in s["errors_by_code"]] == _error_counts(rows)
        # whole-window percentiles from the latency histograms, within the bound of the exact ones
        lat = [r["latency_ms"] for r in rows]
        ttft = [r["ttft_ms"] for r in rows if r["ttft_ms"] is not None]
        over = [r["latency_ms"] - r["upstream_ms"] for r in rows if r["upstream_ms"] is not None]
        p = s["latency"]
        for got, values, q in ((p["p50_ms"], lat, 0.5), (p["p95_ms"], lat, 0.95), (p["p99_ms"], lat, 0.99),
                               (p["ttft_p50_ms"], ttft, 0.5), (p["ttft_p99_ms"], ttft, 0.99),
                               (p["overhead_p50_ms"], over, 0.5)):
            exact = ref.nearest_rank(values, q)
            assert exact is not None and _within_bound(got, exact), (range_, q, got, exact)
        assert p["p50_ms"] <= p["p95_ms"] <= p["p99_ms"]


def test_overview_page_shows_the_tiles(seeded_gateway, ui, log_records) -> None:
    c = ui(seeded_gateway)
    html = c.get("/ui").text
    s = c.get("/ui/api/summary").json()  # the same (default) window: 24h
    rows = _in(log_records, s["since"], s["until"])
    errors = sum(r["status"] >= 400 for r in rows)
    tiles = dict(re.findall(r'data-tile="(\w+)">([^<]*)<', html))
    assert tiles["requests"] == f"{len(rows):,}" and len(rows) > 1000  # thousands separator
    assert tiles["error_rate"] == f"{100 * errors / len(rows):.2f}%"
    assert tiles["spend"] == fmt.usd(_cost(rows)) and re.fullmatch(r"\$\d[\d,]*\.\d\d", tiles["spend"])
    assert tiles["saved"] == fmt.usd(sum(r["saved_micros"] or 0 for r in rows))
    assert tiles["p50"] == fmt.ms(s["latency"]["p50_ms"]) and tiles["p99"] == fmt.ms(s["latency"]["p99_ms"])
    assert re.fullmatch(r"\d+ ms|\d\.\d\d s", tiles["p50"])
    # the charts' data comes with the page, the same as the series endpoint's
    embedded = re.search(r'<script type="application/json" id="series-data">(.*?)</script>', html, re.S).group(1)
    assert json.loads(embedded) == c.get("/ui/api/series", params={"range": "24h", "by": "team"}).json()
    assert 'data-series-url="/ui/api/series?range=24h&amp;by=team"' in html
    for code, n in _error_counts(rows):  # errors by code
        assert re.search(rf'<code>{re.escape(code)}</code></a></td>\s*<td class="num">{n:,}</td>', html), code
    for r in RANGES:
        assert f"range={r}" in html


@pytest.mark.parametrize("range_", list(RANGES))
@pytest.mark.parametrize("by", ["team", "key", "model", "deployment"])
def test_series_json_shape(seeded_gateway, ui, log_records, range_, by) -> None:
    c = ui(seeded_gateway)
    d = c.get("/ui/api/series", params={"range": range_, "by": by}).json()
    span, bucket = RANGES[range_]
    assert (d["range"], d["by"], d["bucket_s"]) == (range_, by, bucket)
    n = len(d["x"])
    assert n == span // bucket and d["x"][0] == d["since"] and d["x"][-1] + bucket == d["until"]
    assert all(b - a == bucket for a, b in zip(d["x"], d["x"][1:]))
    for col in (*d["traffic"].values(), d["spend"]["total"], d["spend"]["saved"], *d["spend"]["values"], *d["latency"].values()):
        assert len(col) == n
    # every column, point by point, from the records in each point
    pos = {x: i for i, x in enumerate(d["x"])}
    want: dict[str, list[int]] = {k: [0] * n for k in ("requests", "errors", "cache_hits", "total", "saved")}
    for r in _in(log_records, d["since"], d["until"]):
        i = pos[math.floor(r["ts"] / bucket) * bucket]
        want["requests"][i] += 1
        want["errors"][i] += r["status"] >= 400
        want["cache_hits"][i] += r["cache_status"] == "hit"
        want["total"][i] += r["cost_micros"] or 0
        want["saved"][i] += r["saved_micros"] or 0
    assert d["traffic"] == {k: want[k] for k in ("requests", "errors", "cache_hits")}
    assert (d["spend"]["total"], d["spend"]["saved"]) == (want["total"], want["saved"])
    assert d["points"] == sum(1 for v in want["requests"] if v) > 0
    # spend by group: the 8 biggest spenders, the rest summed as "other" (last); no group that spent nothing
    by_group: dict[str, list[int]] = defaultdict(lambda: [0] * n)
    for (x, group), totals in ref.series(log_records, d["since"], d["until"], bucket, by, time.time()).items():
        by_group[group][pos[x]] += totals.cost_micros
    spent = {g: sum(v) for g, v in by_group.items() if sum(v) > 0}
    assert d["spend"]["groups"] == sorted(spent, key=lambda g: (g == "other", -spent[g], g))
    assert d["spend"]["values"] == [by_group[g] for g in d["spend"]["groups"]]
    assert len(d["spend"]["groups"]) <= 9
    if by == "key":  # ten keys spent: the two smallest are "other"; a name two keys share is told apart
        assert d["spend"]["groups"][-1] == "other"
        assert {"delta (cfg:delta)", "delta (key_fedcba9876543210)"} <= set(by_group)
    for i in range(n):  # the stacked groups add up to the total spend in every bucket
        assert sum(v[i] for v in d["spend"]["values"]) == d["spend"]["total"][i]
    # latency percentiles per point: within the histograms' error bound of the exact ones
    exact = ref.latency(log_records, d["since"], d["until"], bucket, time.time())
    cols = {"p50": "latency_p50_ms", "p95": "latency_p95_ms", "p99": "latency_p99_ms",
            "ttft_p50": "ttft_p50_ms", "ttft_p95": "ttft_p95_ms", "ttft_p99": "ttft_p99_ms"}
    for i, x in enumerate(d["x"]):
        e = exact.get(x)
        for col, name in cols.items():
            got = d["latency"][col][i]
            if e is None:
                assert got is None, (col, x)
            else:
                assert _within_bound(got, e[name]), (col, x, got, e[name])


def test_unknown_range_and_by_fall_back_to_defaults(seeded_gateway, ui, log_records) -> None:
    d = ui(seeded_gateway).get("/ui/api/series", params={"range": "1y", "by": "password"}).json()
    assert (d["range"], d["by"], d["bucket_s"]) == ("24h", "team", 900)
    assert sum(d["traffic"]["requests"]) == len(_in(log_records, d["since"], d["until"]))


def _matches(r: dict[str, Any], flt: dict[str, str], now: float) -> bool:
    """What a request-list filter means, on one record."""
    return all((
        "model" not in flt or r["model"] == flt["model"],
        "team" not in flt or r["team"] == flt["team"],
        "key" not in flt or flt["key"] in (r["key_id"], r["key_name"]),
        "user" not in flt or r["user_id"] == flt["user"],
        "status" not in flt or (r["status"] >= 400) == (flt["status"] == "error"),
        "error_code" not in flt or r["error_code"] == flt["error_code"],
        "cache" not in flt or r["cache_status"] == flt["cache"],  # no cache status: neither hit nor miss
        "range" not in flt or r["ts"] >= now - REQUEST_RANGES[flt["range"]],
    ))


@pytest.mark.parametrize("flt", [
    {"team": "research", "status": "error"},
    {"model": "chat-b", "key": "beta"},  # a key by name
    {"key": "cfg:gamma", "user": "ann"},  # a key by id
    {"key": "delta"},  # a name two keys share: both
    {"cache": "hit"},
    {"cache": "miss"},  # a request without a cache status (no cache on its model) is not a miss
    {"error_code": "upstream_unavailable", "range": "24h"},
    {"status": "ok", "cache": "miss", "model": "chat-a"},
    {"team": "ops", "range": "1h"},
])
def test_request_filters_are_applied(seeded_gateway, ui, log_records, flt) -> None:
    c = ui(seeded_gateway)
    data = c.get("/ui/api/requests", params=flt).json()
    want = _newest_first([r for r in log_records if _matches(r, flt, time.time())])
    assert want, flt
    assert data["filter"] == flt
    assert data["data"] == [_listed(r) for r in want[:PAGE]]  # the newest matches, every column but content
    assert (data["next_cursor"] is not None) == (len(want) > PAGE)
    if flt.get("key") == "delta":
        assert {r["key_id"] for r in data["data"]} == {"cfg:delta", "key_fedcba9876543210"}
    html = c.get("/ui/requests", params=flt).text
    assert re.findall(r'data-id="([^"]+)"', html) == [r["id"] for r in want[:PAGE]]
    if "team" in flt:
        assert set(_cells(html, "team")) == {flt["team"]}
    if "model" in flt:
        assert {m.split("<")[0].strip() for m in _cells(html, "model")} == {flt["model"]}
    if "key" in flt:
        assert set(_cells(html, "key")) == {r["key_name"] for r in want[:PAGE]}
    for value in flt.values():  # the form shows the filter back
        assert f'value="{value}"' in html or f'value="{value}" selected' in html


def test_request_id_prefix(seeded_gateway, ui, log_records) -> None:
    c = ui(seeded_gateway)
    target = log_records[0]["id"]
    want = [r["id"] for r in _newest_first(log_records) if r["id"].startswith(target[:12])]
    assert want == [target]
    assert [r["id"] for r in c.get("/ui/api/requests", params={"id": target[:12]}).json()["data"]] == want
    assert [r["id"] for r in c.get("/ui/api/requests", params={"id": target}).json()["data"]] == want
    assert c.get("/ui/api/requests", params={"id": target[:12] + "x"}).json()["data"] == []
    r = c.get("/ui/api/requests", params={"id": "req"})
    assert r.status_code == 400 and "6 characters" in r.json()["error"]["message"]
    page = c.get("/ui/requests", params={"id": "req"})
    assert page.status_code == 400 and "6 characters" in page.text


def test_pagination_walks_every_matching_row_once(seeded_gateway, ui, log_records) -> None:
    c = ui(seeded_gateway)
    flt = {"team": "research"}
    want = _newest_first([r for r in log_records if r["team"] == "research"])
    assert len(want) > 2 * PAGE
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        d = c.get("/ui/api/requests", params={**flt, **({"cursor": cursor} if cursor else {})}).json()
        seen += [r["id"] for r in d["data"]]
        pages += 1
        cursor = d["next_cursor"]
        if cursor is None:
            break
    assert seen == [r["id"] for r in want]
    assert pages == -(-len(want) // PAGE)
    # the HTML page links "Older" with the filters kept
    html = c.get("/ui/requests", params=flt).text
    older = unescape(re.search(r'href="([^"]+)" rel="next" id="older"', html).group(1))
    assert "team=research" in older and "cursor=" in older
    second = c.get(older).text
    assert "« Newest" in second
    assert re.findall(r'data-id="([^"]+)"', second) == seen[PAGE : 2 * PAGE]


def test_request_detail_and_404(seeded_gateway, ui, log_records) -> None:
    c = ui(seeded_gateway)
    row = next(r for r in log_records if r["status"] >= 400 and r["annotations"] and r["content"])
    html = c.get(f"/ui/requests/{row['id']}").text
    for col in RECORD_COLUMNS:
        if col not in ("annotations", "content"):
            assert f"<th scope=\"row\">{col}</th>" in html
    assert row["error_code"] in html and row["id"] in html and row["deployment"] in html
    assert f'"route": "{row["deployment"]}"' in unescape(html)  # annotations
    content = json.loads(row["content"])
    assert f'<span class="role">user</span><pre>{content["request"]["messages"][0]["content"]}</pre>' in html
    # JSON: every column as stored, annotations and content decoded
    api = c.get(f"/ui/api/requests/{row['id']}").json()
    assert api == {**row, "annotations": json.loads(row["annotations"]), "content": content}
    ok = next(r for r in log_records if r["status"] == 200 and r["content"] and r["saved_micros"])
    html = c.get(f"/ui/requests/{ok['id']}").text
    assert f'<span class="role">output</span><pre>{json.loads(ok["content"])["output"]}</pre>' in html
    assert f"saved {fmt.usd(ok['saved_micros'])}" in html
    missing = c.get("/ui/requests/req_does_not_exist")
    assert missing.status_code == 404 and "req_does_not_exist" in missing.text
    assert c.get("/ui/api/requests/req_does_not_exist").status_code == 404


def test_html_is_escaped(seeded_gateway, ui, log_records) -> None:
    c = ui(seeded_gateway)
    evil_team = "</script><script>alert(1)</script>"
    now = time.time()
    base = next(r for r in log_records if r["status"] == 200)
    evil = {**base, "id": "req_evil00000001", "ts": now - 30, "team": evil_team, "key_name": "<b>k</b>",
            "cost_micros": 10 ** 9}  # the biggest spender: on the chart
    seed_log(seeded_gateway.server.gateway.request_log.db_path, [evil], now)  # into the running gateway's log
    assert c.get("/ui/api/series").json()["spend"]["groups"][0] == evil_team
    overview = c.get("/ui").text
    assert "</script><script>alert(1)" not in overview
    assert "\\u003c/script>\\u003cscript>alert(1)\\u003c/script>" in overview
    html = c.get("/ui/requests", params={"team": evil_team}).text
    assert re.findall(r'data-id="([^"]+)"', html) == [evil["id"]]
    assert "<script>alert(1)" not in html and "<b>k</b>" not in html
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;b&gt;k&lt;/b&gt;" in html
    detail = c.get(f"/ui/requests/{evil['id']}").text
    assert "<script>alert(1)" not in detail and "&lt;script&gt;" in detail
    img = "<img src=x onerror=alert(1)>"
    page = c.get(f"/ui/requests/{img}")
    assert page.status_code == 404 and img not in page.text and "&lt;img" in page.text


def test_budgets_show_limit_spent_and_burn_rate(seeded_gateway, ui, log_records) -> None:
    c = ui(seeded_gateway)
    d = c.get("/ui/api/budgets").json()
    now = d["now"]
    assert d["ledger_available"] is True and d["notes"] == []
    day_start, day_end = period_bounds("daily", now)
    today = [r for r in log_records if r["ts"] >= day_start]
    # rule 0 (each team, daily): the teams that used the gateway today, biggest spenders first
    spent_today = {t: _cost([r for r in today if r["team"] == t]) for t in {r["team"] for r in today if r["team"]}}
    team_rows = [b for b in d["budgets"] if b["rule"] == 0]
    assert [b["entity"] for b in team_rows] == sorted(spent_today, key=lambda t: (-spent_today[t], t))
    last_hour = [r for r in log_records if r["ts"] >= now - 3600]
    for b in team_rows:
        assert (b["limit_micros"], b["period"], b["hard"]) == (5_000_000, "daily", True)
        assert (b["period_start"], b["period_end"]) == (day_start, day_end)
        # nothing went through the ledger: spent 0 there, whatever the log says
        assert (b["spent_micros"], b["held_micros"], b["remaining_micros"]) == (0, 0, 5_000_000)
        burn = _cost([r for r in last_hour if r["team"] == b["entity"]])
        assert b["burn_micros_per_h"] == burn  # the log's spend over the last hour, exactly
        if burn:
            assert b["exhausts_in_s"] == pytest.approx(5_000_000 / burn * 3600)
            assert b["resets_first"] == (now + b["exhausts_in_s"] >= day_end)
        else:
            assert b["exhausts_in_s"] is None
    assert any(b["burn_micros_per_h"] for b in team_rows)
    (key_budget,) = [b for b in d["budgets"] if b["rule"] == 1]
    assert (key_budget["scope"], key_budget["entity"], key_budget["hard"], key_budget["period"]) == (
        "key", "cfg:all", False, "monthly")
    assert key_budget["burn_micros_per_h"] == _cost([r for r in last_hour if r["key_id"] == "cfg:all"]) > 0
    html = c.get("/ui/budgets").text
    assert "<code>research</code>" in html and "$5.00" in html
    research = next(b for b in team_rows if b["entity"] == "research")
    assert f"{fmt.usd(research['burn_micros_per_h'])}/h" in html


def test_budgets_read_spent_from_the_ledger(seeded_gateway, ui) -> None:
    """What the ledger says was spent is shown (and a hold in flight is shown apart)."""
    import asyncio

    from setpoint.policy.stages.budget import budget_line

    gw = seeded_gateway.server.gateway
    rule = gw.runtime.config.budgets[0]
    line = budget_line(0, rule, "research", time.time())
    loop = seeded_gateway._loop  # noqa: SLF001 - the state store belongs to the gateway's loop

    async def spend() -> None:
        now = time.time()
        assert (await gw.runtime.state.reserve([line], "r1", 1_500_000, now, 60)).ok
        await gw.runtime.state.settle([line], "r1", 1_250_000, now)
        assert (await gw.runtime.state.reserve([line], "r2", 300_000, now, 60)).ok

    asyncio.run_coroutine_threadsafe(spend(), loop).result(10)
    b = next(b for b in ui(seeded_gateway).get("/ui/api/budgets").json()["budgets"] if b["entity"] == "research")
    assert (b["spent_micros"], b["held_micros"], b["remaining_micros"]) == (1_250_000, 300_000, 3_450_000)
    assert b["used_fraction"] == pytest.approx(0.25)


def test_deployments_show_breaker_and_concurrency_state(seeded_gateway, ui, log_records) -> None:
    gw = seeded_gateway.server.gateway
    breaker = gw.resilience.breaker("sim/sim-large")
    for _ in range(25):
        breaker.record(ok=False)
    assert breaker.state.value == "open"
    c = ui(seeded_gateway)
    d = c.get("/ui/api/deployments").json()
    by_name = {x["name"]: x for x in d["deployments"]}
    assert set(by_name) == {"sim/sim-small", "sim/sim-large", "sim/sim-embed"}
    large = by_name["sim/sim-large"]
    assert large["breaker"]["state"] == "open" and large["breaker"]["failures"] == 20
    assert large["breaker"]["retry_after_s"] > 0
    assert d["deployments"][0]["name"] == "sim/sim-large"  # open breakers first
    assert by_name["sim/sim-small"]["breaker"]["state"] == "closed"
    assert by_name["sim/sim-small"]["concurrency"] == {"limit": 1024, "inflight": 0, "queued": 0, "queue_max": 256, "shed": 0}
    last_hour = [r for r in log_records if r["ts"] >= time.time() - 3600]
    for name, dep in by_name.items():  # the last hour's traffic, from the log
        rows = [r for r in last_hour if r["deployment"] == name]
        assert dep["last_hour"] == {"requests": len(rows), "errors": sum(r["status"] >= 400 for r in rows),
                                    "cost_micros": _cost(rows)}, name
        assert rows, name
    assert set(d["retry_budget"]) == {"requests", "retries", "allowed", "window_s"}
    html = c.get("/ui/deployments").text
    assert 'class="state open"' in html and "chat-b" in html
    small = re.search(r'<tr[^>]*data-deployment="sim/sim-small".*?</tr>', html, re.S).group(0)
    assert f'{by_name["sim/sim-small"]["last_hour"]["requests"]:,} req' in small


def test_static_assets_are_cached_and_versioned(real_gateway, ui) -> None:
    c = ui(real_gateway)
    html = c.get("/ui").text
    urls = re.findall(r'(?:src|href)="(/ui/static/[^"]+)"', html)
    assert {u.rsplit("/", 1)[1] for u in urls} >= {"app.css", "uPlot.min.css", "uPlot.iife.min.js", "charts.js"}
    for u in urls:
        r = c.get(u)
        assert r.status_code == 200, u
        assert r.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert c.get(u, headers={"If-None-Match": r.headers["etag"]}).status_code == 304
    js = next(u for u in urls if u.endswith("charts.js"))
    assert c.get(js).headers["content-type"].startswith("text/javascript")
    stale = js.replace(js.split("/")[3], "000000000000")
    assert c.get(stale).headers["cache-control"] == "public, max-age=300"
    assert c.get("/ui/static/x/../../admin/keys").status_code == 404
    assert c.get(js.rsplit("/", 1)[0] + "/nope.js").status_code == 404
    lic = c.get(js.rsplit("/", 1)[0] + "/vendor/uPlot.LICENSE")
    assert lic.status_code == 200 and "MIT License" in lic.text


def test_without_a_log_reader_pages_say_so(make_gateway, default_config, ui, monkeypatch) -> None:
    # No backend comes without a reader: the only way to reach this branch is to remove it.
    monkeypatch.setattr(dashboard_pkg, "_reader_factory", lambda gw: None)
    gw = make_gateway(dashboard_config(default_config))
    c = ui(gw)
    r = c.get("/ui")
    assert r.status_code == 503 and "log reader" in r.text
    assert c.get("/ui/api/series").status_code == 503
    d = c.get("/ui/deployments")  # live state needs no log: shown without the last hour's traffic
    assert d.status_code == 200 and "sim/sim-small" in d.text


def test_reader_is_opened_once_and_closed_with_the_gateway(default_config, anon, keys, monkeypatch, seeded_log,
                                                           tmp_path) -> None:
    import shutil

    from setpoint.config.compile import compile_config
    from setpoint.config.load import parse_config
    from setpoint.proxy.background import BackgroundGateway

    from .conftest import login

    readers: list[Any] = []
    real_factory = dashboard_pkg._reader_factory  # noqa: SLF001

    def counting(gw: Any) -> Any:
        open_real = real_factory(gw)

        def open_() -> Any:
            readers.append(open_real())
            return readers[-1]
        return open_

    monkeypatch.setattr(dashboard_pkg, "_reader_factory", counting)
    data_dir = tmp_path / "gw"
    data_dir.mkdir()
    shutil.copyfile(seeded_log.path, data_dir / "requests.db")
    cfg = dashboard_config(default_config, data_dir=str(data_dir))
    with BackgroundGateway(compile_config(parse_config(cfg, env={}))) as gw:
        c = anon(gw)
        login(c, gw.root_url, keys.master)
        for _ in range(3):
            assert c.get("/ui").status_code == 200
            s = c.get("/ui/api/summary").json()
            assert s["totals"]["requests"] == len(_in(seeded_log.records, s["since"], s["until"])) > 0
        assert len(readers) == 1 and isinstance(readers[0], SqliteLogReader)  # opened once, lazily
        assert readers[0].path == data_dir / "requests.db"
    with pytest.raises(RuntimeError, match="closed"):  # closed with the gateway
        readers[0].totals(0, time.time())


@pytest.mark.parametrize("fails", ["reading", "opening", "backend"])
def test_a_failing_log_store_gives_503_not_a_crash(make_gateway, default_config, ui, monkeypatch, caplog, free_port,
                                                   tmp_path, fails) -> None:
    """reading: a requests.db that is not a database (sqlite3.DatabaseError); backend: a PostgreSQL
    log whose server does not answer (StateBackendError); opening: a reader that cannot be opened
    (neither real backend fails there: both connect lazily, so the failure is injected)."""
    secrets: list[str] = []
    cfg = dashboard_config(default_config)
    if fails == "reading":
        data_dir = tmp_path / "corrupt"
        data_dir.mkdir()
        (data_dir / "requests.db").write_bytes(b"this is not an SQLite database\n" * 200)
        cfg["data_dir"] = str(data_dir)
        secrets.append(str(data_dir))
    elif fails == "backend":
        port = free_port()
        cfg["logging"] = {"store": "postgres", "postgres_url": f"postgresql://setpoint:pw-s3cret@127.0.0.1:{port}/log"}
        secrets += ["pw-s3cret", str(port)]
    else:
        def cannot_open() -> Any:
            raise ConnectionError("database at db.internal:5432 is down")

        monkeypatch.setattr(dashboard_pkg, "_reader_factory", lambda gw: cannot_open)
        secrets.append("db.internal")
    gw = make_gateway(cfg)
    c = ui(gw)
    for path in ("/ui", "/ui/budgets", "/ui/requests", "/ui/requests/req_x"):
        r = c.get(path)
        assert r.status_code == 503 and "could not be read (" in r.text, path
        for secret in secrets:
            assert secret not in r.text, (path, secret)
    api = c.get("/ui/api/series")
    assert api.status_code == 503 and not any(s in api.text for s in secrets)
    assert c.get("/ui/deployments").status_code == 200  # live state needs no log
    assert "reading the request log failed" in caplog.text


def test_a_tampered_cursor_is_a_400_with_a_message(seeded_gateway, ui) -> None:
    c = ui(seeded_gateway)
    r = c.get("/ui/api/requests", params={"cursor": "garbage"})
    assert r.status_code == 400 and "cursor" in r.json()["error"]["message"]
    page = c.get("/ui/requests", params={"cursor": "garbage", "team": "research"})
    assert page.status_code == 400 and "invalid cursor" in page.text and 'value="research"' in page.text
