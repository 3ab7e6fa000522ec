#!/usr/bin/env python3
"""setpoint's benchmark: nginx mock upstreams + setpoint (+ the Python floor, + TensorZero) under wrk.

Everything runs on loopback. For each system, mode and connection count it runs one bounded wrk load
(harness/bench.py) and records RPS, p50/p99, peak RSS and CPU ms per request of the system's process
tree; then prints a markdown table. Auth and request logging are on for setpoint (a static virtual
key; records go through the spool into SQLite).

usage: bench/run_bench.py [--secs 10] [--systems setpoint-w1,setpoint-w2,pyfloor,tensorzero]
       systems also: setpoint-w3 (3 workers)
       systems also: setpoint-w1-limits (rate limits + budgets, memory state),
                     setpoint-w1-limits-redis, setpoint-w2-limits-redis (state in a local redis-server)
                          [--modes json,stream,delay] [--conns "1 16 64"] [--delay-conns 256]
Modes: json = fast JSON mock, stream = fast SSE mock, delay = JSON after 100 ms.
Needs: nginx, wrk, libnginx-mod-http-echo (installed with apt-get if missing, as root).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
HARNESS = HERE / "harness"
BENCH_DIR = Path(os.environ.get("SETPOINT_BENCH_DIR", "/tmp/setpoint-bench"))
KEY = "sk-bench-0123456789abcdef"
PORTS = {"setpoint-w1": 18200, "setpoint-w2": 18201, "setpoint-w1-limits": 18202, "setpoint-w1-limits-redis": 18203,
         "setpoint-w2-limits-redis": 18204, "setpoint-w3": 18205, "pyfloor": 18100}
REDIS_PORT = 18379
# Limits and budgets on, sized so they never refuse during a run: every request still pays for the
# atomic take/reserve and the settle.
POLICY = """state: {{url: "{state}"}}
rate_limits:
  - {{scope: key, rpm: 100000000, tpm: 1000000000}}
  - {{scope: model, rpm: 100000000}}
budgets:
  - {{scope: team, period: daily, limit_usd: 1000000000}}
  - {{scope: key, period: monthly, limit_usd: 1000000000}}
"""
UPSTREAM = {"json": 18080, "stream": 18081, "delay": 18082}
MODEL = {"json": "gpt-4o-mini", "stream": "gpt-4o-mini-stream", "delay": "gpt-4o-mini-slow"}

CONFIG = """\
data_dir: {data_dir}
server: {{host: 127.0.0.1, port: {port}, workers: {workers}}}
providers:
  mock: {{type: openai_compatible, base_url: "http://127.0.0.1:18080/v1", api_key: sk-mock}}
  mockstream: {{type: openai_compatible, base_url: "http://127.0.0.1:18081/v1", api_key: sk-mock}}
  mockslow: {{type: openai_compatible, base_url: "http://127.0.0.1:18082/v1", api_key: sk-mock}}
models:
  gpt-4o-mini: {{deployments: [{{provider: mock, model: gpt-4o-mini, pricing: {{input_per_mtok: 0.15, output_per_mtok: 0.6}}}}]}}
  gpt-4o-mini-stream: {{deployments: [{{provider: mockstream, model: gpt-4o-mini, pricing: {{input_per_mtok: 0.15, output_per_mtok: 0.6}}}}]}}
  gpt-4o-mini-slow: {{deployments: [{{provider: mockslow, model: gpt-4o-mini, pricing: {{input_per_mtok: 0.15, output_per_mtok: 0.6}}}}]}}
keys:
  - {{name: bench, key: {key}, team: bench}}
