"""Second config phase: `RootConfig` -> `Runtime` (references resolved, providers built, keys hashed).

The only module of the config package that may import provider and pipeline factories.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from setpoint.accounting.estimator import OutputEstimator
from setpoint.accounting.price_table import PriceTable
from setpoint.clock import Clock, RealClock
from setpoint.config.schema import RootConfig
from setpoint.errors import ConfigError
from setpoint.keys.model import KeyInfo, hash_key
from setpoint.models import Deployment, ModelRoute
from setpoint.providers.registry import build_provider
from setpoint.state.base import StateStore
from setpoint.state.factory import state_from_url
from setpoint.types import Provider

__all__ = ["Runtime", "compile_config"]


@dataclass(slots=True)
class Runtime:
    config: RootConfig
    clock: Clock
    data_dir: Path
    providers: dict[str, Provider]
    routes: dict[str, ModelRoute]
    state: StateStore
    estimator: OutputEstimator
    static_keys: dict[str, KeyInfo] = field(default_factory=dict)  # secret hash -> key

    @property
    def master_key(self) -> str | None:
        return self.config.admin.master_key


def compile_config(root: RootConfig, clock: Clock | None = None, base_dir: Path | None = None) -> Runtime:
    """Resolve references; raises `ConfigError` with every problem and its dotted path."""
    clk = clock or RealClock()
    problems: list[str] = []
    providers = {name: build_provider(name, cfg, clk) for name, cfg in root.providers.items()}
    routes: dict[str, ModelRoute] = {}
    prices = PriceTable(root.accounting.prices)
    for alias, mcfg in root.models.items():
        deps: list[Deployment] = []
        for i, d in enumerate(mcfg.deployments):
            provider = providers.get(d.provider)
            if provider is None:
                known = ", ".join(sorted(providers)) or "none defined"
                problems.append(f"models.{alias}.deployments[{i}].provider: unknown provider '{d.provider}' (known: {known})")
                continue
            pcfg = root.providers[d.provider]
            pricing = prices.lookup(d.model, d.pricing)
            deps.append(
                Deployment(
                    name=f"{d.provider}/{d.model}", provider=provider, upstream_model=d.model, pricing=pricing,
                    extra_body=dict(d.extra_body),
                    supports_stream_usage=getattr(pcfg, "supports_stream_usage", True),
                    weight=d.weight, context_window=d.context_window,
                    ttft_timeout_s=pcfg.timeouts.ttft_s, idle_timeout_s=pcfg.timeouts.idle_s,
                )
            )
        if deps:
            routes[alias] = ModelRoute(
                alias=alias, kind=mcfg.kind, deployments=tuple(deps), strategy=mcfg.strategy,
                degrade_to=mcfg.degrade_to, degrade_priorities=frozenset(mcfg.degrade_priorities),
            )
        if mcfg.degrade_to is not None and mcfg.degrade_to not in root.models:
            problems.append(f"models.{alias}.degrade_to: unknown model '{mcfg.degrade_to}'")
    static: dict[str, KeyInfo] = {}
    names: set[str] = set()
    for i, k in enumerate(root.keys):
        if k.name in names:
            problems.append(f"keys[{i}].name: duplicate key name '{k.name}'")
        names.add(k.name)
        for j, m in enumerate(k.models):
            if m != "*" and m not in root.models:
                problems.append(f"keys[{i}].models[{j}]: unknown model '{m}'")
        digest = hash_key(k.key)
        if digest in static:
            problems.append(f"keys[{i}].key: the same secret is used by key '{static[digest].name}'")
        static[digest] = KeyInfo(
            id=f"cfg:{k.name}", name=k.name, team=k.team, user=k.user,
            models=None if "*" in k.models else frozenset(k.models), metadata=dict(k.metadata), hint=k.key[:6] + "…",
            priority=k.priority,
        )
    for i, b in enumerate(root.budgets):
        if b.degrade_to is not None and b.degrade_to not in root.models:
            problems.append(f"budgets[{i}].degrade_to: unknown model '{b.degrade_to}'")
    for i, r in enumerate(root.rate_limits):
        if not (r.rpm or r.tpm or r.input_tpm or r.output_tpm):
            problems.append(f"rate_limits[{i}]: set at least one of rpm, tpm, input_tpm, output_tpm")
        if r.scope == "model" and r.name is not None and r.name not in root.models:
            problems.append(f"rate_limits[{i}].name: unknown model '{r.name}'")
    if problems:
        raise ConfigError("invalid config", problems=problems)
    data_dir = Path(root.data_dir)
    if not data_dir.is_absolute() and base_dir is not None:
        data_dir = base_dir / data_dir
    est = root.accounting.estimate
    return Runtime(
        config=root, clock=clk, data_dir=data_dir, providers=providers, routes=routes,
        state=state_from_url(root.state.url, data_dir, root.state.timeout_s),
        estimator=OutputEstimator(est.default_output_tokens, est.quantile, est.window),
        static_keys=static,
    )
