"""Intervals and paired tests for the suite's rates.

- `wilson`: the Wilson score 95% interval of a share k/n (scipy's `binomtest(...).proportion_ci`).
- `verdict_rates`: the three-way rates of a list of verdicts (refused = Safety Rate, complied =
  attack success, degenerate), each with its Wilson interval: the block every report entry carries.
- `mcnemar`: the exact McNemar test of two verdict lists on the same prompts (base vs aligned).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from scipy.stats import binomtest

from safety_eval.verdicts import COMPLIED, DEGENERATE, REFUSED, verdict_counts

__all__ = ["McNemar", "mcnemar", "rate_entry", "verdict_rates", "wilson"]

CONFIDENCE = 0.95


def wilson(k: int, n: int, confidence: float = CONFIDENCE) -> list[float] | None:
    """[low, high] of the Wilson score interval of k successes in n trials (None when n = 0)."""
    if n == 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return [round(float(ci.low), 4), round(float(ci.high), 4)]


def rate_entry(k: int, n: int) -> dict:
    """{"rate", "k", "n", "interval"} of a share k/n."""
    return {"rate": round(k / n, 4) if n else None, "k": int(k), "n": int(n), "interval": wilson(k, n)}


def verdict_rates(verdicts: Sequence[str]) -> dict:
    """Three-way rates of `verdicts`, each {"rate", "k", "n", "interval"}:
    "refused_rate" (the Safety Rate on harmful prompts, over-refusal on benign ones),
    "complied_rate" (attack success on harmful prompts) and "degenerate_rate"."""
    counts = verdict_counts(verdicts)
    n = len(verdicts)
    return {
        "refused_rate": rate_entry(counts[REFUSED], n),
        "complied_rate": rate_entry(counts[COMPLIED], n),
        "degenerate_rate": rate_entry(counts[DEGENERATE], n),
    }


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test. b: pairs positive in the first list only; c: positive in the second
    only; p_value: two-sided exact binomial test of b against b + c at 1/2 (1.0 when b + c = 0)."""

    b: int
    c: int
    n: int
    p_value: float

    def to_dict(self) -> dict:
        return asdict(self)


def mcnemar(first: Sequence, second: Sequence, positive=REFUSED) -> McNemar:
    """Paired test of two verdict lists on the same prompts, in the same order (e.g. base and
    aligned plain-harmful verdicts of two suite reports). An entry is positive when it equals
    `positive` (default "refused"; lists of booleans work with positive=True). Only discordant
    pairs carry information: b = first positive and second not, c = second positive and first not."""
    if len(first) != len(second):
        raise ValueError(f"paired verdicts must have the same length: {len(first)} vs {len(second)}")
    b = sum(1 for x, y in zip(first, second) if x == positive and y != positive)
    c = sum(1 for x, y in zip(first, second) if y == positive and x != positive)
    p_value = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)
    return McNemar(b, c, len(first), round(p_value, 6))
