"""Dashboard fixtures: gateways with the dashboard, a logged-in HTTP client, headless Chromium.

Every gateway here reads a real request log. `real_gateway` and `log_gateway` read the log the
gateway itself writes (real traffic from the `openai` SDK). `seeded_gateway` starts on a SQLite log
that already holds `log_records`: thousands of records with chosen timestamps, teams, keys, models,
statuses, costs and latencies, stored through the real writer (`SqliteLogStore.commit_batch`: rows
and rollups in one transaction), so that the tests can compute every expected number from them.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from logstore.conftest import sqlite_backend

from setpoint.proxy.background import BackgroundGateway

from conftest import _read_rows

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--no-first-run", "--disable-sync",
]
ARTIFACTS = Path(__file__).parent / "artifacts"


def login(client: httpx.Client, root: str, key: str) -> httpx.Response:
    """POST the login form like a browser does; the client keeps the session cookie."""
    return client.post(f"{root}/ui/login", data={"key": key, "next": "/ui"}, headers={"Origin": root},
                       follow_redirects=False)


def dashboard_config(default_config: Callable[..., dict[str, Any]], **extra: Any) -> dict[str, Any]:
    cfg = default_config()
    cfg["budgets"] = [
        {"scope": "team", "limit_usd": 5.0, "period": "daily"},
        {"scope": "key", "name": "cfg:all", "limit_usd": 1.0, "period": "monthly", "hard": False},
    ]
    cfg.update(extra)
    return cfg


# -- a request log seeded through the real writer ----------------------------------------------------

DAY = 86_400
# (key id, key name, team, weight). Ten keys: the "by key" chart folds the smallest spenders into
# "other"; two keys share the name "delta" (shown as "delta (id)", found by name in searches); one key
# was made through the admin API (not "cfg:"); cfg:all is the config's key, whose budget burns.
KEYS = [
    ("cfg:alpha", "alpha", "research", 12), ("cfg:beta", "beta", "search", 10),
    ("key_0123456789abcdef", "batch", "research", 9), ("cfg:gamma", "gamma", "support", 8),
    ("cfg:all", "all", "team-all", 7), ("cfg:delta", "delta", "search", 6),
    ("key_fedcba9876543210", "delta", "support", 5), ("cfg:zeta", "zeta", "ops", 4),
    ("cfg:eta", "eta", "ops", 3), ("cfg:theta", "theta", "research", 2),
]
# (model, deployment, $ per million tokens in, out, weight): the deployments of `default_config`
MODELS = [("chat-a", "sim/sim-small", 1.0, 2.0, 6), ("chat-b", "sim/sim-large", 5.0, 15.0, 3),
          ("embed", "sim/sim-embed", 0.1, 0.0, 1)]
# Ages (seconds before seeding) near the start of a dashboard window are left out: (span, chart
# bucket) of each range (the budgets' and deployments' "last hour" is the 1h one). A window's start
# moves with its bucket, so a record there would be in or out depending on when the test runs;
# _EDGE_MARGIN_S is how long after seeding a module's tests may run and still agree.
_EDGES = [(3600, 60), (DAY, 900), (7 * DAY, 3600), (30 * DAY, 6 * 3600)]
_EDGE_MARGIN_S = 900


def _near_an_edge(age: float) -> bool:
    return any(span - bucket - _EDGE_MARGIN_S <= age <= span + _EDGE_MARGIN_S for span, bucket in _EDGES)


def _age(rng: random.Random) -> float:
    """30% in the last hour, 40% in the last day, 20% in the last week, 10% up to 29 days (the
    gateway keeps 30 days: `logging.retention_days`)."""
    while True:
        r = rng.random()
        age = (rng.uniform(2, 3600) if r < 0.3 else rng.uniform(2, DAY) if r < 0.7
               else rng.uniform(DAY, 7 * DAY) if r < 0.9 else rng.uniform(7 * DAY, 29 * DAY))
        if not _near_an_edge(age):
            return age


def make_log_records(n: int, now: float, seed: int = 7) -> list[dict[str, Any]]:
    """n request records as the gateway writes them (every column of `requests`), before `now`:
    successes, cache hits (chat-a), unpriced requests, and errors with and without a key,
    deployment or code. The same records (shifted to `now`) for the same seed."""
    rng = random.Random(seed)
    key_weights = [k[3] for k in KEYS]
    model_weights = [m[4] for m in MODELS]
    rows = []
    for i in range(n):
        kid, kname, team, _ = rng.choices(KEYS, key_weights)[0]
        model, dep, pin, pout, _ = rng.choices(MODELS, model_weights)[0]
        is_chat = model != "embed"
        ts = now - _age(rng)
        p, c = rng.randint(20, 900), (rng.randint(5, 400) if is_chat else 0)
        roll = rng.random()
        status, code = 200, None
        if roll < 0.03:
            status, code, dep = 429, "rate_limit_exceeded", None  # refused before routing
        elif roll < 0.045:
            status, code = 503, "upstream_unavailable"
        elif roll < 0.05:
            status, code, model, dep = 404, "model_not_found", "gpt-9", None
        elif roll < 0.053:
            status = 500  # no error code: "-"
        elif roll < 0.058:
            status, code, kid, kname, team = 401, "invalid_api_key", None, None, None
        err = status >= 400
        if err:
            c = 0
        stream = is_chat and not err and rng.random() < 0.4
        hit = model == "chat-a" and not err and rng.random() < 0.1
        price = round(p * pin + c * pout)
        cost = None if err else 0 if hit else None if model == "chat-b" and rng.random() < 0.03 else price
        lat = rng.uniform(1, 4) if hit else rng.lognormvariate(2, 0.5) if err and status != 503 else rng.lognormvariate(5.5, 0.6)
        content = None
        if rng.random() < 0.2:
            content = {"request": {"model": model, "messages": [{"role": "user", "content": f"question {i}"}]}}
            if not err:
                content["output"] = f"answer {i}"
        rows.append({
            "id": f"req_{rng.getrandbits(128):032x}", "ts": ts, "endpoint": "chat" if is_chat else "embeddings",
            "key_id": kid, "key_name": kname, "team": team, "user_id": rng.choice(["ann", "bob", None]),
            "model": model, "deployment": dep, "provider": "sim" if dep else None, "is_stream": int(stream),
            "status": status, "error_code": code, "prompt_tokens": p, "completion_tokens": c,
            "cached_tokens": rng.choice([0, 0, 64]) if is_chat and not err else 0,
            "reasoning_tokens": rng.choice([0, 16]) if model == "chat-b" and not err else 0,
            "cost_micros": cost, "latency_ms": lat,
            "ttft_ms": lat * rng.uniform(0.1, 0.4) if stream else None,
            "upstream_ms": None if hit or dep is None else lat * rng.uniform(0.85, 0.97),
            "finish_reason": None if err else "stop",
            "annotations": json.dumps({"route": dep}) if dep else None,
            "content": None if content is None else json.dumps(content),
            "cache_status": ("hit" if hit else "miss") if model == "chat-a" and not err else None,
            "saved_micros": price if hit else None,
        })
    return rows


def seed_log(db_path: Path, records: list[dict[str, Any]], now: float, batch: int = 500) -> None:
    """Store records in the SQLite request log at `db_path` through the real writer, as the drainer
    does (`commit_batch`: rows, rollups and spool offset in one transaction), on a clock at `now`."""
    backend = sqlite_backend(db_path)
    backend.clock[0] = now
    try:
        store = backend.store()
        for i in range(0, len(records), batch):
            store.commit_batch("seed.jsonl", (i + batch) * 100, records[i : i + batch])
    finally:
        backend.close_all()


@dataclass(frozen=True)
class SeededLog:
    path: Path  # a requests.db that holds `records` (copied for each gateway)
    records: list[dict[str, Any]]
    now: float  # when they were seeded (their ages are counted from here)


@pytest.fixture(scope="module")
def seeded_log(tmp_path_factory: pytest.TempPathFactory) -> SeededLog:
    """2,000 records seeded once per module (their windows stay put for `_EDGE_MARGIN_S`)."""
    now = time.time()
    records = make_log_records(2000, now)
    path = tmp_path_factory.mktemp("seeded") / "requests.db"
    seed_log(path, records, now)
    assert not path.with_name("requests.db-wal").exists()  # closed: one self-contained file to copy
    return SeededLog(path, records, now)


@pytest.fixture
def log_records(seeded_log: SeededLog) -> list[dict[str, Any]]:
    """The records in `seeded_gateway`'s log (do not change them)."""
    return seeded_log.records


