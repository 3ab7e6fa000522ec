"""`cache_key` on its own: the canonical request (field order does not matter, fields that cannot
change the answer are left out, every field that can is in) and the tenant it is partitioned by."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from setpoint.keys.model import KeyInfo
from setpoint.policy.stages.cache import cache_key
from setpoint.proxy.context import RequestContext

ALICE = KeyInfo(id="cfg:alice", name="alice", team="team-a")
ALBERT = KeyInfo(id="cfg:albert", name="albert", team="team-a")  # alice's team mate
BOB = KeyInfo(id="cfg:bob", name="bob", team="team-b")
SOLO = KeyInfo(id="cfg:solo", name="solo")  # no team

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "number"}},
                       "required": ["city"]},
    },
}
SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "answer", "strict": True,
                    "schema": {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}},
}

BASE: dict[str, Any] = {
    "model": "chat-a",
    "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is a set point?"}],
    "temperature": 0,
    "top_p": 1,
    "max_tokens": 64,
    "seed": 7,
    "n": 1,
    "tools": [WEATHER_TOOL],
    "response_format": {"type": "text"},
}


def ctx(body: dict[str, Any], key: KeyInfo | None = ALICE, model: str = "chat-a", endpoint: str = "chat") -> RequestContext:
    return RequestContext(request_id="req_test", endpoint=endpoint, started_at=0.0, started_mono=0.0, headers={},
                          raw=b"", body=body, model=model, key=key)


def key_of(body: dict[str, Any], **kw: Any) -> str:
    partition = kw.pop("partition", "team")
    return cache_key(ctx(body, **kw), partition)


def reorder(value: Any) -> Any:
    """The same JSON value with every object's keys in reverse order (lists keep their order)."""
    if isinstance(value, dict):
        return {k: reorder(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [reorder(v) for v in value]
    return value


def test_key_is_a_stable_sha256_hex_digest() -> None:
    k = key_of(BASE)
    assert k.startswith("cache:")
    digest = k[len("cache:"):]
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert key_of(copy.deepcopy(BASE)) == k  # same input, same key (no randomness, no time)


def test_field_order_does_not_matter_at_any_depth() -> None:
    shuffled = reorder(BASE)
    assert list(shuffled) == list(reversed(list(BASE)))  # the top level really is reordered
    assert list(shuffled["tools"][0]["function"]) != list(BASE["tools"][0]["function"])  # and nested objects
    assert key_of(shuffled) == key_of(BASE)


@pytest.mark.parametrize("field,value", [
    ("stream", True),
    ("stream_options", {"include_usage": True}),
    ("user", "alice@example.com"),
    ("metadata", {"trace": "abc123"}),
    ("store", True),
    ("service_tier", "flex"),
])
def test_fields_that_cannot_change_the_answer_are_left_out(field: str, value: Any) -> None:
    assert key_of({**BASE, field: value}) == key_of(BASE)


def test_all_irrelevant_fields_together_are_left_out() -> None:
    noisy = {**BASE, "stream": True, "stream_options": {"include_usage": False}, "user": "u", "metadata": {"a": "b"},
             "store": False, "service_tier": "default"}
    assert key_of(noisy) == key_of(BASE)


def test_the_model_field_in_the_body_is_replaced_by_the_resolved_alias() -> None:
    # The key uses ctx.model (the alias the route stage resolved), whatever the body spelled.
    assert key_of({**BASE, "model": "something-else"}) == key_of(BASE)


RELEVANT_CHANGES: list[tuple[str, Any]] = [
    ("messages", [{"role": "user", "content": "What is a set point, briefly?"}]),
    ("messages", [BASE["messages"][0], {"role": "user", "content": "What is a set point?", "name": "x"}]),
    ("messages", list(reversed(BASE["messages"]))),  # order of messages matters (lists are not sorted)
    ("tools", [{**WEATHER_TOOL, "function": {**WEATHER_TOOL["function"], "name": "get_forecast"}}]),
    ("tools", []),
    ("tool_choice", "none"),
    ("temperature", 0.5),
    ("top_p", 0.9),
    ("max_tokens", 65),
    ("max_completion_tokens", 64),
    ("seed", 8),
    ("response_format", {"type": "json_object"}),
    ("response_format", SCHEMA_FORMAT),
    ("n", 2),
    ("logprobs", True),
    ("stop", ["\n"]),
    ("frequency_penalty", 0.5),
    ("sim_output_tokens", 5),  # an unknown field is passed upstream, so it is part of the key too
]


@pytest.mark.parametrize("field,value", RELEVANT_CHANGES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(RELEVANT_CHANGES)])
def test_fields_that_can_change_the_answer_change_the_key(field: str, value: Any) -> None:
    assert key_of({**BASE, field: value}) != key_of(BASE)


def test_removing_a_relevant_field_changes_the_key() -> None:
    for field in ("temperature", "top_p", "max_tokens", "seed", "n", "tools", "response_format"):
        without = {k: v for k, v in BASE.items() if k != field}
        assert key_of(without) != key_of(BASE), field


def test_model_alias_is_part_of_the_key() -> None:
    assert key_of(BASE, model="chat-b") != key_of(BASE, model="chat-a")


def test_endpoint_is_part_of_the_key() -> None:
    body = {"model": "embed", "input": "hello"}
    assert key_of(body, model="embed", endpoint="embeddings") != key_of(body, model="embed", endpoint="chat")


# -- tenant -----------------------------------------------------------------------------------------


def test_team_partition_shares_within_a_team_only() -> None:
    assert key_of(BASE, key=ALICE) == key_of(BASE, key=ALBERT)
    assert key_of(BASE, key=ALICE) != key_of(BASE, key=BOB)


def test_key_partition_separates_team_mates() -> None:
    assert key_of(BASE, key=ALICE, partition="key") != key_of(BASE, key=ALBERT, partition="key")
    assert key_of(BASE, key=ALICE, partition="key") == key_of(BASE, key=ALICE, partition="key")


def test_a_key_without_a_team_is_its_own_tenant() -> None:
    solo2 = KeyInfo(id="cfg:solo2", name="solo2")
    assert key_of(BASE, key=SOLO) != key_of(BASE, key=solo2)
    assert key_of(BASE, key=SOLO) not in {key_of(BASE, key=k) for k in (ALICE, ALBERT, BOB)}
    # partition "key" and "team" agree for a key without a team
    assert key_of(BASE, key=SOLO, partition="key") == key_of(BASE, key=SOLO, partition="team")


def test_the_key_depends_on_the_key_id_not_its_name_or_user() -> None:
    renamed = KeyInfo(id="cfg:alice", name="alice-renamed", team="team-a", user="someone")
    assert key_of(BASE, key=renamed, partition="key") == key_of(BASE, key=ALICE, partition="key")


def test_a_team_named_like_a_key_id_does_not_share_with_that_key() -> None:
    impostor = KeyInfo(id="cfg:mallory", name="mallory", team="cfg:solo")  # a team whose name is solo's key id
    assert key_of(BASE, key=impostor) != key_of(BASE, key=SOLO)
