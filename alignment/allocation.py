"""MESA step 2-4: which experts should carry safety duty, by KL-regularised optimal transport.

Notation (README, Aligning a model with MESA): L MoE layers, E routed experts, k experts per token.

1. **Rank** [choice]. ``f[l, e]`` is the percentile rank of expert e in layer l by its hit
   frequency on the mixed (safety + general) data: 0 = most activated ("head"), 100 = dormant
   ("tail"); ties share their average rank.
2. **Cost** [paper]. ``C(f) = 1 / ((f + alpha_shift) * (100 - f)^2)``. Head experts are
   saturated with general duty, tail experts are far from current routing (sharp minima, large
   routing shift); the minimum is at ``f* = (100 - 2 * alpha_shift) / 3``, the "shoulder".
   [choice] ``100 - f`` is clamped below at ``tail_delta`` so a dormant expert gets a large
   finite cost, and C is divided by its per-layer minimum (1 at the layer's cheapest expert), so
   ``eps`` is in units of the cheapest cost in every layer. (Dividing by the maximum instead lets
   the steep tail squash head and shoulder to ~0 and erases their difference.)
3. **Allocate** [paper + choice]. Per layer, semi-relaxed OT with KL regularisation:

       pi* = argmin_pi <pi, M> + eps * KL(pi || r_i P_ij)   s.t.  pi 1 = r

   with ``M_ij = C_j`` (cost depends on the destination expert), ``r = F_safe[l]`` normalised
   (where safety duty sits now) and ``P`` the empirical co-activation prior: row i is the
   distribution of experts that fire together with i (diagonal = i itself), smoothed so every
   expert is reachable. The destination marginal is free: with both marginals fixed, a
   destination-only cost would have no effect. The closed form is

       pi_ij = r_i P_ij exp(-C_j / eps) / sum_j' P_ij' exp(-C_j' / eps)

   and POT's generalised Sinkhorn (``ot.unbalanced.sinkhorn_unbalanced`` with
   ``reg_m=(inf, 0)`` and reference measure ``c = r P``) solves the same problem; the tests check
   one against the other.
4. **Select** [paper]. Score ``s[l, e] = sum_i pi[l, i, e]`` (safety duty arriving at e); the
   top-w (layer, expert) pairs are trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from moe_routing.stats import RoutingCounts, expert_frequency


class AllocationSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # The cost's minimum sits at f* = (100 - 2 * alpha_shift) / 3; 20 puts it at the 20th
    # percentile: experts used often enough to be well trained, not the saturated head.
    alpha_shift: float = Field(20.0, ge=0, lt=50)
    eps: float = Field(0.1, gt=0)  # KL weight: large -> follow the prior, small -> follow the cost
    num_selected: int = Field(8, ge=1)  # w: (layer, expert) pairs that get safety duty
    tail_delta: float = Field(10.0, gt=0, le=100)
    prior_smoothing: float = Field(1e-3, gt=0)  # added to the row-normalised co-activation prior
    solver: Literal["closed_form", "pot"] = "closed_form"


def percentile_rank(frequency: np.ndarray) -> np.ndarray:
    """f[l, e] in [0, 100]: 0 = most activated expert of its layer, 100 = least; ties averaged."""
    from scipy.stats import rankdata

    frequency = np.asarray(frequency, dtype=np.float64)
    if frequency.ndim != 2 or frequency.shape[1] < 2:
        raise ValueError(f"expected frequencies [layers, experts>=2], got shape {frequency.shape}")
    ranks = rankdata(-frequency, method="average", axis=1) - 1.0  # 0 = highest frequency
    return 100.0 * ranks / (frequency.shape[1] - 1)


def shoulder_cost(f: np.ndarray, alpha_shift: float, tail_delta: float = 10.0) -> np.ndarray:
    """C(f) = 1 / ((f + alpha_shift) * max(100 - f, tail_delta)^2), divided by its row minimum."""
    f = np.asarray(f, dtype=np.float64)
    if alpha_shift <= 0 and np.any(f <= 0):
        raise ValueError("alpha_shift must be > 0 when some expert has rank 0 (the cost would be infinite)")
    raw = 1.0 / ((f + alpha_shift) * np.maximum(100.0 - f, tail_delta) ** 2)
    return raw / raw.min(axis=-1, keepdims=True)


def coactivation_prior(counts: RoutingCounts, smoothing: float = 1e-3) -> np.ndarray:
    """P[l, i, j]: share of i's tokens that also picked j (P[l, i, i] = i's own tokens), smoothed
    and row-normalised."""
    if counts.coactivation is None:
        raise ValueError("the prior needs co-activation counts; profile the full set (not a subset)")
    co = counts.coactivation.astype(np.float64)
    rows = co / np.maximum(co.sum(axis=-1, keepdims=True), 1.0)
    rows = rows + smoothing
    return rows / rows.sum(axis=-1, keepdims=True)


def closed_form_plan(source: np.ndarray, prior: np.ndarray, cost: np.ndarray, eps: float) -> np.ndarray:
    """pi[l, i, j] = r_i P_ij exp(-C_j/eps) / sum_j' P_ij' exp(-C_j'/eps), batched over layers."""
    # Subtracting the row minimum of C before exp keeps exp() in range for small eps.
    shifted = cost - cost.min(axis=-1, keepdims=True)
    kernel = prior * np.exp(-shifted / eps)[:, None, :]
    return source[:, :, None] * kernel / kernel.sum(axis=-1, keepdims=True)


def pot_plan(source: np.ndarray, prior: np.ndarray, cost: np.ndarray, eps: float) -> np.ndarray:
    """The same plan from POT's generalised Sinkhorn solver (source fixed, destination free)."""
    import ot

    layers, experts = source.shape
    plans = np.zeros((layers, experts, experts))
    for l in range(layers):
        # Rows without safety mass carry nothing; leaving them out keeps log(0) out of the solver.
        rows = source[l] > 0
        # A constant shift of the cost does not change the plan (the source mass is fixed), and
        # starting at 0 keeps exp(-M / eps) from underflowing everywhere.
        M = np.tile(cost[l] - cost[l].min(), (int(rows.sum()), 1))
        reference = source[l][rows, None] * prior[l][rows]
        plans[l][rows] = ot.unbalanced.sinkhorn_unbalanced(
            source[l][rows],
            np.full(experts, 1.0 / experts),
            M,
            eps,
            (math.inf, 0.0),
            c=reference,
            method="sinkhorn_stabilized",
            numItermax=10_000,
            stopThr=1e-12,
        )
    return plans


@dataclass(frozen=True)
class Allocation:
    rank: np.ndarray  # f [L, E]
    cost: np.ndarray  # C [L, E], relative to the layer's cheapest expert (>= 1)
    plan: np.ndarray  # pi [L, E, E]
    scores: np.ndarray  # s [L, E]
    selected: list[tuple[int, int]]  # top-w (layer, expert), best first
    settings: AllocationSettings

    def to_dict(self, decimals: int = 5) -> dict:
        return {
            "settings": self.settings.model_dump(),
            "selected": [list(p) for p in self.selected],
            "rank": np.round(self.rank, 2).tolist(),
            "cost": np.round(self.cost, decimals).tolist(),
            "scores": np.round(self.scores, decimals).tolist(),
        }


def allocate(
    safety: RoutingCounts, general: RoutingCounts, settings: AllocationSettings | None = None
) -> Allocation:
    """Rank, cost, OT plan and the selected experts from safety and general routing counts."""
    settings = settings or AllocationSettings()
    if safety.hits.shape != general.hits.shape:
        raise ValueError(
            f"safety and general counts differ in shape: {safety.hits.shape} vs {general.hits.shape}"
        )
    layers, experts = safety.num_layers, safety.num_experts
    if settings.num_selected > layers * experts:
        raise ValueError(
            f"num_selected={settings.num_selected} exceeds the {layers * experts} (layer, expert) pairs"
        )
    mixed = RoutingCounts.merge([safety, general])
    rank = percentile_rank(expert_frequency(mixed))
    cost = shoulder_cost(rank, settings.alpha_shift, settings.tail_delta)
    safe_hits = safety.hits.astype(np.float64)
    source = safe_hits / np.maximum(safe_hits.sum(axis=-1, keepdims=True), 1.0)
    prior = coactivation_prior(mixed, settings.prior_smoothing)
    solve = closed_form_plan if settings.solver == "closed_form" else pot_plan
    plan = solve(source, prior, cost, settings.eps)
    scores = plan.sum(axis=1)
    order = np.argsort(-scores, axis=None, kind="stable")[: settings.num_selected]
    selected = [(int(i // experts), int(i % experts)) for i in order]
    return Allocation(rank, cost, plan, scores, selected, settings)
