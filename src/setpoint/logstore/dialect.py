"""What differs between SQLite and PostgreSQL in the request log's SQL, and nothing else.

Queries are written once with `?` placeholders; `Dialect.sql()` rewrites them for psycopg (`%s`,
and a literal `%` doubled). DDL comes from `sql_schema` tables. Text columns use the "C" collation
on PostgreSQL so that ordering and prefix ranges are bytewise, as in SQLite.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from setpoint.logstore.sql_schema import Index, Table

__all__ = ["POSTGRES", "SQLITE", "Dialect"]


@dataclass(frozen=True, slots=True)
class Dialect:
    name: str
    types: dict[str, str]
    paramstyle_pyformat: bool  # psycopg's %s (else sqlite3's ?)
    max_params: int  # bound parameters per statement
    clustered_suffix: str  # appended to CREATE TABLE for tables stored in key order
    # Delete at most {limit} rows matching {where}, found through an index, without reading them.
    # {loc}/{sel}: how a row is addressed (rowid, or the primary key of a clustered table).
    delete_batch_template: str
    table_exists: str  # a query with one parameter (the table name) that returns a row if it exists

    def sql(self, text: str) -> str:
        return _to_pyformat(text) if self.paramstyle_pyformat else text

    def create_table(self, t: Table) -> str:
        cols = []
        for c in t.columns:
            col = f"{c.name} {self.types[c.kind]}"
            if c.not_null:
                col += " NOT NULL"
            if c.default is not None:
                col += f" DEFAULT {c.default}"
            cols.append(col)
        if t.primary_key:
            cols.append(f"PRIMARY KEY ({', '.join(t.primary_key)})")
        suffix = self.clustered_suffix if t.clustered else ""
        return f"CREATE TABLE IF NOT EXISTS {t.name} ({', '.join(cols)}){suffix}"

    def create_index(self, t: Table, ix: Index) -> str:
        where = f" WHERE {ix.where}" if ix.where else ""
        return f"CREATE INDEX IF NOT EXISTS {ix.name} ON {t.name} ({', '.join(ix.columns)}){where}"

    def delete_batch(self, t: Table, where: str, limit: int) -> str:
        """A statement (with `?`) deleting at most `limit` rows of `t` matching `where`."""
        sel = ", ".join(t.primary_key) if t.clustered else "rowid"
        loc = f"({sel})" if t.clustered else sel
        return self.delete_batch_template.format(t=t.name, loc=loc, sel=sel, where=where, limit=limit)


@lru_cache(maxsize=512)
def _to_pyformat(text: str) -> str:
    return text.replace("%", "%%").replace("?", "%s")


SQLITE = Dialect(
    name="sqlite",
    types={"text": "TEXT", "real": "REAL", "int": "INTEGER"},
    paramstyle_pyformat=False,
    max_params=32_766,
    clustered_suffix=" WITHOUT ROWID",
    delete_batch_template="DELETE FROM {t} WHERE {loc} IN (SELECT {sel} FROM {t} WHERE {where} LIMIT {limit})",
    table_exists="SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
)

POSTGRES = Dialect(
    name="postgres",
    types={"text": 'TEXT COLLATE "C"', "real": "DOUBLE PRECISION", "int": "BIGINT"},
    paramstyle_pyformat=True,
    max_params=65_535,
    clustered_suffix="",
    # a TID scan: no join, no sort (`ctid IN (SELECT ...)` would plan a scan of the whole table)
    delete_batch_template="DELETE FROM {t} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {t} WHERE {where} LIMIT {limit}))",
    table_exists="SELECT 1 FROM pg_catalog.pg_tables WHERE tablename = ? AND schemaname = ANY(current_schemas(false))",
)
