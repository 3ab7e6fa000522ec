"""Fault scenarios for routing, resilience and overload control (docs/resilience.md).

Each test runs an in-process gateway (`BackgroundGateway`) in front of the built-in simulated
provider (faults set in its config or forced per request with `sim_fault`), or in front of a tiny
aiohttp upstream whose behaviour the test flips. Upstream attempts are counted two ways: by a
wrapper around each provider's `send` (ground truth) and by the request records' `attempts`
annotation. Latencies are kept at a few milliseconds; the breaker scenario runs on a `ManualClock`
so that `open_s` passes in virtual time.

Measured numbers are printed (`pytest -s` shows them); the assertions hold the promises.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web

from setpoint.clock import ManualClock
from setpoint.config.compile import compile_config
from setpoint.config.load import parse_config
from setpoint.policy.resilience.breaker import BreakerState
from setpoint.proxy.background import BackgroundGateway

CRITICAL_KEY = "sk-res-critical-0123456789abcdef"
DEFAULT_KEY = "sk-res-default-0123456789abcdef"
SHEDDABLE_KEY = "sk-res-sheddable-0123456789abcdef"
KEYS = [
    {"name": "crit", "key": CRITICAL_KEY, "priority": "critical"},
    {"name": "dflt", "key": DEFAULT_KEY},
    {"name": "shed", "key": SHEDDABLE_KEY, "priority": "sheddable"},
]
PRICING = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}

# Fast retries everywhere unless a test says otherwise; a generous budget and a breaker that does
# not open unless a test configures it to.
BASE_RESILIENCE: dict[str, Any] = {
    "max_attempts": 3,
    "backoff_base_s": 0.001,
    "backoff_cap_s": 0.005,
    "retry_budget": {"ratio": 10, "min_per_s": 100, "window_s": 10},
    "breaker": {"min_calls": 1000},
}


# -- config helpers -----------------------------------------------------------------------------


def sim(seed: int = 1, *, ttft_ms: float = 1.0, per_token_ms: float = 0.05, faults: dict[str, Any] | None = None,
        timeouts: dict[str, Any] | None = None, tokens: tuple[int, int] = (4, 8)) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "type": "simulated",
        "seed": seed,
        "latency": {"ttft_ms": ttft_ms, "per_token_ms": per_token_ms, "jitter": 0},
        "output": {"min_tokens": tokens[0], "max_tokens": tokens[1]},
    }
    if faults:
        cfg["faults"] = faults
    if timeouts:
        cfg["timeouts"] = timeouts
    return cfg


def dep(provider: str, model: str = "m", **extra: Any) -> dict[str, Any]:
    return {"provider": provider, "model": model, "pricing": PRICING, **extra}


def merge(base: dict[str, Any], over: dict[str, Any] | None) -> dict[str, Any]:
    out = dict(base)
    for k, v in (over or {}).items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config(providers: dict[str, Any], models: dict[str, Any], resilience: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"providers": providers, "models": models, "keys": KEYS, "resilience": merge(BASE_RESILIENCE, resilience)}


# -- gateway helpers ----------------------------------------------------------------------------


def resilience_of(gw: BackgroundGateway) -> Any:
    assert gw.server is not None
    return gw.server.gateway.resilience


def count_upstream_calls(gw: BackgroundGateway) -> Counter[str]:
    """Wrap every provider's `send`: the returned Counter counts upstream calls per provider."""
    assert gw.server is not None
    counts: Counter[str] = Counter()
    for name, prov in gw.server.gateway.runtime.providers.items():
        orig = prov.send

        async def send(call: Any, _orig: Any = orig, _name: str = name) -> Any:
            counts[_name] += 1
            return await _orig(call)

        prov.send = send  # type: ignore[method-assign]
    return counts


def body(model: str = "chat", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}], **extra}


def auth(key: str = DEFAULT_KEY, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **headers}


def chat(http: httpx.Client, gw: BackgroundGateway, *, key: str = DEFAULT_KEY,
         headers: dict[str, str] | None = None, **extra: Any) -> httpx.Response:
    return http.post(gw.base_url + "/chat/completions", json=body(**extra), headers={**auth(key), **(headers or {})})


@dataclass
class StreamResult:
    status: int
    headers: httpx.Headers
    events: list[str]  # data payloads, in order
    raw: str = ""

    @property
    def done(self) -> bool:
        return "[DONE]" in self.events

    @property
    def error(self) -> dict[str, Any] | None:
        for e in reversed(self.events):
            if e.startswith("{") and '"error"' in e:
                doc = json.loads(e)
                if "error" in doc and "choices" not in doc:
                    return doc["error"]
        return None

    @property
    def content_chunks(self) -> int:
        n = 0
        for e in self.events:
            if e.startswith("{"):
                doc = json.loads(e)
                for c in doc.get("choices") or []:
                    if (c.get("delta") or {}).get("content"):
                        n += 1
        return n


def stream(http: httpx.Client, gw: BackgroundGateway, *, key: str = DEFAULT_KEY, **extra: Any) -> StreamResult:
    r = http.post(gw.base_url + "/chat/completions", json=body(stream=True, **extra), headers=auth(key))
    events = []
    for block in r.text.split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: "):
                events.append(line[6:])
    return StreamResult(r.status_code, r.headers, events, r.text)


