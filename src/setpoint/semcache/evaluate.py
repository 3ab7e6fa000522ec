"""Hit precision and recall of the semantic cache on labelled prompt pairs, per threshold, with and without the guard.

    python -m setpoint.semcache.evaluate [--pairs tests/semcache/data/pairs.jsonl] [--show-errors]

Each line of the pairs file is `{"a": ..., "b": ..., "same": true|false, "kind": ...}`: `same` means
b's answer may be served for a. A pair is **served** when cosine(a, b) >= threshold and (with the guard)
`guard(a, b)` is None. Precision = served pairs that are truly the same / served pairs (1.0 when
nothing is served); recall = served true pairs / true pairs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from setpoint.semcache.guard import guard as default_guard

__all__ = ["THRESHOLDS", "Pair", "Result", "evaluate", "format_table", "load_pairs", "main", "score_pairs"]

THRESHOLDS = (0.85, 0.90, 0.92, 0.95, 0.97)
DEFAULT_PAIRS = Path("tests/semcache/data/pairs.jsonl")


@dataclass(frozen=True, slots=True)
class Pair:
    a: str
    b: str
    same: bool
    kind: str


@dataclass(frozen=True, slots=True)
class Result:
    threshold: float
    guarded: bool
    served: int
    true_hits: int
    positives: int
    false_hits: tuple[tuple[Pair, float], ...]

    @property
    def precision(self) -> float:
        return self.true_hits / self.served if self.served else 1.0

    @property
    def recall(self) -> float:
        return self.true_hits / self.positives if self.positives else 0.0


def load_pairs(path: str | Path) -> list[Pair]:
    pairs = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        raw = json.loads(line)
        if not isinstance(raw.get("same"), bool) or not raw.get("a") or not raw.get("b"):
            raise ValueError(f"{path}:{n}: need non-empty 'a', 'b' and a boolean 'same'")
        pairs.append(Pair(raw["a"], raw["b"], raw["same"], str(raw.get("kind", ""))))
    return pairs


def score_pairs(pairs: Sequence[Pair], embed: Callable[[Sequence[str]], Any]) -> list[float]:
    """Cosine of each pair, embedding every distinct text once (`embed` = `Embedder.embed`)."""
    texts = sorted({t for p in pairs for t in (p.a, p.b)})
    vecs = embed(texts)
    row = {t: i for i, t in enumerate(texts)}
    return [float(vecs[row[p.a]] @ vecs[row[p.b]]) for p in pairs]


def evaluate(pairs: Sequence[Pair], scores: Sequence[float], *, thresholds: Sequence[float] = THRESHOLDS,
             guard: Callable[[str, str], str | None] = default_guard) -> list[Result]:
    """One `Result` per (threshold, guard off/on), in that order."""
    verdicts = [guard(p.a, p.b) is None for p in pairs]
    positives = sum(p.same for p in pairs)
    results = []
    for t in thresholds:
        for guarded in (False, True):
            served = [(p, s) for p, s, ok in zip(pairs, scores, verdicts, strict=True)
                      if s >= t and (ok or not guarded)]
            false = tuple((p, s) for p, s in served if not p.same)
            results.append(Result(t, guarded, len(served), len(served) - len(false), positives, false))
    return results


def format_table(results: Sequence[Result]) -> str:
    lines = ["| threshold | guard | served | wrong answers served | precision | recall |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.threshold:.2f} | {'on' if r.guarded else 'off'} | {r.served} | {len(r.false_hits)} "
                     f"| {r.precision:.3f} | {r.recall:.3f} ({r.true_hits}/{r.positives}) |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m setpoint.semcache.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=Path, default=DEFAULT_PAIRS, help="labelled pairs (JSONL)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS))
    parser.add_argument("--show-errors", action="store_true", help="list wrong hits and missed paraphrases")
    args = parser.parse_args(argv)
    if not args.pairs.is_file():
        parser.error(f"{args.pairs} not found (run from the repository root or pass --pairs)")
    from setpoint.semcache.embedder import Embedder

    pairs = load_pairs(args.pairs)
    scores = score_pairs(pairs, Embedder().embed)
    results = evaluate(pairs, scores, thresholds=args.thresholds)
    kinds: dict[str, int] = {}
    for p in pairs:
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
    print(f"{len(pairs)} pairs ({sum(p.same for p in pairs)} same): "
          + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    print(format_table(results))
    if args.show_errors:
        for r in results:
            for p, s in r.false_hits:
                print(f"wrong hit  t={r.threshold:.2f} guard={'on' if r.guarded else 'off'} cos={s:.3f} "
                      f"[{p.kind}] {p.a!r} ~ {p.b!r}")
        for p, s in zip(pairs, scores, strict=True):
            if p.same:
                print(f"paraphrase cos={s:.3f} guard={default_guard(p.a, p.b) or 'ok'}: {p.a!r} ~ {p.b!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
