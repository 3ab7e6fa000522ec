"""`SemanticCache`: embed a prompt, search its partition, refuse guarded hits. The API the cache stage uses.

```python
sem = SemanticCache(Embedder(), MemoryVectorIndex(clock))           # or RedisVectorIndex(client, clock)
part = partition_key(tenant, model, system_prompt=system, tools=body.get("tools"))
found = await sem.lookup(part, prompt)
if found.hit is not None:
    entry = await store.cache_get(found.hit.entry_key, clock.now())  # the exact cache holds the answer
...
await sem.store(part, prompt, exact_key, expires_at=clock.now() + ttl_s, vector=found.vector)
```

The index maps vectors to the exact cache's keys, so an answer is stored once and expires once.
A hit needs cosine >= `threshold` (0.95 by default) **and** a clean `guard` (numbers, negations,
antonyms, entities). The best few candidates are tried in order, so a refused near-duplicate does
not hide an acceptable one behind it. Embedding runs in a worker thread (`asyncio.to_thread`).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from setpoint.semcache.guard import guard as default_guard
from setpoint.semcache.index import Hit, Vector, VectorIndex

if TYPE_CHECKING:
    from setpoint.semcache.embedder import Embedder

__all__ = ["DEFAULT_THRESHOLD", "Lookup", "SemanticCache", "partition_key"]

DEFAULT_THRESHOLD = 0.95


def partition_key(tenant: str, model: str, *, system_prompt: str = "", tools: Any = None,
                  params: Mapping[str, Any] | None = None) -> str:
    """An opaque partition id: prompts may share answers only within one (tenant, model, system
    prompt, tool set, answer-changing parameters). Hashed, so it is safe to log and fixed in length."""
    h = hashlib.sha256()
    for part in (tenant, model, system_prompt):
        h.update(part.encode())
        h.update(b"\0")
    h.update(orjson.dumps(tools, option=orjson.OPT_SORT_KEYS))
    h.update(b"\0")
    h.update(orjson.dumps(dict(params or {}), option=orjson.OPT_SORT_KEYS))
    return "p1:" + h.hexdigest()


@dataclass(frozen=True, slots=True)
class Lookup:
    """The outcome of `SemanticCache.lookup`."""

    hit: Hit | None  # the entry to serve, or None for a miss
    vector: Vector  # the prompt's embedding: pass it to `store` after a miss (saves a second pass)
    rejected: tuple[tuple[Hit, str], ...] = field(default=())  # candidates the guard refused, with why


class SemanticCache:
    def __init__(self, embedder: Embedder, index: VectorIndex, *, threshold: float = DEFAULT_THRESHOLD,
                 guard: Callable[[str, str], str | None] | None = default_guard, candidates: int = 3) -> None:
        """`guard=None` turns the lexical guard off (not recommended: see docs/semantic-cache.md)."""
        if not 0.0 < threshold <= 1.0:
            raise ValueError("threshold must be in (0, 1]")
        self._embedder = embedder
        self.index = index
        self.threshold = threshold
        self._guard = guard
        self._candidates = max(1, candidates)

    async def embed(self, text: str) -> Vector:
        vecs = await asyncio.to_thread(self._embedder.embed, [text])
        vec: Vector = vecs[0]
        return vec

    async def lookup(self, partition: str, text: str) -> Lookup:
        """Embed `text` and find a servable entry in `partition` (may raise `StateBackendError`)."""
        vec = await self.embed(text)
        hits = await self.index.search(partition, vec, self.threshold, limit=self._candidates)
        rejected: list[tuple[Hit, str]] = []
        for hit in hits:
            reason = self._guard(text, hit.text) if self._guard is not None else None
            if reason is None:
                return Lookup(hit, vec, tuple(rejected))
            rejected.append((hit, reason))
        return Lookup(None, vec, tuple(rejected))

    async def store(self, partition: str, text: str, entry_key: str, expires_at: float, *,
                    vector: Vector | None = None) -> None:
        """Index `text` under `entry_key` until `expires_at` (seconds on the caller's clock)."""
        vec = vector if vector is not None else await self.embed(text)
        await self.index.add(partition, vec, entry_key, text, expires_at)

    async def aclose(self) -> None:
        await self.index.aclose()