"""


def sh(cmd: str) -> None:
    subprocess.run(cmd, shell=True, check=True)


def ensure_tools() -> None:
    echo = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")
    if shutil.which("nginx") and shutil.which("wrk") and echo.exists():
        return
    sh("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx wrk libnginx-mod-http-echo >/dev/null")


def start_mocks() -> dict[str, int]:
    pids = {}
    for name, conf in (("nginx-mock", "nginx-mock.conf"), ("nginx-delay", "nginx-delay.conf")):
        d = BENCH_DIR / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "nginx.conf").write_text((HARNESS / "mock" / conf).read_text().replace("@BENCH_DIR@", str(BENCH_DIR)))
        pidfile = d / "nginx.pid"
        if not (pidfile.exists() and _alive(int(pidfile.read_text().strip() or 0))):
            sh(f"nginx -c {d}/nginx.conf -p {d}/")
        pids[name] = int(pidfile.read_text().strip())
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return pid > 0
    except OSError:
        return False


def wait_http(url: str, timeout_s: float = 30.0, headers: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=1) as r:
                if r.status < 500:
                    return time.perf_counter() - t0
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return time.perf_counter() - t0
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{url} not ready after {timeout_s}s")


def start_redis() -> subprocess.Popen[bytes]:
    d = BENCH_DIR / "redis"
    d.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen(["redis-server", "--port", str(REDIS_PORT), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                          "--dir", str(d)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(0.5)
    return p


def start_setpoint(name: str, workers: int) -> tuple[subprocess.Popen[bytes], float]:
    d = BENCH_DIR / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    cfg = d / "setpoint.yaml"
    text = CONFIG.format(data_dir=d / "data", port=PORTS[name], workers=workers, key=KEY)
    if "-limits" in name:
        state = f"redis://127.0.0.1:{REDIS_PORT}/0" if name.endswith("-redis") else "memory://"
        text += POLICY.format(state=state)
    cfg.write_text(text)
    exe = Path(sys.executable).with_name("setpoint")
    log = open(d / "serve.log", "wb")
    p = subprocess.Popen([str(exe), "serve", "--config", str(cfg)], stdout=log, stderr=log, start_new_session=True)
    ready = wait_http(f"http://127.0.0.1:{PORTS[name]}/health")
    return p, ready


def start_pyfloor() -> subprocess.Popen[bytes]:
    log = open(BENCH_DIR / "pyfloor.log", "wb")
    p = subprocess.Popen([sys.executable, str(HARNESS / "pyfloor_aiohttp_proxy.py"), str(PORTS["pyfloor"])],
                         stdout=log, stderr=log, start_new_session=True)
    wait_http(f"http://127.0.0.1:{PORTS['pyfloor']}/nothing")
    return p


def start_tensorzero() -> tuple[subprocess.Popen[bytes], str]:
    venv = BENCH_DIR / "venv-tz"
    if not (venv / "bin" / "python").exists():
        sh(f"{sys.executable} -m venv {venv} && {venv}/bin/pip install -q tensorzero")
    d = BENCH_DIR / "tensorzero"
    d.mkdir(parents=True, exist_ok=True)
    for f in ("tensorzero.toml", "run_gateway.py"):
        shutil.copy(HARNESS / "peer-configs" / f, d / f)
    (d / "base_url.txt").unlink(missing_ok=True)
    log = open(d / "tz.log", "wb")
    p = subprocess.Popen([str(venv / "bin" / "python"), "run_gateway.py"], cwd=d, stdout=log, stderr=log, start_new_session=True)
    for _ in range(240):
        if (d / "base_url.txt").exists() and (d / "base_url.txt").read_text():
            return p, (d / "base_url.txt").read_text().strip()
        time.sleep(0.25)
    raise RuntimeError("tensorzero did not start")


def stop(p: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        os.killpg(p.pid, signal.SIGKILL)


def run_one(name: str, url: str, mode: str, conns: int, secs: int, pid: int, mock_pid: int, env: dict[str, str]) -> dict:
    args = [sys.executable, str(HARNESS / "bench.py"), "--name", f"{name}-{mode}", "--url", url, "--conns", str(conns),
            "--secs", str(secs), "--pid", str(pid), "--mockpid", str(mock_pid), "--note", "run_bench"]
    if mode == "stream":
        env = {**env, "STREAM": "1"}
    for k, v in env.items():
        args += ["--env", f"{k}={v}"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=secs + 120).stdout
    line = next((ln for ln in out.splitlines() if ln.startswith("{")), "{}")
    row = json.loads(line)
    print(f"  {name:<12} {mode:<6} c={conns:<4} rps={row.get('rps')} p50={row.get('p50_ms')} p99={row.get('p99_ms')} "
          f"cpu_ms/req={row.get('sut_cpu_ms_per_req')} rss={row.get('sut_peak_rss_mb')} non2xx={row.get('non2xx')}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--secs", type=int, default=10)
    ap.add_argument("--systems", default="setpoint-w1,setpoint-w2,pyfloor,tensorzero")
    ap.add_argument("--modes", default="json,stream,delay")
    ap.add_argument("--conns", default="1 16 64")
    ap.add_argument("--delay-conns", default="256")
    a = ap.parse_args()
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    ensure_tools()
    mocks = start_mocks()
    systems = a.systems.split(",")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    urls: dict[str, str] = {}
    envs: dict[str, dict[str, str]] = {}
    startup: dict[str, float] = {}
    rows: list[dict] = []
    try:
        if any(s.endswith("-redis") for s in systems):
            procs["redis"] = start_redis()
        for s in systems:
            if s.startswith("setpoint"):
                procs[s], startup[s] = start_setpoint(s, int(s.split("-")[1][1:]))
                urls[s] = f"http://127.0.0.1:{PORTS[s]}/v1/chat/completions"
                envs[s] = {"AUTH": KEY}
            elif s == "pyfloor":
                procs[s] = start_pyfloor()
                urls[s] = f"http://127.0.0.1:{PORTS[s]}/v1/chat/completions"
                envs[s] = {}
            elif s == "tensorzero":
                procs[s], base = start_tensorzero()
                urls[s] = base + "/chat/completions"
                envs[s] = {}
        for s, t in startup.items():
            print(f"{s} ready {t * 1000:.0f} ms after spawn")
        for mode in a.modes.split(","):
            conns = a.delay_conns if mode == "delay" else a.conns
            mock_pid = mocks["nginx-delay" if mode == "delay" else "nginx-mock"]
            for s in systems:
                env = dict(envs[s])
                if s == "tensorzero":
                    env["MODEL"] = "tensorzero::model_name::" + {"json": "mock", "stream": "mockstream", "delay": "mockslow"}[mode]
                elif s.startswith("setpoint") or mode == "delay":
                    env["MODEL"] = MODEL[mode]
                for c in conns.split():
                    row = run_one(s, urls[s], mode, int(c), a.secs, procs[s].pid, mock_pid, env)
                    row.update(system=s, mode=mode)
                    rows.append(row)
                    time.sleep(1)
    finally:
        for p in procs.values():
            stop(p)
    res = BENCH_DIR / "results.jsonl"
    with res.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print("\n| system | mode | conns | RPS | p50 ms | p99 ms | CPU ms/req | peak RSS MB | non-2xx + errors |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        errs = (r.get("non2xx") or 0) + sum(r.get(k) or 0 for k in ("err_connect", "err_read", "err_write", "err_timeout"))
        print(f"| {r['system']} | {r['mode']} | {r['conns']} | {r.get('rps', 0):,.0f} | {r.get('p50_ms', 0):.2f} | "
              f"{r.get('p99_ms', 0):.2f} | {r.get('sut_cpu_ms_per_req') or '-'} | {r.get('sut_peak_rss_mb') or '-'} | {errs} |")
    if startup:
        print("\nstart-up (spawn -> /health answers): " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in startup.items()))


if __name__ == "__main__":
    main()