def records_by_id(gateway_rows: Callable[..., list[dict[str, Any]]], gw: BackgroundGateway) -> dict[str, dict[str, Any]]:
    out = {}
    for row in gateway_rows(gw):
        row["ann"] = json.loads(row["annotations"]) if row["annotations"] else {}
        out[row["id"]] = row
    return out


def advance(gw: BackgroundGateway, clock: ManualClock, seconds: float) -> None:
    """Move a ManualClock forward on the gateway's own loop (where its sleepers live)."""
    asyncio.run_coroutine_threadsafe(clock.advance(seconds), gw._loop).result(timeout=10)  # noqa: SLF001


class FlipUpstream:
    """A tiny OpenAI-compatible upstream: 503 while `down`, else a small completion."""

    def __init__(self) -> None:
        self.down = True
        self.calls = 0

    def app(self) -> web.Application:
        async def chat_handler(request: web.Request) -> web.Response:
            self.calls += 1
            req = await request.json()
            if self.down:
                return web.json_response(
                    {"error": {"message": "down for maintenance", "type": "server_error", "code": "down"}}, status=503)
            return web.json_response({
                "id": "chatcmpl-flip", "object": "chat.completion", "created": 1, "model": req.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "up again"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
            })

        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat_handler)
        return app


def quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# -- 1. a 429 storm on the primary --------------------------------------------------------------


async def test_429_storm_shifts_to_fallback_without_retry_storm(make_gateway, gateway_rows) -> None:
    ratio, min_per_s, window_s = 0.2, 0.5, 10.0
    initial = 16
    cfg = config(
        {"primary": sim(1, faults={"rate_limit": 1.0, "retry_after_s": 0}), "backup": sim(2)},
        {"chat": {"deployments": [dep("primary"), dep("backup")]}},
        {"retry_budget": {"ratio": ratio, "min_per_s": min_per_s, "window_s": window_s},
         "breaker": {"min_calls": 5, "failure_rate": 0.5, "open_s": 60},
         "concurrency": {"initial": initial, "min_limit": 1, "queue_timeout_s": 2}},
    )
    gw = make_gateway(cfg)
    calls = count_upstream_calls(gw)
    n = 80
    started = time.monotonic()
    results: list[httpx.Response] = []
    sem = asyncio.Semaphore(8)
    async with httpx.AsyncClient(timeout=20, trust_env=False) as client:
        async def one() -> None:
            async with sem:
                results.append(await client.post(gw.base_url + "/chat/completions", json=body(), headers=auth()))
        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), 30)
    elapsed = time.monotonic() - started
    assert elapsed < window_s, "the run must fit in one budget window for the bound below to apply"

    res = resilience_of(gw)
    ok = [r for r in results if r.status_code == 200]
    failed = [r for r in results if r.status_code != 200]
    routes = Counter(r.headers.get("x-setpoint-route") for r in ok)
    attempts_upstream = calls["primary"] + calls["backup"]
    recs = records_by_id(gateway_rows, gw)
    attempts_recorded = sum(len(recs[r.headers["x-request-id"]]["ann"].get("attempts", [])) for r in results)
    bound = (1 + ratio) * n + min_per_s * window_s
    print(f"\n429 storm: {n} requests in {elapsed:.2f}s, {len(ok)} ok {dict(routes)}, "
          f"failed {Counter((r.status_code, r.json()['error']['code']) for r in failed)}, upstream attempts "
          f"{dict(calls)} = {attempts_upstream} (records {attempts_recorded}) <= bound {bound:.0f}; "
          f"primary limit {res.limiters['primary/m'].limit:.2f} (initial {initial}), "
          f"breaker {res.breakers['primary/m'].state.value}")

    # Traffic that was served went to the fallback, and got there by falling back, not by luck.
    assert ok, "no request was served although the fallback is healthy"
    assert set(routes) == {"backup/m"}
    assert len(ok) >= min_per_s * window_s  # at least the budget's floor of fallbacks happened
    # 429 is not a breaker failure: the primary stays CLOSED and keeps being tried first...
    assert res.breakers["primary/m"].state is BreakerState.CLOSED
    assert res.breakers["primary/m"].transitions == 0
    assert calls["primary"] >= n * 0.9
    # ...but its concurrency limit came down.
    assert res.limiters["primary/m"].limit < initial
    # The failures are the primary's 429s relayed (or the budget refusing a fallback), never a 5xx.
    assert all(r.status_code in (429, 503) for r in failed)
    # No retry storm: promise 4.
    assert attempts_recorded == attempts_upstream
    assert attempts_upstream <= bound
    assert attempts_upstream < 2 * n  # without the budget every request would have made 2 or 3 attempts


# -- 2. the retry budget bounds upstream attempts (promise 4) -----------------------------------


