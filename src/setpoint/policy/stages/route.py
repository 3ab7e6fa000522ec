"""`route`: resolve the model alias to its deployments and check the key may use it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from setpoint.errors import InvalidRequestError, ModelNotFoundError, PermissionDeniedError
from setpoint.models import ModelRoute
from setpoint.proxy.context import RequestContext
from setpoint.types import Next, Reply

__all__ = ["RouteStage"]


class RouteStage:
    name: ClassVar[str] = "route"

    def __init__(self, routes: Mapping[str, ModelRoute], kind: str) -> None:
        self._routes = routes
        self._kind = kind

    async def __call__(self, ctx: RequestContext, call_next: Next) -> Reply:
        route = self._routes.get(ctx.model)
        if route is None:
            raise ModelNotFoundError(f"model '{ctx.model}' does not exist", param="model")
        if ctx.key is not None and not ctx.key.allows(ctx.model):
            raise PermissionDeniedError(f"this key may not use model '{ctx.model}'", param="model")
        if route.kind != self._kind:
            raise InvalidRequestError(
                f"model '{ctx.model}' is an {route.kind} model and cannot serve this endpoint", param="model"
            )
        ctx.route = route
        ctx.deployment = route.deployments[0]
        ctx.annotations["route"] = ctx.deployment.name
        return await call_next(ctx)
