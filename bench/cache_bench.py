#!/usr/bin/env python3
"""Cache benchmark: what a hit costs, and what the cache adds to a miss.

Starts `setpoint serve` (one worker, auth and request logging on) over the built-in simulated
provider with zero latency, so the numbers are the gateway's own. Drives it from this process with
an aiohttp client (`--conns` concurrent requests, `--requests` per scenario) and reads the server's
CPU time from /proc before and after each scenario.

Scenarios (all on the same model alias, temperature 0):
  off            cache not configured (baseline)
  exact-hit      the same request every time: served from the exact cache
  exact-miss     cache on, `x-setpoint-cache-ttl: 0.000001`: every request looks up, misses, calls
                 the upstream and writes an entry (the miss path's whole overhead)
  semantic-hit   a paraphrase of a stored prompt: exact miss, embedding, vector search, guard, hit
  semantic-miss  a new prompt every time: exact miss, embedding, search, upstream, write, index add

usage: bench/cache_bench.py [--requests 2000] [--conns 8] [--state memory://|redis://...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

KEY = "sk-bench-0123456789abcdef"
SYSTEM = {"role": "system", "content": "You are a support assistant."}
CONFIG = """\
data_dir: {data_dir}
state: {{url: "{state}"}}
providers:
  sim: {{type: simulated, seed: 1, latency: {{ttft_ms: 0, per_token_ms: 0, jitter: 0}}, output: {{min_tokens: 20, max_tokens: 20}}}}
models:
  plain: {{deployments: [{{provider: sim, model: m, pricing: {{input_per_mtok: 1, output_per_mtok: 2}}}}]}}
  exact: {{deployments: [{{provider: sim, model: m, pricing: {{input_per_mtok: 1, output_per_mtok: 2}}}}], cache: {{ttl_s: 3600}}}}
  semantic: {{deployments: [{{provider: sim, model: m, pricing: {{input_per_mtok: 1, output_per_mtok: 2}}}}], cache: {{ttl_s: 3600, semantic: {{}}}}}}
keys: [{{name: bench, key: {key}, team: bench}}]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def body(model: str, text: str) -> dict:
    return {"model": model, "temperature": 0, "messages": [SYSTEM, {"role": "user", "content": text}]}


async def drive(url: str, bodies: list[dict], headers: dict[str, str], conns: int) -> tuple[list[float], dict[str, int]]:
    lat: list[float] = []
    seen: dict[str, int] = {}
    queue = iter(bodies)
    hdrs = {"Authorization": f"Bearer {KEY}", **headers}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conns)) as s:
        async def worker() -> None:
            for b in queue:
                t0 = time.perf_counter()
                async with s.post(url, json=b, headers=hdrs) as r:
                    await r.read()
                    assert r.status == 200, await r.text()
                    v = r.headers.get("x-setpoint-cache", "-")
                    seen[v] = seen.get(v, 0) + 1
                lat.append((time.perf_counter() - t0) * 1000)

        await asyncio.gather(*(worker() for _ in range(conns)))
    return lat, seen


def scenarios(n: int) -> list[tuple[str, list[dict], dict[str, str], list[dict]]]:
    """(name, warm-up bodies, headers, measured bodies)."""
    stored = "How do I reset my password?"
    para = "How can I reset my password?"
    return [
        ("off", [body("plain", stored)] * 50, {}, [body("plain", stored)] * n),
        ("exact-hit", [body("exact", stored)], {}, [body("exact", stored)] * n),
        ("exact-miss", [body("exact", "warm")] * 50, {"x-setpoint-cache-ttl": "0.000001"}, [body("exact", stored + " x")] * n),
        ("semantic-hit", [body("semantic", stored)], {}, [body("semantic", para)] * n),
        ("semantic-miss", [body("semantic", f"warm question {i}") for i in range(20)], {},
         [body("semantic", f"Question number {i}: how do I configure feature {i * 7919 % 10007}?") for i in range(n)]),
        ("off (again)", [], {}, [body("plain", stored)] * n),  # the first scenario also pays for warm-up
    ]


async def run(url: str, pid: int, n: int, conns: int) -> list[dict]:
    out = []
    for name, warm, headers, bodies in scenarios(n):
        if warm:
            await drive(url, warm, headers if name not in ("exact-hit", "semantic-hit") else {}, 1)
            await asyncio.sleep(0.3)  # the warm-up's cache write lands
        c0, t0 = cpu_s(pid), time.perf_counter()
        lat, seen = await drive(url, bodies, headers, conns)
        wall, cpu = time.perf_counter() - t0, cpu_s(pid) - c0
        lat.sort()
        out.append({"scenario": name, "rps": len(lat) / wall, "p50": statistics.median(lat),
                    "p99": lat[int(len(lat) * 0.99) - 1], "cpu_ms": cpu * 1000 / len(lat), "rss": rss_mb(pid),
                    "cache": ", ".join(f"{k} {v}" for k, v in sorted(seen.items()))})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--conns", type=int, default=8)
    ap.add_argument("--state", default="memory://")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "setpoint.yaml"
        cfg.write_text(CONFIG.format(data_dir=Path(tmp) / "data", state=args.state, key=KEY))
        port = free_port()
        exe = Path(sys.executable).with_name("setpoint")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "setpoint.cli.main"]
        proc = subprocess.Popen([*cmd, "serve", "--config", str(cfg), "--port", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.time() + 60
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        break
                except OSError:
                    if time.time() > deadline or proc.poll() is not None:
                        raise SystemExit(f"setpoint did not start: {proc.stderr.read().decode() if proc.stderr else ''}")
                    time.sleep(0.1)
            rows = asyncio.run(run(f"http://127.0.0.1:{port}/v1/chat/completions", proc.pid, args.requests, args.conns))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    print(f"\n{args.requests} requests per scenario, {args.conns} connections, state {args.state}, "
          f"load {os.getloadavg()[0]:.1f}\n")
    print("| scenario | RPS | p50 ms | p99 ms | server CPU ms/req | RSS MB | x-setpoint-cache |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['scenario']} | {r['rps']:,.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['cpu_ms']:.3f} | "
              f"{r['rss']:.0f} | {r['cache']} |")


if __name__ == "__main__":
    main()
