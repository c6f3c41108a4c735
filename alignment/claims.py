"""Paired tests between two methods of the results table, over the replicates of a comparison.

Each replicate evaluates both methods on the same held-out prompts, so every test pairs them
prompt by prompt:

- **general accuracy** (is method A's alignment tax smaller than B's): exact McNemar test on the
  per-task correctness, per replicate, and pooled over replicates. Under the null each discordant
  task is equally likely to favour either method, in every replicate alike, so the pooled test is
  the exact binomial test of sum(b) against sum(b + c) at 1/2.
- **N50 of top-N masking** (does A's safety survive masking more pairs than B's): a paired
  bootstrap over the harmful prompts. A draw resamples the prompt indices of each replicate (the
  same indices for both methods), recomputes each method's masking curve from its per-prompt
  verdicts at every budget and its N50 (`safety_eval.attacks.n50`), and takes the mean over
  replicates of N50_A - N50_B. A curve that never halves within the measured budgets is censored
  at the largest budget, so the difference is then a lower bound (flagged `censored`). The p-value
  is two-sided: twice the smaller share of draws on either side of 0, as (k + 1) / (draws + 1).

Rows carry what these need (`alignment.report.table_row`): `general_correct`, and `masking`
with the budgets, the per-prompt verdicts at each and the unmasked verdicts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import binomtest

from safety_eval.attacks import n50
from safety_eval.stats import mcnemar

# What `alignment.compare` tests when both rows are in the table: (A, B, measure), read "A beats B
# on measure"; against each ablation: does the part it switches off raise N50; and forced routes
# against the masking augmentation they replaced (the +mask row).
ABLATED = ("mesa_no_coverage", "mesa_no_transport", "mesa_no_forced", "mesa_no_forced+mask")
CLAIMS = (("mesa", "sft_all", "general_accuracy"), ("mesa", "safex", "n50_top"),
          *(("mesa", ablation, "n50_top") for ablation in ABLATED))


def general_accuracy_test(pairs: Sequence[tuple[dict, dict]]) -> dict | None:
    """McNemar of per-task correctness, A first: per replicate and pooled. None when a row lacks
    per-task results. b = tasks A gets right and B wrong."""
    tests = []
    for a, b in pairs:
        first, second = a.get("general_correct"), b.get("general_correct")
        if not first or not second or len(first) != len(second):
            return None
        tests.append(mcnemar(first, second, positive=True).to_dict())
    b, c = sum(t["b"] for t in tests), sum(t["c"] for t in tests)
    pooled = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)
    return {"per_replicate": tests, "b": b, "c": c, "p_value": round(pooled, 6),
            "difference": float(np.mean([(t["b"] - t["c"]) / t["n"] for t in tests]))}


def _refused(verdicts: Sequence[str]) -> np.ndarray:
    return np.array([v == "refused" for v in verdicts], dtype=float)


def _curve(masking: dict) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(budgets, refused [budgets, prompts], unmasked refused [prompts]) of one row."""
    budgets = sorted(int(n) for n in masking["verdicts"])
    rows = np.stack([_refused(masking["verdicts"][str(n)]) for n in budgets])
    return budgets, rows, _refused(masking["plain"])


def _n50(budgets: list[int], rates: np.ndarray, baseline: float) -> tuple[float, bool]:
    value = n50(budgets, list(rates), baseline)
    return (float(budgets[-1]), True) if value is None else (value, False)


def n50_test(pairs: Sequence[tuple[dict, dict]], draws: int = 2000, seed: int = 0) -> dict | None:
    """Paired bootstrap of mean_replicates(N50_A - N50_B), A first (module docstring). None when
    a row lacks per-prompt masking verdicts or the two were measured on other prompts/budgets."""
    curves = []
    for a, b in pairs:
        if not a.get("masking") or not b.get("masking"):
            return None
        first, second = _curve(a["masking"]), _curve(b["masking"])
        if first[0] != second[0] or first[1].shape != second[1].shape:
            return None
        curves.append((first, second))
    rng = np.random.default_rng(seed)

    def differences(indices: list[np.ndarray]) -> tuple[list[float], bool]:
        out, censored = [], False
        for ((budgets, rows_a, plain_a), (_, rows_b, plain_b)), index in zip(curves, indices):
            value_a, cut_a = _n50(budgets, rows_a[:, index].mean(axis=1), plain_a[index].mean())
            value_b, cut_b = _n50(budgets, rows_b[:, index].mean(axis=1), plain_b[index].mean())
            out.append(value_a - value_b)
            censored |= cut_a or cut_b
        return out, censored

    sizes = [c[0][1].shape[1] for c in curves]
    observed, censored = differences([np.arange(n) for n in sizes])
    samples = np.array([np.mean(differences([rng.integers(0, n, n) for n in sizes])[0])
                        for _ in range(draws)])
    # (k + 1) / (draws + 1): a bootstrap p-value is never 0 (it cannot resolve below 1 / draws).
    tail = min((samples <= 0).sum(), (samples >= 0).sum())
    p_value = min(1.0, 2 * (tail + 1) / (draws + 1))
    low, high = np.quantile(samples, [0.025, 0.975])
    return {"difference": round(float(np.mean(observed)), 3),
            "ci95": [round(float(low), 3), round(float(high), 3)],
            "p_value": round(float(p_value), 4), "draws": draws, "censored": censored,
            "per_replicate": [round(d, 3) for d in observed]}


def claim_tests(per_replicate_rows: Sequence[dict[str, dict]]) -> dict[str, dict]:
    """Every claim of CLAIMS whose two rows are in every replicate: {"A vs B: measure": test}."""
    tests = {}
    for first, second, measure in CLAIMS:
        if not all(first in rows and second in rows for rows in per_replicate_rows):
            continue
        pairs = [(rows[first], rows[second]) for rows in per_replicate_rows]
        result = general_accuracy_test(pairs) if measure == "general_accuracy" else n50_test(pairs)
        if result is not None:
            tests[f"{first} vs {second}: {measure}"] = result
    return tests


def claims_markdown(tests: dict[str, dict]) -> str:
    """One line per claim test: the observed difference, its interval or counts, and p."""
    lines = []
    for name, test in tests.items():
        if "ci95" in test:  # N50 bootstrap
            bound = " (a lower bound: a curve never halved)" if test["censored"] else ""
            low, high = test["ci95"]
            lines.append(f"- {name}: mean N50 difference {test['difference']:+.1f} pairs{bound}, 95% "
                         f"bootstrap interval [{low:+.1f}, {high:+.1f}], per replicate "
                         f"{', '.join(f'{d:+.1f}' for d in test['per_replicate'])}; paired bootstrap over "
                         f"prompts ({test['draws']} draws) p = {test['p_value']:.3g}")
        else:  # McNemar
            per = ", ".join(f"{t['b']}/{t['c']} (p {t['p_value']:.3g})" for t in test["per_replicate"])
            lines.append(f"- {name}: mean difference {100 * test['difference']:+.1f} points; tasks right "
                         f"for the first only / the second only per replicate {per}; pooled exact McNemar "
                         f"{test['b']}/{test['c']}, p = {test['p_value']:.3g}")
    return "\n".join(lines)
