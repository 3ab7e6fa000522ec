"""`logging.store` -> how to open the writer (for the drainer) and a `LogReader`. The only place
that knows which backends exist; PostgreSQL's modules (and psycopg) are imported only when used."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from setpoint.config.schema import LoggingConfig
from setpoint.errors import ConfigError
from setpoint.logstore.reader import LogReader
from setpoint.logstore.sql_store import SqlLogStore

__all__ = ["Backend", "backend", "open_reader", "store_opener"]

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Backend:
    open_store: Callable[[LoggingConfig, Path, Clock], SqlLogStore]
    open_reader: Callable[[LoggingConfig, Path, Clock], LogReader]


def _sqlite() -> Backend:
    from setpoint.logstore.sqlite_reader import SqliteLogReader
    from setpoint.logstore.sqlite_store import SqliteLogStore

    return Backend(
        open_store=lambda cfg, data_dir, clock: SqliteLogStore(
            data_dir / "requests.db", retention_days=cfg.retention_days, clock=clock),
        open_reader=lambda cfg, data_dir, clock: SqliteLogReader(data_dir / "requests.db", clock=clock),
    )


def _postgres() -> Backend:
    try:
        from setpoint.logstore.postgres_reader import PostgresLogReader
        from setpoint.logstore.postgres_store import PostgresLogStore
    except ImportError as exc:
        raise ConfigError(f"postgres needs psycopg ({exc}); install it with: pip install 'setpoint[postgres]'",
                          path="logging.store") from None

    def url(cfg: LoggingConfig) -> str:
        assert cfg.postgres_url is not None  # the config schema requires it for this store
        return cfg.postgres_url

    return Backend(
        open_store=lambda cfg, data_dir, clock: PostgresLogStore(url(cfg), retention_days=cfg.retention_days, clock=clock),
        open_reader=lambda cfg, data_dir, clock: PostgresLogReader(url(cfg), clock=clock),
    )


_BACKENDS: dict[str, Callable[[], Backend]] = {"sqlite": _sqlite, "postgres": _postgres}


def backend(cfg: LoggingConfig) -> Backend:
    return _BACKENDS[cfg.store]()


def store_opener(cfg: LoggingConfig, data_dir: Path, clock: Clock = time.time) -> Callable[[], SqlLogStore]:
    """A function the drainer calls (again after each failure) to open the writer."""
    b = backend(cfg)
    return lambda: b.open_store(cfg, data_dir, clock)


def open_reader(cfg: LoggingConfig, data_dir: Path, clock: Clock = time.time) -> LogReader:
    return backend(cfg).open_reader(cfg, data_dir, clock)