@pytest.mark.parametrize(("ratio", "min_per_s"), [(0.2, 0.5), (0.0, 0.0)])
def test_retry_budget_bounds_attempts_when_everything_fails(make_gateway, gateway_rows, http, ratio, min_per_s) -> None:
    window_s = 10.0
    cfg = config(
        {f"p{i}": sim(i, faults={"unavailable": 1.0}) for i in range(3)},
        {"chat": {"deployments": [dep(f"p{i}") for i in range(3)]}},
        {"max_attempts": 3, "retry_budget": {"ratio": ratio, "min_per_s": min_per_s, "window_s": window_s},
         "breaker": {"min_calls": 1000}},
    )
    gw = make_gateway(cfg)
    calls = count_upstream_calls(gw)
    n = 60
    started = time.monotonic()
    responses = [chat(http, gw) for _ in range(n)]
    assert time.monotonic() - started < window_s
    total = sum(calls.values())
    recs = records_by_id(gateway_rows, gw)
    recorded = sum(len(recs[r.headers["x-request-id"]]["ann"]["attempts"]) for r in responses)
    bound = (1 + ratio) * n + min_per_s * window_s
    print(f"\nretry budget ratio={ratio} min_per_s={min_per_s}: {n} requests -> {total} upstream attempts "
          f"{dict(calls)} (bound {bound:.0f}; without a budget {3 * n}); codes "
          f"{Counter(r.json()['error']['code'] for r in responses)}")
    assert all(r.status_code == 503 for r in responses)
    assert recorded == total
    assert total <= bound
    if ratio == 0 and min_per_s == 0:
        assert total == n  # not a single retry or fallback
        assert calls == Counter({"p0": n})
    else:
        # The budget was used up to (nearly) its allowance: it limits, it does not forbid.
        assert total >= n + math.floor(ratio * n + min_per_s * window_s) - 1


def test_budget_exhausted_request_fails_with_its_last_upstream_error(make_gateway, http) -> None:
    cfg = config(
        {"p0": sim(0, faults={"unavailable": 1.0}), "p1": sim(1, faults={"unavailable": 1.0})},
        {"chat": {"deployments": [dep("p0"), dep("p1")]}},
        {"retry_budget": {"ratio": 0, "min_per_s": 0, "window_s": 10}},
    )
    gw = make_gateway(cfg)
    r = chat(http, gw)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "upstream_unavailable"


# -- 3. primary down: the breaker opens, probes, and closes again ------------------------------


def test_breaker_opens_probes_and_closes_when_primary_recovers(make_gateway, serve_app, gateway_rows, http) -> None:
    upstream = FlipUpstream()
    app = serve_app(upstream.app())
    clock = ManualClock()
    open_s = 30.0
    cfg = config(
        {"primary": {"type": "openai_compatible", "base_url": app.url + "/v1"}, "backup": sim(2, ttft_ms=0, per_token_ms=0)},
        {"chat": {"deployments": [dep("primary"), dep("backup")]}},
        {"backoff_base_s": 0, "breaker": {"window_s": 60, "min_calls": 4, "failure_rate": 0.5, "open_s": open_s,
                                          "half_open_probes": 2}},
    )
    gw = make_gateway(cfg, clock)
    breaker = resilience_of(gw).breaker("primary/m")

    def send() -> tuple[str, str]:
        """One request; (route, request id)."""
        r = chat(http, gw)
        assert r.status_code == 200, r.text
        return r.headers["x-setpoint-route"], r.headers["x-request-id"]

    ids: list[str] = []
    # Primary down: each request tries it, then falls back. After min_calls failures it opens.
    for _ in range(4):
        route, rid = send()
        ids.append(rid)
        assert route == "backup/m"
    assert breaker.state is BreakerState.OPEN
    assert upstream.calls == 4
    # Open: the primary is skipped (no upstream call at all), the fallback serves at once.
    for _ in range(3):
        route, rid = send()
        ids.append(rid)
        assert route == "backup/m"
    assert upstream.calls == 4
    advance(gw, clock, open_s - 1)
    send()
    assert upstream.calls == 4 and breaker.state is BreakerState.OPEN
    # After open_s: a half-open probe goes to the primary, fails, and the breaker opens again.
    advance(gw, clock, 1.01)
    route, rid = send()
    ids.append(rid)
    assert route == "backup/m"
    assert upstream.calls == 5
    assert breaker.state is BreakerState.OPEN
    send()
    assert upstream.calls == 5  # re-opened for another open_s
    # The primary recovers; after open_s two probes succeed and the breaker closes.
    upstream.down = False
    advance(gw, clock, open_s + 0.01)
    probe_routes = [send()[0] for _ in range(2)]
    assert probe_routes == ["primary/m", "primary/m"]
    assert breaker.state is BreakerState.CLOSED
    route, rid = send()
    ids.append(rid)
    assert route == "primary/m"
    assert upstream.calls == 8

    recs = records_by_id(gateway_rows, gw)
    attempts = [recs[i]["ann"]["attempts"] for i in ids]
    print(f"\nbreaker: attempts per request {attempts}; transitions {breaker.transitions}")
    assert attempts[:4] == [["primary/m", "backup/m"]] * 4
    assert attempts[4:7] == [["backup/m"]] * 3
    assert attempts[7] == ["primary/m", "backup/m"]  # the failed half-open probe, then the fallback
    assert attempts[8] == ["primary/m"]
    # CLOSED -> OPEN -> HALF_OPEN -> OPEN -> HALF_OPEN -> CLOSED
    assert breaker.transitions == 5


# -- 4. a stall before the first token ----------------------------------------------------------


