"""Tenant isolation end to end: entries are shared within a team (the default partition), never
across teams; with `partition: key` not even between team mates; a key without a team is its own
tenant. Keys from the config file and keys created through /admin/keys alike."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from .helpers import (
    ALL_KEY,
    LIMITED_KEY,
    MASTER_KEY,
    NO_TEAM_KEY,
    OTHER_TEAM_KEY,
    TEAM_MATE_KEY,
    CacheGateway,
    cache_config,
)


def ask(cg: CacheGateway, key: str, **body: Any) -> tuple[str, str]:
    """(x-setpoint-cache, answer id) of one chat-a request with `key`; waits for a miss's write."""
    r = cg.chat(key=key, **body)
    assert r.status_code == 200, r.text
    status, rid = r.headers["x-setpoint-cache"], r.json()["id"]
    if status == "miss":
        cg.wait_written(rid)
    return status, rid


def test_team_mates_share_and_other_teams_do_not(cache_gateway: Callable[..., CacheGateway]) -> None:
    cg = cache_gateway()
    status, original = ask(cg, ALL_KEY)
    assert status == "miss"

    assert ask(cg, TEAM_MATE_KEY) == ("hit", original)  # team-all shares
    assert cg.upstream_count == 1

    other = ask(cg, OTHER_TEAM_KEY)  # team-other: its own entry, its own upstream answer
    assert other[0] == "miss" and other[1] != original
    limited = ask(cg, LIMITED_KEY)  # team-limited
    assert limited[0] == "miss" and limited[1] not in (original, other[1])
    solo = ask(cg, NO_TEAM_KEY)  # no team
    assert solo[0] == "miss" and solo[1] not in (original, other[1], limited[1])
    assert cg.upstream_count == 4

    # Each tenant now hits its own entry, never another's.
    assert ask(cg, OTHER_TEAM_KEY) == ("hit", other[1])
    assert ask(cg, LIMITED_KEY) == ("hit", limited[1])
    assert ask(cg, NO_TEAM_KEY) == ("hit", solo[1])
    assert ask(cg, TEAM_MATE_KEY) == ("hit", original)
    assert ask(cg, ALL_KEY) == ("hit", original)
    assert cg.upstream_count == 4
    assert len({key for key, _ in cg.writes}) == 4  # four tenants, four entries

    rows = cg.rows()
    hits = {(r["key_name"], r["team"]) for r in rows if r["cache_status"] == "hit"}
    assert hits == {("mate", "team-all"), ("other", "team-other"), ("limited", "team-limited"), ("solo", None),
                    ("all", "team-all")}


def test_partition_key_separates_team_mates(cache_gateway: Callable[..., CacheGateway]) -> None:
    cg = cache_gateway(cache_config({"partition": "key"}))
    status, mine = ask(cg, ALL_KEY)
    assert status == "miss"
    status, mates = ask(cg, TEAM_MATE_KEY)  # same team, but every key is its own tenant
    assert status == "miss" and mates != mine
    assert cg.upstream_count == 2
    assert ask(cg, ALL_KEY) == ("hit", mine)
    assert ask(cg, TEAM_MATE_KEY) == ("hit", mates)
    other = ask(cg, OTHER_TEAM_KEY)
    assert other[0] == "miss"
    assert cg.upstream_count == 3


def test_partition_is_per_model(cache_gateway: Callable[..., CacheGateway]) -> None:
    cfg = cache_config()  # chat-a: team partition
    cfg["models"]["chat-k"] = {"cache": {"partition": "key"},
                               "deployments": [{"provider": "sim", "model": "sim-small"}]}
    cg = cache_gateway(cfg)
    ask(cg, ALL_KEY)
    assert ask(cg, TEAM_MATE_KEY)[0] == "hit"
    assert ask(cg, ALL_KEY, model="chat-k")[0] == "miss"
    assert ask(cg, TEAM_MATE_KEY, model="chat-k")[0] == "miss"
    assert ask(cg, ALL_KEY, model="chat-k")[0] == "hit"
    assert cg.upstream_count == 3


def test_keys_created_through_the_admin_api(cache_gateway: Callable[..., CacheGateway],
                                            http_client: httpx.Client) -> None:
    cg = cache_gateway()

    def create(team: str | None) -> str:
        body: dict[str, Any] = {"name": f"dyn-{team}"}
        if team:
            body["team"] = team
        r = http_client.post(f"{cg.gw.root_url}/admin/keys", json=body, headers={"Authorization": f"Bearer {MASTER_KEY}"})
        assert r.status_code == 201, r.text
        return str(r.json()["key"])

    red1, red2, blue, loner = create("red"), create("red"), create("blue"), create(None)
    status, red_answer = ask(cg, red1)
    assert status == "miss"
    assert ask(cg, red2) == ("hit", red_answer)
    assert ask(cg, blue)[0] == "miss"
    assert ask(cg, loner)[0] == "miss"
    # Config keys of other teams do not see the stored keys' entries either.
    assert ask(cg, ALL_KEY)[0] == "miss"
    assert cg.upstream_count == 4


def test_team_named_like_a_key_id_is_another_tenant(cache_gateway: Callable[..., CacheGateway]) -> None:
    impostor = "sk-cache-impostor-0123456789"
    cfg = cache_config()
    cfg["keys"].append({"name": "impostor", "key": impostor, "team": "cfg:solo"})  # solo's key id is cfg:solo
    cg = cache_gateway(cfg)
    status, solo_answer = ask(cg, NO_TEAM_KEY)
    assert status == "miss"
    status, impostor_answer = ask(cg, impostor)
    assert status == "miss", "another tenant read solo's entry"
    assert impostor_answer != solo_answer
