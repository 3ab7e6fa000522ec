"""`logging.*` in the config file, and the gateway's own readers of the log (GET /admin/usage,
`setpoint usage`, `open_reader` for the dashboard) on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml

from setpoint.config.load import parse_config
from setpoint.errors import ConfigError
from setpoint.logstore.reader import RequestFilter

DAY = 86_400


@pytest.mark.parametrize("logging,problem", [
    ({"store": "postgres"}, "logging.postgres_url: Value error, required when logging.store is postgres"),
    ({"store": "postgres", "postgres_url": ""}, "logging.postgres_url: Value error, required when"),
    ({"store": "postgres", "postgres_url": "mysql://u:secret@h/db"}, "logging.postgres_url: Value error, must be a URL"),
    ({"store": "mongo"}, "logging.store: Input should be 'sqlite' or 'postgres'"),
    ({"retention_days": -1}, "logging.retention_days: Input should be greater than or equal to 0"),
    ({"retention_days": "a month"}, "logging.retention_days: Input should be a valid integer"),
    ({"store": "postgres", "postgres_url": "${SETPOINT_PG_URL}"}, "logging.postgres_url: environment variable SETPOINT_PG_URL is not set"),
    ({"postgres_uri": "x"}, "logging.postgres_uri: unknown key"),
])
def test_bad_logging_config_names_the_path(logging: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"logging": logging}, env={})
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems
    assert "secret" not in str(info.value)


def test_logging_config_defaults_and_env() -> None:
    cfg = parse_config({}, env={}).logging
    assert (cfg.store, cfg.postgres_url, cfg.retention_days) == ("sqlite", None, 0)
    cfg = parse_config({"logging": {"store": "postgres", "postgres_url": "${SETPOINT_PG_URL}", "retention_days": 0}},
                       env={"SETPOINT_PG_URL": "postgresql://u:pw@db:5432/log"}).logging
    assert cfg.store == "postgres" and cfg.postgres_url == "postgresql://u:pw@db:5432/log" and cfg.retention_days == 0
    assert "pw" not in repr(cfg)  # a URL may hold a password
    # sqlite with an optional, empty URL
    cfg = parse_config({"logging": {"postgres_url": "${SETPOINT_PG_URL:-}"}}, env={}).logging
    assert cfg.store == "sqlite" and cfg.postgres_url is None


def test_config_check_reports_the_dotted_path(run_cli: Callable[..., Any], write_config: Callable[..., Path]) -> None:
    path = write_config({"logging": {"store": "postgres"}})
    res = run_cli("config", "check", str(path))
    assert res.returncode == 2
    assert "logging.postgres_url: Value error, required when logging.store is postgres" in res.stderr
    path = write_config({"logging": {"store": "postgres", "postgres_url": "postgresql://u@127.0.0.1:1/x", "retention_days": 7}})
    res = run_cli("config", "check", str(path))
    assert res.returncode == 0, res.stderr


# -- the gateway's readers, on both stores ------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def store_config(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "sqlite":
        return {}
    return {"store": "postgres", "postgres_url": request.getfixturevalue("pg_url")}


def test_admin_usage_cli_usage_and_reader_on_either_store(
    store_config: dict[str, Any], make_gateway: Callable[..., Any], make_client: Callable[..., Any],
    default_config: Callable[..., dict[str, Any]], keys: Any, run_cli: Callable[..., Any], write_config: Callable[..., Path],
    tmp_path: Path,
) -> None:
    cfg = default_config(tmp_path / "data")
    cfg["logging"] = {**store_config, "flush_interval_ms": 50}
    gw = make_gateway(cfg)
    client = make_client(gw.base_url, keys.all)
    limited = make_client(gw.base_url, keys.limited)
    for _ in range(3):
        client.chat.completions.create(model="chat-a", messages=[{"role": "user", "content": "hi"}])
    limited.chat.completions.create(model="chat-a", messages=[{"role": "user", "content": "hello"}])
    stream = client.chat.completions.create(model="chat-b", messages=[{"role": "user", "content": "s"}], stream=True)
    assert list(stream)
    assert gw.flush_log(10)

    with httpx.Client(timeout=10, trust_env=False) as http:
        resp = http.get(gw.root_url + "/admin/usage", params={"by": "team"},
                        headers={"Authorization": f"Bearer {keys.master}"})
        assert resp.status_code == 200, resp.text
        rows = {r["group"]: r for r in resp.json()["data"]}
        assert rows["team-all"]["requests"] == 4 and rows["team-limited"]["requests"] == 1
        assert rows["team-all"]["cost_micros"] > 0 and rows["team-all"]["prompt_tokens"] > 0
        health = http.get(gw.root_url + "/health").json()
        assert health["status"] == "ok" and health["spool_pending_bytes"] == 0

    reader = gw.server.gateway.request_log.open_reader()
    try:
        now = time.time()
        assert reader.totals(now - DAY, now + 60).requests == 5
        page = reader.search(RequestFilter(key="limited"))
        assert len(page.rows) == 1 and page.rows[0]["team"] == "team-limited"
        assert reader.get(page.rows[0]["id"])["model"] == "chat-a"  # type: ignore[index]
        lat = reader.latency(now - 3600, now + 60, 3600)
        assert sum(p.requests for p in lat) == 5 and all(p.latency_p50_ms for p in lat)
    finally:
        reader.close()

    config_path = write_config(cfg)
    out = run_cli("usage", "--config", str(config_path), "--by", "key", "--json")
    assert out.returncode == 0, out.stderr
    by_key = {r["group"]: r["requests"] for r in json.loads(out.stdout)}
    assert by_key == {"all": 4, "limited": 1}
    if store_config:  # PostgreSQL: nothing in the data dir but the spool and keys
        assert not (tmp_path / "data" / "requests.db").exists()
        with psycopg.connect(store_config["postgres_url"]) as conn:
            assert conn.execute("SELECT COUNT(*) FROM requests").fetchone() == (5,)


def test_usage_cli_reports_an_unreachable_postgres(run_cli: Callable[..., Any], write_config: Callable[..., Path]) -> None:
    path = write_config({"logging": {"store": "postgres", "postgres_url": "postgresql://u:secret@127.0.0.1:1/x"}})
    out = run_cli("usage", "--config", str(path))
    assert out.returncode == 1
    assert out.stderr.startswith("the request log is unavailable:") and "Traceback" not in out.stderr
    assert "secret" not in out.stderr + out.stdout
    assert yaml.safe_load(path.read_text())["logging"]["store"] == "postgres"