@pytest.mark.parametrize("is_stream", [False, True])
def test_stall_before_first_token_falls_back_within_ttft_timeout(make_gateway, gateway_rows, http, is_stream) -> None:
    ttft_s = 0.2
    cfg = config(
        {"primary": sim(1, faults={"stall": 1.0, "stall_s": 30}, timeouts={"ttft_s": ttft_s}), "backup": sim(2)},
        {"chat": {"deployments": [dep("primary"), dep("backup")]}},
    )
    gw = make_gateway(cfg)
    t0 = time.monotonic()
    if is_stream:
        s = stream(http, gw)
        status, headers = s.status, s.headers
        assert s.done and s.error is None
    else:
        r = chat(http, gw)
        status, headers = r.status_code, r.headers
    elapsed = time.monotonic() - t0
    rec = records_by_id(gateway_rows, gw)[headers["x-request-id"]]
    print(f"\nstall (stream={is_stream}): served by {headers.get('x-setpoint-route')} in {elapsed:.3f}s; "
          f"attempts {rec['ann']['attempts']}")
    assert status == 200
    assert headers["x-setpoint-route"] == "backup/m"
    assert ttft_s <= elapsed < 2.0  # waited for the TTFT timeout, not for the 30 s stall
    assert rec["ann"]["attempts"] == ["primary/m", "backup/m"]
    assert rec["deployment"] == "backup/m" and rec["status"] == 200


def test_stall_everywhere_fails_with_upstream_timeout(make_gateway, http) -> None:
    cfg = config(
        {"p0": sim(1, faults={"stall": 1.0, "stall_s": 30}, timeouts={"ttft_s": 0.1}),
         "p1": sim(2, faults={"stall": 1.0, "stall_s": 30}, timeouts={"ttft_s": 0.1})},
        {"chat": {"deployments": [dep("p0"), dep("p1")]}},
        {"max_attempts": 2},
    )
    gw = make_gateway(cfg)
    t0 = time.monotonic()
    r = chat(http, gw)
    elapsed = time.monotonic() - t0
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "upstream_timeout"
    assert 0.2 <= elapsed < 2.0


# -- 5. a stream cut after its first token ------------------------------------------------------


def test_cut_stream_ends_with_error_event_is_billed_and_not_retried(make_gateway, gateway_rows, http) -> None:
    cfg = config({"primary": sim(1), "backup": sim(2)}, {"chat": {"deployments": [dep("primary"), dep("backup")]}})
    gw = make_gateway(cfg)
    calls = count_upstream_calls(gw)
    s = stream(http, gw, sim_fault="cut_stream", sim_output_tokens=20)
    rec = records_by_id(gateway_rows, gw)[s.headers["x-request-id"]]
    print(f"\ncut stream: {s.content_chunks} content chunks relayed, error {s.error}, record status {rec['status']} "
          f"completion_tokens {rec['completion_tokens']} cost_micros {rec['cost_micros']} attempts {rec['ann']['attempts']}")
    assert s.status == 200  # committed at the first chunk
    assert s.content_chunks > 0
    assert not s.done
    assert s.error is not None and s.error["code"] == "bad_upstream_response"
    assert s.events[-1].startswith('{"error"')  # the error event is the last thing sent
    assert rec["status"] == 502
    assert rec["completion_tokens"] > 0
    assert rec["cost_micros"] > 0
    assert rec["ann"]["attempts"] == ["primary/m"]  # not retried on the healthy-looking backup
    assert calls == Counter({"primary": 1})


# -- 6. a slow drip mid-stream ------------------------------------------------------------------


@pytest.mark.parametrize("idle_s", [0.1, None])
def test_slow_drip_hits_idle_timeout_or_completes(make_gateway, gateway_rows, http, idle_s) -> None:
    # per_token 20 ms; slow_drip: 200 ms between chunks, over the 100 ms idle timeout.
    timeouts = {"idle_s": idle_s} if idle_s else None
    cfg = config({"p": sim(1, per_token_ms=20, timeouts=timeouts)}, {"chat": {"deployments": [dep("p")]}})
    gw = make_gateway(cfg)
    t0 = time.monotonic()
    s = stream(http, gw, sim_fault="slow_drip", sim_output_tokens=3)
    elapsed = time.monotonic() - t0
    normal = stream(http, gw, sim_output_tokens=3)  # the usual cadence passes the idle timeout
    rec = records_by_id(gateway_rows, gw)[s.headers["x-request-id"]]
    print(f"\nslow drip idle_s={idle_s}: {elapsed:.3f}s, done={s.done}, error={s.error and s.error['code']}, "
          f"record status {rec['status']} error_code {rec['error_code']}")
    assert s.status == 200
    assert normal.done and normal.error is None
    if idle_s is None:
        assert s.done and s.error is None
        assert s.content_chunks == 3
        assert rec["status"] == 200
    else:
        assert not s.done
        assert s.error is not None and s.error["code"] == "upstream_timeout"
        assert s.content_chunks == 0  # the role chunk arrived, then nothing for longer than idle_s
        assert rec["status"] == 504 and rec["error_code"] == "upstream_timeout"
        assert elapsed < 1.0
        assert rec["ann"]["attempts"] == ["p/m"]


# -- 7. a malformed SSE event -------------------------------------------------------------------


def test_malformed_sse_ends_with_error_event_and_502(make_gateway, gateway_rows, http) -> None:
    cfg = config({"p": sim(1), "q": sim(2)}, {"chat": {"deployments": [dep("p"), dep("q")]}})
    gw = make_gateway(cfg)
    s = stream(http, gw, sim_fault="malformed_sse", sim_output_tokens=10)
    rec = records_by_id(gateway_rows, gw)[s.headers["x-request-id"]]
    print(f"\nmalformed SSE: {s.content_chunks} chunks then {s.error}; record {rec['status']} {rec['error_code']}")
    assert s.status == 200
    assert s.content_chunks > 0
    assert not s.done
    assert s.error is not None and s.error["code"] == "bad_upstream_response"
    assert not any(line.startswith("this is not") for line in s.raw.split("\n"))  # the garbage is not relayed
    assert rec["status"] == 502 and rec["error_code"] == "bad_upstream_response"
    assert rec["ann"]["attempts"] == ["p/m"]
    assert rec["completion_tokens"] > 0


