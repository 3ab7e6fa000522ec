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
    reasoning_pico: int = -1  # -1: same as output

    @classmethod
    def per_mtok(
        cls, input_usd: float, output_usd: float, cached_input_usd: float | None = None,
        reasoning_usd: float | None = None,
    ) -> Pricing:
        """From USD per one million tokens (1 USD/Mtok == 1 micro-dollar/token == 1e6 pico/token)."""
        cached = input_usd if cached_input_usd is None else cached_input_usd
        reasoning = output_usd if reasoning_usd is None else reasoning_usd
        return cls(round(input_usd * 1e6), round(cached * 1e6), round(output_usd * 1e6), round(reasoning * 1e6))

    def cost_pico(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, reasoning_tokens: int = 0) -> int:
        """Reasoning tokens are part of completion tokens (OpenAI's convention), priced on their own."""
        cached = min(cached_tokens, prompt_tokens)
        reasoning = min(reasoning_tokens, completion_tokens)
        r_price = self.output_pico if self.reasoning_pico < 0 else self.reasoning_pico
        return (
            (prompt_tokens - cached) * self.input_pico
            + cached * self.cached_input_pico
            + (completion_tokens - reasoning) * self.output_pico
            + reasoning * r_price
        )

    def cost_micros(self, usage: Usage) -> int:
        pico = self.cost_pico(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, usage.reasoning_tokens)
        return (pico + _PICO_PER_MICRO // 2) // _PICO_PER_MICRO

    def ceil_micros(self, prompt_tokens: int, completion_tokens: int) -> int:
        """An upper bound in micro-dollars (for reservations: never rounds down)."""
        return -(-self.cost_pico(prompt_tokens, completion_tokens) // _PICO_PER_MICRO)
