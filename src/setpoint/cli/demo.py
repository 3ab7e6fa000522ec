"""`setpoint demo`: a gateway on the simulated provider, a burst of real openai-SDK traffic, a report."""

from __future__ import annotations

import sqlite3
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click

from setpoint.config.compile import compile_config
from setpoint.config.load import parse_config
from setpoint.keys.store import SqliteKeyStore
from setpoint.proxy.background import BackgroundGateway

__all__ = ["demo_config", "run_demo"]


def demo_config(data_dir: str) -> dict[str, Any]:
    return {
        "data_dir": data_dir,
        "providers": {
            "sim": {"type": "simulated", "seed": 7, "latency": {"ttft_ms": 40, "per_token_ms": 3}},
            "sim-flaky": {
                "type": "simulated", "seed": 11, "latency": {"ttft_ms": 60, "per_token_ms": 4},
                "faults": {"rate_limit": 0.15, "unavailable": 0.05, "cut_stream": 0.1},
            },
        },
        "models": {
            "sim-mini": {"deployments": [{"provider": "sim", "model": "mini", "pricing": {"input_per_mtok": 0.15, "output_per_mtok": 0.60}}]},
            "sim-large": {"deployments": [{"provider": "sim", "model": "large", "pricing": {"input_per_mtok": 2.50, "output_per_mtok": 10.0}}]},
            "sim-flaky": {"deployments": [{"provider": "sim-flaky", "model": "flaky", "pricing": {"input_per_mtok": 1.0, "output_per_mtok": 4.0}}]},
            "sim-embed": {"kind": "embedding", "deployments": [{"provider": "sim", "model": "embed", "pricing": {"input_per_mtok": 0.02}}]},
        },
    }


def _one(client: Any, i: int) -> str:
    import openai

    model = ("sim-mini", "sim-large", "sim-flaky")[i % 3]
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": f"Question {i}: what is a set point?"}]
    try:
        if i % 7 == 6:
            client.embeddings.create(model="sim-embed", input=[f"document {i}", "another document"])
        elif i % 2:
            stream = client.chat.completions.create(model=model, messages=messages, stream=True, stream_options={"include_usage": True})
            for _ in stream:
                pass
        else:
            client.chat.completions.create(model=model, messages=messages, max_tokens=48)
        return "ok"
    except openai.APIError as exc:
        return type(exc).__name__


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def _report(db: Path) -> None:
    conn = sqlite3.connect(db)
    rows = conn.execute(
        "SELECT model, endpoint, is_stream, status, prompt_tokens, completion_tokens, cost_micros, latency_ms, ttft_ms FROM requests"
    ).fetchall()
    conn.close()
    groups: dict[str, list[tuple[Any, ...]]] = {}
    for r in rows:
        groups.setdefault(r[0] or "-", []).append(r)
    header = f"{'model':<11} {'reqs':>5} {'stream':>6} {'errors':>6} {'prompt tok':>10} {'output tok':>10} {'cost $':>10} {'p50 ms':>7} {'p95 ms':>7} {'ttft p50':>8}"
    click.echo(header)
    click.echo("-" * len(header))
    for model in sorted(groups):
        g = groups[model]
        lat = [r[7] for r in g if r[7] is not None]
        ttft = [r[8] for r in g if r[8] is not None]
        cost = sum(r[6] or 0 for r in g) / 1e6
        click.echo(
            f"{model:<11} {len(g):>5} {sum(r[2] for r in g):>6} {sum(1 for r in g if r[3] >= 400):>6} "
            f"{sum(r[4] for r in g):>10} {sum(r[5] for r in g):>10} {cost:>10.6f} {_pct(lat, 50):>7.1f} {_pct(lat, 95):>7.1f} "
            f"{(f'{_pct(ttft, 50):.1f}' if ttft else '-'):>8}"
        )
    total = sum(r[6] or 0 for r in rows)
    click.echo(f"\n{len(rows)} requests logged, total cost {total} micro-dollars (${total / 1e6:.6f}); log: {db}")


def run_demo(n_requests: int, data_dir: str | None) -> None:
    import openai

    tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="setpoint-demo-")
    root = Path(data_dir or tmp.name)  # type: ignore[union-attr]
    try:
        runtime = compile_config(parse_config(demo_config(str(root))))
        with BackgroundGateway(runtime) as gw:
            secret, _ = SqliteKeyStore(runtime.data_dir / "keys.db").create(name="demo", team="demo-team")
            click.echo(f"setpoint demo: gateway on {gw.base_url} (simulated provider, data in {root})")
            click.echo(f"sending {n_requests} requests with the openai SDK (unary, streaming, embeddings; one flaky upstream)...\n")
            client = openai.OpenAI(base_url=gw.base_url, api_key=secret, max_retries=0)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=8) as pool:
                outcomes = list(pool.map(lambda i: _one(client, i), range(n_requests)))
            wall = time.perf_counter() - t0
            gw.flush_log()
            summary = {o: outcomes.count(o) for o in sorted(set(outcomes))}
            click.echo(f"client saw: {', '.join(f'{k}={v}' for k, v in summary.items())} in {wall:.2f}s\n")
            _report(runtime.data_dir / "requests.db")
            click.echo("\nTry it yourself while a gateway runs: OpenAI(base_url=..., api_key=<virtual key>)")
    finally:
        if tmp is not None:
            tmp.cleanup()
