"""MESA's router loss: per token, a target routing distribution, and KL(target || P_phi).

General tokens (and padding-free tokens of D_general rows) keep the frozen reference's routing
``P_ref``. Safety tokens (tokens of harmful requests) get one of two targets:

- ``tilt`` [paper + choice, ``mesa_paper``]: ``P_ref * exp(-C~ / tau)`` renormalised, ``C~ = 0`` on
  the layer's selected experts and 1 elsewhere. With tau = 0.25 the off-selection weight is
  exp(-4) = 0.018: every harmful token goes to the same few experts, a new concentrated path.
- ``transport`` [ours, ``mesa``]: per layer and batch, an entropic OT plan between the batch's n
  safety tokens (mass 1/n each) and the layer's safety set D_l (capacity 1/|D_l| each), with cost

      M_ij = -log P_ref(x_i)_j + C_j        (j in D_l; C the allocation's cost, >= 1)
      pi = argmin <pi, M> - eps H(pi)   s.t.  pi 1 = 1/n,  pi^T 1 = 1/|D_l|

  solved by POT's Sinkhorn (``ot.sinkhorn``). Token i's target is ``n * pi_i``: it follows that
  token's own reference preferences (``-log P_ref``) and the cost, and the capacity makes every
  member of D_l carry about 1/|D_l| of the duty, so different tokens land on different k-subsets.
  With eps = 1 the plan is ``pi_ij = a_i P_ref(x_i)_j exp(-C_j) b_j``: the reference, tilted per
  expert by the capacity duals.

The loss is the mean over MoE layers of the mean over real tokens of ``KL(target || P_phi)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moe_routing.architectures import RouterSpec, router_probs


def distribution(logits: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """The router's distribution over experts [N, E] (softmax, or sigmoid scores renormalised)."""
    probs = router_probs(logits, spec)
    return probs / probs.sum(dim=-1, keepdim=True)


@dataclass(frozen=True)
class TiltTarget:
    """The paper's target: the reference tilted towards `selected` [L, E] bool for safety tokens."""

    selected: torch.Tensor
    tau: float

    def __call__(self, layer: int, reference: torch.Tensor, safety: torch.Tensor) -> torch.Tensor:
        return router_targets(reference, safety, self.selected[layer], self.tau)


def router_targets(reference: torch.Tensor, safety: torch.Tensor, selected: torch.Tensor,
                   tau: float) -> torch.Tensor:
    """Target routing distributions [N, E] of one layer (tilt).

    reference: P_ref [N, E] (rows sum to 1); safety: [N] bool, tokens of safety inputs;
    selected: [E] bool, this layer's selected experts. Safety tokens get
    P_ref * exp(-C~/tau) renormalised (C~ = 0 on selected experts, 1 elsewhere); the rest P_ref.
    A layer with no selected expert keeps P_ref for every token (a constant C~ cancels)."""
    tilt = torch.where(selected, 1.0, math.exp(-1.0 / tau)).to(reference.dtype)
    tilted = reference * tilt
    tilted = tilted / tilted.sum(dim=-1, keepdim=True)
    return torch.where(safety[:, None], tilted, reference)


def token_transport(reference: torch.Tensor, cost: torch.Tensor, eps: float) -> torch.Tensor:
    """The entropic OT plan [n, m] between n tokens (mass 1/n) and m experts (capacity 1/m).

    reference: P_ref of the tokens restricted to the m experts [n, m] (not renormalised);
    cost: C_j [m]. M_ij = -log P_ref_ij + C_j; ``ot.sinkhorn`` with reg eps."""
    import ot

    n, m = reference.shape
    M = -torch.log(reference.double().clamp_min(1e-30)) + cost.double()[None, :]
    M = M - M.min()  # a constant shift leaves the plan unchanged and keeps exp(-M/eps) in range
    a = torch.full((n,), 1.0 / n, dtype=torch.float64, device=reference.device)
    b = torch.full((m,), 1.0 / m, dtype=torch.float64, device=reference.device)
    return ot.sinkhorn(a, b, M, eps, method="sinkhorn_log", numItermax=2000, stopThr=1e-9)


@dataclass(frozen=True)
class TransportTarget:
    """Safety tokens of each layer transported onto its safety set D_l ([L, E] bool) with the
    allocation cost [L, E] and capacity 1/|D_l| each (module docstring). The plan is over the
    safety tokens of the whole global batch: with data-parallel workers, every worker solves it
    on all workers' tokens (`alignment.distributed.gather_rows`) and keeps its own rows."""

    safety_set: torch.Tensor
    cost: torch.Tensor
    eps: float

    def __call__(self, layer: int, reference: torch.Tensor, safety: torch.Tensor) -> torch.Tensor:
        from alignment.distributed import gather_rows

        members = self.safety_set[layer].nonzero().flatten()
        target = reference.clone()
        if members.numel() == 0:
            return target
        n = int(safety.sum())
        everyone, offset = gather_rows(reference[safety][:, members])  # every worker calls it
        if everyone.shape[0] == 0:
            return target
        plan = token_transport(everyone, self.cost[layer, members], self.eps)[offset : offset + n]
        rows = torch.zeros(n, reference.shape[1], dtype=reference.dtype, device=reference.device)
        rows[:, members] = plan.to(reference.dtype)
        target[safety] = rows / rows.sum(dim=-1, keepdim=True)  # exact row sums of 1
        return target


def ot_kl_loss(logits: Sequence[torch.Tensor], reference_logits: Sequence[torch.Tensor], spec: RouterSpec,
               safety: torch.Tensor, valid: torch.Tensor, target,
               tokens: torch.Tensor | float | None = None) -> torch.Tensor:
    """Mean over MoE layers of mean over real tokens of KL(target || P_phi).

    logits / reference_logits: per layer [N, E] (N = batch * length, row-major); safety, valid: [N]
    bool; target: a :class:`TiltTarget` or :class:`TransportTarget`. Only real safety tokens
    enter the transport (padding holds no duty). `tokens`: what the per-layer KL sum is divided
    by (default: this batch's real tokens; a data-parallel worker passes the global count over
    the number of workers, `alignment.distributed`)."""
    tokens = valid.sum() if tokens is None else tokens
    losses = []
    for layer, (current, ref) in enumerate(zip(logits, reference_logits)):
        reference = distribution(ref.detach(), spec)
        with torch.no_grad():
            wanted = target(layer, reference, safety & valid)
        log_p = torch.log(distribution(current, spec).clamp_min(1e-12))
        kl = (wanted * (torch.log(wanted.clamp_min(1e-12)) - log_p)).sum(dim=-1)
        losses.append(kl[valid].sum() / tokens)
    return torch.stack(losses).mean()
