"""Which rollup buckets answer a time window: whole coarse buckets in the middle, finer at the edges.

A window [since, until) is widened outwards to whole buckets of the finest grain kept at each end:
1 minute within the last 2 days, 15 minutes within 8 days, 1 hour before that (see `rollups.LEVELS`).
With a chart step, only grains that divide the step are used, so that every rollup bucket falls
inside one chart point (where only a coarser grain is still kept, its buckets go to the point they
start in). The result is at most a handful of (grain, first bucket, end) ranges: one indexed range
scan each, whatever the window's length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from setpoint.logstore.rollups import GRAINS, LEVELS

__all__ = ["Plan", "Segment", "align_step", "finest_grain_at", "plan"]

_MARGIN_S = 3600  # clock skew between the writer that pruned a level and this reader


@dataclass(frozen=True, slots=True)
class Segment:
    grain: int
    lo: int  # first bucket start (inclusive)
    hi: int  # end (exclusive)


@dataclass(frozen=True, slots=True)
class Plan:
    segments: tuple[Segment, ...]
    start: float  # the widened window: rollups answer exactly for rows with start <= ts < end
    end: float

    def where(self, dim: str | None = None, value: str | None = None) -> tuple[str, list[Any]]:
        """SQL condition on (grain, [dim,] bucket) ranges of the rollup tables' primary keys (and
        `value`, checked within each range) and its parameters; matches nothing for an empty plan."""
        if not self.segments:
            return "1 = 0", []
        head, head_params = "grain = ?", []
        if dim is not None:
            head += " AND dim = ?"
            head_params.append(dim)
        if value is not None:
            head += " AND value = ?"
            head_params.append(value)
        parts: list[str] = []
        params: list[Any] = []
        for s in self.segments:
            parts.append(f"({head} AND bucket >= ? AND bucket < ?)")
            params += [s.grain, *head_params, s.lo, s.hi]
        return "(" + " OR ".join(parts) + ")", params


def _floor(t: float, g: int) -> int:
    return math.floor(t / g) * g


def _ceil(t: float, g: int) -> int:
    return math.ceil(t / g) * g


def align_step(step: int) -> int:
    """A chart step the rollups can serve: a multiple of the finest grain (rounded up)."""
    return max(GRAINS[0], _ceil(step, GRAINS[0]))


def _regions(now: float) -> list[tuple[float, float, int]]:
    """(from, to, finest grain kept) over all time, newest first."""
    out: list[tuple[float, float, int]] = []
    upper = math.inf
    for lv in LEVELS:
        if lv.keep_s is None:
            out.append((-math.inf, upper, lv.grain))
            break
        frm = _ceil(now - lv.keep_s + _MARGIN_S, 3600)  # aligned to every grain below a day
        if frm < upper:
            out.append((frm, upper, lv.grain))
            upper = frm
    return out


def finest_grain_at(t: float, now: float) -> int:
    for frm, to, g in _regions(now):
        if frm <= t < to:
            return g
    return GRAINS[-1]


def plan(since: float, until: float, now: float, step: int | None = None) -> Plan:
    if until <= since:
        return Plan((), since, since)
    first, last = finest_grain_at(since, now), finest_grain_at(until, now)
    start, end = _floor(since, first), _ceil(until, last)
    if step is None or step % first == 0:
        # Every grain from the finest kept at the end is usable wherever the cover puts it (the
        # finer ones only near `until`, where they are kept): one cover for the whole window.
        chain = tuple(g for g in GRAINS if g >= last and (step is None or step % g == 0))
        return Plan(tuple(_cover(start, end, chain)), float(start), float(end))
    # The step needs grains that older parts of the window no longer have: cover each part with
    # what it has, its coarsest-kept grain first.
    allowed = tuple(g for g in GRAINS if step % g == 0)
    segments: list[Segment] = []
    for frm, to, base in _regions(now):
        lo, hi = max(start, frm), min(end, to)
        if lo < hi:
            segments += _cover(int(lo), int(hi), (base, *(g for g in allowed if g > base)))
    segments.sort(key=lambda s: s.lo)
    merged = [segments[0]]
    for seg in segments[1:]:
        prev = merged[-1]
        if seg.grain == prev.grain and seg.lo == prev.hi:  # across a region boundary
            merged[-1] = Segment(seg.grain, prev.lo, seg.hi)
        else:
            merged.append(seg)
    return Plan(tuple(merged), float(start), float(end))


def _cover(lo: int, hi: int, chain: tuple[int, ...]) -> list[Segment]:
    """[lo, hi) (multiples of chain[0]) as few buckets as possible: each grain divides the next."""
    if lo >= hi:
        return []
    g = chain[0]
    if len(chain) == 1:
        return [Segment(g, lo, hi)]
    big = chain[1]
    a, b = _ceil(lo, big), _floor(hi, big)
    if a >= b:
        return [Segment(g, lo, hi)]
    out = [Segment(g, lo, a)] if lo < a else []
    out += _cover(a, b, chain[1:])
    if b < hi:
        out.append(Segment(g, b, hi))
    return out
