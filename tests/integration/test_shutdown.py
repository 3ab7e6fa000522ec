"""Shutdown: a step that fails is logged and the rest still run; the request log always stops,
so every acknowledged record is stored and no spool segment is left behind."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from setpoint.config.compile import compile_config
from setpoint.config.load import parse_config
from setpoint.proxy.background import BackgroundGateway


async def _fails() -> None:
    raise RuntimeError("provider close exploded")


def test_a_failing_shutdown_step_still_drains_the_request_log(
    default_config: Callable[..., dict[str, Any]], make_client: Callable[..., openai.OpenAI], keys: Any, read_rows: Callable[..., list[dict[str, Any]]],
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    data_dir = tmp_path / "gw"
    gw = BackgroundGateway(compile_config(parse_config(default_config(data_dir=str(data_dir)), env={})))
    gw.__enter__()  # stopped by hand below, with its providers' close made to fail
    client = make_client(gw.base_url, keys.all)
    for i in range(5):
        client.chat.completions.create(model="chat-a", messages=[{"role": "user", "content": f"q {i}"}])
    assert gw.server is not None
    for provider in gw.server.gateway.runtime.providers.values():
        provider.aclose = _fails  # type: ignore[method-assign]  # every provider's close fails
    with caplog.at_level(logging.ERROR, logger="setpoint.gateway"):
        gw.__exit__(None, None, None)
    assert "shutdown: closing provider" in caplog.text and "provider close exploded" in caplog.text
    assert len(read_rows(data_dir / "requests.db")) == 5
    assert sorted(p.name for p in (data_dir / "spool").glob("*.jsonl")) == []
