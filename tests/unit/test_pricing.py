"""Integer cost arithmetic: prices in pico-dollars per token, costs in micro-dollars."""

from __future__ import annotations

import random

import pytest

from setpoint.pricing import Pricing
from setpoint.types import Usage


def usage(prompt: int = 0, completion: int = 0, cached: int = 0) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached, is_reported=True)


def test_per_mtok_converts_to_integer_pico() -> None:
    p = Pricing.per_mtok(2.50, 10.0, 1.25)
    assert p == Pricing(input_pico=2_500_000, cached_input_pico=1_250_000, output_pico=10_000_000, reasoning_pico=10_000_000)
    assert all(type(v) is int for v in (p.input_pico, p.cached_input_pico, p.output_pico))


def test_per_mtok_absorbs_float_noise() -> None:
    p = Pricing.per_mtok(0.1 + 0.2, 0.15, None)  # 0.30000000000000004
    assert p.input_pico == 300_000
    assert p.cached_input_pico == 300_000  # no cached price -> the input price
    assert p.output_pico == 150_000


def test_one_million_tokens_cost_the_list_price() -> None:
    p = Pricing.per_mtok(0.15, 0.60)
    assert p.cost_micros(usage(prompt=1_000_000)) == 150_000  # $0.15
    assert p.cost_micros(usage(completion=1_000_000)) == 600_000  # $0.60
    assert p.cost_micros(usage(prompt=1_000_000, completion=1_000_000)) == 750_000


def test_cached_tokens_billed_at_cached_rate() -> None:
    p = Pricing.per_mtok(2.50, 10.0, cached_input_usd=1.25)
    u = usage(prompt=10_000, completion=2_000, cached=4_000)
    # (6000 * 2.5 + 4000 * 1.25 + 2000 * 10) USD/Mtok = 0.015 + 0.005 + 0.02 USD = 40_000 micros
    assert p.cost_micros(u) == 40_000
    assert p.cost_micros(usage(prompt=10_000, completion=2_000)) == 45_000


def test_cached_tokens_capped_at_prompt_tokens() -> None:
    p = Pricing.per_mtok(2.0, 0.0, cached_input_usd=0.0)
    assert p.cost_micros(usage(prompt=1_000, cached=5_000)) == 0
    assert Pricing.per_mtok(2.0, 0.0, cached_input_usd=1.0).cost_micros(usage(prompt=1_000, cached=5_000)) == 1_000


def test_free_cached_tokens() -> None:
    p = Pricing.per_mtok(3.0, 15.0, cached_input_usd=0.0)
    assert p.cost_micros(usage(prompt=1_000, cached=1_000)) == 0


@pytest.mark.parametrize(
    ("tokens", "micros"),
    [(1, 0), (3, 0), (4, 1), (10, 2), (13, 2), (17, 3), (6_666_666, 1_000_000)],
)
def test_rounding_half_up_to_the_micro_dollar(tokens: int, micros: int) -> None:
    # 0.15 USD/Mtok = 150_000 pico/token: 3 tokens = 0.45 micro -> 0; 4 tokens = 0.6 -> 1;
    # 10 tokens = 1.5 -> 2 (half rounds up); 13 = 1.95 -> 2; 17 = 2.55 -> 3.
    assert Pricing.per_mtok(0.15, 0.0).cost_micros(usage(prompt=tokens)) == micros


def test_exact_half_micro_rounds_up() -> None:
    p = Pricing(input_pico=500_000, cached_input_pico=500_000, output_pico=0)
    assert p.cost_micros(usage(prompt=1)) == 1
    assert p.cost_micros(usage(prompt=3)) == 2  # 1.5 -> 2


def test_rounding_happens_once_on_the_total() -> None:
    # Each component alone is 0.4 micro (rounds to 0) but together they are 1.2 micro.
    p = Pricing(input_pico=400_000, cached_input_pico=400_000, output_pico=400_000)
    assert p.cost_micros(usage(prompt=1)) == 0
    assert p.cost_micros(usage(prompt=2, completion=1)) == 1


def test_zero_usage_and_zero_price() -> None:
    assert Pricing.per_mtok(5.0, 5.0).cost_micros(Usage()) == 0
    assert Pricing.per_mtok(0.0, 0.0).cost_micros(usage(prompt=10**9, completion=10**9)) == 0


def test_result_is_always_an_exact_int() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        p = Pricing.per_mtok(rng.uniform(0, 100), rng.uniform(0, 100), rng.choice([None, rng.uniform(0, 50)]))
        u = usage(prompt=rng.randint(0, 10**7), completion=rng.randint(0, 10**6), cached=rng.randint(0, 10**7))
        cost = p.cost_micros(u)
        assert type(cost) is int
        cached = min(u.cached_tokens, u.prompt_tokens)
        pico = (u.prompt_tokens - cached) * p.input_pico + cached * p.cached_input_pico + u.completion_tokens * p.output_pico
        assert cost * 1_000_000 - 500_000 <= pico < cost * 1_000_000 + 500_000


def test_huge_volumes_do_not_lose_precision() -> None:
    p = Pricing.per_mtok(60.0, 120.0)
    u = usage(prompt=10**12, completion=10**12 + 1)  # far beyond float's exact-integer range in pico
    # $60M + $120M + one output token (120 micros), exactly
    assert p.cost_micros(u) == 60 * 10**12 + 120 * 10**12 + 120
    assert type(p.cost_micros(u)) is int


def test_pricing_is_frozen() -> None:
    p = Pricing.per_mtok(1.0, 1.0)
    with pytest.raises(AttributeError):
        p.input_pico = 0  # type: ignore[misc]


def test_reasoning_tokens_are_part_of_completion_and_priced_on_their_own() -> None:
    p = Pricing.per_mtok(1.0, 10.0, reasoning_usd=20.0)
    # 100 completion tokens of which 40 are reasoning: 60 x 10 + 40 x 20 = 1400 micro-dollars
    assert p.cost_micros(Usage(prompt_tokens=0, completion_tokens=100, reasoning_tokens=40)) == 1400
    assert Pricing.per_mtok(1.0, 10.0).cost_micros(Usage(completion_tokens=100, reasoning_tokens=40)) == 1000


def test_ceil_micros_never_rounds_down() -> None:
    p = Pricing.per_mtok(0.15, 0.60)
    assert p.ceil_micros(1, 0) == 1  # 0.15 micro-dollars -> 1
    assert p.ceil_micros(0, 0) == 0
    assert p.ceil_micros(10, 10) == 8  # 1.5 + 6.0 = 7.5 -> 8
