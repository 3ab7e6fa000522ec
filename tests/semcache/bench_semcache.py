"""Semantic-cache measurements for docs/semantic-cache.md (not a test; run by hand):

    python tests/semcache/bench_semcache.py [--redis-url redis://127.0.0.1:6379/15]

Embedding latency (1 text, batch of 32) at 1 and 2 intra-op threads; memory-index search at 1k/10k/50k
entries per partition (inline, and offloaded to a thread); with --redis-url (a database it may FLUSHDB)
the Redis index: add, cold mirror sync, and a warm search (one sync round trip + local product).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from collections.abc import Callable

import numpy as np

from setpoint.clock import ManualClock
from setpoint.semcache.embedder import Embedder
from setpoint.semcache.index import MODEL_ID, MemoryVectorIndex
from setpoint.semcache.redis_index import RedisVectorIndex, _keys

SIZES = (1_000, 10_000, 50_000)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(median, p95) seconds."""
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.95) - 1]


def vectors(n: int, seed: int = 0) -> np.ndarray:
    m = np.random.default_rng(seed).standard_normal((n, 384)).astype(np.float32)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def bench_embedder() -> None:
    sentence = "How do I configure the rate limit for my team's API keys in the dashboard?"
    batch = [f"{sentence} (variant {i})" for i in range(32)]
    import numpy  # noqa: F401  (counted before the model)
    import onnxruntime  # noqa: F401

    before = rss_mb()
    for threads in (1, 2):
        e = Embedder(threads=threads)
        e.embed(batch)
        if threads == 1:
            print(f"RSS: +{rss_mb() - before:.0f} MB for one loaded model (total {rss_mb():.0f} MB)")
        one = timed(lambda e=e: e.embed([sentence]), 200)
        b32 = timed(lambda e=e: e.embed(batch), 20)
        print(f"embed threads={threads}: 1 text median {one[0]*1e3:.2f} ms p95 {one[1]*1e3:.2f} ms; "
              f"batch 32 median {b32[0]*1e3:.1f} ms = {32/b32[0]:.0f} texts/s")


async def bench_memory() -> None:
    clock = ManualClock()
    for n in SIZES:
        for offload in (10**9, 0):
            idx = MemoryVectorIndex(clock, capacity=n, offload_rows=offload)
            m = vectors(n)
            for i in range(n):
                await idx.add("p", m[i], f"key-{i}", "text", clock.now() + 3600)
            q = m[n // 2]
            samples = []
            for _ in range(50 if n > 10_000 else 200):
                t = time.perf_counter()
                hits = await idx.search("p", q, 0.95, limit=3)
                samples.append(time.perf_counter() - t)
            assert hits and hits[0].entry_key == f"key-{n // 2}"
            samples.sort()
            mode = "thread" if offload == 0 else "inline"
            print(f"memory search n={n:>6} {mode}: median {statistics.median(samples)*1e3:.3f} ms, "
                  f"p95 {samples[int(len(samples)*0.95)-1]*1e3:.3f} ms")


async def bench_redis(url: str) -> None:
    import redis

    r = redis.Redis.from_url(url)
    r.flushdb()
    clock = ManualClock()
    writer = RedisVectorIndex.from_url(url, clock, timeout_s=30, capacity=max(SIZES))
    for n in SIZES:
        part = f"bench-{n}"
        m = vectors(n, seed=n)
        text = "How do I configure the rate limit for my team's API keys in the dashboard?"
        t = time.perf_counter()
        await asyncio.gather(*(writer.add(part, m[i], f"cache:{i:064x}", text, clock.now() + 3600) for i in range(n)))
        add_s = time.perf_counter() - t
        reader = RedisVectorIndex.from_url(url, clock, timeout_s=30, capacity=max(SIZES))
        gc.collect()
        t = time.perf_counter()
        await reader.sync(part)
        cold = time.perf_counter() - t
        q = m[n // 2]
        samples = []
        for _ in range(50 if n > 10_000 else 200):
            t = time.perf_counter()
            hits = await reader.search(part, q, 0.95)
            samples.append(time.perf_counter() - t)
        assert hits and hits[0].entry_key == f"cache:{n // 2:064x}"
        samples.sort()
        used = r.memory_usage(_keys(part, MODEL_ID)[0])
        print(f"redis n={n:>6}: add {n/add_s:.0f}/s; cold sync {cold*1e3:.0f} ms; warm search median "
              f"{statistics.median(samples)*1e3:.3f} ms p95 {samples[int(len(samples)*0.95)-1]*1e3:.3f} ms; "
              f"redis list {used/1e6:.1f} MB ({used/n:.0f} B/entry)")
        await reader.aclose()
    await writer.aclose()
    r.flushdb()
    r.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis-url")
    parser.add_argument("--skip-embedder", action="store_true")
    args = parser.parse_args()
    if not args.skip_embedder:
        bench_embedder()
    asyncio.run(bench_memory())
    if args.redis_url:
        asyncio.run(bench_redis(args.redis_url))


if __name__ == "__main__":
    main()
