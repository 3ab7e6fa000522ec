"""Compiled model routes: an alias and the deployments that can serve it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from setpoint.pricing import Pricing
from setpoint.types import Provider

__all__ = ["Deployment", "ModelRoute"]


@dataclass(slots=True, frozen=True)
class Deployment:
    name: str  # "provider/upstream-model"
    provider: Provider
    upstream_model: str
    pricing: Pricing | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)
    supports_stream_usage: bool = True


@dataclass(slots=True, frozen=True)
class ModelRoute:
    alias: str
    kind: str  # "chat" | "embedding"
    deployments: tuple[Deployment, ...]
