"""Helpers for the exact response cache suite (`policy/stages/cache.py`).

`cache_gateway(cfg=None, clock=None)` starts an in-process gateway (the shared `make_gateway`) and
wraps two of its objects so tests can observe what the cache does without sleeping:

- every provider's `send`: each upstream call is recorded (`upstream_calls`, the bodies sent), so a
  hit can be proven to have cost no upstream call;
- the state store's `cache_put`: each completed write is recorded (`writes`, key and completion).
  The cache writes off the latency path (a task started when the request ends), so a test that
  wants the next identical request to hit first waits for the write with `wait_writes(n)` or
  `wait_written(response_id)` (a condition variable, not a sleep).

Writes to the memory store complete in the order they were scheduled (one event loop, no awaits
inside), so once `wait_written(id)` returns every write scheduled before that one has completed:
`barrier()` uses this to prove that a request did *not* write.

At teardown the fixture waits for cache writes still in flight (`drain_writes`) before the gateway
stops (see test_shutdown.py for why).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import orjson

from setpoint.clock import ManualClock
from setpoint.proxy.background import BackgroundGateway


# The shared default config's static keys (tests/conftest.py) and three more.
ALL_KEY = "sk-test-all-models-0123456789"  # team-all, every model
LIMITED_KEY = "sk-test-limited-0123456789ab"  # team-limited, chat-a and embed only
MASTER_KEY = "mk-test-master-key-0123456789"
TEAM_MATE_KEY = "sk-cache-team-mate-0123456789"  # another key of team-all
OTHER_TEAM_KEY = "sk-cache-other-team-0123456789"  # team-other
NO_TEAM_KEY = "sk-cache-no-team-0123456789ab"  # no team: its own tenant

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is a set point?"}]

CHAT_A_PRICING = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}  # micro-dollars per token

_unique = itertools.count()


def instant_sim(seed: int = 1, **extra: Any) -> dict[str, Any]:
    """A fast deterministic simulated provider that never sleeps (so it also runs on a ManualClock)."""
    cfg: dict[str, Any] = {"type": "simulated", "seed": seed, "latency": {"ttft_ms": 0, "per_token_ms": 0, "jitter": 0},
                           "output": {"min_tokens": 4, "max_tokens": 12}}
    cfg.update(extra)
    return cfg


def cache_config(cache: dict[str, Any] | None = None, *, state_url: str = "memory://", seed: int = 1) -> dict[str, Any]:
    """The suite's config: the response cache on `chat-a` (with `cache` options) and on `embed`;
    `chat-b` has no cache. Keys: ALL_KEY and TEAM_MATE_KEY (team-all), OTHER_TEAM_KEY (team-other),
    NO_TEAM_KEY (no team), LIMITED_KEY (team-limited, chat-a and embed only). Admin on."""
    return {
        "admin": {"master_key": MASTER_KEY},
        "state": {"url": state_url, "timeout_s": 5.0},
        "logging": {"flush_interval_ms": 20},
        "providers": {"sim": instant_sim(seed)},
        "models": {
            "chat-a": {"cache": dict(cache or {}),
                       "deployments": [{"provider": "sim", "model": "sim-small", "pricing": dict(CHAT_A_PRICING)}]},
            "chat-b": {"deployments": [{"provider": "sim", "model": "sim-large"}]},
            "embed": {"kind": "embedding", "cache": {}, "deployments": [{"provider": "sim", "model": "sim-embed"}]},
        },
        "keys": [
            {"name": "all", "key": ALL_KEY, "team": "team-all"},
            {"name": "limited", "key": LIMITED_KEY, "team": "team-limited", "models": ["chat-a", "embed"]},
            {"name": "mate", "key": TEAM_MATE_KEY, "team": "team-all"},
            {"name": "other", "key": OTHER_TEAM_KEY, "team": "team-other"},
            {"name": "solo", "key": NO_TEAM_KEY},
        ],
    }


def sse_events(text: str) -> list[str]:
    """The `data:` payloads of an SSE body, checking the framing on the way: every event is one
    `data: ` line, events are separated by a blank line, and the body ends with one."""
    assert text.endswith("\n\n"), f"an SSE body ends with a blank line: {text[-40:]!r}"
    out = []
    for event in text[:-2].split("\n\n"):
        assert event.startswith("data: ") and "\n" not in event, f"not a single-line data event: {event!r}"
        out.append(event[len("data: "):])
    return out


@dataclass
class CacheGateway:
    gw: BackgroundGateway
    http: httpx.Client
    make_client: Callable[..., openai.OpenAI]
    read_rows: Callable[..., list[dict[str, Any]]]  # the shared fixture: request records of a db
    clock: ManualClock | None = None
    upstream_calls: list[dict[str, Any]] = field(default_factory=list)  # bodies sent upstream
    writes: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (key, entry) per completed write
    write_errors: list[BaseException] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    # -- wiring ---------------------------------------------------------------------------------

    def install(self) -> CacheGateway:
        assert self.gw.server is not None
        runtime = self.gw.server.gateway.runtime
        for provider in runtime.providers.values():
            original_send = provider.send

            async def send(call: Any, _send: Any = original_send) -> Any:
                with self.cond:
                    self.upstream_calls.append(dict(call.body))
                return await _send(call)

            provider.send = send  # type: ignore[method-assign]
        store = runtime.state
        original_put = store.cache_put

        async def cache_put(key: str, value: bytes, ttl_s: float, now: float) -> None:
            try:
                await original_put(key, value, ttl_s, now)
            except BaseException as exc:
                with self.cond:
                    self.write_errors.append(exc)
                    self.cond.notify_all()
                raise
            with self.cond:
                self.writes.append((key, orjson.loads(value)))
                self.cond.notify_all()

        store.cache_put = cache_put  # type: ignore[method-assign]
        return self

    @property
    def base_url(self) -> str:
        return self.gw.base_url

    @property
    def upstream_count(self) -> int:
        with self.cond:
            return len(self.upstream_calls)

    @property
    def write_count(self) -> int:
        with self.cond:
            return len(self.writes)

    # -- requests -------------------------------------------------------------------------------

    def post(self, body: dict[str, Any] | bytes, key: str = ALL_KEY, headers: dict[str, str] | None = None,
             endpoint: str = "chat/completions") -> httpx.Response:
        content = body if isinstance(body, bytes) else orjson.dumps(body)
        h = {"Authorization": f"Bearer {key}", "Content-Type": "application/json", **(headers or {})}
        return self.http.post(f"{self.base_url}/{endpoint}", content=content, headers=h)

    def chat(self, key: str = ALL_KEY, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
        """A chat request (default: chat-a, MESSAGES, temperature 0) as raw HTTP; asserts nothing."""
        full = {"model": "chat-a", "messages": MESSAGES, "temperature": 0, **body}
        return self.post(full, key, headers)

    def client(self, key: str = ALL_KEY) -> openai.OpenAI:
        return self.make_client(self.base_url, key)

    # -- synchronisation ------------------------------------------------------------------------

    def wait_writes(self, n: int, timeout_s: float = 10.0) -> None:
        """Until at least `n` cache writes have completed since the gateway started."""
        with self.cond:
            ok = self.cond.wait_for(lambda: len(self.writes) >= n or self.write_errors, timeout_s)
            assert not self.write_errors, f"cache write failed: {self.write_errors!r}"
            assert ok, f"expected {n} cache writes, saw {len(self.writes)}"

    def wait_written(self, response_id: str, timeout_s: float = 10.0) -> dict[str, Any]:
        """Until the completion with this id has been written to the cache; returns the entry."""

        def found() -> dict[str, Any] | None:
            for _, entry in self.writes:
                if entry["completion"].get("id") == response_id:
                    return entry
            return None

        with self.cond:
            ok = self.cond.wait_for(lambda: found() is not None or self.write_errors, timeout_s)
            assert not self.write_errors, f"cache write failed: {self.write_errors!r}"
            assert ok, f"completion {response_id} was never written to the cache"
            entry = found()
            assert entry is not None
            return entry

    def barrier(self) -> None:
        """A fresh cacheable request, waited for until it is written: every cache write scheduled
        before it has completed too (memory store, one loop, FIFO)."""
        r = self.chat(messages=[{"role": "user", "content": f"barrier {next(_unique)}"}])
        assert r.status_code == 200 and r.headers.get("x-setpoint-cache") == "miss", r.text
        self.wait_written(r.json()["id"])

    def embed_barrier(self) -> None:
        """`barrier()` through the cached `embed` model (for when chat-a itself is being shaped)."""
        before = self.write_count
        r = self.post({"model": "embed", "input": f"barrier {next(_unique)}"}, endpoint="embeddings")
        assert r.status_code == 200 and r.headers.get("x-setpoint-cache") == "miss", r.text
        with self.cond:
            ok = self.cond.wait_for(lambda: any(e["completion"].get("object") == "list" for _, e in self.writes[before:]), 10)
        assert ok, "the embeddings barrier was never written"

    def drain_writes(self, timeout_s: float = 10.0) -> None:
        """Wait for every cache write task still running on the gateway's loop.

        Called before the gateway stops: `Gateway.stop()` closes the state store without waiting
        for them, and a SQLite write still running then can crash the process (see
        test_shutdown.py)."""

        async def drain() -> None:
            me = asyncio.current_task()
            pending = [t for t in asyncio.all_tasks() if t is not me and not t.done()
                       and getattr(t.get_coro(), "__qualname__", "") == "CacheStage._write"]
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

        loop = self.gw._loop  # noqa: SLF001 - the write tasks live on the gateway's loop
        if self.gw.server is not None and loop.is_running():
            asyncio.run_coroutine_threadsafe(drain(), loop).result(timeout=timeout_s)

    def advance(self, seconds: float) -> None:
        """Move the gateway's ManualClock forward (on the gateway's own loop)."""
        assert self.clock is not None, "this gateway runs on the real clock"
        loop = self.gw._loop  # noqa: SLF001 - the clock's futures belong to the gateway's loop
        asyncio.run_coroutine_threadsafe(self.clock.advance(seconds), loop).result(timeout=10)

    def rows(self) -> list[dict[str, Any]]:
        """Flush the request log; its records, oldest first."""
        assert self.gw.flush_log(10), "request log did not flush"
        assert self.gw.server is not None
        return self.read_rows(self.gw.server.gateway.request_log.db_path)


