"""A second gateway process for the Redis index tests: `python redis_peer.py URL add|search PARTITION SEED...`.

`add` stores unit(seed) under key "k<seed>"; `search` prints the keys it finds for unit(seed), one line
per seed (comma-separated, empty when nothing matched). Time is a ManualClock at the tests' epoch.
"""

from __future__ import annotations

import asyncio
import sys

import numpy as np

from setpoint.clock import ManualClock
from setpoint.semcache.redis_index import RedisVectorIndex

T0 = 1_700_000_000.0


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(384).astype(np.float32)
    return v / np.linalg.norm(v)


async def main(url: str, action: str, partition: str, seeds: list[int]) -> None:
    index = RedisVectorIndex.from_url(url, ManualClock(T0), timeout_s=10.0)
    try:
        for seed in seeds:
            if action == "add":
                await index.add(partition, unit(seed), f"k{seed}", f"text {seed}", T0 + 3600)
            else:
                hits = await index.search(partition, unit(seed), 0.99, limit=5)
                print(",".join(h.entry_key for h in hits), flush=True)
    finally:
        await index.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], [int(s) for s in sys.argv[4:]]))
