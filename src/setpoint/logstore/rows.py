"""A spooled record -> a checked row of the `requests` table (a tuple in `RECORD_COLUMNS` order).

Both stores check records here, before any SQL, so that SQLite (which stores anything in any
column) and PostgreSQL (which refuses wrong types) accept and refuse exactly the same records, and
so that the rollups only ever see well-typed rows. A refused record raises `ValueError`; the store
keeps it whole in `rejected_records`. (This runs for every request: it is written for speed.)
"""

from __future__ import annotations

from typing import Any

from setpoint.logstore.sql_schema import ADDED_COLUMNS, RECORD_COLUMNS, REQUESTS

__all__ = ["Record", "to_row"]

Record = dict[str, Any] | list[Any]

_WIDTH = len(RECORD_COLUMNS)
_FIRST_RELEASE_WIDTH = _WIDTH - len(ADDED_COLUMNS)
_COLS = REQUESTS.columns
_REQUIRED = tuple(i for i, c in enumerate(_COLS) if c.not_null and c.default is None)
_DEFAULTS = tuple((i, c.default) for i, c in enumerate(_COLS) if c.default is not None)
_TEXT = tuple(i for i, c in enumerate(_COLS) if c.kind == "text")
_INT = tuple(i for i, c in enumerate(_COLS) if c.kind == "int")
_REAL = tuple(i for i, c in enumerate(_COLS) if c.kind == "real")
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 63) - 1


def _refuse(i: int, what: str, v: Any) -> ValueError:
    return ValueError(f"requests.{RECORD_COLUMNS[i]} must be {what}, not {v!r}"[:200])


def to_row(r: Record) -> tuple[Any, ...]:
    """Check and normalise one record (a dict, or a positional list from the spool)."""
    if type(r) is list:
        n = len(r)
        if not _FIRST_RELEASE_WIDTH <= n <= _WIDTH:
            raise ValueError(f"a positional record has {n} fields, expected {_WIDTH}")
        v = r + [None] * (_WIDTH - n)  # a copy; shorter: spooled by an older version
    elif type(r) is dict:
        get = r.get
        v = [get(c) for c in RECORD_COLUMNS]
    else:
        raise ValueError("a record must be a JSON object or array")
    for i in _REQUIRED:
        if v[i] is None:
            raise ValueError(f"NOT NULL constraint failed: requests.{RECORD_COLUMNS[i]}")
    for i, default in _DEFAULTS:
        if v[i] is None:
            v[i] = default
    for i in _TEXT:
        x = v[i]
        if x is not None:
            if type(x) is not str:
                raise _refuse(i, "a string", x)
            if "\x00" in x:
                v[i] = x.replace("\x00", "\ufffd")  # PostgreSQL refuses NUL in text
    for i in _INT:
        x = v[i]
        if x is not None:
            if type(x) is not int:
                if type(x) is bool or (type(x) is float and x.is_integer()):
                    x = v[i] = int(x)
                else:
                    raise _refuse(i, "an integer", x)
            if not _INT_MIN <= x <= _INT_MAX:
                raise _refuse(i, "a 64-bit integer", x)
    for i in _REAL:
        x = v[i]
        if x is not None:
            if type(x) is not float:
                if (type(x) is int or type(x) is bool) and -1e300 < x < 1e300:
                    x = v[i] = float(x)
                else:
                    raise _refuse(i, "a number", x)
            if x - x != 0:  # inf or nan
                raise _refuse(i, "a finite number", x)
    return tuple(v)