# -- 8. overload at 5x capacity -----------------------------------------------------------------


@dataclass
class Answer:
    kind: str
    latency_s: float
    status: int
    headers: dict[str, str]  # lower-case names
    doc: dict[str, Any]

    @property
    def code(self) -> str | None:
        return (self.doc.get("error") or {}).get("code")


async def test_overload_5x_capacity_keeps_critical_latency_and_sheds_sheddable(make_gateway, gateway_rows) -> None:
    # The load is generated with aiohttp's client: httpx's async pool serialises hundreds of
    # concurrent requests on the client side (seconds of client-side queueing at this rate).
    # The upstream takes 300 ms so that the offered rate (5 x 4 / 0.3 s = 67 req/s) leaves the CPU
    # mostly idle: the test measures the gateway's queueing, not the test machine's load.
    capacity, queue, latency_s, waves = 4, 8, 0.3, 6
    cfg = config(
        {"p": sim(1, ttft_ms=latency_s * 1000, per_token_ms=0, tokens=(4, 4))},
        {"chat": {"deployments": [dep("p")]}},
        {"concurrency": {"initial": capacity, "min_limit": 1, "max_limit": capacity, "queue": queue,
                         "queue_timeout_s": 2}},
    )
    gw = make_gateway(cfg)
    calls = count_upstream_calls(gw)
    url = gw.base_url + "/chat/completions"
    lim = resilience_of(gw).limiter("p/m")

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000),
                                     timeout=aiohttp.ClientTimeout(total=20)) as session:
        async def timed(kind: str, key: str, headers: dict[str, str] | None = None) -> Answer:
            t0 = time.perf_counter()
            async with session.post(url, json=body(), headers={**auth(key), **(headers or {})}) as r:
                doc = await r.json()
                headers = {k.lower(): v for k, v in r.headers.items()}
                return Answer(kind, time.perf_counter() - t0, r.status, headers, doc)

        unloaded = [(await timed("critical", CRITICAL_KEY)).latency_s for _ in range(4)]
        unloaded_p50 = statistics.median(unloaded)

        samples: list[tuple[int, int]] = []
        stop = asyncio.Event()

        async def sampler() -> None:
            while not stop.is_set():
                samples.append((lim.queued, lim.inflight))
                await asyncio.sleep(0.002)

        sampling = asyncio.create_task(sampler())
        # 5x capacity: `capacity` requests per `latency_s` can be served; send 20 per `latency_s`.
        per_wave: list[tuple[str, str, dict[str, str] | None]] = (
            [("critical", CRITICAL_KEY, None)] * 2 + [("default", DEFAULT_KEY, None)] * 6
            + [("sheddable", SHEDDABLE_KEY, None)] * 10
            + [("crit-as-sheddable", CRITICAL_KEY, {"x-setpoint-priority": "sheddable"})] * 1
            + [("shed-asks-critical", SHEDDABLE_KEY, {"x-setpoint-priority": "critical"})] * 1
        )
        tasks: list[asyncio.Task[Answer]] = []
        deadline_task: asyncio.Task[Answer] | None = None
        t_run = time.perf_counter()
        for wave in range(waves):
            for kind, key, hdrs in per_wave:
                tasks.append(asyncio.create_task(timed(kind, key, hdrs)))
            if wave == waves // 2:
                deadline_task = asyncio.create_task(timed("deadline", CRITICAL_KEY, {"x-setpoint-deadline-ms": "1"}))
            await asyncio.sleep(latency_s)
        results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        run_s = time.perf_counter() - t_run
        assert deadline_task is not None
        loaded_deadline = await deadline_task
        stop.set()
        await sampling
        # Unloaded again, TTFT EWMA warmed up at ~300 ms: a 1 ms deadline is refused at once, without
        # an upstream call.
        before = sum(calls.values())
        quiet_deadline = await timed("deadline", CRITICAL_KEY, {"x-setpoint-deadline-ms": "1"})
        assert sum(calls.values()) == before

    recs = records_by_id(gateway_rows, gw)
    by_kind: dict[str, list[Answer]] = {}
    for a in results:
        by_kind.setdefault(a.kind, []).append(a)
    summary = {k: dict(Counter(a.status for a in v)) for k, v in by_kind.items()}
    crit_lat = [a.latency_s for a in by_kind["critical"]]
    crit_p50 = statistics.median(crit_lat)
    max_queued = max(q for q, _ in samples)
    max_inflight = max(i for _, i in samples)
    deadline_recs = [recs[a.headers["x-request-id"]] for a in (loaded_deadline, quiet_deadline)]
    print(f"\noverload: {len(results)} requests, all answered in {run_s:.2f}s; statuses {summary}; unloaded p50 "
          f"{unloaded_p50 * 1000:.0f} ms, critical p50 {crit_p50 * 1000:.0f} ms (x{crit_p50 / unloaded_p50:.2f}), "
          f"max {max(crit_lat) * 1000:.0f} ms; max queued {max_queued} (bound {queue}), max inflight {max_inflight} "
          f"({len(samples)} samples); limiter shed {lim.shed}; deadline 1 ms: {loaded_deadline.status} in "
          f"{loaded_deadline.latency_s * 1000:.1f} ms under load (gateway {deadline_recs[0]['latency_ms']:.1f} ms), "
          f"{quiet_deadline.status} in {quiet_deadline.latency_s * 1000:.1f} ms unloaded "
          f"(gateway {deadline_recs[1]['latency_ms']:.1f} ms)")

    # Critical traffic: every request served, median latency within 3x of the unloaded one.
    assert all(a.status == 200 for a in by_kind["critical"])
    assert crit_p50 <= 3 * unloaded_p50
    # Sheddable traffic (by key, or lowered by the header; the header cannot raise it) is refused,
    # explicitly, with Retry-After.
    for kind in ("sheddable", "crit-as-sheddable", "shed-asks-critical"):
        shed = [a for a in by_kind[kind] if a.status != 200]
        assert len(shed) >= 0.8 * len(by_kind[kind]), (kind, summary[kind])
        for a in shed:
            assert a.status == 503 and a.code == "overloaded"
            assert int(a.headers["retry-after"]) >= 1
    # Priority order of service: critical > default > sheddable.
    ok_rate = {k: summary[k].get(200, 0) / len(v) for k, v in by_kind.items()}
    assert ok_rate["critical"] == 1.0
    assert ok_rate["critical"] > ok_rate["default"] > ok_rate["sheddable"]
    # Nothing but success or an explicit overload refusal; nobody waited much past the queue timeout.
    assert all(a.status == 200 or (a.status == 503 and a.code == "overloaded") for a in results)
    assert max(a.latency_s for a in results) < 2 + latency_s + 1.5
    # Bounded queue, bounded concurrency; and the queue was really full at times.
    assert max_queued <= queue
    assert max_queued == queue
    assert max_inflight <= capacity
    # The 1 ms deadline: refused at once (no queueing, no upstream call), under load and unloaded.
    for a, rec in zip((loaded_deadline, quiet_deadline), deadline_recs, strict=True):
        assert a.status == 503 and a.code == "overloaded"
        assert a.latency_s < latency_s  # less than the time the upstream needs (client side, loaded machine)
        assert rec["latency_ms"] < 50
        assert rec["ann"].get("attempts") == []


