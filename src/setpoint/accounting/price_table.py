"""Which price applies to a deployment: its own `pricing`, else `accounting.prices`, else the shipped table."""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources

import yaml

from setpoint.config.schema import PricingConfig
from setpoint.pricing import Pricing

__all__ = ["PriceTable", "shipped_prices"]


def shipped_prices() -> dict[str, PricingConfig]:
    text = resources.files("setpoint.accounting").joinpath("prices.yaml").read_text(encoding="utf-8")
    return {name: PricingConfig.model_validate(v) for name, v in (yaml.safe_load(text) or {}).items()}


def to_pricing(p: PricingConfig) -> Pricing:
    return Pricing.per_mtok(p.input_per_mtok, p.output_per_mtok, p.cached_input_per_mtok, p.reasoning_per_mtok)


class PriceTable:
    def __init__(self, overrides: Mapping[str, PricingConfig]) -> None:
        self._prices = {**shipped_prices(), **overrides}

    def lookup(self, upstream_model: str, own: PricingConfig | None) -> Pricing | None:
        if own is not None:
            return to_pricing(own)
        p = self._prices.get(upstream_model)
        return to_pricing(p) if p is not None else None
