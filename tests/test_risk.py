"""The routing risk score (moe_routing.risk) against closed forms."""

import numpy as np
import pytest

from moe_routing.risk import risk_weights, routing_risk, selection_distribution


def test_one_layer_two_experts_by_hand():
    # top-1, lam = 0.5: q_h = 0.5 * [0.8, 0.2] + 0.25 = [0.65, 0.35], q_b = [0.35, 0.65]
    W = risk_weights([[0.8, 0.2]], [[0.2, 0.8]], top_k=1, smoothing=0.5)
    assert W == pytest.approx(np.log([[0.65 / 0.35, 0.35 / 0.65]]))
    # 3 tokens on expert 0, 1 on expert 1: (3 log(13/7) + log(7/13)) / 4 = log(13/7) / 2
    assert routing_risk([[3, 1]], W, top_k=1) == pytest.approx(np.log(13 / 7) / 2)


def test_expected_risk_is_k_times_the_kl_divergences():
    rng = np.random.default_rng(0)
    L, E, k = 3, 8, 2
    harmful, benign = (rng.dirichlet(np.ones(E), size=L) * k for _ in range(2))
    lam = 1e-9  # ~no smoothing, so q = F / k exactly
    W = risk_weights(harmful, benign, k, smoothing=lam)
    p, q = harmful / k, benign / k
    kl = lambda a, b: (a * np.log(a / b)).sum()  # noqa: E731
    # The expected hits of 1000 tokens of each profile.
    assert routing_risk(1000 * harmful, W, k) == pytest.approx(k * sum(kl(p[l], q[l]) for l in range(L)))
    assert routing_risk(1000 * benign, W, k) == pytest.approx(-k * sum(kl(q[l], p[l]) for l in range(L)))


def test_risk_is_per_token_and_zero_for_one_profile():
    F = np.array([[1.0, 0.5, 0.5, 0.0], [0.0, 0.0, 1.0, 1.0]])
    assert np.all(risk_weights(F, F, top_k=2) == 0)
    W = risk_weights(F, F[::-1], top_k=2)
    hits = np.array([[3, 2, 1, 0], [0, 1, 2, 3]])
    assert routing_risk(10 * hits, W, 2) == pytest.approx(routing_risk(hits, W, 2))
    assert np.isnan(routing_risk(np.zeros((2, 4)), W, 2))


def test_smoothing_bounds_an_unseen_expert_and_rows_sum_to_one():
    q = selection_distribution([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], top_k=2)
    assert q.sum(axis=1) == pytest.approx([1, 1])
    assert q[0, 1] == pytest.approx(0.01 / 4) and q[1] == pytest.approx([0.25] * 4)  # unseen layer: uniform
    assert np.isfinite(risk_weights([[2.0, 0.0]], [[0.0, 2.0]], top_k=2)).all()


@pytest.mark.parametrize("bad", [[[-1.0, 1.0]], [[np.nan, 1.0]], [1.0, 1.0]])
def test_bad_frequencies_are_refused(bad):
    with pytest.raises(ValueError, match="frequencies"):
        selection_distribution(bad, top_k=1)
