"""Build one pipeline per endpoint, once, at startup. Later stages slot in between route and upstream."""

from __future__ import annotations

from collections.abc import Mapping

from setpoint.clock import Clock
from setpoint.models import ModelRoute
from setpoint.policy.stage import compose
from setpoint.policy.stages.auth import AuthStage
from setpoint.policy.stages.parse import ParseStage
from setpoint.policy.stages.route import RouteStage
from setpoint.policy.upstream import build_upstream_terminal
from setpoint.types import Next
from setpoint.wire.request import parse_chat, parse_embeddings

__all__ = ["build_pipelines"]


def build_pipelines(auth: AuthStage, routes: Mapping[str, ModelRoute], clock: Clock) -> dict[str, Next]:
    return {
        "chat": compose(
            [auth, ParseStage(parse_chat, allow_stream=True), RouteStage(routes, "chat")],
            build_upstream_terminal("/chat/completions", clock),
        ),
        "embeddings": compose(
            [auth, ParseStage(parse_embeddings, allow_stream=False), RouteStage(routes, "embedding")],
            build_upstream_terminal("/embeddings", clock),
        ),
    }
