"""Consumers of suite reports: the alignment table's intervals and its base vs aligned paired test."""

from __future__ import annotations

import pytest

from alignment.report import markdown, paired_safety_test, results_table, table_row
from safety_eval.stats import mcnemar, verdict_rates


def _suite_report(verdicts: list[str]) -> dict:
    """The parts of a suite report that `table_row` reads."""
    rates = {"plain": verdict_rates(verdicts), "top6_mask": verdict_rates(verdicts[::-1])}
    share = rates["plain"]["refused_rate"]
    return {
        "summary": {"safety_rate": share["rate"], "safety_rate_ci": share["interval"],
                    "top6_mask_safety_rate": rates["top6_mask"]["refused_rate"]["rate"],
                    "top6_mask_safety_rate_ci": rates["top6_mask"]["refused_rate"]["interval"],
                    "fsour_attack_success": 0.5, "fsour_degenerate_rate": 0.25,
                    "routing_search_attack_success": 0.75, "n50_top_fraction": 0.1,
                    "effective_safety_experts": 3.0},
        "settings": {"headline_mask": 6},
        "rates": rates,
        "verdicts": {"plain": {"set": "harmful", "prompt_index": list(range(len(verdicts))),
                               "verdicts": verdicts}},
    }


def test_alignment_table_shows_intervals_and_paired_test():
    base = ["refused"] * 3 + ["complied"] * 5 + ["degenerate"] * 2
    aligned = ["refused"] * 9 + ["complied"]
    rows = {"base": table_row(_suite_report(base)), "aligned": table_row(_suite_report(aligned))}
    assert rows["base"]["safety_verdicts"] == base
    interval = verdict_rates(base[::-1])["refused_rate"]["interval"]
    assert rows["base"]["headline_top_mask_safety_rate_ci"] == interval
    table = results_table(rows)
    assert "SR top-6 masked (%)" in table and f"[{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]" in table
    low, high = rows["base"]["safety_rate_ci"]
    assert f"| base | 30.0 [{100 * low:.1f}, {100 * high:.1f}] |" in table
    assert "F-SOUR degenerate (%)" in table and "| 25.0 |" in table
    assert rows["base"]["layer_route_search_attack_success"] == 0.75  # the old summary name, read on
    assert "N50 top-N (share of pairs) (%)" in table and "| 10.0 |" in table

    test = paired_safety_test(rows["base"], rows["aligned"])
    assert test == mcnemar(base, aligned).to_dict() and (test["b"], test["c"]) == (0, 6)
    assert test["p_value"] == pytest.approx(2 / 2**6)  # all six discordant pairs one way
    text = markdown({
        "method": "mesa", "base_checkpoint": "b", "aligned_checkpoint": "a", "config": {"seed": 0},
        "parameters": {"trainable": 1, "total": 10, "fraction": 0.1}, "trained_experts": [],
        "routing": {"before": {"effective_safety_experts": 1}, "after": {"effective_safety_experts": 2}},
        "evaluation": rows, "timings_seconds": {},
    })
    assert "McNemar exact test p = 0.03125" in text and "same 10 prompts" in text


def test_paired_test_needs_verdicts_on_the_same_prompts():
    old = {"safety_rate": 0.5}  # a row from a report written before per-prompt verdicts
    assert paired_safety_test(old, {"safety_verdicts": ["refused"]}) is None
    assert paired_safety_test({"safety_verdicts": ["refused"]}, {"safety_verdicts": ["refused"] * 2}) is None
    assert results_table({"old": old}).count("n/a") >= 1  # old rows still render
