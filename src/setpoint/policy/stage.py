"""Composing stages: a reversed fold done once at startup."""

from __future__ import annotations

from collections.abc import Sequence

from setpoint.proxy.context import RequestContext
from setpoint.types import Next, Reply, Stage

__all__ = ["compose"]


def compose(stages: Sequence[Stage], terminal: Next) -> Next:
    handler = terminal
    for stage in reversed(stages):
        handler = _bind(stage, handler)
    return handler


def _bind(stage: Stage, call_next: Next) -> Next:
    async def run(ctx: RequestContext) -> Reply:
        return await stage(ctx, call_next)

    run.__qualname__ = f"{type(stage).__name__}.bound"
    return run
