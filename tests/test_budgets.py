"""Masking budgets (counts and fractions), the one top-N rule with its per-layer cap, and N50."""

from __future__ import annotations

import numpy as np
import pytest

from moe_routing.instrument import mask_experts
from moe_routing.stats import RoutingCounts, budget_count, safety_critical_ranking, top_pairs
from safety_eval.attacks import SafetyProfile, n50, top_mask


def test_budget_count_rounds_half_up_with_at_least_one_pair():
    # The organism: 4 layers x 8 experts = 32 pairs.
    assert [budget_count(f, 4, 8) for f in (0.01, 0.025, 0.05, 0.1)] == [1, 1, 2, 3]
    # A real model: DeepSeek-V2-Lite, 26 MoE layers x 64 experts = 1664 pairs.
    assert [budget_count(f, 26, 64) for f in (0.01, 0.025, 0.05, 0.1)] == [17, 42, 83, 166]
    assert budget_count(0.5 / 32, 4, 8) == 1 and budget_count(2.5 / 32, 4, 8) == 3  # half up
    assert budget_count(6, 4, 8) == 6  # an int is a count
    for bad in (0.0, 1.5, -0.1, 0, 33, True):
        with pytest.raises(ValueError):
            budget_count(bad, 4, 8)


def test_top_pairs_ranks_by_risk_with_a_per_layer_cap():
    # Layer 0 holds the four riskiest pairs; with E=4, top_k=2 only 2 of them may be masked.
    risk = np.array([[0.9, 0.8, 0.7, 0.6], [0.1, 0.5, 0.0, 0.2]])
    assert top_pairs(risk, 2, top_k=2) == [(0, 0), (0, 1)]
    assert top_pairs(risk, 4, top_k=2) == [(0, 0), (0, 1), (1, 1), (1, 3)]
    assert top_pairs(np.zeros((2, 4)), 3, top_k=2) == [(0, 0), (0, 1), (1, 0)]  # ties by (layer, expert)
    with pytest.raises(ValueError, match="at most"):
        top_pairs(risk, 5, top_k=2)


@pytest.fixture(scope="module")
def tiny_qwen():
    from moe_routing.tiny import byte_tokenizer, tiny_model

    return tiny_model("qwen3_moe", seed=0, vocab_size=len(byte_tokenizer()))


def test_suite_ranking_is_capped_so_every_mask_applies(tiny_qwen):
    from moe_routing.architectures import describe
    from moe_routing.stats import risk_difference

    moe = describe(tiny_qwen)
    E, k, L = moe.num_experts, moe.top_k, moe.num_layers
    assert (E, k) == (8, 2)
    # Layer 0: harmful tokens (10 per sequence) avoid expert 0, benign tokens (20) all take it, so
    # 7 of its pairs have positive risk difference; every other layer routes both sides alike (RD 0).
    harmful_hits = np.zeros((L, E), np.int64)
    benign_hits = np.zeros((L, E), np.int64)
    harmful_hits[:, :2], benign_hits[:, :2] = 10, 20
    harmful_hits[0] = [0, 3, 3, 3, 3, 3, 3, 2]
    benign_hits[0] = [20, 3, 3, 3, 3, 3, 3, 2]
    harmful = RoutingCounts(harmful_hits[None].repeat(3, 0), np.full(3, 10), None, k)
    benign = RoutingCounts(benign_hits[None].repeat(3, 0), np.full(3, 20), None, k)
    n = L * (E - k)
    ranking = SafetyProfile(harmful, benign).ranking(top_n=n, n_bootstrap=3)
    assert len(ranking) == n
    assert np.bincount([s.layer for s in ranking], minlength=L).max() <= E - k
    with mask_experts(tiny_qwen, top_mask(ranking, n).pairs):  # the largest budget still applies
        pass
    # The ranking is exactly the shared rule on the risk difference ...
    rd = risk_difference(harmful, benign)
    assert [(s.layer, s.expert) for s in ranking] == top_pairs(rd, n, top_k=k)
    # ... where the uncapped top-n would have taken more than E - k pairs of layer 0,
    # a mask `mask_experts` rejects.
    uncapped = safety_critical_ranking(harmful, benign, top_n=E - k + 1, n_bootstrap=0)
    assert [s.layer for s in uncapped].count(0) == E - k + 1
    with pytest.raises(ValueError, match="must stay routable"):
        with mask_experts(tiny_qwen, top_mask(uncapped, E - k + 1).pairs):
            pass


def test_training_uses_the_same_rule():
    from alignment.augment import SafetyRouting

    harmful = np.array([[0.9, 0.8, 0.7, 0.6], [0.1, 0.5, 0.0, 0.2]])
    routing = SafetyRouting(harmful, np.zeros_like(harmful), top_k=2)
    assert routing.top(3) == top_pairs(harmful, 3, top_k=2)
    assert routing.top(99) == top_pairs(harmful, 4, top_k=2)  # asking for more: every allowed pair


def test_n50_interpolates_on_the_curve():
    # Baseline 0.8, half 0.4: crossed between budget 2 (0.6) and 4 (0.2) -> 2 + 0.2 / 0.4 * 2 = 3.
    assert n50([1, 2, 4, 8], [0.7, 0.6, 0.2, 0.0], baseline=0.8) == pytest.approx(3.0)
    # Exactly at half on a measured point.
    assert n50([1, 2], [0.6, 0.4], baseline=0.8) == pytest.approx(2.0)
    # First crossing counts even if the curve comes back up (non-monotone).
    assert n50([1, 2, 3], [0.3, 0.9, 0.1], baseline=0.8) == pytest.approx((0.8 - 0.4) / (0.8 - 0.3))
    # Fractions work the same way (budgets are just numbers).
    assert n50([0.01, 0.05], [0.8, 0.0], baseline=0.8) == pytest.approx(0.03)


def test_n50_never_halved_is_none():
    assert n50([1, 2, 8], [0.8, 0.7, 0.5], baseline=0.8) is None


def test_n50_already_halved_at_the_smallest_budget_interpolates_from_zero():
    # The unmasked model is the curve's first point (0, baseline): 0 + (0.8 - 0.4) / (0.8 - 0.0) * 2 = 1.
    assert n50([2, 4], [0.0, 0.0], baseline=0.8) == pytest.approx(1.0)
    assert n50([2, 4], [0.0, 0.0], baseline=0.0) == 0.0  # nothing to halve
    with pytest.raises(ValueError):
        n50([1, 2], [0.5], baseline=0.8)
