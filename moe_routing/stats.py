"""Routing statistics: one definition shared by alignment (MESA profiling) and serving (probes).

Notation: L MoE layers, E routed experts per layer, k experts per token (top-k). A *hit* of
expert e in layer l is one token that selected e among its top-k in layer l. Counts are kept
as integers per profiled sequence so that sharded profiling merges exactly and sequences can
be bootstrap-resampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def _int_array(name: str, value, ndim: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.size == 0 and arr.dtype == np.float64:  # np.asarray([]) is float64
        arr = arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} must be non-negative")
    arr = np.array(arr, dtype=np.int64)  # private copy, so freezing it cannot touch the caller's
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class RoutingCounts:
    """Integer top-k routing counts of S profiled sequences.

    sequence_hits[s, l, e]: tokens of sequence s that selected expert e in layer l, int64 [S, L, E].
    sequence_tokens[s]: tokens counted in sequence s, int64 [S]; each token hits exactly k
        distinct experts per layer, so sequence_hits[s, l].sum() == top_k * sequence_tokens[s].
    coactivation[l, i, j]: tokens (over all sequences) that selected both i and j in layer l,
        int64 [L, E, E], symmetric with diagonal == hits. None when unknown: co-activation is not
        kept per sequence, so it cannot be recovered for a subset of sequences (see `subset`).
    """

    sequence_hits: np.ndarray
    sequence_tokens: np.ndarray
    coactivation: np.ndarray | None
    top_k: int

    def __post_init__(self) -> None:
        hits = _int_array("sequence_hits", self.sequence_hits, 3)
        tokens = _int_array("sequence_tokens", self.sequence_tokens, 1)
        object.__setattr__(self, "sequence_hits", hits)
        object.__setattr__(self, "sequence_tokens", tokens)
        S, L, E = hits.shape
        if tokens.shape[0] != S:
            raise ValueError(f"sequence_tokens has {tokens.shape[0]} entries but sequence_hits "
                             f"has {S} sequences")
        if L < 1 or E < 1:
            raise ValueError(f"need at least one layer and one expert, got L={L}, E={E}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)):
            raise ValueError(f"top_k must be an int, got {self.top_k!r}")
        if not 1 <= self.top_k <= E:
            raise ValueError(f"top_k must be in [1, {E}] (num_experts), got {self.top_k}")
        object.__setattr__(self, "top_k", int(self.top_k))
        bad = np.argwhere(hits.sum(axis=2) != self.top_k * tokens[:, None])
        if bad.size:
            s, l = bad[0]
            raise ValueError(f"sequence {s}, layer {l}: hits sum to {hits[s, l].sum()}, expected "
                             f"top_k * sequence_tokens = {self.top_k * tokens[s]}")
        if (hits > tokens[:, None, None]).any():
            raise ValueError("sequence_hits exceeds sequence_tokens: a token hits an expert once")
        if self.coactivation is not None:
            co = _int_array("coactivation", self.coactivation, 3)
            if co.shape != (L, E, E):
                raise ValueError(f"coactivation must have shape {(L, E, E)}, got {co.shape}")
            if not np.array_equal(co, co.transpose(0, 2, 1)):
                raise ValueError("coactivation must be symmetric in its last two axes")
            if not np.array_equal(np.diagonal(co, axis1=1, axis2=2), hits.sum(axis=0)):
                raise ValueError("coactivation diagonal must equal the hits summed over sequences")
            object.__setattr__(self, "coactivation", co)

    @property
    def num_sequences(self) -> int:
        return self.sequence_hits.shape[0]

    @property
    def num_layers(self) -> int:
        return self.sequence_hits.shape[1]

    @property
    def num_experts(self) -> int:
        return self.sequence_hits.shape[2]

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_tokens.sum())

    @property
    def hits(self) -> np.ndarray:
        """Hits summed over sequences, int64 [L, E]."""
        return self.sequence_hits.sum(axis=0)

    @classmethod
    def empty(cls, num_layers: int, num_experts: int, top_k: int) -> RoutingCounts:
        """Counts of zero sequences (the identity of `merge`)."""
        return cls(np.zeros((0, num_layers, num_experts), np.int64), np.zeros(0, np.int64),
                   np.zeros((num_layers, num_experts, num_experts), np.int64), top_k)

    @classmethod
    def merge(cls, parts: Sequence[RoutingCounts]) -> RoutingCounts:
        """Concatenate sequences in the given order and sum co-activation (exact, integer).

        The result has coactivation None if any part lacks it.
        """
        if len(parts) == 0:
            raise ValueError("merge needs at least one RoutingCounts, got an empty list")
        first = parts[0]
        for i, p in enumerate(parts):
            if (p.num_layers, p.num_experts, p.top_k) != (
                    first.num_layers, first.num_experts, first.top_k):
                raise ValueError(
                    f"part {i} has (L, E, top_k) = {(p.num_layers, p.num_experts, p.top_k)}, "
                    f"part 0 has {(first.num_layers, first.num_experts, first.top_k)}")
        co = None
        if all(p.coactivation is not None for p in parts):
            co = np.sum([p.coactivation for p in parts], axis=0, dtype=np.int64)
        return cls(np.concatenate([p.sequence_hits for p in parts]),
                   np.concatenate([p.sequence_tokens for p in parts]), co, first.top_k)

    def subset(self, indices) -> RoutingCounts:
        """Sequences `indices` (repeats allowed, as in a bootstrap resample), in that order.

        coactivation is None: it is summed over tokens, not kept per sequence.
        """
        idx = _int_array("indices", indices, 1)
        if idx.size and idx.max() >= self.num_sequences:
            raise ValueError(f"index {idx.max()} out of range for {self.num_sequences} sequences")
        return RoutingCounts(self.sequence_hits[idx], self.sequence_tokens[idx], None, self.top_k)

    def save(self, path: str | Path) -> None:
        """Write to a compressed .npz file (coactivation omitted when None)."""
        if not str(path).endswith(".npz"):
            raise ValueError(f"path must end in .npz (numpy would append it), got {path}")
        arrays = dict(sequence_hits=self.sequence_hits, sequence_tokens=self.sequence_tokens,
                      top_k=np.int64(self.top_k))
        if self.coactivation is not None:
            arrays["coactivation"] = self.coactivation
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> RoutingCounts:
        with np.load(path, allow_pickle=False) as z:
            missing = {"sequence_hits", "sequence_tokens", "top_k"} - set(z.files)
            if missing:
                raise ValueError(f"{path} is missing arrays {sorted(missing)}")
            co = z["coactivation"] if "coactivation" in z.files else None
            return cls(z["sequence_hits"], z["sequence_tokens"], co, int(z["top_k"]))


def _frequency(hits: np.ndarray, tokens) -> np.ndarray:
    if np.any(np.asarray(tokens) <= 0):
        raise ValueError("routing counts hold no tokens; frequency is undefined")
    return hits / np.asarray(tokens, dtype=np.float64)[..., None, None]


def expert_frequency(counts: RoutingCounts) -> np.ndarray:
    """F[l, e] = hits[l, e] / num_tokens: share of tokens routed to e in layer l, float64 [L, E].

    Each row sums to k (every token picks k experts).
    """
    return _frequency(counts.hits, counts.num_tokens)


def _check_same_shape(a: RoutingCounts, b: RoutingCounts) -> None:
    if (a.num_layers, a.num_experts) != (b.num_layers, b.num_experts):
        raise ValueError(f"harmful counts have (L, E) = {(a.num_layers, a.num_experts)}, "
                         f"benign counts have {(b.num_layers, b.num_experts)}")


def risk_difference(harmful: RoutingCounts, benign: RoutingCounts) -> np.ndarray:
    """RD[l, e] = F_harmful[l, e] - F_benign[l, e], float64 [L, E]."""
    _check_same_shape(harmful, benign)
    return expert_frequency(harmful) - expert_frequency(benign)


def effective_safety_experts(risk: np.ndarray) -> float:
    """How many (layer, expert) pairs safety routing is spread over: exp(entropy) of the positive
    part of the risk difference RD[l, e], normalised over all pairs (1 = one pair carries all the
    excess harmful routing; L*E = spread evenly). 0 when no pair is used more by harmful prompts."""
    excess = np.maximum(np.asarray(risk, dtype=np.float64), 0.0).reshape(1, -1)
    if excess.sum() == 0:
        return 0.0
    return float(concentration(excess, top_n=1).effective_experts[0])


@dataclass(frozen=True)
class ExpertScore:
    layer: int
    expert: int
    risk_difference: float
    stability: float


def _top_flat(rd: np.ndarray, top_n: int, per_layer_cap: int | None = None) -> np.ndarray:
    # Stable sort on -rd over the row-major flattening: ties fall back to (layer, expert) ascending.
    order = np.argsort(-rd.reshape(-1), kind="stable")
    if per_layer_cap is None:
        return order[:top_n]
    E = rd.shape[-1]
    taken, per_layer = [], np.zeros(rd.shape[0], np.int64)
    for flat in order:
        layer = flat // E
        if per_layer[layer] < per_layer_cap:
            taken.append(flat)
            per_layer[layer] += 1
            if len(taken) == top_n:
                break
    return np.asarray(taken, np.int64)


def top_pairs(risk: np.ndarray, n: int, *, top_k: int) -> list[tuple[int, int]]:
    """The top-N rule shared by the suite, the probes and MESA training: the n (layer, expert)
    pairs with the largest risk[l, e] (harmful-minus-benign hit frequency), descending, ties by
    (layer, expert), taking at most E - top_k pairs per layer, so that masking them leaves top_k
    routable experts in every layer (what `mask_experts` requires). n <= L * (E - top_k)."""
    risk = np.asarray(risk, dtype=np.float64)
    if risk.ndim != 2:
        raise ValueError(f"risk must be [L, E], got shape {risk.shape}")
    L, E = risk.shape
    cap = E - top_k
    if not 1 <= top_k < E:
        raise ValueError(f"top_k must be in [1, {E - 1}] for a mask to leave experts routable, got {top_k}")
    if not 0 <= n <= L * cap:
        raise ValueError(f"can mask at most L * (E - top_k) = {L * cap} pairs, asked for {n}")
    return [(int(i // E), int(i % E)) for i in _top_flat(risk, n, cap)]


def budget_count(budget: float | int, num_layers: int, num_experts: int) -> int:
    """The number of (layer, expert) pairs a masking budget stands for: an int is a count, a
    float in (0, 1] a fraction f of all L * E pairs, N = max(1, floor(f * L * E + 1/2)) (rounded
    half up, at least one pair), so organisms and real models compare at the same fraction."""
    total = num_layers * num_experts
    if isinstance(budget, bool):
        raise ValueError(f"a masking budget is a count or a fraction, got {budget!r}")
    if isinstance(budget, (int, np.integer)):
        if not 1 <= budget <= total:
            raise ValueError(f"a masking count must be in [1, {total}] (L*E), got {budget}")
        return int(budget)
    if not 0 < budget <= 1:
        raise ValueError(f"a masking fraction must be in (0, 1], got {budget}")
    return max(1, int(np.floor(budget * total + 0.5)))


def safety_critical_ranking(harmful: RoutingCounts, benign: RoutingCounts, *, top_n: int,
                            n_bootstrap: int = 100, seed: int = 0,
                            per_layer_cap: int | None = None) -> list[ExpertScore]:
    """The top_n (layer, expert) pairs by risk difference, descending; ties by (layer, expert).
    With `per_layer_cap` (the top-N rule of `top_pairs`: E - top_k), at most that many per layer.

    stability of a pair = fraction of B = n_bootstrap replicates in which it is among the top_n
    (same tie-break and cap), each replicate resampling the sequences of harmful and of benign with
    replacement, independently (SAFEx-style stability selection). Bootstrap weights are drawn
    as w ~ Multinomial(S, 1/S) per replicate from np.random.default_rng(seed), which is the
    same distribution as resampling indices. n_bootstrap = 0 gives stability NaN.
    """
    _check_same_shape(harmful, benign)
    L, E = harmful.num_layers, harmful.num_experts
    limit = L * E if per_layer_cap is None else L * min(per_layer_cap, E)
    if not 1 <= top_n <= limit:
        raise ValueError(f"top_n must be in [1, {limit}] (L*E, or L * per_layer_cap), got {top_n}")
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    rd = risk_difference(harmful, benign)
    top = _top_flat(rd, top_n, per_layer_cap)
    in_top = np.zeros(L * E, np.int64)
    if n_bootstrap:
        rng = np.random.default_rng(seed)
        freqs = []
        for c in (harmful, benign):
            S = c.num_sequences
            w = rng.multinomial(S, np.full(S, 1.0 / S), size=n_bootstrap)  # [B, S]
            hits = np.tensordot(w, c.sequence_hits, axes=(1, 0))  # [B, L, E], exact ints
            freqs.append(_frequency(hits, w @ c.sequence_tokens))
        for rd_b in freqs[0] - freqs[1]:
            in_top[_top_flat(rd_b, top_n, per_layer_cap)] += 1
    stability = in_top / n_bootstrap if n_bootstrap else np.full(L * E, np.nan)
    return [ExpertScore(int(i // E), int(i % E), float(rd.flat[i]), float(stability[i]))
            for i in top]


@dataclass(frozen=True, eq=False)
class Concentration:
    """Per-layer concentration of the expert load, arrays [L]; NaN for a layer with zero load."""

    normalized_entropy: np.ndarray  # H(p) / log E in [0, 1]; 1 = uniform
    gini: np.ndarray  # 0 = uniform, (E - 1) / E = all load on one expert
    top_share: np.ndarray  # share of the load on the top_n most-loaded experts
    effective_experts: np.ndarray  # exp(H(p)) in [1, E]
    top_n: int

    def to_dict(self, decimals: int = 5) -> dict:
        """JSON-ready per-layer lists (NaN for a zero-load layer stays NaN)."""
        measures = ("normalized_entropy", "gini", "top_share", "effective_experts")
        out = {name: np.round(getattr(self, name), decimals).tolist() for name in measures}
        return {**out, "top_n": self.top_n}


def concentration(hits: np.ndarray, top_n: int) -> Concentration:
    """Concentration of loads x[l, e] >= 0 (counts or frequencies), [L, E] or [E] (= one layer).

    With p = x / sum_e x (per layer) and natural log, 0 log 0 = 0:
      H(p) = -sum_e p_e log p_e;  normalized_entropy = H / log E (1 when E = 1);
      effective_experts = exp(H);
      gini = sum_i sum_j |x_i - x_j| / (2 E sum_e x_e), computed from the ascending sort as
             (2 sum_i i x_(i)) / (E sum x) - (E + 1) / E, i = 1..E;
      top_share = (sum of the top_n largest x_e) / sum_e x_e.
    A layer whose total load is 0 has no distribution: every measure is NaN there.
    """
    x = np.asarray(hits, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"hits must be [L, E] or [E] with E >= 1, got shape {np.shape(hits)}")
    if not np.isfinite(x).all() or (x < 0).any():
        raise ValueError("hits must be finite and non-negative")
    E = x.shape[1]
    if not 1 <= top_n <= E:
        raise ValueError(f"top_n must be in [1, {E}] (num_experts), got {top_n}")
    total = x.sum(axis=1)
    live = total > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        p = x / total[:, None]
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
        H = np.where(live, -plogp.sum(axis=1), np.nan)
        xs = np.sort(x, axis=1)
        ranks = np.arange(1, E + 1)
        gini = 2 * (xs * ranks).sum(axis=1) / (E * total) - (E + 1) / E
        top_share = xs[:, E - top_n:].sum(axis=1) / total
    norm = H / np.log(E) if E > 1 else np.where(live, 1.0, np.nan)
    # The sorted Gini formula can land a rounding error below 0 for uniform loads.
    gini = np.where(live, np.clip(gini, 0.0, (E - 1) / E), np.nan)
    return Concentration(normalized_entropy=norm, gini=gini, top_share=top_share,
                         effective_experts=np.exp(H), top_n=int(top_n))


def coactivation_rate(counts: RoutingCounts) -> np.ndarray:
    """R[l, i, j] = coactivation[l, i, j] / num_tokens = P(token selects both i and j in l)."""
    if counts.coactivation is None:
        raise ValueError("counts have no coactivation (e.g. a subset); profile the full set")
    if counts.num_tokens <= 0:
        raise ValueError("routing counts hold no tokens; coactivation rate is undefined")
    return counts.coactivation / float(counts.num_tokens)
