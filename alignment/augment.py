"""Training under routing an attacker would choose, so safety survives re-routing.

- Masking augmentation [ours, off by default]: some steps train under a mask of the experts
  that safety routing relies on at that moment (:class:`SafetyRouting`), the attack to survive.
- Forced routes [ours, ``mesa``]: some steps train the harmful rows under routes forced onto
  random k-subsets of each layer's safety set D_l (:func:`forced_routes`), so every member of
  D_l learns to refuse on its own, not only in its usual company.

Both are pure functions of (seed, step, state), so a resumed run draws what an uninterrupted
one would; each draws from a stream of its own (:func:`step_rng`).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from alignment.config import TrainingConfig
from moe_routing.architectures import RouterSpec, route
from moe_routing.stats import top_pairs


def step_rng(purpose: str, seed: int, step: int) -> random.Random:
    """The random stream of one purpose at one training step. Keyed by the purpose's name, so two
    purposes never share a stream: arithmetic keys such as ``seed * 7919 + step`` collide for
    seed 0 (every purpose then drew ``Random(step)``: a step's forced-route coin was its mask coin,
    and its batch came from the same stream)."""
    return random.Random(f"{purpose}/{seed}/{step}")


class SafetyRouting:
    """Which experts safety routing relies on *now*: running hit frequencies [L, E] of harmful-
    request tokens and of all other tokens (exponential average over unmasked training steps),
    started from the D_stat profile. Its top pairs by harmful-minus-other frequency are what a
    top-N masking attack would pick on the model being trained (masking augmentation)."""

    def __init__(self, harmful: np.ndarray, other: np.ndarray, top_k: int, decay: float = 0.9):
        self.harmful, self.other = np.asarray(harmful, float), np.asarray(other, float)
        self.top_k, self.decay = top_k, decay

    def update(self, logits: Sequence[torch.Tensor], spec: RouterSpec, harmful: torch.Tensor,
               valid: torch.Tensor) -> None:
        """Fold in one step's routing; with several data-parallel workers, all see the same sum."""
        kinds = torch.stack([harmful & valid, ~harmful & valid]).float()  # [2, N]
        selected = [route(current.detach(), spec)[1] for current in logits]
        hits = torch.stack([
            kinds @ torch.zeros(current.shape, device=current.device).scatter_(1, chosen, 1.0)
            for current, chosen in zip(logits, selected)
        ])  # [L, 2, E]: hit counts per kind
        counts = torch.cat([hits.flatten(), kinds.sum(dim=1)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        hits, tokens = counts[:-2].view(hits.shape).cpu().numpy(), counts[-2:].cpu().numpy()
        for kind, running in enumerate((self.harmful, self.other)):
            if tokens[kind] > 0:
                running[:] = self.decay * running + (1 - self.decay) * hits[:, kind] / tokens[kind]

    def top(self, n: int) -> list[tuple[int, int]]:
        """The n most safety-critical pairs, leaving at least top_k routable experts per layer."""
        risk = self.harmful - self.other
        return top_pairs(risk, min(n, risk.shape[0] * (risk.shape[1] - self.top_k)), top_k=self.top_k)

    def state_dict(self) -> dict:
        return {"harmful": self.harmful.tolist(), "other": self.other.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.harmful, self.other = np.asarray(state["harmful"]), np.asarray(state["other"])


def augmentation_mask(step: int, seed: int, training: TrainingConfig, routing: SafetyRouting | None
                      ) -> list[tuple[int, int]]:
    """The (layer, expert) pairs masked during `step` (empty for most steps): with probability
    `mask_augmentation`, the current top-N safety-critical pairs, N uniform in 1..mask_max.
    A pure function of (seed, step, routing state), so resumed runs draw the same masks."""
    if routing is None or training.mask_augmentation == 0:
        return []
    rng = step_rng("mask", seed, step)
    if rng.random() >= training.mask_augmentation:
        return []
    return routing.top(rng.randint(1, training.mask_max))


def forced_routes(step: int, seed: int, training: TrainingConfig, safety_set: Mapping[int, Sequence[int]],
                  top_k: int, harmful: Sequence[bool], length: int,
                  masked: Sequence[tuple[int, int]] = ()) -> dict[int, torch.Tensor]:
    """Per-token forcing ``{layer: [batch, length, k]}`` for `force_experts` (empty for most
    steps): with probability `forced_routes`, each harmful row gets, in every layer whose safety
    set has at least k members, a k-subset of it drawn uniformly (the same for all the row's
    tokens); other rows are left alone (-1). The step's `masked` pairs are never drawn: a token
    forced onto a masked expert has no finite routing weight (the loss turns NaN); a layer left
    with fewer than k unmasked members is not forced."""
    if training.forced_routes == 0:
        return {}
    rng = step_rng("forced", seed, step)
    if rng.random() >= training.forced_routes or not any(harmful):
        return {}
    forced = {}
    masked = set(masked)
    for layer, members in sorted(safety_set.items()):
        members = [e for e in members if (layer, e) not in masked]
        if len(members) < top_k:
            continue
        rows = torch.full((len(harmful), length, top_k), -1, dtype=torch.long)
        for row, is_harmful in enumerate(harmful):
            if is_harmful:
                rows[row] = torch.tensor(sorted(rng.sample(sorted(members), top_k)))
        forced[layer] = rows
    return forced
