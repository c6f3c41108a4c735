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
   top-w (layer, expert) pairs are trained (``selection: top_w``, MESA as in the paper).

``selection: coverage`` [ours] spreads the duty instead of moving it. With the paper's costs and a
small eps, a layer's whole plan lands on its two or three cheapest experts, and the global top-w
is k experts per layer almost whatever the safety data says. Coverage changes three things:

- **A cap** on any one expert's share of a layer's plan: ``sum_i pi[l, i, e] <= max_share``.
  The capped plan solves the same problem with that extra constraint; its optimality conditions
  give ``pi_ij = u_i K_ij v_j`` with ``K_ij = r_i P_ij exp(-C_j / eps)``, row sums r, and
  ``v_j <= 1`` with ``v_j < 1`` only where column j sits at the cap. :func:`capped_plan` finds it
  by alternating the two scalings (iterative Bregman projections, Benamou et al. 2015, §5.1);
  POT has no solver for an upper bound on one marginal. Without a binding cap it is the
  closed-form plan exactly.
- **Per-layer quotas**: ``w_l`` experts in every layer (default ``2 k``, at least ``k + 1`` so that
  any k-subset of the set leaves a spare), by capped score.
- **The carriers stay**: the safety set ``D_l`` is the selected experts plus the ``k`` experts
  that carry safety today (largest positive harmful-minus-benign hit frequency), not a
  replacement for them. Training and the router target use ``D_l``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from moe_routing.stats import RoutingCounts, expert_frequency, risk_difference


class AllocationSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # The cost's minimum sits at f* = (100 - 2 * alpha_shift) / 3; 20 puts it at the 20th
    # percentile: experts used often enough to be well trained, not the saturated head.
    alpha_shift: float = Field(20.0, ge=0, lt=50)
    # KL weight, in units of the layer's cheapest cost: large -> follow the prior, small -> follow
    # the cost. 0.1 (the paper's setting here) is nearly an argmax over the shoulder experts
    # (exp(-0.26 / 0.1) = 0.07 for a cost 1.26 beside 1.0); 1.0 spreads over head and shoulder and
    # still keeps the tail (cost >= 3.4) under 10%.
    eps: float = Field(1.0, gt=0)
    num_selected: int = Field(8, ge=1)  # w: (layer, expert) pairs that get safety duty (top_w)
    # top_w: the paper's global top-w of the plan. coverage [ours]: capped plan, per-layer quotas,
    # today's safety carriers kept in the safety set (module docstring).
    selection: Literal["coverage", "top_w"] = "coverage"
    per_layer: int | None = Field(None, ge=1)  # coverage: w_l (default 2 k, at least k + 1)
    max_share: float = Field(0.3, gt=0, le=1)  # coverage: cap on one expert's share of the plan
    carriers: int | None = Field(None, ge=0)  # coverage: today's carriers kept per layer (default k)
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


def capped_plan(source: np.ndarray, prior: np.ndarray, cost: np.ndarray, eps: float, cap: float,
                iterations: int = 2000, tol: float = 1e-13) -> np.ndarray:
    """The closed-form plan under an extra cap on every column: ``sum_i pi[l, i, j] <= cap``.

    With ``G_ij = P_ij exp(-C_j / eps)``: ``pi_ij = r_i G_ij v_j / sum_j' G_ij' v_j'``, alternating
    that row scaling with ``v_j <- v_j * min(1, cap / column_j)`` capped at 1 (v = 1 where the cap
    does not bind, which is the closed form). Needs ``cap * E >= sum r`` per layer."""
    if np.any(cap * source.shape[-1] < source.sum(axis=-1) - 1e-12):
        raise ValueError(f"max_share={cap} x {source.shape[-1]} experts cannot hold a layer's safety mass")
    shifted = cost - cost.min(axis=-1, keepdims=True)
    kernel = prior * np.exp(-shifted / eps)[:, None, :]  # G [L, E, E]

    def plan_for(v):
        scaled = kernel * v[:, None, :]
        return source[:, :, None] * scaled / scaled.sum(axis=-1, keepdims=True)

    v = np.ones(source.shape)
    for _ in range(iterations):
        column = plan_for(v).sum(axis=1)
        ratio = np.divide(cap, column, out=np.full_like(column, np.inf), where=column > 0)
        new_v = np.minimum(1.0, v * ratio)
        converged = np.max(np.abs(new_v - v)) < tol
        v = new_v
        if converged:
            break
    return plan_for(v)


