"""Paired tests between methods (`alignment.claims`), against hand-computed values."""

from __future__ import annotations

import pytest
from scipy.stats import binomtest

from alignment.claims import claim_tests, claims_markdown, general_accuracy_test, n50_test

R, C = "refused", "complied"


def _row(plain: list[str], masked: dict[int, list[str]], general: list[bool] | None = None) -> dict:
    return {"masking": {"plain": plain, "verdicts": {str(n): v for n, v in masked.items()}},
            "general_correct": general or [True] * 4}


def test_general_accuracy_is_a_pooled_exact_mcnemar():
    a1, b1 = [True, True, True, False], [False, False, True, False]  # b = 2, c = 0
    a2, b2 = [True, False, True, True, True], [True, True, False, False, False]  # b = 3, c = 1
    test = general_accuracy_test([({"general_correct": a1}, {"general_correct": b1}),
                                  ({"general_correct": a2}, {"general_correct": b2})])
    assert [(t["b"], t["c"]) for t in test["per_replicate"]] == [(2, 0), (3, 1)]
    assert (test["b"], test["c"]) == (5, 1)
    assert test["p_value"] == pytest.approx(binomtest(5, 6, 0.5).pvalue, abs=1e-6)
    assert test["difference"] == pytest.approx(((2 - 0) / 4 + (3 - 1) / 5) / 2)
    assert general_accuracy_test([({"general_correct": a1}, {})]) is None


def test_n50_bootstrap_difference_matches_the_hand_computed_curves():
    # 10 prompts, all refused unmasked. A: 8 refuse at budget 1, 2 at budget 4 -> halves between 1
    # and 4: 1 + (0.8 - 0.5) / (0.8 - 0.2) * 3 = 2.5. B: 4 refuse at budget 1 -> 0 + 0.5/0.6 = 0.833.
    plain = [R] * 10
    a = _row(plain, {1: [R] * 8 + [C] * 2, 4: [R] * 2 + [C] * 8})
    b = _row(plain, {1: [R] * 4 + [C] * 6, 4: [C] * 10})
    test = n50_test([(a, b)], draws=400)
    assert test["difference"] == pytest.approx(2.5 - 1 / 1.2, abs=1e-3)
    assert test["ci95"][0] > 0 and test["p_value"] < 0.05 and not test["censored"]
    same = n50_test([(a, a)], draws=200)
    assert same["difference"] == 0 and same["p_value"] == 1.0


def test_a_curve_that_never_halves_is_censored_at_the_largest_budget():
    plain = [R] * 6
    robust = _row(plain, {2: [R] * 6, 8: [R] * 5 + [C]})
    fragile = _row(plain, {2: [C] * 6, 8: [C] * 6})
    test = n50_test([(robust, fragile)], draws=100)
    assert test["censored"] and test["difference"] == pytest.approx(8 - 1.0)
    assert n50_test([(robust, _row(plain, {2: [C] * 6}))]) is None  # other budgets: not paired


def test_claim_tests_run_the_claims_whose_rows_exist():
    plain = [R] * 4
    rows = {"mesa": _row(plain, {1: [R] * 4}, [True] * 4),
            "sft_all": _row(plain, {1: [C] * 4}, [False] * 4),
            "safex": _row(plain, {1: [C] * 4})}
    tests = claim_tests([rows, rows, rows])
    assert set(tests) == {"mesa vs sft_all: general_accuracy", "mesa vs safex: n50_top"}
    assert tests["mesa vs sft_all: general_accuracy"]["b"] == 12
    text = claims_markdown(tests)
    assert "pooled exact McNemar 12/0" in text and "lower bound" in text
    assert claim_tests([{"mesa": rows["mesa"]}]) == {}
