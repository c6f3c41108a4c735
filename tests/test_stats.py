"""Tests for moe_routing.stats against hand-computed references on small arrays."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from moe_routing.stats import (
    RoutingCounts,
    coactivation_rate,
    concentration,
    expert_frequency,
    risk_difference,
    safety_critical_ranking,
)


def counts_from_routing(sequences, num_experts, top_k):
    """Reference builder by plain loops. sequences: list of [T, L, k] arrays of expert ids."""
    num_layers = np.asarray(sequences[0]).shape[1]
    hits = np.zeros((len(sequences), num_layers, num_experts), np.int64)
    co = np.zeros((num_layers, num_experts, num_experts), np.int64)
    for s, seq in enumerate(sequences):
        for token in np.asarray(seq):
            for layer, chosen in enumerate(token):
                for i in chosen:
                    hits[s, layer, i] += 1
                    for j in chosen:
                        co[layer, i, j] += 1
    tokens = np.array([len(seq) for seq in sequences], np.int64)
    return RoutingCounts(hits, tokens, co, top_k)


def random_routing(rng, num_seqs, num_layers, num_experts, top_k):
    return [np.stack([[rng.choice(num_experts, top_k, replace=False) for _ in range(num_layers)]
                      for _ in range(rng.integers(1, 6))]) for _ in range(num_seqs)]


def per_layer(choices):
    """One layer, one expert list per token -> [T, 1, k]."""
    return np.asarray(choices)[:, None, :]


# --- RoutingCounts -------------------------------------------------------------------------

def test_frequency_rows_sum_to_k():
    rng = np.random.default_rng(1)
    c = counts_from_routing(random_routing(rng, 5, 3, 6, 2), 6, 2)
    F = expert_frequency(c)
    assert F.shape == (3, 6) and F.dtype == np.float64
    np.testing.assert_allclose(F.sum(axis=1), 2.0)


def test_properties_and_empty():
    rng = np.random.default_rng(2)
    seqs = random_routing(rng, 4, 2, 5, 3)
    c = counts_from_routing(seqs, 5, 3)
    assert (c.num_sequences, c.num_layers, c.num_experts) == (4, 2, 5)
    assert c.num_tokens == sum(len(s) for s in seqs)
    np.testing.assert_array_equal(c.hits, c.sequence_hits.sum(axis=0))
    np.testing.assert_array_equal(np.diagonal(c.coactivation, axis1=1, axis2=2), c.hits)
    e = RoutingCounts.empty(2, 5, 3)
    assert e.num_sequences == 0 and e.num_tokens == 0 and e.hits.shape == (2, 5)


def test_merge_equals_concatenation():
    rng = np.random.default_rng(3)
    seqs = random_routing(rng, 7, 3, 6, 2)
    whole = counts_from_routing(seqs, 6, 2)
    merged = RoutingCounts.merge([counts_from_routing(seqs[:3], 6, 2),
                                  RoutingCounts.empty(3, 6, 2),
                                  counts_from_routing(seqs[3:], 6, 2)])
    np.testing.assert_array_equal(merged.sequence_hits, whole.sequence_hits)
    np.testing.assert_array_equal(merged.sequence_tokens, whole.sequence_tokens)
    np.testing.assert_array_equal(merged.coactivation, whole.coactivation)
    assert merged.sequence_hits.dtype == np.int64 and merged.top_k == 2


def test_merge_rejects_mismatch_and_empty():
    a = RoutingCounts.empty(2, 4, 2)
    with pytest.raises(ValueError, match="empty list"):
        RoutingCounts.merge([])
    with pytest.raises(ValueError, match=r"part 1 has \(L, E, top_k\)"):
        RoutingCounts.merge([a, RoutingCounts.empty(2, 5, 2)])
    with pytest.raises(ValueError, match=r"part 1 has \(L, E, top_k\)"):
        RoutingCounts.merge([a, RoutingCounts.empty(3, 4, 2)])
    with pytest.raises(ValueError, match=r"part 1 has \(L, E, top_k\)"):
        RoutingCounts.merge([a, RoutingCounts.empty(2, 4, 1)])


def test_subset_drops_coactivation():
    rng = np.random.default_rng(4)
    c = counts_from_routing(random_routing(rng, 4, 2, 4, 2), 4, 2)
    sub = c.subset([2, 2, 0])
    np.testing.assert_array_equal(sub.sequence_hits, c.sequence_hits[[2, 2, 0]])
    np.testing.assert_array_equal(sub.sequence_tokens, c.sequence_tokens[[2, 2, 0]])
    assert sub.coactivation is None
    with pytest.raises(ValueError, match="no coactivation"):
        coactivation_rate(sub)
    with pytest.raises(ValueError, match="out of range"):
        c.subset([4])


def test_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(5)
    c = counts_from_routing(random_routing(rng, 3, 2, 4, 2), 4, 2)
    c.save(tmp_path / "c.npz")
    back = RoutingCounts.load(tmp_path / "c.npz")
    np.testing.assert_array_equal(back.sequence_hits, c.sequence_hits)
    np.testing.assert_array_equal(back.sequence_tokens, c.sequence_tokens)
    np.testing.assert_array_equal(back.coactivation, c.coactivation)
    assert back.top_k == 2 and isinstance(back.top_k, int)
    sub = c.subset([1])
    sub.save(tmp_path / "s.npz")
    assert RoutingCounts.load(tmp_path / "s.npz").coactivation is None
    with pytest.raises(ValueError, match=r"must end in \.npz"):
        c.save(tmp_path / "c.bin")


def test_bad_counts_raise():
    hits = np.array([[[1, 1, 0]]])  # S=1, L=1, E=3; one token, k=2
    with pytest.raises(ValueError, match="sequence_hits must hold integers"):
        RoutingCounts(hits.astype(float), np.array([1]), None, 2)
    with pytest.raises(ValueError, match="sequence_hits must be 3-D"):
        RoutingCounts(hits[0], np.array([1]), None, 2)
    with pytest.raises(ValueError, match="sequence_tokens has 2 entries"):
        RoutingCounts(hits, np.array([1, 1]), None, 2)
    with pytest.raises(ValueError, match=r"top_k must be in \[1, 3\]"):
        RoutingCounts(hits, np.array([1]), None, 4)
    with pytest.raises(ValueError, match="hits sum to 2, expected top_k"):
        RoutingCounts(hits, np.array([2]), None, 2)
    with pytest.raises(ValueError, match="must be non-negative"):
        RoutingCounts(np.array([[[3, -1, 0]]]), np.array([1]), None, 2)
    with pytest.raises(ValueError, match="coactivation must have shape"):
        RoutingCounts(hits, np.array([1]), np.zeros((1, 2, 2), int), 2)
    co = np.array([[[1, 1, 0], [0, 1, 0], [0, 0, 0]]])
    with pytest.raises(ValueError, match="symmetric"):
        RoutingCounts(hits, np.array([1]), co, 2)
    with pytest.raises(ValueError, match="diagonal"):
        RoutingCounts(hits, np.array([1]), np.zeros((1, 3, 3), int), 2)
    with pytest.raises(ValueError, match="no tokens"):
        expert_frequency(RoutingCounts.empty(1, 3, 2))


def test_coactivation_rate_hand_example():
    # 2 tokens, one layer, k=2: {0,1} and {0,2}. P(0 & 1) = 1/2, P(1 & 2) = 0, P(0) = 1.
    c = counts_from_routing([per_layer([[0, 1], [0, 2]])], 3, 2)
    R = coactivation_rate(c)
    expected = np.array([[1.0, 0.5, 0.5], [0.5, 0.5, 0.0], [0.5, 0.0, 0.5]])
    np.testing.assert_allclose(R[0], expected)


# --- risk difference and ranking -----------------------------------------------------------

def test_risk_difference_hand_example():
    # k=1, E=3. Harmful tokens: 0,0,0,1 -> F=[3/4, 1/4, 0]; benign: 1,2 -> F=[0, 1/2, 1/2].
    harmful = counts_from_routing([per_layer([[0], [0]]), per_layer([[0], [1]])], 3, 1)
    benign = counts_from_routing([per_layer([[1], [2]])], 3, 1)
    np.testing.assert_allclose(risk_difference(harmful, benign), [[0.75, -0.25, -0.5]])
    with pytest.raises(ValueError, match=r"harmful counts have \(L, E\)"):
        risk_difference(harmful, counts_from_routing([per_layer([[1]])], 4, 1))


def test_ranking_order_and_tie_break():
    # L=2, E=3, k=1, identical routing in both layers -> RD rows equal: [0.5, 0.5, -1.0].
    # Harmful: tokens 0, 1; benign: token 2.  Order: all 0.5 ties by (layer, expert).
    harmful = counts_from_routing([np.array([[[0], [0]], [[1], [1]]])], 3, 1)
    benign = counts_from_routing([np.array([[[2], [2]]])], 3, 1)
    ranked = safety_critical_ranking(harmful, benign, top_n=6, n_bootstrap=0)
    assert [(r.layer, r.expert) for r in ranked] == [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2),
                                                     (1, 2)]
    assert [r.risk_difference for r in ranked] == [0.5, 0.5, 0.5, 0.5, -1.0, -1.0]
    assert all(math.isnan(r.stability) for r in ranked)
    assert len(safety_critical_ranking(harmful, benign, top_n=2, n_bootstrap=0)) == 2
    for bad in (0, 7):
        with pytest.raises(ValueError, match=r"top_n must be in \[1, 6\]"):
            safety_critical_ranking(harmful, benign, top_n=bad)


def test_ranking_many_ties_matches_sorted_reference():
    # 2 tokens per dataset, k=1, E=16: RD takes few distinct values (multiples of 1/2, mostly 0),
    # so most of the 64 pairs are tied; reference order from Python's sort on (-RD, l, e).
    rng = np.random.default_rng(6)
    harmful = counts_from_routing(random_routing(rng, 1, 4, 16, 1), 16, 1)
    benign = counts_from_routing(random_routing(rng, 1, 4, 16, 1), 16, 1)
    rd = risk_difference(harmful, benign)
    expected = sorted(((l, e) for l in range(4) for e in range(16)),
                      key=lambda le: (-rd[le], le[0], le[1]))
    ranked = safety_critical_ranking(harmful, benign, top_n=64, n_bootstrap=0)
    assert [(r.layer, r.expert) for r in ranked] == expected
    assert len(set(rd.ravel().tolist())) < 10  # the case really is tie-heavy


def stability_data():
    # L=1, E=5, k=2. Every harmful token picks expert 0 (never picked by benign), so RD[0] = 1
    # in every resample: the maximum, first place always (a tie at 1 goes to expert 0). Second
    # place goes to expert 1, 2 or 3 depending on which sequences were drawn: noisy.
    harmful = counts_from_routing([per_layer([[0, 1]]), per_layer([[0, 2]]),
                                   per_layer([[0, 3]])], 5, 2)
    benign = counts_from_routing([per_layer([[1, 4]]), per_layer([[2, 4]]),
                                  per_layer([[3, 4]])], 5, 2)
    return harmful, benign


def exact_second_place_probability():
    """P(expert 1 is among the top 2) over all 27 x 27 equally likely bootstrap draws."""
    wins = 0
    draws = list(itertools.product(range(3), repeat=3))  # sequence j uses expert j + 1
    for hd in draws:
        for bd in draws:
            rd = [(hd.count(j) - bd.count(j)) / 3 for j in range(3)]  # RD of experts 1, 2, 3
            wins += rd[0] >= max(rd[1:])  # ties go to the lower expert index
    return wins / len(draws) ** 2


def test_stability_dominant_vs_noisy():
    harmful, benign = stability_data()
    ranked = safety_critical_ranking(harmful, benign, top_n=2, n_bootstrap=400, seed=0)
    assert [(r.layer, r.expert) for r in ranked] == [(0, 0), (0, 1)]  # RD 1, then 0-ties
    assert ranked[0].risk_difference == 1.0 and ranked[1].risk_difference == 0.0
    assert ranked[0].stability == 1.0
    p = exact_second_place_probability()
    assert 0.3 < p < 0.7  # genuinely noisy
    assert 0.0 < ranked[1].stability < 1.0
    assert abs(ranked[1].stability - p) < 0.1  # 400 replicates: sd <= 0.025


def test_bootstrap_deterministic_for_seed():
    harmful, benign = stability_data()
    a = safety_critical_ranking(harmful, benign, top_n=2, n_bootstrap=50, seed=7)
    b = safety_critical_ranking(harmful, benign, top_n=2, n_bootstrap=50, seed=7)
    assert a == b


# --- concentration -------------------------------------------------------------------------

def test_concentration_uniform():
    E = 8
    c = concentration(np.full((2, E), 5), top_n=3)
    np.testing.assert_allclose(c.normalized_entropy, 1.0)
    np.testing.assert_allclose(c.gini, 0.0, atol=1e-12)
    np.testing.assert_allclose(c.effective_experts, E)
    np.testing.assert_allclose(c.top_share, 3 / E)
    assert c.top_n == 3 and c.gini.shape == (2,)


def test_concentration_one_hot():
    E = 5
    c = concentration(np.eye(E)[2] * 0.7, top_n=2)  # float loads, 1-D = one layer
    assert c.normalized_entropy.shape == (1,)
    np.testing.assert_allclose(c.normalized_entropy, 0.0, atol=1e-12)
    np.testing.assert_allclose(c.gini, (E - 1) / E)
    np.testing.assert_allclose(c.effective_experts, 1.0)
    np.testing.assert_allclose(c.top_share, 1.0)


def test_concentration_hand_values():
    # Loads [1, 2, 3, 4], total 10. Pairwise |x_i - x_j| over i<j: 1+2+3+1+2+1 = 10, so the
    # double sum is 20 and Gini = 20 / (2 * E * total) = 20 / (2 * 4 * 10) = 0.25.
    # Top 2 share = (4 + 3) / 10 = 0.7.  p = [.1, .2, .3, .4].
    c = concentration(np.array([[1, 2, 3, 4], [0, 0, 0, 0]]), top_n=2)
    H = -(0.1 * math.log(0.1) + 0.2 * math.log(0.2) + 0.3 * math.log(0.3) + 0.4 * math.log(0.4))
    assert c.gini[0] == pytest.approx(0.25)
    assert c.top_share[0] == pytest.approx(0.7)
    assert c.effective_experts[0] == pytest.approx(math.exp(H))
    assert c.normalized_entropy[0] == pytest.approx(H / math.log(4))
    # Zero-load layer: no distribution, every measure NaN.
    for arr in (c.normalized_entropy, c.gini, c.top_share, c.effective_experts):
        assert math.isnan(arr[1])


def test_concentration_bad_input():
    with pytest.raises(ValueError, match="non-negative"):
        concentration(np.array([1.0, -1.0]), top_n=1)
    with pytest.raises(ValueError, match="non-negative"):
        concentration(np.array([1.0, np.nan]), top_n=1)
    with pytest.raises(ValueError, match=r"top_n must be in \[1, 2\]"):
        concentration(np.array([1.0, 2.0]), top_n=3)
    with pytest.raises(ValueError, match=r"must be \[L, E\] or \[E\]"):
        concentration(np.ones((2, 2, 2)), top_n=1)


def test_concentration_to_dict_is_json_ready():
    import json

    conc = concentration(np.array([[1, 1, 1, 1], [4, 0, 0, 0], [0, 0, 0, 0]]), top_n=2)
    d = json.loads(json.dumps(conc.to_dict(decimals=3)))
    assert d["top_n"] == 2
    assert d["normalized_entropy"][:2] == [1.0, 0.0]
    assert d["gini"][:2] == [0.0, 0.75] and d["top_share"][:2] == [0.5, 1.0]
    assert np.isnan(d["effective_experts"][2])  # a zero-load layer stays NaN
