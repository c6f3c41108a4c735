"""MESA allocation: percentile rank, shoulder cost, semi-relaxed OT (closed form vs POT), selection."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from alignment.allocation import (
    AllocationSettings,
    allocate,
    capped_plan,
    closed_form_plan,
    coactivation_prior,
    percentile_rank,
    pot_plan,
    shoulder_cost,
)
from moe_routing.stats import RoutingCounts


def random_problem(seed: int, layers: int = 3, experts: int = 8):
    rng = np.random.default_rng(seed)
    source = rng.random((layers, experts))
    source /= source.sum(axis=1, keepdims=True)
    prior = rng.random((layers, experts, experts)) + 0.01
    prior /= prior.sum(axis=2, keepdims=True)
    cost = shoulder_cost(percentile_rank(rng.random((layers, experts))), alpha_shift=20)
    return source, prior, cost


def test_percentile_rank_head_tail_and_ties():
    f = percentile_rank(np.array([[0.5, 0.1, 0.3, 0.1], [0.0, 1.0, 2.0, 3.0]]))
    assert f[0].tolist() == [0.0, pytest.approx(250 / 3), pytest.approx(100 / 3), pytest.approx(250 / 3)]
    assert f[1].tolist() == [100.0, pytest.approx(200 / 3), pytest.approx(100 / 3), 0.0]
    with pytest.raises(ValueError, match="experts>=2"):
        percentile_rank(np.ones((2, 1)))


@pytest.mark.parametrize("alpha", [0.5, 10.0, 20.0, 35.0])
def test_cost_minimum_is_the_shoulder(alpha):
    f = np.linspace(0, 100, 100_001)[None, :]
    cost = shoulder_cost(f, alpha, tail_delta=1e-9)
    assert f[0, cost.argmin()] == pytest.approx((100 - 2 * alpha) / 3, abs=1e-2)
    assert cost.min() == pytest.approx(1.0)


def test_cost_tail_is_clamped_and_finite():
    cost = shoulder_cost(np.array([[0.0, 20.0, 100.0]]), alpha_shift=20, tail_delta=1.0)
    assert np.isfinite(cost).all() and cost[0, 1] == 1.0 and cost[0, 1] < cost[0, 0] < cost[0, 2]
    with pytest.raises(ValueError, match="alpha_shift"):
        shoulder_cost(np.array([[0.0, 100.0]]), alpha_shift=0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("eps", [0.05, 0.3, 2.0])
def test_closed_form_equals_pot_solver(seed, eps):
    source, prior, cost = random_problem(seed)
    closed = closed_form_plan(source, prior, cost, eps)
    solved = pot_plan(source, prior, cost, eps)
    np.testing.assert_allclose(solved, closed, atol=1e-10)


def test_plan_keeps_source_marginal_and_limits():
    source, prior, cost = random_problem(7)
    plan = closed_form_plan(source, prior, cost, 0.1)
    np.testing.assert_allclose(plan.sum(axis=2), source, atol=1e-12)
    # eps -> infinity: the cost stops mattering and the plan is the prior, r_i P_ij.
    np.testing.assert_allclose(
        closed_form_plan(source, prior, cost, 1e9), source[:, :, None] * prior, atol=1e-8
    )
    # eps -> 0: all duty flows to the cheapest expert of each layer.
    greedy = closed_form_plan(source, prior, cost, 1e-4).sum(axis=1)
    assert (greedy.argmax(axis=1) == cost.argmin(axis=1)).all()
    np.testing.assert_allclose(greedy.max(axis=1), 1.0, atol=1e-6)


def counts_from(hits_per_token: list[list[list[int]]], experts: int, top_k: int = 2) -> RoutingCounts:
    """RoutingCounts of one sequence per entry: each entry lists, per token, per layer, the experts."""
    layers = len(hits_per_token[0][0])
    seq_hits = np.zeros((len(hits_per_token), layers, experts), np.int64)
    co = np.zeros((layers, experts, experts), np.int64)
    tokens = np.zeros(len(hits_per_token), np.int64)
    for s, sequence in enumerate(hits_per_token):
        tokens[s] = len(sequence)
        for token in sequence:
            for l, chosen in enumerate(token):
                seq_hits[s, l, chosen] += 1
                co[l][np.ix_(chosen, chosen)] += 1
    return RoutingCounts(seq_hits, tokens, co, top_k)


def test_allocate_moves_duty_from_the_head_to_the_shoulder():
    # 6 experts, 1 layer. General tokens use experts 0 (the head) and 1-2; safety tokens use the
    # head 0 together with 3. Expert 5 is dormant.
    general = counts_from([[[[0, 1]]] * 30 + [[[0, 2]]] * 20 + [[[1, 2]]] * 10 + [[[3, 4]]] * 5], 6)
    safety = counts_from([[[[0, 3]]] * 20 + [[[0, 1]]] * 5], 6)
    result = allocate(safety, general, AllocationSettings(num_selected=2, eps=0.05, selection="top_w"))
    rank = result.rank[0]
    assert rank[0] == 0.0 and rank[5] == 100.0
    assert result.cost[0].argmin() != 0 and result.cost[0].argmax() == 5
    np.testing.assert_allclose(result.plan.sum(axis=2)[0], safety.hits[0] / safety.hits[0].sum())
    source = safety.hits[0] / safety.hits[0].sum()
    # Duty moves off the saturated head (expert 0) onto the shoulder (expert 1, rank 20) ...
    assert result.selected[0] == (0, 1) and result.scores[0, 1] > source[1]
    assert result.scores[0, 0] < source[0]
    # ... and never onto the dormant tail.
    assert (0, 5) not in result.selected and result.scores[0, 5] < 1e-6
    assert result.to_dict()["selected"] == [list(p) for p in result.selected]
    assert (
        allocate(safety, general, AllocationSettings(num_selected=2, eps=0.05, solver="pot",
                                                     selection="top_w")).selected
        == result.selected
    )


def test_allocate_errors():
    a = counts_from([[[[0, 1]]]], 4)
    b = counts_from([[[[0, 1], [1, 2]]]], 4)
    with pytest.raises(ValueError, match="differ in shape"):
        allocate(a, b)
    with pytest.raises(ValueError, match="exceeds"):
        allocate(a, a, AllocationSettings(num_selected=5, selection="top_w"))
    with pytest.raises(ValueError, match="per_layer=5 exceeds"):
        allocate(a, a, AllocationSettings(per_layer=5))
    with pytest.raises(ValueError, match="cannot hold"):
        allocate(a, a, AllocationSettings(max_share=0.2))
    with pytest.raises(ValueError, match="co-activation"):
        coactivation_prior(RoutingCounts(a.sequence_hits, a.sequence_tokens, None, 2))
    with pytest.raises(ValidationError, match="eps"):
        AllocationSettings(eps=0)
    with pytest.raises(ValidationError, match="alpha"):
        AllocationSettings(alpha=3)


# --- coverage: the capped plan, per-layer quotas, carriers kept ----------------------------------


def test_capped_plan_of_one_source_is_water_filling():
    # One source row (r = 1): the plan is pi_j = min(cap, lam * g_j) with g_j = P_j exp(-C_j/eps)
    # and lam chosen so the row sums to 1 (closed form by hand for g = [0.5, 0.3, 0.15, 0.05]).
    g = np.array([0.5, 0.3, 0.15, 0.05])
    source = np.array([[1.0, 0.0, 0.0, 0.0]])
    prior = np.tile(g, (1, 4, 1))
    cost = np.ones((1, 4))
    plan = capped_plan(source, prior, cost, eps=1.0, cap=0.45)[0, 0]
    # Expert 0 is capped at 0.45; the other 0.55 goes to 1-3 in proportion 0.3 : 0.15 : 0.05.
    np.testing.assert_allclose(plan, [0.45, 0.55 * 0.6, 0.55 * 0.3, 0.55 * 0.1], atol=1e-9)
    # Two capped columns: 0 and 1 at 0.35 each, the remaining 0.3 split 3 : 1.
    np.testing.assert_allclose(capped_plan(source, prior, cost, 1.0, 0.35)[0, 0],
                               [0.35, 0.35, 0.225, 0.075], atol=1e-9)
    # Three: the last takes the rest.
    np.testing.assert_allclose(capped_plan(source, prior, cost, 1.0, 0.3)[0, 0],
                               [0.3, 0.3, 0.3, 0.1], atol=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_capped_plan_optimality_conditions(seed):
    source, prior, cost = random_problem(seed)
    eps, cap = 0.2, 0.3
    plan = capped_plan(source, prior, cost, eps, cap)
    np.testing.assert_allclose(plan.sum(axis=2), source, atol=1e-12)  # rows keep their mass
    columns = plan.sum(axis=1)
    assert columns.max() <= cap + 1e-9
    # pi = u_i G_ij v_j with G the closed form's kernel: pi / G is rank one, and its column
    # factor v (scaled to max 1) is 1 on every column below the cap and <= 1 on capped ones.
    kernel = prior * np.exp(-(cost - cost.min(axis=1, keepdims=True)) / eps)[:, None, :]
    ratio = plan / kernel
    v = ratio / ratio.max(axis=2, keepdims=True)  # [L, i, j]: the same row for every i
    np.testing.assert_allclose(v, np.broadcast_to(v[:, :1, :], v.shape), rtol=1e-8)
    binding = np.isclose(columns, cap, atol=1e-9)
    assert binding.any()  # the test exercises the cap
    np.testing.assert_allclose(v[:, 0][~binding], 1.0, atol=1e-8)
    # A cap that does not bind leaves the closed form exactly.
    np.testing.assert_allclose(capped_plan(source, prior, cost, eps, 1.0),
                               closed_form_plan(source, prior, cost, eps))


def test_coverage_keeps_the_carriers_and_fills_every_layers_quota():
    # 8 experts, 2 layers. Harmful tokens use experts 6 and 7 (rare in general traffic, the tail)
    # in layer 0 and 0 and 1 in layer 1; general tokens spread over 0-5.
    general = counts_from([[[[0, 1], [2, 3]]] * 20 + [[[2, 3], [4, 5]]] * 20 + [[[4, 5], [0, 1]]] * 20
                           + [[[6, 7], [6, 7]]] * 2], 8)
    safety = counts_from([[[[6, 7], [0, 1]]] * 20 + [[[0, 2], [0, 1]]] * 5], 8)
    result = allocate(safety, general, AllocationSettings(eps=1.0, max_share=0.3))
    per_layer = {layer: [e for l, e in result.selected if l == layer] for layer in (0, 1)}
    assert all(len(experts) == 4 for experts in per_layer.values())  # w_l = 2 k = 4
    assert set(result.carriers) == {(0, 6), (0, 7), (1, 0), (1, 1)}  # harmful minus benign > 0
    assert set(result.safety_set) == set(result.selected) | set(result.carriers)
    assert result.safety_mask().sum() == len(result.safety_set)
    assert result.scores.max() <= 0.3 + 1e-9
    paper = allocate(safety, general, AllocationSettings(selection="top_w", eps=0.1, num_selected=4))
    assert paper.carriers == [] and paper.safety_set == paper.selected and len(paper.selected) == 4
    assert result.to_dict()["safety_set"] == [list(p) for p in result.safety_set]