# -- 9. routing strategies ----------------------------------------------------------------------


async def test_weighted_split_follows_weights(make_gateway) -> None:
    cfg = config({"p": sim(1)}, {"chat": {"strategy": "weighted", "deployments": [
        dep("p", "light", weight=1), dep("p", "heavy", weight=3)]}})
    gw = make_gateway(cfg)
    n, p_heavy = 400, 3 / 4
    sem = asyncio.Semaphore(16)
    async with httpx.AsyncClient(timeout=20, trust_env=False) as client:
        async def one() -> str:
            async with sem:
                r = await client.post(gw.base_url + "/chat/completions", json=body(), headers=auth())
                assert r.status_code == 200
                return r.headers["x-setpoint-route"]
        routes = Counter(await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), 30))
    sd = math.sqrt(n * p_heavy * (1 - p_heavy))
    print(f"\nweighted 1:3 over {n}: {dict(routes)} (expected heavy {n * p_heavy:.0f} +- {sd:.1f})")
    assert set(routes) == {"p/light", "p/heavy"}
    assert abs(routes["p/heavy"] - n * p_heavy) <= 4.5 * sd  # binomial bound, false alarm rate ~1e-5


def test_least_latency_prefers_the_faster_deployment_after_warmup(make_gateway, http) -> None:
    # The slow one is listed first, so the preference is not just the written order.
    cfg = config({"slow": sim(1, ttft_ms=60), "fast": sim(2, ttft_ms=2)},
                 {"chat": {"strategy": "least_latency", "deployments": [dep("slow"), dep("fast")]}})
    gw = make_gateway(cfg)
    routes = [chat(http, gw).headers["x-setpoint-route"] for _ in range(12)]
    stats = resilience_of(gw).stats.ttft_s
    print(f"\nleast_latency: routes {routes}; ttft EWMA {({k: round(v * 1000, 1) for k, v in stats.items()})} ms")
    assert sorted(routes[:2]) == ["fast/m", "slow/m"]  # warm-up: each unmeasured deployment is measured once
    assert routes[2:] == ["fast/m"] * 10
    assert stats["slow/m"] > stats["fast/m"]


def test_cost_strategy_picks_the_cheapest_and_cascades(make_gateway, gateway_rows, http) -> None:
    def priced(provider: str, price: float) -> dict[str, Any]:
        return {"provider": provider, "model": "m", "pricing": {"input_per_mtok": price, "output_per_mtok": price}}

    cfg = config(
        {"pricey": sim(1), "mid": sim(2), "cheap": sim(3), "cheap_down": sim(4, faults={"unavailable": 1.0})},
        {"chat": {"strategy": "cost", "deployments": [priced("pricey", 10), priced("mid", 3), priced("cheap", 1)]},
         "cascade": {"strategy": "cost", "deployments": [priced("pricey", 10), priced("mid", 3), priced("cheap_down", 0.5)]}},
    )
    gw = make_gateway(cfg)
    routes = Counter(chat(http, gw).headers["x-setpoint-route"] for _ in range(10))
    r = chat(http, gw, model="cascade")
    rec = records_by_id(gateway_rows, gw)[r.headers["x-request-id"]]
    print(f"\ncost: {dict(routes)}; cascade served by {r.headers['x-setpoint-route']}, attempts {rec['ann']['attempts']}")
    assert routes == Counter({"cheap/m": 10})
    assert r.status_code == 200 and r.headers["x-setpoint-route"] == "mid/m"
    assert rec["ann"]["attempts"] == ["cheap_down/m", "mid/m"]


