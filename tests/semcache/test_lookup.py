"""`SemanticCache` (embed -> search -> guard) and `partition_key`, on the real model."""

from __future__ import annotations

import pytest

from setpoint.clock import ManualClock
from setpoint.semcache import Embedder, MemoryVectorIndex, SemanticCache, partition_key


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def cache(embedder: Embedder, clock: ManualClock) -> SemanticCache:
    return SemanticCache(embedder, MemoryVectorIndex(clock))


async def test_a_paraphrase_is_served_and_a_near_miss_is_refused(cache: SemanticCache, clock: ManualClock) -> None:
    part = partition_key("team-a", "chat-a", system_prompt="You are helpful.")
    await cache.store(part, "How do I reset my password?", "cache:1", clock.now() + 60)
    await cache.store(part, "How do I delete a branch that has been merged?", "cache:2", clock.now() + 60)

    found = await cache.lookup(part, "How can I reset my password?")
    assert found.hit is not None and found.hit.entry_key == "cache:1" and found.hit.score >= 0.95

    refused = await cache.lookup(part, "How do I delete a branch that has not been merged?")  # cosine 0.98
    assert refused.hit is None
    assert [(h.entry_key, why.split(":")[0]) for h, why in refused.rejected] == [("cache:2", "negation differs")]
    assert refused.vector.shape == (384,)


async def test_a_refused_best_candidate_does_not_hide_an_acceptable_one(cache: SemanticCache,
                                                                       clock: ManualClock) -> None:
    part = partition_key("t", "m")
    await cache.store(part, "Show me the top 10 Python web frameworks", "ten", clock.now() + 60)
    await cache.store(part, "Show me the top five Python web frameworks", "five", clock.now() + 60)
    found = await cache.lookup(part, "Show me the top 5 Python web frameworks")
    assert found.hit is not None and found.hit.entry_key == "five"


async def test_tenants_and_system_prompts_never_share(cache: SemanticCache, clock: ManualClock) -> None:
    text = "How do I reset my password?"
    await cache.store(partition_key("team-a", "chat-a"), text, "a", clock.now() + 60)
    for other in (partition_key("team-b", "chat-a"), partition_key("team-a", "chat-b"),
                  partition_key("team-a", "chat-a", system_prompt="Answer in French."),
                  partition_key("team-a", "chat-a", tools=[{"type": "function", "function": {"name": "f"}}]),
                  partition_key("team-a", "chat-a", params={"temperature": 0.2})):
        assert (await cache.lookup(other, text)).hit is None
    assert (await cache.lookup(partition_key("team-a", "chat-a"), text)).hit is not None


async def test_without_the_guard_a_reversal_is_served(embedder: Embedder, clock: ManualClock) -> None:
    cache = SemanticCache(embedder, MemoryVectorIndex(clock), threshold=0.85, guard=None)
    await cache.store("p", "How do I enable two-factor authentication?", "enable", clock.now() + 60)
    found = await cache.lookup("p", "How do I disable two-factor authentication?")
    assert found.hit is not None  # this is why the guard is on by default


async def test_entries_expire(cache: SemanticCache, clock: ManualClock) -> None:
    await cache.store("p", "How do I track my order?", "k", clock.now() + 30)
    assert (await cache.lookup("p", "How can I track my order?")).hit is not None
    await clock.advance(30)
    assert (await cache.lookup("p", "How can I track my order?")).hit is None


def test_partition_key_is_stable_opaque_and_order_insensitive_for_tools() -> None:
    a = partition_key("t", "m", system_prompt="s", tools=[{"b": 1, "a": 2}], params={"x": 1, "y": 2})
    b = partition_key("t", "m", system_prompt="s", tools=[{"a": 2, "b": 1}], params={"y": 2, "x": 1})
    assert a == b and a.startswith("p1:") and "t" not in a.removeprefix("p1:").strip("0123456789abcdef")
    assert partition_key("ab", "c") != partition_key("a", "bc")  # fields are delimited
    assert partition_key("t", "m") != partition_key("t", "m", system_prompt=" ")


def test_threshold_is_validated(embedder: Embedder, clock: ManualClock) -> None:
    with pytest.raises(ValueError):
        SemanticCache(embedder, MemoryVectorIndex(clock), threshold=0.0)
