"""`cache`: an exact response cache, partitioned by tenant, before limits and budgets (a hit is free).

Key: SHA-256 of the tenant and the canonical request: the model alias plus every body field that can
change the answer, with keys sorted (so field order does not matter). Fields that cannot change it
(`stream`, `stream_options`, `user`, `metadata`, `store`, `service_tier`) are left out, so a streamed
and a unary request share an entry. By default only deterministic requests (`temperature: 0`) are
cached. Per request, `x-setpoint-cache: off|read|write|refresh` and `x-setpoint-cache-ttl: seconds`.

An entry is a `chat.completion` (a stream is aggregated into one), written after the response has
been sent; a stream request is answered from it as a stream of the same shape.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar

import orjson

from setpoint.clock import Clock
from setpoint.config.schema import CacheConfig
from setpoint.errors import InvalidRequestError, StateBackendError
from setpoint.proxy.context import RequestContext
from setpoint.state.base import CacheStore
from setpoint.types import Next, Reply
from setpoint.wire.convert import completion_from_stream, stream_from_completion

__all__ = ["CacheStage", "cache_key"]

log = logging.getLogger("setpoint.cache")

_IRRELEVANT = frozenset({"stream", "stream_options", "user", "metadata", "store", "service_tier"})
_MODES = {"off", "read", "write", "refresh"}


def cache_key(ctx: RequestContext, partition: str) -> str:
    tenant = (ctx.key.team if partition == "team" and ctx.key and ctx.key.team else None) or (
        ctx.key.id if ctx.key else "-")
    canonical = {k: v for k, v in ctx.body.items() if k not in _IRRELEVANT}
    canonical["model"] = ctx.model
    digest = hashlib.sha256(tenant.encode() + b"\0" + ctx.endpoint.encode() + b"\0"
                            + orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS))
    return "cache:" + digest.hexdigest()


class _Replay:
    __slots__ = ("_events",)

    def __init__(self, events: list[bytes]) -> None:
        self._events = events

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for e in self._events:
            yield e

    async def aclose(self) -> None:
        return None


class CacheStage:
    name: ClassVar[str] = "cache"

    def __init__(self, store: CacheStore, clock: Clock, configs: Mapping[str, CacheConfig]) -> None:
        self._store = store
        self._clock = clock
        self._configs = configs
        self._writes: set[asyncio.Task[None]] = set()

    def _mode(self, ctx: RequestContext, cfg: CacheConfig) -> str:
        mode = (ctx.headers.get("x-setpoint-cache") or "").strip().lower()
        if mode and mode not in _MODES:
            raise InvalidRequestError("header x-setpoint-cache must be off, read, write or refresh")
        if mode:
            return mode
        temperature = ctx.body.get("temperature")
        deterministic = ctx.endpoint == "embeddings" or temperature == 0
        return "read_write" if deterministic or cfg.nondeterministic else "off"

    def _ttl(self, ctx: RequestContext, cfg: CacheConfig) -> float:
        raw = ctx.headers.get("x-setpoint-cache-ttl")
        if raw is None:
            return cfg.ttl_s
        try:
            ttl = float(raw)
        except ValueError:
            raise InvalidRequestError("header x-setpoint-cache-ttl must be a number of seconds") from None
        if ttl <= 0:
            raise InvalidRequestError("header x-setpoint-cache-ttl must be positive")
        return ttl

    async def __call__(self, ctx: RequestContext, call_next: Next) -> Reply:
        cfg = self._configs.get(ctx.model)
        if cfg is None:
            return await call_next(ctx)
        mode = self._mode(ctx, cfg)
        if mode == "off":
            return await call_next(ctx)
        ttl = self._ttl(ctx, cfg)
        key = cache_key(ctx, cfg.partition)
        if mode in ("read", "read_write"):
            try:
                raw = await self._store.cache_get(key, self._clock.now())
            except StateBackendError:
                raw = None  # the cache fails open: an outage costs money, never correctness
            entry = _load(raw)
            if entry is not None:
                return self._hit(ctx, entry)
        ctx.annotations["cache"] = "miss"
        ctx.response_headers["x-setpoint-cache"] = "miss"
        reply = await call_next(ctx)
        if mode in ("write", "read_write", "refresh"):
            ctx.finalizers.append(lambda c: self._schedule_write(c, key, ttl, reply))
        return reply

    def _hit(self, ctx: RequestContext, entry: dict[str, Any]) -> Reply:
        ctx.is_cache_hit = True
        ctx.deployment = None
        ctx.annotations["cache"] = "hit"
        ctx.annotations["saved_micros"] = entry.get("cost_micros") or 0
        ctx.annotations["saved_tokens"] = entry.get("tokens") or 0
        ctx.response_headers["x-setpoint-cache"] = "hit"
        doc = entry["completion"]
        if not ctx.is_stream:
            return Reply(status=200, body=orjson.dumps(doc))
        opts = ctx.body.get("stream_options")
        include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        return Reply(status=200, stream=_Replay(stream_from_completion(doc, include_usage=include_usage)))

    async def _schedule_write(self, ctx: RequestContext, key: str, ttl: float, reply: Reply) -> None:
        if ctx.status != 200 or ctx.is_cache_hit:
            return
        if reply.body is not None:
            try:
                doc = orjson.loads(reply.body)
            except orjson.JSONDecodeError:
                return
        else:
            doc = completion_from_stream(ctx.stream_payloads or ())
            if doc is None:
                return
        entry = {"v": 1, "completion": doc, "cost_micros": ctx.cost_micros or 0,
                 "tokens": ctx.usage.prompt_tokens + ctx.usage.completion_tokens}
        # Off the latency path: the response is already complete.
        task = asyncio.get_running_loop().create_task(self._write(key, orjson.dumps(entry), ttl))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, key: str, value: bytes, ttl: float) -> None:
        try:
            await self._store.cache_put(key, value, ttl, self._clock.now())
        except StateBackendError as err:
            log.warning("cache write failed: %s", err.message)


def _load(raw: bytes | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        entry = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return entry if isinstance(entry, dict) and isinstance(entry.get("completion"), dict) else None
