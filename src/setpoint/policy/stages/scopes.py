"""Which entity of a scope a request belongs to (shared by rate limits and budgets)."""

from __future__ import annotations

from collections.abc import Callable

from setpoint.proxy.context import RequestContext

__all__ = ["entity_for"]


_ENTITY: dict[str, Callable[[RequestContext], str | None]] = {
    "key": lambda ctx: ctx.key.id if ctx.key else None,
    "team": lambda ctx: ctx.key.team if ctx.key else None,
    "user": lambda ctx: ctx.user,
    "model": lambda ctx: ctx.model or None,
    "deployment": lambda ctx: ctx.deployment.name if ctx.deployment else None,
    "run": lambda ctx: ctx.run_id,
}


def entity_for(ctx: RequestContext, scope: str) -> str | None:
    """The key id, team, user, model alias, deployment or run id, or None when it has none."""
    return _ENTITY[scope](ctx)