def default_per_layer(num_experts: int, top_k: int) -> int:
    """w_l: 2 k experts per layer, at least k + 1 and at most E."""
    return min(num_experts, max(top_k + 1, 2 * top_k))


def safety_carriers(risk: np.ndarray, per_layer: int) -> list[tuple[int, int]]:
    """Per layer, the `per_layer` experts with the largest positive risk difference (harmful minus
    benign hit frequency): the experts safety routing relies on today."""
    pairs = []
    for layer, row in enumerate(np.asarray(risk, dtype=np.float64)):
        order = np.argsort(-row, kind="stable")[:per_layer]
        pairs += [(layer, int(e)) for e in order if row[e] > 0]
    return pairs


@dataclass(frozen=True)
class Allocation:
    rank: np.ndarray  # f [L, E]
    cost: np.ndarray  # C [L, E], relative to the layer's cheapest expert (>= 1)
    plan: np.ndarray  # pi [L, E, E]
    scores: np.ndarray  # s [L, E]
    selected: list[tuple[int, int]]  # top-w (layer, expert), best first; per layer for coverage
    settings: AllocationSettings
    carriers: list[tuple[int, int]] = ()  # coverage: today's safety carriers, kept
    safety_set: list[tuple[int, int]] = ()  # D: what trains and where the router sends safety

    def safety_mask(self) -> np.ndarray:
        """D as a bool array [L, E]."""
        mask = np.zeros(self.rank.shape, dtype=bool)
        for layer, expert in self.safety_set:
            mask[layer, expert] = True
        return mask

    def to_dict(self, decimals: int = 5) -> dict:
        return {
            "settings": self.settings.model_dump(),
            "selected": [list(p) for p in self.selected],
            "carriers": [list(p) for p in self.carriers],
            "safety_set": [list(p) for p in self.safety_set],
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
    if settings.selection == "top_w" and settings.num_selected > layers * experts:
        raise ValueError(
            f"num_selected={settings.num_selected} exceeds the {layers * experts} (layer, expert) pairs"
        )
    mixed = RoutingCounts.merge([safety, general])
    rank = percentile_rank(expert_frequency(mixed))
    cost = shoulder_cost(rank, settings.alpha_shift, settings.tail_delta)
    safe_hits = safety.hits.astype(np.float64)
    source = safe_hits / np.maximum(safe_hits.sum(axis=-1, keepdims=True), 1.0)
    prior = coactivation_prior(mixed, settings.prior_smoothing)
    if settings.selection == "top_w":
        solve = closed_form_plan if settings.solver == "closed_form" else pot_plan
        plan = solve(source, prior, cost, settings.eps)
        scores = plan.sum(axis=1)
        order = np.argsort(-scores, axis=None, kind="stable")[: settings.num_selected]
        selected = [(int(i // experts), int(i % experts)) for i in order]
        return Allocation(rank, cost, plan, scores, selected, settings, [], list(selected))
    top_k = safety.top_k
    quota = settings.per_layer or default_per_layer(experts, top_k)
    if quota > experts:
        raise ValueError(f"allocation.per_layer={quota} exceeds the {experts} experts of a layer")
    plan = capped_plan(source, prior, cost, settings.eps, settings.max_share)
    scores = plan.sum(axis=1)
    selected = [(layer, int(e)) for layer in range(layers)
                for e in np.argsort(-scores[layer], kind="stable")[:quota]]
    carriers = safety_carriers(risk_difference(safety, general),
                               top_k if settings.carriers is None else settings.carriers)
    safety_set = sorted(set(selected) | set(carriers))
    return Allocation(rank, cost, plan, scores, selected, settings, carriers, safety_set)
