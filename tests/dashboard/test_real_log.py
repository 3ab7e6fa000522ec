"""The dashboard over the log a gateway really wrote (SQLite, and PostgreSQL when available): its
numbers agree with the stored records, filters and pages work through the real `LogReader`."""

from __future__ import annotations

from typing import Any

import openai
import pytest

MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture
def traffic(log_gateway, make_client, keys) -> list[dict[str, Any]]:
    gw = log_gateway
    c_all = make_client(gw.base_url, keys.all)
    c_lim = make_client(gw.base_url, keys.limited)
    for i in range(60):
        c_all.chat.completions.create(model="chat-a" if i % 3 else "chat-b", messages=MESSAGES, user=f"u{i % 4}")
    for _ in range(7):
        c_lim.chat.completions.create(model="chat-a", messages=MESSAGES)
    for _ in range(3):
        with pytest.raises(openai.NotFoundError):
            c_all.chat.completions.create(model="nope", messages=MESSAGES)
        with pytest.raises(openai.PermissionDeniedError):
            c_lim.chat.completions.create(model="chat-b", messages=MESSAGES)
    return gw.log_rows()


def test_summary_and_series_agree_with_the_records(log_gateway, ui, traffic) -> None:
    c = ui(log_gateway)
    s = c.get("/ui/api/summary", params={"range": "1h"}).json()
    t = s["totals"]
    assert t["requests"] == len(traffic) == 73
    assert t["errors"] == sum(r["status"] >= 400 for r in traffic) == 6
    assert t["cost_micros"] == sum(r["cost_micros"] or 0 for r in traffic) > 0
    assert {e["code"]: e["count"] for e in s["errors_by_code"]} == {"model_not_found": 3, "permission_denied": 3}
    lat = sorted(r["latency_ms"] for r in traffic)
    assert s["latency"]["p50_ms"] == pytest.approx(lat[len(lat) // 2], rel=0.25, abs=0.5)  # histogram bins
    for by in ("team", "key", "model", "deployment"):
        d = c.get("/ui/api/series", params={"range": "1h", "by": by}).json()
        assert sum(d["traffic"]["requests"]) == 73 and d["points"] >= 1
        assert sum(map(sum, d["spend"]["values"])) == t["cost_micros"]
    d = c.get("/ui/api/series", params={"range": "1h", "by": "key"}).json()
    assert d["spend"]["groups"] == ["all", "limited"]


def test_filters_and_pages_through_the_reader(log_gateway, ui, traffic) -> None:
    c = ui(log_gateway)
    rows = c.get("/ui/api/requests", params={"key": "limited", "status": "ok"}).json()["data"]
    assert len(rows) == 7 and {r["key_name"] for r in rows} == {"limited"}
    rows = c.get("/ui/api/requests", params={"key": "cfg:limited", "status": "error"}).json()["data"]
    assert len(rows) == 3 and {r["error_code"] for r in rows} == {"permission_denied"}
    rows = c.get("/ui/api/requests", params={"user": "u1", "model": "chat-a"}).json()["data"]
    want = [r for r in traffic if r["user_id"] == "u1" and r["model"] == "chat-a"]
    assert len(rows) == len(want) > 0
    seen, cursor = [], None
    while True:
        d = c.get("/ui/api/requests", params={"team": "team-all", **({"cursor": cursor} if cursor else {})}).json()
        seen += [r["id"] for r in d["data"]]
        cursor = d["next_cursor"]
        if not cursor:
            break
    expected = sorted((r for r in traffic if r["team"] == "team-all"), key=lambda r: (r["ts"], r["id"]), reverse=True)
    assert seen == [r["id"] for r in expected] and len(seen) == 63 > 50
    bad = c.get("/ui/api/requests", params={"cursor": "not-a-cursor"})
    assert bad.status_code == 400 and "cursor" in bad.json()["error"]["message"]
    assert c.get("/ui/requests", params={"cursor": "not-a-cursor"}).status_code == 400
    one = traffic[5]
    detail = c.get(f"/ui/api/requests/{one['id']}").json()
    assert detail["id"] == one["id"] and detail["annotations"]["route"] == one["deployment"]
    assert detail["content"]["request"]["messages"] == MESSAGES
    assert c.get(f"/ui/requests/{one['id']}").status_code == 200
    assert c.get("/ui/requests/req_unknown_0000").status_code == 404
    assert c.get("/ui/api/requests/req_unknown_0000").status_code == 404


def test_budgets_and_deployments_from_the_real_log(log_gateway, ui, traffic) -> None:
    c = ui(log_gateway)
    b = {x["entity"]: x for x in c.get("/ui/api/budgets").json()["budgets"] if x["rule"] == 0}
    assert set(b) == {"team-all", "team-limited"}
    spent = sum(r["cost_micros"] or 0 for r in traffic if r["team"] == "team-all")
    assert b["team-all"]["spent_micros"] == spent  # the ledger, settled with the same costs
    assert b["team-all"]["burn_micros_per_h"] == spent  # the log, over the last hour
    assert b["team-all"]["held_micros"] == 0
    d = {x["name"]: x for x in c.get("/ui/api/deployments").json()["deployments"]}
    assert d["sim/sim-small"]["last_hour"]["requests"] == sum(r["deployment"] == "sim/sim-small" for r in traffic)
    assert d["sim/sim-small"]["breaker"]["calls"] > 0


def test_empty_log_answers_empty(log_gateway, ui) -> None:
    c = ui(log_gateway)
    assert c.get("/ui/api/summary").json()["totals"]["requests"] == 0
    assert c.get("/ui/api/series").json()["points"] == 0
    assert c.get("/ui/api/requests").json()["data"] == []
    for page in ("/ui", "/ui/budgets", "/ui/deployments", "/ui/requests"):
        assert c.get(page).status_code == 200, page
