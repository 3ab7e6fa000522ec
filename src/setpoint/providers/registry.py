"""Provider type -> builder. Adding a provider is one module and one entry here; no name checks elsewhere."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from setpoint.clock import Clock
from setpoint.config.schema import AnthropicProviderConfig, OpenAICompatibleProviderConfig, SimulatedProviderConfig
from setpoint.providers.anthropic import AnthropicProvider
from setpoint.providers.openai_compatible import OpenAICompatibleProvider
from setpoint.providers.simulated.provider import SimulatedProvider
from setpoint.types import Provider

__all__ = ["PROVIDER_BUILDERS", "build_provider"]

PROVIDER_BUILDERS: dict[type, Callable[[str, Any, Clock], Provider]] = {
    OpenAICompatibleProviderConfig: lambda name, cfg, clock: OpenAICompatibleProvider(name, cfg),
    AnthropicProviderConfig: lambda name, cfg, clock: AnthropicProvider(name, cfg, clock),
    SimulatedProviderConfig: lambda name, cfg, clock: SimulatedProvider(name, cfg, clock),
}


def build_provider(name: str, cfg: Any, clock: Clock) -> Provider:
    return PROVIDER_BUILDERS[type(cfg)](name, cfg, clock)
