"""Routing risk: how much a sequence's routing looks like the model's routing of harmful prompts.

Notation as in `moe_routing.stats`: L MoE layers, E experts, top-k. A routing profile gives each
kind c of profiled prompts (harmful h, benign b) its hit frequencies F_c[l, e] (hits per token;
each layer's row sums to k). One selection in layer l then lands on expert e with probability

    q_c[l, e] = (1 - lam) * F_c[l, e] / k + lam / E

(mixed with a little of the uniform distribution, `smoothing` lam, so an expert the profile never
saw selected costs a bounded amount instead of an infinite log). Treating a sequence's
selections as independent draws, its log-likelihood ratio of harmful over benign routing is
sum_{l,e} hits[l, e] * W[l, e] with W = log q_h - log q_b. The risk score is that sum per token:

    risk = (1 / n) * sum_{l,e} hits[l, e] * W[l, e]       n = hits[0].sum() / k tokens

in nats per token, so prompts of any length share one scale: > 0 routes more like the harmful
profile, < 0 more like the benign. Its mean over tokens drawn from the harmful profile is
k * sum_l KL(q_h[l] || q_b[l]), over the benign profile -k * sum_l KL(q_b[l] || q_h[l]).
"""

from __future__ import annotations

import numpy as np

DEFAULT_SMOOTHING = 0.01


def selection_distribution(frequency: np.ndarray, top_k: int,
                           smoothing: float = DEFAULT_SMOOTHING) -> np.ndarray:
    """q[l, e] from hit frequencies F [L, E] (hits per token): F / k mixed with `smoothing` of the
    uniform distribution, float64 [L, E], each row summing to 1."""
    F = np.asarray(frequency, dtype=np.float64)
    if F.ndim != 2 or not np.isfinite(F).all() or (F < 0).any():
        raise ValueError(f"frequencies must be finite non-negative [L, E], got shape {F.shape}")
    if not 0 < smoothing <= 1:
        raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
    rows = F.sum(axis=1, keepdims=True)
    if (rows == 0).any():  # a layer the profile never reached: no evidence either way
        F = np.where(rows == 0, top_k / F.shape[1], F)
        rows = F.sum(axis=1, keepdims=True)
    return (1 - smoothing) * F / rows + smoothing / F.shape[1]


def risk_weights(harmful: np.ndarray, benign: np.ndarray, top_k: int,
                 smoothing: float = DEFAULT_SMOOTHING) -> np.ndarray:
    """W[l, e] = log q_h[l, e] - log q_b[l, e]: the log-likelihood ratio of one selection."""
    if np.shape(harmful) != np.shape(benign):
        raise ValueError(f"harmful frequencies have shape {np.shape(harmful)}, benign {np.shape(benign)}")
    return (np.log(selection_distribution(harmful, top_k, smoothing))
            - np.log(selection_distribution(benign, top_k, smoothing)))


def routing_risk(hits: np.ndarray, weights: np.ndarray, top_k: int) -> float:
    """Mean log-likelihood ratio per token of a sequence's hits [L, E] (NaN for no tokens)."""
    hits = np.asarray(hits, dtype=np.float64)
    if hits.shape != np.shape(weights):
        raise ValueError(f"hits have shape {hits.shape}, the risk weights {np.shape(weights)}")
    tokens = hits[0].sum() / top_k
    if tokens == 0:
        return float("nan")
    return float((hits * weights).sum() / tokens)
