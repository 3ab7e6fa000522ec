"""A `VectorIndex` shared by gateway processes through Redis 7 without RediSearch.

Each partition is two Redis keys: a LIST of packed entries (`vector | expires_at | key | text`, appended
with RPUSH and trimmed to `capacity` from the head) and a HASH `{gen, base, seq}`: `seq` counts every
entry ever appended, `base` is the sequence number of the list's first element, and `gen` is a random
generation id set when the partition is created (it changes if the keys expire or are flushed).

Every process keeps a local numpy mirror of the partitions it searches and syncs it incrementally:
a search is one EVALSHA that returns only the entries appended since the mirror's last sequence
number (nothing, in the steady state), then a local brute-force product (`index.Rows`). A cold
mirror fetches `fetch_batch` entries per round trip, at most `search_round_trips` per search (so a
first search of a 50k-entry partition does not stall a request; `sync()` catches up at once).
Concurrent searches of one partition share a sync. Expiry is checked against the injected clock; Redis's own key TTL
(`PEXPIRE`, extended to the latest entry's expiry) only collects abandoned partitions.

Redis errors raise `StateBackendError`; the cache stage treats them as a miss (it fails open).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
from typing import Any

from setpoint.clock import Clock
from setpoint.errors import StateBackendError
from setpoint.semcache.index import DIM, MODEL_ID, Hit, PartitionMap, Rows, Vector, as_query, search_rows
from setpoint.state.resp import RespClient, RespError

__all__ = ["RedisVectorIndex"]

_PREFIX = "{sp}:sc:"
_META = struct.Struct("<dI")  # expires_at, len(key)

# KEYS: list, meta. ARGV: entry, capacity, ttl_ms, gen for a new partition.
_ADD = """
local gen = redis.call('HGET', KEYS[2], 'gen')
if not gen then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'gen', ARGV[4], 'base', 0, 'seq', 0)
end
redis.call('RPUSH', KEYS[1], ARGV[1])
local seq = redis.call('HINCRBY', KEYS[2], 'seq', 1)
local base = tonumber(redis.call('HGET', KEYS[2], 'base'))
local cap = tonumber(ARGV[2])
if seq - base > cap then
  redis.call('LTRIM', KEYS[1], seq - base - cap, -1)
  redis.call('HSET', KEYS[2], 'base', seq - cap)
end
local ttl = tonumber(ARGV[3])
for i = 1, 2 do
  if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
