"""`cache`: an exact response cache, partitioned by tenant, before limits and budgets (a hit is free).

Key: SHA-256 of the tenant and the canonical request: the model alias plus every body field that can
change the answer, with keys sorted (so field order does not matter). Fields that cannot change it
(`stream`, `stream_options`, `user`, `metadata`, `store`, `service_tier`) are left out, so a streamed
and a unary request share an entry. By default only deterministic requests (`temperature: 0`) are
cached. Per request, `x-setpoint-cache: off|read|write|refresh` and `x-setpoint-cache-ttl: seconds`.

An entry is a `chat.completion` (a stream is aggregated into one), written after the response has
been sent; a stream request is answered from it as a stream of the same shape. Answers that later
stages changed (a budget-clamped `max_tokens`, a degraded model) are not written.

With `semantic:` configured for the alias, an exact miss is looked up by meaning (see
`policy/stages/semantic.py` for which requests and partitions, `semcache/` for the embedder, index and
guard); the vector index points at exact-cache entries, so an answer is stored and expires once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar

import orjson

from setpoint.clock import Clock
from setpoint.config.schema import CacheConfig
from setpoint.errors import InvalidRequestError, StateBackendError
from setpoint.policy.stages.semantic import SemanticMatcher
from setpoint.proxy.context import RequestContext
from setpoint.state.base import CacheStore
from setpoint.types import Next, Reply
from setpoint.wire.convert import completion_from_stream, stream_from_completion

__all__ = ["CacheStage", "cache_key", "tenant_of"]

log = logging.getLogger("setpoint.cache")

_IRRELEVANT = frozenset({"stream", "stream_options", "user", "metadata", "store", "service_tier"})
_MODES = {"off", "read", "write", "refresh"}


# Numbers that mean the same as int or float (`0` and `0.0`): keyed as floats so both share an entry.
_FLOAT_PARAMS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")


def tenant_of(ctx: RequestContext, partition: str) -> str:
    """The cache's tenant boundary; team names and key ids live in separate namespaces."""
    key = ctx.key
    if key is None:
        return "-"
    if partition == "team" and key.team:
        return "team:" + key.team
    return "key:" + key.id


def cache_key(ctx: RequestContext, partition: str) -> str:
    canonical = {k: v for k, v in ctx.body.items() if k not in _IRRELEVANT}
    for name in _FLOAT_PARAMS:
        v = canonical.get(name)
        if type(v) is int:
            canonical[name] = float(v)
    canonical["model"] = ctx.model
    digest = hashlib.sha256(tenant_of(ctx, partition).encode() + b"\0" + ctx.endpoint.encode() + b"\0"
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

    def __init__(self, store: CacheStore, clock: Clock, configs: Mapping[str, CacheConfig],
                 semantic: Mapping[str, SemanticMatcher] | None = None) -> None:
        self._store = store
        self._clock = clock
        self._configs = configs
        self._semantic = semantic or {}
        self._writes: set[asyncio.Task[None]] = set()

    async def aclose(self, timeout_s: float = 10.0) -> None:
        """Let pending cache writes finish (bounded) before the store under them closes."""
        if self._writes:
            _, pending = await asyncio.wait(set(self._writes), timeout=timeout_s)
            for t in pending:
                t.cancel()
        closed: set[int] = set()
        for m in self._semantic.values():
            if id(m.cache.index) not in closed:  # aliases share one index
                closed.add(id(m.cache.index))
                await m.cache.aclose()

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
        if not math.isfinite(ttl) or ttl <= 0:
            raise InvalidRequestError("header x-setpoint-cache-ttl must be a positive, finite number of seconds")
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
        reading = mode in ("read", "read_write")
        if reading:
            entry = await self._get(key)
            if entry is not None:
                return self._hit(ctx, entry)
        sem = self._semantic.get(ctx.model)
        query = sem.query(ctx, tenant_of(ctx, cfg.partition)) if sem is not None else None
        vector = None
        if query is not None and reading:
            assert sem is not None
            try:
                found = await sem.cache.lookup(*query)
            except StateBackendError:
                found = None  # fails open, like the exact cache
            if found is not None:
                vector = found.vector
                if found.rejected:
                    ctx.annotations["semantic_refused"] = found.rejected[0][1]
                if found.hit is not None:
                    entry = await self._get(found.hit.entry_key)
                    if entry is not None:
                        ctx.annotations["cache_match"] = "semantic"
                        ctx.annotations["similarity"] = round(found.hit.score, 4)
                        ctx.response_headers["x-setpoint-cache-similarity"] = f"{found.hit.score:.4f}"
                        return self._hit(ctx, entry)
        ctx.annotations["cache"] = "miss"
        ctx.response_headers["x-setpoint-cache"] = "miss"
        reply = await call_next(ctx)
        if mode in ("write", "read_write", "refresh"):
            indexed = None if query is None or sem is None else (sem, query, vector)
            ctx.finalizers.append(lambda c: self._schedule_write(c, key, ttl, reply, indexed))
        return reply

    async def _get(self, key: str) -> dict[str, Any] | None:
        try:
            raw = await self._store.cache_get(key, self._clock.now())
        except StateBackendError:
            return None  # the cache fails open: an outage costs money, never correctness
        return _load(raw)

    def _hit(self, ctx: RequestContext, entry: dict[str, Any]) -> Reply:
        ctx.is_cache_hit = True
        ctx.deployment = None
        ctx.annotations["cache"] = "hit"
        ctx.annotations.pop("route", None)
        ctx.annotations["saved_micros"] = entry.get("cost_micros") or 0
        ctx.annotations["saved_tokens"] = entry.get("tokens") or 0
        ctx.response_headers["x-setpoint-cache"] = "hit"
        doc = entry["completion"]
        choices = doc.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            ctx.finish_reason = choices[0].get("finish_reason")
        if not ctx.is_stream:
            return Reply(status=200, body=orjson.dumps(doc))
        opts = ctx.body.get("stream_options")
        include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        return Reply(status=200, stream=_Replay(stream_from_completion(doc, include_usage=include_usage)))

    async def _schedule_write(self, ctx: RequestContext, key: str, ttl: float, reply: Reply,
                              indexed: tuple[SemanticMatcher, tuple[str, str], Any] | None) -> None:
        if ctx.status != 200 or ctx.is_cache_hit:
            return
        if ctx.is_body_modified or "degraded" in ctx.annotations:
            return  # a clamped or degraded answer is not the answer to the request as keyed
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
        task = asyncio.get_running_loop().create_task(self._write(key, orjson.dumps(entry), ttl, indexed))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, key: str, value: bytes, ttl: float,
                     indexed: tuple[SemanticMatcher, tuple[str, str], Any] | None) -> None:
        now = self._clock.now()
        try:
            await self._store.cache_put(key, value, ttl, now)
            if indexed is not None:
                sem, (partition, text), vector = indexed
                # Indexed after the entry exists, expiring with it: a search never finds a missing answer.
                await sem.cache.store(partition, text, key, now + ttl, vector=vector)
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
