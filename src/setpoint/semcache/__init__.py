"""Semantic cache: serve a stored answer to a prompt that means the same as an earlier one.

Off by default. Importing this package is cheap: numpy, onnxruntime and tokenizers (the `semantic`
extra) are imported only when an `Embedder` or an index is built. Names load on first access.

- `Embedder` (`embedder.py`): all-MiniLM-L6-v2 int8 ONNX sentence vectors, 384 floats, normalised.
- `guard` (`guard.py`): refuses a hit whose numbers, negations, antonyms or named entities differ.
- `MemoryVectorIndex` (`index.py`), `RedisVectorIndex` (`redis_index.py`): per-partition exact search.
- `SemanticCache`, `partition_key` (`lookup.py`): the pieces put together for the cache stage.

See docs/semantic-cache.md for the design, the evaluation and the measurements.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Eager (pure Python, cheap), and after the submodule import so that the package attribute `guard` is
# the function, not the module `setpoint.semcache.guard`.
from setpoint.semcache.guard import guard

if TYPE_CHECKING:
    from setpoint.semcache.embedder import Embedder
    from setpoint.semcache.index import Hit, MemoryVectorIndex, VectorIndex
    from setpoint.semcache.lookup import DEFAULT_THRESHOLD, Lookup, SemanticCache, partition_key
    from setpoint.semcache.redis_index import RedisVectorIndex

__all__ = [
    "DEFAULT_THRESHOLD",
    "Embedder",
    "Hit",
    "Lookup",
    "MemoryVectorIndex",
    "RedisVectorIndex",
    "SemanticCache",
    "VectorIndex",
    "guard",
    "partition_key",
]

_HOME = {
    "DEFAULT_THRESHOLD": "lookup",
    "Embedder": "embedder",
    "Hit": "index",
    "Lookup": "lookup",
    "MemoryVectorIndex": "index",
    "RedisVectorIndex": "redis_index",
    "SemanticCache": "lookup",
    "VectorIndex": "index",
    "partition_key": "lookup",
}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'setpoint.semcache' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"setpoint.semcache.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