end
return seq
"""

# KEYS: list, meta. ARGV: first sequence number wanted, max entries.
# Returns {gen, base, seq, first, entries}; gen is '' when the partition does not exist.
_SYNC = """
local m = redis.call('HMGET', KEYS[2], 'gen', 'base', 'seq')
if not m[1] then return {'', 0, 0, 0, {}} end
local base, seq = tonumber(m[2]), tonumber(m[3])
local first = math.max(tonumber(ARGV[1]), base)
if first >= seq then return {m[1], base, seq, first, {}} end
local last = math.min(seq, first + tonumber(ARGV[2])) - 1
return {m[1], base, seq, first, redis.call('LRANGE', KEYS[1], first - base, last - base)}
"""


class _Mirror:
    __slots__ = ("base", "gen", "lock", "next_seq", "rows", "syncs")

    def __init__(self, capacity: int, dim: int) -> None:
        self.rows = Rows(capacity, dim)
        self.gen = b""
        self.next_seq = 0
        self.base = 0
        self.lock = asyncio.Lock()
        self.syncs = 0


def _keys(partition: str, namespace: str = "") -> list[str]:
    digest = hashlib.blake2b(namespace.encode() + b"\0" + partition.encode(), digest_size=16).hexdigest()
    return [_PREFIX + digest + ":log", _PREFIX + digest + ":meta"]


class RedisVectorIndex:
    """`VectorIndex` stored in Redis, searched in a local mirror (see the module docstring)."""

    def __init__(self, client: RespClient, clock: Clock, *, capacity: int = 10_000,
                 max_partitions: int = 10_000, offload_rows: int = 8_192, fetch_batch: int = 2_000,
                 search_round_trips: int = 2, namespace: str = MODEL_ID, dim: int = DIM) -> None:
        """`fetch_batch` entries per sync round trip; a search makes at most `search_round_trips` of them
        (a cold mirror of a large partition fills over several searches, or at once with `sync`).
        `namespace` (the embedding model's id) keeps vectors of different models apart."""
        if min(capacity, max_partitions, fetch_batch, search_round_trips) < 1:
            raise ValueError("capacity, max_partitions, fetch_batch and search_round_trips must be >= 1")
        self._client = client
        self._owns_client = False
        self._clock = clock
        self._capacity = capacity
        self._dim = dim
        self._vec_bytes = dim * 4
        self._offload = offload_rows
        self._fetch = fetch_batch
        self._rounds = search_round_trips
        self._namespace = namespace
        self._mirrors = PartitionMap(max_partitions)

    @classmethod
    def from_url(cls, url: str, clock: Clock, *, timeout_s: float = 2.0, capacity: int = 10_000,
                 max_partitions: int = 10_000, namespace: str = MODEL_ID) -> RedisVectorIndex:
        """An index on its own connection pool (`redis://host:port/db` or `unix://path`)."""
        client = RespClient(url, timeout_s=timeout_s)
        index = cls(client, clock, capacity=capacity, max_partitions=max_partitions, namespace=namespace)
        index._owns_client = True
        return index

    async def _call(self, script: str, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self._client.eval_script(script, keys, args)
        except RespError as exc:
            raise StateBackendError(f"semantic cache index unavailable: {exc}") from exc

    async def add(self, partition: str, vec: Vector, entry_key: str, text: str, expires_at: float) -> None:
        q = as_query(vec, self._dim)
        ttl_s = expires_at - self._clock.now()
        if ttl_s <= 0:
            return
        key = entry_key.encode()
        entry = q.tobytes() + _META.pack(expires_at, len(key)) + key + text.encode()
        gen = os.urandom(8).hex()
        ttl_ms = max(1, int(ttl_s * 1000)) + 1000  # Redis's TTL only collects the garbage
        await self._call(_ADD, _keys(partition, self._namespace), [entry, self._capacity, ttl_ms, gen])

    async def search(self, partition: str, vec: Vector, threshold: float, *, limit: int = 1) -> list[Hit]:
        q = as_query(vec, self._dim)
        mirror: _Mirror = self._mirrors.touch(partition, lambda: _Mirror(self._capacity, self._dim))
        await self._sync(partition, mirror, self._rounds)
        return await search_rows(mirror.rows, q, threshold, self._clock.now(), limit, self._offload)

    async def sync(self, partition: str) -> int:
        """Bring the local mirror of `partition` fully up to date now; returns its entry count."""
        mirror: _Mirror = self._mirrors.touch(partition, lambda: _Mirror(self._capacity, self._dim))
        await self._sync(partition, mirror, None)
        return mirror.rows.size

    async def _sync(self, partition: str, m: _Mirror, rounds: int | None) -> None:
        seen = m.syncs
        async with m.lock:
            if m.syncs != seen and rounds is not None:
                return  # a sync finished while this one waited: share its result
            keys = _keys(partition, self._namespace)
            while rounds is None or rounds > 0:
                if rounds is not None:
                    rounds -= 1
                requested = m.next_seq
                gen, base, seq, first, entries = await self._call(_SYNC, keys, [requested, self._fetch])
                if gen != m.gen:  # created, recreated or gone: start over
                    self._reset(m, gen)
                    if gen == b"":
                        break
                    if requested > int(base):
                        continue  # the reply skipped entries of the new generation: fetch from its start
                self._apply(m, int(first), entries)
                if int(base) != m.base:
                    m.base = int(base)
                    m.rows.kill_below(m.base)
                if not entries or m.next_seq >= int(seq):
                    break
            m.syncs += 1

    def _reset(self, m: _Mirror, gen: bytes) -> None:
        m.rows = Rows(self._capacity, self._dim)
        m.gen, m.next_seq, m.base = gen, 0, 0

    def _apply(self, m: _Mirror, first: int, entries: list[bytes]) -> None:
        np = m.rows._np
        vb, hb = self._vec_bytes, self._vec_bytes + _META.size
        for i, blob in enumerate(entries):
            if len(blob) < hb:
                continue  # not an entry of this format (a different dimension): ignore it
            expires_at, klen = _META.unpack_from(blob, vb)
            vec = np.frombuffer(blob, dtype=np.float32, count=self._dim)
            key = blob[hb : hb + klen].decode()
            text = blob[hb + klen :].decode()
            m.rows.put(vec, key, text, expires_at, seq=first + i)
        if entries:
            m.next_seq = first + len(entries)

    async def aclose(self) -> None:
        """Drop the mirrors; close the connection pool if `from_url` opened it."""
        self._mirrors.clear()
        if self._owns_client:
            await self._client.aclose()
