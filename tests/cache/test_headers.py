"""Per-request control: `x-setpoint-cache: off|read|write|refresh` (off: neither reads nor writes;
read: reads, never writes; write and refresh: never read, always (over)write) and
`x-setpoint-cache-ttl`. Anything else is refused with an OpenAI-shaped 400 before any upstream
call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import pytest

from setpoint.clock import ManualClock

from .helpers import MESSAGES, CacheGateway, cache_config


def ask(cg: CacheGateway, mode: str | None = None, **body: Any) -> tuple[str | None, str]:
    """(x-setpoint-cache or None, answer id) of one chat-a request."""
    r = cg.chat(headers={"x-setpoint-cache": mode} if mode is not None else None, **body)
    assert r.status_code == 200, r.text
    return r.headers.get("x-setpoint-cache"), r.json()["id"]


def cached(cg: CacheGateway, **body: Any) -> str:
    """Put an entry for this request in the cache (a default-mode miss); returns its answer id."""
    status, rid = ask(cg, **body)
    assert status == "miss"
    cg.wait_written(rid)
    return rid


# -- off --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["off", "OFF", "Off"])
def test_off_neither_reads_nor_writes(cache_gateway: Callable[..., CacheGateway], spelling: str) -> None:
    cg = cache_gateway()
    entry = cached(cg)
    status, fresh = ask(cg, spelling)
    assert status is None  # the cache stayed out of it
    assert fresh != entry and cg.upstream_count == 2
    assert ask(cg) == ("hit", entry)  # the entry is untouched

    ask(cg, spelling, messages=[{"role": "user", "content": "never stored"}])
    cg.barrier()
    assert cg.write_count == 2  # the first entry and the barrier
    status, rid = ask(cg, messages=[{"role": "user", "content": "never stored"}])
    assert status == "miss"
    cg.wait_written(rid)
    assert cg.write_count == 3


# -- read -------------------------------------------------------------------------------------------


def test_read_hits_an_existing_entry(cache_gateway: Callable[..., CacheGateway]) -> None:
    cg = cache_gateway()
    entry = cached(cg)
    assert ask(cg, "read") == ("hit", entry)
    assert cg.upstream_count == 1


def test_read_does_not_write_on_a_miss(cache_gateway: Callable[..., CacheGateway]) -> None:
    cg = cache_gateway()
    status, first = ask(cg, "read")
    assert status == "miss" and cg.upstream_count == 1
    status, again = ask(cg, "read")
    assert status == "miss" and again != first and cg.upstream_count == 2
    cg.barrier()  # any write the read requests had scheduled has completed by now
    assert cg.write_count == 1  # the barrier's only
    assert ask(cg)[0] == "miss"


# -- write and refresh ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["write", "refresh", "Refresh"])
def test_write_and_refresh_skip_the_read_and_overwrite(cache_gateway: Callable[..., CacheGateway], mode: str) -> None:
    cg = cache_gateway()
    old = cached(cg)
    status, new = ask(cg, mode)
    assert status == "miss", "the existing entry must not be read"
    assert new != old and cg.upstream_count == 2
    cg.wait_written(new)
    assert ask(cg) == ("hit", new), "the new answer replaced the old one"
    assert cg.upstream_count == 2


@pytest.mark.parametrize("mode", ["write", "refresh"])
def test_write_and_refresh_store_a_new_entry(cache_gateway: Callable[..., CacheGateway], mode: str) -> None:
    cg = cache_gateway()
    status, rid = ask(cg, mode)
    assert status == "miss"
    cg.wait_written(rid)
    assert ask(cg, "read") == ("hit", rid)


def test_explicit_modes_apply_to_non_deterministic_requests(cache_gateway: Callable[..., CacheGateway]) -> None:
    # Non-deterministic requests stay out of the cache by default; an explicit header opts one in.
    cg = cache_gateway()
    status, rid = ask(cg, "write", temperature=0.9)
    assert status == "miss"
    cg.wait_written(rid)
    assert ask(cg, temperature=0.9)[0] is None  # default mode: still off for temperature 0.9
    assert ask(cg, "read", temperature=0.9) == ("hit", rid)
    assert cg.upstream_count == 2


# -- invalid values ---------------------------------------------------------------------------------


def assert_openai_400(cg: CacheGateway, headers: dict[str, str], fragment: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        cg.client().chat.completions.create(model="chat-a", messages=MESSAGES, temperature=0, extra_headers=headers)
    err = info.value
    assert err.status_code == 400
    assert err.code == "invalid_request"
    body = err.body if isinstance(err.body, dict) else {}
    assert body.get("type") == "invalid_request_error"
    assert fragment in body.get("message", "")
    assert err.response.headers.get("x-request-id", "").startswith("req_")

    raw = cg.chat(headers=headers)  # and the raw body is OpenAI's error object
    assert raw.status_code == 400
    assert set(raw.json()) == {"error"}
    assert {"message", "type", "param", "code"} <= set(raw.json()["error"])


@pytest.mark.parametrize("value", ["on", "yes", "hit", "miss", "read_write", "read,write", "bogus"])
def test_invalid_mode_is_an_openai_shaped_400(cache_gateway: Callable[..., CacheGateway], value: str) -> None:
    cg = cache_gateway()
    cached(cg)
    assert_openai_400(cg, {"x-setpoint-cache": value}, "x-setpoint-cache")
    assert cg.upstream_count == 1  # refused before the upstream (and before the cache: no hit either)
    rows = cg.rows()
    assert [(r["status"], r["error_code"]) for r in rows[1:]] == [(400, "invalid_request")] * 2
    assert all(r["cache_status"] is None for r in rows[1:])


@pytest.mark.parametrize("value", ["abc", "", "0", "-5", "-inf", "1h"])
def test_invalid_ttl_is_an_openai_shaped_400(cache_gateway: Callable[..., CacheGateway], value: str) -> None:
    cg = cache_gateway()
    assert_openai_400(cg, {"x-setpoint-cache-ttl": value}, "x-setpoint-cache-ttl")
    assert cg.upstream_count == 0


@pytest.mark.parametrize("value", ["nan", "inf", "1e999"])
def test_non_finite_ttl_is_an_openai_shaped_400(cache_gateway: Callable[..., CacheGateway], value: str) -> None:
    cg = cache_gateway()
    r = cg.chat(headers={"x-setpoint-cache-ttl": value})
    assert r.status_code == 400, f"ttl {value!r} was accepted: {r.headers.get('x-setpoint-cache')}"


def test_ttl_header_is_checked_even_when_reading(cache_gateway: Callable[..., CacheGateway]) -> None:
    cg = cache_gateway()
    cached(cg)
    r = cg.chat(headers={"x-setpoint-cache": "read", "x-setpoint-cache-ttl": "soon"})
    assert r.status_code == 400
    assert cg.upstream_count == 1


def test_ttl_header_is_harmless_when_the_cache_is_off_for_the_request(cache_gateway: Callable[..., CacheGateway]) -> None:
    # A ttl header on a request the cache does not handle (temperature 0.9, default mode) is harmless.
    cg = cache_gateway()
    r = cg.chat(temperature=0.9, headers={"x-setpoint-cache-ttl": "30"})
    assert r.status_code == 200 and "x-setpoint-cache" not in r.headers


def test_a_nan_ttl_does_not_make_an_entry_immortal(cache_gateway: Callable[..., CacheGateway]) -> None:
    cg = cache_gateway(cache_config({"ttl_s": 60}), clock=ManualClock())
    r = cg.chat(headers={"x-setpoint-cache-ttl": "nan"})
    if r.status_code == 400:
        return  # refused: the fix for test_non_finite_ttl_is_an_openai_shaped_400
    cg.wait_written(r.json()["id"])
    cg.advance(10 * 365 * 86400)  # ten years later
    assert cg.chat().headers["x-setpoint-cache"] == "miss"