@pytest.fixture
def seeded_gateway(make_gateway: Callable[..., BackgroundGateway], default_config: Callable[..., dict[str, Any]],
                   seeded_log: SeededLog, tmp_path: Path) -> BackgroundGateway:
    """A gateway whose request log (SQLite, content logging on) holds `log_records` when it starts,
    as if an earlier run had written them; its dashboard reads that log through the real reader."""
    data_dir = tmp_path / "seeded-gw"
    data_dir.mkdir()
    shutil.copyfile(seeded_log.path, data_dir / "requests.db")
    return make_gateway(dashboard_config(default_config, data_dir=str(data_dir),
                                         logging={"store_content": True, "flush_interval_ms": 20}))




@pytest.fixture(params=["sqlite", "postgres"])
def log_gateway(request: pytest.FixtureRequest, default_config: Callable[..., dict[str, Any]]) -> BackgroundGateway:
    """A gateway writing its log to SQLite or PostgreSQL (a fresh database), content logging on;
    `gw.log_rows()` flushes the log and returns its records, oldest first."""
    logging: dict[str, Any] = {"store_content": True, "flush_interval_ms": 20}
    if request.param == "postgres":
        logging.update(store="postgres", postgres_url=request.getfixturevalue("pg_url"))
    # after pg_url, so that the gateway is stopped before its database is dropped
    make_gateway: Callable[..., BackgroundGateway] = request.getfixturevalue("make_gateway")
    gw = make_gateway(dashboard_config(default_config, logging=logging))

    def log_rows() -> list[dict[str, Any]]:
        assert gw.flush_log(10), "request log did not flush"
        if request.param == "sqlite":
            return _read_rows(gw.server.gateway.request_log.db_path)
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(logging["postgres_url"], row_factory=dict_row) as conn:
            return list(conn.execute("SELECT * FROM requests ORDER BY ts"))

    gw.log_rows = log_rows  # type: ignore[attr-defined]
    return gw


