"""Dashboard page-load benchmark: a gateway whose request log holds a million records, every page
timed over HTTP (server time, full response) and in headless Chromium (navigation start to a
page ready for the eye: the `load` event, and for the overview the charts drawn from their data).

    python bench/dashboard_bench.py                        # 1,000,000 rows, SQLite + PostgreSQL
    python bench/dashboard_bench.py --rows 200000 --backend sqlite
    python bench/dashboard_bench.py --backend sqlite --keep /tmp/dash   # reuse the seeded log next time

Records and seeding come from `bench/logstore_bench.py` (`records`, `seed`: the real writer,
rollups included; `TempPostgres`: a throwaway PostgreSQL). The gateway is started in-process on the
seeded log (`BackgroundGateway`), with budgets for every team and a few keys, so the budgets page
has work to do. Browser timings use the system Chromium (/usr/bin/chromium) via Playwright; static
assets are in the browser cache after the first page, as for a real user.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from html import unescape
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from logstore_bench import MODELS, TempPostgres, seed  # noqa: E402

from setpoint.config.compile import compile_config  # noqa: E402
from setpoint.config.load import parse_config  # noqa: E402
from setpoint.proxy.background import BackgroundGateway  # noqa: E402

MASTER = "mk-bench-master-key-0123456789"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]
TEAMS = ("search", "support", "growth", "platform", "research", "billing")


def gateway_config(data_dir: Path, logging: dict[str, Any]) -> dict[str, Any]:
    """The seeded models as simulated deployments, budgets per team and per key."""
    providers = {name.split("/")[0]: {"type": "simulated"} for _, deps, *_ in MODELS for name, _ in deps}
    models = {model: {"deployments": [{"provider": d.split("/")[0], "model": d.split("/")[1]} for d, _ in deps]}
              for model, deps, *_ in MODELS}
    return {
        "data_dir": str(data_dir), "admin": {"master_key": MASTER}, "logging": logging,
        "providers": providers, "models": models,
        "budgets": [
            {"scope": "team", "limit_usd": 2000.0, "period": "monthly"},
            {"scope": "key", "limit_usd": 50.0, "period": "daily", "hard": False},
            {"scope": "team", "name": "team-search", "limit_usd": 100.0, "period": "daily"},
        ],
    }


def pages(c: httpx.Client) -> list[tuple[str, list[str]]]:
    """(page, the requests a browser makes for it besides cached assets)."""
    first = c.get("/ui/requests", params={"team": "team-growth"}).text
    older = unescape(re.search(r'href="([^"]+)" rel="next"', first).group(1))
    rid = re.search(r'data-id="([^"]+)"', first).group(1)
    out: list[tuple[str, list[str]]] = []
    for r in ("1h", "24h", "7d", "30d"):  # the page carries its chart data
        out.append((f"overview {r}", [f"/ui?range={r}"]))
    out.append(("overview 30d by key", ["/ui?range=30d&by=key"]))
    out.append(("api/series 30d by team", ["/ui/api/series?range=30d&by=team"]))
    out += [
        ("budgets", ["/ui/budgets"]),
        ("deployments", ["/ui/deployments"]),
        ("requests", ["/ui/requests"]),
        ("requests team=growth", ["/ui/requests?team=team-growth"]),
        ("requests older page", [older]),
        ("requests model+status=error", ["/ui/requests?model=gpt-4o&status=error"]),
        ("requests key+cache=hit 24h", ["/ui/requests?key=support-2&cache=hit&range=24h"]),
        ("requests user", ["/ui/requests?user=user-0003"]),
        ("request detail", [f"/ui/requests/{rid}"]),
    ]
    return out


def time_http(c: httpx.Client, plan: list[tuple[str, list[str]]], repeat: int) -> dict[str, tuple[float, float]]:
    out = {}
    for name, urls in plan:
        for u in urls:  # warm
            assert c.get(u).status_code == 200, (u, c.get(u).text[:300])
        runs = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            for u in urls:
                r = c.get(u)
                assert r.status_code == 200
            runs.append((time.perf_counter() - t0) * 1000)
        out[name] = (statistics.median(runs), max(runs))
    return out


def time_browser(root: str, plan: list[tuple[str, list[str]]], repeat: int) -> dict[str, tuple[float, float]]:
    if not os.path.exists(CHROMIUM):
        print(f"{CHROMIUM} not found: browser timings skipped")
        return {}
    from playwright.sync_api import sync_playwright

    out = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1360, "height": 900})
        page.goto(root + "/ui/login")
        page.fill("#key", MASTER)
        page.click("button[type=submit]")
        page.wait_for_selector("#charts[data-ready]", state="attached")
        for name, urls in plan:
            runs = []
            for i in range(repeat + 1):
                page.goto(root + urls[0], wait_until="load")
                if name.startswith("api/"):
                    break
                if name.startswith("overview"):
                    page.wait_for_selector("#charts[data-ready='1']", state="attached")
                    ms = float(page.get_attribute("#charts", "data-ready-ms"))
                else:
                    ms = page.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd")
                if i:  # the first is a warm-up
                    runs.append(ms)
            if runs:
                out[name] = (statistics.median(runs), max(runs))
        browser.close()
    return out


def run(name: str, data_dir: Path, logging: dict[str, Any], open_store: Any, rows: int, reuse: bool,
        repeat: int) -> tuple[dict[str, tuple[float, float]], dict[str, tuple[float, float]]]:
    now = time.time()
    if not reuse:
        print(f"{name}: seeding {rows:,} records ...", flush=True)
        store = open_store()
        try:
            wall, _ = seed(store, rows, now)
        finally:
            store.close()
        print(f"{name}: seeded in {wall:.0f} s", flush=True)
    cfg = compile_config(parse_config(gateway_config(data_dir, logging), env={}))
    with BackgroundGateway(cfg) as gw, httpx.Client(base_url=gw.root_url, timeout=60, trust_env=False) as c:
        r = c.post("/ui/login", data={"key": MASTER}, headers={"Origin": gw.root_url})
        assert r.status_code == 303, r.text
        total = c.get("/ui/api/summary", params={"range": "30d"}).json()["totals"]["requests"]
        print(f"{name}: {total:,} requests in the last 30 days; timing pages ...", flush=True)
        plan = pages(c)
        http = time_http(c, plan, repeat)
        browser = time_browser(gw.root_url, plan, repeat)
    return http, browser


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--keep", metavar="DIR", help="keep the SQLite log in DIR and reuse it if it is there")
    args = ap.parse_args()
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="setpoint-dash-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = {}
    try:
        if args.backend in ("sqlite", "both"):
            from setpoint.logstore.sqlite_store import SqliteLogStore

            data = workdir / "sqlite"
            data.mkdir(exist_ok=True)
            db = data / "requests.db"
            reuse = bool(args.keep) and db.exists()
            results["SQLite"] = run("SQLite", data, {}, lambda: SqliteLogStore(db), args.rows, reuse, args.repeat)
        if args.backend in ("postgres", "both"):
            import psycopg

            from setpoint.logstore.postgres_store import PostgresLogStore

            server = TempPostgres()
            try:
                with psycopg.connect(server.url, autocommit=True) as conn:
                    conn.execute("CREATE DATABASE bench")
                url = server.url.rsplit("/", 1)[0] + "/bench"
                data = workdir / "postgres"
                data.mkdir(exist_ok=True)
                results["PostgreSQL"] = run("PostgreSQL", data, {"store": "postgres", "postgres_url": url},
                                            lambda: PostgresLogStore(url), args.rows, False, args.repeat)
            finally:
                server.stop()
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    _table(results, args.rows)


def _table(results: dict[str, Any], rows: int) -> None:
    names = list(results)
    print(f"\n{rows:,} request records; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs. HTTP: the "
          "page's full response (the overview includes its chart data), ms median / slowest. Browser: headless "
          "Chromium, navigation start to `load` (overview: to the charts drawn), ms median / slowest, assets "
          "cached.\n")
    heads = [f"{b} {k}" for b in names for k in ("HTTP", "browser")]
    print("| page | " + " | ".join(heads) + " |")
    print("|---|" + "---:|" * len(heads))
    worst = 0.0
    for page in next(iter(results.values()))[0] if results else []:
        cells = []
        for b in names:
            for part in results[b]:
                if page in part:
                    med, mx = part[page]
                    worst = max(worst, mx)
                    cells.append(f"{med:.0f} / {mx:.0f}")
                else:
                    cells.append("—")
        print(f"| {page} | " + " | ".join(cells) + " |")
    print(f"\nslowest: {worst:.0f} ms")


if __name__ == "__main__":
    main()