def test_context_window_fallback_skips_small_deployments(make_gateway, gateway_rows, http) -> None:
    cfg = config({"small": sim(1), "big": sim(2)}, {"chat": {"deployments": [
        dep("small", context_window=64), dep("big", context_window=4096)]}})
    gw = make_gateway(cfg)
    fits = chat(http, gw, max_tokens=16)
    long_prompt = " ".join(["word"] * 200)
    skipped = http.post(gw.base_url + "/chat/completions", headers=auth(), json={
        "model": "chat", "messages": [{"role": "user", "content": long_prompt}], "max_tokens": 16})
    too_much_output = chat(http, gw, max_tokens=5000)
    recs = records_by_id(gateway_rows, gw)
    rec_skip = recs[skipped.headers["x-request-id"]]
    print(f"\ncontext window: small request -> {fits.headers.get('x-setpoint-route')}; 200-word prompt -> "
          f"{skipped.headers.get('x-setpoint-route')} (skipped {rec_skip['ann'].get('context_window_skipped')}); "
          f"max_tokens 5000 -> {too_much_output.status_code} {too_much_output.json()['error']['code']}")
    assert fits.status_code == 200 and fits.headers["x-setpoint-route"] == "small/m"
    assert skipped.status_code == 200 and skipped.headers["x-setpoint-route"] == "big/m"
    assert rec_skip["ann"]["context_window_skipped"] == ["small/m"]
    assert rec_skip["ann"]["attempts"] == ["big/m"]
    assert too_much_output.status_code == 400
    assert too_much_output.json()["error"]["code"] == "invalid_request"
    assert recs[too_much_output.headers["x-request-id"]]["ann"].get("attempts") is None


# -- 10. degradation ----------------------------------------------------------------------------


def test_degrades_when_every_deployment_is_open(make_gateway, gateway_rows, http) -> None:
    cfg = config(
        {"a": sim(1, faults={"unavailable": 1.0}), "b": sim(2, faults={"unavailable": 1.0}), "small": sim(3)},
        {"chat": {"degrade_to": "chat-small", "deployments": [dep("a"), dep("b")]},
         "chat-small": {"deployments": [dep("small")]}},
        {"max_attempts": 2, "breaker": {"min_calls": 2, "failure_rate": 0.5, "open_s": 60}},
    )
    gw = make_gateway(cfg)
    # While the breakers are closed, failures are upstream errors: not degraded.
    warm = [chat(http, gw, key=CRITICAL_KEY) for _ in range(2)]
    assert all(r.status_code == 503 and r.json()["error"]["code"] == "upstream_unavailable" for r in warm)
    assert "x-setpoint-degraded" not in warm[0].headers
    res = resilience_of(gw)
    assert res.breakers["a/m"].state is BreakerState.OPEN and res.breakers["b/m"].state is BreakerState.OPEN

    default = chat(http, gw)
    sheddable = chat(http, gw, key=SHEDDABLE_KEY)
    lowered = chat(http, gw, key=CRITICAL_KEY, headers={"x-setpoint-priority": "default"})
    critical = chat(http, gw, key=CRITICAL_KEY)
    recs = records_by_id(gateway_rows, gw)
    print(f"\ndegradation (open): default -> {default.status_code} {default.headers.get('x-setpoint-degraded')!r}; "
          f"critical -> {critical.status_code} {critical.json().get('error', {}).get('code')}")
    for r in (default, sheddable, lowered):
        assert r.status_code == 200
        assert r.headers["x-setpoint-degraded"] == "unhealthy; model=chat-small"
        assert r.headers["x-setpoint-route"] == "small/m"
        rec = recs[r.headers["x-request-id"]]
        assert rec["ann"]["degraded"] == "unhealthy:chat->chat-small"
        assert rec["ann"]["attempts"] == ["small/m"]
        assert rec["deployment"] == "small/m"
    assert critical.status_code == 503
    assert critical.json()["error"]["code"] == "circuit_open"
    assert "x-setpoint-degraded" not in critical.headers
    assert int(critical.headers["Retry-After"]) >= 1
    assert recs[critical.headers["x-request-id"]]["ann"].get("attempts") == []