@pytest.fixture
def real_gateway(make_gateway: Callable[..., BackgroundGateway],
                 default_config: Callable[..., dict[str, Any]]) -> BackgroundGateway:
    """A gateway whose dashboard reads the request log it writes (content logging on)."""
    return make_gateway(dashboard_config(default_config, logging={"store_content": True, "flush_interval_ms": 20}))


@pytest.fixture
def anon() -> Iterator[Callable[[BackgroundGateway], httpx.Client]]:
    """`anon(gw)` -> a client of gw's root URL that is not logged in (redirects not followed)."""
    made: list[httpx.Client] = []

    def make(gw: BackgroundGateway) -> httpx.Client:
        c = httpx.Client(base_url=gw.root_url, timeout=20.0, trust_env=False)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def ui(anon: Callable[[BackgroundGateway], httpx.Client], keys: Any) -> Callable[[BackgroundGateway], httpx.Client]:
    """`ui(gw)` -> a client logged in to gw's dashboard with the master key."""

    def make(gw: BackgroundGateway) -> httpx.Client:
        c = anon(gw)
        resp = login(c, gw.root_url, keys.master)
        assert resp.status_code == 303, resp.text
        return c

    return make


# -- browser ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where browser tests save screenshots (tests/dashboard/artifacts/, git-ignored)."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """Headless system Chromium driven by Playwright (its own browser download is not used).

    Module scope, not session: Playwright's sync API keeps an event loop running in this thread
    while it is open, which would break every asyncio test that runs after the browser tests."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium); browser tests skipped")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(chromium: Any, request: pytest.FixtureRequest, artifacts_dir: Path) -> Iterator[Any]:
    """A fresh browser context and page; console errors and failed requests are collected in
    `page.problems`, and a screenshot of the final state is saved if the test fails."""
    context = chromium.new_context(viewport={"width": 1360, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(15_000)
    problems: list[str] = []
    pg.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    pg.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    pg.problems = problems
    yield pg
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        name = re.sub(r"[^\w.-]+", "_", request.node.name)
        pg.screenshot(path=str(artifacts_dir / f"FAILED-{name}.png"), full_page=True)
    context.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]
    return rep
