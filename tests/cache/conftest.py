"""Fixtures for the exact response cache suite; the helpers they build on are in `helpers.py`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from setpoint.clock import ManualClock
from setpoint.proxy.background import BackgroundGateway

from .helpers import CacheGateway, cache_config


@pytest.fixture
def http_client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=20.0, trust_env=False) as c:
        yield c


@pytest.fixture
def cache_gateway(make_gateway: Callable[..., BackgroundGateway], make_client: Callable[..., openai.OpenAI],
                  http_client: httpx.Client, read_rows: Callable[..., list[dict[str, Any]]]) -> Iterator[Callable[..., CacheGateway]]:
    """`cache_gateway(cfg=None, clock=None)` -> a started, instrumented `CacheGateway`
    (default config: `cache_config()`). At teardown, in-flight cache writes are waited for before
    `make_gateway` stops the gateway."""
    started: list[CacheGateway] = []

    def start(cfg: dict[str, Any] | None = None, clock: ManualClock | None = None) -> CacheGateway:
        gw = make_gateway(cfg if cfg is not None else cache_config(), clock=clock)
        cg = CacheGateway(gw, http_client, make_client, read_rows, clock).install()
        started.append(cg)
        return cg

    yield start
    for cg in started:
        cg.drain_writes()
