"""The request log's tables, written once and rendered for SQLite or PostgreSQL by a `Dialect`.

Column kinds are portable ("text", "real", "int"); the dialect maps them to SQL types. Rollup
dimensions are NOT NULL with '' for "unknown", so that they can be part of a primary key and an
upsert finds them (NULL never equals NULL).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DIMS", "LATENCY_DIMS", "MEASURES", "META", "RECORD_COLUMNS", "REJECTED", "REQUESTS", "ROLLUP", "ROLLUP_LATENCY",
    "SCHEMA_VERSION", "SPOOL_PROGRESS", "TABLES", "Column", "Index", "Table",
]

SCHEMA_VERSION = 2  # 1: requests + spool progress; 2: rollups, (x, ts, id) indexes, meta


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    kind: str  # "text" | "real" | "int"
    not_null: bool = False
    default: int | None = None


@dataclass(frozen=True, slots=True)
class Index:
    name: str
    columns: tuple[str, ...]
    where: str | None = None  # a partial index; the query must repeat this exact term to use it


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]
    indexes: tuple[Index, ...] = ()
    clustered: bool = False  # rows stored in primary-key order (SQLite: WITHOUT ROWID)

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)


def _cols(kind: str, *names: str, not_null: bool = False, default: int | None = None) -> tuple[Column, ...]:
    return tuple(Column(n, kind, not_null, default) for n in names)


REQUESTS = Table(
    "requests",
    (
        Column("id", "text", not_null=True),
        Column("ts", "real", not_null=True),
        Column("endpoint", "text", not_null=True),
        *_cols("text", "key_id", "key_name", "team", "user_id", "model", "deployment", "provider"),
        Column("is_stream", "int", not_null=True, default=0),
        Column("status", "int", not_null=True),
        Column("error_code", "text"),
        *_cols("int", "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens", not_null=True, default=0),
        Column("cost_micros", "int"),
        *_cols("real", "latency_ms", "ttft_ms", "upstream_ms"),
        *_cols("text", "finish_reason", "annotations", "content", "cache_status"),
        Column("saved_micros", "int"),
    ),
    primary_key=("id",),
    # Every search filter has an index that also yields rows in (ts, id) order for keyset pages.
    indexes=(
        Index("requests_ts_id", ("ts", "id")),
        Index("requests_team_ts_id", ("team", "ts", "id")),
        Index("requests_key_ts_id", ("key_id", "ts", "id")),
        Index("requests_model_ts_id", ("model", "ts", "id")),
        Index("requests_user_ts_id", ("user_id", "ts", "id"), where="user_id IS NOT NULL"),
        Index("requests_code_ts_id", ("error_code", "ts", "id"), where="error_code IS NOT NULL"),
        Index("requests_errors_ts_id", ("ts", "id"), where="status >= 400"),
        Index("requests_hits_ts_id", ("ts", "id"), where="cache_status = 'hit'"),
    ),
)
RECORD_COLUMNS = REQUESTS.column_names
# Columns added after the first release (an older log gets them with ALTER TABLE).
ADDED_COLUMNS = ("cache_status", "saved_micros")
# Indexes of schema version 1, replaced by the (x, ts, id) ones above.
OLD_INDEXES = ("requests_ts", "requests_team_ts", "requests_key_ts", "requests_model_ts")

# Additive measures of the rollups (a row's contribution; upserts add them up).
MEASURES = (
    "requests", "errors", "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens",
    "cost_micros", "unpriced", "cache_hits", "saved_micros",
)
# Rollup dimensions: one rollup row per (grain, dim, bucket, value, model), and a query reads the
# rows of its dimension only. "all", "team", "key", "error" (error rows, by code) and "user" sum
# every model (model ''); "all/model", "team/model" and "key/model" are split by model, for
# questions about one model (and the model chart); "deployment" carries its model too.
DIMS = ("all", "all/model", "team", "team/model", "key", "key/model", "deployment", "error", "user")

ROLLUP = Table(
    "rollup",
    (Column("grain", "int", not_null=True), Column("dim", "text", not_null=True), Column("bucket", "int", not_null=True),
     *_cols("text", "value", "model", not_null=True), Column("key_name", "text"),
     *_cols("int", *MEASURES, not_null=True)),
    primary_key=("grain", "dim", "bucket", "value", "model"),
    clustered=True,
)
# Latency histograms: dim "all" (value '') or "model" (value: the model), so that the dashboard's
# charts over all traffic read one set of bins per bucket, not one per model.
LATENCY_DIMS = ("all", "model")
ROLLUP_LATENCY = Table(
    "rollup_latency",
    (Column("grain", "int", not_null=True), Column("dim", "text", not_null=True), Column("bucket", "int", not_null=True),
     Column("value", "text", not_null=True), *_cols("int", "metric", "bin", "n", not_null=True)),
    # bucket before value, as in `rollup`: retention deletes bucket ranges, and charts over all
    # traffic ("all", value '') read one range per grain
    primary_key=("grain", "dim", "bucket", "value", "metric", "bin"),
    clustered=True,
)
SPOOL_PROGRESS = Table(
    "spool_progress", (Column("segment", "text", not_null=True), Column("byte_offset", "int", not_null=True)),
    primary_key=("segment",),
)
REJECTED = Table(
    "rejected_records",
    (*_cols("text", "segment", "record", "error", not_null=True), Column("rejected_at", "real", not_null=True)),
    primary_key=(),
)
META = Table("log_meta", (Column("name", "text", not_null=True), Column("value", "int")), primary_key=("name",))

TABLES = (REQUESTS, ROLLUP, ROLLUP_LATENCY, SPOOL_PROGRESS, REJECTED, META)
