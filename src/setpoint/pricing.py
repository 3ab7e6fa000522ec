"""Prices and cost arithmetic in integers: prices are pico-dollars per token, costs micro-dollars."""

from __future__ import annotations

from dataclasses import dataclass

from setpoint.types import Usage

__all__ = ["Pricing"]

_PICO_PER_MICRO = 1_000_000


@dataclass(slots=True, frozen=True)
class Pricing:
    input_pico: int
    cached_input_pico: int
    output_pico: int

    @classmethod
    def per_mtok(cls, input_usd: float, output_usd: float, cached_input_usd: float | None = None) -> Pricing:
        """From USD per one million tokens (1 USD/Mtok == 1 micro-dollar/token == 1e6 pico/token)."""
        cached = input_usd if cached_input_usd is None else cached_input_usd
        return cls(round(input_usd * 1e6), round(cached * 1e6), round(output_usd * 1e6))

    def cost_micros(self, usage: Usage) -> int:
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        pico = (
            (usage.prompt_tokens - cached) * self.input_pico
            + cached * self.cached_input_pico
            + usage.completion_tokens * self.output_pico
        )
        return (pico + _PICO_PER_MICRO // 2) // _PICO_PER_MICRO
