"""Display formatting (templates only): money is integer micro-dollars everywhere else."""

from __future__ import annotations

import time
from typing import Any

__all__ = ["FILTERS", "count", "duration", "ms", "pct", "usd", "utc"]


def usd(micros: int | float | None) -> str:
    """Micro-dollars -> "$1,234.56"; amounts under a cent keep their significant digits ("$0.0042")."""
    if micros is None:
        return "—"
    sign = "-" if micros < 0 else ""
    m = abs(int(round(micros)))
    if m == 0:
        return "$0.00"
    if m >= 10_000:
        return f"{sign}${m / 1_000_000:,.2f}"
    return f"{sign}${m / 1_000_000:.6f}".rstrip("0")


def ms(value: float | None) -> str:
    if value is None:
        return "—"
    if value >= 10_000:
        return f"{value / 1000:.1f} s"
    if value >= 1000:
        return f"{value / 1000:.2f} s"
    if value >= 10:
        return f"{value:.0f} ms"
    return f"{value:.1f} ms"


def pct(part: float, whole: float) -> str:
    if not whole:
        return "—"
    r = 100.0 * part / whole
    return f"{r:.2f}%" if r < 10 else f"{r:.1f}%"


def count(n: int | float | None) -> str:
    if n is None:
        return "—"
    return f"{int(n):,}"


def utc(ts: float | None) -> str:
    if ts is None:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + "Z"


def duration(seconds: float | None) -> str:
    """A rough human duration: "45 s", "12 min", "3.5 h", "4.2 d"."""
    if seconds is None:
        return "—"
    s = max(0.0, seconds)
    if s < 90:
        return f"{s:.0f} s"
    if s < 90 * 60:
        return f"{s / 60:.0f} min"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


FILTERS: dict[str, Any] = {"usd": usd, "ms": ms, "count": count, "utc": utc, "duration": duration}
