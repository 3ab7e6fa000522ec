"""The dashboard in a real headless Chromium (Playwright, the system's /usr/bin/chromium), on a real
gateway whose request log holds real traffic from the `openai` SDK, errors included.

Screenshots of every page go to tests/dashboard/artifacts/ (git-ignored).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import openai
import pytest

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "What does a set point do?"}]


def send_traffic(gw: Any, make_client: Any, keys: Any) -> dict[str, int]:
    """Successes on two models and two keys (unary, streamed, embeddings), and three kinds of error."""
    c_all = make_client(gw.base_url, keys.all)
    c_lim = make_client(gw.base_url, keys.limited)
    sent = {"ok": 0, "error": 0}
    for i in range(8):
        c_all.chat.completions.create(model="chat-a", messages=MESSAGES, user=f"user-{i % 2}")
        sent["ok"] += 1
    for _ in range(3):
        stream = c_all.chat.completions.create(model="chat-a", messages=MESSAGES, stream=True,
                                               stream_options={"include_usage": True})
        assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
        sent["ok"] += 1
    for _ in range(4):
        c_all.chat.completions.create(model="chat-b", messages=MESSAGES)
        c_lim.chat.completions.create(model="chat-a", messages=MESSAGES)
        sent["ok"] += 2
    c_lim.embeddings.create(model="embed", input=["one", "two"])
    sent["ok"] += 1
    for _ in range(2):
        with pytest.raises(openai.NotFoundError):
            c_all.chat.completions.create(model="no-such-model", messages=MESSAGES)
        with pytest.raises(openai.PermissionDeniedError):
            c_lim.chat.completions.create(model="chat-b", messages=MESSAGES)
        with pytest.raises(openai.APIStatusError):
            c_all.chat.completions.create(model="chat-a", messages=MESSAGES, extra_body={"sim_fault": "server_error"})
        sent["error"] += 3
    assert gw.flush_log(10), "the request log did not flush"
    return sent


def shot(page: Any, artifacts: Path, name: str) -> None:
    page.screenshot(path=str(artifacts / f"{name}.png"), full_page=True)


def test_dashboard_in_a_browser(real_gateway, make_client, keys, page, artifacts_dir) -> None:
    gw = real_gateway
    sent = send_traffic(gw, make_client, keys)
    total = sent["ok"] + sent["error"]
    root = gw.root_url

    # -- log in (a wrong key first) --------------------------------------------------------------
    page.goto(root + "/ui?range=1h")
    assert page.url.startswith(root + "/ui/login")
    shot(page, artifacts_dir, "01-login")
    page.fill("#key", "not-the-master-key-000000")
    page.click("button[type=submit]")
    assert "not the admin key" in page.inner_text(".alert")
    page.problems.clear()  # the browser logs the refused login's 401 as a console error
    page.fill("#key", keys.master)
    page.click("button[type=submit]")
    assert page.url == root + "/ui?range=1h"  # back where we were sent from

    # -- overview: tiles and charts drawn from the data ------------------------------------------
    # The page carries the chart data (one round trip); the same data is at /ui/api/series.
    resp = page.request.get(root + "/ui/api/series?range=1h&by=team")  # with the browser's session cookie
    assert resp.status == 200
    series = resp.json()
    embedded = page.evaluate("JSON.parse(document.getElementById('series-data').textContent)")
    assert {k: v for k, v in embedded.items() if k != "latency"} == {k: v for k, v in series.items() if k != "latency"}
    assert series["points"] > 0 and sum(series["traffic"]["requests"]) == total
    assert sum(series["traffic"]["errors"]) == sent["error"]
    page.wait_for_selector("#charts[data-ready='1']", state="attached")
    assert int(page.get_attribute("#charts", "data-points")) > 0
    assert page.inner_text("[data-tile=requests]") == f"{total:,}"
    for chart in ("spend", "traffic", "latency"):
        canvas = page.locator(f"#chart-{chart} canvas")
        assert canvas.count() == 1, chart
        box = canvas.bounding_box()
        assert box and box["width"] > 200 and box["height"] > 100, (chart, box)
    # each chart was drawn with the data: series and non-empty values (uPlot instances)
    plotted = page.evaluate("""() => Object.fromEntries(Object.entries(window.setpointCharts).map(([id, u]) =>
        [id, {series: u.series.slice(1).map(s => s.label),
              values: u.data.slice(1).map(col => col.filter(v => v != null && v > 0).length)}]))""")
    assert set(plotted) == {"chart-spend", "chart-traffic", "chart-latency"}
    assert plotted["chart-spend"]["series"] == ["team-all", "team-limited"]
    assert plotted["chart-traffic"]["series"] == ["requests", "errors", "cache hits"]
    assert plotted["chart-traffic"]["values"][:2] == [series["points"], len([e for e in series["traffic"]["errors"] if e])]
    assert plotted["chart-latency"]["series"][:3] == ["p50", "p95", "p99"]
    assert all(n > 0 for n in plotted["chart-spend"]["values"] + plotted["chart-latency"]["values"]), plotted
    # and the canvases are not blank
    drawn = page.evaluate("""() => [...document.querySelectorAll('#charts canvas')].map(c => {
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n; })""")
    assert all(n > 1000 for n in drawn), drawn
    legend = page.inner_text("#chart-spend .u-legend")
    assert "team-all" in legend and "team-limited" in legend
    errors_table = page.inner_text("table.bars")
    assert "model_not_found" in errors_table and "permission_denied" in errors_table
    shot(page, artifacts_dir, "02-overview")

    page.click("nav[aria-label='Group spend by'] >> text=model")
    page.wait_for_selector("#charts[data-ready='1']", state="attached")
    assert "chat-a" in page.inner_text("#chart-spend .u-legend")
    shot(page, artifacts_dir, "03-overview-by-model")

    # -- request log: filter, then open one request ---------------------------------------------
    page.click("nav[aria-label=Dashboard] >> text=Requests")
    assert page.locator("#requests tbody tr").count() == total
    page.fill("#f-model", "chat-a")
    page.select_option("#f-status", "ok")
    page.fill("#f-key", "limited")
    page.click(".filters button[type=submit]")
    rows = page.locator("#requests tbody tr")
    assert rows.count() == 4
    for text in page.locator("#requests td[data-col=model]").all_inner_texts():
        assert text.split()[0] == "chat-a"
    assert set(page.locator("#requests td[data-col=key]").all_inner_texts()) == {"limited"}
    assert set(page.locator("#requests td[data-col=status]").all_inner_texts()) == {"200"}
    assert page.input_value("#f-model") == "chat-a"  # the form keeps the filter
    shot(page, artifacts_dir, "04-requests-filtered")

    page.fill("#f-model", "")
    page.fill("#f-key", "")
    page.select_option("#f-status", "error")
    page.click(".filters button[type=submit]")
    statuses = page.locator("#requests td[data-col=status]").all_inner_texts()
    assert len(statuses) == sent["error"]
    assert all(int(s.split()[0]) >= 400 for s in statuses)
    shot(page, artifacts_dir, "05-requests-errors")

    page.select_option("#f-status", "ok")
    page.fill("#f-model", "chat-a")
    page.click(".filters button[type=submit]")
    first = page.locator("#requests tbody tr").first
    rid = first.get_attribute("data-id")
    first.locator("a").click()
    assert page.url.endswith(f"/ui/requests/{rid}")
    assert rid in page.inner_text("h1")
    record = page.inner_text("#record")
    assert "chat-a" in record and "team-" in record and "sim/sim-small" in record
    assert page.locator(".messages .role").first.inner_text().lower() == "user"
    assert "What does a set point do?" in page.inner_text(".messages")  # content logging is on
    assert page.locator(".messages .output pre").inner_text().strip()
    shot(page, artifacts_dir, "06-request-detail")

    # -- budgets and deployments ------------------------------------------------------------------
    page.click("nav[aria-label=Dashboard] >> text=Budgets")
    table = page.inner_text("#budgets")
    assert "team-all" in table and "$5.00" in table
    shot(page, artifacts_dir, "07-budgets")
    page.click("nav[aria-label=Dashboard] >> text=Deployments")
    row = page.inner_text("tr[data-deployment='sim/sim-small']")
    assert "closed" in row and re.search(r"\d+ req", row)
    shot(page, artifacts_dir, "08-deployments")

    assert not page.problems, page.problems  # no script errors, no CSP violations

    # -- log out ----------------------------------------------------------------------------------
    page.click(".logout button")
    assert page.url.startswith(root + "/ui/login")
    page.goto(root + "/ui/budgets")
    assert page.url.startswith(root + "/ui/login")


def test_overview_with_an_empty_log_says_so(real_gateway, keys, page, artifacts_dir) -> None:
    root = real_gateway.root_url
    page.goto(root + "/ui/login")
    page.fill("#key", keys.master)
    page.click("button[type=submit]")
    page.wait_for_selector("#charts[data-ready='1']", state="attached")
    assert page.get_attribute("#charts", "data-points") == "0"
    assert "No requests in this window" in page.inner_text("#chart-spend")
    assert page.inner_text("[data-tile=requests]") == "0"
    assert not page.problems, page.problems
    shot(page, artifacts_dir, "09-overview-empty")
