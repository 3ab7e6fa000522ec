"""`setpoint serve` as a real subprocess: the SDK against it, several workers on one port, a clean
SIGTERM shutdown that leaves every request in the log, and `setpoint sim-provider` as its upstream."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

MESSAGES = [{"role": "user", "content": "hello from a subprocess test"}]


def worker_pids(parent: int) -> list[int]:
    """Live worker processes whose parent is `parent` (Linux /proc): forked (same command line) or
    spawned (`spawn_main`); not multiprocessing's resource tracker."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent and b"resource_tracker" not in cmdline and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def test_serve_unary_and_stream(serve_gateway, default_config, make_client, keys, read_rows) -> None:
    srv = serve_gateway(default_config())
    client = make_client(srv.base_url, keys.all)

    unary = client.chat.completions.create(model="chat-a", messages=MESSAGES)
    assert unary.choices[0].message.content
    assert unary.usage is not None and unary.usage.completion_tokens > 0

    chunks = list(client.chat.completions.create(
        model="chat-b", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    ))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    assert chunks[-1].usage is not None

    emb = client.embeddings.create(model="embed", input=["a", "b"])
    assert len(emb.data) == 2

    assert srv.proc.terminate() == 0
    rows = read_rows(srv.db_path)
    assert [(r["model"], r["is_stream"], r["status"]) for r in rows] == [
        ("chat-a", 0, 200), ("chat-b", 1, 200), ("embed", 0, 200)]
    assert rows[0]["completion_tokens"] == unary.usage.completion_tokens
    assert rows[1]["completion_tokens"] == chunks[-1].usage.completion_tokens
    assert srv.db_path.is_file()  # `data_dir: data` was resolved next to the config file, not the cwd
    assert not (srv.config_path.parent.parent / "data").exists()


def test_serve_health_and_errors(serve_gateway, default_config, http, keys) -> None:
    srv = serve_gateway(default_config())
    health = http.get(srv.root_url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    resp = http.post(srv.base_url + "/chat/completions", content=b"{bad", headers={"Authorization": f"Bearer {keys.all}"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_request"
    assert http.post(srv.base_url + "/chat/completions", json={}).status_code == 401


def test_serve_with_two_workers_logs_every_request(serve_gateway, default_config, make_client, keys, read_rows) -> None:
    srv = serve_gateway(default_config(), workers=2)
    if Path("/proc/self/stat").exists():
        assert len(worker_pids(srv.proc.pid)) == 2
    client = make_client(srv.base_url, keys.all, timeout=30.0)
    n = 50

    def one(i: int) -> tuple[int, str]:
        if i % 5 == 0:
            out = client.embeddings.create(model="embed", input=f"doc {i}")
            return i, f"embed:{len(out.data)}"
        if i % 2:
            chunks = list(client.chat.completions.create(
                model="chat-a", messages=[{"role": "user", "content": f"q {i}"}], stream=True,
                extra_body={"sim_output_tokens": 3},
            ))
            return i, "stream:" + "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        out = client.chat.completions.create(model="chat-b", messages=[{"role": "user", "content": f"q {i}"}],
                                             extra_body={"sim_output_tokens": 3})
        return i, "unary:" + (out.choices[0].message.content or "")

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = dict(pool.map(one, range(n)))

    assert len(results) == n
    for i, r in results.items():
        kind, _, text = r.partition(":")
        assert text and text != "0", (i, r)
        if kind in ("stream", "unary"):
            assert len(text.split()) == 3, (i, r)

    assert srv.proc.terminate() == 0, srv.proc.output()
    rows = read_rows(srv.db_path)
    assert len(rows) == n, f"{len(rows)} of {n} records in requests.db"
    assert len({r["id"] for r in rows}) == n
    assert all(r["status"] == 200 for r in rows)
    assert sum(1 for r in rows if r["endpoint"] == "embeddings") == 10
    assert sum(r["is_stream"] for r in rows) == 20
    assert all(r["completion_tokens"] == 3 for r in rows if r["endpoint"] == "chat")
    # A clean shutdown drains every spool segment.
    leftovers = sorted(p.name for p in (srv.data_dir / "spool").glob("*.jsonl"))
    assert leftovers == [], leftovers


def test_serve_invalid_config_exits_2(spawn, write_config, free_port) -> None:
    path = write_config({"models": {"m": {"deployments": [{"provider": "missing", "model": "x"}]}}}, name="bad-serve")
    proc = spawn(["serve", "--config", str(path), "--port", str(free_port())], name="bad-serve")
    assert proc.popen.wait(timeout=30) == 2
    assert "models.m.deployments[0].provider: unknown provider 'missing'" in proc.output()


@pytest.fixture
def sim_backed_config(sim_provider_proc, default_config) -> dict[str, Any]:
    cfg = default_config()
    cfg["providers"] = {"simhttp": {"type": "openai_compatible", "base_url": sim_provider_proc.base_url}}
    cfg["models"] = {
        "chat-a": {"deployments": [{"provider": "simhttp", "model": "sim-remote"}]},
        "chat-b": {"deployments": [{"provider": "simhttp", "model": "sim-remote-b"}]},
        "embed": {"kind": "embedding", "deployments": [{"provider": "simhttp", "model": "sim-embed"}]},
    }
    return cfg


def test_serve_against_sim_provider_subprocess(serve_gateway, sim_backed_config, make_client, keys, read_rows) -> None:
    srv = serve_gateway(sim_backed_config)
    client = make_client(srv.base_url, keys.all)

    unary = client.chat.completions.create(model="chat-a", messages=MESSAGES, extra_body={"sim_output_tokens": 5})
    assert unary.model == "sim-remote"
    assert len((unary.choices[0].message.content or "").split()) == 5

    chunks = list(client.chat.completions.create(model="chat-a", messages=MESSAGES, stream=True,
                                                 extra_body={"sim_output_tokens": 4}))
    assert all(c.usage is None for c in chunks)  # injected upstream, hidden from the client
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 4

    stream = client.chat.completions.create(model="chat-a", messages=MESSAGES, stream=True,
                                            extra_body={"sim_fault": "cut_stream"})
    with pytest.raises(openai.APIError) as info:
        for _ in stream:
            pass
    assert not isinstance(info.value, openai.APIStatusError)

    with pytest.raises(openai.RateLimitError) as rl:
        client.chat.completions.create(model="chat-a", messages=MESSAGES, extra_body={"sim_fault": "rate_limit"})
    assert rl.value.response.headers.get("retry-after") == "1"

    emb = client.embeddings.create(model="embed", input="x y z")
    assert len(emb.data[0].embedding) == 64

    assert srv.proc.terminate() == 0
    rows = read_rows(srv.db_path)
    assert [(r["status"], r["error_code"]) for r in rows] == [
        (200, None), (200, None), (502, "bad_upstream_response"), (429, "upstream_rate_limited"), (200, None)]
    assert rows[0]["completion_tokens"] == 5
    assert rows[1]["completion_tokens"] == 4  # usage the gateway asked for on the client's behalf
    assert rows[0]["deployment"] == "simhttp/sim-remote"


def test_workers_are_forked_only_while_no_other_thread_runs() -> None:
    """Forked workers skip re-importing everything (start-up with 2 workers: about 1.2-1.5 s -> 0.6-0.7 s);
    a process that already runs a thread spawns them instead (fork would copy that thread's locks)."""
    import threading

    from setpoint.proxy.server import _start_method

    if threading.active_count() == 1:
        assert _start_method() == "fork"
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert _start_method() == "spawn"
    finally:
        stop.set()
        t.join()
