"""Which chat requests the semantic cache may answer, and under which partition.

A request is matched by meaning only on its **last user message**. Everything else that can change
the answer goes into the partition, which is a hard filter of the vector index (never a text prefix):
the tenant, the model alias, every earlier message (system prompt included), the tool set and the
sampling parameters. By default only single-turn requests (system messages + one user message)
without tools are eligible; `multi_turn` and `tools` widen that. A message with non-text parts
(images, audio) is never matched by meaning.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from setpoint.clock import Clock
from setpoint.config.schema import SemanticCacheConfig
from setpoint.proxy.context import RequestContext

if TYPE_CHECKING:
    from setpoint.semcache.lookup import SemanticCache
    from setpoint.state.base import StateStore

__all__ = ["SemanticMatcher", "build_semantic"]

_SYSTEM = frozenset({"system", "developer"})
# Not part of the partition: transport and bookkeeping fields, and what is matched or partitioned apart.
_NOT_PARAMS = frozenset({"messages", "tools", "functions", "tool_choice", "function_call", "model", "stream",
                         "stream_options", "user", "metadata", "store", "service_tier"})


def _text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                return None  # an image or other non-text part: only the exact cache may answer
            parts.append(p["text"])
        return "\n".join(parts)
    return None


class SemanticMatcher:
    def __init__(self, cache: SemanticCache, cfg: SemanticCacheConfig) -> None:
        self.cache = cache
        self._cfg = cfg

    def query(self, ctx: RequestContext, tenant: str) -> tuple[str, str] | None:
        """(partition, text to embed), or None when this request must not be matched by meaning."""
        from setpoint.semcache.lookup import partition_key

        body = ctx.body
        if ctx.endpoint != "chat":
            return None
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return None
        last = messages[-1]
        if not isinstance(last, dict) or last.get("role") != "user":
            return None
        text = _text(last.get("content"))
        if not text or not text.strip():
            return None
        earlier = messages[:-1]
        if not self._cfg.multi_turn and any(not isinstance(m, dict) or m.get("role") not in _SYSTEM for m in earlier):
            return None
        tools = body.get("tools") or body.get("functions")
        if tools and not self._cfg.tools:
            return None
        params = {k: v for k, v in body.items() if k not in _NOT_PARAMS}
        tool_set = {k: body[k] for k in ("tools", "functions", "tool_choice", "function_call") if k in body}
        import orjson

        history = orjson.dumps(earlier, option=orjson.OPT_SORT_KEYS).decode()
        return partition_key(tenant, ctx.model, system_prompt=history, tools=tool_set or None, params=params), text


def build_semantic(configs: Mapping[str, SemanticCacheConfig], state: StateStore, clock: Clock) -> dict[str, SemanticMatcher]:
    """One embedder and one vector index per process, shared by every alias that opts in. With a
    Redis state store the index lives in Redis (shared by replicas); otherwise in this process."""
    if not configs:
        return {}
    from setpoint.semcache.embedder import Embedder
    from setpoint.semcache.index import MemoryVectorIndex
    from setpoint.semcache.lookup import SemanticCache
    from setpoint.semcache.redis_index import RedisVectorIndex
    from setpoint.state.redis import RedisStateStore

    embedder = Embedder()
    capacity = max(c.max_entries for c in configs.values())
    index: Any
    if isinstance(state, RedisStateStore):
        index = RedisVectorIndex.from_url(state.url, clock, capacity=capacity)
    else:
        index = MemoryVectorIndex(clock, capacity=capacity)
    return {
        alias: SemanticMatcher(SemanticCache(embedder, index, threshold=c.threshold,
                                             guard=None if not c.guard else _default_guard()), c)
        for alias, c in configs.items()
    }


def _default_guard() -> Any:
    from setpoint.semcache.guard import guard

    return guard
