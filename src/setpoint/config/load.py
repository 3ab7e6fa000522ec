"""Read a config file: YAML -> `${ENV}` interpolation -> strict schema, every error with its path."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from setpoint.config.schema import RootConfig
from setpoint.errors import ConfigError

__all__ = ["format_path", "load_config", "parse_config"]

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_PROVIDER_TAGS = {"openai_compatible", "anthropic", "simulated"}


def format_path(loc: tuple[int | str, ...]) -> str:
    """('models', 'gpt-4o', 'deployments', 1, 'provider') -> 'models.gpt-4o.deployments[1].provider'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _strip_union_tag(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    # pydantic puts the discriminator value into the path of a tagged union member:
    # ('providers', 'openai', 'openai_compatible', 'base_url') -> drop the tag.
    if len(loc) >= 3 and loc[0] == "providers" and loc[2] in _PROVIDER_TAGS:
        return loc[:2] + loc[3:]
    return loc


def _interpolate(node: Any, path: tuple[int | str, ...], env: Mapping[str, str], problems: list[str]) -> Any:
    if isinstance(node, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            value = env.get(name)
            if value is not None and (value or default is None):
                return value
            if default is not None:
                return default  # shell semantics: ${X:-d} also replaces a set-but-empty X
            problems.append(f"{format_path(path) or '<root>'}: environment variable {name} is not set")
            return ""

        return _ENV.sub(sub, node)
    if isinstance(node, dict):
        return {k: _interpolate(v, (*path, str(k)), env, problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, (*path, i), env, problems) for i, v in enumerate(node)]
    return node


def parse_config(data: Any, env: Mapping[str, str] | None = None) -> RootConfig:
    """Validate an already-parsed document. Raises `ConfigError` listing every problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("the config file must be a mapping at the top level")
    problems: list[str] = []
    data = _interpolate(data, (), os.environ if env is None else env, problems)
    try:
        root = RootConfig.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            path = format_path(_strip_union_tag(tuple(err["loc"])))
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif err["type"] == "union_tag_invalid":
                msg = f"unknown provider type {err['input'].get('type')!r}" if isinstance(err["input"], dict) else msg
            line = f"{path or '<root>'}: {msg}"
            if not any(p.startswith(f"{path}: environment variable") for p in problems):
                problems.append(line)  # (a missing ${ENV} already explains this path)
        raise ConfigError("invalid config", problems=problems) from None
    if problems:
        raise ConfigError("invalid config", problems=problems)
    return root


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> RootConfig:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror}", path=str(p)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", path=str(p)) from None
    return parse_config(data, env)
