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
    weight: float = 1.0
    context_window: int | None = None
    ttft_timeout_s: float | None = None
    idle_timeout_s: float | None = None


@dataclass(slots=True, frozen=True)
class ModelRoute:
    alias: str
    kind: str  # "chat" | "embedding"
    deployments: tuple[Deployment, ...]
    strategy: str = "fallback"
    degrade_to: str | None = None
    degrade_priorities: frozenset[str] = frozenset({"default", "sheddable"})
