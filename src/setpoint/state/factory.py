"""Build a state store from its URL: memory://, sqlite:///path.db, redis://host:port/db."""

from __future__ import annotations

from pathlib import Path

from setpoint.errors import ConfigError
from setpoint.state.base import StateStore

__all__ = ["state_from_url"]


def state_from_url(url: str, data_dir: Path, timeout_s: float) -> StateStore:
    if url.startswith("memory://"):
        from setpoint.state.memory import MemoryStateStore

        return MemoryStateStore()
    if url.startswith("sqlite://"):
        from setpoint.state.sqlite import SqliteStateStore

        raw = url[len("sqlite://"):]
        path = Path(raw[1:] if raw.startswith("/") and not raw.startswith("//") else raw)
        if raw.startswith("//"):
            path = Path(raw[1:])  # sqlite:////abs/path.db
        return SqliteStateStore(path if path.is_absolute() else data_dir / path)
    if url.startswith(("redis://", "rediss://", "unix://")):
        try:
            from setpoint.state.redis import RedisStateStore
        except ImportError as exc:  # pragma: no cover - redis is a dependency
            raise ConfigError("the redis package is not installed", path="state.url") from exc
        return RedisStateStore(url, timeout_s=timeout_s)
    raise ConfigError(f"unsupported state store URL {url!r}", path="state.url")