async def test_degrades_when_every_deployment_is_overloaded(make_gateway) -> None:
    cfg = config(
        {"slow": sim(1, ttft_ms=400, per_token_ms=0), "small": sim(3)},
        {"chat": {"degrade_to": "chat-small", "deployments": [dep("slow")]},
         "chat-small": {"deployments": [dep("small")]}},
        {"concurrency": {"initial": 1, "max_limit": 1, "queue": 0, "queue_timeout_s": 1}},
    )
    gw = make_gateway(cfg)
    lim = resilience_of(gw).limiter("slow/m")
    async with httpx.AsyncClient(timeout=20, trust_env=False) as client:
        url = gw.base_url + "/chat/completions"
        holder = asyncio.create_task(client.post(url, json=body(), headers=auth(CRITICAL_KEY)))
        t0 = time.monotonic()
        while lim.inflight < 1:
            assert time.monotonic() - t0 < 5, "the first request never took the slot"
            await asyncio.sleep(0.005)
        default = await client.post(url, json=body(), headers=auth())
        critical = await client.post(url, json=body(), headers=auth(CRITICAL_KEY))
        assert not holder.done()  # both answered while the slot was still taken
        first = await holder
    print(f"\ndegradation (overloaded): default -> {default.status_code} {default.headers.get('x-setpoint-degraded')!r}; "
          f"critical -> {critical.status_code} {critical.json().get('error', {}).get('code')}")
    assert first.status_code == 200 and first.headers["x-setpoint-route"] == "slow/m"
    assert default.status_code == 200
    assert default.headers["x-setpoint-degraded"] == "unhealthy; model=chat-small"
    assert default.headers["x-setpoint-route"] == "small/m"
    assert critical.status_code == 503 and critical.json()["error"]["code"] == "overloaded"
    assert "Retry-After" in critical.headers
    assert "x-setpoint-degraded" not in critical.headers


# -- breaker accounting of errors that are not the deployment's fault ---------------------------


class RejectingUpstream:
    """An upstream that answers 400 (the request's fault, e.g. an unsupported parameter)."""

    def __init__(self) -> None:
        self.calls = 0

    def app(self) -> web.Application:
        async def handler(request: web.Request) -> web.Response:
            self.calls += 1
            return web.json_response({"error": {"message": "unsupported parameter: foo", "type": "invalid_request_error",
                                                 "code": "unsupported_parameter"}}, status=400)

        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        return app


def test_client_caused_upstream_4xx_does_not_open_the_breaker(make_gateway, serve_app, http) -> None:
    upstream = RejectingUpstream()
    app = serve_app(upstream.app())
    cfg = config({"p": {"type": "openai_compatible", "base_url": app.url + "/v1"}}, {"chat": {"deployments": [dep("p")]}},
                 {"breaker": {"min_calls": 4, "failure_rate": 0.5, "open_s": 60}})
    gw = make_gateway(cfg)
    statuses = [chat(http, gw, key=SHEDDABLE_KEY).status_code for _ in range(6)]
    assert statuses == [400] * 6  # relayed, not retried (4xx are not retryable)
    assert upstream.calls == 6
    assert resilience_of(gw).breaker("p/m").state is BreakerState.CLOSED


def test_half_open_probe_ending_in_an_unexpected_error_does_not_wedge_the_breaker(
        make_gateway, serve_app, http) -> None:
    upstream = FlipUpstream()
    app = serve_app(upstream.app())
    clock = ManualClock()
    cfg = config(
        {"primary": {"type": "openai_compatible", "base_url": app.url + "/v1"}, "backup": sim(2, ttft_ms=0, per_token_ms=0)},
        {"chat": {"deployments": [dep("primary"), dep("backup")]}},
        {"backoff_base_s": 0, "breaker": {"min_calls": 2, "failure_rate": 0.5, "open_s": 30, "half_open_probes": 1}},
    )
    gw = make_gateway(cfg, clock)
    breaker = resilience_of(gw).breaker("primary/m")
    for _ in range(2):
        assert chat(http, gw).headers["x-setpoint-route"] == "backup/m"
    assert breaker.state is BreakerState.OPEN
    advance(gw, clock, 31)
    # The probe meets an unexpected exception (a bug in an adapter, an unmapped library error).
    assert gw.server is not None
    prov = gw.server.gateway.runtime.providers["primary"]
    real_send = prov.send

    async def broken_send(call: Any) -> Any:
        raise RuntimeError("unexpected adapter failure")

    prov.send = broken_send  # type: ignore[method-assign]
    r = chat(http, gw)
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    prov.send = real_send  # type: ignore[method-assign]
    # The primary is healthy again and a long time passes: it must get probed and used again.
    upstream.down = False
    advance(gw, clock, 3600)
    routes = [chat(http, gw).headers["x-setpoint-route"] for _ in range(3)]
    assert routes[-1] == "primary/m", (routes, breaker.state)


async def test_429_with_retry_after_cools_the_primary_down_and_traffic_shifts(make_gateway, gateway_rows) -> None:
    """A primary that answers 429 with Retry-After is skipped for that long: the first request pays one
    attempt on it, the rest go straight to the fallback as first attempts (no retry budget spent)."""
    cfg = config(
        {"primary": sim(1, faults={"rate_limit": 1.0, "retry_after_s": 30}), "backup": sim(2)},
        {"chat": {"deployments": [dep("primary"), dep("backup")]}},
        {"retry_budget": {"ratio": 0.0, "min_per_s": 0.1, "window_s": 10.0}, "max_cooldown_s": 30},
    )
    gw = make_gateway(cfg)
    calls = count_upstream_calls(gw)
    n = 40
    async with httpx.AsyncClient(timeout=20, trust_env=False) as client:
        results = [await client.post(gw.base_url + "/chat/completions", json=body(), headers=auth()) for _ in range(n)]
    assert all(r.status_code == 200 for r in results), [r.text for r in results if r.status_code != 200][:2]
    assert {r.headers["x-setpoint-route"] for r in results} == {"backup/m"}
    assert calls["primary"] == 1  # one 429, then it cooled down for its Retry-After
    assert calls["backup"] == n
    assert resilience_of(gw).cooldown_s("primary/m") > 25
    print(f"\n429 with Retry-After 30s: {n}/{n} served by the fallback, primary called {calls['primary']}x")
