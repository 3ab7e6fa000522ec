"""Resolve a presented secret to a key: config keys in memory, stored keys via a short-lived cache.

The cache bounds how stale a decision can be (`auth_cache_ttl_s`): a revocation made through another
worker takes effect here within that time; the worker that served the revocation drops it at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from setpoint.clock import Clock
from setpoint.keys.model import KeyInfo, hash_key
from setpoint.keys.store import SqliteKeyStore

__all__ = ["KeyAuthenticator"]

_MAX_CACHE = 100_000


class KeyAuthenticator:
    def __init__(self, static: Mapping[str, KeyInfo], store: SqliteKeyStore | None, clock: Clock, ttl_s: float) -> None:
        self._static = dict(static)  # hash -> key
        self._store = store
        self._clock = clock
        self._ttl_s = ttl_s
        self._cache: dict[str, tuple[KeyInfo | None, float]] = {}

    async def resolve(self, secret: str) -> KeyInfo | None:
        digest = hash_key(secret)
        info = self._static.get(digest)
        if info is not None or self._store is None:
            return info
        now = self._clock.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[1] > now:
            return hit[0]
        info = await asyncio.to_thread(self._store.find_by_hash, digest)
        if len(self._cache) >= _MAX_CACHE:
            self._cache.clear()
        # Unknown secrets are cached briefly too, so a flood of bad keys cannot hammer the store.
        self._cache[digest] = (info, now + (self._ttl_s if info is not None else min(self._ttl_s, 1.0)))
        return info

    def forget(self, key_id: str) -> None:
        for digest, (info, _) in list(self._cache.items()):
            if info is not None and info.id == key_id:
                del self._cache[digest]
